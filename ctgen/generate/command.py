"""`ctgen generate`: report text -> CT volumes (NIfTI, optional DICOM, preview, provenance).

Everything but the models' calls happens here: settings, prompts, checkpoint checks, the output
folder, this process's share of the samples, skipping what is finished, orientation, writing.
The cascade itself is `ctgen.generate.cascade.run_cascade`.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Mapping, Sequence

from ctgen.errors import UserError

log = logging.getLogger("ctgen")

DEFAULT_CONFIG = "configs/generate.py:paper"
SR_SAMPLERS = ("ancestral", "ddim")

HELP = """\
Generate chest CT volumes from report text with the cascade T5 -> MaskGIT -> CT-ViT -> super-resolution.

  ctgen generate "64 years old female: Cardiomegaly. Bilateral pleural effusion." --out out/ --checkpoints ckpt/
  ctgen generate --prompts reports.csv --out out/ --checkpoints ckpt/ --num-samples 2 --dicom

Prompts: one on the command line, or --prompts FILE: a CT-RATE reports CSV (VolumeName, Findings_EN,
Impressions_EN; age/sex from PatientAge/PatientSex there or in --prompt-metadata), a CSV with a
prompt/report/text column (optional name, age, sex, findings), or a JSON list of {"name", "report"|"prompt"}
objects (VLM3D). Texts become model prompts with the same function as data preparation (--prompt-template).

Outputs under --out: <name>.nii.gz (int16 HU, real spacing, canonical LPS orientation), previews/<name>.png,
dicom/<name>/ (with --dicom; marked as synthetic), provenance/<name>.json (prompt, seeds, settings,
checkpoint hashes, versions, devices, seconds per stage, peak memory, output hashes; written last: it marks
the sample finished). Running the same command again skips finished samples and makes only what is
missing; an interrupted sample is made again. Each of N processes (jax.distributed with --distributed, or
--shard I/N for independent jobs) takes samples I, I+N, I+2N, ... into the same folder.

