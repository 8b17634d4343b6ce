"""Fixtures for the text tests: tiny random `transformers` T5 v1.1 checkpoints built locally (no hub)."""
import pytest
from t5_testing import TINY_HF, randomize_, save_hf


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """`{"encoder": (dir, torch model), "full": (dir, torch model)}`: T5EncoderModel and
    T5ForConditionalGeneration with random weights, saved with save_pretrained."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(**TINY_HF)
    root = tmp_path_factory.mktemp("hf_t5")
    enc = transformers.T5EncoderModel(cfg).eval()
    randomize_(enc, 1)
    full = transformers.T5ForConditionalGeneration(cfg).eval()
    randomize_(full, 2)
    return {"encoder": (save_hf(enc, root / "encoder"), enc), "full": (save_hf(full, root / "full"), full)}
