"""The `ctgen` command. Subcommands are listed explicitly in `_SUBCOMMANDS`.

Building the parser imports nothing heavy (no JAX, Flax, Orbax, TFDS, grain or torch): each
subcommand imports what it needs inside its run function, so `ctgen <command> --help` is instant.
The CLI resolves the stage (`ctgen.stages.get_stage`) and hands it to the training library.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from ctgen.configuration import ConfigError, load, split_overrides
from ctgen.errors import UserError

TRAIN_HELP = """\
Train one stage with the shared loop.

  ctgen train --config configs/<stage>.py:<variant> --workdir DIR [--config.a.b=value ...]

Every config field can be overridden as --config.<path>=<value> (a mistyped key fails and
suggests the closest keys; use --print-config to see them all). A WORKDIR that already has
checkpoints is resumed from its latest complete checkpoint (parameters, optimizer, RNG and data
position); --config.init_from=DIR warm-starts a new run from DIR's weights: parameters and
non-trainable state such as the VQ codebook, not the optimizer. SIGTERM/Ctrl-C saves a checkpoint
and exits with code 75: run the same command again to resume.

Multi-host: pass --distributed (or set CTGEN_DISTRIBUTED=1) on every host; the coordinator,
process count and id come from --config.distributed.*, CTGEN_COORDINATOR_ADDRESS /
CTGEN_NUM_PROCESSES / CTGEN_PROCESS_ID, or JAX's auto-detection (TPU pods, SLURM).
"""


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a stage (ctvit, maskgit; toy for testing the loop)", description=TRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file and variant, e.g. configs/ctvit.py:tiny")
    p.add_argument("--workdir", required=False, help="run directory (checkpoints, metrics, previews)")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize first")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_run_train)


def _run_train(args, overrides) -> int:
    config = load(args.config, overrides)
    if args.distributed:
        with config.unlocked():
            config.distributed.enabled = True
    if args.print_config:
        print(config)
        return 0
    if not args.workdir:
        raise ConfigError("--workdir is required (where checkpoints, metrics and previews go)")
    from ctgen.parallel.distributed import maybe_initialize
    from ctgen.stages import get_stage
    from ctgen.train.loop import EXIT_PREEMPTED, Preempted, train

    maybe_initialize(config.distributed)  # before the stage touches any device
    stage = get_stage(config)
    try:
        summary = train(config, args.workdir, stage=stage)
    except Preempted as e:
        logging.getLogger("ctgen").warning("%s", e)
        return EXIT_PREEMPTED
    logging.getLogger("ctgen").info("done: step %d in %s", summary["final_step"], args.workdir)
    return 0


EVAL_HELP = """\
Evaluate saved weights with a stage's eval (e.g. CT-ViT reconstruction PSNR/SSIM).

  ctgen eval --config configs/<stage>.py:<variant> --weights DIR [--previews OUT] [--config.a.b=value ...]

DIR is a weights directory (from `ctgen import` or an export) or a training workdir (its latest
checkpoint, with EMA parameters if the config evaluates with EMA). The eval data comes from the
config's data settings, which can be overridden like in `ctgen train`.

Generated volumes against reference volumes (distribution metrics, label-free phantom
measurements, prompt adherence; docs/eval.md):

  ctgen eval --generated DIR --reference DIR [--out DIR] [--features-weights FILE] [--prompts FILE]

Prompt adherence alone (phantom-world rules; prompts from the provenance records `ctgen generate`
wrote into DIR unless --prompts FILE is given):

  ctgen eval --generated DIR [--prompts FILE] [--out DIR]
