"""Head roles: which heads attend to the previous token, to an earlier copy of the same token, or
to the token that followed it (induction), measured on repeated random token sequences.

The recipe of TransformerLens' head detector and ARENA's induction-head exercises: draw a random
sequence of L tokens and repeat it (``repeats`` copies in all, a batch of several such
sequences), run the model once, recording every head's attention, and for every head average

- previous-token: the attention from each position i to i − 1 (every position but the first);
- duplicate-token: the attention from each position i of a later copy to i − L, the same token
  in the copy before;
- induction: the attention from each position i of a later copy to i − L + 1, the token that
  came *after* i's earlier occurrence (what a head attends to when it predicts "this happened
  before, so what followed then comes next").

Random tokens carry no meaning, so only these mechanisms can explain attention on the later copies.
A head scoring above the threshold (0.4, as ARENA flags) is listed for that role. Tokens within
one copy are distinct where the vocabulary allows, so each target position is unambiguous.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attnlab import _checks
from attnlab.attention.record import record_attention
from attnlab.errors import ConfigError
from attnlab.files import write_json, write_text
from attnlab.models.pretrained import AttentionModel, load_attention_model
from attnlab.report_blocks import new_figure, save_figure
from attnlab.surgery.context import check_out_dir
from attnlab.timing import time_call

ROLES = ("previous", "duplicate", "induction")
LABELS = {"previous": "previous-token heads", "duplicate": "duplicate-token heads", "induction": "induction heads"}
TARGET = {"previous": "i - 1", "duplicate": "i - L", "induction": "i - L + 1"}
THRESHOLD = 0.4
REPORT_TXT, REPORT_MD, REPORT_JSON = "roles.txt", "roles.md", "roles.json"


@dataclass(frozen=True)
class RoleRequest:
    """The sizes of the test: ``batch`` random sequences of ``seq_len`` tokens, each ``repeats`` times."""

    seq_len: int = 50
    repeats: int = 2
    batch: int = 4
    seed: int = 0
    threshold: float = THRESHOLD

    def __post_init__(self):
        _at_least_two("seq_len", self.seq_len, "tokens per copy, so that i - 1 and i - L + 1 differ")
        _at_least_two("repeats", self.repeats, "copies: duplicate and induction are read on the copies after the first")
        _checks.positive_int("batch", self.batch)
        _checks.non_negative_int("seed", self.seed)
        _checks.real("threshold", self.threshold, low=0, high=1, low_open=True)


def _at_least_two(name: str, value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigError(f"{name}={value!r} is not allowed: expected an integer >= 2 ({what})")


def repeated_tokens(vocab_size: int, request: RoleRequest, *, bos_id: int | None = None,
                    exclude=()) -> torch.Tensor:
    """(batch, [1 +] repeats · seq_len) token ids: a random sequence repeated, seeded, after an
    optional BOS. Tokens within a copy are distinct when the vocabulary (less ``exclude``) allows."""
    allowed = torch.tensor([t for t in range(vocab_size) if t not in set(exclude)], dtype=torch.long)
    if len(allowed) < 2:
        raise ConfigError(f"vocab_size={vocab_size} leaves {len(allowed)} token(s) to draw from: expected at least 2")
    generator = torch.Generator().manual_seed(request.seed)
    rows = []
    for _ in range(request.batch):
        if len(allowed) >= request.seq_len:
            pick = torch.randperm(len(allowed), generator=generator)[: request.seq_len]
        else:
            pick = torch.randint(len(allowed), (request.seq_len,), generator=generator)
        rows.append(allowed[pick].repeat(request.repeats))
    ids = torch.stack(rows)  # (batch, repeats * seq_len)
    if bos_id is not None:
        ids = torch.cat([torch.full((request.batch, 1), bos_id, dtype=torch.long), ids], dim=1)
    return ids


def role_scores(weights, seq_len: int, repeats: int, offset: int = 0) -> dict[str, np.ndarray]:
    """Every head's score per role, (layers, heads) each, from recorded attention on
    :func:`repeated_tokens`: weights holds one (batch, heads, T, T) tensor per layer and
    ``offset`` is 1 when a BOS token leads the sequence (it is never a query here)."""
    stack = torch.stack([w.float().cpu() for w in weights])  # (layers, batch, heads, T, T)
    T = stack.size(-1)
    if T != offset + repeats * seq_len:
        raise ConfigError(f"attention covers {T} tokens: expected offset + repeats * seq_len = "
                          f"{offset + repeats * seq_len}")
    queries = torch.arange(offset + 1, T)  # every token with a previous one in the sequence
    later = torch.arange(offset + seq_len, T)  # the copies after the first
    targets = {"previous": (queries, queries - 1), "duplicate": (later, later - seq_len),
               "induction": (later, later - seq_len + 1)}
    return {role: stack[..., q, k].mean(dim=(1, 3)).numpy() for role, (q, k) in targets.items()}


@dataclass
class RolesReport:
    """Scores of every head per role, and how they were measured."""

    model: str
    request: RoleRequest
    bos: bool
    scores: dict[str, np.ndarray]  # role -> (layers, heads)
    load_seconds: float = 0.0
    forward_seconds: float = 0.0
    losses: dict[str, float] | None = None  # next-token loss in the first copy vs the later ones

    def flagged(self, role: str) -> list[tuple[int, int, float]]:
        """(layer, head, score) of the heads above the threshold, best first."""
        grid = self.scores[role]
        found = [(int(layer), int(head), float(grid[layer, head]))
                 for layer, head in zip(*np.nonzero(grid > self.request.threshold))]
        return sorted(found, key=lambda t: (-t[2], t[0], t[1]))

    def recipe(self) -> str:
        r = self.request
        bos = "after a BOS token, " if self.bos else ""
        return (f"{r.batch} random sequences of L={r.seq_len} tokens, {bos}each repeated to {r.repeats} copies "
                f"(seed {r.seed}); score = mean attention from position i to: previous i-1, duplicate i-L, "
                f"induction i-L+1 (duplicate and induction over the copies after the first); heads above "
                f"{r.threshold:g} are listed")

    def lines(self, md: bool = False) -> list[str]:
        n_layers, n_heads = self.scores[ROLES[0]].shape
        bullet = "- " if md else "  "
        out = [f"head roles of {self.model}: {n_layers} layers × {n_heads} heads", f"recipe: {self.recipe()}"]
        for role in ROLES:
            found = self.flagged(role)
            best = np.unravel_index(np.argmax(self.scores[role]), self.scores[role].shape)
            out.append(f"{LABELS[role]} (→ {TARGET[role]}): {len(found)} above {self.request.threshold:g} "
                       f"(best: layer {best[0]} head {best[1]}, {self.scores[role][best]:.3f})")
            out += [f"{bullet}layer {layer} head {head}: {score:.3f}" for layer, head, score in found]
        if self.losses is not None:
            out.append(f"next-token loss: {self.losses['first_copy']:.2f} nats inside the first copy (random tokens), "
                       f"{self.losses['later_copies']:.2f} on the later copies (copying what followed before)")
        return out

    def format(self, fmt: str = "text") -> str:
        _checks.one_of("fmt", fmt, ("text", "md", "json"))
        if fmt == "json":
            return json.dumps(self.to_json(), indent=2) + "\n"
        if fmt == "text":
            return "\n".join(self.lines()) + "\n"
        lines = self.lines(md=True)
        return "\n\n".join([f"## {lines[0]}", lines[1], *_md_groups(lines[2:])]) + "\n"

    def to_json(self) -> dict:
        r = self.request
        return {
            "model": self.model, "seq_len": r.seq_len, "repeats": r.repeats, "batch": r.batch, "seed": r.seed,
            "bos": self.bos, "threshold": r.threshold, "recipe": self.recipe(),
            "losses": self.losses, "load_seconds": round(self.load_seconds, 2),
            "forward_seconds": round(self.forward_seconds, 3),
            "roles": {role: {"target": TARGET[role], "scores": self.scores[role].round(6).tolist(),
                             "heads": [{"layer": la, "head": h, "score": round(s, 6)}
                                       for la, h, s in self.flagged(role)]}
                      for role in ROLES},
        }


def _md_groups(lines: list[str]) -> list[str]:
    """Each role's heading line followed by its bullet list, as Markdown paragraphs."""
    groups: list[list[str]] = []
    for line in lines:
        if line.startswith("- "):
            groups[-1].append(line)
        else:
            groups.append([f"**{line}**"])
    return ["\n".join([g[0], "", *g[1:]]) if len(g) > 1 else g[0] for g in groups]


