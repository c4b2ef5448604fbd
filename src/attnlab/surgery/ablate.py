"""``attnlab ablate``: which attention heads a pretrained model needs, measured three ways
(Michel, Levy & Neubig, "Are Sixteen Heads Really Better than One?", 2019).

- single-head ablation: remove one head (ξ_h = 0, or replace it by its mean output with
  ``mode="mean"``) and measure how much the loss rises, for every head of every layer;
- gradient importance: I_h = E_x |∂L(x)/∂ξ_h| at ξ = 1 over the text's windows x, from one backward
  pass (each window gets its own ξ, so the absolute value is taken per window), then normalised per
  layer by its ℓ2 norm, as Michel et al. do before comparing heads across layers;
- pruning curves: the loss as a growing share of all heads is removed, least important first (by
  ablation and by gradient), against random orders.

The loss: for a decoder the next-token cross-entropy on the text. MiniLM (an encoder) has no
masked-LM head in attnlab's module, so for an encoder the loss is the damage done to its output:
1 − cosine between the ablated and the intact final hidden states, averaged over tokens (0 for the
intact model). That loss is at its minimum at ξ = 1, so its gradient there is zero; the encoder's
"gradient importance" is therefore the first non-zero Taylor term, ½ · mean over tokens of
‖∂u_t/∂ξ_h‖² with u_t the unit-length final state — the 1 − cosine that removing the head would
cause if u moved linearly — estimated with Gaussian probes r: E[(r·∂u/∂ξ)²] = ‖∂u/∂ξ‖² (Hutchinson).

Ablating a head of layer l changes nothing before l, so each layer's ablations start from the
intact model's hidden states at l's input, all heads of the layer in one batch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from attnlab import _checks
from attnlab.attention.head_mask import collect_head_means
from attnlab.attention.rope import default_positions
from attnlab.data.corpus import load_corpus
from attnlab.device import machine_facts
from attnlab.errors import ConfigError
from attnlab.models.encoder import Encoder
from attnlab.models.gpt import GPT
from attnlab.models.pretrained import AttentionModel, load_attention_model
from attnlab.surgery.ablate_report import FILES, write_report

MODES = ("zero", "mean")
# Shares of all heads removed at which the pruning curves are measured.
SHARES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
RANDOM_ORDERS = 3  # random pruning orders, drawn from the seed
PROBES = 16  # Gaussian probes for the encoder's Jacobian-norm importance
TOKEN_BUDGET = 4096  # tokens per forward batch, so logits stay a few hundred MB
DEFAULT_TEXT = "shakespeare"  # the built-in corpus; the slice after its first 90 % (what compare holds out)


@dataclass
class AblateConfig:
    """What ``attnlab ablate`` measures; checked before any model is loaded or file written."""

    model: str = "smollm2"
    text: str | None = None  # a UTF-8 text file; None: a held-out slice of the built-in Shakespeare corpus
    mode: str = "zero"
    max_tokens: int = 256
    window: int | None = None  # tokens per window (one example x); None: min(64, max_tokens)
    seed: int = 0

    def __post_init__(self):
        _checks.one_of("mode", self.mode, MODES)
        _checks.positive_int("max_tokens", self.max_tokens)
        if self.window is None:
            self.window = min(64, self.max_tokens)
        _checks.positive_int("window", self.window)
        if self.window > self.max_tokens:
            raise ConfigError(f"window={self.window} is larger than max_tokens={self.max_tokens}: "
                              "expected window <= max_tokens")
        if self.window < 3:
            raise ConfigError(f"window={self.window} is not allowed: expected at least 3 tokens per window")
        _checks.non_negative_int("seed", self.seed)
        if self.text is not None and not Path(self.text).is_file():
            raise ConfigError(f"text={self.text!r} is not a file: expected a UTF-8 text file")


def default_text(chars: int) -> str:
    """``chars`` characters of the built-in corpus starting at the first line after its first 90 %."""
    corpus = load_corpus(DEFAULT_TEXT)
    start = corpus.index("\n", int(len(corpus) * 0.9)) + 1
    return corpus[start:start + chars]


def _windows(am: AttentionModel, text: str, max_tokens: int, window: int) -> torch.Tensor:
    """The text's first tokens as non-overlapping windows: (W, window + 1) for a decoder (inputs and
    the next token), (W, window) for an encoder (each window wrapped in [CLS] … [SEP])."""
    if window > am.context_length:
        raise ConfigError(f"window={window} is longer than {am.name}'s context of {am.context_length} tokens")
    ids = am.tokenizer.encode(text)
    encoder = isinstance(am.model, Encoder)
    if encoder:
        cls, body, sep = ids[0], ids[1:-1], ids[-1]
        step = window - 2
        n = min(max_tokens // window, len(body) // step)
        rows = [[cls, *body[i * step:(i + 1) * step], sep] for i in range(n)]
    else:
        n = min(max_tokens, len(ids) - 1) // window
        rows = [ids[i * window:(i + 1) * window + 1] for i in range(n)]
    if n == 0:
        raise ConfigError(f"the text has {len(ids)} tokens: a window of {window} needs at least "
                          f"{window if encoder else window + 1}; give a longer text or a smaller window")
    return torch.tensor(rows, dtype=torch.long)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses in fp32 at least: bf16 rounding would swamp a single head's effect (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class DecoderRunner:
    """Per-window next-token loss of a GPT, run from any layer's input with masked heads."""

    def __init__(self, model: GPT, windows: torch.Tensor):
        device = model.wte.weight.device
        self.model = model
        self.idx, self.targets = windows[:, :-1].to(device), windows[:, 1:].to(device)
        self.positions, end = default_positions(0, self.idx.size(1), device)
        self.rotary = None if model.rotary is None else model.rotary.cos_sin(self.positions, end)
        self.n_layer, self.n_head = model.head_grid()
        self.shape = tuple(self.idx.shape)  # (windows, tokens per window)
        x = model.wte(self.idx)
        self.inputs = [x if model.wpe is None else x + model.wpe(self.positions)]  # block l's input is inputs[l]
        for block in model.blocks:
            self.inputs.append(block(self.inputs[-1], None, self.positions, None, self.rotary))

    def losses(self, row_masks: torch.Tensor | None, start: int, means=None) -> torch.Tensor:
        """(M, W) mean loss per window for the masks (M·W, layers, heads), one row per (mask, window)
        — every window of mask m at rows m·W … m·W + W − 1 — starting at block ``start``."""
        model, W = self.model, self.idx.size(0)
        M = 1 if row_masks is None else row_masks.size(0) // W
        x = self.inputs[start].repeat(M, 1, 1)
        with model.masked_heads(row_masks, means):  # None: no mask at all, the unmasked forward
            for block in model.blocks[start:]:
                x = block(x, None, self.positions, None, self.rotary)
        logits = _at_least_fp32(model.lm_head(model.norm_f(x)))  # (M·W, T, vocab)
        loss = F.cross_entropy(logits.transpose(1, 2), self.targets.repeat(M, 1), reduction="none")  # (M·W, T)
        return loss.mean(1).view(M, W)

    def gradient_importance(self, means=None) -> torch.Tensor:
        """(layers, heads): E over windows of |∂L_w/∂ξ_h| at ξ = 1 (Michel et al.), one backward pass."""
        xi = torch.ones(self.idx.size(0), self.n_layer, self.n_head, requires_grad=True)
        self.losses(xi, 0, means).sum().backward()
        return xi.grad.abs().mean(0)


