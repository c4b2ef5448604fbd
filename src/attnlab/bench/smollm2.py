"""SmolLM2-135M greedy decoding at batch 1: attnlab in fp32, weight-only int8, int4 (SmolLM2's own
4-bit codes), int4 drafting for fp32 (speculative) and bf16 against transformers in fp32, all loaded
from the same GGUF file.

Each row generates the same number of tokens after the same prompt (prefill included), greedily,
one sequence; rows take turns prompt by prompt, so machine noise hits them alike. Next to tokens/s
stand the weight bytes one token reads and the bound they imply at the matrix-vector bandwidth
measured here (:func:`attnlab.device.memory_bandwidth_gbs`): decoding at batch 1 reads every weight
once per token, so bytes ÷ GB/s is the floor of its time. The greedy tokens of every row are
compared with attnlab fp32's: the identical prefix, out of the tokens generated.
"""

from __future__ import annotations

import copy
import importlib.util
import statistics

import torch

from attnlab import device as devices
from attnlab.bench.results import BenchReport, Table, fmt_ratio
from attnlab.errors import ConfigError
from attnlab.generate import DRAFT_TOKENS, speculative_tokens, stream_tokens
from attnlab.hf.smollm2 import load_smollm2, smollm2_gguf_path
from attnlab.quantize import choose_quantization, decode_weight_bytes, int4_lossless, quantize_int4, quantize_int8
from attnlab.timing import time_call

# A story, a chat turn (the model's own format) and two openings of an encyclopaedic text.
PROMPTS = (
    "Once upon a time, in a land far away,",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The history of the Roman Empire",
    "Photosynthesis is the process by which",
)
TRANSFORMERS = "transformers fp32"
REFERENCE = "attnlab fp32"
SPECULATIVE = "attnlab int4 → fp32 (speculative)"
TARGET_SPEEDUP = 2.0  # attnlab's fastest row ÷ transformers fp32
TARGET_MATCH = 32  # greedy tokens identical to attnlab fp32's, every prompt


