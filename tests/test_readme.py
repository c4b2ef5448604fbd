"""The README's Python examples run as written (a renamed module or argument breaks this test, not a reader)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)
# Blocks that read folders a reader makes first (a checkpoint of their own, an earlier command's output).
NEEDS_FILES = ("path/to/", "runs/")
RUNNABLE = [b for b in BLOCKS if not any(marker in b for marker in NEEDS_FILES)]


def test_the_readme_has_self_contained_examples():
    assert len(RUNNABLE) >= 3, f"{len(RUNNABLE)} of {len(BLOCKS)} README python blocks run on their own"


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.splitlines()[1][:40] for b in RUNNABLE])
def test_a_readme_example_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})
