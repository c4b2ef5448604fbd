"""attnlab GPTs out to HF folders: transformers' AutoModelForCausalLM gives attnlab's logits, reading
the folder back into attnlab gives them too (round trip), the tokenizer loads as a fast tokenizer with
the same ids, and a model no HF architecture matches is refused before anything is written."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnlab import cli  # noqa: E402
from attnlab.data.tokenizer import CharTokenizer  # noqa: E402
from attnlab.errors import ConfigError  # noqa: E402
from attnlab.hf.checkpoint import from_hf_pretrained  # noqa: E402
from attnlab.hf.export import export_hf  # noqa: E402
from attnlab.models.gpt import GPT, GPTConfig  # noqa: E402

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak!\n"
TOKENIZER = CharTokenizer.from_text(TEXT)
BASE = dict(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layer=2, n_head=4, d_model=32)
LLAMA = dict(positions="rope", norm="rmsnorm", activation="swiglu", ffn_hidden=48)
MLA = dict(LLAMA, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
MOE = dict(ffn="moe", n_routed_experts=8, n_activated_experts=2, expert_hidden=16, n_shared_experts=1,
           n_dense_layers=1, route_scale=1.5)

CASES = {  # name: (GPTConfig fields, the HF architecture expected)
    "llama-gqa-interleaved-llama3": (dict(LLAMA, attention="gqa", n_kv_head=2, rope_interleave=True, tie_embeddings=False,
                                          rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
                                     "LlamaForCausalLM"),
    "llama-mha-bias-not-qkv": (dict(LLAMA, bias=True, qkv_bias=False), "LlamaForCausalLM"),
    "qwen2-mqa": (dict(LLAMA, attention="mqa", qkv_bias=True), "Qwen2ForCausalLM"),
    "gpt2-nanogpt": (dict(activation="gelu", bias=False), "GPT2LMHeadModel"),
    "gpt2-tanh-bias-untied": (dict(activation="gelu_tanh", bias=True, tie_embeddings=False), "GPT2LMHeadModel"),
    "gpt2-lecture-wrapper": (dict(attention="wrapper", bias=True), "GPT2LMHeadModel"),
    "deepseek-v3-mla-dense": (dict(MLA, q_lora_rank=12), "DeepseekV3ForCausalLM"),
    "deepseek-v3-mla-moe": (dict(MLA, **MOE, score_func="sigmoid", bias_update_speed=1e-3, n_expert_groups=2,
                                 n_limited_groups=1), "DeepseekV3ForCausalLM"),
    "deepseek-v2-mla-moe": (dict(MLA, **dict(MOE, n_shared_experts=0), rope_interleave=True), "DeepseekV2ForCausalLM"),
}


def randomise(model: GPT, std=0.2) -> GPT:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point() or name.endswith("mask") or (name.endswith("gate.bias")
                                                                       and model.config.score_func == "softmax"):
                continue
            noise = torch.randn(t.shape, generator=gen) * std
            t.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


def attnlab_folder(tmp_path, fields):
    model = randomise(GPT(GPTConfig(**BASE, **fields)))
    model.save_pretrained(tmp_path / "ours", tokenizer=TOKENIZER)
    return model, tmp_path / "ours"


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # HF's V2 with no shared expert
@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_and_the_round_trip_give_attnlab_logits(case, tmp_path):
    fields, architecture = CASES[case]
    ours, folder = attnlab_folder(tmp_path, fields)
    export_hf(folder, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [architecture]
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(theirs).__name__ == architecture and not theirs.training
    assert not info["missing_keys"] and not info["unexpected_keys"]  # every HF weight written (zero biases too)
    back = from_hf_pretrained(tmp_path / "hf")
    ids = torch.tensor([TOKENIZER.encode(TEXT[:30]), TOKENIZER.encode(TEXT[30:60])])
    expected = logits(ours, ids)
    assert float((logits(theirs, ids) - expected).abs().max()) < 1e-5  # logits of size ~3
    assert float((logits(back, ids) - expected).abs().max()) < 1e-5


def test_tokenizer_is_a_fast_tokenizer_folder(tmp_path):
    _, folder = attnlab_folder(tmp_path, CASES["llama-gqa-interleaved-llama3"][0])
    paths = export_hf(folder, tmp_path / "hf")
    assert sorted(p.name for p in paths) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "hf").iterdir())
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs(TEXT).input_ids == TOKENIZER.encode(TEXT)
    assert theirs.decode(TOKENIZER.encode(TEXT)) == TEXT


@pytest.mark.parametrize("fields, feature", [
    (dict(LLAMA, ffn="moe"), "ffn='moe' with attention='mha'"),
    (dict(positions="rope"), "positions='rope' with norm='layernorm'"),
    (dict(attention="gqa", n_kv_head=2), "attention='gqa'"),
    (dict(MLA, **MOE, score_func="sigmoid", capacity_factor=1.0), "capacity_factor=1.0"),
    (dict(MLA, **MOE, score_func="softmax", rope_interleave=False), "softmax router with rope_interleave=False"),
    (dict(MLA, positions="learned"), "attention='mla' with positions='learned'"),
])
def test_no_matching_architecture_is_refused_by_name(tmp_path, fields, feature):
    _, folder = attnlab_folder(tmp_path, fields)
    with pytest.raises(ConfigError, match="has no equivalent HF architecture") as err:
        export_hf(folder, tmp_path / "hf")
    assert feature in str(err.value)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


def test_cli_export_refuses_an_existing_folder_without_overwrite(tmp_path, capsys):
    _, folder = attnlab_folder(tmp_path, CASES["gpt2-nanogpt"][0])
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["export", str(folder), "--to", "hf", str(out)]) == 2
    assert "is an existing folder: pass overwrite=True (CLI: --overwrite)" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert cli.main(["export", str(folder), "--to", "hf", str(out), "--overwrite"]) == 0
    assert capsys.readouterr().out.startswith(f"GPT2LMHeadModel written to {out}: model.safetensors, config.json")
    assert not (out / "keep.txt").exists() and (out / "tokenizer.json").is_file()
