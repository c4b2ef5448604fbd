"""`attnlab explain`: the lecture's attention path as a walkthrough with real numbers.

One new idea per step (simple → trainable → causal → dropout → wrapper → multihead, then additive:
the score attention started with, Bahdanau et al. 2014's, next to the dot products), each
intermediate tensor shown with its shape. Every number comes from attnlab's own modules, seeded
as the lecture seeds them: their weights, their sub-layers' outputs (forward hooks) and their
recorded attention. :func:`build_sections` returns the content, the renderers format it.
"""

from __future__ import annotations

import io
import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from attnlab import _checks
from attnlab.attention import (
    AdditiveAttention,
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttentionV1,
    SelfAttentionV2,
    record_attention,
    simple_self_attention,
)
from attnlab.errors import ConfigError

STEPS = ("simple", "trainable", "causal", "dropout", "wrapper", "multihead", "additive")
FORMATS = ("text", "md")
WIDTH = 100  # terminal columns the text output is laid out for

TOKENS = ("Your", "journey", "starts", "with", "one", "step")
EMBEDDINGS = (  # the lecture's 3-d embeddings of the six tokens
    (0.43, 0.15, 0.89),
    (0.55, 0.87, 0.66),
    (0.57, 0.85, 0.64),
    (0.22, 0.58, 0.33),
    (0.77, 0.25, 0.10),
    (0.05, 0.80, 0.55),
)

# "Why projections": hand-picked 4-d embeddings whose features are named, not learned.
DOG_WORDS = ("The", "dog", "chased", "the", "ball", "but", "it", "couldn't", "catch", "it")
DOG_FEATURES = ("animal", "object", "pronoun", "action")
DOG_EMBEDDINGS = (
    (0.1, 0.1, 0.1, 0.0),
    (0.9, 0.1, 0.0, 0.3),
    (0.1, 0.0, 0.0, 0.9),
    (0.1, 0.1, 0.1, 0.0),
    (0.1, 0.9, 0.0, 0.3),
    (0.0, 0.0, 0.1, 0.2),
    (0.5, 0.5, 0.8, 0.0),
    (0.0, 0.1, 0.0, 0.6),
    (0.1, 0.0, 0.0, 0.9),
    (0.5, 0.5, 0.8, 0.0),
)
# x @ W (lecture convention, (d_in, d_out)): the query of a pronoun asks "is it an animal?",
# the key of a token answers with its animal feature; the second column matches actions.
DOG_W_QUERY = ((0.0, 0.0), (0.0, 0.0), (2.0, 0.0), (0.0, 1.0))
DOG_W_KEY = ((2.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 1.0))


@dataclass(frozen=True)
class Item:
    """One tensor to show. ``index`` picks the printed part (e.g. batch 0) of ``tensor``;
    a printed part with more than two dimensions is shown as one table per leading index."""

    label: str
    tensor: torch.Tensor
    rows: tuple[str, ...] | None = None
    cols: tuple[str, ...] | None = None
    index: tuple[int, ...] = ()
    note: str = ""
    parts: str = "head"
    integer: bool = False

    @property
    def shown(self) -> torch.Tensor:
        return self.tensor[self.index] if self.index else self.tensor


@dataclass
class Section:
    """One step of the walkthrough: a title, its one new idea, then prose and tensors in order."""

    step: str
    title: str
    idea: str
    blocks: list[Item | str] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.blocks.append(text)

    def show(self, label: str, tensor: torch.Tensor, **kwargs) -> None:
        self.blocks.append(Item(label, tensor.detach().clone(), **kwargs))

    @property
    def items(self) -> dict[str, Item]:
        return {b.label: b for b in self.blocks if isinstance(b, Item)}


# ----------------------------------------------------------------------------- content


def build_sections(step: str = "all", seed: int = 123) -> list[Section]:
    """The walkthrough's sections for one step or all of them, computed under ``seed``.

    The caller's random state is left as it was.
    """
    _checks.one_of("step", step, ("all", *STEPS))
    _checks.non_negative_int("seed", seed)
    chosen = STEPS if step == "all" else (step,)
    builders = {
        "simple": _simple, "trainable": _trainable, "causal": _causal,
        "dropout": _dropout, "wrapper": _wrapper, "multihead": _multihead, "additive": _additive,
    }
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        return [builders[name](seed) for name in chosen]


