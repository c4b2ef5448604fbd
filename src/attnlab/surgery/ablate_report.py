"""The files ``attnlab ablate`` writes: results.json, report.md and three PNGs (the per-head loss
increase and gradient importance as layer × head heatmaps, the pruning curves)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attnlab.bench.results import markdown_table
from attnlab.device import describe_machine
from attnlab.errors import ConfigError
from attnlab.files import atomic_output, write_json, write_text

FILES = ("results.json", "report.md", "ablation.png", "importance.png", "pruning.png")
_CURVE_LABELS = {"ablation": "least loss increase first", "gradient": "least gradient importance first"}


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ConfigError("ablate's PNGs need matplotlib, which is not installed: run `pip install 'attnlab[viz]'`") from err
    return Figure


def loss_name(results: dict) -> str:
    if results["kind"] == "decoder":
        return "next-token cross-entropy (nats)"
    return "1 − cos(ablated, intact final hidden states), mean over tokens"


def short_loss_name(results: dict) -> str:
    """The loss in a few words, for axes and colour bars."""
    return "LM loss (nats)" if results["kind"] == "decoder" else "1 − cos to the intact output"


def importance_name(results: dict) -> str:
    if results["kind"] == "decoder":
        return "E_x |∂L/∂ξ_h| (Michel et al.), ℓ2-normalised per layer"
    return "½‖∂u/∂ξ_h‖² (predicted 1 − cos, Gaussian probes), ℓ2-normalised per layer"


def _heatmap(values: np.ndarray, title: str, label: str, path: Path) -> None:
    layers, heads = values.shape
    fig = _figure_class()(figsize=(1.2 + 0.55 * heads, 1.0 + 0.3 * layers), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label, shrink=0.8)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _pruning_plot(results: dict, path: Path) -> None:
    pruning = results["pruning"]
    shares = 100 * np.asarray(pruning["shares"])
    fig = _figure_class()(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for name, style in (("ablation", "o-"), ("gradient", "s-")):
        ax.plot(shares, pruning[name], style, label=_CURVE_LABELS[name], markersize=4)
    randoms = np.asarray([pruning[n] for n in pruning if n.startswith("random")])
    ax.plot(shares, randoms.mean(0), "k--", label=f"random order (mean of {len(randoms)})")
    ax.fill_between(shares, randoms.min(0), randoms.max(0), color="grey", alpha=0.25, label="random: min–max")
    ax.axhline(results["base_loss"], color="grey", linewidth=0.8)
    ax.set_xlabel("heads removed (%)")
    ax.set_ylabel(short_loss_name(results))
    ax.set_title(f"{results['model']}: pruning heads ({results['mode']}-ablation)", fontsize=10)
    ax.legend(fontsize=8)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _pruning_rows(results: dict) -> list[list[str]]:
    pruning = results["pruning"]
    randoms = [n for n in pruning if n.startswith("random")]
    rows = []
    for i, share in enumerate(pruning["shares"]):
        random_mean = sum(pruning[n][i] for n in randoms) / len(randoms)
        rows.append([f"{100 * share:.0f} %", f"{pruning['ablation'][i]:.4f}", f"{pruning['gradient'][i]:.4f}",
                     f"{random_mean:.4f}"])
    return rows


def to_markdown(results: dict) -> str:
    """report.md: what was measured on what, the top heads, the pruning table, every head."""
    r, delta = results, np.asarray(results["ablation_delta"])
    damage = r["share_before_10pct_damage"]
    randoms = [damage[n] for n in damage if n.startswith("random")]
    top = [[f"{h['layer']}.{h['head']}", f"{h['delta']:+.4f}", f"{h['importance']:.3f}"] for h in r["top_heads"]]
    grid = [[str(layer), *(f"{v:+.4f}" for v in row)] for layer, row in enumerate(delta)]
    how = "head output replaced by its mean over the text" if r["mode"] == "mean" else "head output set to 0"
    order_text = (f"Share removed before the loss rises by 10 % of what removing every head costs: by ablation "
                  f"order {100 * damage['ablation']:.0f} %, by gradient order {100 * damage['gradient']:.0f} %, "
                  "random orders " + ", ".join(f"{100 * s:.0f} %" for s in randoms) + ".")
    lines = [
        f"# Head ablation: {r['model']}", "",
        f"Command: `{r['command']}`  ", f"Machine: {describe_machine(r['machine'])}, {r['machine']['date']}  ",
        f"Text: {r['text']}: {r['windows']} windows × {r['window']} tokens = {r['tokens']} tokens  ",
        f"Loss: {loss_name(r)}; intact model {r['base_loss']:.4f}  ",
        f"Ablation: {r['mode']} ({how}), {r['layers']} layers × {r['heads']} heads = {r['layers'] * r['heads']} heads  ",
        "Wall time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in r["wall_s"].items()), "",
        "## Heads whose removal hurts most", "",
        markdown_table(["layer.head", "loss increase", "gradient importance (normalised)"], top), "",
        ("Rank correlation (Spearman) of loss increase and gradient importance over all heads: "
         f"{r['spearman_ablation_vs_gradient']:.2f} normalised per layer, {r['spearman_ablation_vs_raw_gradient']:.2f} "
         "before normalising (normalising hides how much more some layers matter than others)."), "",
        "## Pruning: loss as heads are removed", "",
        f"Importance used for the gradient order: {importance_name(r)}. {order_text}", "",
        markdown_table(["heads removed", "ablation order", "gradient order", "random (mean)"], _pruning_rows(r)), "",
        "![pruning](pruning.png)", "",
        "## Loss increase of every head removed alone (rows: layers, columns: heads)", "",
        markdown_table(["layer", *(str(h) for h in range(r["heads"]))], grid), "",
        "![ablation](ablation.png) ![importance](importance.png)", "",
    ]
    return "\n".join(lines)


def write_report(out: Path, results: dict) -> list[Path]:
    """Write FILES into ``out`` (created if needed); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in FILES]
    write_json(paths[0], results)
    write_text(paths[1], to_markdown(results))
    _heatmap(np.asarray(results["ablation_delta"]), f"{results['model']}: loss increase, one head removed "
             f"({results['mode']}); {short_loss_name(results)}", "loss increase", paths[2])
    _heatmap(np.asarray(results["importance_normalised"]), f"{results['model']}: gradient importance "
             "(normalised per layer)", "importance", paths[3])
    _pruning_plot(results, paths[4])
    return paths
