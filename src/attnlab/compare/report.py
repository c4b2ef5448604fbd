"""The report of an ``attnlab compare`` folder: report.md and one self-contained report.html
(inline CSS, plots as base64 data: URIs, no scripts, no links), plus the PNG plots.

Everything is read back from the folder: compare.json (run settings, machine), each model's
result.json (final scores) and metrics.jsonl (the trainer's log), so a report can be rebuilt
from the folder alone with :func:`write_report`.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from attnlab.compare.layout import (ATTENTION_PNG, KV_PNG, LOSS_POSITION_PNG, LOSS_TIME_PNG, LOSS_TOKENS_PNG, MOE_PNG,
                                    REPORT_HTML, REPORT_MD, RESULT, RUN_INFO)
from attnlab.device import describe_machine
from attnlab.files import read_jsonl, write_text
from attnlab.report_blocks import new_figure, render_html, render_markdown, save_figure
from attnlab.trainer import METRICS
TABLE_HEADERS = ["model", "status", "params (total)", "params (active)", "val loss", "perplexity", "bits/char",
                 "train tok/s", "wall time", "steps", "train tokens", "KV cache B/token", "KV cache @ context",
                 "decode tok/s"]
_COLORS = {"ngram": "#7f7f7f", "mlp": "#8c564b", "rnn": "#17becf", "lstm": "#e377c2", "gru": "#393b79",
           "mha": "#1f77b4", "gqa": "#2ca02c", "mqa": "#bcbd22",
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
                                               "decode_tokens_per_s", "steps", "tokens", "state_bytes")}
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
        cache = [_bytes(v["kv_bytes_per_token"]), _bytes(v["kv_bytes_full_context"])]
        if v["state_bytes"] is not None:  # a recurrent state: one size, whatever the context length
            cache = [f"{_bytes(v['state_bytes'])} state"] * 2
        rows.append([label, status, _num(v["params_total"]), _num(v["params_active"]), _num(v["val_loss"], 4),
                     _num(v["perplexity"], 2), _num(v["bits_per_char"], 3), _num(v["tokens_per_s"]),
                     _seconds(v["wall_s"]), _num(v["steps"]), _num(v["tokens"]), *cache,
                     _num(v["decode_tokens_per_s"])])
    return rows


def _curves(results: dict, path: Path, x_key: str, x_label: str) -> None:
    fig = new_figure(7.5, 4.6)
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
    save_figure(fig, path)


def in_context_positions(length: int) -> tuple[int, int]:
    """(early, late): Olsson et al. (2022)'s in-context score compares the losses at tokens 50 and 500
    of a 512-token context; the same fractions of a window of ``length`` positions."""
    return min(length - 1, round(50 * length / 512)), min(length - 1, round(500 * length / 512))


def _band(length: int, center: int) -> range:
    """The positions averaged for "the loss at ``center``": ±length/64 around it, so that one noisy
    position of a few hundred windows does not decide the score."""
    half = length // 64
    return range(max(0, center - half), min(length, center + half + 1))


def position_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the loss-by-position table: the loss at position 0, early and late, and the
    in-context score (late − early; negative: later tokens, with more context, are predicted better)."""
    lengths = {len(r["loss_by_position"]) for r in results.values() if r.get("loss_by_position")}
    if not lengths:
        return [], []
    length = max(lengths)
    early, late = (_band(length, p) for p in in_context_positions(length))
    names = [f"{b[0]}–{b[-1]}" if len(b) > 1 else str(b[0]) for b in (early, late)]
    headers = ["model", "loss @ position 0", f"loss @ {names[0]}", f"loss @ {names[1]}",
               f"in-context score ({names[1]} − {names[0]})"]
    rows = []
    for result in results.values():
        losses = result.get("loss_by_position")
        if losses:
            at_early, at_late = (sum(losses[p] for p in band) / len(band) for band in (early, late))
            rows.append([result["label"], _num(losses[0], 4), _num(at_early, 4), _num(at_late, 4),
                         _num(at_late - at_early, 4)])
    return headers, rows


