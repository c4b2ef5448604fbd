"""Contextual embeddings: how one word's vector changes with its sentence, layer by layer.

A static embedding gives "bank" one vector whether money or a river is meant; attention mixes
each token with its context, so deeper layers should pull the two senses apart. For a word that
occurs in several sentences this module takes the word's vector at every layer (a word split into
several tokens: the mean of its pieces, the rule of :mod:`attnlab.word_attention`), the cosine
similarity between every pair of sentences, and at the last layer the other words of each
sentence nearest to it.

Layer 0 is the token-embedding lookup, before any attention *and before any position term*
(MiniLM adds position and token-type embeddings and a LayerNorm before its first layer; a GPT
with learned positions adds them; RoPE models such as SmolLM2 never add one). So layer 0 is
context-free: identical tokens give a similarity of exactly 1 there. The later layers are each
block's output (for a GPT the residual stream, before the final norm).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from attnlab import _checks
from attnlab.errors import ConfigError, InputTypeError
from attnlab.files import write_json, write_text
from attnlab.models.encoder import Encoder
from attnlab.models.gpt import GPT
from attnlab.models.pretrained import AttentionModel, load_attention_model
from attnlab.report_blocks import new_figure, save_figure
from attnlab.word_attention import word_token_indices, words


@dataclass(frozen=True)
class Example:
    """Built-in sentences for one word, two senses, two sentences each. The words that settle
    the sense come *before* the word, so a causal model (which sees only the left) can tell too."""

    word: str
    sentences: tuple[str, ...]
    senses: tuple[str, ...]


EXAMPLES = {
    "bank": Example("bank", (
        "She deposited her salary at the bank before noon.",
        "He borrowed money from the bank to buy a house.",
        "They had a picnic on the grassy river bank.",
        "The fisherman sat quietly on the muddy bank of the stream.",
    ), ("money", "money", "river", "river")),
    "cool": Example("cool", (
        "After the storm the evening air felt cool and fresh.",
        "In autumn the mornings are cool and misty.",
        "His new phone with the folding screen is really cool.",
        "That robot vacuum with voice control is so cool.",
    ), ("weather", "weather", "gadget", "gadget")),
}
REPORT_TXT, REPORT_MD, REPORT_JSON = "report.txt", "report.md", "report.json"


def layer_descriptions(model, n_layers: int) -> list[str]:
    """What each entry of ``model.hidden_states`` is, in words (entry 0 differs by model)."""
    if isinstance(model, Encoder):
        first = "word-piece embedding, before position + token-type embeddings and LayerNorm"
        later = "output of encoder layer {}"
    elif isinstance(model, GPT) and model.wpe is not None:
        first, later = "token embedding, before the learned positions are added", "residual stream after block {}"
    else:
        first, later = "token embedding (RoPE: no position term is added)", "residual stream after block {}"
    return [first, *(later.format(i) for i in range(1, n_layers))]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity in float64, written so that identical vectors give exactly 1.0
    (sqrt(n·n) == n in IEEE arithmetic, so a·a / sqrt(|a|²|a|²) is 1 with no rounding)."""
    a, b = a.detach().double(), b.detach().double()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else 0.0


