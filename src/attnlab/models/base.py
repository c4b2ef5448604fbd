"""Saving and loading models as HF-style folders: ``config.json`` (the config dataclass plus a
"model_type"), ``model.safetensors`` and, when given, ``tokenizer.json``. A model is rebuilt
from its folder alone; :func:`load_pretrained` picks the class from "model_type"."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from attnlab.files import atomic_output
from attnlab.data.tokenizer import load_tokenizer
from attnlab.errors import ConfigError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"

_REGISTRY: dict[str, type] = {}


def register_model(model_type: str, cls: type) -> type:
    """Make ``load_pretrained`` build ``cls`` for folders whose config says ``model_type``."""
    _REGISTRY[model_type] = cls
    return cls


def read_config(folder: str | os.PathLike) -> dict:
    """The parsed config.json of a model folder; a missing or corrupt one is a ConfigError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"model folder {str(folder)!r} does not exist")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"model folder {str(folder)!r} has no {CONFIG_NAME}: it was not written by save_pretrained")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(path)!r} is corrupt (not JSON): {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ConfigError(f"{str(path)!r} is corrupt: expected a JSON object with a string 'model_type'")
    return data


def model_class(model_type: str) -> type:
    """The model class registered for ``model_type`` (every module of :mod:`attnlab.models` registers
    its models when the package is imported, which importing this module already did)."""
    if model_type not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ConfigError(f"model_type={model_type!r} is not allowed: expected one of {known}")
    return _REGISTRY[model_type]


def load_pretrained(folder: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Any saved attnlab model, rebuilt from its folder alone (the class comes from "model_type")."""
    model_type = read_config(folder)["model_type"]
    try:
        cls = model_class(model_type)
    except ConfigError as err:
        raise ConfigError(f"{str(Path(folder) / CONFIG_NAME)!r} has {err}") from None
    return cls.from_pretrained(folder, map_location=map_location)


class SaveLoadMixin:
    """``from_config`` / ``save_pretrained`` / ``from_pretrained`` for a model whose settings are
    the dataclass ``self.config`` (of type ``config_class``). nn.Modules save their state_dict;
    other models override ``state_tensors`` and ``load_state_tensors``."""

    model_type: str
    config_class: type

    @classmethod
    def from_config(cls, config):
        return cls(**dataclasses.asdict(config))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        # clone() unties shared weights (safetensors refuses aliased storage); load_state_dict re-ties them
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ConfigError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def save_pretrained(self, folder: str | os.PathLike, tokenizer=None) -> Path:
        """Write config.json, model.safetensors (and tokenizer.json) into ``folder``; each file atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"model_type": self.model_type, **dataclasses.asdict(self.config)}
        with atomic_output(folder / WEIGHTS_NAME) as tmp:
            save_file(self.state_tensors(), str(tmp), metadata={"format": "pt", "model_type": self.model_type})
        with atomic_output(folder / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(folder / TOKENIZER_NAME)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, map_location: str | torch.device = "cpu"):
        """Rebuild the model saved in ``folder`` (in eval mode for nn.Modules)."""
        folder = Path(folder)
        data = read_config(folder)
        if data.pop("model_type") != cls.model_type:
            raise ConfigError(f"{str(folder / CONFIG_NAME)!r} is not a {cls.model_type!r} model: use attnlab.models.load_pretrained")
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{str(folder / CONFIG_NAME)!r} has unknown fields {unknown}: expected {sorted(names)}")
        try:
            config = cls.config_class(**data)
        except TypeError as err:
            raise ConfigError(f"{str(folder / CONFIG_NAME)!r} is incomplete: {err}") from None
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise ConfigError(f"model folder {str(folder)!r} has no {WEIGHTS_NAME}")
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise ConfigError(f"{str(weights)!r} is corrupt: {err}") from None
        model = cls.from_config(config)
        model.load_state_tensors(tensors)
        if isinstance(model, nn.Module):
            model.to(map_location).eval()
        return model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, active per token) parameters; modules with ``inactive_params()`` (an MoE layer: its
    routed experts beyond the top-k) say how many of theirs a token does not use."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum(m.inactive_params() for m in model.modules() if hasattr(m, "inactive_params"))
    return total, total - inactive


def load_tokenizer_from(folder: str | os.PathLike):
    """The tokenizer saved next to a model, or None if the folder has none."""
    path = Path(folder) / TOKENIZER_NAME
    return load_tokenizer(path) if path.is_file() else None