--checkpoints DIR holds text/ (a Hugging Face or T5X T5, or ctgen weights), ctvit/, maskgit/ and superres/
(ctgen weights directories from `ctgen import` or training workdirs). A folder made by
`python -m ctgen.generate.demo_cascade pack` (no text/; a demo_cascade.json), named by --checkpoints or
--config.checkpoints.dir, brings its own generation settings
and the built-in T5, as the built-in demo does; options and --config overrides win. --slices must be 1 + 2k (the CT-ViT
turns every pair of slices after the first into one row of tokens); other counts fail naming the nearest
valid ones. Every field of configs/generate.py can be set as --config.<field>=value. See docs/generate.md.
"""

# option dest -> config field it sets when given
OPTION_FIELDS = (("seed", "seed"), ("num_samples", "num_samples"), ("slices", "slices"),
                 ("steps", "maskgit.steps"), ("cond_scale", "maskgit.cond_scale"),
                 ("temperature", "maskgit.temperature"), ("sr_sampler", "superres.sampler"),
                 ("sr_steps", "superres.steps"), ("checkpoints", "checkpoints.dir"),
                 ("prompt_template", "prompt_template"))
FLAG_FIELDS = (("no_sr", "superres.enabled", False), ("dicom", "outputs.dicom", True),
               ("no_compile_cache", "compile_cache.enabled", False))


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="report text -> CT volumes (NIfTI, DICOM, previews, provenance)",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="report text of one volume")
    p.add_argument("--prompts", metavar="FILE", help="CSV or JSON file of prompts (see above)")
    p.add_argument("--prompt-metadata", metavar="CSV", help="CT-RATE metadata CSV: PatientAge / PatientSex by VolumeName")
    p.add_argument("--prompt-template", metavar="NAME|TEMPLATE", help="'paper' (default), 'findings' or a build_prompt template")
    p.add_argument("--name", help="output name of the single prompt (default: a slug of it)")
    p.add_argument("--out", metavar="DIR", help="output folder")
    p.add_argument("--checkpoints", metavar="DIR", help="folder with text/, ctvit/, maskgit/, superres/")
    g = p.add_argument_group("sampling (defaults: configs/generate.py)")
    g.add_argument("--num-samples", type=int, metavar="K", help="volumes per prompt (named <name>_s<k> when more than one)")
    g.add_argument("--seed", type=int, metavar="N", help="run seed; each sample's seed derives from it, its name and k")
    g.add_argument("--slices", type=int, metavar="N", help="slices per volume, 1 + 2k (default: the CT-ViT's)")
    g.add_argument("--cond-scale", type=float, metavar="S", help="MaskGIT classifier-free guidance scale (paper 5)")
    g.add_argument("--steps", type=int, metavar="N", help="MaskGIT decoding steps (paper 18)")
    g.add_argument("--temperature", type=float, metavar="T", help="MaskGIT sampling temperature (paper 0.9)")
    g.add_argument("--no-sr", action="store_true", help="stop at the CT-ViT's low-resolution volume")
    g.add_argument("--sr-sampler", choices=SR_SAMPLERS, help="super-resolution sampler (paper: ancestral)")
    g.add_argument("--sr-steps", type=int, metavar="N", help="super-resolution steps (paper 25)")
    r = p.add_argument_group("run")
    r.add_argument("--dicom", action="store_true", help="also write each volume as a DICOM CT series")
    r.add_argument("--overwrite", action="store_true", help="make every sample again, finished or not")
    r.add_argument("--shard", metavar="I/N", help="make only samples I, I+N, ... (independent jobs sharing --out)")
    r.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize first")
    r.add_argument("--no-compile-cache", action="store_true", help="do not use JAX's persistent compilation cache")
    r.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE.py[:VARIANT]", help=f"generation config (default {DEFAULT_CONFIG})")
    r.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)
    return p


# ----------------------------------------------------------------------------- settings
def apply_options(config, args: argparse.Namespace) -> None:
    """Explicit command-line options into the config (they win over --config.* of the same field)."""
    if getattr(args, "slices", None) is not None:
        check_slices(args.slices)  # the config's 0 means "the CT-ViT's"; an explicit count must be valid
    with config.unlocked():
        for dest, field in OPTION_FIELDS:
            value = getattr(args, dest, None)
            if value is not None:
                _set(config, field, value)
        for dest, field, value in FLAG_FIELDS:
            if getattr(args, dest, False):
                _set(config, field, value)
        if getattr(args, "distributed", False):
            config.distributed.enabled = True


def _set(config, field: str, value: Any) -> None:
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def nearest_valid_slices(n: int, temporal_patch: int = 2) -> list[int]:
    """The slice counts 1 + k * temporal_patch closest to n (one or two of them)."""
    below = 1 + max(0, (n - 1) // temporal_patch) * temporal_patch
    return sorted({below, below + temporal_patch} if n > below else {below})


def check_slices(n: int, temporal_patch: int = 2) -> None:
    """UserError unless n = 1 + k * temporal_patch (k >= 0), naming the nearest valid counts."""
    if n < 1:
        raise UserError(f"--slices {n}: must be at least 1 (1 + {temporal_patch}k, e.g. 201)")
    if (n - 1) % temporal_patch:
        near = " or ".join(str(v) for v in nearest_valid_slices(n, temporal_patch))
        raise UserError(f"--slices {n}: not 1 + {temporal_patch}k (the CT-ViT encodes the first slice alone and then "
                        f"{temporal_patch} slices per token row); nearest valid: {near}")


def check_settings(config) -> None:
    """One-line errors for settings no sampler can use (before any file or device is touched)."""
    for field, value, low in (("num_samples", config.num_samples, 1), ("maskgit.steps", config.maskgit.steps, 1),
                              ("superres.steps", config.superres.steps, 1), ("superres.scale", config.superres.scale, 1),
                              ("superres.average", config.superres.average, 1),
                              ("maskgit.batch_size", config.maskgit.batch_size, 0),
                              ("maskgit.attention_block", config.maskgit.attention_block, 0),
                              ("superres.batch_size", config.superres.batch_size, 0),
                              ("text_max_length", config.text_max_length, 2)):
        if value < low:
            raise UserError(f"{field}={value}: must be at least {low}")
    if not (config.superres.threshold == 0 or 0 < config.superres.threshold < 1):
        raise UserError(f"superres.threshold={config.superres.threshold}: must be 0 (clip x0 to [-1, 1]) or a "
                        "percentile in (0, 1) (GenerateCT: 0.95)")
    if config.maskgit.draw not in ("cdf", "gumbel"):
        raise UserError(f"maskgit.draw={config.maskgit.draw!r}: choose 'cdf' or 'gumbel'")
    if config.maskgit.temperature < 0:
        raise UserError(f"maskgit.temperature={config.maskgit.temperature}: must not be negative")
    if config.superres.sampler not in SR_SAMPLERS:
        raise UserError(f"superres.sampler={config.superres.sampler!r}: expected one of {', '.join(SR_SAMPLERS)}")
    if config.slices:
        check_slices(config.slices)
    if len(config.geometry.extent_mm) != 3 or min(config.geometry.extent_mm) <= 0:
        raise UserError(f"geometry.extent_mm={tuple(config.geometry.extent_mm)}: expected three positive lengths (mm)")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= I < N")
    return i, n


# ----------------------------------------------------------------------------- prompts and plan
def read_entries(args: argparse.Namespace, template: str):
    from ctgen.generate import prompts

    if args.prompt is not None and args.prompts:
        raise UserError("give either a prompt or --prompts FILE, not both")
    if args.prompts:
        if args.name:
            raise UserError("--name names the single prompt; a --prompts file names its prompts itself")
        return prompts.read_prompt_file(args.prompts, template, metadata=args.prompt_metadata)
    if args.prompt is None:
        raise UserError("nothing to generate: give a prompt (report text) or --prompts FILE")
    entry = prompts.prompt_from_text(args.prompt, template)
    if args.name is not None:
        name = prompts.safe_name(args.name)
        if not name:
            raise UserError(f"--name {args.name!r}: no usable characters for a file name")
        entry = type(entry)(name=name, prompt=entry.prompt, where=entry.where)
    return [entry]


def settings_record(config, layout: str) -> dict[str, Any]:
    """The settings a volume depends on (recorded, and compared when a run finds it finished)."""
    superres = {k: v for k, v in config.superres.to_dict().items() if k != "batch_size"}  # batching: same volume
    return {"slices": int(config.slices), "prompt_template": config.prompt_template,
            "maskgit": dict(config.maskgit.to_dict()),
            "superres": superres if config.superres.enabled else {"enabled": False},
            "layout": layout, **({"generatect_axcodes": config.generatect_axcodes} if layout == "generatect" else {}),
            "geometry": {"extent_mm": [float(v) for v in config.geometry.extent_mm]}}


def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if diff:
                return diff
        return None
    return None if old == new else f"{path}: {old!r} there, {new!r} now"


def plan(samples, out_dir: str, requests: Mapping[str, dict], *, shard: tuple[int, int], wanted: Sequence[str],
         overwrite: bool = False) -> tuple[list, list, list]:
    """This process's share `samples[i::n]` split into (to make, finished, finished but missing some of
    the `wanted` outputs). A finished sample made from another request is a UserError."""
    from ctgen.generate.outputs import output_paths, read_marker

    i, n = shard
    todo, done, incomplete = [], [], []
    for s in samples[i::n]:
        marker = None if overwrite else read_marker(out_dir, s.name)
        if marker is None:
            todo.append(s)
            continue
        diff = _first_difference(marker.get("request"), requests[s.name])
        if diff:
            raise UserError(f"{output_paths(out_dir, s.name).provenance}: {s.name} was made from another request "
                            f"({diff}); use another --out, or --overwrite to replace it")
        (done if all(k in marker["outputs"] for k in wanted) else incomplete).append((s, marker))
    return todo, done, incomplete


# ----------------------------------------------------------------------------- the run
def run(args: argparse.Namespace, overrides: Sequence[tuple[str, str]] = ()) -> int:
    from ctgen.configuration import load
    from ctgen.generate import demo_cascade

    demo = demo_cascade.uses_demo(args.checkpoints, overrides)
    # A packed cascade's own settings first (the built-in demo, or a folder packed like it named by
    # --checkpoints DIR or --config.checkpoints.dir=DIR, the option winning as it does below); the
    # user's overrides and options win.
    source = demo_cascade.default_dir() if demo else args.checkpoints or dict(overrides).get("checkpoints.dir")
    packed = source if source and demo_cascade.available(source) else None
    if packed:
        overrides = demo_cascade.overrides(packed) + list(overrides)
    config = load(args.config, overrides)
    apply_options(config, args)
    if args.print_config:
        print(config)
        return 0
    if demo:
        demo_cascade.read_manifest()  # without the demo's weights: one line asking for --checkpoints
    check_settings(config)
    if not args.out:
        raise UserError("--out DIR is required (where the volumes go)")
    samples = _samples(args, config)
    from ctgen.generate.checkpoints import STAGES, resolve_checkpoints
    from ctgen.generate.orientation import axcodes_affine, resolve_layout
    from ctgen.generate.outputs import ensure_writable

    out_dir = ensure_writable(args.out)
    needed = [s for s in STAGES if s != "superres" or config.superres.enabled]
    stages = resolve_checkpoints(config.checkpoints.dir, {s: config.checkpoints[s] for s in STAGES}, needed)
    _default_slices(config, stages["ctvit"])
    layout = resolve_layout(config.layout, stages["maskgit"].info)
    if layout == "generatect":
        axcodes_affine(config.generatect_axcodes)  # fails early on bad codes
    return _generate(args, config, samples, stages, layout, out_dir, demo=demo, packed=packed)


def _samples(args, config):
    from ctgen.generate.prompts import plan_samples

    return plan_samples(read_entries(args, config.prompt_template), config.num_samples, config.seed)


def _default_slices(config, ctvit) -> None:
    """--slices defaults to the CT-ViT's max_slices; any count must fit its temporal patch."""
    temporal_patch = int(ctvit.model_config.get("temporal_patch_size", 2))
    with config.unlocked():
        config.slices = int(config.slices or ctvit.model_config.get("max_slices", 201))
    check_slices(config.slices, temporal_patch)


