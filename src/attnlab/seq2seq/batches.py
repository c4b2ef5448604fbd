"""The Trainer's batch source for a seq2seq run: a seeded stream of training examples framed for
one model, and a fixed held-out validation set (the Trainer's periodic val loss).

Every model of a run gets a source with the same seed, so all of them see the same examples in
the same order; only the framing (encoder–decoder or decoder-only) differs.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from attnlab.seq2seq.tasks import Task

Examples = list[tuple[list[int], list[int]]]


def draw(task: Task, rng: random.Random, lengths, *, held_out: bool) -> Examples:
    """One encoded example per entry of ``lengths`` (input lengths), from the held-out share or the rest."""
    return [tuple(map(task.encode, task.sample(rng, length, held_out=held_out))) for length in lengths]


class ExampleBatches:
    """``next()``: batch_size training examples, input lengths uniform in [task.min_length, max_length],
    framed by ``frame``; ``eval_batches(step)``: the same held-out val examples at every step."""

    def __init__(self, task: Task, frame: Callable[[Examples], tuple[torch.Tensor, ...]], *, batch_size: int,
                 max_length: int, seed: int, val_examples: int = 256):
        self.task, self.frame, self.batch_size, self.max_length = task, frame, batch_size, max_length
        self.rng = random.Random(seed)
        val_rng = random.Random(seed + 1)
        val = draw(task, val_rng, [val_rng.randint(task.min_length, max_length) for _ in range(val_examples)],
                   held_out=True)
        self.val = [frame(val[i:i + batch_size]) for i in range(0, len(val), batch_size)]
        self.block_size = 2 * max_length + 2  # the longest framed sequence (decoder-only: input <sep> output <eos>)
        self._targets = 0

    @property
    def tokens_per_batch(self) -> int:
        """Target tokens (outputs + EOS) of the batch drawn last: what the loss was computed on."""
        return self._targets

    def next(self) -> tuple[torch.Tensor, ...]:
        lengths = [self.rng.randint(self.task.min_length, self.max_length) for _ in range(self.batch_size)]
        batch = self.frame(draw(self.task, self.rng, lengths, held_out=False))
        self._targets = int((batch[-1] != -1).sum())
        return batch

    def eval_batches(self, step: int) -> list[tuple[torch.Tensor, ...]]:
        return self.val

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
