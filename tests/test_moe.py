"""MoE: fast ≡ reference dispatch, one expert ≡ dense SwiGLU, loss-free bias steers selection only,
both balancing methods fix a skewed router, capacity dropping, and clear errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import device as devices
from attnlab import expert_dispatch
from attnlab.bench.moe import CASES, DENSE, FAST, REFERENCE, moe_report, run_moe
from attnlab.bench.results import write_report
from attnlab.device import machine_facts
from attnlab.errors import ConfigError
from attnlab.ffn import MoE, SwiGLU

D = 16


def _fwd_bwd(moe, x, grad):
    x = x.detach().clone().requires_grad_()
    moe.zero_grad()
    y = moe(x)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}, moe.last_stats


CONFIGS = {
    "plain": dict(),
    "shared": dict(n_shared_experts=2),
    "groups-softmax": dict(n_expert_groups=4, n_limited_groups=2, n_shared_experts=1),
    "groups-sigmoid-bias": dict(n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", route_scale=2.5,
                                bias_update_speed=0.001),
    "capacity": dict(capacity_factor=0.6),
    "capacity-shared-groups": dict(capacity_factor=0.8, n_shared_experts=1, n_expert_groups=2, n_limited_groups=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_dispatch_equals_reference(name):
    moe = MoE(D, 8, 2, 12, **CONFIGS[name])
    if moe.bias_update_speed:
        moe.gate.bias.copy_(torch.randn(8) * 0.1)  # a trained-looking bias, so selection differs from scores
    x = torch.randn(3, 21, D)
    grad = torch.randn(3, 21, D)
    fast = _fwd_bwd(moe, x, grad)
    moe.dispatch = "reference"
    ref = _fwd_bwd(moe, x, grad)
    torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast[1], ref[1], atol=1e-5, rtol=0)
    assert fast[2].keys() == ref[2].keys()
    for param in fast[2]:
        torch.testing.assert_close(fast[2][param], ref[2][param], atol=1e-5, rtol=0, msg=param)
    assert fast[3] == ref[3]
    if moe.capacity_factor is not None:
        assert fast[3]["dropped_tokens"] > 0


def test_capacity_drops_the_latest_tokens_of_overloaded_experts():
    moe = MoE(D, 4, 1, 8, capacity_factor=1.0)
    x = torch.randn(40, D)
    with torch.no_grad():
        y = moe(x)
        weights, indices, _ = moe.gate(x)
    capacity = math.ceil(40 * 1 / 4)
    expected_dropped = 0
    for e in range(4):
        tokens = torch.where(indices[:, 0] == e)[0]
        expected_dropped += max(len(tokens) - capacity, 0)
        kept, dropped = tokens[:capacity], tokens[capacity:]
        assert torch.all(y[dropped] == 0)  # a dropped token's only expert contributes nothing
        expert = _expert_as_swiglu(moe, e)
        with torch.no_grad():
            torch.testing.assert_close(y[kept], expert(x[kept]) * weights[kept], atol=1e-6, rtol=0)
    assert expected_dropped > 0
    assert moe.last_stats["dropped_tokens"] == expected_dropped


def _expert_as_swiglu(moe, e):
    dense = SwiGLU(moe.d_model, moe.expert_hidden)
    with torch.no_grad():
        dense.w1.weight.copy_(moe.experts.w1[e])
        dense.w2.weight.copy_(moe.experts.w2[e])
        dense.w3.weight.copy_(moe.experts.w3[e])
    return dense


@pytest.mark.parametrize("dispatch", ["fast", "reference"])
def test_one_expert_top1_equals_dense_swiglu(dispatch):
    moe = MoE(D, 1, 1, 24, dispatch=dispatch)
    dense = _expert_as_swiglu(moe, 0)
    x = torch.randn(2, 9, D)
    grad = torch.randn(2, 9, D)
    y_moe, gx_moe, grads, _ = _fwd_bwd(moe, x, grad)
    xd = x.clone().requires_grad_()
    y_dense = dense(xd)
    y_dense.backward(grad)
    torch.testing.assert_close(y_moe, y_dense.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(gx_moe, xd.grad, atol=1e-6, rtol=0)
    for w in ("w1", "w2", "w3"):
        torch.testing.assert_close(grads[f"experts.{w}"][0], getattr(dense, w).weight.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_bias_changes_selection_never_weights(score_func):
    moe = MoE(D, 8, 2, 12, score_func=score_func, bias_update_speed=0.001, route_scale=1.5)
    x = torch.randn(50, D)
    with torch.no_grad():
        y_unbiased = moe(x)
        w0, i0, s0 = moe.gate(x)
        moe.gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0]))
        w1, i1, s1 = moe.gate(x)
        y_biased = moe(x)
    assert torch.equal(s0, s1)  # scores never see the bias
    assert torch.equal(i1.sort(dim=-1).values, torch.tensor([[6, 7]]).expand(50, 2))  # selection follows it
    assert not torch.equal(i0.sort(dim=-1).values, i1.sort(dim=-1).values)
    chosen = s0.gather(1, i1)
    expected = chosen / chosen.sum(-1, keepdim=True) if score_func == "sigmoid" else chosen
    torch.testing.assert_close(w1, expected * 1.5, atol=0, rtol=0)  # weights: unbiased scores of the chosen
    manual = sum((w1 * (i1 == e)).sum(-1, keepdim=True) * _expert_as_swiglu(moe, e)(x) for e in (6, 7))
    torch.testing.assert_close(y_biased, manual.detach(), atol=1e-6, rtol=0)
    with torch.no_grad():
        moe.gate.bias.fill_(3.0)  # the same shift for every expert changes nothing
        torch.testing.assert_close(moe(x), y_unbiased, atol=0, rtol=0)
    assert "gate.bias" not in dict(moe.named_parameters())  # no gradient ever reaches it


def _skewed_router_imbalance(steps, **balancing):
    """Train only the router with the balancing method on inputs the router sends to 2 of 8 experts."""
    torch.manual_seed(0)
    moe = MoE(D, 8, 2, 8, **balancing)
    direction = F.normalize(torch.randn(D), dim=0)
    with torch.no_grad():
        moe.gate.weight[:2] += 2.0 * direction  # experts 0 and 1 love this direction
    x = torch.randn(256, D) + 2.0 * direction
    optimizer = torch.optim.Adam([moe.gate.weight], lr=0.05)
    first = None
    for _ in range(steps):
        moe(x)
        first = first or moe.last_stats["load_imbalance"]
        if moe.aux_loss.requires_grad:
            optimizer.zero_grad()
            moe.aux_loss.backward()
            optimizer.step()
        moe.update_bias()
    moe.eval()
    with torch.no_grad():
        moe(x)
    return first, moe.last_stats["load_imbalance"]


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("balancing", ["none", "aux_loss", "bias"])
def test_balancing_fixes_a_skewed_router(one_thread, balancing, score_func):
    kwargs = {"none": {}, "aux_loss": {"aux_loss_coef": 0.01}, "bias": {"bias_update_speed": 0.001}}[balancing]
    first, last = _skewed_router_imbalance(300, score_func=score_func, **kwargs)
    assert first > 3
    if balancing == "none":
        assert last > 3
    else:
        assert last < 1.5


def test_aux_loss_is_coef_for_a_uniform_router_and_trains_only_the_router():
    moe = MoE(D, 8, 2, 12, aux_loss_coef=0.03)
    with torch.no_grad():
        moe.gate.weight.zero_()  # every expert scores 1/8 for every token
    moe(torch.randn(64, D))
    torch.testing.assert_close(moe.aux_loss, torch.tensor(0.03), atol=1e-7, rtol=0)
    moe.aux_loss.backward()
    assert moe.gate.weight.grad is not None
    assert all(p.grad is None for n, p in moe.named_parameters() if not n.startswith("gate."))
    off = MoE(D, 8, 2, 12)
    off(torch.randn(5, D))
    assert off.aux_loss.item() == 0.0 and not off.aux_loss.requires_grad


def test_update_bias_moves_toward_equal_load_and_ignores_eval():
    moe = MoE(D, 4, 1, 8, bias_update_speed=0.01)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0] += 1.0
    x = torch.randn(32, D).abs()  # expert 0 wins every token
    moe.eval()
    moe(x)
    moe.update_bias()
    assert torch.equal(moe.gate.bias, torch.zeros(4))
    moe.train()
    moe(x)
    moe.update_bias()
    torch.testing.assert_close(moe.gate.bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))


def test_stats_and_shapes():
    moe = MoE(D, 8, 3, 12, n_shared_experts=1)
    x = torch.randn(4, 10, D)
    y = moe(x)
    stats = moe.last_stats
    assert y.shape == x.shape
    assert sum(stats["tokens_per_expert"]) == 4 * 10 * 3
    counts = torch.tensor(stats["tokens_per_expert"], dtype=torch.float)
    assert stats["load_imbalance"] == pytest.approx((counts.max() / counts.mean()).item())
    assert 0 < stats["router_entropy"] <= math.log(8) + 1e-6
    assert stats["dropped_tokens"] == 0
    torch.testing.assert_close(moe(x.view(40, D)), y.view(40, D), atol=1e-6, rtol=0)


def test_bf16_fast_matches_reference_and_autocast_runs():
    moe = MoE(D, 8, 2, 16, n_shared_experts=1)
    x = torch.randn(2, 16, D)
    reference = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_bf16 = moe(x)
        moe.dispatch = "reference"
        ref_bf16 = moe(x)
    assert fast_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(fast_bf16.float(), ref_bf16.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fast_bf16.float(), reference, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(n_routed_experts=4, n_activated_experts=5), ["n_activated_experts=5", "n_routed_experts=4"]),
        (dict(n_expert_groups=3), ["n_routed_experts=8", "n_expert_groups=3"]),
        (dict(n_expert_groups=2, n_limited_groups=3), ["n_limited_groups=3", "n_expert_groups=2"]),
        (dict(n_expert_groups=8, n_limited_groups=1), ["n_activated_experts=2", "n_limited_groups=1"]),
        (dict(score_func="relu"), ["score_func='relu'", "'softmax'", "'sigmoid'"]),
        (dict(dispatch="magic"), ["dispatch='magic'", "'fast'", "'reference'"]),
        (dict(capacity_factor=0.0), ["capacity_factor=0.0"]),
        (dict(aux_loss_coef=-1), ["aux_loss_coef=-1"]),
        (dict(n_shared_experts=-1), ["n_shared_experts=-1"]),
    ],
)
def test_clear_errors(kwargs, words):
    args = dict(d_model=D, n_routed_experts=8, n_activated_experts=2, expert_hidden=12)
    args.update(kwargs)
    with pytest.raises(ConfigError) as err:
        MoE(**args)
    for word in words:
        assert word in str(err.value)


def test_input_errors():
    moe = MoE(D, 4, 1, 8)
    with pytest.raises(ConfigError, match="expected d_in=16"):
        moe(torch.randn(3, D + 1))
    with pytest.raises(TypeError, match="rank 1"):
        moe(torch.randn(D))
    with pytest.raises(ConfigError, match="dispatch='loop'"):
        moe.dispatch = "loop"


def test_benchmark_writes_its_report_at_tiny_size(tmp_path):
    cases = (CASES[0].scaled(d_model=16, shape=(2, 8)), CASES[2].scaled(d_model=16, shape=(24,)))
    rows = run_moe(cases=cases, peak_gflops=10.0, repeats=1, warmup=0)
    assert {r["variant"] for r in rows} == {FAST, REFERENCE, DENSE}
    assert all(r["max_diff"] < 1e-5 for r in rows)
    for r in rows:  # the floor: 3 × forward FLOPs (router + routed top-k + shared experts) at 10 GFLOP/s
        d, h, active = r["d_model"], r["expert_hidden"], r["n_activated_experts"] + r["n_shared_experts"]
        per_token = 2 * d * r["n_routed_experts"] + active * 3 * 2 * d * h if r["variant"] != DENSE else \
            3 * 2 * d * active * h
        assert r["floor_ms"] == pytest.approx(3 * r["tokens"] * per_token / 10e9 * 1e3)
    paths = write_report(moe_report(rows), tmp_path, command="bench_moe.py --tiny", machine=machine_facts())
    text = paths[0].read_text()
    assert "`bench_moe.py --tiny`" in text and "target ≤ 1.5×" in text and "target ≤ 1×" in text
    assert "FLOP floor ms" in text and "10 GFLOP/s" in text
    assert "matmuls alone ms" in text and "the fast dispatch's own matmul calls take" in text
    for r in rows:  # the matmuls alone are a part of the layer's work, for the MoE and the dense FFN alike
        assert (r["matmuls_ms"] > 0) if r["variant"] != REFERENCE else math.isnan(r["matmuls_ms"])


@settings(max_examples=15, deadline=None)
@given(
    n_groups=st.sampled_from([1, 2, 4]),
    top_k=st.integers(1, 4),
    shared=st.integers(0, 2),
    score_func=st.sampled_from(["softmax", "sigmoid"]),
    capacity_factor=st.sampled_from([None, 0.5, 1.25]),
    tokens=st.integers(1, 30),
)
def test_fast_equals_reference_for_any_config(n_groups, top_k, shared, score_func, capacity_factor, tokens):
    limited = max(1, n_groups // 2)
    top_k = min(top_k, limited * (8 // n_groups))
    moe = MoE(8, 8, top_k, 6, n_shared_experts=shared, score_func=score_func, n_expert_groups=n_groups,
              n_limited_groups=limited, capacity_factor=capacity_factor)
    x = torch.randn(tokens, 8)
    grad = torch.randn(tokens, 8)
    fast = _fwd_bwd(moe, x, grad)
    moe.dispatch = "reference"
    ref = _fwd_bwd(moe, x, grad)
    torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast[1], ref[1], atol=1e-5, rtol=0)
    for param in fast[2]:
        torch.testing.assert_close(fast[2][param], ref[2][param], atol=1e-5, rtol=0, msg=param)
    assert fast[3] == ref[3]


def _assert_dispatches_agree(moe, x):
    grad = torch.randn_like(x)
    fast = _fwd_bwd(moe, x, grad)
    moe.dispatch = "reference"
    ref = _fwd_bwd(moe, x, grad)
    moe.dispatch = "fast"
    torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], ref[1], atol=1e-5, rtol=1e-5)
    assert fast[2].keys() == ref[2].keys()
    for param in fast[2]:  # every expert weight, the router, the shared experts
        torch.testing.assert_close(fast[2][param], ref[2][param], atol=1e-5, rtol=1e-5, msg=param)
    assert fast[3] == ref[3]
    return fast[3]


@settings(max_examples=25, deadline=None)
@given(
    n_experts=st.integers(1, 12),
    top_k=st.integers(1, 4),
    hidden=st.sampled_from([4, 6, 8]),
    capacity_factor=st.sampled_from([None, 0.5, 1.0]),
    tokens=st.integers(1, 40),
    batch_bytes=st.sampled_from([1, 200, 512 * 1024]),  # one expert per batch, a few, all in one
    max_padding=st.sampled_from([0.125, 1.0]),  # the default cap, and padding as much as the budget allows
    shared=st.integers(0, 1),
)
def test_fast_equals_reference_over_experts_topk_capacity_tokens_and_batches(
        n_experts, top_k, hidden, capacity_factor, tokens, batch_bytes, max_padding, shared):
    top_k = min(top_k, n_experts)
    moe = MoE(8, n_experts, top_k, hidden, n_shared_experts=shared, capacity_factor=capacity_factor)
    old = expert_dispatch.BATCH_BYTES, expert_dispatch.MAX_PADDING
    expert_dispatch.BATCH_BYTES, expert_dispatch.MAX_PADDING = batch_bytes, max_padding
    try:
        _assert_dispatches_agree(moe, torch.randn(tokens, 8))
    finally:
        expert_dispatch.BATCH_BYTES, expert_dispatch.MAX_PADDING = old


def test_padded_batches_match_the_reference_in_outputs_and_gradients(monkeypatch):
    monkeypatch.setattr(expert_dispatch, "MAX_PADDING", 1.0)
    monkeypatch.setattr(expert_dispatch, "BATCH_BYTES", 10**6)  # one batch: every expert padded to the largest
    moe = MoE(8, 6, 2, 8, n_shared_experts=1)
    x = torch.randn(50, 8)
    with torch.no_grad():
        _, indices, _ = moe.gate(x)
    sizes = torch.bincount(indices.flatten(), minlength=6).tolist()
    batches = expert_dispatch.expert_batches(sizes, (8 + 16) * 4)
    assert len(batches) == 1
    assert any(len(experts) * rows > sum(sizes[e] for e in experts) for experts, rows in batches)  # some padding
    _assert_dispatches_agree(moe, x)


@pytest.mark.parametrize("hidden", [8, 6])
def test_experts_that_receive_no_token_get_zero_gradients_in_both_dispatches(hidden):
    moe = MoE(8, 12, 1, hidden)
    with torch.no_grad():
        moe.gate.weight.zero_()
        direction = torch.randn(8)
        moe.gate.weight[2], moe.gate.weight[7] = direction, -direction  # one of them scores > 0: only they win
    x = torch.randn(6, 8)
    stats = _assert_dispatches_agree(moe, x)
    idle = [e for e, n in enumerate(stats["tokens_per_expert"]) if n == 0]
    assert len(idle) >= 10
    x.requires_grad_()
    moe.zero_grad()
    moe(x).sum().backward()
    for name in ("w1", "w2", "w3"):
        grad = getattr(moe.experts, name).grad
        assert torch.all(grad[idle] == 0) and grad.abs().sum() > 0


def test_expert_batches_hold_every_expert_with_rows_once_ranked_by_load(monkeypatch):
    monkeypatch.setattr(expert_dispatch, "MAX_PADDING", 1.0)  # only the budget closes a batch here
    sizes = [3, 0, 5, 0, 0, 2, 7, 5]
    for budget in (4 * 11, 4 * 30, 10**9):
        batches = expert_dispatch.expert_batches(sizes, row_bytes=4, budget=budget)
        members = [e for experts, _ in batches for e in experts]
        assert members == [5, 0, 2, 7, 6]  # by rows, ties by id; the empty experts 1, 3, 4 nowhere
        assert all(rows == max(sizes[e] for e in experts) for experts, rows in batches)
        assert all(len(experts) * rows * 4 <= budget for experts, rows in batches if len(experts) > 1)
    assert expert_dispatch.expert_batches(sizes, 4, 10**9) == [([5, 0, 2, 7, 6], 7)]
    assert expert_dispatch.expert_batches(sizes, 4, 4 * 11) == [([5, 0], 3), ([2, 7], 5), ([6], 7)]
    # over budget: one expert per batch, and then in expert order, as nothing is gained by ranking
    assert expert_dispatch.expert_batches(sizes, 4, 1) == [([0], 3), ([2], 5), ([5], 2), ([6], 7), ([7], 5)]


def test_padding_stays_within_its_share_of_every_batch():
    sizes = [3, 0, 5, 0, 0, 2, 7, 5]
    assert expert_dispatch.MAX_PADDING == 0.125
    assert expert_dispatch.expert_batches(sizes, 4, 10**9) == [([5], 2), ([0], 3), ([2, 7], 5), ([6], 7)]
    loads = torch.randint(30, 60, (64,)).tolist()
    for experts, rows in expert_dispatch.expert_batches(loads, 512, 10**9):
        slots = len(experts) * rows
        assert slots - sum(loads[e] for e in experts) <= 0.125 * slots


def test_a_heavy_expert_never_pads_the_light_ones_to_its_size():
    sizes = [1] * 63 + [10_000]  # everything on one expert but a row each
    batches = expert_dispatch.expert_batches(sizes, row_bytes=512, budget=512 * 1024)
    assert batches == [(list(range(63)), 1), ([63], 10_000)]
    slots = expert_dispatch._padded_slots(sizes, batches, "cpu")
    assert slots.numel() == sum(sizes)  # no padding at all here
    assert torch.equal(slots.sort().values, torch.arange(sum(sizes)))


def test_padded_slots_point_at_each_experts_rows_and_padding_at_m():
    sizes = [2, 0, 3, 1]  # assignments 0-1 on expert 0, 2-4 on expert 2, 5 on expert 3
    batches = [([3, 0], 2), ([2], 3)]
    slots = expert_dispatch._padded_slots(sizes, batches, "cpu")
    assert slots.tolist() == [5, 6, 0, 1, 2, 3, 4]  # expert 3's second slot is padding: M = 6


def test_batches_are_sized_by_this_machines_l2_cache_unless_set(monkeypatch):
    sizes = [4] * 16  # 64 rows of 1 KiB
    monkeypatch.setattr(expert_dispatch, "BATCH_BYTES", None)
    monkeypatch.setattr(devices, "l2_cache_bytes", lambda: 16 * 1024)  # 16 rows a batch
    assert [len(experts) * rows for experts, rows in expert_dispatch.expert_batches(sizes, 1024)] == [16] * 4
    monkeypatch.setattr(devices, "l2_cache_bytes", lambda: 64 * 1024)
    assert len(expert_dispatch.expert_batches(sizes, 1024)) == 1
    monkeypatch.setattr(expert_dispatch, "BATCH_BYTES", 8 * 1024)  # a set size wins over the cache's
    assert len(expert_dispatch.expert_batches(sizes, 1024)) == 8


def test_fast_dispatch_skips_dx_when_the_input_needs_no_gradient_and_matches_with_it():
    moe = MoE(16, 8, 2, 8, n_shared_experts=1)
    x = torch.randn(2, 12, 16)
    y = moe(x)
    y.sum().backward()  # x needs no gradient: the backward computes only the weights'
    assert moe.experts.w1.grad is not None and x.grad is None
    _assert_dispatches_agree(moe, x)
