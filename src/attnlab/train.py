"""Training a GPT on a text corpus: AdamW, warmup + cosine decay, clipping, accumulation, bf16
autocast, periodic eval, step/time budgets, atomic checkpoints with exact resume, and DDP when
launched by ``torchrun``.

A run folder holds config.json, tokenizer.json and model.safetensors (loadable with
``GPT.from_pretrained``), checkpoint.pt (weights + optimizer + scheduler + RNG + data position),
train_config.json, metrics.jsonl, data/ (the encoded train/val split) and, when tensorboard is
installed, tb/. Progress goes to an optional callback; nothing here prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.distributed as dist

from attnlab import _checks
from attnlab.attention.record import RecordsAttention
from attnlab.errors import ConfigError
from attnlab.data.corpus import atomic_output
from attnlab.models.gpt import GPT, GPTConfig

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "attnlab-train-checkpoint-v1"
METRICS = "metrics.jsonl"
_RUN_FILES = (CHECKPOINT, METRICS, "config.json", "model.safetensors", "tokenizer.json", "train_config.json")
# Fields that may change when resuming: budgets and bookkeeping, never the optimisation itself.
RESUMABLE_FIELDS = ("max_steps", "max_time", "eval_interval", "eval_start", "log_interval", "ckpt_interval",
                    "target_val_loss", "compile", "threads", "device", "attention_kernel")


def _process_age() -> float:
    """Seconds since this process started (Linux /proc), so timings include Python and torch start-up."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_AT


_IMPORTED_AT = time.monotonic()


@dataclass
class TrainConfig:
    """How to train: data, optimisation, precision, budgets, evaluation and logging."""

    # Fields with a fixed set of values: checked in __post_init__, offered as choices by the CLI.
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "tokenizer": ("char", "bpe"), "dtype": ("auto", "float32", "bfloat16"),
        "attention_kernel": ("auto", "fused", "explicit"),
    }

    corpus: str = "shakespeare"  # "shakespeare", a .txt file or a folder of .txt files
    tokenizer: str = "char"  # the corpus's characters or a byte-level BPE trained on it
    vocab_size: int | None = None  # BPE vocabulary size (bpe only); None: 2048
    val_fraction: float = 0.1  # share of the corpus held out for evaluation
    batch_size: int = 12  # sequences per micro-step, summed over all DDP processes
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 2000  # optimizer steps
    max_time: float | None = None  # seconds of this process's wall time (from its start) before stopping
    lr: float = 1e-3  # peak learning rate, reached after warmup
    min_lr: float | None = None  # learning rate at the end of the decay; None: lr / 10
    warmup_steps: int = 100  # steps of linear warmup
    decay_steps: int | None = None  # cosine decay length; None: max_steps
    weight_decay: float = 0.1  # AdamW decay of matrices and embeddings
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # largest gradient norm; 0 disables clipping
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU
    compile: bool = False  # torch.compile the model
    attention_kernel: str = "auto"  # auto: explicit for bf16 on CPU, where it is faster, else fused
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_interval: int = 250  # steps between evaluations
    eval_start: int = 0  # no periodic eval before this step (the last step is always evaluated)
    eval_iters: int = 20  # batches per evaluation
    eval_batch_size: int | None = None  # sequences per eval batch; None: batch_size
    eval_block_size: int | None = None  # tokens per eval window; None: the model's block_size
    log_interval: int = 10  # steps between progress reports
    ckpt_interval: int | None = None  # steps between checkpoints; None: at every eval
    target_val_loss: float | None = None  # stop at the first eval at or below this
    seed: int = 1337  # seed of the weights and the batches
    threads: int | None = None  # torch CPU threads; None: torch's default

    def __post_init__(self):
        for name, allowed in self.CHOICES.items():
            _checks.one_of(name, getattr(self, name), allowed)
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_iters", "log_interval"):
            _checks.positive_int(name, getattr(self, name))
        _checks.non_negative_int("warmup_steps", self.warmup_steps)
        _checks.non_negative_int("eval_start", self.eval_start)
        for name in ("eval_batch_size", "eval_block_size", "ckpt_interval", "decay_steps", "threads"):
            if getattr(self, name) is not None:
                _checks.positive_int(name, getattr(self, name))
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (name == "lr" and value == 0):
                raise ConfigError(f"{name}={value!r} is not allowed: expected a {'positive' if name == 'lr' else 'non-negative'} number")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr={self.min_lr!r} is not allowed: expected 0 <= min_lr <= lr={self.lr}")
        if self.max_time is not None and not self.max_time > 0:
            raise ConfigError(f"max_time={self.max_time!r} is not allowed: expected a positive number of seconds")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed: expected a number in [0, 1)")


