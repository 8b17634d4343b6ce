"""The sentencepiece T5 tokenizer: transformers' conventions, truncation, bad input."""
import os

import numpy as np
import pytest

from ctgen.errors import UserError
from ctgen.text.load import builtin_dir, load_text_encoder
from ctgen.text.tokenizer import EOS_ID, PAD_ID, T5Tokenizer

LONG = "Extensive bilateral ground-glass opacities with crazy-paving pattern. " * 150  # ~10,000 characters
TEXTS = [
    "64 years old male: Emphysema.",
    "None years old None: ",
    "  23 years old female:\tBilateral pleural effusions,\nlarge on the right.  ",
    "Ünïcode prompt: 肺 nodule — 5 mm, “quoted”, ½ cm, Ⅻ",
    LONG,
]


@pytest.fixture(scope="module")
def tok():
    return T5Tokenizer.from_dir(builtin_dir())


def test_matches_transformers_t5_tokenizer(tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.T5Tokenizer.from_pretrained(builtin_dir(), extra_ids=0)
    # GenerateCT's call (tm/t5.py): padding="longest", truncation at 256.
    want = hf(TEXTS, return_tensors="np", padding="longest", max_length=256, truncation=True)
    ids, mask = tok.batch_encode(TEXTS, max_length=256)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"].astype(bool))


def test_conventions_and_exact_truncation(tok):
    assert len(LONG) >= 10_000
    full = tok.encode(LONG)
    assert len(full) > 256 and full[-1] == EOS_ID
    ids, mask = tok.batch_encode(["Emphysema.", LONG], max_length=256)
    assert ids.shape == (2, 256) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[1], full[:255] + [EOS_ID])  # first 255 pieces + EOS
    assert mask[1].all()
    short = tok.encode("Emphysema.")
    np.testing.assert_array_equal(ids[0, : len(short)], short)
    assert (ids[0, len(short):] == PAD_ID).all() and not mask[0, len(short):].any()
    # Exactly 256 tokens is not truncated; bytes are decoded as UTF-8 (TFDS text features).
    exact = tok.decode(full[:255])
    assert len(tok.encode(exact)) == 256  # 255 pieces + EOS: right at the limit
    assert tok.batch_encode([exact.encode("utf-8")], max_length=256)[0].shape[1] == len(tok.encode(exact))


def test_bad_input_is_reported(tok):
    for bad in ["", "   \n\t"]:
        with pytest.raises(UserError, match="text 1 is empty or only whitespace"):
            tok.batch_encode(["ok", bad])
    ids, mask = tok.batch_encode(["", "x"], allow_empty=True)
    assert ids[0].tolist()[: mask[0].sum()] == [EOS_ID]  # transformers encodes "" as the lone EOS
    with pytest.raises(TypeError, match="sequence of strings"):
        tok.batch_encode("a single string")
    with pytest.raises(TypeError, match="text 0 must be str or bytes"):
        tok.batch_encode([None])
    with pytest.raises(UserError, match="not valid UTF-8"):
        tok.batch_encode([b"\xff\xfe"])
    with pytest.raises(UserError, match="empty batch"):
        tok.batch_encode([])
    # Characters outside the vocabulary become unk (id 2), never an error.
    assert 2 in tok.encode("肺")


def test_missing_or_wrong_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match="spiece.model"):
        T5Tokenizer.from_dir(str(tmp_path))
    (tmp_path / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(UserError, match="not a valid sentencepiece model"):
        T5Tokenizer.from_dir(str(tmp_path))
    # A model directory without its spiece.model: the error names where it looked.
    d = tmp_path / "nospiece"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        (d / name).write_bytes(open(os.path.join(builtin_dir(), name), "rb").read())
    with pytest.raises(UserError, match=r"nospiece/spiece\.model"):
        load_text_encoder(str(d))
    with pytest.raises(UserError, match="does not exist"):
        load_text_encoder(str(tmp_path / "no_such_dir"))
