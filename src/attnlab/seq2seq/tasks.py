"""Synthetic sequence-to-sequence tasks, generated from a seed (nothing is downloaded).

- ``reverse``: a string of digits, backwards — every output symbol depends on one input position,
  the last output on the first input: the pure test of a fixed-size bottleneck;
- ``copy``: the same digits, in order;
- ``sort``: the digits in ascending order (the output depends on counts, not positions);
- ``dates``: a date written in one of many human formats ("Wednesday, March 3, 2021", "3.3.21",
  "the 3rd of March 2021") to ISO ``YYYY-MM-DD`` — an alignment a reader can check.

Every example has an exact input ``length`` (characters). Held-out examples are set apart by a
hash of their input (1 in :data:`HELD_OUT_EVERY`), so evaluation never sees a training input at
any length, and the same seed always gives the same examples.
"""

from __future__ import annotations

import datetime
import functools
import random
import zlib
from dataclasses import dataclass
from typing import Callable

from attnlab.errors import ConfigError

PAD, BOS, EOS, SEP = 0, 1, 2, 3  # special ids; a task's symbols follow
SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>")
HELD_OUT_EVERY = 10
_MAX_TRIES = 100_000

DIGITS = "0123456789"
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
FIRST_DAY, LAST_DAY = datetime.date(1950, 1, 1), datetime.date(2049, 12, 31)  # two-digit years: 50-99 → 19xx


def _ordinal(day: int) -> str:
    return f"{day}{'th' if 10 <= day % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th')}"


DATE_FORMATS: tuple[Callable[[datetime.date], str], ...] = (
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",  # 3 March 2021
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",  # March 3, 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",  # 3 Mar 2021
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year % 100:02d}",  # Mar 3 21
    lambda d: f"{d.day}.{d.month}.{d.year % 100:02d}",  # 3.3.21
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",  # 03.03.2021
    lambda d: f"{d.year}/{d.month}/{d.day}",  # 2021/3/3
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",  # Wednesday, March 3, 2021
    lambda d: f"{WEEKDAYS[d.weekday()][:3]} {d.day} {MONTHS[d.month - 1][:3]} {d.year}",  # Wed 3 Mar 2021
    lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",  # the 3rd of March 2021
    lambda d: f"{MONTHS[d.month - 1].lower()} {_ordinal(d.day)} {d.year % 100:02d}",  # march 3rd 21
)


@dataclass(frozen=True)
class Task:
    """One task: its name, the characters it writes, the shortest input it makes, and how to make one."""

    name: str
    symbols: str
    min_length: int
    max_length: int | None  # None: any length
    make: Callable[[random.Random, int], tuple[str, str]]  # (rng, input length) -> (input, output)
    summary: str

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.symbols)

    def encode(self, text: str) -> list[int]:
        ids = {c: i + len(SPECIALS) for i, c in enumerate(self.symbols)}
        return [ids[c] for c in text]

    def decode(self, ids) -> str:
        """Symbols of ``ids`` as text (special ids are dropped)."""
        return "".join(self.symbols[i - len(SPECIALS)] for i in ids if i >= len(SPECIALS))

    def tokens(self, ids) -> list[str]:
        """One readable label per id, specials included (for pictures)."""
        return [SPECIALS[i] if i < len(SPECIALS) else self.symbols[i - len(SPECIALS)] for i in ids]

    def sample(self, rng: random.Random, length: int, *, held_out: bool) -> tuple[str, str]:
        """One example with an input of exactly ``length`` characters, from the held-out share or the rest."""
        for _ in range(_MAX_TRIES):
            source, target = self.make(rng, length)
            if is_held_out(source) == held_out:
                return source, target
        raise ConfigError(f"task {self.name!r} made no {'held-out' if held_out else 'training'} input of length "
                          f"{length} in {_MAX_TRIES:,} tries: use lengths it can make (>= {self.min_length})")


def is_held_out(source: str) -> bool:
    """Whether an input belongs to the evaluation share (a stable hash, the same in every run)."""
    return zlib.crc32(source.encode("utf-8")) % HELD_OUT_EVERY == 0


def _digits(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(length))


def _reverse(rng, length):
    source = _digits(rng, length)
    return source, source[::-1]


def _copy(rng, length):
    source = _digits(rng, length)
    return source, source


def _sort(rng, length):
    source = _digits(rng, length)
    return source, "".join(sorted(source))


@functools.cache
def _dates_by_length() -> dict[int, list[tuple[int, int]]]:
    """Every (format, day) pair of the date range, grouped by the length of its text (built once)."""
    table: dict[int, list[tuple[int, int]]] = {}
    for ordinal in range(FIRST_DAY.toordinal(), LAST_DAY.toordinal() + 1):
        day = datetime.date.fromordinal(ordinal)
        for index, fmt in enumerate(DATE_FORMATS):
            table.setdefault(len(fmt(day)), []).append((index, ordinal))
    return table


def _date(rng: random.Random, length: int) -> tuple[str, str]:
    """A date written in a format whose text is ``length`` characters long (uniform over such pairs)."""
    table = _dates_by_length()
    if length not in table:
        raise ConfigError(f"task 'dates' writes inputs of {min(table)} to {max(table)} characters (not every "
                          f"length between): length={length} is not among them")
    index, ordinal = rng.choice(table[length])
    day = datetime.date.fromordinal(ordinal)
    return DATE_FORMATS[index](day), day.isoformat()


_DATE_SYMBOLS = "".join(sorted(set(DIGITS + "-/., " + "".join(MONTHS) + "".join(WEEKDAYS) + "theofndrst"
                                   + "".join(MONTHS).lower())))

TASKS = {
    "reverse": Task("reverse", DIGITS, 1, None, _reverse, "digits, written backwards"),
    "copy": Task("copy", DIGITS, 1, None, _copy, "digits, copied in order"),
    "sort": Task("sort", DIGITS, 1, None, _sort, "digits, sorted ascending"),
    "dates": Task("dates", _DATE_SYMBOLS, 6, 29, _date, f"a date in one of {len(DATE_FORMATS)} human formats, to ISO YYYY-MM-DD"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is not allowed: expected one of {', '.join(map(repr, TASKS))}")
    return TASKS[name]
