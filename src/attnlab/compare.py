"""``attnlab compare``: train the whole model family on one corpus under one equal budget and
measure each model the same way, so the report's numbers are comparable.

Every neural model gets the same data, tokenizer, width, depth, batches, seed and budget
(wall time or tokens per model); GPTs go through the trainer (:mod:`attnlab.train`). All models
are scored on the same fixed val windows: mean cross-entropy of every position of each window,
each window read on its own (the n-gram too sees only earlier tokens of the same window).
Each model's folder holds the trainer's files plus ``result.json``; :mod:`attnlab.compare_report`
turns the folder into report.md / report.html. Progress goes to a callback; nothing here prints.
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
from attnlab.data.corpus import atomic_output
from attnlab.errors import ConfigError

MODELS = ("ngram", "mlp", "mha", "gqa", "mqa", "mla", "mha-moe", "mla-moe")
GPT_MODELS = {  # name -> (attention, ffn)
    "mha": ("mha", "dense"), "gqa": ("gqa", "dense"), "mqa": ("mqa", "dense"), "mla": ("mla", "dense"),
    "mha-moe": ("mha", "moe"), "mla-moe": ("mla", "moe"),
}
LABELS = {
    "ngram": "n-gram (Kneser-Ney)", "mlp": "MLP n-gram", "mha": "GPT · MHA", "gqa": "GPT · GQA", "mqa": "GPT · MQA",
    "mla": "GPT · MLA", "mha-moe": "GPT · MHA + MoE", "mla-moe": "GPT · MLA + MoE",
}
RESULT = "result.json"
RUN_INFO = "compare.json"
BUDGET_HELP = "'40s', '2m', '1h' (wall time per model) or '500ktok', '2Mtok' (tokens per model)"
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|tok|ktok|mtok)\s*$", re.IGNORECASE)


@dataclass
class CompareConfig:
    """One comparison: which models, the budget, the data, and the settings they all share."""

    models: tuple[str, ...] = MODELS
    budget: str = "35s"  # see BUDGET_HELP
    corpus: str = "shakespeare"
    tokenizer: str = "char"  # char | bpe
    vocab_size: int | None = None  # bpe only
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    block_size: int = 128
    n_kv_head_gqa: int = 2  # K/V heads of the GQA model
    kv_lora_rank: int = 64  # MLA latent; the MLA head dims are d_model // n_head (nope, v) and half that (rope)
    ffn_hidden: int = 384  # dense SwiGLU hidden = (1 shared + 2 routed) MoE experts of ffn_hidden // 3
    n_routed_experts: int = 8
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    dtype: str = "bfloat16"  # float32 | bfloat16 (autocast) for training
    seed: int = 1337
    threads: int | None = 1  # torch CPU threads (None: torch's default); these small models gain little from a
    # second thread, and on a busy machine two threads made a training step ~4x slower (0.58 s vs 0.14 s)
    ngram_orders: tuple[int, ...] = (3, 4, 5, 6)
    mlp_context: int = 8
    mlp_embed: int = 32
    evals: int = 10  # periodic val estimates per model (the curves)
    eval_windows: int = 256  # fixed val windows for the final score (the table)
    sample_tokens: int = 300
    temperature: float = 0.8
    prompt: str = "HAMLET.\n"
    attention_prompt: str = "To be, or not to be: that is the question."

    def __post_init__(self):
        self.models = tuple(self.models)
        self.ngram_orders = tuple(self.ngram_orders)
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ConfigError(f"models={list(self.models)!r} is not allowed: choose one or more of {', '.join(MODELS)}"
                              + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"models={list(self.models)!r} names a model twice")
        _checks.one_of("tokenizer", self.tokenizer, ("char", "bpe"))
        _checks.one_of("dtype", self.dtype, ("float32", "bfloat16"))
        for name in ("n_layer", "n_head", "d_model", "block_size", "n_kv_head_gqa", "kv_lora_rank", "ffn_hidden",
                     "n_routed_experts", "batch_size", "seed", "mlp_context", "mlp_embed", "evals", "eval_windows",
                     "sample_tokens"):
            _checks.positive_int(name, getattr(self, name))
        _checks.non_negative_int("warmup_steps", self.warmup_steps)
        _checks.divisible("d_model", self.d_model, "n_head", self.n_head)
        _checks.divisible("n_head", self.n_head, "n_kv_head_gqa", self.n_kv_head_gqa)
        _checks.divisible("ffn_hidden", self.ffn_hidden, "3 (one shared + two routed experts)", 3)
        if self.head_dim % 4:
            raise ConfigError(f"d_model // n_head = {self.head_dim} is not allowed: expected a multiple of 4 "
                              "(MLA's rope part is half a head and must be even)")
        if self.n_routed_experts < 2:
            raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not allowed: top-2 routing needs at least 2")
        if not self.ngram_orders or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.ngram_orders):
            raise ConfigError(f"ngram_orders={list(self.ngram_orders)!r} is not allowed: expected positive integers")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r} is not allowed: expected a positive number")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature!r} is not allowed: expected a number >= 0")
        if self.threads is not None:
            _checks.positive_int("threads", self.threads)
        parse_budget(self.budget)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


PRESETS = {
    "default": {},
    "full": {"budget": "5m", "n_layer": 6, "n_head": 6, "d_model": 192, "block_size": 256, "batch_size": 32,
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
    SwiGLU for all; MoE layers activate one shared + two routed experts of a third of the dense
    FFN's hidden size each, so active FFN parameters equal the dense FFN's."""
    attention, ffn = GPT_MODELS[name]
    hd = cfg.head_dim
    model = {"vocab_size": vocab_size, "block_size": cfg.block_size, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
             "d_model": cfg.d_model, "attention": attention, "positions": "rope", "norm": "rmsnorm",
             "activation": "swiglu", "ffn_hidden": cfg.ffn_hidden, "ffn": ffn, "dropout": 0.0}
    if attention == "gqa":
        model["n_kv_head"] = cfg.n_kv_head_gqa
    if attention == "mla":
        model.update(kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=hd, qk_rope_head_dim=hd // 2, v_head_dim=hd)
    if ffn == "moe":  # DeepSeek-V3 style: sigmoid router, loss-free bias balancing plus a small aux loss
        model.update(n_routed_experts=cfg.n_routed_experts, n_activated_experts=2, n_shared_experts=1,
                     moe_hidden=cfg.ffn_hidden // 3, score_func="sigmoid", bias_update_speed=1e-3,
                     aux_loss_coef=1e-3)
    return model


def count_params(model) -> tuple[int, int]:
    """(total, active per token) parameters; an MoE layer's active share is its top-k routed experts."""
    from attnlab.moe import MoE

    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, MoE):
            per_expert = sum(w[0].numel() for w in (module.experts.w1, module.experts.w2, module.experts.w3))
            inactive += (module.n_routed_experts - module.n_activated_experts) * per_expert
    return total, total - inactive


