"""`ctgen prepare`: turn CT-RATE, a NIfTI folder, DICOM series or synthetic phantoms into a TFDS dataset.

    ctgen prepare --source phantom --count 1000 --out data/
    ctgen prepare --source ctrate --root /data/CT-RATE/dataset --out data/ --num-workers 2
    ctgen prepare --source nifti --csv studies.csv --out data/
    ctgen prepare --source dicom --root pacs_export/ --reports reports.csv --out data/
    ctgen prepare --source embeddings --dataset data/ctgen_ct/NAME/1.0.0 --out data/t5
    ctgen prepare --source tokens --dataset data/ctgen_ct/NAME/1.0.0 --tokenizer runs/ctvit --out data/tokens
    ctgen prepare --source sr-pairs --dataset data/ctgen_ct/NAME/1.0.0 --tokenizer runs/ctvit --out data/sr_pairs

Also runnable as `python -m ctgen.data.command ...`. The dataset lands in
`<out>/ctgen_ct/<name>/1.0.0/` with `manifest.jsonl` (one line per input: written, warning or
skipped, and why). See docs/data.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ctgen.text.prompt import resolve_template

SOURCES = ("phantom", "ctrate", "nifti", "dicom", "embeddings", "tokens", "sr-pairs")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_embedding_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `ctgen.data.embeddings` for `--source embeddings` (shared --out / --overwrite are ours)."""
    from ctgen.data import embeddings

    group = parser.add_argument_group("--source embeddings (T5 embedding cache of a prepared dataset)")
    theirs = embeddings.add_prepare_arguments(argparse.ArgumentParser(add_help=False))
    for action in theirs._actions:  # reuse their definitions so defaults never drift
        if action.dest in ("out", "overwrite", "help"):
            continue
        action.required = False
        group._add_action(action)


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every `prepare` option to `parser`."""
    parser.add_argument("--source", required=True, choices=SOURCES, help="input kind")
    parser.add_argument("--out", required=True, help="output data directory (dataset goes to OUT/ctgen_ct/NAME/1.0.0)")
    parser.add_argument("--name", help="dataset config name (default: <source>_<slices>x<res>x<res>)")
    g = parser.add_argument_group("grid and content")
    g.add_argument("--resolution", type=int, default=128, help="in-plane size H = W (paper: 128; SR data: 512)")
    g.add_argument("--slices", type=int, default=201,
                   help="slices D (paper: 201); 0 keeps the count the --spacing gives (variable)")
    g.add_argument("--spacing", type=_floats, default=None, metavar="DZ,DY,DX",
                   help="resample to this spacing in mm (D,H,W order), then centre-crop/pad to the grid; "
                        "default: resize the whole volume to the grid (GenerateCT)")
    g.add_argument("--even-slices", action="store_true", help="allow an even slice count (CT-ViT needs 1+2k)")
    g.add_argument("--report-fields", default="clinical,technique,findings,impression",
                   help="report sections to keep, comma-separated")
    g.add_argument("--prompt-template", default="paper",
                   help="'paper' ({age} years old {sex}: {impression}), 'findings', or a format string")
    g.add_argument("--no-labels", action="store_true", help="phantoms: do not store label maps")
    s = parser.add_argument_group("splits and run")
    s.add_argument("--validation-fraction", "--split-fraction", type=float, default=0.05, dest="validation_fraction",
                   help="share of patients for validation when the source has no split of its own (default 0.05)")
    s.add_argument("--split-seed", type=int, default=0, help="seed of the patient split")
    s.add_argument("--num-workers", type=int, default=1,
                   help="conversion processes (default 1; 0 converts in this process)")
    s.add_argument("--examples-per-shard", type=int, default=64, help="volumes per array_record shard / resume unit")
    s.add_argument("--strict", action="store_true", help="fail on the first bad input instead of skipping it")
    s.add_argument("--overwrite", action="store_true", help="replace a different or unfinished dataset at the same place")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = parser.add_argument_group("--source phantom")
    p.add_argument("--count", type=int, default=1000, help="number of phantoms (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (phantom i uses (seed, i))")
    p.add_argument("--p-normal", type=float, default=0.3, help="share of phantoms without findings")
    p.add_argument("--supersample", type=int, default=1, metavar="K",
                   help="render each phantom at K times the in-plane resolution and resize it down (antialiased, "
                        "as real CT is prepared): partial-volumed edges, K times less voxel noise; default 1 "
                        "renders on the grid itself (each voxel the tissue at its centre)")
    c = parser.add_argument_group("--source ctrate / dicom / nifti")
    c.add_argument("--root", help="ctrate: CT-RATE's dataset folder (finds *_fixed, reports, metadata); "
                                  "dicom: folder of series; nifti: base of relative paths (default: the CSV's folder)")
    c.add_argument("--volumes", action="append", default=[], help="ctrate: a *_fixed folder (repeatable)")
    c.add_argument("--reports", action="append", default=[], help="ctrate: reports CSV (repeatable); dicom: reports CSV")
    c.add_argument("--metadata", action="append", default=[], help="ctrate: metadata CSV (repeatable)")
    c.add_argument("--hu-mode", default="auto", choices=("auto", "csv", "header", "none"),
                   help="ctrate: how to get HU (auto: header scaling, else CSV slope/intercept for raw values)")
    c.add_argument("--csv", help="nifti: CSV listing the volumes")
    c.add_argument("--path-column", default="path", help="nifti: column with the NIfTI path")
    c.add_argument("--text-column", default=None, help="nifti: report text column (default 'text'); dicom: "
                                                       "impression column (default 'impression' or 'Impressions_EN')")
    c.add_argument("--findings-column", default=None, help="nifti: findings column (optional); dicom: default "
                                                           "'findings' or 'Findings_EN' if present")
    c.add_argument("--clinical-column", default=None, help="dicom: clinical information column (default 'clinical' "
                                                           "or 'ClinicalInformation_EN' if present)")
    c.add_argument("--technique-column", default=None, help="dicom: technique column (default 'technique' or "
                                                            "'Technique_EN' if present)")
    c.add_argument("--id-column", default=None, help="nifti: id column (default: file name)")
    c.add_argument("--patient-column", default=None, help="nifti: patient id column (default: the id)")
    c.add_argument("--age-column", default=None, help="nifti: age column (default 'age'); dicom: age column for "
                                                      "series whose header has no PatientAge (default 'age' or "
                                                      "'PatientAge' if present)")
    c.add_argument("--sex-column", default=None, help="nifti: sex column (default 'sex'); dicom: as --age-column "
                                                      "('sex' or 'PatientSex')")
    c.add_argument("--spacing-column", default="spacing", help="nifti: voxel sizes (i,j,k mm) when headers lack them")
    c.add_argument("--key", default="study", choices=("study", "folder"),
                   help="dicom: match reports by StudyInstanceUID or by top-level folder name")
    c.add_argument("--key-column", default=None, help="dicom: CSV column of the key (StudyInstanceUID / folder)")
    _add_embedding_arguments(parser)
    parser.add_argument("--tokenizer", help="tokens, sr-pairs: the frozen CT-ViT (weights directory, ctvit training "
                                            "workdir, or GenerateCT .pt/.safetensors)")
    from ctgen.data import tokens

    tokens.add_prepare_arguments(parser)
    from ctgen.data import sr_pairs

    sr_pairs.add_prepare_arguments(parser.add_argument_group(
        "--source sr-pairs (CT-ViT reconstructions of a prepared dataset for SR training; also --dataset, --split)"))
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `prepare` on an argparse subparsers object (sets `func=run`)."""
    parser = subparsers.add_parser("prepare", help="prepare a TFDS dataset from CT-RATE, NIfTI, DICOM or phantoms",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    parser.set_defaults(func=run)
    return parser


def _column(name: str | None, default: str) -> str | None:
    """A column option: None (not given) -> `default`; "" -> no column."""
    return default if name is None else (name or None)


def make_source(args: argparse.Namespace, grid):
    from ctgen.data.ctrate import CtRateSource, discover
    from ctgen.data.dicom_source import DicomSource
    from ctgen.data.sources import NiftiCsvSource, PhantomSource
    from ctgen.errors import UserError

    if args.source == "phantom":
        if args.supersample < 1:
            raise UserError(f"--supersample {args.supersample}: give a whole number >= 1 (1 = no supersampling)")
        return PhantomSource(args.count, args.seed, grid, p_normal=args.p_normal, supersample=args.supersample)
    if args.source == "ctrate":
        found = discover(args.root) if args.root else {"volumes": [], "reports": [], "metadata": []}
        return CtRateSource(args.volumes or found["volumes"], args.reports or found["reports"],
                            args.metadata or found["metadata"], hu_mode=args.hu_mode)
    if args.source == "nifti":
        if not args.csv:
            raise UserError("--source nifti needs --csv FILE")
        return NiftiCsvSource(args.csv, args.root, path_column=args.path_column, text_column=args.text_column or "text",
                              findings_column=args.findings_column, id_column=args.id_column,
                              patient_column=args.patient_column, age_column=_column(args.age_column, "age"),
                              sex_column=_column(args.sex_column, "sex"), spacing_column=args.spacing_column or None)
    if args.source == "dicom":
        if not args.root or len(args.reports) != 1:
            raise UserError("--source dicom needs --root DIR and one --reports CSV")
        return DicomSource(args.root, args.reports[0], key=args.key, key_column=args.key_column,
                           text_column=args.text_column, findings_column=args.findings_column,
                           clinical_column=args.clinical_column, technique_column=args.technique_column,
                           age_column=args.age_column, sex_column=args.sex_column)
    raise UserError(f"unknown source {args.source!r}")


def run(args: argparse.Namespace) -> int:
    """Run `prepare` for parsed arguments; returns the exit code."""
    from ctgen.data.features import DatasetConfig
    from ctgen.data.preprocess import GridConfig
    from ctgen.data.writer import build
    from ctgen.errors import UserError

    if args.source == "embeddings":
        from ctgen.data import embeddings

        if not getattr(args, "dataset", None):
            raise UserError("--source embeddings needs --dataset DIR (a prepared dataset's version directory)")
        return embeddings.run_prepare(args)
    if args.source in ("tokens", "sr-pairs"):  # they load the CT-ViT, which the data layer does not import
        raise UserError(f"--source {args.source} runs through `ctgen prepare` (it loads the CT-ViT)")
    slices = args.slices if args.slices > 0 else None
    try:
        grid = GridConfig(shape=(slices, args.resolution, args.resolution),
                          spacing=tuple(args.spacing) if args.spacing else None, odd_slices=not args.even_slices)
        name = args.name or f"{args.source}_{slices or 'var'}x{args.resolution}x{args.resolution}"
        config = DatasetConfig(name=name, grid=grid, report_fields=tuple(f for f in args.report_fields.split(",") if f),
                               prompt_template=resolve_template(args.prompt_template),
                               phantom=args.source == "phantom", keep_labels=not args.no_labels)
    except ValueError as e:
        raise UserError(str(e)) from None
    source = make_source(args, grid)
    summary = build(source, config, args.out, validation_fraction=args.validation_fraction, split_seed=args.split_seed,
                    num_workers=args.num_workers, strict=args.strict, overwrite=args.overwrite,
                    examples_per_shard=args.examples_per_shard, progress=not args.no_progress)
    print(f"{summary['path']}: {summary['counts']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from ctgen.errors import UserError

    parser = configure(argparse.ArgumentParser(prog="python -m ctgen.data.command", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
