"""`ctgen eval --generated DIR --reference DIR`: the report of `ctgen.eval.report.evaluate_generated`;
without --reference, prompt adherence alone (`evaluate_adherence`).

    python -m ctgen.eval.generated_command --generated gen/ --reference real/ [--features-weights resnet50.pt]
        [--prompts prompts.csv] [--out eval_report/]
    python -m ctgen.eval.generated_command --generated gen/ [--prompts prompts.csv] [--out eval_report/]

Generated volumes that `ctgen generate` has not finished (no complete provenance record, e.g. a
run stopped after the NIfTI was written) are left out with a warning (`report.generated_volumes`).

`add_arguments(parser)` and `run(args)` let the `ctgen` CLI mount the same options.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ctgen.errors import UserError


def _grid(text: str) -> tuple[int, int, int]:
    try:
        grid = tuple(int(v) for v in text.split(","))
    except ValueError:
        grid = ()
    if len(grid) != 3 or min(grid) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers D,H,W, got {text!r}")
    return grid


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> argparse.ArgumentParser:
    """The options of this evaluation; `required=False` when they share a parser with another mode
    (`ctgen eval`, whose config mode takes --config/--weights instead)."""
    parser.add_argument("--generated", required=required, metavar="DIR", help="directory of generated NIfTI volumes")
    parser.add_argument("--reference", metavar="DIR",
                        help="directory of reference NIfTI volumes (without it: prompt adherence only)")
    parser.add_argument("--out", default="eval_report", metavar="DIR",
                        help="where report.json, report.md and the PNG figures go (default: eval_report)")
    parser.add_argument("--features-weights", metavar="FILE",
                        help="ResNet-50 state_dict (.pt/.safetensors, torchvision layout, e.g. RadImageNet) for "
                             "2.5D FID and the volume-level Frechet distance; without it only network-free "
                             "distances are computed")
    parser.add_argument("--prompts", metavar="FILE",
                        help="JSON or CSV pairing generated volume names with their prompts, for prompt adherence "
                             "(default without --reference: the prompts in the provenance records of `ctgen generate`)")
    parser.add_argument("--grid", type=_grid, metavar="D,H,W",
                        help="pad/crop grid of the feature protocol (default: largest extent of both sets)")
    parser.add_argument("--slice-size", type=_positive, metavar="N", help="resize feature slices to NxN (default: native)")
    return parser


def run(args: argparse.Namespace) -> int:
    from ctgen.eval.report import evaluate_adherence, evaluate_generated

    if not args.reference:
        report = evaluate_adherence(args.generated, args.out, prompts=args.prompts)
        ad = report["adherence"]
        print(f"prompt adherence of {report['generated']['scored']} generated volumes{_left_out(report)} "
              f"(phantom-world rules, docs/eval.md): overall accuracy {ad['overall_accuracy']:.3f}")
        for key, v in ad["per_attribute"].items():
            if v["n"]:
                print(f"  {key}: {v['accuracy']:.3f} ({v['correct']}/{v['n']})")
        print(f"report: {report['files']['markdown']}")
        return 0

    report = evaluate_generated(args.generated, args.reference, args.out, feature_weights=args.features_weights,
                                prompts=args.prompts, grid=args.grid, slice_size=args.slice_size)
    m = report["metrics"]
    fn = m["feature_network"]
    print(f"generated {report['generated']['count']} volumes{_left_out(report)}, reference "
          f"{report['reference']['count']} volumes")
    if fn["computed"]:
        print(f"2.5D FID {fn['fid_2p5d']:.4g}, volume-level Frechet distance {fn['volume_frechet']:.4g}")
    else:
        print("2.5D FID: not computed (no --features-weights)")
    print(f"HU Wasserstein-1 {m['hu_histogram']['hu_wasserstein']:.4g} HU, "
          f"HU histogram Frechet distance {m['hu_histogram']['hu_histogram_frechet']:.4g} (no network)")
    if report["adherence"] is not None:
        print(f"prompt adherence: overall accuracy {report['adherence']['overall_accuracy']:.3f}")
    print(f"report: {report['files']['markdown']}")
    return 0


def _left_out(report: dict) -> str:
    n = len(report["generated"].get("unfinished_skipped", ()))
    return f" ({n} unfinished left out)" if n else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m ctgen.eval.generated_command",
                                                   description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"ctgen: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
