"""DDP: torchrun with 2 CPU processes (gloo), each with half the batch, follows the same loss
curve as 1 process with the whole batch; only rank 0 writes the run folder."""

import random
import subprocess
import sys

import pytest

from attnlab.train import train
from attnlab.trainer import read_metrics

# Per-step losses agree to float32 round-off: the 2-process gradient is the mean of two
# half-batch means (all-reduced), the 1-process one the mean over the whole batch.
TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_processes_with_half_the_batch_follow_one_process(tmp_path):
    rng = random.Random(0)
    words = "to be or not to be that is the question whether tis nobler in the mind".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(600)) + "\n")
    settings = dict(corpus=str(corpus), batch_size=8, max_steps=8, eval_interval=4, eval_iters=2, log_interval=1,
                    lr=1e-2, warmup_steps=0, threads=1, dtype="float32")
    model = dict(n_layer=1, n_head=2, d_model=32, block_size=16)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**settings, **model}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "attnlab", "train", "--out", str(tmp_path / "ddp"), "--quiet", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "x2" in done.stdout and done.stdout.count("steps (max_steps)") == 1  # rank 0 alone reports

    train(tmp_path / "single", model=model, config=settings)
    two, one = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "single")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 9))
    assert one[-1]["train_loss"] < one[0]["train_loss"] - 0.3  # the curve really moves
    for a, b in zip(two, one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=TOLERANCE)
        if b["val_loss"] is not None:
            assert a["val_loss"] == pytest.approx(b["val_loss"], abs=TOLERANCE)