class EncoderRunner:
    """Per-window 1 − cosine between an encoder's ablated and intact final hidden states."""

    def __init__(self, model: Encoder, windows: torch.Tensor):
        self.model = model
        self.ids = windows.to(model.wte.weight.device)
        self.shape = tuple(self.ids.shape)  # (windows, tokens per window)
        self.n_layer, self.n_head = model.head_grid()
        self.inputs = model(self.ids)  # [embeddings, layer 1, …, layer n]: layer l's input is inputs[l]
        self.final = self.inputs[-1]

    def _run(self, row_masks, start: int, means) -> torch.Tensor:
        M = 1 if row_masks is None else row_masks.size(0) // self.ids.size(0)
        x = self.inputs[start].repeat(M, 1, 1)
        with self.model.masked_heads(row_masks, means):
            for layer in self.model.layers[start:]:
                x = layer(x, None)
        return x  # (M·W, T, C)

    def losses(self, row_masks: torch.Tensor | None, start: int, means=None) -> torch.Tensor:
        """(M, W) mean over tokens of 1 − cos(ablated, intact final state); rows as DecoderRunner.losses."""
        out = self._run(row_masks, start, means)
        M = out.size(0) // self.ids.size(0)
        cos = F.cosine_similarity(_at_least_fp32(out), _at_least_fp32(self.final).repeat(M, 1, 1), dim=-1)  # (M·W, T)
        return (1 - cos).mean(1).view(M, -1)

    def gradient_importance(self, means=None, *, probes: int = PROBES, seed: int = 0) -> torch.Tensor:
        """(layers, heads): ½ · mean over tokens of ‖∂u_t/∂ξ_h‖² at ξ = 1 (see the module docstring),
        from ``probes`` Gaussian probes per window, all in one batch and one backward pass."""
        W, T = self.ids.shape
        xi = torch.ones(probes * W, self.n_layer, self.n_head, requires_grad=True)
        u = F.normalize(_at_least_fp32(self._run(xi, 0, means)), dim=-1)  # (P·W, T, C)
        r = torch.randn(u.shape, generator=torch.Generator().manual_seed(seed)).to(u.device)
        (u * r).sum().backward()
        return 0.5 * xi.grad.pow(2).mean(0) / T  # E_probe (r·J)² = ‖J‖², summed over tokens -> mean


