"""``attnlab train``: a language model (GPT by default, or any registered LM) trained on a text
corpus into a run folder, by the one :class:`~attnlab.trainer.Trainer`.

A run folder holds config.json, tokenizer.json and model.safetensors (loadable with
``attnlab.models.load_pretrained``), checkpoint.pt (weights, optimizer, schedule, RNG, batch
position), train_config.json, metrics.jsonl, data/ (the encoded train/val split) and, when
tensorboard is installed, tb/. Everything a run needs is checked before anything is written, so
a refused command leaves no trace.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from attnlab import device as devices
from attnlab.data.batches import WindowBatches
from attnlab.data.corpus import TokenDataset, encode, load_corpus, split_tokens, write_dataset
from attnlab.data.tokenizer import train_tokenizer
from attnlab.errors import ConfigError
from attnlab.files import write_json
from attnlab.models.base import CONFIG_NAME, load_pretrained, load_tokenizer_from, model_class, read_config
from attnlab.options import merge
from attnlab.trainer import CHECKPOINT, METRICS, Trainer, TrainConfig, init_distributed, load_checkpoint

log = logging.getLogger("attnlab")

TRAIN_CONFIG = "train_config.json"
MODEL_TYPES = ("gpt", "mlp", "rnn")  # the registered language models (models.base.model_class) this trainer runs
DATA = "data"
_RUN_FILES = (CHECKPOINT, METRICS, CONFIG_NAME, "model.safetensors", "tokenizer.json", TRAIN_CONFIG)


@dataclass
class _Saved:
    """What an earlier start of the run left in its folder."""

    model: dict  # config.json (with model_type)
    train: dict  # train_config.json
    checkpoint: dict | None  # None: killed before its first checkpoint


def train(out_dir, *, model=None, config: TrainConfig | dict | None = None, dataset: TokenDataset | None = None,
          resume: bool = False, overwrite: bool = False, progress: Callable[[dict], None] | None = None,
          clock: str = "process", init: str | None = None) -> dict:
    """Train a language model into ``out_dir``; returns the trainer's summary (steps, losses, timings).

    model: a config object or a dict of its fields (with "model_type": "gpt" by default, "mlp", ...)
    overriding the defaults, or with resume=True the saved run's (where they must agree).
    config: a TrainConfig or a dict overriding its defaults (on resume only TrainConfig.RESUMABLE may change).
    dataset: an already prepared dataset to train on instead of reading config.corpus (attnlab compare).
    progress: called on rank 0 with {"event": "start" | "step" | "eval" | "end", ...}.
    init: a model folder (save_pretrained, attnlab convert) to start from: its weights, architecture and
    tokenizer (e.g. healing a converted model); model overrides are then refused.
    """
    out = Path(out_dir)
    model_over = _as_dict(model)
    train_over = _as_dict(config)
    start = _init_from(init, model_over, resume)
    saved = _saved_run(out, resume, overwrite)
    if saved is not None:
        _check_same_run(out, saved, model_over, train_over)
    train_cfg = merge(TrainConfig, saved.train if saved else {}, train_over)

    ddp = init_distributed(train_cfg.device)
    device = devices.resolve_device(train_cfg.device, ddp.local_rank)
    threads, _ = devices.choose_threads(train_cfg.threads)
    torch.set_num_threads(threads)
    precision = devices.choose_precision(train_cfg.dtype, device)

    data_dir = Path(saved.checkpoint.get("dataset", out / DATA)) if saved and saved.checkpoint else out / DATA
    if dataset is None and saved is not None and (data_dir / "meta.json").is_file():
        dataset = TokenDataset(data_dir)
    if dataset is not None:
        tokenizer, splits = dataset.tokenizer(), (dataset.tokens("train"), dataset.tokens("val"))
    else:  # in memory until every check has passed
        text = load_corpus(train_cfg.corpus)
        tokenizer = start[1] if start else train_tokenizer(train_cfg.tokenizer, text, train_cfg.vocab_size)
        splits = split_tokens(encode(tokenizer, text), train_cfg.val_fraction)

    model_fields = dict(saved.model) if saved else {**model_over, "vocab_size": tokenizer.vocab_size}
    if start:
        model_fields = {"model_type": start[0].model_type, **dataclasses.asdict(start[0].config)}
    model_type = model_fields.pop("model_type", "gpt")
    cls = model_class(model_type)
    model_cfg = merge(cls.config_class, {}, model_fields)
    block_size = train_cfg.block_size or model_cfg.block_size
    eval_block = train_cfg.eval_block_size or block_size
    for name, value in (("block_size", block_size), ("eval_block_size", eval_block)):
        if value > model_cfg.block_size and getattr(model_cfg, "positions", None) is not None:
            raise ConfigError(f"{name}={value} is larger than the model's block_size={model_cfg.block_size}: "
                              "a GPT sees at most block_size tokens")
    batches = WindowBatches(*splits, batch_size=train_cfg.batch_size, block_size=block_size, seed=train_cfg.seed,
                            eval_iters=train_cfg.eval_iters, eval_batch_size=train_cfg.eval_batch_size,
                            eval_block_size=eval_block)
    torch.manual_seed(train_cfg.seed)
    lm = (start[0] if start else cls.from_config(model_cfg)).to(device)

    if ddp.main and (saved is None or saved.checkpoint is None):  # every check passed: now write the run
        _start_folder(out, lm, tokenizer, train_cfg, None if dataset is not None else splits)
        if saved is not None:
            log.info(f"--resume: {str(out)!r} holds no checkpoint yet (the run stopped before its first one): "
                     "starting it from step 0 with its saved settings")
    if ddp.world > 1:
        dist.barrier()  # rank 0 has written the run folder
    meta = {"model_config": {"model_type": model_type, **dataclasses.asdict(model_cfg)},
            "train_config": dataclasses.asdict(train_cfg), "dataset": str(dataset.folder if dataset else out / DATA)}
    trainer = Trainer(lm, train_cfg, batches, device=device, precision=precision, out_dir=out, ddp=ddp,
                      checkpoint_meta=meta, progress=progress, clock=clock)
    if saved is not None and saved.checkpoint is not None:
        trainer.restore(saved.checkpoint)
    summary = trainer.fit()
    if ddp.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _init_from(init, model_over: dict, resume: bool):
    """(model, tokenizer) of the ``init`` folder, or None without one; refuses what cannot go with it."""
    if init is None:
        return None
    if resume:
        raise ConfigError("init starts a new run from a model folder; resume continues a run: pass one of them")
    extra = sorted(k for k in model_over if k != "model_type")
    if extra:
        raise ConfigError(f"init={str(init)!r} brings its own architecture: model settings {extra} cannot change it")
    lm = load_pretrained(init)
    tokenizer = load_tokenizer_from(init)
    if tokenizer is None:
        raise ConfigError(f"init={str(init)!r} has no tokenizer.json: training needs the model's own tokenizer")
    if lm.model_type not in MODEL_TYPES:
        raise ConfigError(f"init={str(init)!r} holds a {lm.model_type!r} model: train runs {', '.join(MODEL_TYPES)}")
    return lm, tokenizer


def _as_dict(config) -> dict:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config)


def _saved_run(out: Path, resume: bool, overwrite: bool) -> _Saved | None:
    """The earlier start of this run to continue (resume) or None; refuses a folder it may not use."""
    if not resume:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"out={str(out)!r} exists and is not a folder: choose another --out")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise ConfigError(f"out={str(out)!r} already exists and is not empty: pass --overwrite to replace its run, "
                              "--resume to continue it, or choose another --out")
        return None
    if (out / CHECKPOINT).is_file():
        ckpt = load_checkpoint(out / CHECKPOINT)
        return _Saved(ckpt["model_config"], ckpt["train_config"], ckpt)
    if (out / TRAIN_CONFIG).is_file() and (out / CONFIG_NAME).is_file():
        try:
            train_saved = json.loads((out / TRAIN_CONFIG).read_text(encoding="utf-8"))
        except ValueError as err:
            raise ConfigError(f"{str(out / TRAIN_CONFIG)!r} is corrupt (not JSON): {err}") from None
        return _Saved(read_config(out), train_saved, None)
    raise ConfigError(f"--resume: {str(out)!r} holds no {CHECKPOINT} and no {TRAIN_CONFIG}: nothing to resume "
                      "(start without --resume)")


def _check_same_run(out: Path, saved: _Saved, model_over: dict, train_over: dict) -> None:
    mismatch = [f"{k}: checkpoint has {saved.model.get(k)!r}, requested {v!r}"
                for k, v in model_over.items() if k != "vocab_size" and saved.model.get(k) != v]
    mismatch += [f"{k}: checkpoint has {saved.train.get(k)!r}, requested {v!r}"
                 for k, v in train_over.items() if k not in TrainConfig.RESUMABLE and saved.train.get(k) != v]
    if mismatch:
        raise ConfigError(f"the checkpoint in {str(out)!r} does not match the requested run (" + "; ".join(mismatch)
                          + "): resume with the same settings, or start a fresh run in another --out")


def _start_folder(out: Path, model, tokenizer, train_cfg: TrainConfig, splits) -> None:
    """Replace an earlier run's files (never anything else in the folder) and write this run's start."""
    out.mkdir(parents=True, exist_ok=True)
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)
    if splits is not None:
        write_dataset(out / DATA, *splits, tokenizer)
    model.save_pretrained(out, tokenizer)
    write_json(out / TRAIN_CONFIG, dataclasses.asdict(train_cfg))


