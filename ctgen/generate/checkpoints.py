"""`--checkpoints DIR`: one directory per stage of the cascade, checked before anything runs.

    DIR/text/      T5 encoder: a Hugging Face or T5X T5 directory, or ctgen text-encoder weights
    DIR/ctvit/     CT-ViT tokenizer          } each a ctgen weights directory (`ctgen import ...`,
    DIR/maskgit/   MaskGIT transformer       }  an export) or a training workdir (its latest
    DIR/superres/  super-resolution U-Net    }  checkpoint)

A weights directory says which model it holds in `ctgen_weights.json` (`model`: "t5_encoder",
"ctvit", "maskgit", "superres"); a workdir in `config.json` (`stage`). A missing stage, a
directory of another stage and a directory that is neither fail here in one line, naming the
directory and how to make the right one. `weights_files` lists what a stage's weights consist of,
for the provenance hashes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from ctgen.errors import UserError

STAGES = ("text", "ctvit", "maskgit", "superres")
MODELS = {"text": "t5_encoder", "ctvit": "ctvit", "maskgit": "maskgit", "superres": "superres"}
WHAT = {"text": "T5 text encoder", "ctvit": "CT-ViT tokenizer", "maskgit": "MaskGIT transformer",
        "superres": "super-resolution U-Net"}
HOW = {
    "text": "put a Hugging Face T5 v1.1 model there (e.g. google/t5-v1_1-base) or set "
            "--config.checkpoints.text=builtin for the tiny test encoder",
    "ctvit": "`ctgen import generatect-ctvit ctvit_pretrained.pt --out {path}` or a CT-ViT training workdir",
    "maskgit": "`ctgen import generatect-transformer transformer_pretrained.pt --out {path}` or a MaskGIT "
               "training workdir",
    "superres": "`ctgen import generatect-superres superres_pretrained.pt --out {path}` or a super-resolution "
                "training workdir (or generate without it: --no-sr)",
}


@dataclasses.dataclass(frozen=True)
class StageWeights:
    """Where one stage's weights are and what they are.

    kind: "weights" (ctgen weights directory), "workdir" (training run; its latest checkpoint),
      "hf" / "t5x" (a text encoder in those formats); model: the recorded model name;
      model_config: the recorded architecture ({} where the format keeps none we read here);
      info: the marker / config.json contents (e.g. "source" of an imported checkpoint).
    """

    stage: str
    path: str
    kind: str
    model: str
    model_config: Mapping[str, Any]
    info: Mapping[str, Any]


def _listing(path: str) -> str:
    names = sorted(os.listdir(path))
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "an empty directory"


def latest_step_dir(workdir: str) -> str | None:
    """The newest finished checkpoint step directory of a training workdir (Orbax names steps by
    number and gives unfinished saves a temporary suffix)."""
    root = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n))] \
        if os.path.isdir(root) else []
    return os.path.join(root, str(max(steps))) if steps else None


def _ctgen_dir(stage: str, path: str) -> StageWeights:
    from ctgen.weights import WEIGHTS_MARKER, weights_info

    expected = MODELS[stage]
    info = weights_info(path)
    if info is not None:
        if info.get("model") != expected:
            raise UserError(f"{path}: holds weights of model {info.get('model')!r}, not the {WHAT[stage]} "
                            f"({expected!r}) that {stage}/ must hold")
        return StageWeights(stage, path, "weights", expected, dict(info.get("model_config") or {}), info)
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{config_path}: cannot read ({type(e).__name__}: {e})") from None
        run_stage = config.get("stage") if isinstance(config, dict) else None
        if run_stage != expected:
            raise UserError(f"{path}: a training workdir of stage {run_stage!r}, not of the {WHAT[stage]} "
                            f"({expected!r}) that {stage}/ must hold")
        if latest_step_dir(path) is None:
            raise UserError(f"{path}: training workdir without a finished checkpoint yet")
        return StageWeights(stage, path, "workdir", expected, dict(config.get("model") or {}), config)
    raise UserError(f"{path}: neither a ctgen weights directory ({WEIGHTS_MARKER}) nor a training workdir "
                    f"(config.json + checkpoints/) for the {WHAT[stage]}; found {_listing(path)}")


def _text_encoder(path: str) -> StageWeights:
    from ctgen.text.load import BUILTIN, detect_format

    kind, directory = detect_format(path)
    if kind == "ctgen":
        return _ctgen_dir("text", directory)
    config = {}
    if kind == "hf":
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    return StageWeights("text", BUILTIN if path == BUILTIN else directory, kind, MODELS["text"], config, {})


def resolve_checkpoints(root: str, paths: Mapping[str, str], stages: Sequence[str]) -> dict[str, StageWeights]:
    """The weights of `stages`: `paths[stage]` when given, else `root/<stage>`; each one checked.

    Raises UserError (one line) for a missing root or stage directory, a directory of another
    stage or model, and a directory that holds no weights.
    """
    from ctgen.weights import WEIGHTS_MARKER

    if root and not os.path.isdir(root):
        raise UserError(f"--checkpoints {root}: no such directory")
    if root and not any(os.path.exists(os.path.join(root, s)) for s in stages) and any(
            os.path.isfile(os.path.join(root, f)) for f in ("config.json", WEIGHTS_MARKER)):
        raise UserError(f"--checkpoints {root}: this is one model's directory; give the folder that holds "
                        f"{', '.join(s + '/' for s in stages)}")
    out = {}
    for stage in stages:
        path = paths.get(stage) or (os.path.join(root, stage) if root else "")
        if not path:
            raise UserError(f"no {stage}/ weights: give --checkpoints DIR (holding {', '.join(s + '/' for s in stages)}) "
                            f"or --config.checkpoints.{stage}=PATH")
        if stage == "text":
            out[stage] = _text_encoder(path)
            continue
        if not os.path.isdir(path):
            where = f"--checkpoints {root}" if not paths.get(stage) else f"--config.checkpoints.{stage}"
            raise UserError(f"{where}: no {path} (the {WHAT[stage]}); make it with " + HOW[stage].format(path=path))
        out[stage] = _ctgen_dir(stage, os.path.abspath(path))
    return out


def weights_files(weights: StageWeights) -> list[str]:
    """The files that make up a stage's weights (sorted absolute paths): the whole directory, or
    for a training workdir its config.json and latest checkpoint; for "builtin" the shipped files."""
    from ctgen.text.load import BUILTIN, builtin_dir
    from ctgen.text.t5x_format import find_t5x_checkpoint

    if weights.path == BUILTIN:
        roots = [builtin_dir()]
    elif weights.kind == "workdir":
        roots = [os.path.join(weights.path, "config.json"), latest_step_dir(weights.path)]
    elif weights.kind == "t5x":
        roots = [os.path.dirname(find_t5x_checkpoint(weights.path))]
    else:
        roots = [weights.path]
    files = []
    for root in roots:
        if os.path.isfile(root):
            files.append(os.path.abspath(root))
            continue
        for dirpath, dirs, names in os.walk(root):
            dirs.sort()
            files.extend(os.path.abspath(os.path.join(dirpath, n)) for n in sorted(names))
    return sorted(files)
