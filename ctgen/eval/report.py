"""Report on a directory of generated CT volumes against a directory of reference volumes.

`evaluate_generated` reads every NIfTI file of both directories (canonical orientation, HU), except
generated volumes that `ctgen generate` has not finished (`generated_volumes`), measures each
volume label-free (`phantom_measure`), and computes what is available:

* always: HU histogram distances and the Fréchet distance of phantom measurements
  (`distribution`), labelled as such: they use no network;
* with `feature_weights` (a ResNet-50 state_dict): 2.5D FID and the FVD-style volume-level
  Fréchet distance on its features (`features`, `resnet`);
* with `prompts`: prompt adherence of the generated volumes (`adherence`).

It writes `report.json`, `report.md` and PNG figures (HU histograms, example slices in three
planes, phantom measurements) to `out_dir`, and returns the JSON content.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from typing import Mapping, Sequence

import numpy as np

from ctgen.errors import UserError
from ctgen.eval import distribution, plots
from ctgen.eval.phantom_measure import measure_volume

EXAMPLES = 2  # example volumes per set in examples.png
log = logging.getLogger("ctgen")


def volume_name(path: str) -> str:
    """File name without `.nii` / `.nii.gz`: the key that pairs volumes with prompts."""
    base = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def list_volumes(directory: str, role: str) -> list[str]:
    """The NIfTI files under `directory` (recursively, sorted); UserError if there are none."""
    from ctgen.data.sources import find_niftis

    if not os.path.isdir(directory):
        raise UserError(f"--{role} {directory}: not a directory")
    files = find_niftis(directory)
    if not files:
        raise UserError(f"--{role} {directory}: no .nii or .nii.gz files found")
    return files


def generated_volumes(directory: str) -> tuple[list[str], list[str]]:
    """(the generated NIfTI files to evaluate, those left out). In a folder `ctgen generate` wrote,
    a volume that it does not count as finished (no complete provenance record, e.g. its run was
    stopped after the NIfTI was in place: `ctgen.generate.outputs.unfinished_volumes`) is left
    out, with one warning naming the files; UserError if nothing is left."""
    from ctgen.generate.outputs import unfinished_volumes

    files = list_volumes(directory, "generated")
    unfinished = {os.path.normpath(p) for p in unfinished_volumes(directory)}
    skipped = [f for f in files if os.path.normpath(f) in unfinished]
    kept = [f for f in files if os.path.normpath(f) not in unfinished]
    if skipped:
        log.warning("--generated %s: skipping %d volume(s) that ctgen generate has not finished (no complete "
                    "provenance record; rerun its command to finish them): %s", directory, len(skipped),
                    ", ".join(os.path.basename(f) for f in skipped))
    if not kept:
        raise UserError(f"--generated {directory}: none of its {len(files)} volumes is finished (no complete "
                        "provenance/<name>.json); rerun the ctgen generate command that made them")
    return kept, skipped


def _skipped(files: Sequence[str]) -> dict:
    return {"unfinished_skipped": [volume_name(f) for f in files]} if files else {}


def read_volume(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume (D, H, W) float32 in canonical orientation, spacing (D, H, W) mm)."""
    from ctgen.volume import to_canonical
    from ctgen.io.nifti import read_nifti

    nii = read_nifti(path)
    hu, spacing, _ = to_canonical(nii.data_ijk, nii.affine, nii.spacing_ijk)
    return hu.astype(np.float32), np.asarray(spacing, np.float64)


