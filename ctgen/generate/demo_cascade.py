"""The built-in phantom demo cascade: what `ctgen generate` runs when no `--checkpoints` is given.

It lives in `ctgen/assets/demo_cascade/`: `ctvit/`, `maskgit/` and `superres/` are ctgen weights
directories (bfloat16 on disk, float32 once loaded); the text encoder is the built-in T5
(`ctgen/assets/text/builtin_t5`). `demo_cascade.json` holds:

    name, description     what it is (a phantom model, not a chest-CT model)
    generate              generation settings that go with these weights (config field -> value),
                          applied before the user's own --config.* overrides and options
    stages                per stage: the training workdir and step it was packed from, parameters
    quality               measured numbers (docs/demo_cascade.md)
    files                 sha256 of every file of the three weights directories

`verify` recomputes the hashes (`ctgen generate` does, through its provenance hashes) and fails
naming the first file that differs, so a damaged install is never mistaken for the model.

Packing (after the training commands in docs/demo_cascade.md):

    python -m ctgen.generate.demo_cascade pack --ctvit D/ctvit --maskgit D/maskgit --superres D/superres \\
        [--set superres.steps=20 ...] [--quality quality.json] --out ctgen/assets/demo_cascade

takes each stage's latest checkpoint (the SR's EMA weights), casts its floating-point arrays to
bfloat16 and writes the directory and its manifest. A cascade trained stage by stage can be packed
stage by stage (`pack --ctvit D/ctvit --out ctgen/assets/demo_cascade` writes only `ctvit/`, no
manifest), so a finished stage is committed once and survives the loss of the machine its later
stages train on; the final pack names the packed directory (`--ctvit ctgen/assets/demo_cascade/ctvit`),
which is copied byte for byte.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import time
from typing import Any, Mapping, Sequence

from ctgen.errors import UserError

MANIFEST = "demo_cascade.json"
NAME = "ctgen built-in phantom demo cascade"
DESCRIPTION = ("a small cascade trained on ctgen's synthetic chest phantoms (docs/demo_cascade.md); a phantom "
               "model, not a chest-CT model")
STAGES = ("ctvit", "maskgit", "superres")
# Generation settings packed with the weights (tunable at pack time with --set).
DEFAULT_SETTINGS: dict[str, Any] = {
    "slices": 17,
    "text_max_length": 128,
    "maskgit.steps": 18,
    "maskgit.cond_scale": 3.0,
    "superres.scale": 4,
    "superres.sampler": "ddim",
    "superres.steps": 20,
    "geometry.extent_mm": (301.5, 350.0, 350.0),
}


def default_dir() -> str:
    import ctgen

    return os.path.join(os.path.dirname(os.path.abspath(ctgen.__file__)), "assets", "demo_cascade")


def available(path: str | None = None) -> bool:
    """Whether a demo cascade (its manifest) is at `path` (default: the built-in one)."""
    return os.path.exists(os.path.join(path or default_dir(), MANIFEST))


def read_manifest(path: str | None = None) -> dict:
    """The manifest of the demo cascade at `path` (default: the built-in one); UserError if absent."""
    path = path or default_dir()
    marker = os.path.join(path, MANIFEST)
    if not os.path.exists(marker):
        packed = [s for s in STAGES if os.path.isdir(os.path.join(path, s))]
        if packed:  # a cascade committed stage by stage, not finished in this version
            raise UserError(f"{path}: the built-in demo cascade is not complete in this version of ctgen (packed so "
                            f"far: {', '.join(packed)}; no {MANIFEST}; docs/demo_cascade.md); give --checkpoints DIR "
                            "(docs/generate.md)")
        raise UserError(f"{path}: no built-in demo cascade here (no {MANIFEST}); give --checkpoints DIR "
                        "(docs/generate.md) or reinstall ctgen")
    with open(marker, encoding="utf-8") as f:
        return json.load(f)


def uses_demo(checkpoints_option: str | None, overrides: Sequence[tuple[str, str]]) -> bool:
    """Whether a `ctgen generate` call runs the demo: no --checkpoints and no checkpoints.* override."""
    return not checkpoints_option and not any(k.split(".")[0] == "checkpoints" for k, _ in overrides)


def overrides(path: str | None = None) -> list[tuple[str, str]]:
    """The config overrides that select the demo cascade and its generation settings (put them
    before the user's: later overrides win)."""
    path = path or default_dir()
    man = read_manifest(path)
    return settings_overrides(man.get("generate", {})) + [("checkpoints.dir", path), ("checkpoints.text", "builtin")]


def settings_overrides(settings: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Generation settings ({"maskgit.cond_scale": 3.0, ...}) as `--config.KEY=VALUE` override pairs
    (strings as they are, other values as Python literals; JSON lists become tuples)."""
    return [(k, v if isinstance(v, str) else repr(tuple(v) if isinstance(v, list) else v))
            for k, v in settings.items()]


def verify(record: Mapping[str, Mapping[str, Any]], path: str | None = None) -> None:
    """Check the stages' file hashes (`provenance.checkpoint_record`) against the manifest."""
    path = path or default_dir()
    expected = read_manifest(path).get("files", {})
    seen = {}
    for stage in STAGES:
        for rel, digest in (record.get(stage, {}).get("files") or {}).items():
            seen[f"{stage}/{rel}"] = digest
    for rel, digest in sorted(expected.items()):
        if rel.split("/")[0] not in record:  # a stage this run does not use (--no-sr)
            continue
        if rel not in seen:
            raise UserError(f"{os.path.join(path, rel)}: missing from the built-in demo cascade; reinstall ctgen")
        if seen[rel] != digest:
            raise UserError(f"{os.path.join(path, rel)}: content differs from the one shipped (sha256 {seen[rel][:12]}..., "
                            f"expected {digest[:12]}...); reinstall ctgen")
    extra = sorted(set(seen) - set(expected))
    if extra:
        raise UserError(f"{os.path.join(path, extra[0])}: not part of the built-in demo cascade; reinstall ctgen")


# ----------------------------------------------------------------------------- packing
def _bf16(tree):
    import jax
    import jax.numpy as jnp
    import numpy as np

    return jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16) if np.issubdtype(np.asarray(x).dtype, np.floating)
                        else x, tree)


