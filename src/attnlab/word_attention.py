"""How much attention one word gives to other words, in every layer and head.

Checks claims such as "one head links *with* to *brush*, another to *woman*" in one call.
Words are found in the text (case-insensitive) and mapped to the tokens covering them; a word
split into several tokens counts as the sum of its pieces on the "to" side and as the mean of
its pieces' rows on the "from" side, so every number stays a share of one token's attention.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from attnlab import _checks
from attnlab.errors import ConfigError, InputTypeError
from attnlab.data.tokenizer import Tokenized
from attnlab.viz.heatmap import attention_stack

_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


@dataclass
class HeadScore:
    layer: int
    head: int
    weights: dict[str, float]  # to-word -> share of the from-word's attention


@dataclass
class HeadsTable:
    """Attention from ``from_word`` to each of ``to_words``, one row per (layer, head)."""

    from_word: str
    to_words: list[str]
    pieces: dict[str, list[str]]  # word -> the tokens that make it up (all occurrences)
    occurrences: dict[str, int]
    rows: list[HeadScore]
    later: list[str]  # to-words wholly after from_word (a causal model cannot attend to them)

    def sorted(self, by: str | None = None) -> list[HeadScore]:
        """Rows by decreasing attention to ``by`` (default: the first to-word)."""
        by = self.to_words[0] if by is None else by
        if by not in self.to_words:
            raise ConfigError(f"by={by!r} is not allowed: expected one of {', '.join(map(repr, self.to_words))}")
        return sorted(self.rows, key=lambda r: (-r.weights[by], r.layer, r.head))

    def notes(self) -> list[str]:
        """What the numbers mean, including how multi-token and repeated words were combined."""
        lines = [f"attention from {self.from_word!r} to each word, per layer and head (rows of a head sum to 1)"]
        for word in [self.from_word, *self.to_words]:
            pieces = self.pieces[word]
            if self.occurrences[word] > 1:
                lines.append(f"{word!r} occurs {self.occurrences[word]} times: all occurrences are combined")
            if len(pieces) > self.occurrences[word]:
                how = "averaged over" if word == self.from_word else "summed over"
                lines.append(f"{word!r} is split into tokens {' + '.join(map(repr, pieces))}: {how} its pieces")
        for word in self.to_words:
            if all(r.weights[word] == 0.0 for r in self.rows):
                why = f": it comes after {self.from_word!r} and this model's attention is causal" if word in self.later else ""
                lines.append(f"{word!r} gets no attention in any head{why}")
        return lines

    def format(self, by: str | None = None, top: int | None = None) -> str:
        """A plain-text table, sorted (see :meth:`sorted`), then a line on who wins where."""
        if top is not None:
            _checks.positive_int("top", top)
        rows = self.sorted(by)
        shown = rows if top is None else rows[:top]
        headers = ["layer", "head", *(f"→ {w}" for w in self.to_words)]
        if len(self.to_words) > 1:
            headers.append("strongest")
        widths = [max(5, len(h)) for h in headers]
        out = [f"# {line}" for line in self.notes()]
        out.append("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
        for r in shown:
            cells = [str(r.layer), str(r.head), *(f"{r.weights[w]:.3f}" for w in self.to_words)]
            if len(self.to_words) > 1:
                cells.append(max(self.to_words, key=r.weights.get))
            out.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
        if top is not None and top < len(rows):
            out.append(f"... {len(rows) - top} more heads (raise --top to see them)")
        for word in self.to_words:
            best = max(self.rows, key=lambda r: r.weights[word])
            if best.weights[word] == 0.0:
                continue
            line = f"strongest {self.from_word!r} → {word!r}: layer {best.layer} head {best.head} ({best.weights[word]:.3f})"
            if len(self.to_words) > 1:
                wins = sum(1 for r in self.rows if max(self.to_words, key=r.weights.get) == word)
                line += f"; {word!r} beats the other named words in {wins} of {len(self.rows)} heads"
            out.append(line)
        return "\n".join(out)


def words(text: str) -> list[tuple[str, int, int]]:
    """The words (and punctuation marks) of ``text`` with their character spans."""
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(text)]


def word_token_indices(tokenized: Tokenized, word: str, role: str) -> tuple[list[int], int]:
    """Indices of the tokens covering every occurrence of ``word`` (case-insensitive), and how many
    occurrences; ``role`` names the argument in the error when the word is not in the text."""
    if not isinstance(word, str) or not word.strip():
        raise ConfigError(f"{role}={word!r} is not allowed: expected a word of the text")
    found = [(s, e) for w, s, e in words(tokenized.text) if w.casefold() == word.strip().casefold()]
    if not found:
        known = ", ".join(dict.fromkeys(repr(w) for w, _, _ in words(tokenized.text)))
        raise ConfigError(f"{role}={word!r} is not a word of the text: its words are {known}")
    indices = [
        k for k, span in enumerate(tokenized.spans)
        if span is not None and any(span[0] < e and span[1] > s for s, e in found)
    ]
    return indices, len(found)


def attention_between(tokenized: Tokenized, weights, from_word: str, to_words) -> HeadsTable:
    """The share of ``from_word``'s attention that lands on each of ``to_words``, per layer and head.

    weights: one (1, heads, T, T) tensor per layer, as ``AttentionModel.attention`` returns.
    """
    if not isinstance(tokenized, Tokenized):
        raise InputTypeError(f"tokenized must be a Tokenized, got {type(tokenized).__name__}")
    if isinstance(to_words, str):
        to_words = [w for w in to_words.split(",") if w.strip()]
    to_words = [w.strip() for w in to_words]
    if not to_words:
        raise ConfigError("to_words=[] is not allowed: name at least one word to measure attention to")
    stack = torch.from_numpy(attention_stack(tokenized.tokens, weights))  # (L, H, T, T)
    source, n_source = word_token_indices(tokenized, from_word, "from_word")
    targets = {w: word_token_indices(tokenized, w, "to_words") for w in to_words}
    rows_of_source = stack[:, :, source, :].mean(dim=2)  # (L, H, T): mean over the from-word's pieces
    shares = {w: rows_of_source[:, :, idx].sum(dim=-1) for w, (idx, _) in targets.items()}  # (L, H) each
    n_layers, n_heads = stack.shape[:2]
    rows = [
        HeadScore(layer, head, {w: float(shares[w][layer, head]) for w in to_words})
        for layer in range(n_layers) for head in range(n_heads)
    ]
    from_word = from_word.strip()
    pieces = {from_word: [tokenized.tokens[k] for k in source]}
    pieces.update({w: [tokenized.tokens[k] for k in idx] for w, (idx, _) in targets.items()})
    occurrences = {from_word: n_source, **{w: n for w, (_, n) in targets.items()}}
    later = [w for w, (idx, _) in targets.items() if min(idx) > max(source)]
    return HeadsTable(from_word, to_words, pieces, occurrences, rows, later)