def runner_for(am: AttentionModel, windows: torch.Tensor):
    """The runner that fits the model: next-token loss for a GPT, 1 − cosine for an encoder."""
    if isinstance(am.model, GPT):
        return DecoderRunner(am.model, windows)
    if isinstance(am.model, Encoder):
        return EncoderRunner(am.model, windows)
    raise ConfigError(f"{am.name}: ablate works on attnlab GPTs and encoders, not {type(am.model).__name__}")


def _mean_losses(runner, masks: torch.Tensor, start: int, means=None) -> torch.Tensor:
    """(M,) loss of each mask (M, layers, heads) averaged over all windows, in batches of at most
    TOKEN_BUDGET tokens."""
    W, T = runner.shape
    per_batch = max(1, TOKEN_BUDGET // (W * T))
    out = [runner.losses(chunk.repeat_interleave(W, 0), start, means).mean(1)
           for chunk in masks.split(per_batch)]
    return torch.cat(out)


def single_head_losses(runner, means=None, progress: Callable | None = None) -> torch.Tensor:
    """(layers, heads): the loss with that one head removed (all others kept)."""
    L, H = runner.n_layer, runner.n_head
    losses = torch.empty(L, H)
    for layer in range(L):
        masks = torch.ones(H, L, H)
        masks[torch.arange(H), layer, torch.arange(H)] = 0  # mask h removes head h of this layer
        losses[layer] = _mean_losses(runner, masks, layer, means)
        if progress is not None:
            progress({"event": "layer", "layer": layer, "total": L})
    return losses


def normalise_per_layer(importance: torch.Tensor) -> torch.Tensor:
    """Each layer's scores divided by their ℓ2 norm (Michel et al. §6.1), so layers compare."""
    return importance / importance.norm(dim=1, keepdim=True).clamp_min(torch.finfo(importance.dtype).tiny)


def pruning_masks(order: torch.Tensor, shares, layers: int, heads: int) -> torch.Tensor:
    """(len(shares), layers, heads): mask s removes the first round(share · N) heads of ``order``
    (flat indices layer · heads + head)."""
    n = layers * heads
    masks = torch.ones(len(shares), n)
    for i, share in enumerate(shares):
        masks[i, order[:round(share * n)]] = 0
    return masks.view(len(shares), layers, heads)


def pruning_orders(delta: torch.Tensor, importance: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Heads least important first: by single-head loss increase, by normalised gradient
    importance, and RANDOM_ORDERS random permutations drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    n = delta.numel()
    orders = {"ablation": torch.argsort(delta.flatten(), stable=True),
              "gradient": torch.argsort(importance.flatten(), stable=True)}
    for k in range(RANDOM_ORDERS):
        orders[f"random{k + 1}"] = torch.randperm(n, generator=generator)
    return orders


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two score tables (ties broken by position)."""
    ranks = [torch.argsort(torch.argsort(t.flatten(), stable=True)).double() for t in (a, b)]
    ra, rb = (r - r.mean() for r in ranks)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def share_before_damage(losses, shares, base: float, fraction: float = 0.1) -> float:
    """The largest share removed before the loss first rises by ``fraction`` of the rise that
    removing every head causes: a scale-free "where the curve starts to climb"."""
    full = losses[-1] - base
    last = 0.0
    for share, loss in zip(shares, losses):
        if full > 0 and loss - base >= fraction * full:
            return last
        last = share
    return last


def top_heads(delta: torch.Tensor, importance: torch.Tensor, k: int = 10) -> list[dict]:
    """The k heads whose removal raises the loss most, with their gradient importance."""
    order = torch.argsort(delta.flatten(), descending=True, stable=True)[:k]
    heads = delta.size(1)
    return [{"layer": int(i) // heads, "head": int(i) % heads, "delta": float(delta.flatten()[i]),
             "importance": float(importance.flatten()[i])} for i in order]


def _prepare(am: AttentionModel, windows: torch.Tensor, mode: str):
    """The runner (its intact forward pass done) and, for mean-ablation, each head's mean output
    over the same windows: the reference text is the text measured."""
    with torch.no_grad(), collect_head_means(am.model) as collected:
        runner = runner_for(am, windows)
    return runner, (collected.means if mode == "mean" else None)


def analyse(am: AttentionModel, windows: torch.Tensor, *, mode: str = "zero", seed: int = 0,
            progress: Callable | None = None) -> dict:
    """Single-head ablation, gradient importance and pruning curves of ``am`` on ``windows``
    (see :func:`_windows`); returns plain numbers and lists, ready for results.json."""
    _checks.one_of("mode", mode, MODES)
    note = progress or (lambda event: None)
    am.model.eval()
    wall, start = {}, time.perf_counter()
    runner, means = _prepare(am, windows, mode)
    with torch.no_grad():
        base = float(runner.losses(None, runner.n_layer).mean()) if isinstance(runner, DecoderRunner) else 0.0
        note({"event": "phase", "phase": "ablation"})
        ablated = single_head_losses(runner, means, note)
    wall["ablation_s"] = time.perf_counter() - start
    note({"event": "phase", "phase": "gradient"})
    start = time.perf_counter()
    importance = runner.gradient_importance(means) if isinstance(runner, DecoderRunner) else \
        runner.gradient_importance(means, seed=seed)
    wall["gradient_s"] = time.perf_counter() - start
    delta, normalised = ablated - base, normalise_per_layer(importance)
    note({"event": "phase", "phase": "pruning"})
    start = time.perf_counter()
    curves = {}
    with torch.no_grad():
        for name, order in pruning_orders(delta, normalised, seed).items():
            masks = pruning_masks(order, SHARES, runner.n_layer, runner.n_head)
            curves[name] = [float(v) for v in _mean_losses(runner, masks, 0, means)]
    wall["pruning_s"] = time.perf_counter() - start
    random_names = [n for n in curves if n.startswith("random")]
    return {
        "kind": "decoder" if isinstance(runner, DecoderRunner) else "encoder",
        "mode": mode, "seed": seed, "windows": runner.shape[0], "window": runner.shape[1],
        "tokens": runner.shape[0] * runner.shape[1], "layers": runner.n_layer, "heads": runner.n_head,
        "base_loss": base, "ablation_loss": ablated.tolist(), "ablation_delta": delta.tolist(),
        "importance": importance.tolist(), "importance_normalised": normalised.tolist(),
        "top_heads": top_heads(delta, normalised), "spearman_ablation_vs_gradient": spearman(delta, normalised),
        "spearman_ablation_vs_raw_gradient": spearman(delta, importance),
        "pruning": {"shares": list(SHARES), **curves},
        "share_before_10pct_damage": {n: share_before_damage(curves[n], SHARES, base)
                                      for n in ("ablation", "gradient", *random_names)},
        "wall_s": wall,
    }


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out)!r} exists and is not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out={str(out)!r} already exists and is not empty: pass --overwrite to replace its "
                          f"{', '.join(FILES)}, or choose another --out")


def _read_text(cfg: AblateConfig) -> tuple[str, str]:
    """(text, where it came from): the --text file, or the held-out slice of the built-in corpus."""
    if cfg.text is None:
        return default_text(16 * cfg.max_tokens + 2000), f"built-in corpus '{DEFAULT_TEXT}', first lines after 90 %"
    text = load_corpus(cfg.text)
    return text, f"file {Path(cfg.text).name}"


def ablate(out_dir, config: AblateConfig | dict | None = None, *, overwrite: bool = False, command: str = "",
           progress: Callable | None = None) -> dict:
    """Measure every head of ``config.model`` (see the module docstring) and write results.json,
    report.md and the PNGs to ``out_dir``. Everything is checked before the model loads; nothing
    is written before the measurements are done. Returns the results (with "paths")."""
    cfg = config if isinstance(config, AblateConfig) else AblateConfig(**(config or {}))
    out = Path(out_dir)
    _check_out(out, overwrite)
    start = time.perf_counter()
    text, source = _read_text(cfg)
    am = load_attention_model(cfg.model)
    windows = _windows(am, text, cfg.max_tokens, cfg.window)
    load_s = time.perf_counter() - start
    results = analyse(am, windows, mode=cfg.mode, seed=cfg.seed, progress=progress)
    results["wall_s"] = {"load_s": load_s, **results["wall_s"], "total_s": time.perf_counter() - start}
    results.update(model=cfg.model, text=source, command=command, config=dataclasses.asdict(cfg),
                   machine=machine_facts())
    results["paths"] = [str(p) for p in write_report(out, results)]
    return results
