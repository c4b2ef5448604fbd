"""The one training loop of attnlab: any model whose ``forward(*batch)`` returns ``(logits, loss)``.

:class:`Trainer` takes a model, a :class:`TrainConfig` and a batch source (``next()`` → a tuple of
tensors, ``eval_batches(step)`` → a list of them, ``state_dict``/``load_state_dict`` for exact
resume) and runs AdamW with warmup + cosine decay, gradient accumulation and clipping, the
precision and attention kernel :mod:`attnlab.device` chose, periodic evaluation, step/time/loss
stop rules, ``metrics.jsonl`` (+ TensorBoard when installed), atomic checkpoints and DDP under
``torchrun``. Models may add ``aux_loss()`` (a tensor added to the loss: MoE balancing),
``after_optimizer_step()`` (MoE bias balancing), ``train_stats()`` (extra metrics columns) and
``sparse_parameters`` (True when a step may leave parameters without gradient, for DDP). Progress goes to a callback; nothing here prints.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from attnlab import _checks
from attnlab import device as devices
from attnlab.attention.record import RecordsAttention
from attnlab.errors import ConfigError
from attnlab.files import append_jsonl, read_jsonl
from attnlab.optim import OPTIMIZERS, make_optimizer
from attnlab.options import check_choices, option

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "attnlab-train-checkpoint-v3"
METRICS = "metrics.jsonl"
KERNELS = ("auto", "fused", "explicit")


@dataclass
class TrainConfig:
    """How to train: data, optimisation, precision, budgets, evaluation and logging."""

    corpus: str = option("shakespeare", "'shakespeare', a .txt file or a folder of .txt files")
    tokenizer: str = option("char", "the corpus's characters or a byte-level BPE trained on it", choices=("char", "bpe"))
    vocab_size: int | None = option(None, "BPE vocabulary size (bpe only); None: 2048")
    val_fraction: float = option(0.1, "share of the corpus held out for evaluation")
    batch_size: int = option(12, "sequences per micro-step, summed over all DDP processes")
    block_size: int | None = option(None, "tokens per training window; None: the model's block_size", flag=False)
    grad_accum: int = option(1, "micro-steps per optimizer step")
    max_steps: int = option(2000, "optimizer steps")
    max_time: float | None = option(None, "seconds of wall time (from the process start) before stopping")
    optimizer: str = option("adamw", "adamw for every parameter, or muon for the hidden matrices (AdamW for "
                            "embeddings, head, norms, biases, routers, experts)", choices=OPTIMIZERS)
    lr: float = option(1e-3, "peak learning rate, reached after warmup")
    adamw_lr: float | None = option(None, "peak learning rate of what AdamW trains under --optimizer muon (embeddings, "
                                    "LM head, norms, biases); None: lr. --optimizer adamw uses lr")
    min_lr: float | None = option(None, "learning rate at the end of the decay; None: lr / 10")
    warmup_steps: int = option(100, "steps of linear warmup")
    decay_steps: int | None = option(None, "cosine decay length; None: max_steps")
    weight_decay: float = option(0.1, "AdamW decay of matrices and embeddings")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.99, "AdamW beta2")
    grad_clip: float = option(1.0, "largest gradient norm; 0 disables clipping")
    dtype: str = option("auto", "auto: bf16 autocast where it measured faster than fp32 (CUDA with bf16, CPUs with "
                        "native bf16), else float32", choices=devices.PRECISIONS)
    compile: bool = option(False, "torch.compile the model")
    attention_kernel: str = option("auto", "auto: whichever of fused (SDPA) and explicit measured faster here",
                                   choices=KERNELS)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    eval_interval: int = option(250, "steps between evaluations")
    eval_start: int = option(0, "no periodic eval before this step (the last step is always evaluated)")
    eval_iters: int = option(20, "batches per evaluation")
    eval_batch_size: int | None = option(None, "sequences per eval batch; None: batch_size")
    eval_block_size: int | None = option(None, "tokens per eval window; None: the model's block_size")
    log_interval: int = option(10, "steps between progress reports")
    ckpt_interval: int | None = option(None, "steps between checkpoints; None: at every eval")
    target_val_loss: float | None = option(None, "stop at the first eval at or below this")
    seed: int = option(1337, "seed of the weights and the batches")
    threads: int | None = option(None, "torch CPU threads; None: measured (torch's default unless one is faster)")

    # Fields that may change when resuming: budgets and bookkeeping, never the optimisation itself.
    RESUMABLE = ("max_steps", "max_time", "eval_interval", "eval_start", "log_interval", "ckpt_interval",
                 "target_val_loss", "compile", "threads", "device", "attention_kernel")

    def __post_init__(self):
        check_choices(self)
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_iters", "log_interval"):
            _checks.positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_start", "seed"):
            _checks.non_negative_int(name, getattr(self, name))
        for name in ("vocab_size", "block_size", "eval_batch_size", "eval_block_size", "ckpt_interval", "decay_steps", "threads"):
            if getattr(self, name) is not None:
                _checks.positive_int(name, getattr(self, name))
        _checks.positive("lr", self.lr)
        if self.adamw_lr is not None:
            _checks.positive("adamw_lr", self.adamw_lr)
        _checks.non_negative("weight_decay", self.weight_decay)
        _checks.non_negative("grad_clip", self.grad_clip)
        _checks.real("val_fraction", self.val_fraction, low=0, high=1, low_open=True, high_open=True)
        for name in ("beta1", "beta2"):
            _checks.real(name, getattr(self, name), low=0, high=1, high_open=True)
        if self.min_lr is not None:
            _checks.real("min_lr", self.min_lr, low=0, high=self.lr)
        if self.max_time is not None:
            _checks.positive("max_time", self.max_time)
        if self.target_val_loss is not None:
            _checks.non_negative("target_val_loss", self.target_val_loss)
        if not isinstance(self.device, str):
            raise ConfigError(f"device={self.device!r} is not allowed: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = devices.resolve_device(device_name, local_rank).type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def process_age() -> float:
    """Seconds since this process started (Linux /proc), so timings include Python and torch start-up."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_AT


