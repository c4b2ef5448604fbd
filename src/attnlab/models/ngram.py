"""A count-based n-gram language model with interpolated Kneser-Ney smoothing (Chen & Goodman 1998,
one fixed discount D for every order), the baseline the neural models have to beat.

With h the n-1 tokens before w and h' = h without its first token:

    P(w | h)  = max(c(h w) - D, 0) / c(h•)  +  D · N1+(h•) / c(h•) · P_lower(w | h')
    P_lower   = the same formula with continuation counts N1+(•h'w) (how many distinct tokens
                precede h'w) in place of c, down to unigrams, which interpolate with 1/vocab_size.

A history never seen (c(h•) = 0), or cut short at the start of a text, backs off to the lower order
unchanged. Every token of the vocabulary gets probability > 0, so perplexity is always finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attnlab import _checks
from attnlab._checks import positive_int
from attnlab.errors import ConfigError, InputTypeError
from attnlab.models.base import SaveLoadMixin, register_model


@dataclass
class NGramConfig:
    vocab_size: int
    n: int = 3
    discount: float = 0.75


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[i] where keys[i] == query (keys sorted), 0 where the query is absent."""
    idx = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[idx] == query, values[idx], 0)


class NGramLM(SaveLoadMixin):
    """Interpolated Kneser-Ney n-gram model over token ids; counts are sparse (sorted int64 keys
    that pack k tokens as base-vocab_size digits), so BPE vocabularies of thousands fit."""

    model_type = "ngram"
    config_class = NGramConfig

    def __init__(self, vocab_size: int, n: int = 3, discount: float = 0.75):
        positive_int("vocab_size", vocab_size)
        positive_int("n", n)
        _checks.real("discount", discount, low=0, high=1, low_open=True, high_open=True)
        if vocab_size ** n >= 2**63:
            raise ConfigError(
                f"n={n} with vocab_size={vocab_size} is not allowed: vocab_size**n must stay below 2**63 "
                f"(n-grams are packed into int64 keys); use a smaller n or vocabulary"
            )
        self.config = NGramConfig(vocab_size, n, float(discount))
        self.vocab_size, self.n, self.discount = vocab_size, n, float(discount)
        self._keys: dict[int, np.ndarray] = {}
        self._counts: dict[int, np.ndarray] = {}

    @property
    def fitted(self) -> bool:
        return bool(self._keys)

    def _check_ids(self, ids, name: str = "ids") -> np.ndarray:
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids)
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise InputTypeError(f"{name} must be a 1-D sequence of integer token ids, got shape {arr.shape} dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ConfigError(f"{name} hold ids in [{arr.min()}, {arr.max()}]: expected ids in [0, {self.vocab_size})")
        return arr

    def fit(self, ids) -> "NGramLM":
        """Count every k-gram of ``ids`` (k = 1..n); replaces any earlier counts."""
        ids = self._check_ids(ids)
        if len(ids) < self.n:
            raise ConfigError(f"ids has {len(ids)} tokens: fitting an n={self.n} model needs at least {self.n}")
        V = self.vocab_size
        grams = ids.copy()  # (N - k + 1,) keys of the k-grams starting at each position
        unique = {1: np.unique(grams)}
        for k in range(2, self.n + 1):
            grams = grams[:-1] * V + ids[k - 1:]
            if k == self.n:
                unique[k], self._counts[k] = np.unique(grams, return_counts=True)
            else:
                unique[k] = np.unique(grams)
        if self.n == 1:
            unique[1], self._counts[1] = np.unique(ids, return_counts=True)
        self._keys[self.n] = unique[self.n]
        for k in range(1, self.n):  # continuation counts: distinct left neighbours of each k-gram
            self._keys[k], self._counts[k] = np.unique(unique[k + 1] % V**k, return_counts=True)
        self._index()
        return self

    def _index(self) -> None:
        """Per order k, the totals c(h•) and type counts N1+(h•) of each (k-1)-token history h."""
        self._hist, self._hist_total, self._hist_types = {}, {}, {}
        for k, keys in self._keys.items():
            hist, start, types = np.unique(keys // self.vocab_size, return_index=True, return_counts=True)
            self._hist[k], self._hist_types[k] = hist, types
            self._hist_total[k] = np.add.reduceat(self._counts[k], start)

    def _interpolate(self, hists: dict[int, np.ndarray], valid: dict[int, np.ndarray], w: np.ndarray) -> np.ndarray:
        """P(w | history) for arrays of targets, with hists[k] the key of the k-1 tokens before each
        target and valid[k] whether the text has that many tokens before it."""
        if not self.fitted:
            raise ConfigError("this NGramLM has no counts yet: call fit(ids) first")
        D = self.discount
        p = np.full(w.shape, 1.0 / self.vocab_size)
        for k in range(1, self.n + 1):
            total = _lookup(self._hist[k], self._hist_total[k], hists[k])
            types = _lookup(self._hist[k], self._hist_types[k], hists[k])
            count = _lookup(self._keys[k], self._counts[k], hists[k] * self.vocab_size + w)
            seen = valid[k] & (total > 0)
            p = np.where(seen, (np.maximum(count - D, 0.0) + D * types * p) / np.maximum(total, 1), p)
        return p

    def token_probs(self, ids) -> np.ndarray:
        """P(ids[i] | the up to n-1 tokens before it) for every position i, float64 (N,)."""
        ids = self._check_ids(ids)
        pos = np.arange(len(ids))
        hist = np.zeros(len(ids), dtype=np.int64)
        hists, valid = {1: hist}, {1: np.ones(len(ids), dtype=bool)}
        for k in range(2, self.n + 1):
            back = pos - (k - 1)
            valid[k] = back >= 0
            hist = np.where(valid[k], ids[np.maximum(back, 0)] * self.vocab_size ** (k - 2) + hist, 0)
            hists[k] = hist
        return self._interpolate(hists, valid, ids)

    def loss(self, ids) -> float:
        """Mean negative log-likelihood in nats over every token of ``ids`` (the first ones with shorter contexts)."""
        return float(-np.log(self.token_probs(ids)).mean())

    def perplexity(self, ids) -> float:
        """Exact perplexity exp(loss) over every token of ``ids``."""
        return float(np.exp(self.loss(ids)))

    def _key(self, tokens: np.ndarray) -> int:
        """The int64 key of a k-gram: its tokens as base-vocab_size digits, first token most significant."""
        key = 0
        for t in tokens.tolist():
            key = key * self.vocab_size + t
        return key

    def next_token_probs(self, context_ids) -> torch.Tensor:
        """The distribution over the next token after ``context_ids`` (only its last n-1 matter), float64 (V,)."""
        context = self._check_ids(context_ids, "context_ids")
        w = np.arange(self.vocab_size, dtype=np.int64)
        hists, valid = {}, {}
        for k in range(1, self.n + 1):
            valid[k] = np.full(w.shape, len(context) >= k - 1)
            hists[k] = np.full_like(w, self._key(context[len(context) - (k - 1):]) if k > 1 and valid[k][0] else 0)
        return torch.from_numpy(self._interpolate(hists, valid, w))

    def logits(self, context_ids) -> torch.Tensor:
        """Log-probabilities of the next token, float64 (V,): a drop-in for a neural model's last logits."""
        return self.next_token_probs(context_ids).log()

    def generate(self, prompt_ids, max_new_tokens: int, seed: int | None = None, temperature: float = 1.0) -> list[int]:
        """prompt_ids followed by ``max_new_tokens`` sampled ids; temperature 0 picks the most likely token."""
        out = self._check_ids(prompt_ids, "prompt_ids").tolist()
        _checks.non_negative("temperature", temperature)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for _ in range(max_new_tokens):
            probs = self.next_token_probs(out[max(len(out) - (self.n - 1), 0):])
            if temperature == 0:
                out.append(int(probs.argmax()))
                continue
            probs = (probs.log() / temperature).softmax(-1)
            out.append(int(torch.multinomial(probs, 1, generator=generator)))
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.fitted:
            raise ConfigError("this NGramLM has no counts yet: call fit(ids) before save_pretrained")
        tensors = {}
        for k in range(1, self.n + 1):
            tensors[f"order{k}.keys"] = torch.from_numpy(self._keys[k])
            tensors[f"order{k}.counts"] = torch.from_numpy(self._counts[k].astype(np.int64))
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = {f"order{k}.{part}" for k in range(1, self.n + 1) for part in ("keys", "counts")}
        if set(tensors) != expected:
            raise ConfigError(f"n-gram counts do not match n={self.n}: expected tensors {sorted(expected)}, got {sorted(tensors)}")
        for k in range(1, self.n + 1):
            self._keys[k] = tensors[f"order{k}.keys"].numpy().astype(np.int64)
            self._counts[k] = tensors[f"order{k}.counts"].numpy().astype(np.int64)
        self._index()


register_model(NGramLM.model_type, NGramLM)