"""


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate saved weights on held-out data", description=EVAL_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    from ctgen.eval.generated_command import add_arguments

    p.add_argument("--config", help="config file and variant, e.g. configs/ctvit.py:tiny")
    p.add_argument("--weights", help="weights directory or training workdir")
    p.add_argument("--previews", help="also write previews of the first eval batch here")
    p.add_argument("--json", help="write the metrics to this JSON file")
    add_arguments(p.add_argument_group("generated volumes"), required=False)
    p.set_defaults(func=_run_eval)


def _run_eval(args, overrides) -> int:
    import json

    if args.generated or args.reference:
        if not args.generated:
            raise UserError("--reference needs --generated (the directory of generated NIfTI volumes)")
        if args.config or args.weights or overrides:
            raise UserError("--generated/--reference compare volumes; --config, --weights and --config.* "
                            "overrides belong to the other mode of `ctgen eval`")
        from ctgen.eval.generated_command import run

        return run(args)
    if not (args.config and args.weights):
        raise UserError("ctgen eval needs --config and --weights (or --generated and --reference)")
    import jax

    from ctgen.parallel.distributed import maybe_initialize
    from ctgen.stages import get_stage
    from ctgen.train.evaluate import evaluate

    config = load(args.config, overrides)
    maybe_initialize(config.distributed)
    metrics = evaluate(config, args.weights, stage=get_stage(config), previews=args.previews)
    if jax.process_index() != 0:  # every process holds the same global metrics; one reports them
        return 0
    for k, v in metrics.items():
        print(f"{k}: {v:.6g}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    return 0


def _benchmarks_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="run a benchmark script from benchmarks/",
        description="Run benchmarks/bench_<name>.py with the given arguments (source checkout only). "
                    "`ctgen bench` alone lists them; `ctgen bench <name> --help` shows a script's options.")
    p.add_argument("name", nargs="?", help="benchmark name, e.g. checkpoint for bench_checkpoint.py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=_run_bench)


def _run_bench(args, overrides) -> int:
    import runpy

    bench_dir = _benchmarks_dir()
    if not os.path.isdir(bench_dir):
        raise UserError(f"{bench_dir} not found: benchmarks ship with the source checkout (pip install -e .)")
    names = sorted(f[len("bench_"):-3] for f in os.listdir(bench_dir) if f.startswith("bench_") and f.endswith(".py"))
    if not args.name:
        print("benchmarks: " + ", ".join(names))
        return 0
    if args.name not in names:
        raise UserError(f"unknown benchmark {args.name!r}; available: {', '.join(names)}")
    path = os.path.join(bench_dir, f"bench_{args.name}.py")
    sys.argv = [path, *args.args]
    runpy.run_path(path, run_name="__main__")
    return 0


def _add_prepare(sub) -> None:
    from ctgen.data import command

    def run(args, overrides):
        # tokens and sr-pairs need the CT-ViT: model loading lives above the data layer
        if args.source == "tokens":
            from ctgen.stages.maskgit_tokens import run_prepare

            return run_prepare(args)
        if args.source == "sr-pairs":
            from ctgen.stages.superres_pairs import run_prepare

            return run_prepare(args)
        return command.run(args)

    command.add_parser(sub).set_defaults(func=run)


def _add_export_import(sub) -> None:
    # Each model adds its kind under `export` / `import` (e.g. `ctgen export ctvit`).
    from ctgen.convert import ctvit_command, maskgit_command, superres_command

    export = sub.add_parser("export", help="write ctgen weights as a GenerateCT PyTorch state_dict",
                            description="Export ctgen weights for PyTorch users (GenerateCT module layout).")
    exports = export.add_subparsers(dest="what", metavar="<model>", required=True)
    ctvit_command.add_export_parser(exports)
    maskgit_command.add_export_parser(exports)
    superres_command.add_export_parser(exports)
    imp = sub.add_parser("import", help="read GenerateCT PyTorch checkpoints into a ctgen weights directory",
                         description="Import GenerateCT checkpoints (torch.load(weights_only=True), never unpickling "
                                     "objects) into ctgen weights directories.")
    imports = imp.add_subparsers(dest="what", metavar="<model>", required=True)
    ctvit_command.add_import_parser(imports)
    maskgit_command.add_import_parser(imports)
    superres_command.add_import_parser(imports)


def _add_demo(sub) -> None:
    from ctgen import demo

    demo.add_parser(sub)


def _add_generate(sub) -> None:
    from ctgen.generate import command

    command.add_parser(sub)


_SUBCOMMANDS = (_add_prepare, _add_train, _add_eval, _add_generate, _add_export_import, _add_bench, _add_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctgen",
        description="ctgen: GenerateCT (text -> 3-D chest CT) in JAX/Flax. Run `ctgen <command> --help`.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        overrides, rest = split_overrides(argv)
    except ConfigError as e:
        print(f"ctgen: error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(rest)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("absl", "jax._src.xla_bridge", "orbax", "jax._src.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if overrides and args.command not in ("train", "eval", "generate"):
        print("ctgen: error: --config.* overrides apply to `ctgen train`, `ctgen eval` and `ctgen generate`",
              file=sys.stderr)
        return 2
    try:
        return int(args.func(args, overrides) or 0)
    except UserError as e:
        print(f"ctgen: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