def head_roles(model: AttentionModel | str, request: RoleRequest | None = None) -> RolesReport:
    """Score every head of ``model`` (an :class:`AttentionModel` or a spec for
    :func:`load_attention_model`) for the three roles; see the module docstring for the recipe.
    The report carries the seconds spent loading the model and in the one recorded forward pass."""
    request = RoleRequest() if request is None else request
    load_seconds = 0.0
    if isinstance(model, str):
        spec, loaded = model, []
        load_seconds = time_call(lambda: loaded.append(load_attention_model(spec)))
        model = loaded[0]
    bos_id = getattr(model.tokenizer, "bos_id", None)
    offset = int(bos_id is not None)
    length = offset + request.repeats * request.seq_len
    if length > model.context_length:
        raise ConfigError(f"repeats * seq_len = {request.repeats} * {request.seq_len}{' + BOS' if offset else ''} = "
                          f"{length} tokens is more than {model.name}'s context of {model.context_length}: "
                          "lower --seq-len or --repeats")
    specials = {t for t in (bos_id, getattr(model.tokenizer, "eos_id", None)) if t is not None}
    ids = repeated_tokens(model.model.config.vocab_size, request, bos_id=bos_id, exclude=specials)
    device = next(model.model.parameters()).device
    outputs = []
    with torch.no_grad(), record_attention(model.model) as rec:
        forward_seconds = time_call(lambda: outputs.append(model.model(ids.to(device))), device)
    scores = role_scores(rec.weights, request.seq_len, request.repeats, offset)
    losses = copy_losses(outputs[0], ids, request.seq_len, offset)
    return RolesReport(model.name, request, bool(offset), scores, load_seconds, forward_seconds, losses)


