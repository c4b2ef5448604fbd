"""Batches of a token array, drawn the way nanoGPT draws them, for the trainer and the evaluations.

- :func:`sample_windows`: random windows x (B, T) and their next tokens y (B, T);
- :class:`WindowBatches`: the trainer's batch source for a language model — random train windows
  from a seeded generator (its state is checkpointed, so a resumed run sees the same batches) and
  seeded val windows for the periodic estimate;
- :func:`spread_windows`: fixed windows spread evenly over a split (the final scores of compare).
"""

from __future__ import annotations

import numpy as np
import torch

from attnlab.errors import ConfigError

EVAL_CHUNK = 256  # windows scored per forward in an evaluation (bigger matmuls, same mean)


def sample_windows(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """nanoGPT's batches: random windows x (B, T) of ``data`` and the next tokens y (B, T)."""
    if len(data) <= block_size:
        raise ConfigError(f"a split of {len(data)} tokens is too short for windows of {block_size} "
                          "(it needs at least block_size + 1): use a smaller block_size or a larger corpus")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    chunk = torch.as_tensor(data)[ix.unsqueeze(1) + torch.arange(block_size + 1)]  # (B, T + 1)
    return chunk[:, :-1], chunk[:, 1:]


def as_tokens(ids) -> torch.Tensor:
    """An int64 tensor of token ids from a numpy array (memory-mapped or not) or a tensor."""
    if isinstance(ids, torch.Tensor):
        return ids.long()
    return torch.from_numpy(np.asarray(ids, dtype=np.int64))


class WindowBatches:
    """Train batches of random windows and seeded val batches for a language model's trainer.

    ``next()`` gives the next global train batch (x, y); ``eval_batches(step)`` the val windows of
    the estimate at ``step`` (``eval_iters`` draws of ``eval_batch_size`` windows, nanoGPT's
    estimate_loss, scored in chunks of EVAL_CHUNK). The same seed gives the same batches.
    """

    def __init__(self, train, val, *, batch_size: int, block_size: int, seed: int, eval_iters: int = 20,
                 eval_batch_size: int | None = None, eval_block_size: int | None = None):
        self.train, self.val = as_tokens(train), as_tokens(val)
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.eval_iters = eval_iters
        self.eval_batch_size = eval_batch_size or batch_size
        self.eval_block_size = eval_block_size or block_size
        for split, tokens, block in (("train", self.train, block_size), ("val", self.val, self.eval_block_size)):
            if len(tokens) <= block:
                raise ConfigError(f"the {split} split has {len(tokens)} tokens, too few for windows of {block}: "
                                  "use a smaller block_size or a larger corpus")
        self.generator = torch.Generator().manual_seed(seed + 1)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.block_size

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_windows(self.train, self.batch_size, self.block_size, self.generator)

    def eval_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        windows = [sample_windows(self.val, self.eval_batch_size, self.eval_block_size, generator)
                   for _ in range(self.eval_iters)]
        x, y = torch.cat([w[0] for w in windows]), torch.cat([w[1] for w in windows])  # (iters * B, T)
        return list(zip(x.split(EVAL_CHUNK), y.split(EVAL_CHUNK)))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def random_batches(vocab_size: int, *, batch_size: int, block_size: int, seed: int = 0) -> WindowBatches:
    """Windows of uniformly random token ids: a batch source for timing a training step (speed
    does not depend on the text)."""
    tokens = torch.randint(vocab_size, (max(100_000, 4 * block_size),), generator=torch.Generator().manual_seed(seed))
    return WindowBatches(tokens, tokens, batch_size=batch_size, block_size=block_size, seed=seed)


def spread_windows(tokens, count: int, length: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens spread evenly over ``tokens``, (count, length) int64."""
    if len(tokens) < length:
        raise ConfigError(f"the val split has {len(tokens)} tokens, too few for one eval window of {length} "
                          "(block_size + 1): use a smaller block_size or a larger corpus")
    starts = np.unique(np.linspace(0, len(tokens) - length, num=count).astype(np.int64))
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + length], dtype=np.int64) for s in starts]))
