"""The report of an ``attnlab seq2seq`` run: results.json (the numbers, in a fixed shape), report.md,
one self-contained report.html, and two pictures — exact match against input length for every
model (Bahdanau et al. 2014, Figure 2) and the attention of rnn-attn and the Transformer's
cross-attention over one input (their Figure 3).
"""

from __future__ import annotations

from pathlib import Path

from attnlab.device import describe_machine
from attnlab.files import write_json, write_text
from attnlab.report_blocks import new_figure, render_html, render_markdown, save_figure
from attnlab.seq2seq.tasks import EOS

RESULTS = "results.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
ACCURACY_PNG = "accuracy_by_length.png"
ALIGNMENT_PNG = "alignment.png"
REPORT_FILES = (RESULTS, REPORT_MD, REPORT_HTML, ACCURACY_PNG, ALIGNMENT_PNG)
_COLORS = {"rnn-encdec": "#d62728", "rnn-attn": "#1f77b4", "transformer": "#2ca02c", "decoder-only": "#9467bd"}
PAPER = ("Bahdanau et al. (2014), Table 1, BLEU on English→French test sentences: RNNencdec-30 13.93, "
         "RNNsearch-30 21.50, RNNencdec-50 17.82, RNNsearch-50 26.75 (the number: the longest training sentence). "
         "Their Figure 2: the encoder–decoder's BLEU falls as sentences grow, RNNsearch-50's does not; Figure 3: "
         "the soft alignments, mostly monotonic, with local reorderings.")


def results_json(run: dict) -> dict:
    """The results file: {"task", "max_train_length", "models": {name: {"params", "accuracy_by_length",
    "token_accuracy_by_length"}}, "command", "machine", "date"} with lengths as string keys."""
    keep = ("params", "accuracy_by_length", "token_accuracy_by_length")
    models = {name: {key: ({str(n): v for n, v in m[key].items()} if isinstance(m[key], dict) else m[key])
                     for key in keep} for name, m in run["models"].items()}
    return {"task": run["config"]["task"], "max_train_length": run["config"]["max_train_length"], "models": models,
            "command": run["command"], "machine": run["machine"], "date": run["machine"]["date"]}


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def _length_table(run: dict, key: str) -> tuple[list[str], list[list[str]]]:
    trained = run["config"]["max_train_length"]
    lengths = run["config"]["eval_lengths"]
    headers = ["model", "params"] + [f"{n}{'*' if n > trained else ''}" for n in lengths]
    rows = [[run["labels"][name], f"{m['params']:,}"] + [_percent(m[key][n]) for n in lengths]
            for name, m in run["models"].items()]
    return headers, rows


def seen(run: dict) -> list[str]:
    """What the run measured, one sentence per model: exact match at the shortest evaluated length,
    at the longest trained one and at the longest evaluated one."""
    trained = run["config"]["max_train_length"]
    lengths = run["config"]["eval_lengths"]
    inside = [n for n in lengths if n <= trained] or lengths[:1]
    lines = []
    for name, m in run["models"].items():
        acc = m["accuracy_by_length"]
        line = (f"**{run['labels'][name]}**: exact match {_percent(acc[inside[0]])} at length {inside[0]}, "
                f"{_percent(acc[inside[-1]])} at length {inside[-1]}")
        change = round(100 * (acc[inside[-1]] - acc[inside[0]]))
        line += f" ({'no change' if change == 0 else f'{change:+d} points'.replace('-', '−')} within the trained lengths)"
        if lengths[-1] > trained:
            line += f"; {_percent(acc[lengths[-1]])} at length {lengths[-1]}, longer than any training input"
        lines.append(line + ".")
    return lines


def _accuracy_plot(run: dict, path: Path) -> None:
    fig = new_figure(11, 4.2)
    axes = fig.subplots(1, 2)
    trained = run["config"]["max_train_length"]
    for ax, key, title in zip(axes, ("accuracy_by_length", "token_accuracy_by_length"), ("exact match", "token accuracy")):
        for name, m in run["models"].items():
            lengths = sorted(m[key])
            ax.plot(lengths, [m[key][n] for n in lengths], marker="o", color=_COLORS.get(name), label=run["labels"][name])
        ax.axvspan(trained + 0.5, max(run["config"]["eval_lengths"]) + 1, color="#eeeeee", zorder=0)
        ax.axvline(trained + 0.5, color="black", linestyle=":", linewidth=1)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(f"input length (symbols); shaded: longer than any training input (> {trained})")
        ax.set_ylabel(title)
        ax.set_title(f"{title} of greedy decoding, held-out inputs")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    save_figure(fig, path)


