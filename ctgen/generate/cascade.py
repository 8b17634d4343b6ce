"""The cascade itself: prompts -> T5 -> MaskGIT -> CT-ViT decode -> super-resolution -> HU volumes.

`ctgen.generate.command` does everything around it (prompts, checkpoints, work split, resume,
orientation, outputs, provenance) and calls `run_cascade` once per process with the samples that
process still has to make; under `jax.distributed` also with none, since loading the models is
collective (Orbax's restore waits for every process). The contract:

* inputs: the samples (prompt, name, own seed), the resolved generation config (sampling
  settings, slices, mesh, SR batch), the checked weights of each stage, a `StageTimer` to compile
  and time each stage with, and whether to draw progress bars (already false on processes other
  than 0 and off a terminal);
* output: one `CascadeOutput` per sample, yielded as soon as it is ready (so volumes are written
  and memory is freed while the next group runs), in input order;
* the volume is HU in the models' own array layout (the command maps it to the canonical
  orientation), `(slices, H, W)` with H = W = `superres.scale` x the CT-ViT's image size, or the
  CT-ViT's with `superres.enabled` off;
* a sample's volume depends only on its seed, the settings and the device count: samples run in
  groups of a fixed size (`maskgit.batch_size`, default the mesh's batch shards; a short group is
  padded), each row of the MaskGIT decode draws from its own key (the sampler is vmapped over
  rows), and the super-resolution of a volume draws every slice from keys derived from its seed.

Each process builds a mesh over its local devices (`config.mesh`); the models are placed on it by
their logical axes, a group's rows and the SR slices are split over its batch axes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator, Mapping, Sequence

import numpy as np

from ctgen.errors import UserError
from ctgen.generate.checkpoints import StageWeights
from ctgen.generate.prompts import Sample
from ctgen.generate.runtime import StageTimer, stage_progress

log = logging.getLogger("ctgen")


@dataclasses.dataclass
class CascadeOutput:
    """One generated volume: `hu_DxHxW` float32 HU in the models' layout; `seconds` and
    `compile_seconds` per stage for this sample (its share of a group)."""

    sample: Sample
    hu_DxHxW: np.ndarray
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    compile_seconds: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Models:
    """The loaded cascade (`load_models`)."""

    text: object
    tokenizer: object
    ctvit: object
    maskgit: object
    superres: object | None
    grid: tuple[int, int, int]


def token_grid(ctvit_cfg, slices: int) -> tuple[int, int, int]:
    """The CT-ViT token grid (T, h, w) of a volume of `slices` slices (1 + k * temporal patch)."""
    return (1 + (slices - 1) // ctvit_cfg.temporal_patch_size, *ctvit_cfg.grid_hw)


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """A loader's UserError cut to its first line, which names the file and the problem (weights
    that do not fit list every array after it): `ctgen generate` errors are one line. The whole
    message goes to the debug log (`ctgen -v`)."""
    try:
        yield
    except UserError as e:
        lines = str(e).splitlines()
        if len(lines) <= 1:
            raise
        log.debug("%s", e)
        raise UserError(f"{lines[0]} (all of it with ctgen -v)") from None


def load_models(config, stages: Mapping[str, StageWeights], mesh, rules) -> Models:
    """Every stage's model on `mesh`, checked against each other: the text width each model was
    trained with, the codebook size, and the token grid of `config.slices` against the MaskGIT's
    position table. A mismatch is a UserError naming both directories."""
    from ctgen.convert.ctvit_store import load_ctvit
    from ctgen.convert.maskgit_store import load_maskgit
    from ctgen.text.load import load_text_encoder

    with _one_line_errors():
        text, tokenizer, text_cfg = load_text_encoder(stages["text"].path, mesh=mesh, rules=rules)
        ctvit = load_ctvit(stages["ctvit"].path, mesh=mesh, rules=rules)
        block = int(config.maskgit.attention_block)
        maskgit = load_maskgit(stages["maskgit"].path, mesh=mesh, rules=rules,
                               **({"attention_block": block} if block else {}))
    where = {k: v.path for k, v in stages.items()}
    if maskgit.cfg.dim_context != text_cfg.d_model:
        raise UserError(f"{where['maskgit']}: the MaskGIT reads {maskgit.cfg.dim_context}-wide text states but the "
                        f"text encoder {where['text']} makes {text_cfg.d_model}-wide ones")
    if maskgit.cfg.num_tokens != ctvit.cfg.codebook_size:
        raise UserError(f"{where['maskgit']}: the MaskGIT predicts {maskgit.cfg.num_tokens} codes but the CT-ViT "
                        f"{where['ctvit']} has a codebook of {ctvit.cfg.codebook_size}")
    grid = token_grid(ctvit.cfg, int(config.slices))
    try:
        maskgit.cfg.check_grid(grid)
    except ValueError as e:
        raise UserError(f"{where['maskgit']}: {config.slices} slices: {e}") from None
    superres = None
    if config.superres.enabled:
        from ctgen.convert.superres_store import load_superres

        with _one_line_errors():
            superres, _ = load_superres(stages["superres"].path, mesh=mesh, rules=rules)
        if superres.cfg.text_embed_dim != text_cfg.d_model:
            raise UserError(f"{where['superres']}: the U-Net reads {superres.cfg.text_embed_dim}-wide text states but "
                            f"the text encoder {where['text']} makes {text_cfg.d_model}-wide ones")
        size = ctvit.cfg.image_size * int(config.superres.scale)
        if size % superres.cfg.downsample_factor:
            raise UserError(f"superres.scale={config.superres.scale}: output size {size} is not divisible by the "
                            f"U-Net's {superres.cfg.downsample_factor}")
    return Models(text, tokenizer, ctvit, maskgit, superres, grid)


def _group_size(config, mesh, rules) -> int:
    from ctgen.parallel.mesh import batch_shards

    size = int(config.maskgit.batch_size) or batch_shards(mesh, rules)
    if size < 1:
        raise UserError(f"maskgit.batch_size must be >= 0 (0 = one prompt per batch shard), got {size}")
    return size


def maskgit_options(config):
    """The MaskGIT sampler's options (`SampleConfig`) from a generation config's `maskgit` block."""
    from ctgen.sampling.maskgit import SampleConfig

    return SampleConfig(steps=int(config.maskgit.steps), cond_scale=float(config.maskgit.cond_scale),
                        temperature=float(config.maskgit.temperature), draw=str(config.maskgit.draw))


def superres_options(config):
    """The SR sampler's settings (`SamplerConfig`) from a generation config's `superres` block."""
    from ctgen.sampling.superres import SamplerConfig

    return SamplerConfig(sampler=str(config.superres.sampler), steps=int(config.superres.steps),
                         noise_level=float(config.superres.lowres_noise_level),
                         cond_scale=float(config.superres.cond_scale), threshold=float(config.superres.threshold),
                         average=int(config.superres.average))


def decode_program(models: Models, config, *, ctvit: bool = True):
    """jitted (maskgit state, ctvit state, text, mask, keys) -> volumes (G, F, H, W) in [-1, 1]:
    the MaskGIT sampler vmapped over rows (one key each), then the CT-ViT decoder (`ctvit=False`:
    the token ids (G, T, h, w), the ctvit state argument unused). No host callbacks inside (not
    even for progress): JAX does not write programs that have them to the persistent compilation
    cache. `models` may hold abstract modules (`nnx.eval_shape`) to lower it without weights."""
    import jax
    from flax import nnx

    from ctgen.sampling.maskgit import maskgit_tokens_to_logits, sample

    options = maskgit_options(config)
    m_def, _ = nnx.split(models.maskgit)
    c_def, _ = nnx.split(models.ctvit)
    grid, mask_id = models.grid, models.maskgit.cfg.mask_id

    def one(m_state, text_LxE, mask_L, key):
        model = nnx.merge(m_def, m_state)
        bias = model.position_bias(grid)
        fn = maskgit_tokens_to_logits(model, grid, text_LxE[None], mask_L[None], bias=bias)
        return sample(fn, rng=key, batch_size=1, grid=grid, mask_id=mask_id, **dataclasses.asdict(options))[0]

    def run(m_state, c_state, text_GxLxE, mask_GxL, keys_G):
        ids = jax.vmap(one, in_axes=(None, 0, 0, 0))(m_state, text_GxLxE, mask_GxL, keys_G)
        return nnx.merge(c_def, c_state).decode(ids) if ctvit else ids

    return jax.jit(run)


def _put_batch(x: np.ndarray, mesh, rules):
    import jax

    from ctgen.parallel.axes import logical_sharding

    return jax.device_put(x, logical_sharding(("batch",) + (None,) * (x.ndim - 1), x.shape, rules, mesh))


def _encode(models: Models, prompts: list[str], length: int, mesh, rules) -> tuple[np.ndarray, np.ndarray]:
    """T5 states (G, length, E) and mask, zero-padded to `length` whatever the prompts' lengths: one
    shape for every group (one compile), and a prompt's states never depend on its neighbours."""
    from ctgen.text.encode import encode_text_to_length

    return encode_text_to_length(models.text, models.tokenizer, prompts, length, mesh=mesh, rules=rules)