def _count(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _files(root: str) -> dict[str, str]:
    from ctgen.generate.provenance import sha256_file

    out = {}
    for stage in STAGES:
        for dirpath, dirs, names in os.walk(os.path.join(root, stage)):
            dirs.sort()
            for n in sorted(names):
                full = os.path.join(dirpath, n)
                out[os.path.relpath(full, root)] = sha256_file(full)
    return out


def _packed_stage(path: str) -> dict | None:
    """The weights marker of `path` if it is a stage directory written by `pack` (its marker records
    `packed_from`), else None."""
    from ctgen.weights import weights_info

    info = weights_info(path) if os.path.isdir(path) else None
    return info if info and "packed_from" in info else None


def _pack_stage(stage: str, source: str, dest: str) -> dict:
    """Write one stage's bfloat16 weights directory `dest` from `source` and return its manifest
    record. A source that is already a packed stage is copied byte for byte (its files, and so
    their hashes, stay as committed), not re-cast and re-written."""
    import shutil

    from ctgen.convert import ctvit_store, maskgit_store, superres_store
    from ctgen.generate.checkpoints import MODELS, latest_step_dir
    from ctgen.generate.orientation import resolve_layout
    from ctgen.weights import weights_info

    packed = _packed_stage(source)
    if packed is not None:
        if packed.get("model") != MODELS[stage]:
            raise UserError(f"{source}: a packed {packed.get('model')!r} stage, not a {MODELS[stage]!r} one (--{stage})")
        shutil.copytree(source, dest)
        return {**_stage_record(packed), "copied_from": os.path.abspath(source)}
    checkpoint = latest_step_dir(source) or source
    info = {"packed_from": os.path.abspath(source), "packed_checkpoint": os.path.abspath(checkpoint)}
    if stage == "ctvit":
        cfg, _, states = ctvit_store.load_ctvit_state(source)
        state = states["ctvit"]
        info["parameters"] = _count(state)
        ctvit_store.save_ctvit_dir(dest, cfg, _bf16(state), info=info)
    elif stage == "maskgit":
        mcfg, mstate = maskgit_store.load_maskgit_state(source)
        # the array layout the MaskGIT was trained in travels with it ("canonical" for a ctgen training
        # workdir, "generatect" for imported GenerateCT weights): `ctgen generate` maps its output by it
        info["layout"] = resolve_layout("auto", weights_info(source) or {})
        info["parameters"] = _count(mstate)
        maskgit_store.save_maskgit_dir(dest, mcfg, _bf16(mstate), tokenizer="../ctvit", info=info)
    else:
        ucfg, _, live, ema, _step = superres_store.load_params(source)
        params, info["weights"] = (ema, "ema") if ema is not None else (live, "live")
        info["parameters"] = _count(params)
        superres_store.save_superres_dir(dest, ucfg, _bf16(params), info=info)
    return _stage_record(info)


def _stage_record(info: Mapping[str, Any]) -> dict:
    """A stage's manifest record, from the marker `_pack_stage` wrote into its weights directory."""
    record = {"from": info.get("packed_checkpoint", info["packed_from"])}
    record.update({k: info[k] for k in ("parameters", "layout", "weights") if k in info})
    return record


def pack(ctvit: str | None, maskgit: str | None, superres: str | None, out: str, *,
         settings: Mapping[str, Any] | None = None, quality: Mapping[str, Any] | None = None) -> dict:
    """Write the demo cascade directory `out` from training workdirs (or weights directories).

    With all three stages, `out` becomes the cascade with its manifest. With only some (a cascade
    trained stage by stage, each stage committed once when it is final), only those stage
    directories are (re)written in `out` and no manifest is written: `ctgen generate` does not use
    the directory until a full pack. A stage given as an already packed directory (e.g. `out/ctvit`
    itself) is copied byte for byte. Everything is written beside `out` first and swapped in at the
    end, so a failed pack leaves `out` as it was."""
    import shutil
    import tempfile

    sources = {"ctvit": ctvit, "maskgit": maskgit, "superres": superres}
    given = [s for s in STAGES if sources[s]]
    if not given:
        raise UserError("pack: give at least one of --ctvit, --maskgit, --superres")
    for stage in given:
        if not os.path.isdir(sources[stage]):
            raise UserError(f"{sources[stage]}: no such directory (--{stage})")
    full = len(given) == len(STAGES)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".pack-", dir=parent)
    try:
        stages = {stage: _pack_stage(stage, sources[stage], os.path.join(tmp, stage)) for stage in given}
        manifest = {"name": NAME, "description": DESCRIPTION, "packed": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "generate": {**DEFAULT_SETTINGS, **(settings or {})}, "stages": stages,
                    "quality": dict(quality or {}), "files": _files(tmp)}
        manifest["bytes"] = sum(os.path.getsize(os.path.join(tmp, rel)) for rel in manifest["files"])
        if full:
            with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2, default=list)
                f.write("\n")
            old = out + ".old" if os.path.exists(out) else None
            if old:
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
            os.replace(tmp, out)
            if old:
                shutil.rmtree(old)
        else:
            os.makedirs(out, exist_ok=True)
            for stage in given:
                dest = os.path.join(out, stage)
                if os.path.exists(dest):
                    shutil.rmtree(dest)
                os.replace(os.path.join(tmp, stage), dest)
            stale = os.path.join(out, MANIFEST)
            if os.path.exists(stale):  # its hashes no longer describe the directory
                os.remove(stale)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _setting(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected FIELD=VALUE")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctgen.generate.demo_cascade", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("pack", help="write the demo cascade directory from its stages' training workdirs")
    for stage in STAGES:
        k.add_argument(f"--{stage}", metavar="DIR", help=f"the {stage} training workdir, weights directory or "
                       "already packed stage directory (copied as it is); all three make the cascade, fewer "
                       "(re)write only those stages and no manifest")
    k.add_argument("--out", default=default_dir(), metavar="DIR")
    k.add_argument("--set", dest="settings", action="append", type=_setting, default=[], metavar="FIELD=VALUE",
                   help="generation setting stored with the weights (e.g. superres.steps=20)")
    k.add_argument("--quality", metavar="JSON", help="measured numbers to record in the manifest")
    args = p.parse_args(argv)
    quality = {}
    if args.quality:
        with open(args.quality, encoding="utf-8") as f:
            quality = json.load(f)
    man = pack(args.ctvit, args.maskgit, args.superres, args.out, settings=dict(args.settings), quality=quality)
    print(f"wrote {args.out}: {len(man['files'])} files, {man['bytes'] / 2**20:.2f} MiB")
    if len(man["stages"]) < len(STAGES):
        print(f"partial pack ({', '.join(man['stages'])}): no {MANIFEST} written; `ctgen generate` uses the "
              "directory once all three stages are packed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
