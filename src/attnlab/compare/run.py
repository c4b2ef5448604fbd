"""``attnlab compare``: train the whole model family on one corpus under one equal budget and
measure each model the same way, so the report's numbers are comparable.

Every neural model gets the same data, tokenizer, width, depth, batches, seed, precision and
budget — by default a number of training tokens, so the losses do not depend on the machine's
speed — and is trained by the one trainer (:func:`attnlab.train.train`). All models are scored on
the same fixed val windows: mean cross-entropy of every position of each window, each window read
on its own (the n-gram too sees only earlier tokens of the same window). Each model's folder holds
the trainer's files plus ``result.json``; :mod:`attnlab.compare.report` turns the folder into
report.md / report.html. Progress goes to a callback; nothing here prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from attnlab import _checks
from attnlab import device as devices
from attnlab.attention.mla import mla_dims
from attnlab.attention.record import record_attention
from attnlab.compare.layout import ATTENTION_PNG, DATA, REPORT_FILES, RESULT, RUN_INFO
from attnlab.compare.report import write_report
from attnlab.data.batches import random_batches, spread_windows
from attnlab.data.corpus import encode, load_corpus, split_tokens, write_dataset
from attnlab.data.tokenizer import train_tokenizer
from attnlab.errors import ConfigError
from attnlab.files import read_jsonl, write_json
from attnlab.generate import stream_tokens
from attnlab.models.base import count_params, load_pretrained, model_class
from attnlab.models.mlp import MLPConfig
from attnlab.models.ngram import NGramLM
from attnlab.models.rnn import RecurrentState, RNNConfig
from attnlab.options import check_choices, option
from attnlab.timing import median_seconds, time_call
from attnlab.train import train
from attnlab.trainer import KERNELS, METRICS, Trainer, TrainConfig
from attnlab.viz.heatmap import plot_grid

MODELS = ("ngram", "mlp", "rnn", "lstm", "gru", "mha", "gqa", "mqa", "mla", "mha-moe", "mla-moe")
DEFAULT_MODELS = ("ngram", "mlp", "lstm", "mha", "gqa", "mqa", "mla", "mha-moe", "mla-moe")
RNN_MODELS = ("rnn", "lstm", "gru")  # name = RNNConfig.cell
GPT_MODELS = {  # name -> (attention, ffn)
    "mha": ("mha", "dense"), "gqa": ("gqa", "dense"), "mqa": ("mqa", "dense"), "mla": ("mla", "dense"),
    "mha-moe": ("mha", "moe"), "mla-moe": ("mla", "moe"),
}
LABELS = {
    "ngram": "n-gram (Kneser-Ney)", "mlp": "MLP n-gram", "rnn": "RNN (Elman)", "lstm": "LSTM", "gru": "GRU",
    "mha": "GPT · MHA", "gqa": "GPT · GQA", "mqa": "GPT · MQA",
    "mla": "GPT · MLA", "mha-moe": "GPT · MHA + MoE", "mla-moe": "GPT · MLA + MoE",
}
BUDGET_HELP = "'300ktok', '2Mtok' (training tokens per model) or '40s', '2m', '1h' (wall time per model)"
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|tok|ktok|mtok)\s*$", re.IGNORECASE)
# MoE members: DeepSeek-V3 style, sigmoid router with loss-free bias balancing plus a small aux loss;
# one shared + MOE_TOP_K routed experts of ffn_hidden / (1 + MOE_TOP_K) each, so the active FFN
# parameters equal the dense FFN's.
MOE_TOP_K = 2
MOE_SHARED = 1


@dataclass
class CompareConfig:
    """One comparison: which models, the budget, the data, and the settings they all share."""

    models: tuple[str, ...] = option(DEFAULT_MODELS, f"the models to train, in this order (any of {', '.join(MODELS)})")
    budget: str = option("200ktok", f"per model: {BUDGET_HELP}")
    corpus: str = option("shakespeare", "'shakespeare', a .txt file or a folder of .txt files")
    tokenizer: str = option("char", "the corpus's characters or a byte-level BPE", choices=("char", "bpe"))
    vocab_size: int | None = option(None, "BPE vocabulary size (bpe only); None: 2048")
    n_layer: int = option(4, "GPT blocks")
    n_head: int = option(4, "GPT query heads")
    d_model: int = option(128, "GPT width (and RNN hidden size)")
    block_size: int = option(128, "tokens per training and eval window")
    n_kv_head_gqa: int = option(2, "K/V heads of the GQA model")
    kv_lora_rank: int = option(64, "MLA latent width (MLA head dims follow DeepSeek-V3's ratios)")
    ffn_hidden: int = option(384, f"dense SwiGLU hidden = {MOE_SHARED} shared + {MOE_TOP_K} routed MoE experts of "
                                  f"ffn_hidden // {MOE_SHARED + MOE_TOP_K}")
    n_routed_experts: int = option(8, "routed experts of the MoE models")
    batch_size: int = option(8, "sequences per step (a small batch: more steps from the same tokens)")
    lr: float = option(2e-3, "peak learning rate of the GPTs")
    mlp_lr: float = option(1e-2, "peak learning rate of the MLP n-gram (a shallow net that wants a larger step)")
    rnn_lr: float = option(2e-2, "peak learning rate of the RNN, LSTM and GRU (2e-3 left a 2-layer LSTM at 2.56 "
                                 "after 200k tokens, 2e-2 reached 2.08)")
    warmup_steps: int = option(20, "steps of linear warmup (at most a fifth of the run)")
    dtype: str = option("auto", "auto: bf16 autocast where it measured faster than fp32 here, else float32",
                        choices=devices.PRECISIONS)
    seed: int = option(1337, "seed of the weights, batches and samples")
    attention_kernel: str = option("auto", "auto: whichever of fused (SDPA) and explicit measured faster here, per "
                                   "model (the choice can flip between runs on a loaded machine: fix it to compare "
                                   "two runs bit for bit)", choices=KERNELS)
    threads: int | None = option(None, "torch CPU threads; None: measured (torch's default unless one is faster)")
    ngram_orders: tuple[int, ...] = option((3, 4, 5, 6), "n-gram orders tried (the best on the val windows is kept)")
    rnn_layers: int = option(2, "stacked layers of the RNN members (char-rnn's default; 4 LSTM layers without residual "
                                "connections stayed at the unigram loss through the default budget)")
    mlp_context: int = option(8, "tokens the MLP n-gram sees")
    mlp_embed: int = option(32, "MLP n-gram embedding width")
    evals: int = option(10, "periodic val estimates per model (the curves)")
    eval_windows: int = option(256, "fixed val windows of the final score (the table)")
    sample_tokens: int = option(300, "tokens of each model's sample")
    temperature: float = option(0.8, "sampling temperature of the samples")
    prompt: str = option("HAMLET.\n", "prompt every model continues in the samples")
    attention_prompt: str = option("To be, or not to be: that is the question.", "text of the attention heatmaps")

    def __post_init__(self):
        self.models = tuple(self.models)
        self.ngram_orders = tuple(self.ngram_orders)
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ConfigError(f"models={list(self.models)!r} is not allowed: choose one or more of {', '.join(MODELS)}"
                              + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"models={list(self.models)!r} names a model twice")
        check_choices(self)
        for name in ("n_layer", "rnn_layers", "n_head", "d_model", "block_size", "n_kv_head_gqa", "kv_lora_rank", "ffn_hidden",
                     "n_routed_experts", "batch_size", "mlp_context", "mlp_embed", "evals", "eval_windows",
                     "sample_tokens"):
            _checks.positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "seed"):
            _checks.non_negative_int(name, getattr(self, name))
        for name in ("vocab_size", "threads"):
            if getattr(self, name) is not None:
                _checks.positive_int(name, getattr(self, name))
        _checks.divisible("d_model", self.d_model, "n_head", self.n_head)
        _checks.divisible("n_head", self.n_head, "n_kv_head_gqa", self.n_kv_head_gqa)
        _checks.divisible("ffn_hidden", self.ffn_hidden, f"{MOE_SHARED + MOE_TOP_K} (shared + routed experts)",
                          MOE_SHARED + MOE_TOP_K)
        if self.head_dim % 4:
            raise ConfigError(f"d_model // n_head = {self.head_dim} is not allowed: expected a multiple of 4 "
                              "(MLA's rope part is half a head and must be even)")
        if self.n_routed_experts < MOE_TOP_K:
            raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not allowed: top-{MOE_TOP_K} routing "
                              f"needs at least {MOE_TOP_K}")
        if not self.ngram_orders:
            raise ConfigError("ngram_orders=() is not allowed: expected at least one order")
        for n in self.ngram_orders:
            _checks.positive_int("ngram_orders", n)
        _checks.positive("lr", self.lr)
        _checks.positive("mlp_lr", self.mlp_lr)
        _checks.positive("rnn_lr", self.rnn_lr)
        _checks.non_negative("temperature", self.temperature)
        parse_budget(self.budget)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


PRESETS = {
    "default": {},
    "full": {"budget": "5Mtok", "n_layer": 6, "n_head": 6, "d_model": 192, "block_size": 256, "batch_size": 32,
             "kv_lora_rank": 96, "ffn_hidden": 576, "lr": 1e-3, "warmup_steps": 100, "ngram_orders": (3, 4, 5, 6, 7),
             "eval_windows": 512},
}


def parse_budget(text: str) -> tuple[str, float]:
    """("time", seconds) or ("tokens", count) from a budget string (see BUDGET_HELP)."""
    match = _BUDGET.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"budget={text!r} is not allowed: expected {BUDGET_HELP}")
    value, unit = float(match.group(1)), match.group(2).lower()
    if unit in ("s", "m", "h"):
        return "time", value * {"s": 1, "m": 60, "h": 3600}[unit]
    return "tokens", value * {"tok": 1, "ktok": 1e3, "mtok": 1e6}[unit]


def gpt_config(cfg: CompareConfig, name: str, vocab_size: int) -> dict:
    """The GPTConfig fields of one family member: the same width, depth, block, RoPE, RMSNorm and
    SwiGLU for all; MoE layers activate MOE_SHARED shared + MOE_TOP_K routed experts of
    ffn_hidden / (MOE_SHARED + MOE_TOP_K) each, so active FFN parameters equal the dense FFN's."""
    attention, ffn = GPT_MODELS[name]
    model = {"vocab_size": vocab_size, "block_size": cfg.block_size, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
             "d_model": cfg.d_model, "attention": attention, "positions": "rope", "norm": "rmsnorm",
             "activation": "swiglu", "ffn_hidden": cfg.ffn_hidden, "ffn": ffn, "dropout": 0.0}
    if attention == "gqa":
        model["n_kv_head"] = cfg.n_kv_head_gqa
    if attention == "mla":
        model.update(mla_dims(cfg.head_dim, kv_lora_rank=cfg.kv_lora_rank))
    if ffn == "moe":
        model.update(n_routed_experts=cfg.n_routed_experts, n_activated_experts=MOE_TOP_K, n_shared_experts=MOE_SHARED,
                     expert_hidden=cfg.ffn_hidden // (MOE_SHARED + MOE_TOP_K), score_func="sigmoid",
                     bias_update_speed=1e-3, aux_loss_coef=1e-3)
    return model


