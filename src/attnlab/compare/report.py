"""The report of an ``attnlab compare`` folder: report.md and one self-contained report.html
(inline CSS, plots as base64 data: URIs, no scripts, no links), plus the PNG plots.

Everything is read back from the folder: compare.json (run settings, machine), each model's
result.json (final scores) and metrics.jsonl (the trainer's log), so a report can be rebuilt
from the folder alone with :func:`write_report`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from pathlib import Path

from attnlab.bench.results import markdown_table
from attnlab.compare.layout import (ATTENTION_PNG, KV_PNG, LOSS_TIME_PNG, LOSS_TOKENS_PNG, MOE_PNG, REPORT_HTML,
                                    REPORT_MD, RESULT, RUN_INFO)
from attnlab.device import describe_machine
from attnlab.files import read_jsonl, write_text
from attnlab.trainer import METRICS
TABLE_HEADERS = ["model", "status", "params (total)", "params (active)", "val loss", "perplexity", "bits/char",
                 "train tok/s", "wall time", "steps", "train tokens", "KV cache B/token", "KV cache @ context",
                 "decode tok/s"]
_COLORS = {"ngram": "#7f7f7f", "mlp": "#8c564b", "mha": "#1f77b4", "gqa": "#2ca02c", "mqa": "#bcbd22",
           "mla": "#d62728", "mha-moe": "#9467bd", "mla-moe": "#ff7f0e"}


def load_run(out) -> tuple[dict, dict]:
    """(compare.json, {model: result.json + "metrics": rows}) of a comparison folder, in run order."""
    out = Path(out)
    info = json.loads((out / RUN_INFO).read_text(encoding="utf-8"))
    results = {}
    for name in info["config"]["models"]:
        path = out / name / RESULT
        if not path.is_file():
            continue
        result = json.loads(path.read_text(encoding="utf-8"))
        metrics = out / name / METRICS
        result["metrics"] = read_jsonl(metrics) if metrics.is_file() else []
        results[name] = result
    return info, results


def table_values(result: dict) -> dict:
    """The measured numbers of one table row (None where a model has no such number)."""
    rows = result["metrics"]
    values = {key: result.get(key) for key in ("params_total", "params_active", "val_loss", "perplexity",
                                               "bits_per_char", "kv_bytes_per_token", "kv_bytes_full_context",
                                               "decode_tokens_per_s", "steps", "tokens")}
    if result["model"] == "ngram":
        tried = result.get("orders_tried", {})
        values["wall_s"] = sum(t["fit_s"] for t in tried.values()) if tried else None
        values["tokens_per_s"] = result["tokens"] / result["train_s"] if result.get("train_s") else None
    else:
        values["wall_s"] = rows[-1]["elapsed_s"] if rows else None
        speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
        values["tokens_per_s"] = statistics.median(speeds) if speeds else None
        if rows:
            values["steps"], values["tokens"] = rows[-1]["step"], rows[-1]["tokens"]
    return values


def _num(value, digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:,.{digits}f}"


def _bytes(value) -> str:
    if value is None:
        return "—"
    return f"{value:,} B" if value < 10240 else f"{value / 1024:,.1f} KiB"


def _seconds(value) -> str:
    if value is None:
        return "—"
    return f"{value:.1f} s" if value < 120 else f"{int(value // 60)} min {value % 60:.0f} s"


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, result in results.items():
        v = table_values(result)
        status = result["status"] if result["status"] == "ok" else f"**{result['status']}**: {result.get('note', '')}"
        label = result["label"] + (f" (n={result['n']})" if name == "ngram" else "")
        rows.append([label, status, _num(v["params_total"]), _num(v["params_active"]), _num(v["val_loss"], 4),
                     _num(v["perplexity"], 2), _num(v["bits_per_char"], 3), _num(v["tokens_per_s"]),
                     _seconds(v["wall_s"]), _num(v["steps"]), _num(v["tokens"]), _bytes(v["kv_bytes_per_token"]),
                     _bytes(v["kv_bytes_full_context"]), _num(v["decode_tokens_per_s"])])
    return rows


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, metadata={"Software": None})


def _curves(results: dict, path: Path, x_key: str, x_label: str) -> None:
    fig = _figure(7.5, 4.6)
    ax = fig.subplots()
    for name, result in results.items():
        color = _COLORS.get(name)
        if name == "ngram":
            if result.get("val_loss") is not None:
                ax.axhline(result["val_loss"], color=color, linestyle="--", linewidth=1.2,
                           label=f"{result['label']} (n={result['n']}), fit once")
            continue
        points = [(r[x_key], r["val_loss"])
                  for r in result["metrics"] if r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
        if not points:
            continue
        xs, ys = zip(*points)
        label = result["label"] + ("" if result["status"] == "ok" else f" ({result['status']})")
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.6, color=color, label=label)
        if result.get("val_loss") is not None and result["metrics"]:
            ax.plot([result["metrics"][-1][x_key]], [result["val_loss"]], marker="*", markersize=11, color=color, linestyle="none")
    finals = [r["val_loss"] for r in results.values() if r.get("val_loss") is not None]
    if finals:  # the early, near-uniform losses would squash the interesting end of the curves
        ax.set_ylim(min(finals) - 0.1, min(max(finals) + 0.9, ax.get_ylim()[1]))
    ax.set_xlabel(x_label)
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title("val loss during training (★ = final score on the fixed val windows)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)


def _kv_plot(results: dict, path: Path) -> None:
    fig = _figure(6.5, 4.4)
    ax = fig.subplots()
    for name, result in results.items():
        if result.get("kv_bytes_per_token") is None or result.get("val_loss") is None:
            continue
        ax.scatter([result["kv_bytes_per_token"]], [result["val_loss"]], s=60, color=_COLORS.get(name), zorder=3)
        ax.annotate(result["label"].replace("GPT · ", ""), (result["kv_bytes_per_token"], result["val_loss"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: _bytes(int(value))))
    ax.margins(x=0.2, y=0.12)
    ax.set_xlabel("KV cache bytes per token (all layers, log scale)")
    ax.set_ylabel("final val loss (nats/token)")
    ax.set_title("memory per token vs quality (lower left is better)")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _moe_plot(results: dict, path: Path) -> bool:
    moe = {n: r for n, r in results.items() if any("moe_tokens_per_expert" in row for row in r["metrics"])}
    if not moe:
        return False
    fig = _figure(4.2 * len(moe) + 0.8, 3.8)
    axes = fig.subplots(1, len(moe), squeeze=False)[0]
    for ax, (name, result) in zip(axes, moe.items()):
        rows = [r for r in result["metrics"] if "moe_tokens_per_expert" in r]
        per_expert = [[sum(layer[e] for layer in r["moe_tokens_per_expert"]) for e in range(len(r["moe_tokens_per_expert"][0]))]
                      for r in rows]
        shares = [[c / max(1, sum(counts)) for c in counts] for counts in per_expert]
        steps = [r["step"] for r in rows]
        ax.stackplot(steps, list(zip(*shares)), labels=[f"expert {e}" for e in range(len(shares[0]))], alpha=0.85)
        for k in range(1, len(shares[0])):  # where the band edges sit when every expert gets an equal share
            ax.axhline(k / len(shares[0]), color="black", linewidth=0.5, linestyle=":", alpha=0.6)
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.set_ylabel("share of routed tokens")
        ax.set_title(f"{result['label']}\nmax/mean load at the end: {rows[-1]['moe_load_imbalance']:.2f}", fontsize=9)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _save(fig, path)
    return True


def _blocks(out: Path, info: dict, results: dict) -> list[tuple]:
    """The report as a list of blocks: ("h", text), ("p", text), ("table", headers, rows),
    ("img", file, alt), ("pre", text), ("list", items)."""
    cfg, machine = info["config"], info["machine"]
    kind, amount = info["budget"]["kind"], info["budget"]["amount"]
    budget = f"{amount:g} s of wall time" if kind == "time" else f"{amount:,.0f} training tokens"
    ok = {n: r for n, r in results.items() if r["status"] == "ok" and r.get("val_loss") is not None}
    kv_dtype = next((r["kv_dtype"] for r in results.values() if r.get("kv_dtype")), "float32")
    blocks = [("h1", "attnlab compare: the model family on one budget")]
    if ok:
        best = min(ok, key=lambda n: ok[n]["val_loss"])
        blocks.append(("p", f"Best val loss: **{ok[best]['label']}** at {ok[best]['val_loss']:.4f} nats/token "
                            f"({ok[best]['bits_per_char']:.3f} bits/char). Every number below was measured in this run."))
    if info.get("interrupted"):
        blocks.append(("p", "**Interrupted** (Ctrl-C): the report covers the models that ran before the stop."))
    missing = [m for m in cfg["models"] if m not in results]
    if missing:
        blocks.append(("p", f"Not run: {', '.join(missing)}."))
    blocks += [
        ("h2", "Results"),
        ("table", TABLE_HEADERS, table_rows(results)),
        ("list", [
            f"Budget per model: {budget}; every neural model sees the same batches ({cfg['batch_size']} × "
            f"{cfg['block_size']} tokens per step, seed {cfg['seed']}), AdamW with warmup and cosine decay, peak lr "
            f"{cfg['lr']:g} (MLP n-gram {cfg.get('mlp_lr', cfg['lr']):g}); precision {info['precision']} ({machine.get('precision', {}).get('reason', 'as configured')}).",
            f"val loss: mean cross-entropy over {info['eval_windows']} fixed windows of {info['eval_window_tokens']} "
            "tokens spread over the val split, each window read on its own (the n-gram too sees only earlier tokens "
            "of its window); perplexity = exp(val loss); bits/char = summed loss / characters / ln 2.",
            "params: total; active = used per token (an MoE layer uses its shared and its top-k routed experts). "
            "For the n-gram: stored n-gram counts.",
            "train tok/s: median over the trainer's log rows (evals included); wall time: from the model's first "
            "training step to its last (periodic evals included); n-gram: fitting every order tried.",
            f"KV cache: bytes the model's own cache objects hold ({kv_dtype}) after a full context of "
            f"{cfg['block_size']} tokens, all {cfg['n_layer']} layers; MLA caches its latent (absorbed mode). "
            f"decode tok/s: greedy decoding of {cfg['block_size'] - 1} tokens, batch 1, with the cache (the MLP "
            "and n-gram need none).",
        ]),
    ]
    ngram = results.get("ngram")
    if ngram and ngram.get("orders_tried"):
        tried = [[f"n={n}", _num(t["val_loss"], 4), _seconds(t["fit_s"])] for n, t in ngram["orders_tried"].items()]
        blocks += [("p", "n-gram orders tried (the best on the val windows is kept):"),
                   ("table", ["order", "val loss", "fit time"], tried)]
    blocks += [("h2", "Val loss vs wall time"), ("img", LOSS_TIME_PNG, "val loss vs wall time"),
               ("h2", "Val loss vs training tokens"), ("img", LOSS_TOKENS_PNG, "val loss vs tokens"),
               ("h2", "KV cache vs val loss"), ("img", KV_PNG, "KV cache bytes per token vs val loss")]
    if (out / MOE_PNG).is_file():
        blocks += [("h2", "MoE expert load over training"),
                   ("p", "Share of the routed (token, expert) assignments each expert received in the logged step, "
                         "summed over layers; equal bands mean a balanced router."),
                   ("img", MOE_PNG, "MoE expert load")]
    blocks.append(("h2", "Samples"))
    blocks.append(("p", f"Each model continues the same prompt {json.dumps(cfg['prompt'])} with seed {cfg['seed']} "
                        f"and temperature {cfg['temperature']}, {cfg['sample_tokens']} tokens."))
    for result in results.values():
        if result.get("sample"):
            blocks += [("h3", result["label"]), ("pre", result["sample"])]
    if info.get("attention_model") and (out / ATTENTION_PNG).is_file():
        label = results[info["attention_model"]]["label"]
        blocks += [("h2", "Attention heatmaps"),
                   ("p", f"Every head of the last layer of the best attention model ({label}) on "
                         f"{json.dumps(cfg['attention_prompt'])}."),
                   ("img", ATTENTION_PNG, "attention heatmaps")]
    wall = info.get("wall_s")
    blocks += [("h2", "Run"), ("list", [
        f"command: `{info.get('command') or 'attnlab.compare.compare(...)'}`",
        f"machine: {describe_machine(machine)}, Python {info['python']}",
        f"date: {machine['date']}; the whole comparison took {_seconds(wall)} before writing this report",
        f"corpus: {cfg['corpus']} ({info['corpus_chars']:,} characters), {cfg['tokenizer']} tokenizer "
        f"(vocabulary {info['vocab_size']}), {info['train_tokens']:,} train / {info['val_tokens']:,} val tokens",
        *(f"{r['label']}: {r['architecture']}" for r in results.values() if r.get("architecture")),
        "curves: the trainer's periodic val estimate (random val windows, the same for every model at a given step).",
    ])]
    return blocks


def _inline_html(text: str) -> str:
    """Escape, then render **bold** and `code` (the only Markdown the report's prose uses)."""
    parts = html.escape(text).split("**")
    text = "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_markdown(blocks: list[tuple]) -> str:
    lines = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines.append("#" * int(kind[1]) + " " + block[1])
        elif kind == "p":
            lines.append(block[1])
        elif kind == "table":
            lines.append(markdown_table(block[1], block[2]))
        elif kind == "img":
            lines.append(f"![{block[2]}]({block[1]})")
        elif kind == "pre":
            lines.append("```text\n" + block[1].rstrip("\n") + "\n```")
        elif kind == "list":
            lines.append("\n".join(f"- {item}" for item in block[1]))
        lines.append("")
    return "\n".join(lines)


_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; background: #fafbfc;
       max-width: 1400px; margin: 2em auto; padding: 0 1.2em; }
