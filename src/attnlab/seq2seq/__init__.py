"""``attnlab seq2seq``: the 2014 experiment — a fixed context vector against attention — on synthetic
tasks, with the Transformer encoder–decoder and a decoder-only GPT beside them."""

from attnlab.seq2seq.models import LABELS, MODELS
from attnlab.seq2seq.run import Seq2SeqConfig, run_seq2seq
from attnlab.seq2seq.tasks import TASKS, get_task

__all__ = ["Seq2SeqConfig", "run_seq2seq", "MODELS", "LABELS", "TASKS", "get_task"]