def model_fields(cfg: CompareConfig, name: str, vocab_size: int) -> dict:
    """The config fields (with model_type) the trainer builds model ``name`` from."""
    if name == "mlp":
        return {"model_type": "mlp", **dataclasses.asdict(MLPConfig(vocab_size, context=cfg.mlp_context,
                                                                    d_embed=cfg.mlp_embed, hidden=4 * cfg.d_model))}
    if name in RNN_MODELS:
        return {"model_type": "rnn", **dataclasses.asdict(RNNConfig(vocab_size, cell=name, n_layer=cfg.rnn_layers,
                                                                    d_model=cfg.d_model, block_size=cfg.block_size))}
    return {"model_type": "gpt", **gpt_config(cfg, name, vocab_size)}


def architecture(cfg: CompareConfig, name: str) -> str:
    """One line saying what model ``name`` is, for its result.json and the report."""
    if name == "ngram":
        return f"interpolated Kneser-Ney, the best of n = {', '.join(map(str, cfg.ngram_orders))}"
    if name == "mlp":
        return f"context {cfg.mlp_context}, embedding {cfg.mlp_embed}, tanh hidden {4 * cfg.d_model}"
    if name in RNN_MODELS:
        return f"{cfg.rnn_layers} layers of torch.nn.{name.upper()}, width {cfg.d_model}, linear head"
    attention, ffn = GPT_MODELS[name]
    parts = [f"{cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, RoPE, RMSNorm"]
    parts.append({"mha": "MHA", "gqa": f"GQA with {cfg.n_kv_head_gqa} K/V heads", "mqa": "MQA (1 K/V head)",
                  "mla": f"MLA, latent {cfg.kv_lora_rank}"}[attention])
    if ffn == "moe":
        parts.append(f"MoE: {cfg.n_routed_experts} routed experts (top-{MOE_TOP_K}, sigmoid router, loss-free "
                     f"balancing) + {MOE_SHARED} shared, each {cfg.ffn_hidden // (MOE_SHARED + MOE_TOP_K)} wide")
    else:
        parts.append(f"SwiGLU FFN {cfg.ffn_hidden}")
    return "; ".join(parts)


