"""T5 tokenizer: a sentencepiece model (`spiece.model`) with T5's conventions.

Conventions (as `transformers`' T5 tokenizer, which GenerateCT uses): pad id 0, EOS id 1 appended
to every text, no BOS; a text longer than `max_length` pieces keeps its first `max_length - 1`
pieces plus EOS; a batch is padded with 0 to its longest member (`padding="longest"`).

Documented differences from `transformers`: the literal strings `<extra_id_N>` are not mapped
to T5's sentinel ids (ctgen never feeds sentinels to the encoder; they are tokenized as text).
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from ctgen.errors import UserError

log = logging.getLogger(__name__)

PAD_ID = 0
EOS_ID = 1
MODEL_FILENAMES = ("spiece.model", "sentencepiece.model")


class T5Tokenizer:
    """Sentencepiece tokenizer with T5's special ids. Build with `from_file` or `from_dir`."""

    def __init__(self, model_proto: bytes, *, source: str = "<bytes>"):
        import sentencepiece as spm

        self.source = source
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with terse text
            raise UserError(f"{source} is not a valid sentencepiece model: {e}") from None
        if self._sp.pad_id() != PAD_ID or self._sp.eos_id() != EOS_ID:
            raise UserError(
                f"{source}: T5 needs pad id {PAD_ID} and EOS id {EOS_ID}, but this sentencepiece model "
                f"has pad id {self._sp.pad_id()} and EOS id {self._sp.eos_id()} (not a T5 vocabulary)")
        self._proto = bytes(model_proto)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "T5Tokenizer":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserError(f"sentencepiece model {path} does not exist")
        with open(path, "rb") as f:
            return cls(f.read(), source=path)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, *, also: Sequence[str] = ()) -> "T5Tokenizer":
        """The `spiece.model` (or `sentencepiece.model`) in `directory`, else in the `also` directories."""
        dirs = [os.fspath(directory)] + [os.fspath(d) for d in also]
        candidates = [os.path.join(d, n) for d in dict.fromkeys(dirs) for n in MODEL_FILENAMES]
        for c in candidates:
            if os.path.isfile(c):
                return cls.from_file(c)
        raise UserError(
            f"no T5 tokenizer found: looked for {', '.join(candidates)}. Copy the `spiece.model` that "
            "belongs to these weights next to them (for google/t5-v1_1-* it is in the same Hugging Face "
            "repository; T5X checkpoints use gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model).")

    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces (the model's embedding may have more rows)."""
        return int(self._sp.get_piece_size())

    def serialized_model(self) -> bytes:
        return self._proto

    def encode(self, text: str) -> list[int]:
        """Ids of one text with EOS appended, not truncated."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return list(self._sp.encode(text)) + [EOS_ID]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) not in (PAD_ID, EOS_ID)])

    def batch_encode(
        self, texts: Sequence[str | bytes], *, max_length: int = 256, allow_empty: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids `[B, L]` int32 and mask `[B, L]` bool, padded to the longest text (L <= max_length).

        Texts may be `str` or UTF-8 `bytes` (as TFDS returns text features). An empty or
        whitespace-only text raises `ValueError` unless `allow_empty`, in which case it becomes
        the lone EOS token, as `transformers` encodes it.
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be a sequence of strings, not a single string")
        if max_length < 1:
            raise UserError(f"max_length must be >= 1, got {max_length}")
        if len(texts) == 0:
            raise UserError("no texts to encode (empty batch)")
        rows = []
        truncated = 0
        for i, t in enumerate(texts):
            if isinstance(t, bytes):
                try:
                    t = t.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"text {i} is not valid UTF-8: {e}") from None
            if not isinstance(t, str):
                raise TypeError(f"text {i} must be str or bytes, got {type(t).__name__}")
            if not t.strip() and not allow_empty:
                raise UserError(f"text {i} is empty or only whitespace ({t!r}); pass allow_empty=True "
                                 "to encode it as the lone EOS token")
            ids = self.encode(t)
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + [EOS_ID]
                truncated += 1
            rows.append(ids)
        if truncated:
            log.info("%d of %d texts truncated to %d tokens", truncated, len(texts), max_length)
        longest = max(len(r) for r in rows)
        ids_BxL = np.full((len(rows), longest), PAD_ID, np.int32)
        mask_BxL = np.zeros((len(rows), longest), bool)
        for i, r in enumerate(rows):
            ids_BxL[i, : len(r)] = r
            mask_BxL[i, : len(r)] = True
        return ids_BxL, mask_BxL