def load_prompts(prompts: str | Mapping[str, str]) -> dict[str, str]:
    """{volume name: prompt} from a mapping, a JSON file (an object, or a list of objects with a
    name field `name` / `file` / `input_image_name` / `VolumeName` and `prompt` / `report` / `text`),
    or a CSV file with such columns. Names may carry `.nii` / `.nii.gz`."""
    if isinstance(prompts, Mapping):
        return {volume_name(str(k)): str(v) for k, v in prompts.items()}
    path = str(prompts)
    if not os.path.isfile(path):
        raise UserError(f"--prompts {path}: no such file")
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            rows = [{"name": k, "prompt": v} for k, v in data.items()] if isinstance(data, dict) else list(data)
        else:
            with open(path, encoding="utf-8-sig", newline="") as f:
                rows = list(csv.DictReader(f))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"--prompts {path}: cannot read ({type(err).__name__}: {err})") from None
    out = {}
    for i, row in enumerate(rows):
        name = next((row[k] for k in ("name", "file", "input_image_name", "VolumeName") if isinstance(row, dict) and row.get(k)), None)
        text = next((row[k] for k in ("prompt", "report", "text") if isinstance(row, dict) and row.get(k)), None)
        if name is None or text is None:
            raise UserError(f"--prompts {path}: entry {i} has no name (name/file/input_image_name/VolumeName) "
                            f"or no prompt (prompt/report/text)")
        out[volume_name(str(name))] = str(text)
    return out


def _scan(files: Sequence[str]) -> dict:
    """One pass over a set: measurements, HU histograms and a few example volumes."""
    from ctgen.volume import hu_to_model

    rows, hists, examples = [], [], []
    for path in files:
        hu, spacing = read_volume(path)
        rows.append({"name": volume_name(path), "path": path, "shape": list(hu.shape),
                     "spacing": [round(float(s), 4) for s in spacing], "measured": measure_volume(hu, spacing)})
        hists.append(distribution.hu_histogram(hu))
        if len(examples) < EXAMPLES:
            examples.append((volume_name(path), hu_to_model(hu)))
    return {"rows": rows, "hists": np.stack(hists), "examples": examples}


def _features(files: Sequence[str], features_fn, protocol) -> dict[str, np.ndarray]:
    from ctgen.eval import features

    return features.extract((read_volume(p)[0] for p in files), features_fn, protocol)