@torch.no_grad()
def position_nll(model, windows: torch.Tensor, batch: int = 32) -> np.ndarray:
    """Cross-entropy (nats) of predicting windows[:, 1:] from the tokens before, window by window,
    summed over the windows at each position 0..T-1 of the context: float64 (T,)."""
    if hasattr(model, "token_probs"):  # the n-gram: exact probabilities, history cut at the window start
        return sum(-np.log(model.token_probs(w.numpy())[1:]) for w in windows)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = np.zeros(windows.size(1) - 1)
    for chunk in windows.split(batch):
        chunk = chunk.to(device)
        logits, _ = model(chunk[:, :-1])  # (b, T, V)
        nll = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none")  # (b, T)
        total += nll.sum(0).double().cpu().numpy()
    model.train(was_training)
    return total


def window_nll(model, windows: torch.Tensor) -> float:
    """Summed cross-entropy (nats) of predicting windows[:, 1:] from the tokens before, window by window."""
    return float(position_nll(model, windows).sum())


def score(model, windows: torch.Tensor, tokenizer) -> dict:
    """Val loss (nats per token), perplexity, bits per character and the mean loss at each position
    of the context on the fixed windows."""
    by_position = position_nll(model, windows)
    nll = float(by_position.sum())
    tokens = windows[:, 1:].numel()
    chars = sum(len(tokenizer.decode(w[1:].tolist())) for w in windows)
    loss = nll / tokens
    finite = math.isfinite(loss)
    return {"val_loss": loss if finite else None, "perplexity": math.exp(loss) if finite and loss < 700 else None,
            "bits_per_char": nll / chars / math.log(2) if finite else None, "eval_tokens": tokens, "eval_chars": chars,
            "loss_by_position": (by_position / len(windows)).tolist() if finite else None}


