"""Every parameter of a GPT gets its init by one rule, checked per tensor: matrices N(0, 0.02) —
embeddings, projections, routed and shared experts, the router — residual-stream outputs
N(0, 0.02/√(2·n_layer)), biases 0, norm gains 1. The rule is written here independently of the
model, and every named parameter must match it, so a new parameter cannot slip through."""

import math
import re

import pytest
import torch

from attnlab.models.gpt import GPT, GPTConfig

RESIDUAL_OUTPUTS = re.compile(r"\.(attn\.(proj|o_proj|wo)|ffn\.(proj|w2|shared_experts\.w2|experts\.w2))(\.weight)?$")
CONFIGS = {
    "nanogpt": dict(attention="mha", positions="learned", norm="layernorm", activation="gelu", bias=True),
    "llama-gqa": dict(attention="gqa", n_kv_head=2, positions="rope", norm="rmsnorm", activation="swiglu",
                      tie_embeddings=False),
    "wrapper": dict(attention="wrapper", positions="learned", bias=True),
    "mla-moe": dict(attention="mla", q_lora_rank=32, positions="rope", norm="rmsnorm", ffn="moe", n_routed_experts=8,
                    n_activated_experts=2, n_shared_experts=1, expert_hidden=64, score_func="sigmoid"),
    "mha-moe-dense-first": dict(attention="mha", ffn="moe", n_routed_experts=4, n_activated_experts=2, n_dense_layers=1,
                                activation="swiglu"),
}


def expected_std(name: str, n_layer: int) -> float:
    return 0.02 / math.sqrt(2 * n_layer) if RESIDUAL_OUTPUTS.search(name) else 0.02


@pytest.mark.parametrize("variant", CONFIGS)
def test_every_parameter_follows_the_init_rule(variant):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=96, block_size=32, n_layer=3, n_head=4, d_model=64, kv_lora_rank=32,
                    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, **CONFIGS[variant])
    model = GPT(cfg)
    checked = 0
    for name, p in model.named_parameters():
        p = p.detach().float()
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif p.dim() == 1:
            assert torch.all(p == 1), name  # LayerNorm / RMSNorm gains
        else:
            std = expected_std(name, cfg.n_layer)
            n = p.numel()
            assert n >= 256, f"{name} is too small to check its statistics ({n} values)"
            assert abs(p.mean().item()) < 5 * std / math.sqrt(n), (name, p.mean().item())
            assert p.std().item() == pytest.approx(std, rel=0.15), (name, p.std().item(), std)
        checked += 1
    assert checked == len(list(model.parameters()))
    if cfg.ffn == "moe":  # the MoE parts are among the checked: experts, router, shared expert
        names = [n for n, _ in model.named_parameters()]
        assert any(n.endswith("ffn.experts.w2") for n in names) and any(n.endswith("ffn.gate.weight") for n in names)