@dataclass
class ContextReport:
    """One word's vectors across sentences: similarity per layer and nearest words at the last."""

    word: str
    model: str
    sentences: list[str]
    senses: list[str] | None
    pieces: list[list[str]]  # the word's tokens in each sentence
    layers: list[str]  # what each layer is
    similarity: np.ndarray  # (layers, sentences, sentences)
    nearest: list[list[tuple[str, float]]]  # per sentence: (other word, cosine) at the last layer
    occurrences: list[int] = field(default_factory=list)

    def pairs(self) -> list[tuple[int, int]]:
        return list(combinations(range(len(self.sentences)), 2))

    def kind(self, i: int, j: int) -> str | None:
        """"within" (same sense), "across" (different senses) or None (no senses given)."""
        if self.senses is None:
            return None
        return "within" if self.senses[i] == self.senses[j] else "across"

    def mean(self, kind: str | None) -> np.ndarray | None:
        """Mean similarity per layer over the pairs of one kind (None: every pair)."""
        chosen = [(i, j) for i, j in self.pairs() if kind is None or self.kind(i, j) == kind]
        if not chosen:
            return None
        return np.mean([self.similarity[:, i, j] for i, j in chosen], axis=0)

    def notes(self) -> list[str]:
        lines = [(f"cosine similarity between the vectors of {self.word!r} in {len(self.sentences)} sentences, "
                  f"per layer ({self.model})"),
                 f"layer 0 = {self.layers[0]}: context-free, so identical tokens give exactly 1",
                 f"layers 1..{len(self.layers) - 1} = {self.layers[1].rsplit(' ', 1)[0]} i"]
        distinct = {tuple(p) for p in self.pieces}
        if len(distinct) > 1:
            shown = "; ".join(f"{k + 1}: {' + '.join(map(repr, p))}" for k, p in enumerate(self.pieces))
            lines.append(f"{self.word!r} is tokenized differently across sentences ({shown}): layer 0 is 1 only "
                         "between sentences with the same tokens")
        elif len(self.pieces[0]) > max(self.occurrences, default=1):
            lines.append(f"{self.word!r} is split into {' + '.join(map(repr, self.pieces[0]))}: its vector is the "
                         "mean of its pieces")
        if any(n > 1 for n in self.occurrences):
            lines.append(f"{self.word!r} occurs more than once in a sentence: all occurrences are averaged")
        if self.senses is not None:
            within = [f"{i + 1}-{j + 1}" for i, j in self.pairs() if self.kind(i, j) == "within"]
            across = [f"{i + 1}-{j + 1}" for i, j in self.pairs() if self.kind(i, j) == "across"]
            lines.append(f"within-sense pairs: {', '.join(within) or 'none'}; "
                         f"across-sense: {', '.join(across) or 'none'}")
        return lines

    def _table(self) -> tuple[list[str], list[list[str]]]:
        means = {kind: self.mean(kind) for kind in ("within", "across")}
        headers = ["layer", *(f"{i + 1}-{j + 1}" for i, j in self.pairs())]
        headers += [k for k, m in means.items() if m is not None]
        both = all(m is not None for m in means.values())
        if both:
            headers.append("within-across")
        rows = []
        for layer in range(len(self.layers)):
            row = [str(layer), *(f"{self.similarity[layer, i, j]:.3f}" for i, j in self.pairs())]
            row += [f"{m[layer]:.3f}" for m in means.values() if m is not None]
            if both:
                gap = means["within"][layer] - means["across"][layer]
                row.append(f"{0.0 if abs(gap) < 5e-4 else gap:+.3f}")  # never "-0.000"
            rows.append(row)
        return headers, rows

    def summary(self) -> str | None:
        """Where the senses separate most: the layer with the largest within − across gap."""
        within, across = self.mean("within"), self.mean("across")
        if within is None or across is None:
            return None
        gap = within - across
        best = int(np.argmax(gap))
        return (f"within-sense minus across-sense similarity: {gap[0]:+.3f} at layer 0, {gap[-1]:+.3f} at layer "
                f"{len(gap) - 1}, largest {gap[best]:+.3f} at layer {best}")

    def _nearest_lines(self) -> list[str]:
        last = len(self.layers) - 1
        lines = [f"nearest words to {self.word!r} at layer {last} (cosine with the other words of its sentence):"]
        for k, near in enumerate(self.nearest):
            lines.append(f"  {k + 1}: " + ", ".join(f"{w} {s:.3f}" for w, s in near))
        return lines

    def _sentence_lines(self) -> list[str]:
        return [f"  {k + 1}: " + (f"[{self.senses[k]}] " if self.senses else "") + s
                for k, s in enumerate(self.sentences)]

    def format_text(self) -> str:
        headers, rows = self._table()
        widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(headers)]
        out = [f"# {line}" for line in self.notes()]
        out += ["sentences:", *self._sentence_lines()]
        out.append("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
        out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
        out += [line for line in [self.summary()] if line]
        return "\n".join(out + self._nearest_lines()) + "\n"

    def format_md(self) -> str:
        headers, rows = self._table()
        out = [f"## {self.word!r} in context ({self.model})", "", *(f"- {line}" for line in self.notes()), ""]
        out += ["Sentences:", "", *(f"{line.strip()}" for line in self._sentence_lines()), ""]
        out += ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        out += ["", *[line for line in [self.summary()] if line], ""]
        near = self._nearest_lines()
        out += [near[0], "", *(f"- {line.strip()}" for line in near[1:]), ""]
        return "\n".join(out) + "\n"

    def to_json(self) -> dict:
        """``{"word", "layers": [{"layer", "similarity"}, ...]}`` plus what the text report shows."""
        layers = []
        for layer, what in enumerate(self.layers):
            entry = {"layer": layer, "what": what, "similarity": self.similarity[layer].round(6).tolist()}
            for kind in ("within", "across"):
                mean = self.mean(kind)
                if mean is not None:
                    entry[kind] = round(float(mean[layer]), 6)
            layers.append(entry)
        return {
            "word": self.word, "model": self.model, "sentences": self.sentences, "senses": self.senses,
            "pieces": self.pieces, "layers": layers,
            "nearest": [[{"word": w, "similarity": round(s, 6)} for w, s in near] for near in self.nearest],
        }


def _check_request(sentences, word, senses, top) -> tuple[list[str], str, list[str] | None]:
    """Every check that needs no model, so a mistake is refused before a model is loaded."""
    if isinstance(sentences, str) or not isinstance(sentences, (list, tuple)):
        raise InputTypeError(f"sentences must be a list of str, got {type(sentences).__name__}")
    if not all(isinstance(s, str) for s in sentences):
        raise InputTypeError("sentences must be a list of str")
    sentences = [s.strip() for s in sentences]
    if len(sentences) < 2 or not all(sentences):
        raise ConfigError(f"{len([s for s in sentences if s])} non-empty sentence(s) given: expected at least 2, each "
                          "containing the word, to compare its vectors across contexts")
    if not isinstance(word, str) or not word.strip() or len(words(word)) != 1:
        raise ConfigError(f"word={word!r} is not allowed: expected one word")
    word = word.strip()
    missing = [k + 1 for k, s in enumerate(sentences) if all(w.casefold() != word.casefold() for w, _, _ in words(s))]
    if missing:
        raise ConfigError(f"word={word!r} is not a word of sentence(s) {', '.join(map(str, missing))}: every sentence "
                          "must contain it (case-insensitive, as a whole word)")
    if senses is not None:
        senses = [str(s).strip() for s in (senses.split(",") if isinstance(senses, str) else senses)]
        if len(senses) != len(sentences) or not all(senses):
            raise ConfigError(f"senses={','.join(senses)!r} is not allowed: expected one non-empty label per sentence "
                              f"({len(sentences)}), e.g. money,money,river,river")
    _checks.positive_int("top", top)
    return sentences, word, senses


def _vectors(model: AttentionModel, sentence: str, word: str):
    """The sentence's hidden states (layers, T, C), its tokens and the word's token indices."""
    hidden_states = getattr(model.model, "hidden_states", None)
    if hidden_states is None:
        raise ConfigError(f"{model.name} ({type(model.model).__name__}) gives no hidden states: expected an attnlab "
                          "GPT or Encoder")
    tokenized = model.tokenize(sentence)
    indices, occurrences = word_token_indices(tokenized, word, "word")
    device = next(model.model.parameters()).device
    with torch.no_grad():
        states = hidden_states(torch.tensor([tokenized.ids], dtype=torch.long, device=device))
    stack = torch.stack([h[0].double().cpu() for h in states])  # (layers, T, C)
    return stack, tokenized, indices, occurrences


def _nearest(stack, tokenized, word: str, own: torch.Tensor, top: int) -> list[tuple[str, float]]:
    """The other words of the sentence by cosine with ``own`` at the last layer."""
    others = dict.fromkeys(w for w, _, _ in words(tokenized.text) if w[0].isalnum() and w.casefold() != word.casefold())
    scored = []
    for other in others:
        indices, _ = word_token_indices(tokenized, other, "word")
        scored.append((other, cosine(own, stack[-1, indices].mean(0))))
    return sorted(scored, key=lambda pair: -pair[1])[:top]


def contextual_similarity(model: AttentionModel | str, sentences, word: str, *, senses=None,
                          top: int = 3) -> ContextReport:
    """``word``'s vector in each sentence at every layer, compared by cosine (see module docstring).

    model: an :class:`AttentionModel` or a spec for :func:`load_attention_model`; senses: one label
    per sentence (a list or "a,a,b,b") so the report splits within-sense from across-sense pairs.
    """
    sentences, word, senses = _check_request(sentences, word, senses, top)
    if isinstance(model, str):
        model = load_attention_model(model)
    own, pieces, nearest, occurrences = [], [], [], []
    for sentence in sentences:
        stack, tokenized, indices, n = _vectors(model, sentence, word)
        vectors = stack[:, indices].mean(1)  # (layers, C): the mean of the word's pieces
        own.append(vectors)
        pieces.append([tokenized.tokens[k] for k in indices])
        occurrences.append(n)
        nearest.append(_nearest(stack, tokenized, word, vectors[-1], top))
    n_layers = own[0].size(0)
    similarity = np.array([[[cosine(a[layer], b[layer]) for b in own] for a in own] for layer in range(n_layers)])
    return ContextReport(word, model.name, sentences, senses, pieces, layer_descriptions(model.model, n_layers),
                         similarity, nearest, occurrences)


def context_reports(model: AttentionModel | str, sentences=(), word: str | None = None, *, senses=None,
                    top: int = 3) -> list[ContextReport]:
    """Reports for the given sentences, or with none given the built-in examples (every one, or
    the one for ``word``). The model is loaded once for all of them."""
    if sentences:
        if word is None:
            raise ConfigError("word=None is not allowed with sentences: name the word to follow (CLI: --word)")
        requests = [(sentences, word, senses)]
    else:
        if senses is not None:
            raise ConfigError("senses label your own sentences: give the sentences too (none given: the built-in "
                              "examples carry their senses)")
        if word is not None and word.strip().casefold() not in EXAMPLES:
            raise ConfigError(f"word={word!r} has no built-in example (those are {', '.join(map(repr, EXAMPLES))}): "
                              "give at least two sentences containing it")
        chosen = [EXAMPLES[word.strip().casefold()]] if word is not None else list(EXAMPLES.values())
        requests = [(list(e.sentences), e.word, list(e.senses)) for e in chosen]
    requests = [_check_request(text, w, labels, top) for text, w, labels in requests]
    if isinstance(model, str):
        model = load_attention_model(model)
    return [contextual_similarity(model, text, w, senses=labels, top=top) for text, w, labels in requests]


def reports_json(reports: list[ContextReport]) -> dict:
    """The first report's JSON, with any further ones under "more_examples"."""
    data = reports[0].to_json()
    if len(reports) > 1:
        data["more_examples"] = [r.to_json() for r in reports[1:]]
    return data


def format_reports(reports: list[ContextReport], fmt: str = "text") -> str:
    _checks.one_of("fmt", fmt, ("text", "md", "json"))
    if fmt == "json":
        return json.dumps(reports_json(reports), indent=2) + "\n"
    parts = [r.format_md() if fmt == "md" else r.format_text() for r in reports]
    return "\n".join(parts)


def plot_similarity(report: ContextReport):
    """Similarity vs layer: a thin line per pair (within-sense blue, across-sense orange) and
    each kind's mean in bold; every pair grey and their mean black without senses."""
    fig = new_figure(7.5, 4.5)
    ax = fig.subplots()
    x = np.arange(len(report.layers))
    colors = {"within": "tab:blue", "across": "tab:orange", None: "0.6"}
    for i, j in report.pairs():
        kind = report.kind(i, j)
        ax.plot(x, report.similarity[:, i, j], color=colors[kind], alpha=0.35, linewidth=1)
    for kind, label in (("within", "within-sense pairs (mean)"), ("across", "across-sense pairs (mean)"),
                        (None, "all pairs (mean)")):
        mean = report.mean(kind)
        if mean is not None and (kind is not None or report.senses is None):
            ax.plot(x, mean, color=colors[kind] if kind else "black", linewidth=2.5, marker="o", label=label)
    ax.set_xlabel("layer (0 = token embedding, before attention and positions)")
    ax.set_ylabel(f"cosine similarity of {report.word!r}'s vectors")
    ax.set_xticks(x if len(x) <= 16 else x[::2])
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(f"{report.word!r} across {len(report.sentences)} sentences ({report.model})")
    return fig


def save_context(reports: list[ContextReport], out_dir, *, overwrite: bool = False) -> list[Path]:
    """Write report.txt, report.md, report.json and similarity_<word>.png per report into ``out_dir``; an
    existing folder is refused unless ``overwrite`` (then only these files are replaced)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    figures = [(out_dir / f"similarity_{r.word}.png", plot_similarity(r)) for r in reports]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / REPORT_TXT, format_reports(reports, "text"))
    write_text(out_dir / REPORT_MD, format_reports(reports, "md"))
    write_json(out_dir / REPORT_JSON, reports_json(reports))
    for path, fig in figures:
        save_figure(fig, path)
    return [out_dir / REPORT_TXT, out_dir / REPORT_MD, out_dir / REPORT_JSON, *(path for path, _ in figures)]


def check_out_dir(out_dir, overwrite: bool) -> None:
    """A report folder must be new, or an existing folder with ``overwrite``; never a file."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out={str(out_dir)!r} is a file: expected a folder to create")
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"out={str(out_dir)!r} already exists: pass overwrite=True (CLI: --overwrite) to write "
                          "into it")