class Diverged(Exception):
    """A training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"non-finite train loss ({loss}) at step {step}")
        self.step, self.loss = step, loss


@dataclass
class _Clock:
    """ETA bookkeeping for the whole comparison."""

    planned: dict = field(default_factory=dict)  # model -> estimated seconds of training
    overheads: list = field(default_factory=list)  # measured seconds per model outside training

    def eta(self, remaining: list[str], current_left: float) -> float:
        overhead = statistics.mean(self.overheads) if self.overheads else 5.0
        return current_left + sum(self.planned.get(m, 15.0) + overhead for m in remaining) + 5.0


def _step_seconds(fields: dict, cfg: CompareConfig, precision: devices.Precision, device: torch.device) -> float:
    """Wall time of one of the trainer's steps after a warm-up step, on random tokens: for the ETA
    and for turning a time budget into a step count."""
    fields = dict(fields)
    cls = model_class(fields.pop("model_type"))
    torch.manual_seed(cfg.seed)
    model = cls.from_config(cls.config_class(**fields)).to(device)
    batches = random_batches(fields["vocab_size"], batch_size=cfg.batch_size, block_size=cfg.block_size)
    trainer = Trainer(model, TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr), batches, device=device,
                      precision=precision)
    return median_seconds(trainer.train_step, warmup=1, repeats=1, device=device)


def _plan(cfg: CompareConfig, fields: dict[str, dict], precision, device) -> dict:
    """Steps, decay length and eval interval per neural model. A time budget is turned into an
    estimated step count (from a measured step) so the LR schedule can decay within it."""
    kind, amount = parse_budget(cfg.budget)
    tokens_per_step = cfg.batch_size * cfg.block_size
    plans = {}
    for name, model in fields.items():
        step_s = _step_seconds(model, cfg, precision, device)
        if kind == "tokens":
            steps = int(amount // tokens_per_step)
            if steps < 1:
                raise ConfigError(f"budget={cfg.budget!r} is too small to run one eval: one training step takes "
                                  f"batch_size × block_size = {tokens_per_step} tokens")
            plans[name] = {"max_steps": steps, "decay_steps": steps, "max_time": None, "step_s": step_s,
                           "seconds": steps * step_s}
        else:
            steps = int(0.9 * amount / step_s)  # leave room for the periodic evals
            if steps < 1:
                raise ConfigError(f"budget={cfg.budget!r} is too small to run one eval: one training step of "
                                  f"{name} takes {step_s:.2f} s here")
            plans[name] = {"max_steps": 10**9, "decay_steps": steps, "max_time": amount, "step_s": step_s,
                           "seconds": amount}  # the clock stops it; after decay_steps the LR stays at its minimum
        steps = plans[name]["decay_steps"]  # an eval costs ~1.3 steps: at most one per 10 steps
        plans[name]["eval_interval"] = max(steps // cfg.evals, min(steps, 10))
    return plans


def _peak_lr(cfg: CompareConfig, name: str) -> float:
    return cfg.mlp_lr if name == "mlp" else cfg.rnn_lr if name in RNN_MODELS else cfg.lr


def _train_config(cfg: CompareConfig, name: str, plan: dict, threads: int) -> dict:
    return {"batch_size": cfg.batch_size, "block_size": cfg.block_size, "max_steps": plan["max_steps"],
            "decay_steps": plan["decay_steps"], "max_time": plan["max_time"], "lr": _peak_lr(cfg, name),
            "warmup_steps": min(cfg.warmup_steps, plan["decay_steps"] // 5), "dtype": cfg.dtype,
            "eval_interval": plan["eval_interval"], "eval_iters": 4, "log_interval": max(1, plan["eval_interval"] // 4),
            "ckpt_interval": plan["max_steps"], "seed": cfg.seed, "threads": threads, "device": "auto",
            "attention_kernel": cfg.attention_kernel}


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out)!r} exists and is not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out={str(out)!r} already exists and is not empty: pass --overwrite to replace its "
                          "comparison, or choose another --out")


def _clear(out: Path) -> None:
    """Remove what an earlier comparison wrote into ``out`` (its model folders, data and report)."""
    for name in (*MODELS, DATA):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in (RUN_INFO, *REPORT_FILES):
        (out / name).unlink(missing_ok=True)


@dataclass
class _Setup:
    """What every model of a comparison shares, decided and checked before anything is written."""

    threads: int
    threads_reason: str
    precision: devices.Precision
    text_chars: int
    tokenizer: object
    prompts: dict
    train_ids: np.ndarray
    val_ids: np.ndarray
    windows: torch.Tensor
    fields: dict
    plans: dict


def _prepare(cfg: CompareConfig) -> _Setup:
    threads, threads_reason = devices.choose_threads(cfg.threads)
    torch.set_num_threads(threads)
    device = devices.resolve_device("auto")
    precision = devices.choose_precision(cfg.dtype, device)
    text = load_corpus(cfg.corpus)
    tokenizer = train_tokenizer(cfg.tokenizer, text, cfg.vocab_size)
    prompts = {"prompt": tokenizer.encode(cfg.prompt), "attention_prompt": tokenizer.encode(cfg.attention_prompt)}
    for name, ids in prompts.items():
        if not ids:
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is empty: expected some text to start from")
    train_ids, val_ids = split_tokens(encode(tokenizer, text))
    if len(train_ids) <= cfg.block_size:
        raise ConfigError(f"the train split has {len(train_ids)} tokens, too few for windows of block_size={cfg.block_size}: "
                          "use a smaller block_size or a larger corpus")
    windows = spread_windows(val_ids, cfg.eval_windows, cfg.block_size + 1)
    fields = {name: model_fields(cfg, name, tokenizer.vocab_size) for name in cfg.models if name != "ngram"}
    return _Setup(threads, threads_reason, precision, len(text), tokenizer, prompts, train_ids, val_ids, windows, fields,
                  _plan(cfg, fields, precision, device))


def compare(out_dir, config: CompareConfig | dict | None = None, *, overwrite: bool = False,
            command: str | None = None, progress: Callable[[dict], None] | None = None) -> dict:
    """Train and score every model of ``config`` into ``out_dir``, then write report.md/.html.

    Returns {"out_dir", "report", "results", "interrupted", "wall_s"}. Ctrl-C stops the model in
    training and still writes the report of what finished. ``progress`` gets dicts with an
    "event" ("prepare" | "plan" | "model" | "step" | "done" | "report") and "eta_s" for the whole
    run (None while preparing, before any step has been timed). Everything is checked before the
    first file is written.
    """
    cfg = config if isinstance(config, CompareConfig) else CompareConfig(**(config or {}))
    out = Path(out_dir)
    _check_out(out, overwrite)
    emit = progress or (lambda event: None)
    started = time.monotonic()
    emit({"event": "prepare", "eta_s": None})
    setup = _prepare(cfg)
    clock = _Clock({m: p["seconds"] for m, p in setup.plans.items()})

    out.mkdir(parents=True, exist_ok=True)  # every check has passed: now write
    _clear(out)
    dataset = write_dataset(out / DATA, setup.train_ids, setup.val_ids, setup.tokenizer)
    write_json(out / RUN_INFO, {
        "command": command, "config": dataclasses.asdict(cfg), "budget": dict(zip(("kind", "amount"), parse_budget(cfg.budget))),
        "machine": devices.machine_facts(setup.precision), "threads_reason": setup.threads_reason,
        "precision": setup.precision.dtype, "corpus_chars": setup.text_chars, "vocab_size": setup.tokenizer.vocab_size,
        "train_tokens": int(len(setup.train_ids)), "val_tokens": int(len(setup.val_ids)),
        "eval_windows": int(setup.windows.shape[0]), "eval_window_tokens": int(setup.windows.shape[1] - 1),
        "plans": setup.plans, "python": sys.version.split()[0],
    })
    emit({"event": "plan", "models": list(cfg.models), "eta_s": clock.eta(list(cfg.models), 0.0)})
    results, interrupted = {}, False
    for index, name in enumerate(cfg.models):
        remaining = list(cfg.models[index + 1:])
        emit({"event": "model", "model": name, "index": index, "total": len(cfg.models),
              "eta_s": clock.eta(remaining, clock.planned.get(name, 0.0))})
        results[name] = result = _run_model(cfg, name, setup, dataset, out / name, emit, clock, remaining)
        emit({"event": "done", "model": name, "status": result["status"], "val_loss": result.get("val_loss"),
              "eta_s": clock.eta(remaining, 0.0)})
        if result["status"] == "interrupted":
            interrupted = True
            break

    emit({"event": "report", "eta_s": 5.0})
    best = _best_attention_model(results)
    if best is not None:
        _record_heatmap(out, best, setup.prompts["attention_prompt"], setup.tokenizer)
    wall = time.monotonic() - started
    info = json.loads((out / RUN_INFO).read_text())
    info.update(wall_s=wall, interrupted=interrupted, attention_model=best)
    write_json(out / RUN_INFO, info)
    report = write_report(out)
    return {"out_dir": str(out), "report": str(report), "results": results, "interrupted": interrupted, "wall_s": wall}


def _run_model(cfg: CompareConfig, name: str, setup: _Setup, dataset, run: Path, emit, clock: _Clock,
               remaining: list[str]) -> dict:
    """Fit or train one model into ``run``, score and measure it; its result.json (also on failure)."""
    run.mkdir()
    begin = time.monotonic()
    result = {"model": name, "label": LABELS[name], "architecture": architecture(cfg, name), "status": "ok"}
    try:
        if name == "ngram":
            result.update(_fit_ngram(cfg, setup.train_ids, setup.windows, setup.tokenizer, run))
        else:
            plan = setup.plans[name]
            summary = train(run, model=setup.fields[name], config=_train_config(cfg, name, plan, setup.threads),
                            dataset=dataset, overwrite=True, progress=_step_reporter(name, emit, clock, remaining, plan),
                            clock="train")
            result.update(attention_kernel=summary["attention_kernel"])
            result.update(_measure_neural(cfg, name, run, setup.windows, setup.tokenizer, setup.prompts["prompt"]))
    except Diverged as err:
        result.update(status="diverged", note=str(err))
    except KeyboardInterrupt:
        result.update(status="interrupted", note="stopped by Ctrl-C before it finished")
    if result["status"] == "ok" and result.get("val_loss") is None:
        result.update(status="diverged", note="non-finite val loss on the eval windows")
    result["wall_s"] = time.monotonic() - begin
    if name != "ngram" and result["status"] == "ok":
        clock.overheads.append(max(0.0, result["wall_s"] - setup.plans[name]["seconds"]))
    write_json(run / RESULT, result)
    return result


def _step_reporter(name, emit, clock: _Clock, remaining: list[str], plan: dict):
    """The trainer's progress callback: forward steps to ``emit`` and stop a diverging run."""
    begin = time.monotonic()

    def on_step(event: dict) -> None:
        if event["event"] not in ("step", "eval"):
            return
        loss = event["train_loss"]
        if not math.isfinite(loss):
            raise Diverged(event["step"], loss)
        spent = time.monotonic() - begin
        if plan["max_time"] is not None:
            left = max(0.0, plan["max_time"] - spent)
        else:
            left = (plan["max_steps"] - event["step"]) * spent / max(1, event["step"])
        emit({"event": "step", "model": name, "step": event["step"], "max_steps": plan["decay_steps"],
              "train_loss": loss, "val_loss": event.get("val_loss"), "tokens_per_s": event.get("tokens_per_s"),
              "eta_s": clock.eta(remaining, left)})

    return on_step