def run_cascade(samples: Sequence[Sample], config, stages: Mapping[str, StageWeights], *, timer: StageTimer,
                progress: bool) -> Iterator[CascadeOutput]:
    """Generate `samples` (module docstring)."""
    import jax
    from flax import nnx

    from ctgen.parallel.mesh import make_mesh
    from ctgen.volume import model_to_hu

    rules = tuple(tuple(r) for r in config.sharding_rules)
    mesh = make_mesh(dict(config.mesh), devices=jax.local_devices())
    models = load_models(config, stages, mesh, rules)
    group = _group_size(config, mesh, rules)
    decode = decode_program(models, config)
    _, m_state = nnx.split(models.maskgit)
    _, c_state = nnx.split(models.ctvit)
    slice_sampler = sampler = None
    if models.superres is not None:
        from ctgen.sampling.superres import SliceSampler, upsample_volume

        sampler = superres_options(config)
        size = models.ctvit.cfg.image_size * int(config.superres.scale)
        slice_sampler = SliceSampler(models.superres, sampler, (size, size), mesh, rules)
    bar = stage_progress(len(samples), "volumes", enabled=progress, unit="volume")
    text_bar = stage_progress(len(samples), "text", enabled=progress, unit="prompt")
    # per group, not per step: a per-step tick would need a host callback in the decode (see decode_program)
    maskgit_bar = stage_progress(len(samples), f"maskgit ({int(config.maskgit.steps)} steps)", enabled=progress,
                                 unit="prompt")
    for start in range(0, len(samples), group):
        before = dict(timer.seconds)
        rows = list(samples[start:start + group])
        padded = rows + [rows[-1]] * (group - len(rows))
        with timer.run("text", jit_compiles=True):  # T5 compiles on its first call (ctgen.text.encode)
            text, mask = _encode(models, [s.prompt for s in padded], int(config.text_max_length), mesh, rules)
        text_bar.update(len(rows))
        keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(s.seed))) for s in padded])
        args = (m_state, c_state, *(_put_batch(a, mesh, rules) for a in (text, mask, keys)))
        step = timer.compile("maskgit", decode, *args)
        with timer.run("maskgit"):
            volumes = np.asarray(jax.device_get(step(*args)))[:, : int(config.slices)]
        maskgit_bar.update(len(rows))
        shared = {k: (v - before.get(k, 0.0)) / len(rows) for k, v in timer.seconds.items() if k != "superres"}
        for n, s in enumerate(rows):
            seconds = dict(shared)
            if models.superres is None:
                hu = model_to_hu(volumes[n])
            else:
                sr_before, compile_before = timer.seconds.get("superres", 0.0), slice_sampler.compile_seconds
                with timer.run("superres"):
                    hu = upsample_volume(models.superres, volumes[n], text[n], mask[n], mesh=mesh, rules=rules,
                                         rng=jax.random.PRNGKey(s.seed), sampler=sampler,
                                         batch=int(config.superres.batch_size), scale=int(config.superres.scale),
                                         input_range="model", output_range="hu", progress=progress,
                                         slice_sampler=slice_sampler)
                compiled = slice_sampler.compile_seconds - compile_before  # inside the block: count it apart
                timer.seconds["superres"] -= compiled
                timer.compile_seconds["superres"] += compiled
                seconds["superres"] = timer.seconds["superres"] - sr_before
            bar.update(1)
            yield CascadeOutput(sample=s, hu_DxHxW=np.asarray(hu, np.float32), seconds=seconds,
                                compile_seconds=dict(timer.compile_seconds))
    maskgit_bar.close()
    text_bar.close()
    bar.close()
