"""GPT by config: every attention/FFN/position/norm choice trains, saves and loads, stays causal."""

import json

import pytest
import torch

from attnlab import record_attention
from attnlab.errors import ConfigError, InputTypeError
from attnlab.models import load_pretrained
from attnlab.models.gpt import GPT, GPTConfig

TINY = dict(vocab_size=20, block_size=24, n_layer=2, n_head=4, d_model=32, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)

VARIANTS = {
    "nanogpt": dict(attention="mha", positions="learned", norm="layernorm", activation="gelu", bias=True),
    "wrapper": dict(attention="wrapper", positions="learned"),
    "gqa-llama": dict(attention="gqa", n_kv_head=2, positions="rope", norm="rmsnorm", activation="swiglu"),
    "mqa": dict(attention="mqa", positions="rope", tie_embeddings=False),
    "mla-moe": dict(attention="mla", positions="rope", ffn="moe", n_routed_experts=4, n_activated_experts=2,
                    n_shared_experts=1, norm="rmsnorm"),
    "mla-absorbed-lora": dict(attention="mla", q_lora_rank=16, mla_mode="absorbed", positions="learned"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name, **kw):
    return GPTConfig(**{**TINY, **VARIANTS[name], **kw})


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_overfits_a_tiny_text(name):
    torch.manual_seed(0)
    model = GPT(tiny(name))
    text = torch.randint(0, 20, (2, 17))
    x, y = text[:, :-1], text[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _, first = model(x, y)
    for _ in range(60):
        _, loss = model(x, y)
        (loss + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad()
    _, last = model(x, y)
    assert last.item() < 0.1 * first.item(), (first.item(), last.item())


@pytest.mark.parametrize("name", VARIANTS)
def test_save_load_gives_identical_logits(name, tmp_path):
    model = GPT(tiny(name)).eval()
    idx = torch.randint(0, 20, (2, 11))
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert isinstance(loaded, GPT) and loaded.config == model.config
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert (loaded.lm_head.weight is loaded.wte.weight) == model.config.tie_embeddings
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt"


@pytest.mark.parametrize("name", VARIANTS)
def test_future_tokens_never_change_earlier_logits(name):
    model = GPT(tiny(name)).eval()
    idx = torch.randint(0, 20, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 20
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("name", VARIANTS)
def test_every_attention_layer_can_be_recorded(name):
    model = GPT(tiny(name)).eval()
    with record_attention(model) as rec:
        model(torch.randint(0, 20, (1, 9)))
    assert len(rec) == 2
    for w in rec.weights:
        assert w.shape == (1, 4, 9, 9)
        torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 9))


def test_mha_gqa_mqa_are_one_module_with_different_kv_heads():
    mha, gqa = GPT(tiny("nanogpt", attention="mha")), GPT(tiny("nanogpt", attention="gqa", n_kv_head=4))
    gqa.load_state_dict(mha.state_dict())
    idx = torch.randint(0, 20, (2, 9))
    torch.testing.assert_close(mha.eval()(idx)[0], gqa.eval()(idx)[0])
    assert GPT(tiny("mqa")).blocks[0].attn.k_proj.out_features == 8


def test_moe_aux_loss_and_stats_flow_to_the_model():
    model = GPT(tiny("mla-moe", aux_loss_coef=0.1))
    model(torch.randint(0, 20, (2, 9)))
    assert model.aux_loss().item() > 0 and model.aux_loss().requires_grad
    stats = model.moe_stats()
    assert [sum(layer) for layer in stats["moe_tokens_per_expert"]] == [2 * 9 * 2] * 2
    assert stats["moe_load_imbalance"] >= 1.0
    assert GPT(tiny("nanogpt")).moe_stats() == {} and GPT(tiny("nanogpt")).aux_loss().item() == 0


def test_config_expresses_smollm2_135m():
    cfg = GPTConfig(vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3, d_model=576, head_dim=64,
                    attention="gqa", activation="swiglu", ffn_hidden=1536, positions="rope", rope_theta=1e5,
                    norm="rmsnorm", norm_eps=1e-5, tie_embeddings=True, bias=False)
    with torch.device("meta"):
        model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M


@pytest.mark.parametrize("bad, match", [
    (dict(attention="flash"), "attention='flash'"),
    (dict(attention="mha", n_kv_head=2), "n_kv_head=2"),
    (dict(attention="mqa", n_kv_head=2), "n_kv_head=2"),
    (dict(attention="gqa", n_kv_head=3), "n_head=4 is not divisible by n_kv_head=3"),
    (dict(attention="wrapper", positions="rope"), "positions='rope'"),
    (dict(d_model=30), "d_model=30 is not divisible"),
    (dict(norm="batchnorm"), "norm='batchnorm'"),
    (dict(dropout=1.5), "dropout=1.5"),
    (dict(n_layer=0), "n_layer=0"),
])
def test_bad_configs_name_the_argument(bad, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig(**{**TINY, **bad})


def test_bad_inputs_are_clear_errors():
    model = GPT(tiny("nanogpt"))
    with pytest.raises(InputTypeError, match="integer tensor"):
        model(torch.randn(2, 5))
    with pytest.raises(ConfigError, match="block_size=24"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_loading_another_architecture_is_refused(tmp_path):
    GPT(tiny("nanogpt")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "d_model": 64}))
    with pytest.raises(ConfigError, match="do not match"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "ngram"}))
    with pytest.raises(ConfigError, match="not a 'gpt' model"):
        GPT.from_pretrained(tmp_path)