def _fit_ngram(cfg: CompareConfig, train_ids, windows: torch.Tensor, tokenizer, run: Path) -> dict:
    """Fit each order in ngram_orders, keep the best on the eval windows, save it; returns its numbers."""
    ids = np.asarray(train_ids, dtype=np.int64)
    tried, best = {}, None
    for n in cfg.ngram_orders:
        begin = time.monotonic()
        model = NGramLM(tokenizer.vocab_size, n).fit(ids)
        fit_s = time.monotonic() - begin
        loss = window_nll(model, windows) / windows[:, 1:].numel()
        tried[n] = {"val_loss": loss, "fit_s": fit_s}
        if best is None or loss < tried[best.n]["val_loss"]:
            best = model
    best.save_pretrained(run, tokenizer)
    prompt = tokenizer.encode(cfg.prompt)
    samples = []
    decode_s = time_call(lambda: samples.append(best.generate(prompt, cfg.sample_tokens, seed=cfg.seed,
                                                                temperature=cfg.temperature)))
    sample = samples[0]
    entries = sum(int(k.numel()) for name, k in best.state_tensors().items() if name.endswith(".keys"))
    return {"n": best.n, "orders_tried": tried, "params_total": entries, "params_active": entries,
            "params_note": "stored n-gram counts", "train_s": tried[best.n]["fit_s"], "tokens": int(len(ids)),
            "decode_tokens_per_s": cfg.sample_tokens / decode_s, "sample": tokenizer.decode(sample),
            **score(best, windows, tokenizer)}


