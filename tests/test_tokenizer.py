import pytest

from attnlab.data import BPETokenizer, CharTokenizer, load_tokenizer, train_tokenizer
from attnlab.errors import ConfigError, InputTypeError

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


def test_char_tokenizer_round_trip_and_sorted_ids():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.chars == sorted(set(TEXT))
    assert tok.encode("Speak") == [tok.chars.index(c) for c in "Speak"]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode_array(TEXT).tolist() == tok.encode(TEXT)


def test_char_tokenizer_names_unknown_characters():
    tok = CharTokenizer.from_text(TEXT)
    with pytest.raises(ConfigError, match=r"2 character\(s\).*'Z' \(U\+005A, first at index 0\).*'é' \(U\+00E9"):
        tok.encode("Zoé")
    with pytest.raises(ConfigError, match="'😀'"):
        tok.encode("a😀")
    with pytest.raises(ConfigError, match=r"expected integers in \[0, "):
        tok.decode([tok.vocab_size])
    with pytest.raises(InputTypeError, match="text must be a str"):
        tok.encode(b"bytes")


def test_bpe_round_trip_and_vocab_size():
    tok = BPETokenizer.train(TEXT, vocab_size=300)
    assert tok.vocab_size == 300
    for text in (TEXT, "unseen ünïcödé 😀 text\r\n\t"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("Speak, speak.")) < len("Speak, speak.".encode())
    with pytest.raises(ConfigError, match="vocab_size=100"):
        BPETokenizer.train(TEXT, vocab_size=100)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_and_load_give_the_same_ids(tmp_path, kind):
    tok = train_tokenizer(kind, TEXT, vocab_size=280 if kind == "bpe" else None)
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(TEXT) == tok.encode(TEXT)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"hello": 1}')
    with pytest.raises(ConfigError, match="neither"):
        load_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="tokenizer='word'"):
        train_tokenizer("word", TEXT)
    with pytest.raises(ConfigError, match="vocab_size=500 is not allowed with tokenizer='char'"):
        train_tokenizer("char", TEXT, vocab_size=500)