class WarmupCosine:
    """LR multiplier: linear warmup to 1, cosine decay to min_ratio at decay_steps, then flat.
    A callable object (not a lambda) so LambdaLR can save and restore it."""

    def __init__(self, warmup_steps: int, decay_steps: int, min_ratio: float):
        self.warmup_steps, self.decay_steps, self.min_ratio = warmup_steps, decay_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if step >= self.decay_steps:
            return self.min_ratio
        progress = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        return self.min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - self.min_ratio)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices and embeddings only (not on norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def make_scheduler(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    schedule = WarmupCosine(cfg.warmup_steps, cfg.decay_steps or cfg.max_steps, min_lr / cfg.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def sample_windows(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """nanoGPT's batches: random windows x (B, T) and the next tokens y (B, T)."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    chunk = data[ix.unsqueeze(1) + torch.arange(block_size + 1)]  # (B, T + 1)
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def estimate_loss(model, data: torch.Tensor, iters: int, batch_size: int, block_size: int,
                  generator: torch.Generator, *, autocast=nullcontext, device="cpu") -> float:
    """Mean cross-entropy over every position of iters × batch_size random windows of
    block_size tokens (nanoGPT's estimate_loss), in eval mode. The windows are drawn as nanoGPT
    draws them, batch by batch, then scored in chunks of up to 256 (bigger matmuls, same mean)."""
    was_training = model.training
    model.eval()
    windows = [sample_windows(data, batch_size, block_size, generator) for _ in range(iters)]
    x, y = torch.cat([w[0] for w in windows]), torch.cat([w[1] for w in windows])  # (iters * B, T)
    total = 0.0
    for i in range(0, len(x), _EVAL_CHUNK):
        with autocast():
            _, loss = model(x[i:i + _EVAL_CHUNK].to(device), y[i:i + _EVAL_CHUNK].to(device))
        total += float(loss) * len(x[i:i + _EVAL_CHUNK])
    model.train(was_training)
    return total / len(x)


_EVAL_CHUNK = 256


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: torch.device) -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} is not available: this torch build sees no CUDA device (use 'cpu' or 'auto')")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise ConfigError(f"device={name!r} is not allowed: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return torch.device(name)


def _autocast(cfg: TrainConfig, device: torch.device):
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return nullcontext, "float32"
    return (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)), "bfloat16"


def _merge(cls, base: dict, overrides: dict | None):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}: allowed are {sorted(fields)}")
    return cls(**{**base, **(overrides or {})})


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
    needed = ("format", "model_config", "train_config", "model", "optimizer", "scheduler", "rng", "step")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or any(k not in ckpt for k in needed):
        raise ConfigError(f"checkpoint {str(path)!r} is not an attnlab training checkpoint ({CHECKPOINT_FORMAT}); refusing to resume from it")
    return ckpt


def _diff(saved: dict, requested: dict, allowed=()) -> list[str]:
    return [f"{k}: checkpoint has {saved.get(k)!r}, requested {v!r}"
            for k, v in requested.items() if k not in allowed and saved.get(k) != v]


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise ConfigError(f"--resume: {str(out)!r} holds no {CHECKPOINT}: nothing to resume (start without --resume)")
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out)!r} exists and is not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out={str(out)!r} already exists and is not empty: pass --overwrite to replace its run, "
                          "--resume to continue it, or choose another --out")


def _prepare_data(train_cfg: TrainConfig, data_dir: Path, resume: bool):
    from attnlab.data.corpus import TokenDataset, load_corpus, prepare_dataset
    from attnlab.data.tokenizer import train_tokenizer

    if resume:
        dataset = TokenDataset(data_dir)
    else:
        text = load_corpus(train_cfg.corpus)
        tokenizer = train_tokenizer(train_cfg.tokenizer, text, train_cfg.vocab_size)
        dataset = prepare_dataset(text, tokenizer, data_dir, val_fraction=train_cfg.val_fraction)
    return dataset


def train(
    out_dir,
    *,
    model: GPTConfig | dict | None = None,
    config: TrainConfig | dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[dict], None] | None = None,
    clock: str = "process",
) -> dict:
    """Train a GPT into ``out_dir``; returns a summary (steps, losses, timings).

    model / config: a config object, or a dict of fields overriding the defaults (or, with
    resume=True, overriding the checkpoint's, where only RESUMABLE_FIELDS may differ).
    progress: called on rank 0 with {"event": "start" | "step" | "eval" | "end", ...}.
    clock: what max_time and elapsed_s count from: "process" (its start, start-up included) or
    "train" (the first step, so several runs in one process get equal time; attnlab compare).
    """
    _checks.one_of("clock", clock, ("process", "train"))
    out = Path(out_dir)
    model_over = dataclasses.asdict(model) if isinstance(model, GPTConfig) else dict(model or {})
    train_over = dataclasses.asdict(config) if isinstance(config, TrainConfig) else dict(config or {})
    _check_out_dir(out, resume, overwrite)

    ckpt = None
    if resume:
        ckpt = load_checkpoint(out / CHECKPOINT)
        mismatch = _diff(ckpt["model_config"], {k: v for k, v in model_over.items() if k != "vocab_size"})
        mismatch += _diff(ckpt["train_config"], train_over, RESUMABLE_FIELDS)
        if mismatch:
            raise ConfigError(f"the checkpoint in {str(out)!r} does not match the requested run (" + "; ".join(mismatch)
                              + "): resume with the same settings, or start a fresh run in another --out")
        train_cfg = _merge(TrainConfig, ckpt["train_config"], train_over)
    else:
        train_cfg = _merge(TrainConfig, {}, train_over)
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)

    ddp = _setup_distributed(_pick_device(train_cfg.device, int(os.environ.get("LOCAL_RANK", "0"))))
    device = _pick_device(train_cfg.device, ddp.local_rank)
    if train_cfg.batch_size % ddp.world:
        raise ConfigError(f"batch_size={train_cfg.batch_size} is not divisible by the {ddp.world} processes: "
                          "batch_size is the global batch, split evenly across processes")

    if not resume and ddp.main:
        for name in _RUN_FILES:
            (out / name).unlink(missing_ok=True)
    if ddp.main:
        dataset = _prepare_data(train_cfg, out / "data", resume)
    if ddp.world > 1:
        dist.barrier()  # rank 0 has written data/; the others read it
    if not ddp.main:
        dataset = _prepare_data(train_cfg, out / "data", True)
    tokenizer = dataset.tokenizer()

    if resume:
        model_cfg = GPTConfig.from_dict(ckpt["model_config"])
    else:
        model_cfg = _merge(GPTConfig, {}, {**model_over, "vocab_size": tokenizer.vocab_size})
    eval_block = train_cfg.eval_block_size or model_cfg.block_size
    if model_cfg.positions == "learned" and eval_block > model_cfg.block_size:
        raise ConfigError(f"eval_block_size={eval_block} is larger than block_size={model_cfg.block_size}: "
                          "a model with learned positions cannot see longer windows")
    data = {s: torch.from_numpy(dataset.tokens(s).astype("int64")) for s in ("train", "val")}
    for split, tokens in data.items():
        longest = max(model_cfg.block_size, eval_block) if split == "val" else model_cfg.block_size
        if len(tokens) <= longest:
            raise ConfigError(f"the {split} split has {len(tokens)} tokens, too few for windows of {longest}: "
                              "use a smaller block_size or a larger corpus")

    torch.manual_seed(train_cfg.seed)
    raw_model = GPT(model_cfg).to(device)
    optimizer = make_optimizer(raw_model, train_cfg)
    scheduler = make_scheduler(optimizer, train_cfg)
    data_gen = torch.Generator().manual_seed(train_cfg.seed + 1)
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    metrics_path = out / METRICS
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _apply_schedule_fields(scheduler, train_cfg)
        torch.set_rng_state(ckpt["rng"]["torch"])
        data_gen.set_state(ckpt["rng"]["data"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        step, tokens_seen, elapsed_before = ckpt["step"], ckpt["tokens"], ckpt["elapsed_s"]
        if ddp.main and metrics_path.exists():
            with open(metrics_path, "r+b") as f:  # drop rows logged after the checkpoint
                f.truncate(min(ckpt["metrics_bytes"], metrics_path.stat().st_size))
    elif ddp.main:
        raw_model.save_pretrained(out, tokenizer)
        with atomic_output(out / "train_config.json") as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(train_cfg), indent=2) + "\n")

    model = raw_model
    if ddp.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=model_cfg.ffn == "moe")
    autocast, precision = _autocast(train_cfg, device)
    kernel = train_cfg.attention_kernel
    if kernel == "auto":
        kernel = "explicit" if device.type == "cpu" and precision == "bfloat16" else "fused"
    for module in raw_model.modules():
        if isinstance(module, RecordsAttention):
            module.fused = kernel == "fused"
    fwd = torch.compile(model) if train_cfg.compile else model
    writer = _tensorboard(out / "tb", step) if ddp.main else None

    process_start = time.monotonic() - (_process_age() if clock == "process" else 0.0)
    start_time = time.monotonic()

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - process_start

    def save_checkpoint() -> None:
        if not ddp.main:
            return
        ckpt_data = {
            "format": CHECKPOINT_FORMAT, "model_config": dataclasses.asdict(model_cfg),
            "train_config": dataclasses.asdict(train_cfg), "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "step": step, "tokens": tokens_seen, "elapsed_s": elapsed(),
            "metrics_bytes": metrics_path.stat().st_size if metrics_path.exists() else 0,
        }
        _atomic_torch_save(ckpt_data, out / CHECKPOINT)
        raw_model.save_pretrained(out)

    local_batch = train_cfg.batch_size // ddp.world
    tokens_per_step = train_cfg.batch_size * train_cfg.grad_accum * model_cfg.block_size
    eval_batch = train_cfg.eval_batch_size or train_cfg.batch_size
    ckpt_every = train_cfg.ckpt_interval or train_cfg.eval_interval
    summary = {"start_step": step, "precision": precision, "attention_kernel": kernel, "device": str(device),
               "world_size": ddp.world,
               "params": raw_model.num_params(), "val_loss": None, "stopped": "max_steps"}
    if progress and ddp.main:
        progress({"event": "start", "step": step, "max_steps": train_cfg.max_steps, **summary})

    loss_acc, loss_count = 0.0, 0
    last_log_time, last_log_tokens, eval_time = time.monotonic(), tokens_seen, 0.0
    moe = bool(raw_model.moe_layers())

    def evaluate() -> float:
        nonlocal eval_time
        eval_started = time.monotonic()
        eval_gen = torch.Generator().manual_seed(train_cfg.seed * 1_000_003 + step)
        loss = estimate_loss(raw_model, data["val"], train_cfg.eval_iters, eval_batch, eval_block, eval_gen,
                             autocast=autocast, device=device)
        summary["val_loss"] = loss
        eval_time += time.monotonic() - eval_started  # tokens_per_s counts training time only
        return loss

    model.train()
    while step < train_cfg.max_steps:
        lr = scheduler.get_last_lr()[0]
        step_loss = torch.zeros((), device=device)
        for micro in range(train_cfg.grad_accum):
            x, y = sample_windows(data["train"], train_cfg.batch_size, model_cfg.block_size, data_gen)
            x = x[ddp.rank * local_batch:(ddp.rank + 1) * local_batch].to(device)
            y = y[ddp.rank * local_batch:(ddp.rank + 1) * local_batch].to(device)
            sync = ddp.world == 1 or micro == train_cfg.grad_accum - 1
            with (nullcontext() if sync else model.no_sync()), autocast():
                _, loss = fwd(x, y)
                total = loss + raw_model.aux_loss().to(loss.device) if moe else loss
            (total / train_cfg.grad_accum).backward()
            step_loss += loss.detach() / train_cfg.grad_accum
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        raw_model.update_moe_bias()
        if ddp.world > 1:
            dist.all_reduce(step_loss)
            step_loss /= ddp.world
        step += 1
        tokens_seen += tokens_per_step
        loss_acc += float(step_loss)
        loss_count += 1

        is_eval = (step % train_cfg.eval_interval == 0 and step >= train_cfg.eval_start) or step == train_cfg.max_steps
        is_log = step % train_cfg.log_interval == 0 or is_eval
        val_loss = None

        if is_eval:
            val_loss = evaluate()
        stop = None
        if train_cfg.target_val_loss is not None and val_loss is not None and val_loss <= train_cfg.target_val_loss:
            stop = "target_val_loss"
        if train_cfg.max_time is not None and time.monotonic() - process_start >= train_cfg.max_time:
            stop = stop or "max_time"
        if ddp.world > 1 and train_cfg.max_time is not None:
            flag = torch.tensor([0 if stop is None else 1], device=device)
            dist.broadcast(flag, 0)
            stop = stop or ("max_time" if int(flag) else None)
        if stop == "max_time" and val_loss is None:
            val_loss = evaluate()  # a time budget ends between evals: score the final weights too
        if is_log or stop:
            now = time.monotonic()
            row = {"step": step, "elapsed_s": round(elapsed(), 3), "train_loss": loss_acc / loss_count,
                   "val_loss": val_loss, "tokens_per_s": (tokens_seen - last_log_tokens) / max(now - last_log_time - eval_time, 1e-9),
                   "lr": lr, "tokens": tokens_seen, **_moe_row(raw_model)}
            loss_acc, loss_count, last_log_time, last_log_tokens, eval_time = 0.0, 0, now, tokens_seen, 0.0
            summary["train_loss"] = row["train_loss"]
            if ddp.main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if writer is not None:
                    for key, value in row.items():
                        if key != "step" and isinstance(value, (int, float)):
                            writer.add_scalar(key, value, step)
                if progress:
                    remaining = (train_cfg.max_steps - step) * (now - start_time) / max(1, step - summary["start_step"])
                    if train_cfg.max_time is not None:
                        remaining = min(remaining, max(0.0, train_cfg.max_time - (now - process_start)))
                    progress({"event": "eval" if val_loss is not None else "step", "max_steps": train_cfg.max_steps,
                              "eta_s": remaining, **row})
        if stop or step % ckpt_every == 0 or step == train_cfg.max_steps:
            save_checkpoint()
        if stop:
            summary["stopped"] = stop
            break

    if writer is not None:
        writer.close()
    summary.update(step=step, tokens=tokens_seen, elapsed_s=elapsed(), out_dir=str(out))
    if progress and ddp.main:
        progress({"event": "end", **summary})
    if ddp.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _apply_schedule_fields(scheduler, cfg: TrainConfig) -> None:
    """LambdaLR restores its schedule object's fields; keep them those of the resumed config."""
    schedule = scheduler.lr_lambdas[0]
    schedule.decay_steps = cfg.decay_steps or cfg.max_steps


def _moe_row(model: GPT) -> dict:
    stats = model.moe_stats()
    if not stats:
        return {}
    return {"moe_aux_loss": float(model.aux_loss().detach()), **stats}


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tensorboard(folder: Path, step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder), purge_step=step or None)


def read_metrics(out_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    path = Path(out_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
