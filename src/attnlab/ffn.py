"""The feed-forward layers of a transformer block: nanoGPT's GELU MLP, Llama's SwiGLU, and the
mixture-of-experts layer with DeepSeek-V3's names (DeepSeekMoE routing).

Every token is scored against ``n_routed_experts`` fine-grained SwiGLU experts, goes to the
``n_activated_experts`` best (optionally only within the ``n_limited_groups`` best groups) and
always through the ``n_shared_experts``. Load is balanced by a Switch/GShard auxiliary loss, by
DeepSeek-V3's loss-free per-expert bias, or both; a capacity factor optionally drops overflow.
Two dispatches compute the same thing: ``"reference"`` loops over experts with index selection
(as DeepSeek's reference code), ``"fast"`` sorts assignments by expert and runs padded batched matmuls
(:mod:`attnlab.expert_dispatch`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab import _checks, expert_dispatch
from attnlab.attention.fuse import concat_linears
from attnlab.errors import ConfigError

SCORE_FUNCS = ("softmax", "sigmoid")
DISPATCHES = ("fast", "reference")


class MLP(nn.Module):
    """nanoGPT's dense FFN: Linear -> GELU -> Linear (``approximate="tanh"``: GPT-2's GELU)."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False, approximate: str = "none"):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """Dense gated FFN, w2(silu(w1 x) * w3 x): one expert, the shared experts, or a dense baseline."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False):
        super().__init__()
        _checks.positive_int("d_model", d_model)
        _checks.positive_int("hidden", hidden)
        self.w1 = nn.Linear(d_model, hidden, bias=bias)  # gate
        self.w2 = nn.Linear(hidden, d_model, bias=bias)  # down
        self.w3 = nn.Linear(d_model, hidden, bias=bias)  # up
        self.w13 = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """Replace w1 and w3 by one Linear ``w13`` (gate rows, then up rows): the same numbers in one
        matmul that reads the input once, for decoding at batch 1. Irreversible."""
        if self.w13 is None:
            self.w13 = concat_linears([self.w1, self.w3])
            del self.w1, self.w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Gate(nn.Module):
    """Router: scores each expert per token and picks the top-k, limited to the best groups.

    ``bias`` (one float per expert) is DeepSeek-V3's loss-free balancing term: it is added to the
    scores only to choose experts; the combine weights always come from the unbiased scores.
    """

    def __init__(self, d_model, n_routed_experts, n_activated_experts, score_func, route_scale,
                 n_expert_groups, n_limited_groups, group_by_top2):
        super().__init__()
        self.topk = n_activated_experts
        self.score_func = score_func
        self.route_scale = route_scale
        self.n_groups = n_expert_groups
        self.topk_groups = n_limited_groups
        self.group_by_top2 = group_by_top2
        self.weight = nn.Parameter(torch.empty(n_routed_experts, d_model))
        bound = 1.0 / math.sqrt(d_model)
        nn.init.uniform_(self.weight, -bound, bound)
        self.register_buffer("bias", torch.zeros(n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> combine weights (N, k) float32, expert indices (N, k), scores (N, E) float32."""
        with torch.autocast(x.device.type, enabled=False):  # route in float32 even under autocast
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        choice = scores.detach() + self.bias  # the bias steers selection only
        if self.n_groups > 1:
            grouped = choice.view(x.shape[0], self.n_groups, -1)  # (N, G, E/G)
            if self.group_by_top2:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
            else:
                group_scores = grouped.amax(dim=-1)
            best = group_scores.topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
            masked = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, best, False)
            choice = grouped.masked_fill(masked.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.topk, dim=-1).indices  # (N, k)
        weights = scores.gather(1, indices)  # (N, k)
        if self.score_func == "sigmoid":  # sigmoid scores don't sum to 1: renormalise the chosen
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, indices, scores


class Experts(nn.Module):
    """``n`` SwiGLU experts stored stacked, (n, out, in) per matrix, so a batch of them runs as one batched matmul."""

    def __init__(self, n: int, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, hidden, d_model))  # gate
        self.w2 = nn.Parameter(torch.empty(n, d_model, hidden))  # down
        self.w3 = nn.Parameter(torch.empty(n, hidden, d_model))  # up
        for w in (self.w1, self.w2, self.w3):  # nn.Linear's default range, per expert
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype experts run in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class MoE(nn.Module):
    """DeepSeekMoE feed-forward: shared experts for every token plus top-k of many routed experts.

    forward(x (B, T, d_model) or (N, d_model)) -> same shape. After each forward, ``aux_loss`` is
    the balance loss to add to the training loss and ``last_stats`` describes the routing.
    Capacity dropping keeps, for each expert, its earliest tokens (flattened batch order).
    """

    def __init__(self, d_model: int, n_routed_experts: int, n_activated_experts: int, expert_hidden: int, *,
                 n_shared_experts: int = 0, score_func: str = "softmax", route_scale: float = 1.0,
                 n_expert_groups: int = 1, n_limited_groups: int = 1, aux_loss_coef: float = 0.0,
                 bias_update_speed: float = 0.0, capacity_factor: float | None = None, dispatch: str = "fast"):
        super().__init__()
        self.d_model = _checks.positive_int("d_model", d_model)
        self.n_routed_experts = _checks.positive_int("n_routed_experts", n_routed_experts)
        self.n_activated_experts = _checks.positive_int("n_activated_experts", n_activated_experts)
        self.expert_hidden = _checks.positive_int("expert_hidden", expert_hidden)
        self.n_shared_experts = _checks.non_negative_int("n_shared_experts", n_shared_experts)
        _checks.one_of("score_func", score_func, SCORE_FUNCS)
        _checks.positive_int("n_expert_groups", n_expert_groups)
        _checks.positive_int("n_limited_groups", n_limited_groups)
        if n_activated_experts > n_routed_experts:
            raise ConfigError(
                f"n_activated_experts={n_activated_experts} is not allowed: a token cannot use more "
                f"experts than n_routed_experts={n_routed_experts}"
            )
        _checks.divisible("n_routed_experts", n_routed_experts, "n_expert_groups", n_expert_groups)
        if n_limited_groups > n_expert_groups:
            raise ConfigError(
                f"n_limited_groups={n_limited_groups} is not allowed: expected at most "
                f"n_expert_groups={n_expert_groups}"
            )
        reachable = n_limited_groups * (n_routed_experts // n_expert_groups)
        if n_activated_experts > reachable:
            raise ConfigError(
                f"n_activated_experts={n_activated_experts} is not allowed: the n_limited_groups={n_limited_groups} "
                f"best groups of {n_routed_experts // n_expert_groups} experts hold only {reachable} experts"
            )
        self.route_scale = _checks.positive("route_scale", route_scale)
        self.aux_loss_coef = _checks.non_negative("aux_loss_coef", aux_loss_coef)
        self.bias_update_speed = _checks.non_negative("bias_update_speed", bias_update_speed)
        if capacity_factor is not None:
            capacity_factor = _checks.positive("capacity_factor", capacity_factor)
        self.capacity_factor = capacity_factor
        self.score_func = score_func
        self.n_expert_groups, self.n_limited_groups = n_expert_groups, n_limited_groups
        self.dispatch = dispatch

        group_size = n_routed_experts // n_expert_groups
        self.gate = Gate(d_model, n_routed_experts, n_activated_experts, score_func, self.route_scale,
                         n_expert_groups, n_limited_groups, group_by_top2=bias_update_speed > 0 and group_size > 1)
        self.experts = Experts(n_routed_experts, d_model, expert_hidden)
        self.shared_experts = SwiGLU(d_model, n_shared_experts * expert_hidden) if n_shared_experts else None
        self.register_buffer("load_since_update", torch.zeros(n_routed_experts), persistent=False)
        self.aux_loss = torch.zeros(())
        self._stats = None

    @property
    def dispatch(self) -> str:
        return self._dispatch

    @dispatch.setter
    def dispatch(self, value: str) -> None:
        _checks.one_of("dispatch", value, DISPATCHES)
        self._dispatch = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.input_tensor(x, self.d_model, ranks=(2, 3))
        shape = x.shape
        x = x.reshape(-1, self.d_model)  # (N, d)
        weights, indices, scores = self.gate(x)  # (N, k), (N, k), (N, E)
        counts = torch.bincount(indices.flatten(), minlength=self.n_routed_experts)  # (E,) chosen, before dropping
        capacity = self.capacity(x.shape[0])
        route = self._route_fast if self.dispatch == "fast" else self._route_reference
        y = route(x, weights.to(_compute_dtype(x)), indices, counts, capacity)  # (N, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        self._account(scores, counts, capacity)
        return y.view(shape)

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments each expert keeps from a batch of ``n_tokens`` (None: no capacity limit)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.n_activated_experts / self.n_routed_experts)

    def _route_fast(self, x, weights, indices, counts, capacity):
        """Sort assignments by expert once, batched matmuls with a backward that reuses the sort."""
        order, kept = expert_dispatch.sort_by_expert(indices, counts, capacity)
        token = order // indices.shape[1]  # (M,) token of each kept assignment
        dtype = weights.dtype
        w1, w2, w3 = (w.to(dtype) for w in (self.experts.w1, self.experts.w2, self.experts.w3))
        slot_weights = weights.flatten().index_select(0, order)  # (M,)
        return expert_dispatch.routed_experts(x.to(dtype), slot_weights, token, kept, w1, w2, w3)

    def _route_reference(self, x, weights, indices, counts, capacity):
        """DeepSeek's reference loop: for each expert, select its tokens, run it, add back weighted."""
        dtype = weights.dtype
        y = x.new_zeros(x.shape[0], self.d_model, dtype=dtype)
        w1s, w2s, w3s = (w.to(dtype).unbind(0) for w in (self.experts.w1, self.experts.w2, self.experts.w3))
        for i, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            idx, top = torch.where(indices == i)  # tokens choosing expert i, in token order
            if capacity is not None:
                idx, top = idx[:capacity], top[:capacity]
            xe = x[idx].to(dtype)
            h = F.silu(F.linear(xe, w1s[i])) * F.linear(xe, w3s[i])
            y.index_add_(0, idx, F.linear(h, w2s[i]) * weights[idx, top].unsqueeze(-1))
        return y

    def _account(self, scores, counts, capacity):
        """Set aux_loss, keep this forward's statistics and accumulate load for update_bias()."""
        n_tokens = scores.shape[0]
        probs = scores if self.score_func == "softmax" else scores / scores.sum(dim=-1, keepdim=True)  # (N, E)
        if self.aux_loss_coef > 0:
            # f_i = share of assignments on expert i, scaled so a balanced router has f_i = 1
            load = counts.float() * self.n_routed_experts / (n_tokens * self.n_activated_experts)
            self.aux_loss = self.aux_loss_coef * (load * probs.mean(dim=0)).sum()
        else:
            self.aux_loss = scores.new_zeros(())
        if self.training and self.bias_update_speed > 0:
            self.load_since_update += counts.to(self.load_since_update.dtype)
        kept = counts if capacity is None else counts.clamp(max=capacity)
        self._stats = (counts, kept, probs.detach())  # the entropy is computed when last_stats asks for it

    def inactive_params(self) -> int:
        """Parameters a token does not use: the routed experts beyond its top-k."""
        per_expert = sum(w[0].numel() for w in (self.experts.w1, self.experts.w2, self.experts.w3))
        return (self.n_routed_experts - self.n_activated_experts) * per_expert

    @property
    def last_stats(self) -> dict:
        """Routing of the last forward: tokens per expert (chosen), max/mean load, router entropy, drops.

        ``dropped_tokens`` counts (token, expert) assignments dropped by the capacity limit.
        """
        if self._stats is None:
            return {}
        counts, kept, probs = self._stats
        counts_f = counts.float()
        entropy = -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1).mean()
        return {
            "tokens_per_expert": counts.tolist(),
            "load_imbalance": (counts_f.max() / counts_f.mean()).item(),
            "router_entropy": entropy.item(),
            "dropped_tokens": int((counts - kept).sum().item()),
        }

    @torch.no_grad()
    def update_bias(self) -> None:
        """Loss-free balancing step (call after optimizer.step()): lower overloaded experts' bias, raise the rest."""
        if self.bias_update_speed == 0 or self.load_since_update.sum() == 0:
            return
        load = self.load_since_update
        self.gate.bias += self.bias_update_speed * torch.sign(load.mean() - load)
        load.zero_()