def _measure_neural(cfg: CompareConfig, name: str, run: Path, windows: torch.Tensor, tokenizer, prompt: list[int]) -> dict:
    """Score the saved model on the eval windows, time cached decoding, measure its KV cache, sample."""
    device = devices.resolve_device("auto")
    model = load_pretrained(run, map_location=device)
    total, active = count_params(model)
    result = {"params_total": total, "params_active": active, **score(model, windows, tokenizer)}
    rows = read_jsonl(run / METRICS)
    if rows:
        result.update(steps=rows[-1]["step"], tokens=rows[-1]["tokens"])
    if name != "mlp":
        for block in getattr(model, "blocks", ()):  # MLA decodes from its latent cache (the point of MLA)
            if hasattr(block.attn, "mode"):
                block.attn.mode = "absorbed"
        caches = model.new_caches(1, cfg.block_size)
        with torch.no_grad():
            model(windows[:1, :cfg.block_size].to(device), caches=caches)
        result["kv_dtype"] = str(caches[0].dtype).split(".")[-1]
        if isinstance(caches[0], RecurrentState):  # an RNN's state: the same bytes at every context length
            result["state_bytes"] = sum(c.bytes() for c in caches)
        else:
            result.update(kv_bytes_per_token=sum(c.bytes_per_token() for c in caches),
                          kv_bytes_full_context=sum(c.bytes() for c in caches))
    idx = torch.tensor([prompt[-1:]], dtype=torch.int64, device=device)
    n_decode = cfg.block_size - 1
    seconds = time_call(lambda: list(stream_tokens(model, idx, n_decode, temperature=0, use_cache=name != "mlp")), device)
    result["decode_tokens_per_s"] = n_decode / seconds
    sample = stream_tokens(model, torch.tensor([prompt], dtype=torch.int64, device=device), cfg.sample_tokens,
                           temperature=cfg.temperature, seed=cfg.seed, use_cache=name != "mlp")
    result["sample"] = tokenizer.decode(prompt + [int(t[0]) for t in sample])
    return result


def _best_attention_model(results: dict) -> str | None:
    scored = [(r["val_loss"], m) for m, r in results.items() if m in GPT_MODELS and r["status"] == "ok"]
    return min(scored)[1] if scored else None


def _record_heatmap(out: Path, name: str, prompt: list[int], tokenizer) -> None:
    """Per-head attention of the last layer of ``name`` on the attention prompt, as attention.png."""
    model = load_pretrained(out / name)
    ids = prompt[-model.config.block_size:]
    with record_attention(model) as rec, torch.no_grad():
        model(torch.tensor([ids], dtype=torch.int64))
    layer = len(rec.weights) - 1
    tokens = [tokenizer.decode([i]) for i in ids]
    fig = plot_grid(tokens, [rec.weights[layer]], first_layer=layer,
                    title=f"{LABELS[name]}: layer {layer}, every head (rows attend → columns)")
    fig.savefig(out / ATTENTION_PNG, dpi=110, metadata={"Software": None})
