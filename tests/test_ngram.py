import math

import numpy as np
import pytest
import torch

from attnlab.data import CharTokenizer
from attnlab.errors import ConfigError, InputTypeError
from attnlab.models import load_pretrained
from attnlab.models.ngram import NGramLM

# Vocabulary a=0, b=1, c=2, d=3 (d never occurs); training text "abacabcaba" (10 tokens).
TRAIN = [0, 1, 0, 2, 0, 1, 2, 0, 1, 0]
VAL = [0, 1, 3, 0, 2]  # "abdac"


def test_bigram_kneser_ney_matches_the_hand_computed_case():
    # n = 2, D = 0.75, V = 4.
    # Bigram counts: ab 3, ba 2, ac 1, ca 2, bc 1  -> 5 bigram types.
    # Unigram continuation counts N1+(•w) (distinct left neighbours): a {b,c} 2, b {a} 1, c {a,b} 2, d 0;
    # N1+(••) = 5, and 3 tokens have a left neighbour, so the weight of the uniform 1/4 is 0.75·3/5:
    #   P(a) = (2 - .75)/5 + .75·3/5·1/4 = .25 + .1125 = .3625;  P(b) = .25/5 + .1125 = .1625
    #   P(c) = .3625;  P(d) = .1125   (sum 1)
    # Bigram level, histories: c(a•) = 4 with 2 types, c(b•) = 3 with 2 types, c(c•) = 2 with 1 type:
    #   P(b|a) = (3 - .75)/4 + .75·2/4·P(b) = .5625 + .375·.1625 = .6234375
    #   P(c|a) = (1 - .75)/4 + .375·P(c)    = .0625 + .1359375  = .1984375
    #   P(d|b) = 0 + .75·2/3·P(d)           = .5·.1125          = .05625
    #   P(a|d) = P(a) = .3625  (d was never a history: back off unchanged)
    # The first val token has no history: P(a) = .3625.
    hand = [0.3625, 0.6234375, 0.05625, 0.3625, 0.1984375]
    model = NGramLM(vocab_size=4, n=2, discount=0.75).fit(TRAIN)
    np.testing.assert_allclose(model.token_probs(VAL), hand, rtol=1e-12)
    assert model.perplexity(VAL) == pytest.approx(math.exp(-sum(map(math.log, hand)) / 5), rel=1e-12)
    np.testing.assert_allclose(model.next_token_probs([1, 0]), [0.1359375, 0.6234375, 0.1984375, 0.0421875], rtol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_distributions_sum_to_one_and_both_paths_agree(n):
    rng = np.random.default_rng(n)
    ids = rng.integers(0, 7, size=300) // rng.integers(1, 3, size=300)  # skewed, token 6 rare
    model = NGramLM(vocab_size=9, n=n, discount=0.6).fit(ids)
    seq = rng.integers(0, 9, size=40)
    for context in ([], [8], [8, 8, 8, 8], seq[:5].tolist(), ids[:10].tolist()):
        probs = model.next_token_probs(context)
        assert probs.shape == (9,) and bool((probs > 0).all())
        assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12)
    # the vectorised sequence scorer equals asking next_token_probs at every position
    stepwise = [float(model.next_token_probs(seq[:i])[seq[i]]) for i in range(len(seq))]
    np.testing.assert_allclose(model.token_probs(seq), stepwise, rtol=1e-12)


def test_overfits_a_tiny_text_and_greedy_generation_replays_it():
    text = "the quick brown fox jumps over a lazy dog. "  # every 3 characters have one successor
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text * 3)
    unigram, fourgram = NGramLM(tok.vocab_size, 1).fit(ids), NGramLM(tok.vocab_size, 4).fit(ids)
    assert fourgram.perplexity(ids) < 1.6 < 10 < unigram.perplexity(ids)
    out = fourgram.generate(tok.encode("the q"), 60, temperature=0)
    assert tok.decode(out) == (text * 3)[:65]


def test_sampling_is_seeded_and_temperature_sharpens():
    ids = np.random.default_rng(0).integers(0, 5, size=200)
    model = NGramLM(5, 2).fit(ids)
    assert model.generate([1], 30, seed=3) == model.generate([1], 30, seed=3)
    assert len(model.generate([], 10, seed=0)) == 10
    greedy = model.generate([1], 20, temperature=0)
    cold = model.generate([1], 20, seed=5, temperature=1e-4)
    assert cold == greedy


def test_save_load_gives_identical_probabilities(tmp_path):
    ids = np.random.default_rng(1).integers(0, 11, size=500)
    model = NGramLM(11, 3, discount=0.5).fit(ids)
    tok = CharTokenizer("abcdefghijk")
    model.save_pretrained(tmp_path / "ng", tokenizer=tok)
    loaded = load_pretrained(tmp_path / "ng")
    assert isinstance(loaded, NGramLM) and loaded.config == model.config
    np.testing.assert_array_equal(loaded.token_probs(ids[:100]), model.token_probs(ids[:100]))
    assert torch.equal(loaded.logits([3, 4]), model.logits([3, 4]))
    assert (tmp_path / "ng" / "tokenizer.json").is_file()


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="discount=1.0"):
        NGramLM(10, 2, discount=1.0)
    with pytest.raises(ConfigError, match=r"n=5 with vocab_size=100000"):
        NGramLM(100_000, 5)
    model = NGramLM(4, 3)
    with pytest.raises(ConfigError, match="call fit"):
        model.perplexity([0, 1])
    with pytest.raises(ConfigError, match="call fit"):
        model.save_pretrained(tmp_path / "x")
    with pytest.raises(ConfigError, match="needs at least 3"):
        model.fit([0, 1])
    with pytest.raises(ConfigError, match=r"expected ids in \[0, 4\)"):
        model.fit([0, 1, 4])
    with pytest.raises(InputTypeError, match="1-D"):
        model.fit([[0, 1, 2]])
    with pytest.raises(ConfigError, match="temperature"):
        model.fit([0, 1, 2, 3]).generate([0], 3, temperature=-1)