def _generate(args, config, samples, stages, layout: str, out_dir: str, *, demo: bool = False,
              packed: str | None = None) -> int:
    """Initialise `jax.distributed` if asked, make this process's share, and in a multi-process run
    wait for every process before returning.

    Two collective points make a run with several `jax.distributed` processes safe when the shares
    differ in size (one prompt on two processes; a rerun with one sample missing): every process
    loads the models, even with nothing to make, because Orbax's restore waits for all processes
    at a barrier; and every process waits for the others at the end, because `jax.distributed`'s
    exit barrier gives a process that finished early only a few minutes (300 s) before it aborts
    every process, including those still generating."""
    from ctgen.parallel.distributed import maybe_initialize

    maybe_initialize(config.distributed)  # before anything touches a device
    import jax

    rc = _generate_share(args, config, samples, stages, layout, out_dir, demo=demo, packed=packed)
    if jax.process_count() > 1:
        # Only after a success: a process that failed exits at once, and jax.distributed's exit
        # barrier then ends the others within its timeout instead of leaving them waiting here.
        from ctgen.generate.runtime import wait_for_all_processes

        wait_for_all_processes("ctgen_generate_finished")
    return rc


def _generate_share(args, config, samples, stages, layout: str, out_dir: str, *, demo: bool,
                    packed: str | None = None) -> int:
    """Make this process's share of `samples` (after `jax.distributed` is up, if asked for). packed:
    the packed cascade whose settings were applied (the built-in demo's folder when `demo`)."""
    import jax

    from ctgen.generate import cascade
    from ctgen.generate.provenance import checkpoint_record, environment
    from ctgen.generate.runtime import StageTimer, progress_enabled, setup_compile_cache

    if args.shard:
        shard = parse_shard(args.shard)
    else:
        shard = (jax.process_index(), jax.process_count())
    cache = setup_compile_cache(config.compile_cache.enabled, config.compile_cache.dir)
    hashes = checkpoint_record(stages)
    if demo:
        from ctgen.generate import demo_cascade

        demo_cascade.verify(hashes, config.checkpoints.dir)
        models = f"{demo_cascade.NAME}: {demo_cascade.DESCRIPTION}"
    else:
        models = f"--checkpoints {config.checkpoints.dir}" if config.checkpoints.dir else "per-stage checkpoints"
        if packed:
            from ctgen.generate.demo_cascade import MANIFEST

            models += f" (a packed cascade: the generation settings of its {MANIFEST} applied)"
    settings = settings_record(config, layout)
    requests = {s.name: {"prompt": s.prompt, "seed": int(config.seed), "sample_seed": s.seed, "sample_index": s.index,
                         "settings": settings, "checkpoints": {k: v["sha256"] for k, v in hashes.items()}}
                for s in samples}
    wanted = ["nifti"] + (["preview"] if config.outputs.preview else []) + (["dicom"] if config.outputs.dicom else [])
    todo, done, incomplete = plan(samples, out_dir, requests, shard=shard, wanted=wanted, overwrite=args.overwrite)
    if demo and shard[0] == 0:
        print(f"ctgen generate: no --checkpoints, using the {models}", flush=True)
    print(f"ctgen generate: {len(samples)} sample(s) -> {out_dir}; process {shard[0]} of {shard[1]}: "
          f"{len(todo)} to make, {len(done)} finished, {len(incomplete)} finished but missing outputs", flush=True)
    for sample, marker in incomplete:
        _complete_from_nifti(out_dir, sample, marker, config)
    if not todo and jax.process_count() == 1:
        return 0
    if not todo:  # Orbax restores are collective: every process loads the models, with work or without
        print(f"ctgen generate: process {shard[0]} has nothing to make; loading the models with the other "
              "processes", flush=True)
    env = environment(*shard)
    timer = StageTimer()
    outputs = cascade.run_cascade(todo, config, stages, timer=timer,
                                  progress=progress_enabled(config.progress_bar, shard[0]))
    for result in outputs:
        _write(out_dir, result, config, layout, requests[result.sample.name], hashes, env, cache, models)
    return 0