def _alignment_plot(run: dict, path: Path) -> bool:
    """Heatmaps (rows: output tokens, columns: input tokens): rnn-attn's α, then every head of the
    Transformer's last cross-attention layer. False when no pictured model ran."""
    task, (source, _) = run["task"], run["example"]
    panels = []
    for name, picture in run["pictures"].items():
        last = picture["weights"][-1]  # (heads, Tt, Ts)
        for head in range(last.size(0)):
            suffix = "" if last.size(0) == 1 else f"\nlast layer, head {head}"
            panels.append((run["labels"][name] + suffix, last[head].numpy(), picture["output"]))
    if not panels:
        return False
    side = 0.28 * len(source) + 1.6
    fig = new_figure(side * len(panels), 0.28 * (len(panels[0][2]) + 1) + 2.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, weights, output) in zip(axes, panels):
        ax.imshow(weights, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks(range(len(source)), task.tokens(source), fontsize=8)
        ax.set_yticks(range(weights.shape[0]), task.tokens(output + [EOS]), fontsize=8)  # what each step predicts
        ax.set_xlabel("input")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("output (the model's own greedy answer)")
    save_figure(fig, path)
    return True


def _blocks(run: dict, has_alignment: bool) -> list[tuple]:
    cfg, task, machine = run["config"], run["task"], run["machine"]
    (source, target) = run["example"]
    budget = (f"every model: {cfg['steps']} steps × {cfg['batch_size']} examples, the same examples in the same order "
              f"(seed {cfg['seed']}), AdamW lr {cfg['lr']:g} with {cfg['warmup_steps']} warmup steps and cosine decay, "
              f"precision {machine.get('precision', {}).get('dtype', '?')}")
    blocks = [("h1", f"attnlab seq2seq: the context bottleneck and attention ({cfg['task']})"),
              ("p", f"Task **{cfg['task']}**: {task.summary}. Trained on inputs of {task.min_length} to "
                    f"{cfg['max_train_length']} symbols; {budget}. Evaluated by greedy decoding of "
                    f"{cfg['eval_examples']} held-out inputs per length (never seen in training at any length); exact "
                    "match = the whole output followed by its end token. * = longer than any training input."),
              ("h2", "What was seen"), ("list", seen(run)),
              ("h2", "Exact match by input length"), ("table", *_length_table(run, "accuracy_by_length")),
              ("img", ACCURACY_PNG, "exact match and token accuracy against input length"),
              ("h2", "Token accuracy by input length"), ("table", *_length_table(run, "token_accuracy_by_length"))]
    if has_alignment:
        blocks += [("h2", "Where the decoder looks"),
                   ("p", f"Held-out input `{task.decode(source)}` (expected `{task.decode(target)}`); rows are the "
                         "model's own greedy output, one per decoding step (the last predicts the end token), columns "
                         "the input symbols; darker = more weight. rnn-encdec has no such picture: its decoder sees "
                         "only the one context vector."),
                   ("img", ALIGNMENT_PNG, "attention over the input of rnn-attn and the Transformer")]
    rows = [[run["labels"][n], f"{m['params']:,}", f"{m['steps']:,}", f"{m['val_loss']:.4f}", f"{m['train_s']:.1f} s",
             f"{m['eval_s']:.1f} s"] for n, m in run["models"].items()]
    blocks += [("h2", "Training"), ("table", ["model", "params", "steps", "final val loss", "train time", "eval time"], rows),
               ("p", "val loss: teacher-forced cross-entropy per output token on 256 held-out examples of the trained "
                     "lengths (the Trainer's evaluation)."),
               ("h2", "The paper"), ("p", PAPER),
               ("h2", "Run"), ("list", [f"command: `{run['command'] or 'attnlab.seq2seq.run_seq2seq(...)'}`",
                                        f"machine: {describe_machine(machine)}",
                                        f"date: {machine['date']}; the whole run took {run['wall_s']:.0f} s before "
                                        "writing this report"])]
    return blocks


def write_report(out: Path, run: dict) -> Path:
    """Write results.json, the two PNGs, report.md and report.html into ``out``; returns report.md's path."""
    write_json(out / RESULTS, results_json(run))
    _accuracy_plot(run, out / ACCURACY_PNG)
    has_alignment = _alignment_plot(run, out / ALIGNMENT_PNG)
    blocks = _blocks(run, has_alignment)
    write_text(out / REPORT_MD, render_markdown(blocks))
    write_text(out / REPORT_HTML, render_html(blocks, out, title=f"attnlab seq2seq ({run['config']['task']})"))
    return out / REPORT_MD
