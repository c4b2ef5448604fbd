"""Named training recipes: a model config and a training config that belong together.

- ``nanogpt-cpu``: nanoGPT's CPU recipe for Tiny Shakespeare (4 layers, 4 heads, 128 dims, block
  64, batch 12, lr 1e-3, 2000 iterations, dropout 0, fp32 as nanoGPT runs on a CPU), built with
  attnlab's GPT configured like nanoGPT's; it ends near val loss 1.886;
- ``race``: attnlab's recipe for the race to that loss (3 Llama-style blocks, one fewer than nanoGPT's:
  in fp32 three seeds crossed at the same steps for a quarter less compute; Muon for the hidden matrices, AdamW at 6×
  Muon's rate for the embeddings and norms as the speedrun does, a decay that ends near the crossing;
  the precision and kernel the machine measured fastest).

Both judge val loss as nanoGPT does: every position of 20 × 12 random 64-token val windows.
``attnlab train --recipe NAME`` starts from one; flags given with it override its fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnlab import _checks

RACE_TARGET = 1.886  # nanoGPT's CPU recipe's val loss after 2000 iterations (its README: "about 1.88")
_JUDGE = dict(eval_iters=20, eval_batch_size=12, eval_block_size=64)


@dataclass(frozen=True)
class Recipe:
    description: str
    model: dict
    train: dict


RECIPES = {
    "nanogpt-cpu": Recipe(
        "nanoGPT's CPU recipe (learned positions, LayerNorm, GELU, fp32, SDPA)",
        dict(n_layer=4, n_head=4, d_model=128, block_size=64, attention="mha", positions="learned",
             norm="layernorm", activation="gelu", dropout=0.0),
        dict(batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=2000, decay_steps=2000,
             eval_interval=250, dtype="float32", attention_kernel="fused", **_JUDGE),
    ),
    "race": Recipe(
        "attnlab's race to nanoGPT's val loss: 3 layers of RoPE + RMSNorm + SwiGLU, Muon for the hidden matrices "
        "(lr 6e-3) and AdamW for the rest (lr 3.6e-2), batch 16, warmup 10, decay to step 275",
        dict(n_layer=3, n_head=4, d_model=128, block_size=64, attention="mha", positions="rope", norm="rmsnorm",
             activation="swiglu", dropout=0.0),
        dict(batch_size=16, optimizer="muon", lr=6e-3, adamw_lr=3.6e-2, min_lr=2e-4, warmup_steps=10, max_steps=275,
             eval_interval=25, eval_start=200, target_val_loss=RACE_TARGET, dtype="auto", attention_kernel="auto", **_JUDGE),
    ),
}


def recipe(name: str) -> Recipe:
    _checks.one_of("recipe", name, tuple(RECIPES))
    return RECIPES[name]