def _jsonable(obj):
    """NaN -> None, numpy scalars / arrays -> Python, recursively."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _summary(rows: Sequence[dict]) -> dict:
    """Per measurement: mean, sd and how many volumes it could be measured on."""
    out = {}
    for key in distribution.ATTRIBUTES:
        v = np.asarray([r["measured"][key] for r in rows], np.float64)
        ok = v[np.isfinite(v)]
        out[key] = {"mean": float(ok.mean()) if ok.size else None, "sd": float(ok.std()) if ok.size else None,
                    "measured": int(ok.size), "of": len(v)}
    sides = [r["measured"]["effusion_side"] for r in rows]
    out["effusion_side_counts"] = {s: sides.count(s) for s in ("none", "right", "left", "both")}
    return out


def provenance_prompts(generated_dir: str) -> dict[str, str]:
    """{volume name: prompt} from the provenance records `ctgen generate` writes
    (`<dir>/provenance/<name>.json`); UserError if there are none."""
    folder = os.path.join(generated_dir, "provenance")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".json")) if os.path.isdir(folder) else []
    out = {}
    for n in names:
        with open(os.path.join(folder, n), encoding="utf-8") as f:
            record = json.load(f)
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            out[n[: -len(".json")]] = record["prompt"]
    if not out:
        raise UserError(f"--generated {generated_dir}: no provenance/*.json with prompts (written by `ctgen "
                        "generate`); give --prompts FILE")
    return out


def evaluate_adherence(generated_dir: str, out_dir: str, *, prompts: str | Mapping[str, str] | None = None) -> dict:
    """Prompt adherence alone (no reference set): measure every generated volume label-free and
    score it against its prompt (`adherence.score`); prompts default to the generated folder's
    provenance records. Writes adherence.json and adherence.md to `out_dir`; returns the JSON content."""
    from ctgen.eval.adherence import score

    files, skipped = generated_volumes(generated_dir)
    prompt_map = load_prompts(prompts) if prompts is not None else provenance_prompts(generated_dir)
    rows = []
    for path in files:
        name = volume_name(path)
        if name not in prompt_map:
            continue
        hu, spacing = read_volume(path)
        rows.append({"name": name, "prompt": prompt_map[name], "shape": list(hu.shape),
                     "measured": measure_volume(hu, spacing)})
    if not rows:
        raise UserError(f"no prompt names match the volumes of {generated_dir} (e.g. {volume_name(files[0])!r}; "
                        f"prompt names like {next(iter(prompt_map), None)!r})")
    result = score([r["prompt"] for r in rows], [r["measured"] for r in rows])
    for r, pair in zip(rows, result["pairs"]):
        pair["name"] = r["name"]
    report = _jsonable({"generated": {"dir": generated_dir, "count": len(files), "scored": len(rows),
                                      **_skipped(skipped)},
                        "adherence": result, "measured": {r["name"]: r["measured"] for r in rows}})
    os.makedirs(out_dir, exist_ok=True)
    files_out = {"json": os.path.join(out_dir, "adherence.json"), "markdown": os.path.join(out_dir, "adherence.md")}
    with open(files_out["json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(files_out["markdown"], "w", encoding="utf-8") as f:
        f.write(adherence_markdown(report))
    report["files"] = files_out
    return report


def adherence_markdown(report: dict) -> str:
    """Per-prompt and per-attribute tables of an `evaluate_adherence` report."""
    ad, by_prompt = report["adherence"], {}
    for p in ad["pairs"]:
        by_prompt.setdefault(p["prompt"], []).append(p)
    lines = [f"# Prompt adherence: {report['generated']['dir']}", "",
             f"{report['generated']['scored']} volumes scored (of {report['generated']['count']}).", "",
             "| prompt | volumes | " + " | ".join(k for k in ad["per_attribute"]) + " |",
             "|---|---|" + "---|" * len(ad["per_attribute"])]
    for prompt, pairs in by_prompt.items():
        cells = []
        for key in ad["per_attribute"]:
            judged = [p["correct"][key] for p in pairs if p["correct"][key] is not None]
            cells.append(f"{sum(judged)}/{len(judged)}" if judged else "-")
        lines.append(f"| {prompt} | {len(pairs)} | " + " | ".join(cells) + " |")
    lines += ["", "| attribute | accuracy | judged |", "|---|---|---|"]
    lines += [f"| {k} | {_num(v['accuracy'])} | {v['n']} |" for k, v in ad["per_attribute"].items()]
    s = ad["summary"]
    lines += ["", f"overall accuracy {_num(ad['overall_accuracy'])}; all attributes right on "
              f"{_num(ad['all_correct_fraction'])} of the volumes.", "",
              f"- mean measured CTR: {_num(s['ctr_cardiomegaly_mean'])} for cardiomegaly prompts "
              f"({s['n_cardiomegaly']}), {_num(s['ctr_normal_mean'])} for the others ({s['n_normal']}); "
              f"gap {_num(s['ctr_gap'])}",
              f"- right pleural effusion prompts with fluid measured on the right: "
              f"{_num(s['right_effusion_detected_fraction'])} ({s['n_right_effusion']} prompts)",
              f"- prompts without effusion with fluid measured: {_num(s['no_effusion_fluid_fraction'])} "
              f"({s['n_no_effusion']} prompts)", ""]
    return "\n".join(lines)


def _grid(gen_rows: Sequence[dict], ref_rows: Sequence[dict]) -> tuple[int, int, int]:
    """Default feature grid: the largest extent along each axis over both sets (nothing is cropped)."""
    shapes = np.asarray([r["shape"] for r in list(gen_rows) + list(ref_rows)])
    return tuple(int(v) for v in shapes.max(axis=0))


def evaluate_generated(generated_dir: str, reference_dir: str, out_dir: str, *, feature_weights: str | None = None,
                       prompts: str | Mapping[str, str] | None = None, grid: Sequence[int] | None = None,
                       slice_size: int | None = None, center_ratio: float = 0.4) -> dict:
    """Compare the NIfTI volumes of `generated_dir` with those of `reference_dir`; write report.json,
    report.md and PNG figures to `out_dir` and return the report.

    feature_weights: a ResNet-50 state_dict (`.pt` / `.safetensors`, torchvision layout, e.g. the
      RadImageNet release) for 2.5D FID and the volume-level Fréchet distance; without it those are
      reported as not computed.
    prompts: {volume name: prompt} or a JSON / CSV file (`load_prompts`) for prompt adherence.
    grid / slice_size / center_ratio: the feature protocol (`features.SliceProtocol`); grid defaults
      to the largest extent per axis over both sets.
    """
    from ctgen.eval import features

    (gen_files, skipped), ref_files = generated_volumes(generated_dir), list_volumes(reference_dir, "reference")
    prompt_map = load_prompts(prompts) if prompts is not None else None
    features_fn = features.resnet_features_fn(feature_weights) if feature_weights is not None else None
    gen, ref = _scan(gen_files), _scan(ref_files)
    metrics: dict = {
        "hu_histogram": {**distribution.histogram_distances(gen["hists"], ref["hists"]),
                         "note": "distances between HU histograms (no network)"},
        "phantom_attributes": {**distribution.attribute_frechet([r["measured"] for r in gen["rows"]],
                                                                [r["measured"] for r in ref["rows"]]),
                               "attributes": list(distribution.ATTRIBUTES),
                               "note": "Frechet distance of label-free phantom measurements, z-scored over "
                                       "both sets (no network)"},
    }
    if features_fn is None:
        metrics["feature_network"] = {"computed": False,
                                      "note": "2.5D FID and the volume-level Frechet distance need a trained "
                                              "network's weights (--features-weights); not computed"}
    else:
        protocol = features.SliceProtocol(grid=tuple(grid or _grid(gen["rows"], ref["rows"])),
                                          center_ratio=center_ratio, slice_size=slice_size)
        fg, fr = _features(gen_files, features_fn, protocol), _features(ref_files, features_fn, protocol)
        metrics["feature_network"] = {"computed": True, "weights": feature_weights, **distribution.fid_2p5d(fg, fr),
                                      "volume_frechet": distribution.volume_frechet(fg, fr),
                                      "protocol": {"grid": list(protocol.grid), "center_ratio": protocol.center_ratio,
                                                   "slice_size": protocol.slice_size}}
    report = {"generated": {"dir": generated_dir, "count": len(gen_files), "summary": _summary(gen["rows"]),
                            "volumes": gen["rows"], **_skipped(skipped)},
              "reference": {"dir": reference_dir, "count": len(ref_files), "summary": _summary(ref["rows"]),
                            "volumes": ref["rows"]},
              "metrics": metrics, "adherence": None}
    if prompt_map is not None:
        from ctgen.eval.adherence import score

        paired = [(prompt_map[r["name"]], r["measured"]) for r in gen["rows"] if r["name"] in prompt_map]
        if not paired:
            raise UserError(f"--prompts: no prompt names match the generated volumes "
                            f"(e.g. {gen['rows'][0]['name']!r}; prompt names like {next(iter(prompt_map), None)!r})")
        report["adherence"] = {**score([p for p, _ in paired], [m for _, m in paired]),
                               "without_prompt": len(gen["rows"]) - len(paired)}
    report["files"] = _write(out_dir, report, gen, ref)
    return _jsonable(report)


def _num(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"


def _markdown(report: dict, figures: dict[str, str]) -> str:
    g, r, m = report["generated"], report["reference"], report["metrics"]
    fn, hu, at = m["feature_network"], m["hu_histogram"], m["phantom_attributes"]
    lines = ["# Generated vs reference CT volumes", "",
             f"generated: `{g['dir']}` ({g['count']} volumes); reference: `{r['dir']}` ({r['count']} volumes)", "",
             "## Distribution metrics", "", "| metric | value | what it is |", "|---|---|---|"]
    if fn["computed"]:
        planes = ", ".join(_num(fn[f"fid_{p}"], 4) for p in ("axial", "coronal", "sagittal"))
        lines += [f"| 2.5D FID | {_num(fn['fid_2p5d'], 4)} (axial, coronal, sagittal: {planes}) | ResNet-50 "
                  f"slice features (`{fn['weights']}`), grid {fn['protocol']['grid']} |",
                  f"| volume-level Frechet distance | {_num(fn['volume_frechet'], 4)} | FVD-style: per-volume means "
                  "of the slice features (not the challenge's CT-Net FVD) |"]
    else:
        lines += ["| 2.5D FID, volume-level Frechet distance | not computed | " + fn["note"] + " |"]
    lines += [f"| HU Wasserstein-1 | {_num(hu['hu_wasserstein'], 4)} HU | pooled HU distributions (no network) |",
              f"| HU histogram Frechet distance | {_num(hu['hu_histogram_frechet'], 4)} | per-volume HU histograms "
              "(no network) |",
              f"| phantom attribute Frechet distance | {_num(at['attribute_frechet'], 4)} | label-free phantom "
              f"measurements z-scored over both sets (no network; volumes used: {at['generated_used']} generated, "
              f"{at['reference_used']} reference) |", "",
              "## Phantom measurements (label-free)", "",
              "| measurement | reference mean +- sd (measured/all) | generated mean +- sd (measured/all) |",
              "|---|---|---|"]
    for key in distribution.ATTRIBUTES:
        cells = [f"{_num(s[key]['mean'])} +- {_num(s[key]['sd'], 2)} ({s[key]['measured']}/{s[key]['of']})"
                 for s in (r["summary"], g["summary"])]
        lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
    sides = [", ".join(f"{k} {v}" for k, v in s["effusion_side_counts"].items()) for s in (r["summary"], g["summary"])]
    lines += [f"| effusion side | {sides[0]} | {sides[1]} |", ""]
    ad = report["adherence"]
    if ad is not None:
        s = ad["summary"]
        lines += ["## Prompt adherence (generated volumes)", "", "| attribute | accuracy | judged |", "|---|---|---|"]
        lines += [f"| {k} | {_num(v['accuracy'])} | {v['n']} |" for k, v in ad["per_attribute"].items()]
        lines += ["", f"overall accuracy {_num(ad['overall_accuracy'])}; all attributes right on "
                  f"{_num(ad['all_correct_fraction'])} of the volumes; {ad['without_prompt']} generated volumes "
                  "had no prompt.", "",
                  f"- mean CTR: {_num(s['ctr_cardiomegaly_mean'])} for cardiomegaly prompts ({s['n_cardiomegaly']}), "
                  f"{_num(s['ctr_normal_mean'])} for the others ({s['n_normal']}); gap {_num(s['ctr_gap'])}",
                  f"- right pleural effusion prompts with fluid measured on the right: "
                  f"{_num(s['right_effusion_detected_fraction'])} ({s['n_right_effusion']} prompts)",
                  f"- prompts without effusion with fluid measured: {_num(s['no_effusion_fluid_fraction'])} "
                  f"({s['n_no_effusion']} prompts)", ""]
    lines += ["## Figures", ""] + [f"![{k}]({os.path.basename(v)})" for k, v in figures.items()] + [""]
    return "\n".join(lines)


def _write(out_dir: str, report: dict, gen: dict, ref: dict) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    figures = {
        "HU histograms": plots.histogram_png(
            os.path.join(out_dir, "hu_histograms.png"), distribution.HU_BINS,
            {"reference": ref["hists"].mean(axis=0), "generated": gen["hists"].mean(axis=0)},
            "mean HU histogram per set (clipped to [-1000, 1000])"),
        "example slices": plots.examples_png(
            os.path.join(out_dir, "examples.png"),
            [(rn, rv, gn, gv) for (rn, rv), (gn, gv) in zip(ref["examples"], gen["examples"])], "examples"),
        "phantom measurements": plots.strip_png(
            os.path.join(out_dir, "measurements.png"),
            {k: {"reference": [x["measured"][k] for x in ref["rows"]],
                 "generated": [x["measured"][k] for x in gen["rows"]]} for k in distribution.ATTRIBUTES},
            "label-free phantom measurements (bar: mean)"),
    }
    files = {"json": os.path.join(out_dir, "report.json"), "markdown": os.path.join(out_dir, "report.md"), **figures}
    report = dict(report, files=files)
    with open(files["markdown"], "w", encoding="utf-8") as f:
        f.write(_markdown(_jsonable(report), figures))
    with open(files["json"], "w", encoding="utf-8") as f:
        json.dump(_jsonable(report), f, indent=1)
    return files
