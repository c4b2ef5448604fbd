import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Idle OpenMP threads yield the core instead of spinning: on a busy 2-core machine spinning threads
# made one SmolLM2 forward 50x slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pathlib

import pytest
import torch

# Under pytest-xdist each worker gets one core: tiny tensors run far faster without thread hand-offs.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture
def tiny_shakespeare() -> pathlib.Path:
    if not TINY_SHAKESPEARE.exists():
        pytest.skip(f"{TINY_SHAKESPEARE} not present")
    return TINY_SHAKESPEARE


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster than two on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_checkpoint(tmp_path) -> str:
    """A small random Encoder saved with MiniLM's WordPiece tokenizer: a CHECKPOINT_FOLDER for the CLI."""
    from attnlab.errors import ConfigError
    from attnlab.data.tokenizer import WordPieceTokenizer
    from attnlab.hf.bert import minilm_path
    from attnlab.models.encoder import Encoder, EncoderConfig

    try:
        tokenizer = WordPieceTokenizer.from_file(minilm_path() / "tokenizer.json")
    except ConfigError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))
    model = Encoder(EncoderConfig(d_model=16, n_layer=2, n_head=4, ffn_hidden=32, max_position_embeddings=32))
    return str(model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer))
