"""The four answers of the 2014–2018 history to one sequence-to-sequence task, trained alike:

- ``rnn-encdec`` (Cho et al. 2014): a bidirectional GRU reads the input; its final states are the
  one fixed context vector c; a GRU decoder writes the output from c alone (c at every step);
- ``rnn-attn`` (Bahdanau et al. 2014): the same encoder and decoder, but the decoder's context is a
  fresh mix of every encoder state at each step, c_i = Σ_j α_ij h_j with Bahdanau's additive score;
- ``transformer`` (Vaswani et al. 2017): :class:`~attnlab.models.encdec.EncoderDecoder`;
- ``decoder-only`` (GPT, 2018): attnlab's GPT on one sequence ``input <sep> output``, the prompt
  masked out of the loss (targets -1).

Every model has ``forward(*batch) -> (logits, loss)`` for the Trainer, ``frame(examples)`` to make
its batch, ``start(src)`` and ``step(state, tokens)`` for decoding; :func:`greedy` decodes any of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.attention.additive import AdditiveAttention
from attnlab.attention.record import record_attention
from attnlab.errors import ConfigError
from attnlab.models.encdec import EncDecConfig, EncoderDecoder
from attnlab.models.gpt import GPT, GPTConfig
from attnlab.seq2seq.tasks import BOS, EOS, PAD, SEP

MODELS = ("rnn-encdec", "rnn-attn", "transformer", "decoder-only")
LABELS = {"rnn-encdec": "RNN encoder–decoder (Cho 2014)", "rnn-attn": "RNN + attention (Bahdanau 2014)",
          "transformer": "Transformer encoder–decoder (2017)", "decoder-only": "decoder-only GPT (2018)"}


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad lists of ids into one int64 tensor (len(rows), longest)."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.int64)


def frame_encdec(examples: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, ...]:
    """(src (B, Ts) padded with PAD, tgt_in = BOS + output (B, Tt), targets = output + EOS, -1 after)."""
    src = _pad([s for s, _ in examples], PAD)
    tgt_in = _pad([[BOS] + t for _, t in examples], PAD)
    targets = _pad([t + [EOS] for _, t in examples], -1)
    return src, tgt_in, targets


def frame_decoder_only(examples: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, ...]:
    """(ids (B, T), targets (B, T)) of ``input <sep> output <eos>`` shifted by one; every target up to
    and including the one that predicts <sep> is -1, so only the output (and its <eos>) is learned."""
    ids, targets = [], []
    for src, tgt in examples:
        seq = src + [SEP] + tgt + [EOS]
        ids.append(seq[:-1])
        targets.append([-1] * len(src) + seq[len(src) + 1:])  # targets[j] = seq[j + 1]; seq[len(src)] is <sep>
    return _pad(ids, PAD), _pad(targets, -1)


class RNNSeq2Seq(nn.Module):
    """Bidirectional GRU encoder → GRU decoder; with ``attention`` Bahdanau's additive attention
    chooses the context at each step, without it the context is the encoder's final states."""

    frame = staticmethod(frame_encdec)

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, attention: bool):
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.encoder = nn.GRU(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.init = nn.Linear(2 * hidden, hidden)  # s_0 = tanh(W_s c)
        self.decoder = nn.GRU(embed_dim + 2 * hidden, hidden, batch_first=True)
        self.attention = AdditiveAttention(hidden, 2 * hidden, hidden) if attention else None
        self.out = nn.Linear(hidden + 2 * hidden + embed_dim, vocab_size)  # from [s_i, c_i, y_{i-1}]

    def encode(self, src: torch.Tensor) -> dict:
        """Encoder states h (B, Ts, 2H), the context vector c (B, 2H), the mask and s_0 (1, B, H)."""
        mask = src != PAD  # (B, Ts)
        lengths = mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(src), lengths, batch_first=True, enforce_sorted=False)
        h, final = self.encoder(packed)  # final (2, B, H): the last real step of each direction
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=src.size(1))  # (B, Ts, 2H)
        c = torch.cat([final[0], final[1]], dim=-1)  # (B, 2H): the fixed-size summary of the input
        enc = {"h": h, "c": c, "mask": mask, "s": torch.tanh(self.init(c)).unsqueeze(0)}
        if self.attention is not None:
            enc["uh"] = self.attention.project_keys(h)  # U_a h_j, once per input
        return enc

    def _context(self, enc: dict, s: torch.Tensor) -> torch.Tensor:
        """c_i (B, 1, 2H): Bahdanau's α-weighted encoder states for decoder state s (1, B, H), or c."""
        if self.attention is None:
            return enc["c"].unsqueeze(1)
        return self.attention(s.transpose(0, 1), enc["h"], key_mask=enc["mask"], projected_keys=enc["uh"])

    def _step(self, enc: dict, y: torch.Tensor) -> torch.Tensor:
        """One decoder step from embedded y_{i-1} (B, 1, E); updates enc["s"]; logits (B, 1, V)."""
        context = self._context(enc, enc["s"])  # (B, 1, 2H)
        out, enc["s"] = self.decoder(torch.cat([y, context], dim=-1), enc["s"])  # (B, 1, H)
        return self.out(torch.cat([out, context, y], dim=-1))

    def forward(self, src, tgt_in, targets=None):
        enc = self.encode(src)
        y = self.embed(tgt_in)  # (B, Tt, E)
        if self.attention is None:  # the context never changes: the whole target in one GRU call
            context = enc["c"].unsqueeze(1).expand(-1, y.size(1), -1)  # (B, Tt, 2H)
            out, _ = self.decoder(torch.cat([y, context], dim=-1), enc["s"])  # (B, Tt, H)
            logits = self.out(torch.cat([out, context, y], dim=-1))
        else:  # c_i depends on s_{i-1}: one step at a time
            logits = torch.cat([self._step(enc, y[:, t:t + 1]) for t in range(y.size(1))], dim=1)
        return logits, _loss(logits, targets)

    def start(self, src: torch.Tensor, max_len: int) -> dict:
        return self.encode(src)

    def step(self, state: dict, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, V) after feeding tokens (B, 1)."""
        return self._step(state, self.embed(tokens))


class TransformerSeq2Seq(EncoderDecoder):
    """The encoder–decoder Transformer, framed like the RNNs: (src, BOS + output, output + EOS)."""

    frame = staticmethod(frame_encdec)


class DecoderOnly(nn.Module):
    """attnlab's GPT on ``input <sep> output``: the input is a prompt the model reads, not a target."""

    frame = staticmethod(frame_decoder_only)

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gpt = GPT(cfg)

    def forward(self, ids, targets=None):
        return self.gpt(ids, targets)

    def start(self, src: torch.Tensor, max_len: int) -> dict:
        """Prefill ``src <sep>`` into fresh KV caches; every input of the batch must have the same length."""
        if bool((src == PAD).any()):
            raise ConfigError("decoder-only decoding reads unpadded inputs: give it a batch of one input length")
        prompt = torch.cat([src, torch.full_like(src[:, :1], SEP)], dim=1)  # (B, Ts + 1)
        caches = self.gpt.new_caches(src.size(0), prompt.size(1) + max_len)
        logits, _ = self.gpt(prompt, caches=caches)
        return {"caches": caches, "next": logits[:, -1:]}

    def step(self, state: dict, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, V) of the next token: the prefill's for BOS, then after feeding ``tokens``."""
        if "next" in state:  # the first output token is predicted from <sep>, no BOS is fed
            return state.pop("next")
        logits, _ = self.gpt(tokens, caches=state["caches"])
        return logits


