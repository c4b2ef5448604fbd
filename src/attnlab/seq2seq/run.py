"""``attnlab seq2seq``: Bahdanau et al. (2014)'s experiment, small and exact. Every model of
:mod:`attnlab.seq2seq.models` is trained by the one Trainer on the same examples under the same
budget (steps × batch), then decodes held-out inputs greedily at each input length — longer ones
than any it was trained on included — and the run is written up by :mod:`attnlab.seq2seq.report`.
Progress goes to a callback; nothing here prints.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from attnlab import _checks
from attnlab import device as devices
from attnlab.errors import ConfigError
from attnlab.options import check_choices, option
from attnlab.seq2seq.batches import ExampleBatches, draw
from attnlab.seq2seq.models import LABELS, MODELS, alignment, build, greedy
from attnlab.seq2seq.report import REPORT_FILES, write_report
from attnlab.seq2seq.tasks import EOS, TASKS, Task, get_task
from attnlab.trainer import Trainer, TrainConfig

ALIGNED = ("rnn-attn", "transformer")  # the models whose attention over the input is pictured


@dataclass
class Seq2SeqConfig:
    """One run: the task, the models, the lengths, the equal training budget and the model sizes."""

    task: str = option("reverse", "the task every model learns", choices=tuple(TASKS))
    models: tuple[str, ...] = option(MODELS, f"the models to train, in this order (any of {', '.join(MODELS)})")
    max_train_length: int = option(20, "longest input (symbols) seen in training; shorter ones down to the task's minimum")
    eval_lengths: tuple[int, ...] | None = option(None, "input lengths evaluated; None: every 4th up to 1.5 × "
                                                        "max_train_length (the task's longest at most)")
    eval_examples: int = option(100, "held-out inputs decoded per evaluated length")
    steps: int = option(600, "optimizer steps of every model (the equal budget)")
    batch_size: int = option(64, "examples per step")
    lr: float = option(3e-3, "peak learning rate of every model (AdamW, warmup then cosine decay)")
    warmup_steps: int = option(50, "steps of linear warmup")
    rnn_embed: int = option(64, "embedding width of the RNN models")
    rnn_hidden: int = option(128, "GRU width of the RNN models (the encoder has two directions of it)")
    d_model: int = option(64, "width of the Transformer and the GPT")
    n_head: int = option(4, "attention heads of the Transformer and the GPT")
    n_layer: int = option(2, "Transformer encoder and decoder blocks each; the GPT has twice as many")
    dtype: str = option("float32", "float32: these models are too small for bf16 to pay (bf16 autocast measured a "
                        "3x slower training step on an AVX-512 EPYC); auto: as attnlab train", choices=devices.PRECISIONS)
    seed: int = option(1337, "seed of the weights and the examples")
    threads: int | None = option(1, "torch CPU threads; 1: these small models are fastest on one thread (two took "
                                    "up to 4x longer on a busy 2-core machine); None: measured")

    def __post_init__(self):
        self.models = tuple(self.models)
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models or len(set(self.models)) != len(self.models):
            raise ConfigError(f"models={list(self.models)!r} is not allowed: choose each of {', '.join(MODELS)} at most once"
                              + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        check_choices(self)
        for name in ("max_train_length", "eval_examples", "steps", "batch_size", "rnn_embed", "rnn_hidden", "d_model",
                     "n_head", "n_layer"):
            _checks.positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "seed"):
            _checks.non_negative_int(name, getattr(self, name))
        if self.threads is not None:
            _checks.positive_int("threads", self.threads)
        _checks.positive("lr", self.lr)
        _checks.divisible("d_model", self.d_model, "n_head", self.n_head)
        task = get_task(self.task)
        if not task.min_length <= self.max_train_length <= (task.max_length or self.max_train_length):
            raise ConfigError(f"max_train_length={self.max_train_length} is not allowed for task {self.task!r}: expected "
                              f"{task.min_length} to {task.max_length or 'any length'}")
        if self.eval_lengths is None:
            top = min(int(1.5 * self.max_train_length), task.max_length or 10**9)
            self.eval_lengths = tuple(range(4 * -(-max(task.min_length, 4) // 4), top + 1, 4))
        self.eval_lengths = tuple(sorted(set(self.eval_lengths)))
        if not self.eval_lengths:
            raise ConfigError("eval_lengths=() is not allowed: expected at least one input length")
        for length in self.eval_lengths:
            _checks.positive_int("eval_lengths", length)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out)!r} exists and is not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out={str(out)!r} already exists and is not empty: pass --overwrite to replace its "
                          "report, or choose another --out")


def _train_config(cfg: Seq2SeqConfig, threads: int) -> TrainConfig:
    return TrainConfig(batch_size=cfg.batch_size, max_steps=cfg.steps, lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, cfg.steps // 5),
                       eval_interval=max(1, cfg.steps // 4), log_interval=max(1, cfg.steps // 20), dtype=cfg.dtype,
                       attention_kernel="fused", seed=cfg.seed, threads=threads)


def evaluate(model, task: Task, examples_by_length: dict, device) -> tuple[dict, dict]:
    """Greedy decoding of the held-out examples: ({length: exact match}, {length: token accuracy}).
    Exact match: the output, then EOS; token accuracy: share of target positions predicted right."""
    exact, tokens = {}, {}
    for length, examples in examples_by_length.items():
        src = torch.tensor([s for s, _ in examples], dtype=torch.int64, device=device)  # (n, length)
        outputs = greedy(model, src, max(len(t) for _, t in examples))
        exact[length] = sum(out == t + [EOS] for out, (_, t) in zip(outputs, examples)) / len(examples)
        tokens[length] = sum(sum(a == b for a, b in zip(out, t)) / len(t)
                             for out, (_, t) in zip(outputs, examples)) / len(examples)
    return exact, tokens


def _train_one(name: str, cfg: Seq2SeqConfig, task: Task, device, precision, threads: int, emit) -> tuple:
    """Build, train and return (model, trainer summary) of one model."""
    torch.manual_seed(cfg.seed)
    model = build(name, task.vocab_size, max_length=max(cfg.max_train_length, *cfg.eval_lengths), rnn_embed=cfg.rnn_embed,
                  rnn_hidden=cfg.rnn_hidden, d_model=cfg.d_model, n_head=cfg.n_head, n_layer=cfg.n_layer).to(device)
    batches = ExampleBatches(task, model.frame, batch_size=cfg.batch_size, max_length=cfg.max_train_length, seed=cfg.seed)

    def on_event(event: dict) -> None:
        if event["event"] in ("step", "eval"):
            emit({"event": "step", "model": name, "step": event["step"], "max_steps": cfg.steps,
                  "train_loss": event["train_loss"], "val_loss": event.get("val_loss")})

    trainer = Trainer(model, _train_config(cfg, threads), batches, device=device, precision=precision,
                      progress=on_event, clock="train")
    return model, trainer.fit()


def run_seq2seq(out_dir, config: Seq2SeqConfig | dict | None = None, *, overwrite: bool = False,
                command: str | None = None, progress: Callable[[dict], None] | None = None) -> dict:
    """Train, evaluate and report every model of ``config`` into ``out_dir`` (report.md, report.html,
    results.json, PNGs). Returns {"out_dir", "report", "results", "wall_s"}. ``progress`` gets dicts
    with an "event": "prepare" | "model" | "step" | "done" | "report". Everything is checked, and the
    held-out examples drawn, before the first file is written."""
    cfg = config if isinstance(config, Seq2SeqConfig) else Seq2SeqConfig(**(config or {}))
    out = Path(out_dir)
    _check_out(out, overwrite)
    emit = progress or (lambda event: None)
    started = time.monotonic()
    task = get_task(cfg.task)
    emit({"event": "prepare"})
    held_out = {length: draw(task, random.Random(cfg.seed * 1_000 + length), [length] * cfg.eval_examples, held_out=True)
                for length in cfg.eval_lengths}
    threads, _ = devices.choose_threads(cfg.threads)
    torch.set_num_threads(threads)
    device = devices.resolve_device("auto")
    precision = devices.choose_precision(cfg.dtype, device)
    shown_length = min(cfg.eval_lengths, key=lambda n: abs(n - 0.6 * cfg.max_train_length))
    shown = held_out[shown_length][0]

    models, pictures = {}, {}
    for index, name in enumerate(cfg.models):
        emit({"event": "model", "model": name, "index": index, "total": len(cfg.models)})
        begin = time.monotonic()
        model, summary = _train_one(name, cfg, task, device, precision, threads, emit)
        train_s = time.monotonic() - begin
        exact, tokens = evaluate(model, task, held_out, device)
        models[name] = {"params": sum(p.numel() for p in model.parameters()), "accuracy_by_length": exact,
                        "token_accuracy_by_length": tokens, "val_loss": summary["val_loss"], "steps": summary["step"],
                        "train_s": train_s, "eval_s": time.monotonic() - begin - train_s}
        if name in ALIGNED:
            src = torch.tensor([shown[0]], dtype=torch.int64, device=device)
            output = greedy(model, src, len(shown[1]))[0]
            output = output[:-1] if output and output[-1] == EOS else output  # the picture's last row predicts EOS
            pictures[name] = {"output": output, "weights": [w.cpu() for w in alignment(model, src, output)]}
        emit({"event": "done", "model": name, "accuracy": exact, "seconds": time.monotonic() - begin})

    emit({"event": "report"})
    out.mkdir(parents=True, exist_ok=True)  # every check has passed and every model has run: now write
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    run = {"config": dataclasses.asdict(cfg), "task": task, "models": models, "labels": LABELS, "example": shown,
           "pictures": pictures, "command": command, "machine": devices.machine_facts(precision),
           "wall_s": time.monotonic() - started}
    report = write_report(out, run)
    return {"out_dir": str(out), "report": str(report), "results": models, "wall_s": run["wall_s"]}