def eval_windows(val: np.ndarray, count: int, length: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens spread evenly over the val split, (count, length) int64."""
    if len(val) < length:
        raise ConfigError(f"the val split has {len(val)} tokens, too few for one eval window of {length} "
                          "(block_size + 1): use a smaller block_size or a larger corpus")
    starts = np.unique(np.linspace(0, len(val) - length, num=count).astype(np.int64))
    return torch.from_numpy(np.stack([np.asarray(val[s:s + length], dtype=np.int64) for s in starts]))


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch: int = 32) -> float:
    """Summed cross-entropy (nats) of predicting windows[:, 1:] from the tokens before, window by window."""
    if hasattr(model, "token_probs"):  # the n-gram: exact probabilities, history cut at the window start
        return float(sum(-np.log(model.token_probs(w.numpy())[1:]).sum() for w in windows))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for chunk in windows.split(batch):
        chunk = chunk.to(device)
        logits, _ = model(chunk[:, :-1])  # (b, T, V)
        total += float(F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
    model.train(was_training)
    return total


def score(model, windows: torch.Tensor, tokenizer) -> dict:
    """Val loss (nats per token), perplexity and bits per character on the fixed windows."""
    nll = window_nll(model, windows)
    tokens = windows[:, 1:].numel()
    chars = sum(len(tokenizer.decode(w[1:].tolist())) for w in windows)
    loss = nll / tokens
    finite = math.isfinite(loss)
    return {"val_loss": loss if finite else None, "perplexity": math.exp(loss) if finite and loss < 700 else None,
            "bits_per_char": nll / chars / math.log(2) if finite else None, "eval_tokens": tokens, "eval_chars": chars}


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


def _step_seconds(model, cfg: CompareConfig, vocab_size: int, generator: torch.Generator) -> float:
    """Median wall time of one training step (forward, backward, AdamW) after a warm-up step."""
    from attnlab.train import TrainConfig, make_optimizer

    device = _device()
    model.to(device)
    opt = make_optimizer(model, TrainConfig(lr=cfg.lr))
    x = torch.randint(vocab_size, (cfg.batch_size, cfg.block_size), generator=generator).to(device)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _device() -> torch.device:
    """Where the trainer puts models (its device="auto")."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _build(name: str, cfg: CompareConfig, vocab_size: int):
    from attnlab.models.gpt import GPT, GPTConfig
    from attnlab.models.mlp import MLPLM

    torch.manual_seed(cfg.seed)
    if name == "mlp":
        return MLPLM(vocab_size, context=cfg.mlp_context, d_embed=cfg.mlp_embed, hidden=4 * cfg.d_model)
    return GPT(GPTConfig(**gpt_config(cfg, name, vocab_size)))


def _plan(cfg: CompareConfig, names: list[str], vocab_size: int) -> dict:
    """Steps, decay length and eval interval per neural model. A time budget is turned into an
    estimated step count (from a measured step) so the LR schedule can decay within it."""
    kind, amount = parse_budget(cfg.budget)
    tokens_per_step = cfg.batch_size * cfg.block_size
    generator = torch.Generator().manual_seed(cfg.seed)
    plans = {}
    for name in names:
        step_s = _step_seconds(_build(name, cfg, vocab_size), cfg, vocab_size, generator)
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


def _train_config(cfg: CompareConfig, plan: dict, corpus: str) -> dict:
    return {"corpus": corpus, "tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size, "batch_size": cfg.batch_size,
            "max_steps": plan["max_steps"], "decay_steps": plan["decay_steps"], "max_time": plan["max_time"], "lr": cfg.lr,
            "warmup_steps": min(cfg.warmup_steps, plan["decay_steps"] // 5), "dtype": cfg.dtype,
            "eval_interval": plan["eval_interval"], "eval_iters": 4, "log_interval": max(1, plan["eval_interval"] // 4),
            "ckpt_interval": plan["max_steps"],
            "seed": cfg.seed, "threads": cfg.threads, "device": "auto"}


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out)!r} exists and is not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out={str(out)!r} already exists and is not empty: pass --overwrite to replace its "
                          "comparison, or choose another --out")


