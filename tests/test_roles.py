"""`attnlab roles`: previous-token, duplicate-token and induction scores on repeated random tokens.

The scores are checked on hand-made attention patterns (each pattern scores 1 on its own role),
then end to end on a 2-layer GPT whose weights are set by hand to hold a previous-token head
(layer 0) feeding an induction head (layer 1): those two heads must be found, and no other."""

import json

import numpy as np
import pytest
import torch

from attnlab import cli
from attnlab.data.tokenizer import BPETokenizer, CharTokenizer
from attnlab.errors import ConfigError
from attnlab.hf.export import export_hf
from attnlab.models.gpt import GPT, GPTConfig
from attnlab.models.pretrained import AttentionModel
from attnlab.surgery.roles import (
    ROLES, RoleRequest, copy_losses, head_roles, repeated_tokens, role_scores, save_roles,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, L = 16, 8  # 16 token ids, copies of 8 distinct tokens
CHARS = "abcdefghijklmnop"


def _pattern(T: int, targets) -> torch.Tensor:
    """(T, T) attention with each query's weight on ``targets(q)`` when that is a valid key, else on itself."""
    w = torch.zeros(T, T)
    for q in range(T):
        k = targets(q)
        w[q, k if 0 <= k <= q else q] = 1.0
    return w


def test_each_hand_made_pattern_scores_one_on_its_own_role_only():
    T = 2 * L
    heads = torch.stack([
        _pattern(T, lambda q: q - 1),  # previous token
        _pattern(T, lambda q: q - L),  # duplicate token
        _pattern(T, lambda q: q - L + 1),  # induction
        torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None],  # uniform over the past
    ])[None].expand(3, -1, -1, -1)  # (batch 3, 4 heads, T, T)
    scores = role_scores([heads], L, 2)
    grid = np.stack([scores[role][0] for role in ROLES])  # (roles, heads)
    assert np.allclose(grid[:, :3], np.eye(3))
    assert (grid[:, 3] < 0.4).all() and grid[0, 3] == pytest.approx(np.mean([1 / (q + 1) for q in range(1, T)]))


def test_bos_offset_and_more_copies():
    T = 1 + 3 * L  # a BOS, then three copies
    induction = _pattern(T, lambda q: q - L + 1 if q > L else 0)[None, None]
    scores = role_scores([induction], L, 3, offset=1)
    assert scores["induction"][0, 0] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="expected offset"):
        role_scores([induction], L, 2, offset=1)


def test_repeated_tokens_are_copies_of_distinct_seeded_tokens():
    request = RoleRequest(seq_len=L, repeats=3, batch=5, seed=7)
    ids = repeated_tokens(VOCAB, request, bos_id=15, exclude={15})
    assert ids.shape == (5, 1 + 3 * L) and (ids[:, 0] == 15).all()
    body = ids[:, 1:].reshape(5, 3, L)
    assert (body == body[:, :1]).all()  # every copy equals the first
    assert all(len(set(row.tolist())) == L and 15 not in row.tolist() for row in body[:, 0])
    assert torch.equal(ids, repeated_tokens(VOCAB, request, bos_id=15, exclude={15}))
    assert not torch.equal(ids, repeated_tokens(VOCAB, RoleRequest(seq_len=L, repeats=3, batch=5, seed=8),
                                                bos_id=15, exclude={15}))


def test_copy_losses_split_the_first_copy_from_the_later_ones():
    ids = repeated_tokens(VOCAB, RoleRequest(seq_len=L, repeats=2, batch=3))
    logits = torch.zeros(3, 2 * L, VOCAB)  # uniform: ln(16) everywhere ...
    for t in range(L, 2 * L - 1):  # ... except a sure copy of what followed in the first copy
        logits[torch.arange(3), t, ids[:, t + 1]] = 50.0
    losses = copy_losses((logits, None), ids, L)
    assert losses["first_copy"] == pytest.approx(np.log(VOCAB)) and losses["later_copies"] < 1e-6
    assert copy_losses([torch.zeros(3, 2 * L, 8)], ids, L) is None  # an encoder's hidden states: no logits


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_len": 1}, "seq_len=1"), ({"repeats": 1}, "repeats=1"), ({"batch": 0}, "batch=0"),
    ({"seed": -1}, "seed=-1"), ({"threshold": 0.0}, "threshold=0.0"), ({"threshold": float("nan")}, "threshold=nan"),
])
def test_bad_requests_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RoleRequest(**kwargs)


