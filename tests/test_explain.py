"""`attnlab explain`: every step runs, and the numbers it prints are the library's tensors."""

import math
import re

import pytest
import torch
from torch import nn

from attnlab import (
    CausalAttention,
    ConfigError,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttentionV1,
    record_attention,
    simple_self_attention,
)
from attnlab.attention import AdditiveAttention
from attnlab.cli import main
from attnlab.explain import STEPS, Item, build_sections, explain

from lecture_inputs import BATCH, INPUTS
NUMBER = re.compile(r"-inf|-?\d+\.\d{4}")


def printed(text: str, label: str, count: int, fmt: str = "text") -> torch.Tensor:
    """The first ``count`` 4-decimal numbers printed after the tensor called ``label``."""
    pattern = rf"^{re.escape(label)}  shape" if fmt == "text" else rf"^\*\*{re.escape(label)}\*\*, shape"
    found = list(re.finditer(pattern, text, re.M))
    assert len(found) == 1, f"{label!r} printed {len(found)} times"
    values = [float(v) for v in NUMBER.findall(text, found[0].end())[:count]]
    assert len(values) == count
    return torch.tensor(values)


def close(shown: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.allclose(shown, expected.detach().flatten().to(shown.dtype), atol=6e-5, rtol=0)


@pytest.fixture(scope="module")
def outputs():
    return {(step, fmt): explain(step=step, fmt=fmt) for step in STEPS for fmt in ("text", "md")}


@pytest.mark.parametrize("step", STEPS)
def test_every_step_runs_from_the_cli(step, capsys):
    assert main(["explain", "--step", step]) == 0
    out = capsys.readouterr().out
    assert f"({step})" in out and "shape (" in out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "…" not in out  # no column was squeezed


def test_all_steps_in_order_with_another_seed(capsys):
    assert main(["explain", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    positions = [out.index(f"({step}) ─") for step in STEPS]
    assert positions == sorted(positions)
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 100
    torch.manual_seed(7)
    expected = SelfAttentionV1(3, 2)(INPUTS)
    assert close(printed(out, "SelfAttentionV1 output = weights @ values", 12), expected)


@pytest.mark.parametrize("fmt", ["text", "md"])
def test_simple_and_trainable_numbers_are_the_library_s(outputs, fmt):
    text = outputs[("simple", fmt)]
    context, weights = simple_self_attention(INPUTS)
    journey = printed(text, "context for journey = weights @ inputs", 3, fmt)
    assert close(journey, context[1]) and close(journey, torch.tensor([0.4419, 0.6515, 0.5683]))
    assert close(printed(text, "weights = softmax(scores, dim=-1)", 36, fmt), weights)

    text = outputs[("trainable", fmt)]
    torch.manual_seed(123)
    sa = SelfAttentionV1(3, 2)
    out = printed(text, "SelfAttentionV1 output = weights @ values", 12, fmt)
    assert close(out, sa(INPUTS)) and close(out[:2], torch.tensor([0.2996, 0.8053]))


@pytest.mark.parametrize("fmt", ["text", "md"])
def test_causal_and_dropout_numbers_are_the_library_s(outputs, fmt):
    torch.manual_seed(123)
    ca = CausalAttention(3, 2, 6, 0.0)
    with record_attention(ca) as rec:
        context = ca(BATCH)
    text = outputs[("causal", fmt)]
    weights = printed(text, "causal weights = softmax(masked / sqrt(d_k)) (recorded)", 36, fmt)
    assert close(weights, rec.weights[0][0, 0])
    out = printed(text, "CausalAttention output", 12, fmt)
    assert close(out, context[0]) and close(out[:2], torch.tensor([-0.4519, 0.2216]))

    text = outputs[("dropout", fmt)]
    torch.manual_seed(123)
    dropped = nn.Dropout(0.5)(torch.ones(6, 6))
    assert close(printed(text, "nn.Dropout(0.5)(torch.ones(6, 6))", 36, fmt), dropped)
    torch.manual_seed(123)
    ca = CausalAttention(3, 2, 6, 0.5)
    torch.manual_seed(123)
    train_out = ca(BATCH)
    assert close(printed(text, "CausalAttention output, train mode", 12, fmt), train_out[0])
    assert close(printed(text, "CausalAttention output, eval mode", 12, fmt), context[0])


@pytest.mark.parametrize("fmt", ["text", "md"])
def test_multi_head_numbers_are_the_library_s(outputs, fmt):
    torch.manual_seed(123)
    mhw = MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=2)
    text = outputs[("wrapper", fmt)]
    assert close(printed(text, "output = cat(heads, dim=-1)", 24, fmt), mhw(BATCH)[0])

    text = outputs[("multihead", fmt)]
    torch.manual_seed(123)
    mha = MultiHeadAttention(3, 2, 6, 0.0, num_heads=2)
    out = printed(text, "MultiHeadAttention output = out_proj(merged) [6-token example]", 12, fmt)
    assert close(out, mha(BATCH)[0]) and close(out[:2], torch.tensor([0.3190, 0.4858]))

    torch.manual_seed(123)
    mha = MultiHeadAttention(8, 4, 11, 0.0, num_heads=2)
    x = torch.rand(1, 11, 8)
    with record_attention(mha) as rec:
        out = mha(x)
    assert close(printed(text, "MultiHeadAttention output = out_proj(merged) [11-token example]", 44, fmt), out[0])
    assert close(printed(text, "per-head causal weights (recorded) [11-token example]", 242, fmt), rec.weights[0][0])
    split = printed(text, "W_query.weight split into heads [11-token example]", 32, fmt)
    assert close(split[:16], mha.W_query.weight[:2]) and close(split[16:], mha.W_query.weight[2:])


def test_every_printed_tensor_matches_its_item(outputs):
    """The renderers print each item's values in order, for every tensor of every step."""
    sections = build_sections()
    for section in sections:
        for fmt in ("text", "md"):
            text = outputs[(section.step, fmt)]
            for item in (b for b in section.blocks if isinstance(b, Item)):
                if item.integer:
                    continue
                shown = item.shown.to(torch.float64).flatten()
                got = printed(text, item.label, shown.numel(), fmt).double()
                finite = torch.isfinite(shown)
                assert torch.equal(torch.isfinite(got), finite), item.label
                assert torch.allclose(got[finite], shown[finite], atol=5.1e-5, rtol=0), item.label


def test_shown_scores_are_the_ones_the_kernel_softmaxes():
    """Scores are printed from Q and K; scaled and softmaxed they give the recorded weights."""
    (trainable,) = build_sections("trainable")
    items = trainable.items
    scores = items["scores = queries @ keys.T"].tensor
    weights = items["weights = softmax(scores / sqrt(d_k)) (recorded)"].shown
    assert torch.allclose(torch.softmax(scores / math.sqrt(2), dim=-1), weights, atol=1e-6)
    (multihead,) = build_sections("multihead")
    items = multihead.items
    scores = items["per-head scores = queries @ keys.T [11-token example]"].tensor
    mask = torch.ones(11, 11, dtype=torch.bool).tril()
    expected = torch.softmax(scores.masked_fill(~mask, float("-inf")) / math.sqrt(2), dim=-1)
    assert torch.allclose(expected, items["per-head causal weights (recorded) [11-token example]"].tensor, atol=1e-6)


def test_projections_tell_dog_from_ball():
    (trainable,) = build_sections("trainable")
    table = trainable.items["query it (position 6) against every key"].tensor  # (10 keys, 4)
    dog, ball = 1, 4
    assert table[dog, 0] == table[ball, 0] and table[dog, 1] == table[ball, 1]
    assert table[dog, 3] > 2 * table[ball, 3]


def test_markdown_to_a_file_and_refusing_to_overwrite(tmp_path, capsys):
    out = tmp_path / "notes.md"
    assert main(["explain", "--step", "simple", "--format", "md", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    body = out.read_text()
    assert body.startswith("# attnlab explain (seed 123)") and "| journey |" in body

    out.write_text("my notes")
    assert main(["explain", "--step", "simple", "--format", "md", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "my notes"
    assert main(["explain", "--step", "simple", "--out", str(out), "--overwrite"]) == 0
    assert "context for journey" in out.read_text()


def test_bad_arguments():
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--step", "attention"])
    assert exc.value.code == 2
    with pytest.raises(ConfigError, match="step='attention'"):
        explain(step="attention")
    with pytest.raises(ConfigError, match="fmt='html'"):
        explain(fmt="html")


def test_leaves_the_callers_random_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_sections("dropout", seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("fmt", ["text", "md"])
def test_additive_numbers_are_bahdanaus_score_by_hand(outputs, fmt):
    text = outputs[("additive", fmt)]
    torch.manual_seed(123)
    attn = AdditiveAttention(3, 3, attn_dim=2)
    W, U, v = attn.W_a.weight, attn.U_a.weight, attn.v_a.weight[0]
    journey = INPUTS[1]
    additive = torch.stack([v @ torch.tanh(W @ journey + U @ key) for key in INPUTS])  # e_j = v_aᵀ tanh(W_a s + U_a h_j)
    dot = INPUTS @ journey
    scores = printed(text, "scores for journey, three ways", 18, fmt)
    assert close(scores, torch.stack((dot, dot / math.sqrt(3), additive)))
    weights = printed(text, "additive weights (recorded)", 6, fmt)
    assert close(weights, torch.softmax(additive, dim=0)) and abs(float(weights.sum()) - 1) < 1e-3
    assert close(printed(text, "context for journey = weights @ inputs", 3, fmt), torch.softmax(additive, 0) @ INPUTS)
    simple = outputs[("simple", fmt)]  # the dot-product row repeats the first step's weights for journey
    first_row = printed(text, "softmax(scores), three ways", 6, fmt)
    assert close(first_row, printed(simple, "weights for journey = softmax(scores)", 6, fmt))