def copy_losses(output, ids: torch.Tensor, seq_len: int, offset: int = 0) -> dict[str, float] | None:
    """A language model's mean next-token loss inside the first copy (random: no better than ln(vocab)) and on
    the later copies after their first token (predictable by copying: low if induction works);
    None for a model whose forward gives no logits (an encoder)."""
    logits = output[0] if isinstance(output, tuple) else None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        return None
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2).cpu(), ids[:, 1:], reduction="none")  # (B, T-1): loss of token t+1
    targets = torch.arange(1, ids.size(1))  # the position each loss predicts
    first = (targets > offset) & (targets < offset + seq_len)
    later = targets > offset + seq_len
    return {"first_copy": float(losses[:, first].mean()), "later_copies": float(losses[:, later].mean())}


def plot_role(report: RolesReport, role: str):
    """A layer × head heatmap of one role's scores (0..1), the flagged heads' scores written in."""
    grid = report.scores[role]
    n_layers, n_heads = grid.shape
    fig = new_figure(min(2.0 + 0.55 * n_heads, 14.0), min(1.5 + 0.3 * n_layers, 16.0))
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    for layer, head, score in report.flagged(role):
        ax.text(head, layer, f"{score:.2f}".lstrip("0"), ha="center", va="center", fontsize=7,
                color="black" if score > 0.6 else "white")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers) if n_layers <= 32 else range(0, n_layers, 2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label=f"mean attention to {TARGET[role]}")
    ax.set_title(f"{role} score, {report.model} (above {report.request.threshold:g} written in)", fontsize=10)
    return fig


def save_roles(report: RolesReport, out_dir, *, overwrite: bool = False) -> list[Path]:
    """roles.txt, roles.md, roles.json and <role>.png per role in ``out_dir`` (a new folder, or an existing
    one with ``overwrite``)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    figures = [(out_dir / f"{role}.png", plot_role(report, role)) for role in ROLES]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / REPORT_TXT, report.format("text"))
    write_text(out_dir / REPORT_MD, report.format("md"))
    write_json(out_dir / REPORT_JSON, report.to_json())
    for path, fig in figures:
        save_figure(fig, path)
    return [out_dir / REPORT_TXT, out_dir / REPORT_MD, out_dir / REPORT_JSON, *(path for path, _ in figures)]
