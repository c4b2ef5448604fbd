import json

import pytest

from attnlab.cli import main
from attnlab.errors import ConfigError
from attnlab.kvtable import BUILTIN_CONFIGS, kv_table, load_dims, small_model_caches

# Facts from the published configs: (layers, n_h, n_kv, d_h) or, for MLA, (layers, n_h, d_c, d_h^R).
FACTS = {
    "gpt2-124m": (12, 12, 12, 64),
    "llama-3-8b": (32, 32, 8, 128),
    "smollm2-135m": (30, 9, 3, 64),
}
MLA_FACTS = {"deepseek-v2": (60, 128, 512, 64), "deepseek-v3": (61, 128, 512, 64)}


def _by(rows, model, attention):
    (row,) = [r for r in rows if r.model == model and r.attention == attention]
    return row


@pytest.mark.parametrize("dtype, size", [("bf16", 2), ("fp16", 2), ("fp32", 4)])
def test_rows_equal_deepseek_v2_table_1_formulas(dtype, size):
    rows = kv_table(context=1000, dtype=dtype)
    for model, (layers, n_h, n_kv, d_h) in FACTS.items():
        assert _by(rows, model, "MHA").elements_per_token_layer == 2 * n_h * d_h
        assert _by(rows, model, "MQA").elements_per_token_layer == 2 * d_h
        assert _by(rows, model, "MLA").elements_per_token_layer == 4 * d_h + d_h // 2
        if n_kv != n_h:
            assert _by(rows, model, "GQA").elements_per_token_layer == 2 * n_kv * d_h
    for model, (layers, n_h, d_c, d_r) in MLA_FACTS.items():
        assert _by(rows, model, "MLA").elements_per_token_layer == d_c + d_r == 576
        assert _by(rows, model, "MHA").elements_per_token_layer == 2 * n_h * 128 == 32768
        assert _by(rows, model, "MLA naive").elements_per_token_layer == n_h * (128 + 64 + 128)
    layers = {**{m: f[0] for m, f in FACTS.items()}, **{m: f[0] for m, f in MLA_FACTS.items()}}
    for r in rows:
        assert r.n_layers == layers[r.model]
        assert r.bytes_per_token_layer == r.elements_per_token_layer * size
        assert r.bytes_per_token == r.bytes_per_token_layer * r.n_layers
        assert r.bytes_at_context == r.bytes_per_token * 1000
        assert r.measured_bytes_per_token_layer == r.bytes_per_token_layer  # attnlab's caches hold exactly that


def test_own_attention_is_marked_once_per_model():
    rows = kv_table()
    own = {r.model: r.attention for r in rows if r.actual}
    assert own == {"gpt2-124m": "MHA", "llama-3-8b": "GQA", "smollm2-135m": "GQA",
                   "deepseek-v2": "MLA", "deepseek-v3": "MLA"}
    assert sum(r.actual for r in rows) == len(BUILTIN_CONFIGS)


def test_llama_3_8b_kv_cache_at_8k_in_bf16_is_one_gib():
    row = _by(kv_table("llama-3-8b", context=8192), "llama-3-8b", "GQA")
    assert row.bytes_at_context == 2 * 8 * 128 * 32 * 2 * 8192 == 2**30


def test_hf_config_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
                             head_dim=64).save_pretrained(tmp_path / "smol")
    transformers.DeepseekV3Config(num_hidden_layers=61).save_pretrained(tmp_path / "dsv3")
    transformers.GPT2Config().save_pretrained(tmp_path / "gpt2")
    for folder, model in (("smol", "smollm2-135m"), ("dsv3", "deepseek-v3"), ("gpt2", "gpt2-124m")):
        (from_file,) = load_dims(config=tmp_path / folder / "config.json")
        (builtin,) = load_dims(model)
        assert {**vars(from_file), "name": model} == vars(builtin)
    rows = kv_table(config=tmp_path / "dsv3" / "config.json")
    assert [r.attention for r in rows] == ["MHA", "GQA", "MQA", "MLA", "MLA naive"]


def test_small_model_caches_hold_what_the_formulas_say():
    rows = small_model_caches(dtype="bf16", n_layers=2, prompt=5, new_tokens=3)
    assert len(rows) == 5
    for r in rows:
        assert r.tokens == 8
        assert r.measured_bytes == r.formula_bytes > 0
    mha, gqa, mqa, latent, naive = (r.measured_bytes for r in rows)
    assert mha == 4 * gqa == 8 * mqa  # 8 heads: GQA with 2 groups, MQA with 1
    assert latent < mqa * 3 < naive


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="model='gpt5'"):
        kv_table("gpt5")
    with pytest.raises(ConfigError, match="context=0"):
        kv_table(context=0)
    with pytest.raises(ConfigError, match="dtype='int8'"):
        kv_table(dtype="int8")
    with pytest.raises(ConfigError, match="is not a file"):
        kv_table(config=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        kv_table(config=bad)
    bad.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match="no num_hidden_layers"):
        kv_table(config=bad)
    bad.write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 4,
                               "hidden_size": 48}))
    with pytest.raises(ConfigError, match="num_attention_heads=6 is not divisible by num_key_value_heads=4"):
        kv_table(config=bad)
    with pytest.raises(ConfigError, match="either model or config"):
        kv_table("gpt2-124m", config=bad)


def test_cli_text_table(capsys):
    assert main(["kv-table", "--model", "llama-3-8b", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "llama-3-8b" in out and "16,384" in out  # GQA: 2·8·128 elements · 4 bytes
    assert "MLA absorbed" in out and "NO" not in out  # the small model's caches all equal the formulas


def test_cli_md_and_errors(capsys, tmp_path):
    assert main(["kv-table", "--model", "deepseek-v3", "--format", "md", "--context", "128"]) == 0
    out = capsys.readouterr().out
    assert "| deepseek-v3 | MLA | ★ |" in out and "576" in out and "128 tokens" in out
    assert main(["kv-table", "--context", "-5"]) == 2
    assert "context=-5" in capsys.readouterr().err
    assert main(["kv-table", "--config", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
