"""Head masks (Michel et al.'s ξ_h) and ``attnlab ablate``: an all-ones mask changes nothing, a zeroed
head is the same as cutting its columns out of the output projection, mean-ablation outputs the
collected mean, gradient importance is the derivative finite differences give, runs started at a
later layer equal the full forward, and the pruning curves remove heads in the order they claim."""

import copy
import json
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from attnlab import cli
from attnlab.attention.gqa import GroupedQueryAttention
from attnlab.attention.head_mask import collect_head_means, set_head_mask
from attnlab.attention.mla import MultiHeadLatentAttention
from attnlab.data.tokenizer import CharTokenizer
from attnlab.errors import ConfigError, InputTypeError
from attnlab.models.encoder import Encoder, EncoderConfig
from attnlab.models.gpt import GPT, GPTConfig
from attnlab.models.pretrained import AttentionModel
from attnlab.surgery.ablate import (
    SHARES,
    AblateConfig,
    DecoderRunner,
    EncoderRunner,
    _prepare,
    analyse,
    pruning_masks,
    share_before_damage,
    spearman,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GPTS = {
    "gqa": {"attention": "gqa", "n_kv_head": 2, "positions": "rope"},
    # RoPE rotates in fp32 even in an fp64 model: finite differences need the learned positions.
    "gqa-learned": {"attention": "gqa", "n_kv_head": 2, "positions": "learned"},
    "mla-naive": {"attention": "mla", "mla_mode": "naive"},
    "mla-absorbed": {"attention": "mla", "mla_mode": "absorbed"},
}
TEXT = "to be or not to be that is the question whether tis nobler in the mind to suffer\n" * 6


def tiny_gpt(kind: str, dtype=torch.float32) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, n_layer=3, n_head=4, d_model=32, block_size=64, **GPTS[kind]))
    for p in model.parameters():  # larger weights than GPT's init, so every head visibly matters
        p.data.normal_(0, 0.3) if p.dim() >= 2 else None
    return model.to(dtype).eval()


def tiny_encoder(dtype=torch.float32) -> Encoder:
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(vocab_size=40, max_position_embeddings=64, d_model=32, n_layer=3, n_head=4,
                                  ffn_hidden=64))
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.data.normal_(0, 0.3)
    return model.to(dtype).eval()


def ids(batch=2, length=12, seed=1):
    return torch.randint(0, 40, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(GPTS))
def test_an_all_ones_mask_changes_no_gpt_output(kind):
    model, x = tiny_gpt(kind), ids()
    with torch.no_grad():
        plain, _ = model(x)
        with model.masked_heads(torch.ones(3, 4)):
            masked, _ = model(x)
        width = 32 if kind.startswith("mla") else 8  # MLA: v_head_dim; else head_dim 32 / 4
        with model.masked_heads(torch.ones(2, 3, 4), means=[torch.randn(4, width) for _ in range(3)]):
            per_row, _ = model(x)
        after, _ = model(x)
    assert torch.equal(plain, masked) and torch.equal(plain, per_row) and torch.equal(plain, after)
    assert all(blk.attn.head_mask is None for blk in model.blocks)


def test_an_all_ones_mask_changes_no_encoder_output():
    model, x = tiny_encoder(), ids()
    with torch.no_grad():
        plain = model(x)
        with model.masked_heads(torch.ones(3, 4)):
            masked = model(x)
    assert all(torch.equal(a, b) for a, b in zip(plain, masked))


def _o_proj_input(module, x):
    """The module's output and what its output projection was fed (B, T, H·D)."""
    seen = []
    proj = module.o_proj if isinstance(module, GroupedQueryAttention) else module.wo
    handle = proj.register_forward_hook(lambda mod, inputs, output: seen.append(inputs[0]))
    try:
        out = module(x)
    finally:
        handle.remove()
    return out, seen[0], proj


ATTENTIONS = {
    "gqa": lambda: GroupedQueryAttention(32, 4, 2, rope=True, out_bias=True, qkv_bias=True),
    "encoder-attention": lambda: GroupedQueryAttention(32, 4, causal=False, out_bias=True, qkv_bias=True),
    "mla-naive": lambda: MultiHeadLatentAttention(32, 4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                                  v_head_dim=6, mode="naive"),
    "mla-absorbed": lambda: MultiHeadLatentAttention(32, 4, kv_lora_rank=16, qk_nope_head_dim=8,
                                                     qk_rope_head_dim=4, v_head_dim=6, mode="absorbed"),
}


