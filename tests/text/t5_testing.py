"""Helpers for the text tests: tiny random `transformers` T5 v1.1 checkpoints built locally (no hub)."""
import os
import shutil

import numpy as np
from ctgen.text.load import builtin_dir

# Small but exercising every code path: 4 heads, 2 layers, log-spaced position buckets reached
# (lengths up to 40 > num_buckets/4), the max-distance clamp reached (24 < 40).
TINY_HF = dict(vocab_size=512, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1, num_heads=4,
               relative_attention_num_buckets=16, relative_attention_max_distance=24,
               feed_forward_proj="gated-gelu", dropout_rate=0.0)


def randomize_(model, seed: int) -> None:
    """Keep transformers' random init of the matrices; also randomise norm scales and position
    biases (initialised to constants), so a misplaced one shows."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.8)
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def save_hf(model, directory) -> str:
    model.save_pretrained(directory)
    shutil.copy(os.path.join(builtin_dir(), "spiece.model"), os.path.join(directory, "spiece.model"))
    return str(directory)


def random_batch(seed: int = 0, lengths=(40, 17, 1, 29), vocab: int = 512):
    """Random ids `[B, L]` with EOS at each row's end and zero padding, and the mask."""
    rng = np.random.default_rng(seed)
    b, l = len(lengths), max(lengths)
    ids = np.zeros((b, l), np.int32)
    mask = np.zeros((b, l), bool)
    for i, n in enumerate(lengths):
        ids[i, : n - 1] = rng.integers(3, vocab, n - 1)
        ids[i, n - 1] = 1
        mask[i, :n] = True
    return ids, mask


def hf_last_hidden(model, ids, mask) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.get_encoder()(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                  attention_mask=torch.from_numpy(mask.astype(np.int64)))
    return out.last_hidden_state.numpy()