def _induction_gpt() -> GPT:
    """Layer 0 head 0 attends to the previous position and copies that token into a "previous token"
    slot; layer 1 head 0 matches its own token against that slot: attention to the token after the
    earlier occurrence. Residual dims: token one-hot [0, 16), position one-hot [16, 32), previous
    token [32, 48). The other heads and every FFN are zero (uniform attention, no output)."""
    cfg = GPTConfig(vocab_size=VOCAB, block_size=2 * L, n_layer=2, n_head=2, head_dim=32, d_model=64,
                    norm="rmsnorm", positions="learned")
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.norm_f, *(m for b in model.blocks for m in (b.norm1, b.norm2))):
            norm.weight.fill_(1.0)
        eye = torch.eye(VOCAB)
        model.wte.weight[:, :VOCAB] = eye
        model.wpe.weight[:, 16:16 + 2 * L] = torch.eye(2 * L)
        first, second = model.blocks[0].attn, model.blocks[1].attn
        for r in range(2 * L):  # head 0: query unit r from position r, key unit r from position r - 1
            first.q_proj.weight[r, 16 + r] = 2.0
            if r:
                first.k_proj.weight[r, 16 + r - 1] = 1.0
        first.v_proj.weight[:VOCAB, :VOCAB] = eye  # the attended token's one-hot (scaled by the norm)
        first.o_proj.weight[32:48, :VOCAB] = eye / (64 / 2) ** 0.5  # undo norm1's scale: ~1 in the slot
        second.q_proj.weight[:VOCAB, :VOCAB] = 4.0 * eye  # this token ...
        second.k_proj.weight[:VOCAB, 32:48] = eye  # ... against each key's previous token
    return model


def test_hand_built_induction_circuit_is_found_and_nothing_else():
    model = AttentionModel("hand-built", _induction_gpt(), CharTokenizer(list(CHARS)), 2 * L)
    report = head_roles(model, RoleRequest(seq_len=L, repeats=2, batch=6, seed=1))
    scores = report.scores
    # Position 0 attends to itself, so its "previous token" slot holds its own token and the first
    # query of the second copy splits between keys 0 and 1: 7.5 of 8 queries right.
    assert scores["previous"][0, 0] > 0.99 and scores["induction"][1, 0] == pytest.approx(7.5 / 8, abs=1e-3)
    assert [(la, h) for la, h, _ in report.flagged("previous")] == [(0, 0)]
    assert [(la, h) for la, h, _ in report.flagged("induction")] == [(1, 0)]
    assert report.flagged("duplicate") == []
    text = report.format("text")
    assert "induction heads (→ i - L + 1): 1 above 0.4" in text and "layer 1 head 0" in text
    assert "0.4" in report.recipe() and "i-L+1" in report.recipe()


def test_report_files_and_json(tmp_path):
    model = AttentionModel("hand-built", _induction_gpt(), CharTokenizer(list(CHARS)), 2 * L)
    report = head_roles(model, RoleRequest(seq_len=L, batch=2))
    paths = save_roles(report, tmp_path / "roles")
    assert sorted(p.name for p in paths) == ["duplicate.png", "induction.png", "previous.png", "roles.json", "roles.md",
                                                "roles.txt"]
    data = json.loads((tmp_path / "roles" / "roles.json").read_text())
    assert np.array(data["roles"]["induction"]["scores"]).shape == (2, 2)
    assert data["roles"]["induction"]["heads"][0]["layer"] == 1 and data["threshold"] == 0.4
    with pytest.raises(ConfigError, match="already exists"):
        save_roles(report, tmp_path / "roles")
    assert save_roles(report, tmp_path / "roles", overwrite=True) == paths


@pytest.fixture
def hand_built_folder(tmp_path):
    return str(_induction_gpt().save_pretrained(tmp_path / "gpt", CharTokenizer(list(CHARS))))


def test_cli_roles_on_a_checkpoint_folder(hand_built_folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["roles", "--model", hand_built_folder, "--seq-len", str(L), "--batch", "3", "--format", "json",
            "--out", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert [(h["layer"], h["head"]) for h in data["roles"]["induction"]["heads"]] == [(1, 0)]
    assert "wrote" in captured.err and (out / "induction.png").is_file()
    before = (out / "roles.json").read_bytes()
    assert cli.main(argv) == 2  # an existing folder without --overwrite
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and (out / "roles.json").read_bytes() == before
    assert cli.main(["roles", "--model", hand_built_folder, "--seq-len", "9"]) == 2  # 2 x 9 > block_size 16
    assert "context of 16" in capsys.readouterr().err


def test_an_hf_folder_scores_as_the_attnlab_folder_it_was_exported_from(tmp_path):
    pytest.importorskip("transformers")
    tokenizer = BPETokenizer.train("to be or not to be, that is the question. " * 40, vocab_size=300)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                    attention="gqa", positions="rope", norm="rmsnorm", activation="swiglu")
    GPT(cfg).save_pretrained(tmp_path / "gpt", tokenizer)
    export_hf(tmp_path / "gpt", tmp_path / "hf")
    request = RoleRequest(seq_len=10, repeats=3, batch=2, seed=3)
    ours, exported = head_roles(str(tmp_path / "gpt"), request), head_roles(str(tmp_path / "hf"), request)
    for role in ROLES:
        assert ours.scores[role].shape == (2, 4)
        assert np.allclose(ours.scores[role], exported.scores[role], atol=1e-5), role