def _position_plot(results: dict, path: Path) -> None:
    fig = new_figure(7.5, 4.6)
    ax = fig.subplots()
    for name, result in results.items():
        losses = result.get("loss_by_position")
        if not losses:
            continue
        label = result["label"] + (f" (n={result['n']})" if name == "ngram" else "")
        ax.plot(range(1, len(losses) + 1), losses, color=_COLORS.get(name), linewidth=1.3, label=label,
                linestyle="--" if name == "ngram" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("tokens of the window seen before the prediction (position + 1, log scale)")
    ax.set_ylabel("mean val loss (nats/token)")
    ax.set_title("loss by position in the context (the fixed val windows)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    save_figure(fig, path)


def _kv_plot(results: dict, path: Path) -> None:
    fig = new_figure(6.5, 4.4)
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
    save_figure(fig, path)


def _moe_plot(results: dict, path: Path) -> bool:
    moe = {n: r for n, r in results.items() if any("moe_tokens_per_expert" in row for row in r["metrics"])}
    if not moe:
        return False
    fig = new_figure(4.2 * len(moe) + 0.8, 3.8)
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
    save_figure(fig, path)
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
            f"{cfg['lr']:g} (MLP n-gram {cfg.get('mlp_lr', cfg['lr']):g}, RNNs {cfg.get('rnn_lr', cfg['lr']):g}); precision {info['precision']} ({machine.get('precision', {}).get('reason', 'as configured')}).",
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
            "and n-gram need none). RNN rows show their recurrent state instead (h, and c for an LSTM, every layer): "
            "its size does not depend on the context length.",
        ]),
    ]
    ngram = results.get("ngram")
    if ngram and ngram.get("orders_tried"):
        tried = [[f"n={n}", _num(t["val_loss"], 4), _seconds(t["fit_s"])] for n, t in ngram["orders_tried"].items()]
        blocks += [("p", "n-gram orders tried (the best on the val windows is kept):"),
                   ("table", ["order", "val loss", "fit time"], tried)]
    blocks += _position_blocks(cfg, results)
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


def _position_blocks(cfg: dict, results: dict) -> list[tuple]:
    headers, rows = position_rows(results)
    if not rows:
        return []
    return [("h2", "Loss by position in the context"), ("p",
             f"Mean val loss at each position of the fixed {cfg['block_size']}-token windows: position p predicts "
             "token p + 1 from the p + 1 tokens before it in its window. An n-gram of order n sees at most n − 1 "
             "tokens, so from position n − 2 on its curve can only wobble with the text; the MLP sees its last "
             f"{cfg['mlp_context']}; a recurrent model carries everything it read in one fixed-size state; attention "
             "looks back at every earlier token. The in-context score is Olsson et al. (2022)'s loss at token 500 "
             "minus the loss at token 50 of a 512-token context, here at the same fractions of the window, each "
             "the mean over the positions named (negative: more context, lower loss)."),
            ("table", headers, rows), ("img", LOSS_POSITION_PNG, "loss by position in the context")]


def write_report(out) -> Path:
    """Draw the plots and write report.md and report.html into the comparison folder ``out``."""
    out = Path(out)
    info, results = load_run(out)
    _curves(results, out / LOSS_TIME_PNG, "elapsed_s", "wall time of training (s)")
    _curves(results, out / LOSS_TOKENS_PNG, "tokens", "training tokens")
    _position_plot(results, out / LOSS_POSITION_PNG)
    _kv_plot(results, out / KV_PNG)
    if not _moe_plot(results, out / MOE_PNG):
        (out / MOE_PNG).unlink(missing_ok=True)
    blocks = _blocks(out, info, results)
    write_text(out / REPORT_MD, render_markdown(blocks))
    write_text(out / REPORT_HTML, render_html(blocks, out, title="attnlab compare"))
    return out / REPORT_MD
