"""The MaskGIT stage of the shared loop: text-conditioned masked-token training on CT-ViT ids.

Data: a token dataset (`ctgen prepare --source tokens`, CT-ViT ids keyed by source_id) joined with
a T5 embedding cache (`ctgen prepare --source embeddings`) by `ctgen.data.pipelines.token_pipeline`,
so a step runs neither the CT-ViT nor T5. The sequence length follows the slice count of the token
dataset; `model.dim_context = 0` takes the text width from the embedding cache (written back into
the config, so the run's config.json records it).

Objective (GenerateCT's `MaskGITTransformer.forward`): per volume a level s ~ U{0..17}; mask
max(1, round(N cos(pi/2 s/18))) random positions with [MASK]; cross-entropy of the masked positions,
averaged over all masked positions of the batch. Text dropout for classifier-free guidance: each
volume's prompt is replaced by the null prompt (text mask all False) with probability
`loss.cond_drop_prob` (0.25). GenerateCT meant to do this but overwrote the probability with 0, so its
guidance (scale 5 at sampling) was never trained on the null prompt; `loss.reference_exact=True`
reproduces that.

Eval (sums and counts, exact over the split): masked-token loss and accuracy at fixed mask fractions
(`eval.mask_fractions`, the same random positions for every volume), and with the null prompt at
the middle fraction (how well the guidance's unconditional branch is trained).
Frozen upstream model: the CT-ViT (`config.tokenizer.weights`): previews decode a sampled volume
(`config.sample.*` decoding options) and the CT-ViT reconstruction of the real tokens.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ctgen.config_dataclass import build_dataclass
from ctgen.data.pipelines import LoaderOptions, token_pipeline
from ctgen.errors import UserError
from ctgen.models.maskgit import MaskGIT, MaskGITConfig
from ctgen.sampling.mask_schedule import SCHEDULES, fixed_count_mask, training_mask
from ctgen.sampling.maskgit import SampleConfig, maskgit_tokens_to_logits, sample
from ctgen.train.stage import FrozenModel, Phase, valid_rows

log = logging.getLogger(__name__)


def embedding_width(embeddings_dir: str) -> int:
    """Width of the text states in a T5 embedding cache (its `embedding` feature)."""
    import tensorflow_datasets as tfds

    from ctgen.data.side import resolve_dataset_dir

    features = tfds.builder_from_directory(resolve_dataset_dir(embeddings_dir)).info.features
    if "embedding" not in features:
        raise UserError(f"{embeddings_dir} is not a T5 embedding cache (no `embedding` feature)")
    return int(features["embedding"].shape[-1])


def resolve_text_width(config) -> None:
    """`model.dim_context = 0` -> the embedding cache's width (in place); a set width must match it."""
    emb = config.data.embeddings_dir
    width = embedding_width(emb) if emb else None
    if config.model.dim_context == 0:
        if width is None:
            raise UserError("model.dim_context=0 takes the text width from data.embeddings_dir, which is not set")
        config.model.dim_context = width
        log.info("text width %d from the embedding cache %s", width, emb)
    elif width is not None and width != config.model.dim_context:
        raise UserError(f"model.dim_context={config.model.dim_context} but data.embeddings_dir={emb} holds "
                        f"{width}-wide text states; set model.dim_context=0 to follow the cache")


def masked_ce(logits_BxNxV: jax.Array, ids_BxN: jax.Array, mask_BxN: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row sums over the masked positions: (cross-entropy, correct argmax predictions)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxNxV, ids_BxN)
    correct = (jnp.argmax(logits_BxNxV, axis=-1) == ids_BxN).astype(jnp.float32)
    m = mask_BxN.astype(jnp.float32)
    return jnp.sum(ce * m, axis=-1), jnp.sum(correct * m, axis=-1)