def _embeddings() -> torch.Tensor:
    return torch.tensor(EMBEDDINGS)  # (6, 3)


def _batch() -> torch.Tensor:
    inputs = _embeddings()
    return torch.stack((inputs, inputs))  # (2, 6, 3)


BATCH0 = "batch 0 (batch 1 is a copy)"
SHOW_BATCH0 = dict(index=(0,), note=BATCH0)  # Section.show(...) arguments that print batch 0 only


@contextmanager
def _hooked(**modules: nn.Module):
    """Collect what each named sub-layer receives (``name.in``) and returns during a forward."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            seen[f"{name}.in"] = args[0].detach().clone()
            seen[name] = output.detach().clone()
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _simple(seed: int) -> Section:
    s = Section(
        "simple", "Simplified self-attention",
        "A token's context vector is a mix of all tokens, weighted by dot-product similarity.",
    )
    inputs = _embeddings()
    context, weights = simple_self_attention(inputs)
    scores = inputs @ inputs.T  # (6, 6) plain dot products
    s.say('Six tokens, "Your journey starts with one step", each a 3-d embedding (the lecture\'s '
          "numbers). No trainable weights yet, so nothing here depends on the seed.")
    s.show("inputs", inputs, rows=TOKENS)
    s.say("Take journey as the query. Its score with each token is the dot product of their embeddings.")
    s.show("scores for journey = inputs @ inputs[1]", scores[1], cols=TOKENS)
    s.say("Softmax turns the scores into attention weights: positive, summing to 1.")
    s.show("weights for journey = softmax(scores)", weights[1], cols=TOKENS)
    s.say("The context vector is the weighted sum of all the embeddings.")
    s.show("context for journey = weights @ inputs", context[1])
    s.say("All queries at once: one matrix product, a softmax along each row, one more product.")
    s.show("scores = inputs @ inputs.T", scores, rows=TOKENS, cols=TOKENS)
    s.show("weights = softmax(scores, dim=-1)", weights, rows=TOKENS, cols=TOKENS)
    s.show("context = weights @ inputs", context, rows=TOKENS)
    return s


def _trainable(seed: int) -> Section:
    s = Section(
        "trainable", "Trainable weights: queries, keys and values",
        "Three learned matrices project each token into a query, a key and a value.",
    )
    inputs = _embeddings()
    torch.manual_seed(seed)
    sa = SelfAttentionV1(3, 2)
    with record_attention(sa) as rec:
        context = sa(inputs)
    queries, keys, values = inputs @ sa.W_query, inputs @ sa.W_key, inputs @ sa.W_value  # (6, 2)
    scores = queries @ keys.T  # (6, 6)
    out_cols = ("out 0", "out 1")
    s.say(f"SelfAttentionV1(d_in=3, d_out=2) after torch.manual_seed({seed}): W_query, W_key, W_value "
          "are torch.rand matrices, applied as x @ W.")
    for name in ("W_query", "W_key", "W_value"):
        s.show(f"SelfAttentionV1.{name}", getattr(sa, name), cols=out_cols)
    s.show("queries = inputs @ W_query", queries, rows=TOKENS)
    s.show("keys = inputs @ W_key", keys, rows=TOKENS)
    s.show("values = inputs @ W_value", values, rows=TOKENS)
    s.say("Scores compare queries with keys instead of the raw embeddings.")
    s.show("scores = queries @ keys.T", scores, rows=TOKENS, cols=TOKENS)
    s.say(f"Scaled dot-product attention divides by sqrt(d_k) = sqrt(2) = {math.sqrt(2):.4f} before the "
          "softmax, so large d_k does not push the softmax into its flat, tiny-gradient tails.")
    s.show("weights = softmax(scores / sqrt(d_k)) (recorded)", rec.weights[0], index=(0, 0),
           rows=TOKENS, cols=TOKENS, note="batch 0, the only head")
    s.show("SelfAttentionV1 output = weights @ values", context, rows=TOKENS)

    torch.manual_seed(seed)
    sa2 = SelfAttentionV2(3, 2)
    s.say("SelfAttentionV2 uses nn.Linear instead: better initialisation, optional bias. nn.Linear "
          "stores its weight as (d_out, d_in) and computes x @ weight.T.")
    s.show("SelfAttentionV2.W_query.weight", sa2.W_query.weight)
    s.show("SelfAttentionV2 output", sa2(inputs), rows=TOKENS)

    _why_projections(s, seed)
    return s


def _why_projections(s: Section, seed: int) -> None:
    """"it" scores dog and ball alike with plain dot products; W_q/W_k can tell them apart."""
    emb = torch.tensor(DOG_EMBEDDINGS)  # (10, 4)
    _, plain_weights = simple_self_attention(emb)
    plain_scores = emb @ emb.T
    torch.manual_seed(seed)
    sa = SelfAttentionV1(4, 2)
    sa.W_query.copy_(torch.tensor(DOG_W_QUERY))
    sa.W_key.copy_(torch.tensor(DOG_W_KEY))
    with record_attention(sa) as rec:
        sa(emb)
    proj_scores = (emb @ sa.W_query) @ (emb @ sa.W_key).T  # (10, 10)
    proj_weights = rec.weights[0][0, 0]
    it, dog, ball = 6, 1, 4
    table = torch.stack((plain_scores[it], plain_weights[it], proj_scores[it], proj_weights[it]), dim=1)

    s.say('Why trainable projections? "The dog chased the ball but it couldn\'t catch it". These '
          "embeddings and W_q/W_k are small hand-picked illustrations (features: animal, object, "
          "pronoun, action), not learned values.")
    s.show("illustrative embeddings", emb, rows=DOG_WORDS, cols=DOG_FEATURES)
    s.show("illustrative W_q (x @ W_q)", sa.W_query, rows=DOG_FEATURES, cols=("animal?", "action?"))
    s.show("illustrative W_k (x @ W_k)", sa.W_key, rows=DOG_FEATURES, cols=("animal?", "action?"))
    s.show("query it (position 6) against every key", table, rows=DOG_WORDS,
           cols=("plain score", "plain weight", "projected score", "projected weight"))
    s.say(f"Plain dot products score dog and ball alike ({plain_scores[it, dog]:.4f} vs "
          f"{plain_scores[it, ball]:.4f}): the embedding of it is as close to one as to the other. "
          f"Projected, the query of it asks for an animal and the keys answer "
          f"({proj_scores[it, dog]:.4f} vs {proj_scores[it, ball]:.4f}). Training finds such "
          "projections from data.")


def _causal(seed: int) -> Section:
    s = Section(
        "causal", "Causal attention",
        "A token may attend only to itself and earlier tokens: the future is masked out.",
    )
    batch = _batch()
    torch.manual_seed(seed)
    ca = CausalAttention(3, 2, context_length=6, dropout=0.0).eval()
    with _hooked(q=ca.W_query, k=ca.W_key, v=ca.W_value) as seen, record_attention(ca) as rec:
        context = ca(batch)
    scores = seen["q"] @ seen["k"].transpose(1, 2)  # (2, 6, 6)
    mask = ca.mask[:6, :6]
    s.say(f"CausalAttention(d_in=3, d_out=2, context_length=6, dropout=0.0) after "
          f"torch.manual_seed({seed}), on a batch of two copies of the sentence.")
    s.show("batch", batch, rows=TOKENS, **SHOW_BATCH0)
    s.show("queries = W_query(batch)", seen["q"], rows=TOKENS, **SHOW_BATCH0)
    s.show("keys = W_key(batch)", seen["k"], rows=TOKENS, **SHOW_BATCH0)
    s.show("values = W_value(batch)", seen["v"], rows=TOKENS, **SHOW_BATCH0)
    s.show("scores = queries @ keys.T", scores, rows=TOKENS, cols=TOKENS, **SHOW_BATCH0)
    s.say("The module's mask buffer: 1 above the diagonal marks the future each row must not see.")
    s.show("CausalAttention.mask", mask, rows=TOKENS, cols=TOKENS, integer=True)
    s.say("Masked scores become -inf, so the softmax gives them weight exactly 0.")
    s.show("masked scores", scores.masked_fill(mask.bool(), float("-inf")), rows=TOKENS, cols=TOKENS, **SHOW_BATCH0)
    s.show("causal weights = softmax(masked / sqrt(d_k)) (recorded)", rec.weights[0], rows=TOKENS,
           cols=TOKENS, index=(0, 0), note="batch 0, the only head")
    s.say("Zeroing the future after the softmax and renormalising each row (the lecture's first try) "
          "gives the same weights; -inf before the softmax does it in one pass.")
    s.show("CausalAttention output", context, rows=TOKENS, **SHOW_BATCH0)
    return s


def _dropout(seed: int) -> Section:
    s = Section(
        "dropout", "Dropout on the attention weights",
        "While training, randomly drop attention weights so no single link is relied upon.",
    )
    torch.manual_seed(seed)
    dropout = nn.Dropout(0.5)
    ones = torch.ones(6, 6)
    dropped_ones = dropout(ones)
    s.say(f"torch.manual_seed({seed}); nn.Dropout(0.5) on a 6x6 matrix of ones: each entry is zeroed "
          "with probability 0.5 and survivors are scaled by 1 / (1 - 0.5) = 2, so sums stay the same "
          "on average.")
    s.show("nn.Dropout(0.5)(torch.ones(6, 6))", dropped_ones)

    batch = _batch()
    torch.manual_seed(seed)
    ca = CausalAttention(3, 2, context_length=6, dropout=0.5).eval()
    with record_attention(ca) as rec:
        eval_out = ca(batch)
    weights = rec.weights[0][0, 0]
    torch.manual_seed(seed)
    dropped = dropout(weights)
    s.say("The same dropout on the causal weights of CausalAttention(..., dropout=0.5) (re-seeded):")
    s.show("causal weights (recorded)", weights, rows=TOKENS, cols=TOKENS)
    s.show("dropout(causal weights)", dropped, rows=TOKENS, cols=TOKENS)
    ca.train()
    torch.manual_seed(seed)
    train_out = ca(batch)
    s.say("Inside the module, dropout acts only in training mode. model.eval() turns it off; dropout "
          "has no parameters, so the eval output equals the causal step's output for the same seed.")
    s.show("CausalAttention output, train mode", train_out, rows=TOKENS, **SHOW_BATCH0)
    s.show("CausalAttention output, eval mode", eval_out, rows=TOKENS, **SHOW_BATCH0)
    return s


def _wrapper(seed: int) -> Section:
    s = Section(
        "wrapper", "Multi-head attention as a wrapper",
        "Run several independent causal heads side by side and concatenate their outputs.",
    )
    batch = _batch()
    torch.manual_seed(seed)
    mhw = MultiHeadAttentionWrapper(3, 2, context_length=6, dropout=0.0, num_heads=2).eval()
    heads = {f"head{i}": head for i, head in enumerate(mhw.heads)}
    with _hooked(**heads) as seen, record_attention(mhw) as rec:
        out = mhw(batch)
    s.say(f"MultiHeadAttentionWrapper(d_in=3, d_out=2, context_length=6, dropout=0.0, num_heads=2) "
          f"after torch.manual_seed({seed}): two complete CausalAttention modules, each with its own "
          "W_query, W_key and W_value.")
    for i, head in enumerate(mhw.heads):
        s.show(f"heads[{i}].W_query.weight", head.W_query.weight)
    s.show("per-head causal weights (recorded)", rec.weights[0], rows=TOKENS, cols=TOKENS, **SHOW_BATCH0)
    for i in range(mhw.num_heads):
        s.show(f"heads[{i}] output", seen[f"head{i}"], rows=TOKENS, **SHOW_BATCH0)
    s.say("The wrapper concatenates the heads along the last dimension: num_heads * d_out = 4 columns. "
          "Head 0 was created first from the same seed, so its columns repeat the causal step's output.")
    s.show("output = cat(heads, dim=-1)", out, rows=TOKENS, cols=("h0 0", "h0 1", "h1 0", "h1 1"), **SHOW_BATCH0)
    return s


def _multihead(seed: int) -> Section:
    s = Section(
        "multihead", "Multi-head attention with weight splits",
        "One big projection per Q/K/V, cut into per-head blocks; the heads' outputs are merged "
        "and mixed by an output projection.",
    )
    torch.manual_seed(seed)
    mha = MultiHeadAttention(3, 2, context_length=6, dropout=0.0, num_heads=2).eval()
    s.say(f"Example 1: the six tokens, a batch of two copies, MultiHeadAttention(d_in=3, d_out=2, "
          f"context_length=6, dropout=0.0, num_heads=2) after torch.manual_seed({seed}): head_dim = 1.")
    _walk_mha(s, mha, _batch(), TOKENS, note=BATCH0, tag="[6-token example]")

    torch.manual_seed(seed)
    mha = MultiHeadAttention(8, 4, context_length=11, dropout=0.0, num_heads=2).eval()
    x = torch.rand(1, 11, 8)
    positions = tuple(str(i) for i in range(11))
    s.say(f"Example 2 (the lecture notes' 2-head example): 11 tokens, d_in=8, d_out=4, num_heads=2, "
          f"head_dim=2, after torch.manual_seed({seed}). The inputs are random numbers drawn from the "
          "same seed right after the weights, not real embeddings.")
    _walk_mha(s, mha, x, positions, note="batch 0 (the only one)", tag="[11-token example]")
    return s


def _walk_mha(s: Section, mha: MultiHeadAttention, x: torch.Tensor, rows, *, note: str, tag: str) -> None:
    """Show one MultiHeadAttention forward: weight splits, per-head Q/K/V, weights, merge, output."""
    layers = dict(q=mha.W_query, k=mha.W_key, v=mha.W_value, out=mha.out_proj)
    with _hooked(**layers) as seen, record_attention(mha) as rec:
        out = mha(x)
    nh, hd, d_in = mha.num_heads, mha.head_dim, mha.d_in
    q, k, v = (mha.split_heads(seen[name]) for name in ("q", "k", "v"))  # (B, nh, T, hd)
    scores = q @ k.transpose(-2, -1)  # (B, nh, T, T)
    merged = seen["out.in"]  # (B, T, d_out): what out_proj receives
    feats = tuple(f"h{h} {j}" for h in range(nh) for j in range(hd))
    b0 = dict(index=(0,), note=note)

    s.show(f"inputs {tag}", x, rows=rows, **b0)
    s.show(f"W_query.weight {tag}", mha.W_query.weight, rows=feats)
    s.say(f"Row r of W_query.weight makes output feature r, so head h owns rows h*head_dim to "
          f"(h+1)*head_dim - 1: weight.view(num_heads={nh}, head_dim={hd}, d_in={d_in}) shows each "
          "head's block (W_key and W_value split the same way).")
    for name in ("W_query", "W_key", "W_value"):
        s.show(f"{name}.weight split into heads {tag}", getattr(mha, name).weight.view(nh, hd, d_in))
    s.say("In forward the split happens on the projected tensor instead: W_query(x) is (B, T, d_out), "
          "then .view(B, T, num_heads, head_dim).transpose(1, 2) gives (B, num_heads, T, head_dim).")
    s.show(f"queries = W_query(x) {tag}", seen["q"], rows=rows, cols=feats, **b0)
    s.show(f"per-head queries {tag}", q, rows=rows, **b0)
    s.show(f"per-head keys {tag}", k, rows=rows, **b0)
    s.show(f"per-head values {tag}", v, rows=rows, **b0)
    s.show(f"per-head scores = queries @ keys.T {tag}", scores, rows=rows, cols=rows, **b0)
    s.show(f"per-head causal weights (recorded) {tag}", rec.weights[0], rows=rows, cols=rows, **b0)
    s.show(f"per-head context = weights @ values {tag}", mha.split_heads(merged), rows=rows, **b0)
    s.say("Merge: .transpose(1, 2) then .reshape(B, T, d_out) lays the heads' columns side by side, "
          "exactly the wrapper's concatenation.")
    s.show(f"merged context {tag}", merged, rows=rows, cols=feats, **b0)
    s.say("Unlike the wrapper, an output projection (d_out x d_out, with bias) mixes the heads.")
    s.show(f"out_proj.weight {tag}", mha.out_proj.weight)
    s.show(f"out_proj.bias {tag}", mha.out_proj.bias)
    s.show(f"MultiHeadAttention output = out_proj(merged) {tag}", out, rows=rows, **b0)


def _additive(seed: int) -> Section:
    s = Section(
        "additive", "Additive attention (Bahdanau et al. 2014)",
        "Score the query against each key with a small network, v_a · tanh(W_a q + U_a k), instead of a "
        "dot product.",
    )
    inputs = _embeddings()
    query = inputs[1]  # journey
    torch.manual_seed(seed)
    attn = AdditiveAttention(query_dim=3, key_dim=3, attn_dim=2)
    with record_attention(attn) as rec:
        context = attn(query.view(1, 1, 3), inputs.unsqueeze(0))  # (1, 1, 3)
    W, U, v = attn.W_a.weight, attn.U_a.weight, attn.v_a.weight[0]  # (2, 3), (2, 3), (2,)
    hidden = torch.tanh(W @ query + inputs @ U.T)  # (6, 2): one row per key
    dot = inputs @ query  # (6,)
    scores = torch.stack((dot, dot / math.sqrt(3), hidden @ v))  # (3, 6)
    kinds = ("dot product", "scaled dot product", "additive")
    hidden_cols = ("unit 0", "unit 1")
    s.say("Attention began in translation: Bahdanau, Cho and Bengio (2014) let a decoder state (the query) "
          "score every encoder state (the keys) with one tanh layer and a vector v_a. Here the query is "
          f"journey and the keys are the six embeddings; AdditiveAttention(3, 3, attn_dim=2) after "
          f"torch.manual_seed({seed}).")
    s.show("AdditiveAttention.W_a.weight (applied to the query)", W, rows=hidden_cols)
    s.show("AdditiveAttention.U_a.weight (applied to each key)", U, rows=hidden_cols)
    s.show("AdditiveAttention.v_a.weight", attn.v_a.weight, cols=hidden_cols)
    s.say("W_a q is computed once per query, U_a k once per key (a decoder reuses it at every step); their "
          "sum goes through tanh, one hidden vector per key.")
    s.show("W_a @ journey", W @ query, cols=hidden_cols)
    s.show("U_a @ key, every key", inputs @ U.T, rows=TOKENS, cols=hidden_cols)
    s.show("tanh(W_a @ journey + U_a @ key)", hidden, rows=TOKENS, cols=hidden_cols)
    s.say("v_a turns each hidden vector into one score. No sqrt(d_k) is needed: tanh keeps every hidden unit in "
          "(-1, 1), so a score is at most the sum of |v_a|, whatever the width.")
    s.show("scores for journey, three ways", scores, rows=kinds, cols=TOKENS)
    s.show("softmax(scores), three ways", torch.softmax(scores, dim=-1), rows=kinds, cols=TOKENS)
    s.show("additive weights (recorded)", rec.weights[0], index=(0, 0), rows=("journey",), cols=TOKENS,
           note="batch 0, the only head")
    s.say("The context is the weighted sum of the keys (Bahdanau's encoder states are keys and values at once). "
          "A dot product needs the query and key in one space of one size; the additive score takes any two "
          "widths, at the cost of a tanh layer per (query, key) pair, which is why the Transformer went back to "
          "(scaled) dot products: one matrix product for all pairs.")
    s.show("context for journey = weights @ inputs", context[0, 0])
    return s


# ----------------------------------------------------------------------------- rendering


def _number(value: float, integer: bool) -> str:
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    if integer:
        return str(int(value))
    text = f"{value:.4f}"
    return "0.0000" if text == "-0.0000" else text


def _tables(item: Item):
    """Yield (sub-label, 2-D list of cells, row labels, column labels) for the printed part."""
    shown = item.shown.detach().to(torch.float64)
    if shown.dim() < 2:
        shown = shown.reshape(1, -1)
        rows = ("",)
    else:
        rows = item.rows or tuple(str(i) for i in range(shown.shape[-2]))
    cols = item.cols or tuple(str(j) for j in range(shown.shape[-1]))
    leading = shown.shape[:-2]
    for idx in itertools.product(*(range(n) for n in leading)):
        if not idx:
            sub = ""
        elif len(idx) == 1:
            sub = f"{item.parts} {idx[0]}"
        else:
            sub = "[" + ", ".join(map(str, idx)) + "]"
        cells = [[_number(v, item.integer) for v in row] for row in shown[idx].tolist()]
        yield sub, cells, rows, cols


def _caption(item: Item) -> str:
    text = f"shape {tuple(item.tensor.shape)}"
    return f"{text}, showing {item.note}" if item.note else text


def render_text(sections: list[Section], *, seed: int, width: int = WIDTH, styles: bool = False) -> str:
    """Rich tables laid out for a ``width``-column terminal; ANSI styles only if ``styles``."""
    console = Console(
        record=True, file=io.StringIO(), width=width, force_terminal=styles,
        color_system="standard" if styles else None, highlight=False, emoji=False,
    )
    console.print(Text(f"attnlab explain (seed {seed}): every number below comes from attnlab's "
                       "modules, rounded to 4 decimals.", style="dim"))
    for n, section in enumerate(sections, 1):
        console.print()
        console.rule(Text(f"{n}. {section.title} ({section.step})", style="bold"))
        console.print(Text(section.idea, style="bold"))
        for block in section.blocks:
            console.print()
            if isinstance(block, str):
                console.print(Text(block))
                continue
            console.print(Text.assemble((block.label, "bold cyan"), "  ", (_caption(block), "dim")))
            for sub, cells, rows, cols in _tables(block):
                table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                              title=Text(sub, style="italic") if sub else None, title_justify="left")
                table.add_column("", style="bold", no_wrap=True)
                for col in cols:
                    table.add_column(col, justify="right", no_wrap=True)
                for label, row in zip(rows, cells):
                    table.add_row(label, *row)
                console.print(table)
    text = console.export_text(styles=styles)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def render_markdown(sections: list[Section], *, seed: int) -> str:
    """Markdown with one table per tensor (per head), for notes."""
    lines = [f"# attnlab explain (seed {seed})", "",
             "Every number below comes from attnlab's modules, rounded to 4 decimals.", ""]
    for n, section in enumerate(sections, 1):
        lines += [f"## {n}. {section.title} (`{section.step}`)", "", f"*{section.idea}*", ""]
        for block in section.blocks:
            if isinstance(block, str):
                lines += [block, ""]
                continue
            lines += [f"**{block.label}**, {_caption(block)}", ""]
            for sub, cells, rows, cols in _tables(block):
                if sub:
                    lines += [f"*{sub}*", ""]
                lines.append("| | " + " | ".join(cols) + " |")
                lines.append("|---|" + "---:|" * len(cols))
                lines += ["| " + " | ".join((label, *row)) + " |" for label, row in zip(rows, cells)]
                lines.append("")
    return "\n".join(lines)


def explain(step: str = "all", seed: int = 123, fmt: str = "text", out=None, overwrite: bool = False,
            *, styles: bool = False) -> str:
    """Render the walkthrough (one step or all) as text or Markdown and return it.

    With ``out`` the result is also written there; an existing file is kept unless ``overwrite``.
    ``styles`` adds ANSI colours to text output (for a terminal).
    """
    _checks.one_of("fmt", fmt, FORMATS)
    path = Path(out) if out is not None else None
    if path is not None and path.exists() and (not overwrite or path.is_dir()):
        what = "is a directory" if path.is_dir() else "already exists"
        hint = "" if path.is_dir() else ": pass overwrite=True (--overwrite) to replace it"
        raise ConfigError(f"out={str(path)!r} {what}{hint}")
    sections = build_sections(step, seed)
    if fmt == "md":
        rendered = render_markdown(sections, seed=seed)
    else:
        rendered = render_text(sections, seed=seed, styles=styles and path is None)
    if path is not None:
        try:
            path.write_text(rendered, encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"out={str(path)!r} cannot be written: {err.strerror}") from err
    return rendered