def _attnlab_rows(dtypes) -> tuple[dict, object]:
    """Row name -> model, and the tokenizer: fp32, int8 and int4 (copies of fp32, quantized), the
    speculative pair (fp32 checking int4's drafts) and bf16 if asked."""
    model, tokenizer = load_smollm2()
    rows = {REFERENCE: model}
    int8 = copy.deepcopy(model)
    quantize_int8(int8)
    rows["attnlab int8"] = int8
    int4 = copy.deepcopy(model)
    quantize_int4(int4)
    rows["attnlab int4"] = int4
    rows[SPECULATIVE] = (model, int4)
    if "bf16" in dtypes:
        rows["attnlab bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    return rows, tokenizer


def _transformers_model():
    """transformers' own load of the GGUF in fp32, or None where transformers/accelerate are missing."""
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None:
        return None
    import transformers

    path = smollm2_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def _generate(row: str, model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy continuation of ids (1, T) by exactly new_tokens tokens, the way each library decodes."""
    if row == TRANSFORMERS:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[0, ids.size(1):].tolist()
    if row == SPECULATIVE:
        return [int(t[0]) for t in speculative_tokens(*model, ids, new_tokens, draft_tokens=DRAFT_TOKENS)]
    return [int(t[0]) for t in stream_tokens(model, ids, new_tokens, temperature=0)]


def _timed(row: str, model, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    out: list[int] = []
    return time_call(lambda: out.extend(_generate(row, model, ids, new_tokens))), out


def _identical_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def run_smollm2(*, prompts=PROMPTS, new_tokens: int = 128, rounds: int = 1, dtypes=("fp32",),
                progress=None) -> dict:
    """Tokens/s, weight bytes per token and greedy-token agreement per row; on the CPU (the int8
    kernel is a CPU one). Returns {"rows": [...], "gbs": matvec GB/s, ...}, or {"missing": why}
    where the SmolLM2 weights are not installed."""
    try:
        smollm2_gguf_path()
    except ConfigError as err:
        return {"missing": str(err)}
    if progress:
        progress("smollm2: loading attnlab fp32/int8/int4" + ("/bf16" if "bf16" in dtypes else "") + " and transformers")
    models, tokenizer = _attnlab_rows(dtypes)
    hf = _transformers_model()
    if hf is not None:
        models[TRANSFORMERS] = hf
    ids = [torch.tensor([tokenizer.encode(p)]) for p in prompts]
    for row, model in models.items():  # warm-up: first calls allocate and pick kernels
        _generate(row, model, ids[0], 2)
    seconds = {row: [] for row in models}
    tokens = {row: [] for row in models}
    for round_ in range(rounds):
        for p, prompt in enumerate(ids):
            if progress:
                progress(f"smollm2: round {round_ + 1}/{rounds}, prompt {p + 1}/{len(ids)}, {new_tokens} tokens per row")
            for row, model in models.items():
                took, out = _timed(row, model, prompt, new_tokens)
                seconds[row].append(took)
                if round_ == 0:
                    tokens[row].append(out)
    gbs = devices.memory_bandwidth_gbs("cpu")["matvec"]
    rows = []
    for row, model in models.items():
        reads = models[REFERENCE] if row == TRANSFORMERS else model[1] if row == SPECULATIVE else model
        weight_bytes = decode_weight_bytes(reads)
        tps = new_tokens / statistics.median(seconds[row])
        bound = gbs * 1e9 / weight_bytes
        matches = [_identical_prefix(t, ref) for t, ref in zip(tokens[row], tokens[REFERENCE])]
        rows.append({"row": row, "tokens_per_s": tps, "weight_bytes": weight_bytes, "bound_tps": bound,
                     "of_bound": tps / bound, "identical_prefix": matches})
    hf_tps = next((r["tokens_per_s"] for r in rows if r["row"] == TRANSFORMERS), None)
    for r in rows:
        r["vs_transformers"] = None if hf_tps is None else r["tokens_per_s"] / hf_tps
    auto, auto_reason = choose_quantization("auto", "cpu", torch.float32, int4_lossless=int4_lossless(models[REFERENCE]))
    return {"rows": rows, "gbs": gbs, "new_tokens": new_tokens, "prompts": list(prompts), "rounds": rounds,
            "transformers": _transformers_version() if hf is not None else None,
            "quantize_auto": {"choice": auto, "reason": auto_reason}}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def smollm2_report(result: dict) -> BenchReport:
    """The results table (one row per way of decoding), the targets and how to read the bound."""
    title = "SmolLM2-135M greedy decoding, batch 1: attnlab fp32 / int8 / int4 / speculative vs transformers fp32"
    if "missing" in result:
        return BenchReport(mode="smollm2_decode", title=title, tables=[], notes=[f"- not run: {result['missing']}"])
    n = result["new_tokens"]
    body = [[r["row"], f"{r['tokens_per_s']:,.1f}", fmt_ratio(r["vs_transformers"]),
             f"{r['weight_bytes'] / 2**20:,.1f}", f"{r['bound_tps']:,.1f}", f"{100 * r['of_bound']:.0f}%",
             f"{min(r['identical_prefix'])}"] for r in result["rows"]]
    table = Table(
        f"{n} new tokens after each prompt (prefill included), median over prompts and rounds",
        ["row", "tokens/s", "÷ transformers", "weight MiB read per token", "bound tokens/s", "% of bound",
         f"tokens = attnlab fp32 (of {n}, worst prompt)"],
        body,
    )
    notes = _targets(result) + [
        (f"- bound: weight bytes per token ÷ fp32 matrix-vector bandwidth measured here, {result['gbs']:.1f} GB/s "
         "(attention over the cache and the Python per layer are not in it)."),
        ("- int8: weight-only, per-output-channel symmetric int8 (attnlab.quantize.Int8Linear on "
         "torch.ops.aten._weight_int8pack_mm, activations rounded to bf16 for the kernel), every Linear of the 30 "
         "blocks (q/k/v and gate/up fused into one call each) and the tied LM head (own int8 copy; the embedding "
         "lookup stays fp32, exact)."),
        ("- int4: attnlab.quantize.Int4Linear on torch.ops.aten._weight_int4pack_mm_for_cpu, groups of 32 with a "
         "scale and a min — the GGUF's own Q4_1 codes, recovered exactly (only their bf16 storage and the bf16 "
         "activations round); q/k/v and gate/up fused into one call each; the LM head (Q8_0 in the GGUF) ranks "
         "the vocabulary in 4 bits and its top 16 logits per token are recomputed in fp32 from the embedding's "
         "rows (attnlab.quantize.RescoredHead)."),
        (f"- speculative: the int4 copy drafts up to {DRAFT_TOKENS} tokens, fp32 checks them in one pass and keeps "
         "the agreeing prefix plus its own next token (attnlab.generate.speculative_tokens): fp32's greedy tokens "
         "by construction; bytes per token are the draft's (fp32's are read once per pass)."),
        (f"- transformers {result['transformers'] or 'not installed'}: `AutoModelForCausalLM.from_pretrained(folder, "
         "gguf_file=...)` in fp32, `generate(do_sample=False, min_new_tokens=max_new_tokens)`."),
        f"- `--quantize auto` here: {result['quantize_auto']['choice']} ({result['quantize_auto']['reason']}).",
        f"- prompts: {', '.join(repr(p) for p in result['prompts'])}; {result['rounds']} round(s), rows interleaved.",
        "- greedy tokens identical to attnlab fp32's, per prompt: " + "; ".join(
            f"{r['row']} {', '.join(str(m) for m in r['identical_prefix'])}" for r in result["rows"]) + f" (of {n}).",
    ]
    return BenchReport(mode="smollm2_decode", title=title, tables=[table], notes=notes,
                       figure=lambda path: _plot(result, path), data=result["rows"])


def _targets(result: dict) -> list[str]:
    by = {r["row"]: r for r in result["rows"]}
    lines = []
    hf = by.get(TRANSFORMERS)
    fastest = max((r for r in result["rows"] if r["row"] != TRANSFORMERS), key=lambda r: r["tokens_per_s"])
    if hf is not None:
        gain = fastest["vs_transformers"]
        lines.append(f"- target: attnlab ≥ {TARGET_SPEEDUP:.0f}× transformers fp32 tokens/s — {fastest['row']} "
                     f"{gain:.2f}× {'✅' if gain >= TARGET_SPEEDUP else '❌'}")
    need = min(TARGET_MATCH, result["new_tokens"])
    for r in result["rows"]:
        if r["row"] in (REFERENCE, TRANSFORMERS):
            continue
        worst = min(r["identical_prefix"])
        speed = f", {r['vs_transformers']:.2f}× transformers" if r.get("vs_transformers") else ""
        lines.append(f"- target: {r['row']}'s greedy tokens = attnlab fp32's for the first {need} on every prompt "
                     f"— worst prompt {worst}{speed} {'✅' if worst >= need else '❌'}")
    return lines


def _plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["row"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(names, [r["tokens_per_s"] for r in rows], color="tab:blue", label="measured")
    ax.scatter(names, [r["bound_tps"] for r in rows], color="tab:red", marker="_", s=900, label="bandwidth bound")
    ax.set_ylabel("tokens/s (batch 1, greedy)")
    ax.set_title("SmolLM2-135M decoding")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