class MaskGITStage:
    def __init__(self, config):
        self.config = config
        if config.model.dim_context == 0 or config.data.embeddings_dir:
            resolve_text_width(config)
        self.cfg = build_dataclass(MaskGITConfig, config.model, where="config.model")
        self.sample_cfg = build_dataclass(SampleConfig, config.sample, where="config.sample")
        lc = config.loss
        if lc.mask_schedule not in SCHEDULES:
            raise UserError(f"loss.mask_schedule={lc.mask_schedule!r}: choose one of {SCHEDULES}")
        if not 0.0 <= lc.cond_drop_prob < 1.0:
            raise UserError(f"loss.cond_drop_prob={lc.cond_drop_prob} must be in [0, 1)")
        self.cond_drop_prob = 0.0 if lc.reference_exact else float(lc.cond_drop_prob)
        if lc.reference_exact and lc.cond_drop_prob:
            log.info("loss.reference_exact: text dropout off (GenerateCT overwrites its cond_drop_prob=%g with 0)",
                     lc.cond_drop_prob)

    # -- model ------------------------------------------------------------------------------------
    def build_model(self, rngs: nnx.Rngs) -> MaskGIT:
        return MaskGIT(self.cfg, rngs=rngs)

    def _inputs(self, batch):
        ids = batch["tokens"]
        grid = tuple(int(g) for g in ids.shape[1:])
        spacing = None
        if self.cfg.spacing_tokens:
            if "spacing" not in batch:
                raise UserError("model.spacing_tokens > 0 needs a token dataset with `spacing` (ctgen prepare "
                                "--source tokens writes it)")
            spacing = batch["spacing"]
        return ids.reshape(ids.shape[0], -1), grid, spacing

    def loss(self, model: MaskGIT, batch, rng: jax.Array):
        """GenerateCT's masked-token objective with text dropout (module docstring)."""
        lc = self.config.loss
        ids, grid, spacing = self._inputs(batch)
        b, n = ids.shape
        k_mask, k_drop = jax.random.split(rng)
        masked = training_mask(k_mask, b, n, steps=lc.mask_steps, schedule=lc.mask_schedule)
        keep = jax.random.uniform(k_drop, (b,)) >= self.cond_drop_prob
        text_mask = batch["text_mask"] & keep[:, None]
        logits = model(jnp.where(masked, self.cfg.mask_id, ids), grid, batch["text_embedding"], text_mask,
                       spacing_Bx3=spacing)
        ce, correct = masked_ce(logits, ids, masked)
        count = jnp.sum(masked.astype(jnp.float32))
        loss = jnp.sum(ce) / count
        return loss, {"masked_accuracy": jnp.sum(correct) / count, "text_dropped": 1.0 - jnp.mean(keep)}

    def phases(self):
        return [Phase("main", self.loss)]

    # -- data -------------------------------------------------------------------------------------
    def _options(self) -> LoaderOptions:
        return LoaderOptions.from_config(self.config.data)

    def _pipeline(self, split: str, batch: int, process_index: int, process_count: int, seed: int, train: bool):
        d = self.config.data
        if not d.tokens_dir or not d.embeddings_dir:
            raise UserError("set data.tokens_dir (ctgen prepare --source tokens) and data.embeddings_dir "
                            "(ctgen prepare --source embeddings)")
        return token_pipeline(d.tokens_dir, split, global_batch_size=batch, process_index=process_index,
                              process_count=process_count, seed=seed, embeddings_dir=d.embeddings_dir,
                              max_text_length=d.max_text_length, train=train, options=self._options())

    def train_data(self, process_index: int, process_count: int, seed: int):
        return self._pipeline(self.config.data.train_split, self.config.train.batch_size, process_index,
                              process_count, seed, True)

    def eval_data(self, process_index: int, process_count: int):
        d = self.config.data
        if not d.eval_split:
            return None
        stage = self

        class _Eval:  # re-iterable: the loop evaluates several times
            def __iter__(self):
                return stage._pipeline(d.eval_split, d.eval_batch_size, process_index, process_count, 0, False)

        return _Eval()

    # -- frozen tokenizer -------------------------------------------------------------------------
    def frozen_models(self) -> dict[str, FrozenModel]:
        weights = self.config.tokenizer.weights
        return {"tokenizer": FrozenModel(weights, self._load_tokenizer)} if weights else {}

    def _load_tokenizer(self, weights: str, mesh, rules):
        from ctgen.convert.ctvit_store import load_ctvit

        if not os.path.exists(weights):
            raise FileNotFoundError(f"{weights}: no such file or directory")
        ctvit = load_ctvit(weights, mesh=mesh, rules=rules)
        if ctvit.cfg.codebook_size != self.cfg.num_tokens:
            raise UserError(f"{weights}: a CT-ViT with {ctvit.cfg.codebook_size} codes, but model.num_tokens="
                            f"{self.cfg.num_tokens}")
        return ctvit

    # -- eval / previews --------------------------------------------------------------------------
    def eval_step(self, model: MaskGIT, frozen, batch) -> dict[str, jax.Array]:
        """Per mask fraction: sums over the valid volumes of the masked positions' cross-entropy and
        correct predictions, and their masked-token count; the same with the null prompt."""
        ids, grid, spacing = self._inputs(batch)
        b, n = ids.shape
        valid = valid_rows(batch, b)
        bias = model.position_bias(grid)
        key = jax.random.key(self.config.eval.seed)
        out = {"count": jnp.sum(valid)}
        fractions = tuple(self.config.eval.mask_fractions)
        middle = len(fractions) // 2
        runs = [(f"{round(100 * f)}pct", i, batch["text_mask"]) for i, f in enumerate(fractions)]
        runs.append(("null", middle, jnp.zeros_like(batch["text_mask"])))
        for tag, i, text_mask in runs:
            count = max(1, round(fractions[i] * n))
            # One random set of positions per fraction, the same for every volume (independent of batching).
            mask = jnp.broadcast_to(fixed_count_mask(jax.random.fold_in(key, i), jnp.array([count]), n), (b, n))
            logits = model(jnp.where(mask, self.cfg.mask_id, ids), grid, batch["text_embedding"], text_mask,
                           bias=bias, spacing_Bx3=spacing)
            ce, correct = masked_ce(logits, ids, mask)
            out[f"ce_{tag}"] = jnp.sum(ce * valid)
            out[f"correct_{tag}"] = jnp.sum(correct * valid)
            out[f"tokens_{tag}"] = jnp.sum(valid) * count
        return out

    def eval_metrics(self, totals) -> dict[str, float]:
        """masked_loss / masked_accuracy over all fractions together and per fraction
        (`masked_loss_50pct`, ...); `null_masked_loss` / `null_masked_accuracy` with the null prompt."""
        tags = [k[len("ce_"):] for k in totals if k.startswith("ce_") and k != "ce_null"]
        tokens = sum(float(totals[f"tokens_{t}"]) for t in tags)
        out = {"masked_loss": sum(float(totals[f"ce_{t}"]) for t in tags) / tokens,
               "masked_accuracy": sum(float(totals[f"correct_{t}"]) for t in tags) / tokens}
        for tag in tags:
            out[f"masked_loss_{tag}"] = float(totals[f"ce_{tag}"]) / float(totals[f"tokens_{tag}"])
            out[f"masked_accuracy_{tag}"] = float(totals[f"correct_{tag}"]) / float(totals[f"tokens_{tag}"])
        out["null_masked_loss"] = float(totals["ce_null"]) / float(totals["tokens_null"])
        out["null_masked_accuracy"] = float(totals["correct_null"]) / float(totals["tokens_null"])
        return out

    def preview_step(self, model: MaskGIT, frozen, batch) -> dict[str, jax.Array]:
        """A volume sampled from the first prompt of the batch (and, with the tokenizer, decoded),
        beside the CT-ViT decoding of that example's real tokens."""
        ids, grid, spacing = self._inputs(batch)
        ctx, text_mask = batch["text_embedding"][:1], batch["text_mask"][:1]
        fn = maskgit_tokens_to_logits(model, grid, ctx, text_mask, spacing_Bx3=None if spacing is None else spacing[:1])
        s = self.sample_cfg
        sampled = sample(fn, rng=jax.random.key(self.config.seed), batch_size=1, grid=grid, mask_id=self.cfg.mask_id,
                         steps=s.steps, cond_scale=s.cond_scale, temperature=s.temperature, schedule=s.schedule,
                         top_k=s.top_k, top_p=s.top_p)
        out = {"sampled_ids": sampled}
        if "tokenizer" in frozen:
            out["sample"] = frozen["tokenizer"].decode(sampled)
            out["reference"] = frozen["tokenizer"].decode(ids[:1].reshape(1, *grid))
        return out

    def write_preview(self, outputs, batch, out_dir: str, step: int) -> None:
        from ctgen.io.preview import write_planes

        os.makedirs(out_dir, exist_ok=True)
        np.save(os.path.join(out_dir, "sampled_ids.npy"), outputs["sampled_ids"][0])
        if "sample" not in outputs:
            log.info("previews: sampled token ids only (set tokenizer.weights to decode them)")
            return
        name = batch["source_id"][0] if "source_id" in batch else "volume"
        prompt = str(batch["prompt"][0]) if "prompt" in batch else ""
        write_planes(os.path.join(out_dir, "maskgit_sample.png"), [outputs["reference"][0], outputs["sample"][0]],
                     caption=f"step {step}: {name}  top: CT-ViT of the real tokens, bottom: sampled  {prompt[:80]}")


def make_stage(config) -> MaskGITStage:
    return MaskGITStage(config)