def _loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    if targets is None:
        return None
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


@torch.no_grad()
def greedy(model: nn.Module, src: torch.Tensor, max_len: int) -> list[list[int]]:
    """Greedy outputs of ``model`` for src (B, Ts): per input, its ids up to and including the first EOS,
    at most ``max_len + 1`` of them. Every model decodes incrementally (its state or its KV caches)."""
    was_training = model.training
    model.eval()
    state = model.start(src, max_len + 1)
    token = torch.full((src.size(0), 1), BOS, dtype=torch.int64, device=src.device)
    outputs = []
    for _ in range(max_len + 1):
        token = model.step(state, token)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        outputs.append(token)
        if bool((torch.cat(outputs, dim=1) == EOS).any(1).all()):
            break
    model.train(was_training)
    rows = torch.cat(outputs, dim=1).tolist()
    return [row[:row.index(EOS) + 1] if EOS in row else row for row in rows]


@torch.no_grad()
def alignment(model: nn.Module, src: torch.Tensor, output: list[int]) -> list[torch.Tensor]:
    """Attention of each output step over the input for one example src (1, Ts) and its output ids,
    fed as decoder inputs (BOS, then the output): rnn-attn → [(1, Tt, Ts)], the Transformer → one
    (heads, Tt, Ts) per decoder layer. Tt = len(output) + 1 (the last step predicts EOS)."""
    model.eval()
    tgt_in = torch.tensor([[BOS] + output], dtype=torch.int64, device=src.device)
    if isinstance(model, RNNSeq2Seq) and model.attention is not None:
        state, steps = model.start(src, tgt_in.size(1)), []
        with record_attention(model.attention) as rec:
            for t in range(tgt_in.size(1)):
                model.step(state, tgt_in[:, t:t + 1])
                steps.append(rec.weights[0][0, :, 0])  # (1, Ts)
        return [torch.stack(steps, dim=1)]  # (1, Tt, Ts)
    if isinstance(model, EncoderDecoder):
        crosses = model.cross_attention_modules()
        with record_attention(model) as rec:
            model(src, tgt_in)
        return [w[0] for w, m in zip(rec.weights, rec.modules) if any(m is c for c in crosses)]
    raise ConfigError(f"{type(model).__name__} has no attention over its input to picture")


def build(name: str, vocab_size: int, *, max_length: int, rnn_embed: int, rnn_hidden: int, d_model: int,
          n_head: int, n_layer: int) -> nn.Module:
    """Model ``name`` for a task of ``vocab_size`` ids whose inputs and outputs have at most ``max_length``
    symbols. The Transformer has n_layer encoder + n_layer decoder blocks; the GPT 2 · n_layer blocks."""
    if name in ("rnn-encdec", "rnn-attn"):
        return RNNSeq2Seq(vocab_size, rnn_embed, rnn_hidden, attention=name == "rnn-attn")
    if name == "transformer":
        return TransformerSeq2Seq(EncDecConfig(vocab_size=vocab_size, d_model=d_model, n_head=n_head,
                                               n_encoder_layer=n_layer, n_decoder_layer=n_layer, pad_id=PAD))
    if name == "decoder-only":
        return DecoderOnly(GPTConfig(vocab_size=vocab_size, block_size=2 * max_length + 3, n_layer=2 * n_layer,
                                     n_head=n_head, d_model=d_model, positions="rope", norm="rmsnorm",
                                     activation="swiglu"))
    raise ConfigError(f"model={name!r} is not allowed: expected one of {', '.join(map(repr, MODELS))}")
