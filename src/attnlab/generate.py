"""Sampling text from a GPT (or a recurrent LM): temperature, top-k, top-p, a seed, and the KV cache.

With the cache, the prompt is run once (prefill) and every new token costs one position;
without it, every step recomputes the whole (cropped) context. At temperature 0 both give
the same tokens. Past ``block_size`` tokens the context is cropped to the last ``block_size``
as nanoGPT does; the cached path then re-fills a fresh cache with that window, so it stays
equal to the uncached path. The cache holds only what this call can use: min(block_size,
prompt + max_new_tokens) positions. Generation stops early once every sequence has produced
one of ``stop_ids`` (e.g. the tokenizer's end-of-sequence token). :func:`generation_attention`
records what every generated token attended to while decoding with the cache.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from attnlab import _checks
from attnlab import device as devices
from attnlab.attention.record import record_attention
from attnlab.data.tokenizer import load_tokenizer
from attnlab.errors import ConfigError, InputTypeError
from attnlab.models.base import load_pretrained, read_config
from attnlab.models.gpt import GPT
from attnlab.hf.checkpoint import DECODERS, from_hf_pretrained, hf_model_type
from attnlab.hf.smollm2 import load_smollm2
from attnlab.hf.tokenizer import hf_tokenizer
from attnlab.quantize import QUANTIZE_CHOICES, choose_quantization, quantize_int8

log = logging.getLogger("attnlab")


def _check_sampling(temperature, top_k, top_p) -> None:
    _checks.non_negative("temperature", temperature)
    if top_k is not None:
        _checks.positive_int("top_k", top_k)
    if top_p is not None:
        _checks.real("top_p", top_p, low=0, high=1, low_open=True)


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab). temperature 0 takes the argmax;
    top_k keeps the k most likely tokens, top_p the smallest set whose probability reaches p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already >= p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


def _check_stop_ids(stop_ids, vocab_size: int) -> tuple[int, ...]:
    if stop_ids is None:
        return ()
    ids = tuple(stop_ids) if isinstance(stop_ids, (list, tuple, set, frozenset)) else None
    if ids is None or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size for i in ids):
        raise ConfigError(f"stop_ids={stop_ids!r} is not allowed: expected token ids in [0, {vocab_size}) or None")
    return ids


def stream_tokens(model, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  use_cache: bool = True, stop_ids=None) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time after the prompt idx (B, T), until
    max_new_tokens or until every sequence has produced one of ``stop_ids`` (a finished sequence
    repeats its stop token meanwhile). Arguments are checked at the call, before the first token."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.int64:
        raise InputTypeError("idx must be an int64 tensor (batch, seq) of token ids")
    if idx.size(1) == 0:
        raise ConfigError("the prompt is empty: generation needs at least one token to start from")
    _checks.non_negative_int("max_new_tokens", max_new_tokens)
    _check_sampling(temperature, top_k, top_p)
    stop = _check_stop_ids(stop_ids, model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return _stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache, stop)


@torch.no_grad()
def _stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache, stop):
    block = model.config.block_size
    cache_len = min(block, idx.size(1) + max_new_tokens)  # the most positions this call can fill
    stop = torch.tensor(stop, dtype=torch.int64, device=idx.device) if stop else None
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    was_training = model.training
    model.eval()
    try:
        caches = None
        for _ in range(max_new_tokens):
            context = idx[:, -block:]
            if not use_cache:
                logits, _ = model(context)
            elif caches is None or caches[0].length + 1 > cache_len:
                # (Re)fill a cache with the whole cropped context, positions 0..T-1.
                caches = model.new_caches(idx.size(0), cache_len, device=idx.device)
                logits, _ = model(context, caches=caches)
            else:
                logits, _ = model(context[:, -1:], caches=caches)  # one new position
            nxt = sample_next(logits[:, -1, :], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if stop is not None:
                nxt = torch.where(finished, idx[:, -1], nxt)  # a finished sequence repeats its stop token
                finished |= torch.isin(nxt, stop)
            idx = torch.cat([idx, nxt.unsqueeze(1)], dim=1)
            yield nxt
            if stop is not None and finished.all():
                return
    finally:
        model.train(was_training)


def generate(model, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompt idx (B, T) followed by the sampled tokens: (B, T + max_new_tokens), fewer
    when ``stop_ids`` ends the generation early."""
    new = list(stream_tokens(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


def generation_attention(model, idx: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding with the KV cache while recording attention. Returns the ids (1, T) of the
    prompt idx (1, T0) and its T - T0 = max_new_tokens continuation, and per layer the weights
    (1, heads, T, T) whose row t is what token t attended to when it was fed: the prefill's rows,
    then one row per cached step (keys after t are 0). Recording makes the cached steps run the
    explicit kernel (the fused one never forms the weights); the rows equal those of one uncached
    forward over the whole text."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(0) != 1:
        raise InputTypeError("idx must be a tensor (1, seq) of token ids: one prompt")
    _checks.positive_int("max_new_tokens", max_new_tokens)
    total = idx.size(1) + max_new_tokens
    if total > model.config.block_size:
        raise ConfigError(f"prompt of {idx.size(1)} tokens + max_new_tokens={max_new_tokens} = {total} exceeds the "
                          f"context of {model.config.block_size}: one picture needs the whole text in one context")
    rows, new = [], []
    with record_attention(model) as rec:
        # One step more than kept: its forward feeds the last kept token, which gives that token's row.
        for step, token in enumerate(stream_tokens(model, idx, max_new_tokens + 1, temperature=0)):
            rows.append(rec.weights)  # per layer: (1, H, T0, T0) for the prompt, then (1, H, 1, t + 1)
            if step < max_new_tokens:
                new.append(token)
    weights = [torch.cat([F.pad(r[layer], (0, total - r[layer].size(-1))) for r in rows], dim=2)
               for layer in range(len(rows[0]))]  # (1, H, T, T) each
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1), weights


def attention_while_generating(source, text: str, max_new_tokens: int) -> tuple[list[str], list[torch.Tensor], int]:
    """Continue ``text`` greedily by ``max_new_tokens`` tokens with the KV cache, for ``source`` an
    :class:`~attnlab.models.pretrained.AttentionModel` holding a GPT. Returns every token (prompt,
    then generated), one (1, heads, T, T) tensor per layer whose rows are what each token attended to
    when it was fed (:func:`generation_attention`), and the number of prompt tokens."""
    if not isinstance(source.model, GPT):
        raise ConfigError(f"{source.name} is a {type(source.model).__name__}, not a decoder: attention over generated "
                          "tokens needs a GPT (smollm2, a trained attnlab GPT or an HF decoder folder)")
    prompt = source.tokenize(text)
    device = next(source.model.parameters()).device
    ids, weights = generation_attention(source.model, torch.tensor([prompt.ids], device=device), max_new_tokens)
    generated = [source.tokenizer.decode([i]) for i in ids[0, len(prompt.ids):].tolist()]
    return prompt.tokens + generated, [w.float().cpu() for w in weights], len(prompt.ids)


PRETRAINED = ("smollm2",)
GENERATES = ("gpt", "rnn")  # model types with new_caches(): a GPT's KV caches, an RNN's recurrent state


def load_for_generation(folder, *, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) from a run or save_pretrained folder of a GPT or recurrent LM, a local HF decoder folder
    (Llama/Qwen2/GPT-2/DeepSeek, with tokenizer.json) or the pretrained "smollm2", on ``device``
    with weights in ``dtype`` ("auto": bf16 only where it measured faster than fp32 here); any
    other architecture is refused."""
    dev = devices.resolve_device(device)
    precision = devices.choose_precision(dtype, dev)
    if folder == "smollm2":
        return load_smollm2(dtype=precision.torch_dtype, device=dev)
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"checkpoint folder {str(folder)!r} does not exist: expected a folder written by attnlab train, "
                          f"a local HF checkpoint folder or one of {', '.join(PRETRAINED)}")
    model_type = read_config(folder).get("model_type")
    if hf_model_type(folder) in DECODERS:
        tokenizer = hf_tokenizer(folder)
        if tokenizer is None:
            raise ConfigError(f"HF folder {str(folder)!r} has no tokenizer.json: it is needed to encode the prompt")
        return from_hf_pretrained(folder, dtype=precision.torch_dtype, device=dev), tokenizer
    if model_type not in GENERATES:
        raise ConfigError(f"{str(folder)!r} holds a {model_type!r} model: attnlab generate needs one of "
                          f"{', '.join(map(repr, GENERATES))}")
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{str(folder)!r} has no tokenizer.json: it is needed to encode the prompt")
    model = load_pretrained(folder, map_location=dev).to(precision.torch_dtype)
    return model, load_tokenizer(folder)


def quantize_for_generation(model, quantize: str = "auto") -> tuple[str, str]:
    """Apply ``quantize`` ("none", "int8" or "auto": int8 where it measured faster here, see
    :func:`attnlab.quantize.choose_quantization`) to a loaded model, in place; returns (what was
    applied, why). int8 covers GPTs (every Linear, the LM head included); other models are refused."""
    _checks.one_of("quantize", quantize, QUANTIZE_CHOICES)
    if not isinstance(model, GPT):
        if quantize == "int8":
            raise ConfigError(f"quantize='int8' is not allowed for a {type(model).__name__}: int8 weights are "
                              "implemented for GPT decoders (attnlab GPTs, HF decoders, smollm2)")
        return "none", f"a {type(model).__name__} is decoded unquantized"
    weight = model.wte.weight
    choice, reason = choose_quantization(quantize, weight.device, weight.dtype)
    if choice == "int8":
        quantize_int8(model)
    return choice, reason


def generate_text(folder, prompt: str, max_new_tokens: int = 200, *, temperature: float = 0.8,
                  top_k: int | None = 200, top_p: float | None = None, seed: int | None = 1337,
                  use_cache: bool = True, stop_at_eos: bool = True, device: str = "auto",
                  dtype: str = "auto", quantize: str = "none") -> Iterator[str]:
    """Stream the text generated after ``prompt`` by the model in ``folder``, piece by piece, ending
    at the tokenizer's end-of-sequence token (not shown) when it has one and ``stop_at_eos``.
    ``quantize``: "none", "int8" (weight-only int8 Linears) or "auto" (int8 where it measured faster);
    with int8 on a CPU, dtype "auto" means fp32 for the rest of the model (the int8 Linears compute in
    bf16 themselves; the residual stream, norms and KV cache keep fp32's precision, as in the benchmark).
    The folder, prompt and settings are checked at the call, before any text is produced."""
    _check_sampling(temperature, top_k, top_p)
    _checks.one_of("quantize", quantize, QUANTIZE_CHOICES)
    if dtype == "auto" and quantize != "none" and devices.resolve_device(device).type == "cpu":
        dtype = "float32"
    model, tokenizer = load_for_generation(folder, device=device, dtype=dtype)
    choice, reason = quantize_for_generation(model, quantize)
    if quantize == "auto":
        log.info(f"quantize auto: {choice} ({reason})")
    ids = tokenizer.encode(prompt)
    idx = torch.tensor([ids], dtype=torch.int64, device=next(model.parameters()).device)
    stop_ids = (tokenizer.eos_id,) if stop_at_eos and tokenizer.eos_id is not None else None
    tokens = stream_tokens(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, use_cache=use_cache, stop_ids=stop_ids)
    return _stream_text(tokens, tokenizer, stop_ids or ())


def _stream_text(tokens, tokenizer, stop_ids) -> Iterator[str]:
    new: list[int] = []
    shown = ""
    for token in tokens:
        if int(token[0]) in stop_ids:
            break
        new.append(int(token[0]))
        text = tokenizer.decode(new)
        if text.startswith(shown) and not text.endswith("\ufffd"):  # wait for a whole multi-byte character
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(new)
    if text != shown:
        yield text[len(shown):] if text.startswith(shown) else text