@pytest.mark.parametrize("kind", list(ATTENTIONS))
def test_zeroing_a_head_is_cutting_its_columns_out_of_the_output_projection(kind):
    torch.manual_seed(0)
    module, x = ATTENTIONS[kind]().double().eval(), torch.randn(2, 7, 32, dtype=torch.double)
    head, width = 2, (module.head_dim if isinstance(module, GroupedQueryAttention) else module.v_head_dim)
    with torch.no_grad():
        _, full_input, proj = _o_proj_input(module, x)
        mask = torch.ones(4, dtype=torch.double)
        mask[head] = 0
        module.head_mask = mask
        masked = module(x)
        module.head_mask = None
        keep = [c for c in range(4 * width) if not head * width <= c < (head + 1) * width]
        by_hand = F.linear(full_input[..., keep], proj.weight[:, keep], proj.bias)
    torch.testing.assert_close(masked, by_hand, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(masked, module(x))  # the head did contribute


def test_a_zeroed_head_in_the_model_equals_zeroed_o_proj_columns():
    model, x = tiny_gpt("gqa", torch.double), ids()
    cut = copy.deepcopy(model)
    with torch.no_grad():
        cut.blocks[1].attn.o_proj.weight[:, 3 * 8:4 * 8] = 0  # head 3 of layer 1 (head_dim 8)
        mask = torch.ones(3, 4, dtype=torch.double)
        mask[1, 3] = 0
        with model.masked_heads(mask):
            masked, _ = model(x)
        torch.testing.assert_close(masked, cut(x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["gqa", "mla-naive", "mla-absorbed"])
def test_mean_ablation_outputs_the_collected_mean_of_that_head(kind):
    torch.manual_seed(0)
    module, x = ATTENTIONS[kind]().double().eval(), torch.randn(2, 7, 32, dtype=torch.double)
    width = module.head_dim if isinstance(module, GroupedQueryAttention) else module.v_head_dim
    with torch.no_grad():
        with collect_head_means(module) as collected:
            _, fed, _ = _o_proj_input(module, x)
        mean = collected.means[0]  # (H, D) float32
        by_hand = fed.view(2, 7, 4, width).mean(dim=(0, 1))
        torch.testing.assert_close(mean.double(), by_hand, rtol=1e-6, atol=1e-6)
        set_head_mask(module, torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.double), means=[mean.double()])
        _, ablated, _ = _o_proj_input(module, x)
        set_head_mask(module, None)
    heads = ablated.view(2, 7, 4, width)
    torch.testing.assert_close(heads[:, :, 1], mean[1].double().expand(2, 7, width))
    torch.testing.assert_close(heads[:, :, [0, 2, 3]], fed.view(2, 7, 4, width)[:, :, [0, 2, 3]])


def test_a_masked_model_decodes_with_its_cache_as_it_recomputes():
    model, x = tiny_gpt("gqa", torch.double), ids(length=10)
    mask = torch.ones(3, 4, dtype=torch.double)
    mask[0, 1] = mask[2, 0] = 0
    with torch.no_grad(), model.masked_heads(mask):
        full, _ = model(x)
        caches = model.new_caches(2, 10)
        steps = [model(x[:, :6], caches=caches)[0]] + [model(x[:, t:t + 1], caches=caches)[0] for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["gqa", "mla-absorbed"])
def test_a_run_started_at_a_layer_equals_the_full_forward_with_that_mask(kind):
    model, x = tiny_gpt(kind, torch.double), ids(batch=2, length=13)
    with torch.no_grad():
        runner = DecoderRunner(model, x)
        mask = torch.ones(3, 4, dtype=torch.double)
        mask[1, 0] = mask[2, 3] = 0
        rows = mask.expand(2, 3, 4)
        from_layer = runner.losses(rows, 1)[0]
        with model.masked_heads(mask):
            logits, _ = model(x[:, :-1])
        full = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(1)
        intact = runner.losses(None, 3)[0]
        _, loss = model(x[:, :-1], x[:, 1:])
    torch.testing.assert_close(from_layer, full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(intact.mean(), loss.double(), rtol=1e-6, atol=0)  # GPT's own loss is fp32


def test_an_encoder_run_started_at_a_layer_equals_the_full_forward():
    model, x = tiny_encoder(torch.double), ids()
    with torch.no_grad():
        runner = EncoderRunner(model, x)
        mask = torch.ones(3, 4, dtype=torch.double)
        mask[2, 1] = 0
        from_layer = runner.losses(mask.expand(2, 3, 4), 2)[0]
        with model.masked_heads(mask):
            final = model(x)[-1]
        by_hand = (1 - F.cosine_similarity(final, runner.final, dim=-1)).mean(1)
        assert float(runner.losses(None, 0).abs().max()) < 1e-12  # the intact model has loss 0
    torch.testing.assert_close(from_layer, by_hand, rtol=1e-10, atol=1e-10)


def test_gradient_importance_is_what_finite_differences_give():
    model, x = tiny_gpt("gqa-learned", torch.double), ids(batch=3, length=11)
    runner = DecoderRunner(model, x)
    torch.set_default_dtype(torch.double)
    try:
        importance = runner.gradient_importance()
    finally:
        torch.set_default_dtype(torch.float32)
    eps, by_hand = 1e-6, torch.empty(3, 4, dtype=torch.double)
    with torch.no_grad():
        for layer in range(3):
            for head in range(4):
                up, down = torch.ones(3, 4, dtype=torch.double), torch.ones(3, 4, dtype=torch.double)
                up[layer, head] += eps
                down[layer, head] -= eps
                diff = (runner.losses(up.expand(3, 3, 4), 0) - runner.losses(down.expand(3, 3, 4), 0)) / (2 * eps)
                by_hand[layer, head] = diff.abs().mean()  # E over windows of |∂L_w/∂ξ|
    torch.testing.assert_close(importance.double(), by_hand, rtol=1e-5, atol=1e-9)
    assert float(by_hand.min()) > 0


def test_the_encoders_importance_estimates_half_the_squared_jacobian_norm():
    model, x = tiny_encoder(torch.double), ids(batch=2, length=9)
    runner = EncoderRunner(model, x)
    torch.set_default_dtype(torch.double)
    try:
        estimate = runner.gradient_importance(probes=3000, seed=0)
    finally:
        torch.set_default_dtype(torch.float32)
    eps, exact = 1e-6, torch.empty(3, 4, dtype=torch.double)
    with torch.no_grad():
        for layer in range(3):
            for head in range(4):
                up, down = torch.ones(3, 4, dtype=torch.double), torch.ones(3, 4, dtype=torch.double)
                up[layer, head] += eps
                down[layer, head] -= eps
                u_up, u_down = (F.normalize(runner._run(m.expand(2, 3, 4), 0, None), dim=-1) for m in (up, down))
                jac = (u_up - u_down) / (2 * eps)  # (W, T, C): ∂u_t/∂ξ per window
                exact[layer, head] = 0.5 * jac.pow(2).sum(-1).mean()
    torch.testing.assert_close(estimate.double(), exact, rtol=0.15, atol=0)


def test_pruning_masks_remove_a_growing_prefix_of_the_order():
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    masks = pruning_masks(order, SHARES, 3, 4).view(len(SHARES), 12)
    removed = [set(torch.nonzero(m == 0).flatten().tolist()) for m in masks]
    assert [len(r) for r in removed] == [round(s * 12) for s in SHARES]
    assert all(a <= b for a, b in pairwise(removed))
    assert removed[3] == set(order[:2].tolist())


def test_spearman_is_one_for_the_same_order_and_minus_one_for_the_reverse():
    scores = torch.tensor([[0.3, -1.0, 2.0], [0.1, 5.0, 0.0]])
    assert spearman(scores, scores * 7 + 1) == pytest.approx(1.0)
    assert spearman(scores, -scores) == pytest.approx(-1.0)
    assert abs(spearman(scores, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))) < 1


def test_share_before_damage_finds_where_the_curve_starts_to_climb():
    shares = (0.0, 0.25, 0.5, 0.75, 1.0)
    assert share_before_damage([1.0, 1.0, 1.05, 2.0, 11.0], shares, 1.0) == 0.5  # 10 % of +10 reached at 75 %
    assert share_before_damage([1.0, 3.0, 5.0, 8.0, 11.0], shares, 1.0) == 0.0


def test_dead_heads_are_unimportant_and_pruned_first_at_no_cost():
    """Heads whose o_proj columns are zero do nothing: both importances say 0, and removing them
    first (ablation or gradient order) leaves the loss where it was, unlike the random orders."""
    model = tiny_gpt("gqa")
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.o_proj.weight[:, :16] = 0  # heads 0 and 1 of every layer: 6 of 12 heads dead
    results = analyse(AttentionModel("tiny", model, None, 64), ids(batch=3, length=17), seed=0)
    delta, grad = torch.tensor(results["ablation_delta"]), torch.tensor(results["importance"])
    assert float(delta[:, :2].abs().max()) < 1e-6 and torch.equal(grad[:, :2], torch.zeros(3, 2))
    assert float(delta[:, 2:].abs().min()) > 0 and float(grad[:, 2:].min()) > 0
    pruning, base = results["pruning"], results["base_loss"]
    half = SHARES.index(0.5)
    assert pruning["gradient"][:half + 1] == pytest.approx([base] * (half + 1), abs=1e-6)
    assert pruning["gradient"][half + 1] != pytest.approx(base, abs=1e-4)
    # The ablation order starts with the head whose removal raised the loss least (a random model
    # has heads whose removal lowers it): one head of 12 removed at 5 %.
    assert SHARES[1] == 0.05 and pruning["ablation"][1] == pytest.approx(base + float(delta.min()), abs=1e-5)
    assert len({round(pruning[n][-1], 6) for n in pruning if n != "shares"}) == 1  # all removed: one model
    assert max(abs(pruning[f"random{k}"][half] - base) for k in (1, 2, 3)) > 1e-3
    top = results["top_heads"]
    assert [h["delta"] for h in top] == sorted((h["delta"] for h in top), reverse=True)
    assert top[0]["delta"] == pytest.approx(float(delta.max()))


def test_mean_mode_on_an_encoder_gives_a_full_report_of_numbers():
    results = analyse(AttentionModel("enc", tiny_encoder(), None, 64), ids(batch=2, length=10), mode="mean")
    assert results["kind"] == "encoder" and results["base_loss"] == 0.0
    assert -1 <= results["spearman_ablation_vs_raw_gradient"] <= 1
    assert len(results["ablation_delta"]) == 3 and len(results["pruning"]["ablation"]) == len(SHARES)
    assert min(min(row) for row in results["ablation_delta"]) >= 0  # 1 − cos never goes below the intact 0


def test_bad_masks_are_refused_with_what_is_allowed():
    model = tiny_gpt("gqa")
    with pytest.raises(ConfigError, match=r"expected \(3, 4\)"):
        model.set_head_mask(torch.ones(4, 3))
    with pytest.raises(ConfigError, match="nan or inf"):
        model.set_head_mask(torch.full((3, 4), float("nan")))
    with pytest.raises(InputTypeError, match="floating-point"):
        model.set_head_mask(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="one .* per layer"):
        model.set_head_mask(torch.ones(3, 4), means=[torch.zeros(4, 8)])
    with pytest.raises(ConfigError, match=r"expected \(4, 8\)"):
        model.set_head_mask(torch.ones(3, 4), means=[torch.zeros(4, 7)] * 3)
    with pytest.raises(ConfigError, match="rows but the batch has"), model.masked_heads(torch.ones(3, 3, 4)):
        model(ids(batch=2))
    assert model.blocks[0].attn.head_mask is None
    wrapper = GPT(GPTConfig(vocab_size=40, n_layer=1, n_head=2, d_model=16, block_size=16, attention="wrapper"))
    with pytest.raises(ConfigError, match="wrapper does not"):
        wrapper.set_head_mask(torch.ones(1, 2))


@pytest.fixture
def gpt_folder(tmp_path):
    tokenizer = CharTokenizer.from_text(TEXT)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, d_model=16, block_size=32))
    model.save_pretrained(tmp_path / "gpt", tokenizer)
    (tmp_path / "text.txt").write_text(TEXT)
    return str(tmp_path / "gpt"), str(tmp_path / "text.txt")