def _write(out_dir: str, result, config, layout: str, request: dict, hashes: dict, env: dict, cache,
           models: str) -> None:
    from ctgen.generate.orientation import model_to_canonical
    from ctgen.generate.outputs import write_sample
    from ctgen.generate.provenance import peak_memory
    from ctgen.volume import extent_spacing

    sample = result.sample
    hu = model_to_canonical(result.hu_DxHxW, layout, config.generatect_axcodes)
    spacing = extent_spacing(hu.shape, config.geometry.extent_mm)
    record = {"prompt": sample.prompt, "prompt_source": sample.where, "prompt_name": sample.base, "request": request,
              "models": models, "checkpoints": hashes, "config": config.to_dict(), **env, "compile_cache": cache,
              "seconds": {k: round(float(v), 3) for k, v in result.seconds.items()},
              "compile_seconds": {k: round(float(v), 3) for k, v in result.compile_seconds.items()},
              "peak_memory": peak_memory(), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    prov = write_sample(out_dir, sample, hu, spacing, record, dicom=_series_info(sample) if config.outputs.dicom
                        else None, preview=config.outputs.preview)
    total = sum(result.seconds.values())
    from ctgen.generate.outputs import output_paths

    paths = output_paths(out_dir, sample.name)
    shown = [("volume", paths.nifti)] + [(k, getattr(paths, k)) for k in ("preview", "dicom") if k in prov["outputs"]]
    shown.append(("provenance", paths.provenance))
    print(f"{sample.name}: {'x'.join(str(n) for n in hu.shape)} voxels in {total:.1f} s "
          f"(+{sum(result.compile_seconds.values()):.1f} s compile)\n"
          + "".join(f"  {label:<10} {os.path.relpath(path)}\n" for label, path in shown), end="", flush=True)


def _series_info(sample):
    import ctgen
    from ctgen.io.dicom_write import SeriesInfo

    return SeriesInfo(series_description=f"SYNTHETIC ctgen: {sample.prompt}",
                      derivation_description=f"Synthetic CT volume generated by ctgen {ctgen.__version__} from the "
                                             f"text prompt: {sample.prompt}",
                      patient_id=sample.name, software=f"ctgen {ctgen.__version__}", age=_years(sample.age),
                      sex=sample.sex, comments=f"ctgen synthetic volume (not a patient scan). Prompt: {sample.prompt}")


def _years(age: str) -> str:
    from ctgen.text.prompt import format_age

    return format_age(age) if age else ""


def _complete_from_nifti(out_dir: str, sample, marker: dict, config) -> None:
    """A finished sample that lacks a newly requested output (--dicom, preview): write it from the
    sample's own NIfTI instead of generating the volume again."""
    from ctgen.generate.outputs import output_paths, write_sample
    from ctgen.io.nifti import read_nifti
    from ctgen.volume import to_canonical

    nii = read_nifti(output_paths(out_dir, sample.name).nifti)
    hu, spacing, _ = to_canonical(nii.data_ijk, nii.affine)
    record = {k: v for k, v in marker.items() if k not in ("format", "name", "geometry", "outputs")}
    had = marker["outputs"]
    write_sample(out_dir, sample, hu, spacing, record,
                 dicom=_series_info(sample) if config.outputs.dicom or "dicom" in had else None,
                 preview=config.outputs.preview or "preview" in had)
    print(f"{sample.name}: added {', '.join(k for k in ('preview', 'dicom') if k not in marker['outputs'])} "
          "from its NIfTI", flush=True)
