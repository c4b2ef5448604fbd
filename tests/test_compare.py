import json
import re

import numpy as np
import pytest
import torch

from attnlab.cli import main
from attnlab.compare import DEFAULT_MODELS, CompareConfig, compare, gpt_config, parse_budget
from attnlab.compare.report import TABLE_HEADERS, in_context_positions, position_rows, table_values
from attnlab.compare.run import position_nll, score
from attnlab.data.tokenizer import CharTokenizer
from attnlab.models.ngram import NGramLM
from attnlab.models.rnn import RNNConfig, RNNLM
from attnlab.models.base import count_params
from attnlab.errors import ConfigError
from attnlab.models.gpt import GPT, GPTConfig

TINY = {"n_layer": 1, "n_head": 2, "d_model": 16, "block_size": 32, "batch_size": 4, "ffn_hidden": 24,
        "kv_lora_rank": 8, "n_routed_experts": 4, "ngram_orders": (2, 3), "eval_windows": 6, "sample_tokens": 30,
        "evals": 3, "threads": 1, "prompt": "ROMEO:\n", "attention_prompt": "To be, or not"}


@pytest.fixture
def corpus(tiny_shakespeare, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(tiny_shakespeare.read_text()[:16000])
    return str(path)


def _row(markdown: str, label: str) -> dict:
    line = next(l for l in markdown.splitlines() if l.startswith(f"| {label}"))
    return dict(zip(TABLE_HEADERS, [c.strip() for c in line.strip("|").split(" | ")]))


def test_tiny_comparison_writes_a_full_report_whose_numbers_match_the_run_files(corpus, tmp_path):
    out = tmp_path / "cmp"
    events = []
    summary = compare(out, {**TINY, "models": ("ngram", "mlp", "mla-moe"), "budget": "6ktok", "corpus": corpus},
                      command="attnlab compare --budget 6ktok", progress=events.append)
    assert not summary["interrupted"] and all(r["status"] == "ok" for r in summary["results"].values())
    assert [e["event"] for e in events[:2]] == ["prepare", "plan"]
    assert {"model", "step", "done", "report"} <= {e["event"] for e in events}
    assert all(e["eta_s"] >= 0 for e in events[1:])

    md = (out / "report.md").read_text()
    for name, label in (("ngram", "n-gram"), ("mlp", "MLP n-gram"), ("mla-moe", "GPT · MLA + MoE")):
        result = json.loads((out / name / "result.json").read_text())
        row = _row(md, label)
        assert row["val loss"] == f"{result['val_loss']:.4f}"
        assert row["bits/char"] == f"{result['bits_per_char']:.3f}"
        assert row["params (total)"] == f"{result['params_total']:,}"
        if name != "ngram":
            metrics = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
            assert row["steps"] == f"{metrics[-1]['step']:,}" and row["train tokens"] == f"{metrics[-1]['tokens']:,}"
            assert metrics[-1]["tokens"] == 6000 // (4 * 32) * 4 * 32  # the token budget, whole steps
            values = table_values({**result, "metrics": metrics})
            assert row["train tok/s"] == f"{values['tokens_per_s']:,.0f}"
    moe = _row(md, "GPT · MLA + MoE")
    assert int(moe["params (active)"].replace(",", "")) < int(moe["params (total)"].replace(",", ""))
    assert moe["KV cache B/token"] != "—" and moe["decode tok/s"] != "—"
    for section in ("## Results", "## Loss by position in the context",
                    "## Val loss vs wall time", "## Val loss vs training tokens", "## KV cache vs val loss",
                    "## MoE expert load over training", "## Samples", "## Attention heatmaps", "## Run"):
        assert section in md
    assert md.count("```text\nROMEO:\n") == 3  # one sample per model, same prompt
    assert "attnlab compare --budget 6ktok" in md and "torch " in md and "cores" in md

    page = (out / "report.html").read_text()
    assert not re.search(r"https?:|<script|<link|@import|url\(", page, re.I)
    images = re.findall(r'src="data:image/png;base64,', page)
    assert len(images) == 6  # loss by position, loss vs time, vs tokens, KV trade-off, MoE load, attention
    for png in ("loss_by_position.png", "loss_vs_time.png", "loss_vs_tokens.png", "kv_tradeoff.png", "moe_load.png",
                "attention.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_a_diverging_model_is_reported_and_the_run_goes_on(corpus, tmp_path, monkeypatch):
    forward = GPT.forward

    def nan_loss(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        return logits, None if loss is None else loss * float("nan")

    monkeypatch.setattr(GPT, "forward", nan_loss)
    out = tmp_path / "cmp"
    summary = compare(out, {**TINY, "models": ("mha", "ngram"), "budget": "3ktok", "corpus": corpus})
    assert summary["results"]["mha"]["status"] == "diverged"
    assert summary["results"]["ngram"]["status"] == "ok"
    md = (out / "report.md").read_text()
    assert "**diverged**: non-finite train loss (nan) at step" in _row(md, "GPT · MHA")["status"]
    assert (out / "report.html").is_file()


def test_ctrl_c_stops_cleanly_and_still_writes_the_report(corpus, tmp_path):
    def interrupt(event):
        if event["event"] == "step" and event["model"] == "mlp":
            raise KeyboardInterrupt

    out = tmp_path / "cmp"
    summary = compare(out, {**TINY, "models": ("ngram", "mlp", "mha"), "budget": "3ktok", "corpus": corpus},
                      progress=interrupt)
    assert summary["interrupted"]
    assert [r["status"] for r in summary["results"].values()] == ["ok", "interrupted"]
    md = (out / "report.md").read_text()
    assert "**Interrupted**" in md and "Not run: mha." in md and _row(md, "n-gram")["status"] == "ok"


def test_moe_members_activate_as_many_ffn_parameters_as_the_dense_ffn():
    cfg = CompareConfig(**TINY)
    dense, moe = (GPT(GPTConfig(**gpt_config(cfg, name, 50))) for name in ("mha", "mha-moe"))
    ffn_dense = sum(p.numel() for p in dense.blocks[0].ffn.parameters())  # 3 · 16 · 24
    total, active = count_params(moe)
    gate = moe.blocks[0].ffn.gate.weight.numel()
    assert active - gate == count_params(dense)[0]  # the same active parameters, router aside
    assert total - active == (4 - 2) * ffn_dense // 3  # two idle routed experts of ffn_hidden // 3 each


def test_budget_strings():
    assert parse_budget("40s") == ("time", 40.0)
    assert parse_budget("2m") == ("time", 120.0)
    assert parse_budget("500ktok") == ("tokens", 500_000.0)
    assert parse_budget("2Mtok") == ("tokens", 2_000_000.0)
    for bad in ("40", "2 minutes", "0s", "-3m", "5kb"):
        with pytest.raises(ConfigError, match="budget="):
            parse_budget(bad)


def test_errors(corpus, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown: gpt5"):
        CompareConfig(models=("mha", "gpt5"))
    with pytest.raises(ConfigError, match="too small to run one eval"):
        compare(tmp_path / "a", {**TINY, "models": ("mlp",), "budget": "100tok", "corpus": corpus})
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["compare", "--out", str(tmp_path / "taken"), "--corpus", corpus, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert main(["compare", "--models", "mha,bogus", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "unknown: bogus" in capsys.readouterr().err
    assert main(["compare", "--budget", "soon", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "budget='soon'" in capsys.readouterr().err


def test_the_same_seed_gives_the_same_losses(corpus, tmp_path):
    """A token budget makes the table independent of the machine's speed: two runs, same numbers (with the
    kernel fixed: under load the measured choice of fused vs explicit can flip, and with it the last bits)."""
    config = {**TINY, "models": ("mlp", "gqa", "mla-moe"), "budget": "4ktok", "corpus": corpus, "dtype": "float32",
              "attention_kernel": "fused"}
    first = compare(tmp_path / "a", config)["results"]
    second = compare(tmp_path / "b", config)["results"]
    for name in config["models"]:
        assert first[name]["val_loss"] == second[name]["val_loss"], name
        curves = [[json.loads(row)["train_loss"] for row in (tmp_path / run / name / "metrics.jsonl").read_text().splitlines()]
                  for run in ("a", "b")]
        assert curves[0] == curves[1] and len(curves[0]) > 1


def test_the_ngrams_loss_by_position_is_its_uncut_loss_once_it_has_seen_n_minus_1_tokens():
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 5, 3000) // np.maximum(1, rng.integers(0, 3, 3000))  # skewed, so contexts matter
    model = NGramLM(5, n=4).fit(stream[:2500])
    starts = np.arange(2500, 2960, 23)
    windows = torch.from_numpy(np.stack([stream[s:s + 33] for s in starts]))  # (W, T + 1) with T = 32
    cut = position_nll(model, windows) / len(windows)  # (T,): each window read on its own
    uncut = -np.log(model.token_probs(stream))  # every token with its full n - 1 tokens of history
    full = np.mean([uncut[s + 1:s + 33] for s in starts], axis=0)  # the same targets, scored in the stream
    np.testing.assert_allclose(cut[4 - 2:], full[4 - 2:], rtol=1e-12)  # from position n - 2 on: n - 1 tokens seen
    assert not np.allclose(cut[:4 - 2], full[:4 - 2], rtol=1e-3)  # before it, the cut history changes the scores


def test_a_models_mean_loss_over_positions_is_its_val_loss():
    torch.manual_seed(0)
    model = RNNLM(RNNConfig(vocab_size=7, cell="lstm", n_layer=1, d_model=8, block_size=16))
    tokenizer = CharTokenizer.from_text("abcdefg")
    windows = torch.randint(0, 7, (40, 17))
    result = score(model, windows, tokenizer)
    assert len(result["loss_by_position"]) == 16
    assert np.mean(result["loss_by_position"]) == pytest.approx(result["val_loss"], rel=1e-12)
    with torch.no_grad():
        _, loss = model(windows[:, :-1], windows[:, 1:])
    assert result["val_loss"] == pytest.approx(float(loss), rel=1e-5)


def test_in_context_positions_and_table():
    assert in_context_positions(512) == (50, 500) and in_context_positions(128) == (12, 125)
    losses = [3.0] * 10 + [2.0] * 5 + [1.5] * 108 + [1.0] * 5  # 128 positions: bands 10–14 and 123–127
    headers, rows = position_rows({"lstm": {"label": "LSTM", "loss_by_position": losses}, "x": {"label": "no curve"}})
    assert headers[-1] == "in-context score (123–127 − 10–14)"
    assert rows == [["LSTM", "3.0000", "2.0000", "1.0000", "-1.0000"]]
    _, rows = position_rows({"lstm": {"label": "LSTM", "loss_by_position": [2.0, 1.0, 0.5] * 10}})  # 30: no bands
    assert rows == [["LSTM", "2.0000", "2.0000", "0.5000", "-1.5000"]]  # positions 3 and 29


def test_an_rnn_in_the_family_shows_its_state_in_the_cache_columns(corpus, tmp_path):
    assert "lstm" in DEFAULT_MODELS and CompareConfig().models == DEFAULT_MODELS
    out = tmp_path / "cmp"
    summary = compare(out, {**TINY, "models": ("gru", "mha"), "budget": "3ktok", "corpus": corpus})
    gru = summary["results"]["gru"]
    assert gru["status"] == "ok" and gru["state_bytes"] == 2 * 16 * 4  # rnn_layers · d_model · fp32, batch 1
    assert "kv_bytes_per_token" not in gru
    md = (out / "report.md").read_text()
    row = _row(md, "GRU")
    assert row["KV cache B/token"] == row["KV cache @ context"] == "128 B state"
    assert _row(md, "GPT · MHA")["KV cache B/token"] == "128 B"  # K and V: 2 · 16 dims · fp32, 1 layer
    assert md.count("| GRU |") == 2  # the results table and the loss-by-position table