def _clear(out: Path) -> None:
    """Remove what an earlier comparison wrote into ``out`` (its model folders, data and report)."""
    from attnlab.compare_report import REPORT_FILES

    for name in (*MODELS, "data"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in (RUN_INFO, *REPORT_FILES):
        (out / name).unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def compare(out_dir, config: CompareConfig | dict | None = None, *, overwrite: bool = False,
            command: str | None = None, progress: Callable[[dict], None] | None = None) -> dict:
    """Train and score every model of ``config`` into ``out_dir``, then write report.md/.html.

    Returns {"out_dir", "report", "results", "interrupted", "wall_s"}. Ctrl-C stops the model in
    training and still writes the report of what finished. ``progress`` gets dicts with an
    "event" ("prepare" | "plan" | "model" | "step" | "done" | "report") and "eta_s" for the whole
    run (None while preparing, before any step has been timed).
    """
    from attnlab.bench.common import machine_info
    from attnlab.compare_report import write_report
    from attnlab.data.corpus import load_corpus, prepare_dataset
    from attnlab.data.tokenizer import train_tokenizer

    cfg = config if isinstance(config, CompareConfig) else CompareConfig(**(config or {}))
    out = Path(out_dir)
    _check_out(out, overwrite)
    emit = progress or (lambda event: None)
    started = time.monotonic()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    emit({"event": "prepare", "eta_s": None})
    text = load_corpus(cfg.corpus)
    tokenizer = train_tokenizer(cfg.tokenizer, text, cfg.vocab_size)
    prompts = {"prompt": tokenizer.encode(cfg.prompt), "attention_prompt": tokenizer.encode(cfg.attention_prompt)}
    for name, ids in prompts.items():
        if not ids:
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is empty: expected some text to start from")
    neural = [m for m in cfg.models if m != "ngram"]
    plans = _plan(cfg, neural, tokenizer.vocab_size)
    clock = _Clock({m: p["seconds"] for m, p in plans.items()})
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    dataset = prepare_dataset(text, tokenizer, out / "data")
    corpus = str(Path(cfg.corpus).resolve()) if cfg.corpus != "shakespeare" else cfg.corpus
    train_ids, val_ids = dataset.tokens("train"), dataset.tokens("val")
    if len(train_ids) <= cfg.block_size:
        raise ConfigError(f"the train split has {len(train_ids)} tokens, too few for windows of block_size={cfg.block_size}: "
                          "use a smaller block_size or a larger corpus")
    windows = eval_windows(val_ids, cfg.eval_windows, cfg.block_size + 1)
    _write_json(out / RUN_INFO, {
        "command": command, "config": dataclasses.asdict(cfg), "budget": dict(zip(("kind", "amount"), parse_budget(cfg.budget))),
        "machine": machine_info(), "precision": cfg.dtype, "corpus_chars": len(text), "vocab_size": tokenizer.vocab_size,
        "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)), "eval_windows": int(windows.shape[0]),
        "eval_window_tokens": int(windows.shape[1] - 1), "plans": plans, "python": sys.version.split()[0],
    })
    emit({"event": "plan", "models": list(cfg.models), "eta_s": clock.eta(list(cfg.models), 0.0)})

    results, interrupted = {}, False
    for index, name in enumerate(cfg.models):
        remaining = list(cfg.models[index + 1:])
        run = out / name
        run.mkdir()
        emit({"event": "model", "model": name, "index": index, "total": len(cfg.models),
              "eta_s": clock.eta(remaining, clock.planned.get(name, 0.0))})
        begin = time.monotonic()
        result = {"model": name, "label": LABELS[name], "status": "ok"}
        try:
            if name == "ngram":
                result.update(_fit_ngram(cfg, train_ids, windows, tokenizer, run))
            else:
                on_step = _step_reporter(name, emit, clock, remaining, plans[name])
                if name == "mlp":
                    _train_mlp(cfg, plans[name], train_ids, val_ids, tokenizer, run, on_step)
                else:
                    _train_gpt(cfg, plans[name], name, corpus, tokenizer.vocab_size, run, on_step)
                result.update(_measure_neural(cfg, name, run, windows, tokenizer, prompts["prompt"]))
        except Diverged as err:
            result.update(status="diverged", note=str(err))
        except KeyboardInterrupt:
            result.update(status="interrupted", note="stopped by Ctrl-C before it finished")
            interrupted = True
        if result["status"] == "ok" and result.get("val_loss") is None:
            result.update(status="diverged", note="non-finite val loss on the eval windows")
        result["wall_s"] = time.monotonic() - begin
        if name != "ngram" and result["status"] == "ok":
            clock.overheads.append(max(0.0, result["wall_s"] - plans[name]["seconds"]))
        _write_json(run / RESULT, result)
        results[name] = result
        emit({"event": "done", "model": name, "status": result["status"], "val_loss": result.get("val_loss"),
              "eta_s": clock.eta(remaining, 0.0)})
        if interrupted:
            break

    emit({"event": "report", "eta_s": 5.0})
    best = _best_attention_model(results)
    if best is not None:
        _record_heatmap(out, best, prompts["attention_prompt"], tokenizer)
    wall = time.monotonic() - started
    info = json.loads((out / RUN_INFO).read_text())
    info.update(wall_s=wall, interrupted=interrupted, attention_model=best)
    _write_json(out / RUN_INFO, info)
    report = write_report(out)
    return {"out_dir": str(out), "report": str(report), "results": results, "interrupted": interrupted, "wall_s": wall}


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


def _train_gpt(cfg: CompareConfig, plan: dict, name: str, corpus: str, vocab_size: int, run: Path, on_step) -> None:
    """Train one GPT with the trainer; a time budget counts from its first step."""
    from attnlab.train import train

    try:
        train(run, model=gpt_config(cfg, name, vocab_size), config=_train_config(cfg, plan, corpus), overwrite=True,
              progress=on_step, clock="train")
    finally:
        shutil.rmtree(run / "data", ignore_errors=True)  # the same split as <out>/data


def _train_mlp(cfg: CompareConfig, plan: dict, train_ids, val_ids, tokenizer, run: Path, on_step) -> None:
    """The neural n-gram on the same batches, optimiser, schedule and evals as the trainer gives
    GPTs (train.train builds GPTs only), writing the same metrics.jsonl fields."""
    from attnlab.train import METRICS, _autocast as train_autocast, TrainConfig, estimate_loss, make_optimizer, \
        make_scheduler, sample_windows

    tc = TrainConfig(**{k: v for k, v in _train_config(cfg, plan, "shakespeare").items() if k != "corpus"})
    device = _device()
    autocast, _ = train_autocast(tc, device)
    data = {"train": torch.from_numpy(np.asarray(train_ids, dtype=np.int64)),
            "val": torch.from_numpy(np.asarray(val_ids, dtype=np.int64))}
    model = _build("mlp", cfg, tokenizer.vocab_size).to(device)
    optimizer, start = make_optimizer(model, tc), time.monotonic()
    scheduler = make_scheduler(optimizer, tc)
    data_gen = torch.Generator().manual_seed(tc.seed + 1)
    step, tokens, loss_acc, loss_count = 0, 0, 0.0, 0
    last_time, last_tokens = start, 0
    while step < tc.max_steps:
        lr = scheduler.get_last_lr()[0]
        x, y = sample_windows(data["train"], tc.batch_size, cfg.block_size, data_gen)
        with autocast():
            _, loss = model(x.to(device), y.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step, tokens = step + 1, tokens + tc.batch_size * cfg.block_size
        loss_acc, loss_count = loss_acc + float(loss.detach()), loss_count + 1
        is_eval = step % tc.eval_interval == 0 or step == tc.max_steps
        out_of_time = plan["max_time"] is not None and time.monotonic() - start >= plan["max_time"]
        if step % tc.log_interval and not is_eval and not out_of_time:
            continue
        val_loss = None
        if is_eval:
            eval_gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)  # the trainer's eval windows
            val_loss = estimate_loss(model, data["val"], tc.eval_iters, tc.batch_size, cfg.block_size, eval_gen,
                                     autocast=autocast, device=device)
        now = time.monotonic()
        row = {"step": step, "elapsed_s": round(now - start, 3), "train_loss": loss_acc / loss_count,
               "val_loss": val_loss, "tokens_per_s": (tokens - last_tokens) / max(now - last_time, 1e-9), "lr": lr,
               "tokens": tokens}
        _append_metrics(run / METRICS, row)
        loss_acc, loss_count, last_time, last_tokens = 0.0, 0, now, tokens
        on_step({"event": "eval" if is_eval else "step", **row})
        if out_of_time:
            break
    model.save_pretrained(run, tokenizer)


def _fit_ngram(cfg: CompareConfig, train_ids, windows: torch.Tensor, tokenizer, run: Path) -> dict:
    """Fit each order in ngram_orders, keep the best on the eval windows, save it; returns its numbers."""
    from attnlab.models.ngram import NGramLM

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
    begin = time.perf_counter()
    sample = best.generate(prompt, cfg.sample_tokens, seed=cfg.seed, temperature=cfg.temperature)
    decode_s = time.perf_counter() - begin
    entries = sum(int(k.numel()) for name, k in best.state_tensors().items() if name.endswith(".keys"))
    return {"n": best.n, "orders_tried": tried, "params_total": entries, "params_active": entries,
            "params_note": "stored n-gram counts", "train_s": tried[best.n]["fit_s"], "tokens": int(len(ids)),
            "decode_tokens_per_s": cfg.sample_tokens / decode_s, "sample": tokenizer.decode(sample),
            **score(best, windows, tokenizer)}


def _measure_neural(cfg: CompareConfig, name: str, run: Path, windows: torch.Tensor, tokenizer, prompt: list[int]) -> dict:
    """Score the saved model on the eval windows, time cached decoding, measure its KV cache, sample."""
    from attnlab.generate import stream_tokens
    from attnlab.models.base import load_pretrained
    from attnlab.train import read_metrics

    device = _device()
    model = load_pretrained(run, map_location=device)
    total, active = count_params(model)
    result = {"params_total": total, "params_active": active, **score(model, windows, tokenizer)}
    rows = read_metrics(run)
    if rows:
        result.update(steps=rows[-1]["step"], tokens=rows[-1]["tokens"])
    if name != "mlp":
        for block in model.blocks:  # MLA decodes from its latent cache (the point of MLA)
            if hasattr(block.attn, "mode"):
                block.attn.mode = "absorbed"
        caches = model.new_caches(1, cfg.block_size)
        with torch.no_grad():
            model(windows[:1, :cfg.block_size].to(device), caches=caches)
        result.update(kv_bytes_per_token=sum(c.bytes_per_token() for c in caches),
                      kv_bytes_full_context=sum(c.bytes() for c in caches), kv_dtype=str(caches[0].dtype).split(".")[-1])
    idx = torch.tensor([prompt[-1:]], dtype=torch.int64, device=device)
    n_decode = cfg.block_size - 1
    begin = time.perf_counter()
    for _ in stream_tokens(model, idx, n_decode, temperature=0, use_cache=name != "mlp"):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result["decode_tokens_per_s"] = n_decode / (time.perf_counter() - begin)
    sample = stream_tokens(model, torch.tensor([prompt], dtype=torch.int64, device=device), cfg.sample_tokens,
                           temperature=cfg.temperature, seed=cfg.seed, use_cache=name != "mlp")
    result["sample"] = tokenizer.decode(prompt + [int(t[0]) for t in sample])
    return result


def _best_attention_model(results: dict) -> str | None:
    scored = [(r["val_loss"], m) for m, r in results.items() if m in GPT_MODELS and r["status"] == "ok"]
    return min(scored)[1] if scored else None


def _record_heatmap(out: Path, name: str, prompt: list[int], tokenizer) -> None:
    """Per-head attention of the last layer of ``name`` on the attention prompt, as attention.png."""
    from attnlab.attention.record import record_attention
    from attnlab.compare_report import ATTENTION_PNG
    from attnlab.models.base import load_pretrained
    from attnlab.viz.heatmap import plot_grid

    model = load_pretrained(out / name)
    ids = prompt[-model.config.block_size:]
    with record_attention(model) as rec, torch.no_grad():
        model(torch.tensor([ids], dtype=torch.int64))
    layer = len(rec.weights) - 1
    tokens = [tokenizer.decode([i]) for i in ids]
    fig = plot_grid(tokens, [rec.weights[layer]], first_layer=layer,
                    title=f"{LABELS[name]}: layer {layer}, every head (rows attend → columns)")
    fig.savefig(out / ATTENTION_PNG, dpi=110, metadata={"Software": None})