def test_the_cli_writes_the_report_and_refuses_to_overwrite_it(gpt_folder, tmp_path, capsys):
    folder, text = gpt_folder
    out = tmp_path / "ablate"
    argv = ["ablate", "--model", folder, "--text", text, "--max-tokens", "48", "--window", "16", "--quiet",
            "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "top 5 by loss increase" in printed and "report.md" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.json", "report.md", "ablation.png", "importance.png", "pruning.png"])
    results = json.loads((out / "results.json").read_text())
    assert (results["windows"], results["window"], results["layers"], results["heads"]) == (3, 16, 2, 2)
    assert "attnlab ablate --model" in (out / "report.md").read_text()
    before = (out / "results.json").read_bytes()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert (out / "results.json").read_bytes() == before
    assert cli.main([*argv, "--overwrite", "--mode", "mean"]) == 0
    assert json.loads((out / "results.json").read_text())["mode"] == "mean"


@pytest.mark.parametrize("extra, words", [
    (["--window", "40", "--max-tokens", "20"], "window=40 is larger than max_tokens=20"),
    (["--text", "missing.txt"], "is not a file"),
    (["--window", "2"], "at least 3 tokens"),
    (["--max-tokens", "9999", "--window", "500"], "longer than"),
])
def test_the_cli_refuses_bad_input_in_one_line_and_writes_nothing(gpt_folder, tmp_path, capsys, extra, words):
    folder, text = gpt_folder
    out = tmp_path / "never"
    assert cli.main(["ablate", "--model", folder, "--text", text, "--out", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, err
    assert not out.exists()


def test_the_config_checks_come_before_any_model_loads():
    with pytest.raises(ConfigError, match="seed"):
        AblateConfig(model="no-such-model", seed=-1)
    assert AblateConfig(max_tokens=20).window == 20


def test_prepare_collects_means_only_for_mean_mode():
    model, x = tiny_gpt("mla-naive"), ids(length=9)
    am = AttentionModel("tiny", model, None, 64)
    assert _prepare(am, x, "zero")[1] is None
    means = _prepare(am, x, "mean")[1]
    assert len(means) == 3 and means[0].shape == (4, 32)  # v_head_dim 32
    assert all(blk.attn._head_sums is None for blk in model.blocks)