_IMPORTED_AT = time.monotonic()


class Trainer:
    """Train ``model`` on ``batches`` as ``cfg`` says; ``fit()`` runs it and returns a summary.

    out_dir: where metrics.jsonl, checkpoint.pt (and tb/) go; None keeps nothing on disk.
    checkpoint_meta: extra entries saved in every checkpoint (e.g. the model and train configs).
    clock: what max_time and elapsed_s count from — "process" (its start, start-up included) or
    "train" (the first step, so several runs in one process get equal time).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, batches, *, device: torch.device,
                 precision: devices.Precision, out_dir=None, ddp: Dist = Dist(), checkpoint_meta: dict | None = None,
                 progress: Callable[[dict], None] | None = None, clock: str = "process"):
        _checks.one_of("clock", clock, ("process", "train"))
        if cfg.batch_size % ddp.world:
            raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {ddp.world} processes: "
                              "batch_size is the global batch, split evenly across processes")
        self.raw, self.cfg, self.batches, self.device, self.precision = model, cfg, batches, device, precision
        self.out = None if out_dir is None else Path(out_dir)
        self.ddp, self.meta, self.progress, self.clock = ddp, dict(checkpoint_meta or {}), progress, clock
        min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
        self.optim = make_optimizer(model, lr=cfg.lr, adamw_lr=cfg.adamw_lr, weight_decay=cfg.weight_decay,
                                    betas=(cfg.beta1, cfg.beta2), kind=cfg.optimizer, warmup_steps=cfg.warmup_steps,
                                    decay_steps=cfg.decay_steps or cfg.max_steps, min_ratio=min_lr / cfg.lr,
                                    ns_dtype=devices.choose_precision("auto", device).torch_dtype)
        self.step, self.tokens, self.elapsed_before = 0, 0, 0.0
        self.kernel, self.kernel_reason = None, None
        self._eval_time = 0.0
        self.model = model
        if ddp.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=getattr(model, "sparse_parameters", False))
        self.fwd = torch.compile(self.model) if cfg.compile else self.model

    # --- the loop -------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg = self.cfg
        self.choose_kernel()
        self._start_clock()
        writer = self._tensorboard()
        summary = {"start_step": self.step, "precision": self.precision.dtype, "precision_reason": self.precision.reason,
                   "attention_kernel": self.kernel, "device": str(self.device), "world_size": self.ddp.world,
                   "params": sum(p.numel() for p in self.raw.parameters()), "val_loss": None, "stopped": "max_steps"}
        self._emit({"event": "start", "step": self.step, "max_steps": cfg.max_steps, **summary})
        self.model.train()
        while self.step < cfg.max_steps:
            lr = self.optim.lr
            loss = self.train_step()
            self.step += 1
            self.tokens += self.batches.tokens_per_batch * cfg.grad_accum
            self._loss_sum, self._loss_count = self._loss_sum + loss, self._loss_count + 1
            periodic = self.step % cfg.eval_interval == 0 and self.step >= cfg.eval_start
            val_loss = self.evaluate() if periodic or self.step == cfg.max_steps else None
            stop = self._stop_reason(val_loss)
            if stop == "max_time" and val_loss is None:
                val_loss = self.evaluate()  # a time budget ends between evals: score the final weights too
            if val_loss is not None:
                summary["val_loss"] = val_loss
            if self.step % cfg.log_interval == 0 or val_loss is not None or stop:
                summary["train_loss"] = self._log(lr, val_loss, writer)
            if stop or self.step % (cfg.ckpt_interval or cfg.eval_interval) == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
            if stop:
                summary["stopped"] = stop
                break
        if writer is not None:
            writer.close()
        summary.update(step=self.step, tokens=self.tokens, elapsed_s=self.elapsed(),
                       out_dir=None if self.out is None else str(self.out))
        self._emit({"event": "end", **summary})
        return summary

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns its mean loss (all processes)."""
        cfg, ddp = self.cfg, self.ddp
        step_loss = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            batch = [t[ddp.rank::ddp.world] if ddp.world > 1 else t for t in self.batches.next()]
            batch = [t.to(self.device) for t in batch]
            sync = ddp.world == 1 or micro == cfg.grad_accum - 1
            with (nullcontext() if sync else self.model.no_sync()), self.precision.autocast():
                _, loss = self.fwd(*batch)
                total = loss + self.raw.aux_loss().to(loss.device) if hasattr(self.raw, "aux_loss") else loss
            (total / cfg.grad_accum).backward()
            step_loss += loss.detach() / cfg.grad_accum
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.grad_clip)
        self.optim.step()
        if hasattr(self.raw, "after_optimizer_step"):
            self.raw.after_optimizer_step()
        if ddp.world > 1:
            dist.all_reduce(step_loss)
            step_loss /= ddp.world
        return float(step_loss)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the batch source's eval batches for this step, each weighted by its targets."""
        started = time.monotonic()
        self.raw.eval()
        total, count = 0.0, 0
        for batch in self.batches.eval_batches(self.step):
            with self.precision.autocast():
                _, loss = self.raw(*(t.to(self.device) for t in batch))
            n = int((batch[-1] != -1).sum())
            total, count = total + float(loss) * n, count + n
        self.raw.train()
        self._eval_time += time.monotonic() - started  # tokens_per_s counts training time only
        return total / max(count, 1)

    # --- bookkeeping ----------------------------------------------------------------------

    def choose_kernel(self) -> None:
        """Set every attention module's kernel: as configured, measured (auto), or the checkpoint's."""
        attention = next((m for m in self.raw.modules() if isinstance(m, RecordsAttention)), None)
        if attention is None:
            self.kernel = None
            return
        if self.kernel is None or self.cfg.attention_kernel != "auto":  # a resumed run keeps its measured choice
            shape = (self.cfg.batch_size // self.ddp.world, self.batches.block_size, attention.d_model)
            self.kernel, self.kernel_reason = devices.choose_attention_kernel(
                self.cfg.attention_kernel, attention, shape, self.precision)
        for module in self.raw.modules():
            if isinstance(module, RecordsAttention):
                module.fused = self.kernel == "fused"

    def _start_clock(self) -> None:
        self.process_start = time.monotonic() - (process_age() if self.clock == "process" else 0.0)
        self.started = time.monotonic()
        self._loss_sum, self._loss_count, self._eval_time = 0.0, 0, 0.0
        self._last_log_time, self._last_log_tokens = time.monotonic(), self.tokens
        self._first_step = self.step

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.process_start

    def _stop_reason(self, val_loss) -> str | None:
        cfg = self.cfg
        stop = None
        if cfg.target_val_loss is not None and val_loss is not None and val_loss <= cfg.target_val_loss:
            stop = "target_val_loss"
        if cfg.max_time is not None and time.monotonic() - self.process_start >= cfg.max_time:
            stop = stop or "max_time"
        if self.ddp.world > 1 and cfg.max_time is not None:  # rank 0's clock decides for everyone
            flag = torch.tensor([0 if stop is None else 1], device=self.device)
            dist.broadcast(flag, 0)
            stop = stop or ("max_time" if int(flag) else None)
        return stop

    def _log(self, lr: float, val_loss, writer) -> float:
        now = time.monotonic()
        train_seconds = max(now - self._last_log_time - self._eval_time, 1e-9)
        row = {"step": self.step, "elapsed_s": round(self.elapsed(), 3), "train_loss": self._loss_sum / self._loss_count,
               "val_loss": val_loss, "tokens_per_s": (self.tokens - self._last_log_tokens) / train_seconds, "lr": lr,
               "tokens": self.tokens, **(self.raw.train_stats() if hasattr(self.raw, "train_stats") else {})}
        self._loss_sum, self._loss_count, self._eval_time = 0.0, 0, 0.0
        self._last_log_time, self._last_log_tokens = now, self.tokens
        if self.ddp.main and self.out is not None:
            append_jsonl(self.out / METRICS, row)
            if writer is not None:
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)):
                        writer.add_scalar(key, value, self.step)
        remaining = (self.cfg.max_steps - self.step) * (now - self.started) / max(1, self.step - self._first_step)
        if self.cfg.max_time is not None:
            remaining = min(remaining, max(0.0, self.cfg.max_time - (now - self.process_start)))
        self._emit({"event": "eval" if val_loss is not None else "step", "max_steps": self.cfg.max_steps,
                    "eta_s": remaining, **row})
        return row["train_loss"]

    def _emit(self, event: dict) -> None:
        if self.progress is not None and self.ddp.main:
            self.progress(event)

    def _tensorboard(self):
        if self.out is None or not self.ddp.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.out / "tb"), purge_step=self.step or None)

    # --- checkpoints ----------------------------------------------------------------------

    def state(self) -> dict:
        """Everything an exact resume needs, plus ``checkpoint_meta``."""
        metrics = None if self.out is None else self.out / METRICS
        return {
            "format": CHECKPOINT_FORMAT, **self.meta, "model": self.raw.state_dict(),
            "optimizer": self.optim.state_dict(),
            "batches": self.batches.state_dict(), "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed(), "attention_kernel": self.kernel,
            "metrics_bytes": metrics.stat().st_size if metrics is not None and metrics.exists() else 0,
        }

    def save_checkpoint(self) -> None:
        if not self.ddp.main or self.out is None:
            return
        atomic_torch_save(self.state(), self.out / CHECKPOINT)
        if hasattr(self.raw, "save_pretrained"):
            self.raw.save_pretrained(self.out)

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, RNG, batches, counters, metrics."""
        self.raw.load_state_dict(ckpt["model"])
        self.optim.load_state_dict(ckpt["optimizer"], decay_steps=self.cfg.decay_steps or self.cfg.max_steps)
        self.batches.load_state_dict(ckpt["batches"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self.step, self.tokens, self.elapsed_before = ckpt["step"], ckpt["tokens"], ckpt["elapsed_s"]
        if self.cfg.attention_kernel == "auto" and ckpt.get("attention_kernel"):
            self.kernel, self.kernel_reason = ckpt["attention_kernel"], "measured when the run started"
        metrics = None if self.out is None else self.out / METRICS
        if self.ddp.main and metrics is not None and metrics.exists():
            with open(metrics, "r+b") as f:  # drop rows logged after the checkpoint
                f.truncate(min(ckpt["metrics_bytes"], metrics.stat().st_size))


def load_checkpoint(path) -> dict:
    """Read and validate a training checkpoint; a damaged or foreign file is a ConfigError."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for damaged files
        raise ConfigError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
            "refusing to resume from it (it is left untouched): start a fresh run in another --out folder"
        ) from None
    needed = ("format", "model", "optimizer", "batches", "rng", "step")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or any(k not in ckpt for k in needed):
        raise ConfigError(f"checkpoint {str(path)!r} is not an attnlab training checkpoint ({CHECKPOINT_FORMAT}); "
                          "refusing to resume from it")
    return ckpt


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(out_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return read_jsonl(Path(out_dir) / METRICS)
