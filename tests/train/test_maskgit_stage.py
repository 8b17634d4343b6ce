"""The MaskGIT stage in the shared loop on 8 emulated devices: phantom tokens train (masked-token loss
falls), parameters are sharded, eval sums/counts and previews are written, a checkpoint restores onto
another mesh, and text dropout trains the null prompt (paper) or never does (reference_exact)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ctgen.configuration import load
from ctgen.data.side import write_side_dataset
from ctgen.stages import get_stage
from ctgen.train.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "maskgit.py")
GRID = (3, 4, 4)
CLASSES = 4


def _phantom_tokens(i: int) -> np.ndarray:
    """A volume's ids: a fixed pattern over the grid shifted by its prompt's class, so the masked
    ids follow from the visible ones, the positions and the text."""
    c = i % CLASSES
    n = int(np.prod(GRID))
    return ((7 * np.arange(n) + 13 * c) % 64).reshape(GRID).astype(np.int16)


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    """16 train / 4 validation phantom token grids and a T5-cache-style embedding dataset (width 16)."""
    root = tmp_path_factory.mktemp("maskgit_data")
    rng = np.random.default_rng(0)
    class_emb = rng.normal(size=(CLASSES, 3, 16)).astype(np.float16)
    splits = {"train": range(16), "validation": range(16, 20)}
    tok_feats = {"source_id": tfds.features.Text(), "prompt": tfds.features.Text(),
                 "tokens": tfds.features.Tensor(shape=GRID, dtype=np.int16),
                 "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32)}
    toks = {s: [{"source_id": f"vol_{i}", "prompt": f"class {i % CLASSES}", "tokens": _phantom_tokens(i),
                 "spacing": np.array([1.5, 0.7, 0.7], np.float32)} for i in r] for s, r in splits.items()}
    emb_feats = {"source_id": tfds.features.Text(),
                 "embedding": tfds.features.Tensor(shape=(None, 16), dtype=np.float16,
                                                   encoding=tfds.features.Encoding.BYTES),
                 "length": tfds.features.Scalar(dtype=np.int32)}
    embs = {s: [{"source_id": f"vol_{i}", "embedding": class_emb[i % CLASSES], "length": np.int32(3)} for i in r]
            for s, r in splits.items()}
    return (write_side_dataset(str(root / "tokens"), tok_feats, toks),
            write_side_dataset(str(root / "emb"), emb_feats, embs))


def _config(token_data, variant="tiny", **overrides):
    tokens, emb = token_data
    over = {"data.tokens_dir": tokens, "data.embeddings_dir": emb, "data.max_text_length": 8,
            "train.progress_bar": False, **overrides}
    return load(f"{CONFIG}:{variant}", [(k, str(v)) for k, v in over.items()])


def _rows(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.mark.slow
def test_tiny_training_sharded_on_8_devices_and_restore_onto_another_mesh(token_data, tmp_path):
    workdir = str(tmp_path / "run")
    cfg = _config(token_data, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.batch_size": 8,
                                 "data.eval_batch_size": 8, "train.steps": 30, "train.log_every": 5,
                                 "train.checkpoint_every": 30, "train.eval_every": 30, "train.preview_every": 30,
                                 "sample.steps": 3})
    summary = train(cfg, workdir, get_stage(cfg))
    assert cfg.model.dim_context == 16  # taken from the embedding cache
    rows = _rows(workdir)
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < 0.85 * first, (first, last)
    ev = _rows(workdir, "eval")[-1]
    assert 0.0 <= ev["masked_accuracy"] <= 1.0 and np.isfinite(ev["null_masked_loss"])
    assert {"masked_loss_100pct", "masked_loss_50pct", "masked_loss_15pct"} <= set(ev)
    ids = np.load(os.path.join(workdir, "previews", "step_00000030", "sampled_ids.npy"))
    assert ids.shape == GRID and ids.min() >= 0 and ids.max() < 64  # no [MASK] left
    # parameters really are split over the fsdp/tensor axes
    kernel = summary["state"]["params"]["to_logits"]["kernel"][...]
    assert len({tuple(s.data.shape) for s in kernel.addressable_shards}) == 1
    assert kernel.addressable_shards[0].data.size < kernel.size

    cfg2 = _config(token_data, **{"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1, "train.batch_size": 8,
                                  "train.steps": 32, "train.log_every": 2, "train.checkpoint_every": 32,
                                  "train.eval_every": -1, "train.preview_every": -1})
    summary2 = train(cfg2, workdir, get_stage(cfg2))
    assert summary2["start_step"] == 30 and summary2["final_step"] == 32
    assert _rows(workdir)[-1]["loss"] < 0.85 * first


class _Spy:
    """Stands in for the model in the stage's loss and records each row's text mask."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.masks = []

    def __call__(self, ids, grid, context, mask, *, spacing_Bx3=None):
        self.masks.append(np.asarray(mask))
        return jnp.zeros((*ids.shape, self.cfg.num_tokens)) + jnp.sum(context) * 0.0


@pytest.mark.parametrize("reference_exact", [False, True])
def test_text_dropout_trains_the_null_prompt_unless_reference_exact(token_data, reference_exact):
    """paper: about a quarter of the training rows see the null prompt (text mask all False), so the
    guidance's unconditional branch is trained; reference_exact (GenerateCT's bug): none ever does."""
    cfg = _config(token_data, variant="paper", **{"loss.reference_exact": reference_exact})
    assert cfg.loss.cond_drop_prob == 0.25
    stage = get_stage(cfg)
    spy = _Spy(stage.cfg)
    batch = {"tokens": jnp.asarray(np.stack([_phantom_tokens(i) for i in range(64)]).astype(np.int32)),
             "text_embedding": jnp.ones((64, 8, 16)), "text_mask": jnp.ones((64, 8), bool)}
    dropped = []
    for seed in range(4):
        _, metrics = stage.loss(spy, batch, jax.random.key(seed))
        dropped.append(float(metrics["text_dropped"]))
    null_rows = sum(int((~m.any(axis=1)).sum()) for m in spy.masks)
    if reference_exact:
        assert null_rows == 0 and dropped == [0.0] * 4
    else:
        assert 0.15 < null_rows / 256 < 0.35 and null_rows == round(sum(dropped) * 64)
