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

import copy
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
from attnlab.quantize import QUANTIZE_CHOICES, choose_quantization, int4_lossless, quantize_int4, quantize_int8

log = logging.getLogger("attnlab")
# Draft tokens per verifying pass of speculative decoding (the model checks them all at once). SmolLM2's
# int4 copy agrees with fp32 on 87-97% of its drafts, so a long draft pays: fp32 checking int4, 4 prompts x 128
# tokens, measured on an AMD EPYC (AVX-512) 56.1, 62.3, 65.7, 68.5 tokens/s at 4, 8, 12, 16, and as an AVX2
# CPU 49.6, 54.4, 56.0 at 8, 12, 16; on an Intel Xeon 21.6, 24.0, 24.4, 24.4 at 3, 5, 8, 12 (fp32 alone 19.8).
# Growing the draft after fully accepted passes (+2, -1 after a rejection, up to 32) measured no better than 16.
DRAFT_TOKENS = 16


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


def speculative_tokens(model, draft, idx: torch.Tensor, max_new_tokens: int, *, draft_tokens: int = DRAFT_TOKENS,
                       stop_ids=None, stats: dict | None = None) -> Iterator[torch.Tensor]:
    """Greedy decoding of ``model`` sped up by ``draft`` (a cheaper model over the same vocabulary,
    e.g. a quantized copy): the draft proposes up to ``draft_tokens`` tokens one by one, ``model``
    checks them all in one forward pass over its KV cache, the agreeing prefix is kept and ``model``'s
    own token follows it (Leviathan et al. 2023, greedy case). The tokens are ``model``'s greedy
    tokens whatever the draft proposes — the draft only decides how many come per pass — so they equal
    ``stream_tokens(model, idx, max_new_tokens, temperature=0)`` up to the last bits of ``model``'s
    arithmetic on several positions at once. Batch 1; yields (1,) ids. ``stats``, if given, receives
    the passes, proposed and accepted draft tokens. Past the block size it goes on without the draft."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.int64 or idx.size(0) != 1:
        raise InputTypeError("idx must be an int64 tensor (1, seq) of token ids: speculative decoding runs one sequence")
    if idx.size(1) == 0:
        raise ConfigError("the prompt is empty: generation needs at least one token to start from")
    if not isinstance(model, GPT) or not isinstance(draft, GPT):
        raise ConfigError("speculative decoding needs an attnlab GPT as the model and as the draft")
    if draft.config.vocab_size != model.config.vocab_size:
        raise ConfigError(f"the draft has vocab_size={draft.config.vocab_size} but the model "
                          f"{model.config.vocab_size}: they must share the vocabulary")
    _checks.non_negative_int("max_new_tokens", max_new_tokens)
    _checks.positive_int("draft_tokens", draft_tokens)
    stop = _check_stop_ids(stop_ids, model.config.vocab_size)
    return _speculate(model, draft, idx, max_new_tokens, draft_tokens, stop, {} if stats is None else stats)


def _propose(draft, caches, pending: torch.Tensor, k: int) -> torch.Tensor:
    """k greedy draft tokens (k,) after the tokens ``pending`` (1, P) the draft has not read yet."""
    proposals = []
    x = pending
    for _ in range(k):
        logits, _ = draft(x, caches=caches)
        x = logits[:, -1].argmax(dim=-1, keepdim=True)  # (1, 1)
        proposals.append(x[0])
    return torch.cat(proposals)


@torch.no_grad()
def _speculate(model, draft, idx, n, k_max, stop, stats):
    stats.update(passes=0, proposed=0, accepted=0)
    block = min(model.config.block_size, draft.config.block_size)
    cache_len = min(block, idx.size(1) + n + k_max)
    modes = model.training, draft.training
    model.eval(), draft.eval()
    try:
        if n == 0:
            return
        caches, draft_caches = model.new_caches(1, cache_len), draft.new_caches(1, cache_len)
        logits, _ = model(idx[:, -block:], caches=caches)
        cur = logits[:, -1].argmax(dim=-1)  # (1,): model's next token, not in its cache yet
        draft(idx[:, -block:], caches=draft_caches)
        pending, produced, seq = cur.view(1, 1), 0, idx
        while True:
            yield cur
            produced, seq = produced + 1, torch.cat([seq, cur.view(1, 1)], dim=1)
            if produced == n or int(cur) in stop:
                return
            k = min(k_max, n - produced, cache_len - 1 - max(caches[0].length, draft_caches[0].length + pending.size(1)))
            if k < 1:  # no room left for a draft in the block: finish as plain greedy decoding
                yield from _stream(model, seq, n - produced, 0.0, None, None, None, True, stop)
                return
            base, draft_base = caches[0].length, draft_caches[0].length
            proposals = _propose(draft, draft_caches, pending, k)
            logits, _ = model(torch.cat([cur, proposals]).view(1, -1), caches=caches)
            best = logits[0].argmax(dim=-1)  # (k + 1,): model's token after cur and after each proposal
            accepted = int((best[:k] == proposals).cumprod(dim=0).sum())
            stats["passes"] += 1
            stats["proposed"] += k
            stats["accepted"] += accepted
            for token in proposals[:accepted]:
                yield token.view(1)
                produced, seq = produced + 1, torch.cat([seq, token.view(1, 1)], dim=1)
                if produced == n or int(token) in stop:
                    return
            cur = best[accepted:accepted + 1]
            for c in caches:  # keep cur and the accepted proposals
                c.truncate(base + 1 + accepted)
            kept = min(accepted, k - 1)  # the draft read pending and proposals[:k-1]
            for c in draft_caches:
                c.truncate(draft_base + pending.size(1) + kept)
            pending = torch.cat([proposals[kept:accepted], cur]).view(1, -1)
    finally:
        model.train(modes[0]), draft.train(modes[1])


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
    """Apply ``quantize`` ("none", "int8", "int4" or "auto": see
    :func:`attnlab.quantize.choose_quantization`) to a loaded model, in place; returns (what was
    applied, why). int8/int4 cover GPTs (every Linear, the LM head included); other models are refused."""
    _checks.one_of("quantize", quantize, QUANTIZE_CHOICES)
    if not isinstance(model, GPT):
        if quantize in ("int8", "int4"):
            raise ConfigError(f"quantize={quantize!r} is not allowed for a {type(model).__name__}: quantized weights "
                              "are implemented for GPT decoders (attnlab GPTs, HF decoders, smollm2)")
        return "none", f"a {type(model).__name__} is decoded unquantized"
    weight = model.wte.weight
    lossless = quantize == "auto" and weight.device.type == "cpu" and int4_lossless(model)
    choice, reason = choose_quantization(quantize, weight.device, weight.dtype, int4_lossless=lossless)
    if choice == "int8":
        quantize_int8(model)
    elif choice == "int4":
        quantize_int4(model)
    return choice, reason


def generate_text(folder, prompt: str, max_new_tokens: int = 200, *, temperature: float = 0.8,
                  top_k: int | None = 200, top_p: float | None = None, seed: int | None = 1337,
                  use_cache: bool = True, stop_at_eos: bool = True, device: str = "auto",
                  dtype: str = "auto", quantize: str = "none", speculate: bool = False,
                  draft_tokens: int = DRAFT_TOKENS) -> Iterator[str]:
    """Stream the text generated after ``prompt`` by the model in ``folder``, piece by piece, ending
    at the tokenizer's end-of-sequence token (not shown) when it has one and ``stop_at_eos``.
    ``quantize``: "none", "int8" (weight-only int8 Linears), "int4" (4-bit group codes, the LM head at 8
    bits) or "auto" (the fastest measured here; int4 only where lossless); with quantization on a CPU,
    dtype "auto" means fp32 for the rest of the model (the quantized Linears compute in
    bf16 themselves; the residual stream, norms and KV cache keep fp32's precision, as in the benchmark).
    ``speculate`` (greedy only, with a quantization): the quantized copy drafts ``draft_tokens`` tokens
    at a time and the unquantized model verifies them (:func:`speculative_tokens`), so the text is the
    unquantized model's own greedy text. The folder, prompt and settings are checked at the call,
    before any text is produced."""
    _check_sampling(temperature, top_k, top_p)
    _checks.one_of("quantize", quantize, QUANTIZE_CHOICES)
    _checks.positive_int("draft_tokens", draft_tokens)
    if speculate and (temperature != 0 or quantize == "none"):
        raise ConfigError(f"speculate needs greedy decoding with a quantized draft: temperature=0 and quantize "
                          f"int8, int4 or auto (got temperature={temperature}, quantize={quantize!r})")
    if dtype == "auto" and quantize != "none" and devices.resolve_device(device).type == "cpu":
        dtype = "float32"
    model, tokenizer = load_for_generation(folder, device=device, dtype=dtype)
    if speculate and not isinstance(model, GPT):
        raise ConfigError(f"speculate is not allowed for a {type(model).__name__}: it needs a GPT decoder")
    draft = copy.deepcopy(model) if speculate else model
    choice, reason = quantize_for_generation(draft, quantize)
    if quantize == "auto":
        log.info(f"quantize auto: {choice} ({reason})")
    ids = tokenizer.encode(prompt)
    idx = torch.tensor([ids], dtype=torch.int64, device=next(model.parameters()).device)
    stop_ids = (tokenizer.eos_id,) if stop_at_eos and tokenizer.eos_id is not None else None
    if speculate and choice != "none":
        tokens = speculative_tokens(model, draft, idx, max_new_tokens, draft_tokens=draft_tokens, stop_ids=stop_ids)
    else:  # a draft as slow as the model (quantize auto chose none) would only cost: decode plainly
        tokens = stream_tokens(draft, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
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