h1 { font-size: 1.7em; margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #dde2ea; }
h3 { margin: 1.1em 0 .3em; font-size: 1em; }
table { border-collapse: collapse; font-size: 13px; background: white; margin: .6em 0; }
th, td { border: 1px solid #dde2ea; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #eef1f6; } td:first-child, th:first-child { text-align: left; } td:nth-child(2) { white-space: normal; }
tr:nth-child(even) td { background: #f6f8fb; }
.scroll { overflow-x: auto; }
img { max-width: 100%; border: 1px solid #dde2ea; background: white; }
pre { background: #f0f2f6; padding: .7em 1em; white-space: pre-wrap; font-size: 13px; border-radius: 4px; }
code { background: #eef1f6; padding: 0 .25em; border-radius: 3px; }
li { margin: .25em 0; }
"""


def render_html(blocks: list[tuple], folder: Path) -> str:
    """One self-contained page: inline CSS, images as data: URIs, no scripts and no links."""
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>')
        elif kind == "img":
            data = base64.b64encode((folder / block[1]).read_bytes()).decode("ascii")
            body.append(f'<p><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}"></p>')
        elif kind == "pre":
            body.append(f"<pre>{html.escape(block[1])}</pre>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in block[1]) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>attnlab compare</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def write_report(out) -> Path:
    """Draw the plots and write report.md and report.html into the comparison folder ``out``."""
    out = Path(out)
    info, results = load_run(out)
    _curves(results, out / LOSS_TIME_PNG, "elapsed_s", "wall time of training (s)")
    _curves(results, out / LOSS_TOKENS_PNG, "tokens", "training tokens")
    _kv_plot(results, out / KV_PNG)
    if not _moe_plot(results, out / MOE_PNG):
        (out / MOE_PNG).unlink(missing_ok=True)
    blocks = _blocks(out, info, results)
    write_text(out / REPORT_MD, render_markdown(blocks))
    write_text(out / REPORT_HTML, render_html(blocks, out))
    return out / REPORT_MD
