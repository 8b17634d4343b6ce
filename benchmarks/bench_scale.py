"""Scale on paper: per-device memory and FLOPs of each stage's training step at GenerateCT's sizes on
8 and 64 devices, from XLA's ahead-of-time compilation on emulated CPU devices (nothing is run).

For each stage (configs/<stage>.py:paper, or :tiny with --tiny), device count, mesh layout and
remat setting, the stage's sharded training step (`ctgen.train.state.make_train_step` +
`jit_train_step`, exactly what `ctgen train` jits, with its donated state) is lowered on abstract
inputs and compiled for a mesh of N emulated CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count=N, one fresh process per N). Reported per device:
  measured  from the compiled program: `memory_analysis()` arguments (split into parameters,
            optimizer state, other state (EMA copies, VQ buffers, step, rng) and batch by summing the
            per-device shard sizes of the train-state and batch trees from their shardings),
            temporaries, outputs not aliased to donated arguments; FLOPs of one step from
            `cost_analysis()`, corrected for while-loop trip counts (_common.py: XLA counts a loop
            body once), and the compile time on this CPU.
            XLA's memory analysis has one figure for all temporaries: activations kept for the
            backward pass, gradients, optimizer-update buffers and workspace are not told apart.
            Where a configuration was compiled with remat on and off, the table adds an estimate
            of activations: temporaries (remat off) - temporaries (remat on), the activations remat
            avoids storing. It understates all activations (what remat keeps, e.g. each block's
            input, is in both rows) and is near zero, even negative, where XLA:CPU saves nothing
            by remat.
  projection  step time on an accelerator at an assumed MFU (bf16 peak x --mfu), and the chip-hours
            and price of the paper's training run (train.steps of the config; phases by
            train.phase_cycle; with a global batch raised for a layout, the step count is scaled to
            keep the number of examples).
conv2d is compiled with XLA's native convolution backward, as on an accelerator: on CPU devices
ctgen would otherwise take its CPU-only im2col weight gradient (`native_conv_backward`).
Compilation uses the test suite's fast XLA:CPU flags (--xla_backend_optimization_level=0
--xla_cpu_use_fusion_emitters=false; the programs never run), 2-3x quicker; --no-fast-compile uses
XLA's defaults (tiny MaskGIT: temporaries +0.03%, FLOPs -0.02%; tiny SR: identical).
Per-device memory comes from XLA:CPU's buffer assignment; a TPU or GPU compilation of the same
program schedules and fuses differently, so read it as an estimate. Configurations whose per-device
total exceeds --hbm-gib (default 16 GiB, a TPU v5e chip) are flagged.

Sizes (paper): CT-ViT 201 x 128 x 128 volumes, batch 4 (both phases of G,G,G,D); MaskGIT the token
grid of 201 slices (101 x 8 x 8) with 256 T5-base text states, batch 8; SR U-Net 512 x 512 slices
from 128 x 128, the paper's micro-batch of 16 slices, 12 accumulated per update (192). A layout whose
batch axes do not divide the batch gets the smallest batch that splits (one example per batch shard;
SR keeps 192 slices per update and accumulates fewer, larger micro-batches), shown in the table.

    python benchmarks/bench_scale.py --tiny --json /tmp/scale_tiny.json
    ctgen bench scale --devices 8 --json bench_results/scale_paper_8.json
    ctgen bench scale --stages maskgit --devices 64 --layouts data8xfsdp8 fsdp64 --remat off
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _common  # noqa: E402  (shared benchmark plumbing)

from ctgen.errors import UserError  # noqa: E402

STAGES = ("ctvit", "maskgit", "superres")
LAYOUTS = {
    8: ("data8", "fsdp8", "data2xfsdp4", "fsdp4xtensor2"),
    64: ("data8xfsdp8", "fsdp64", "fsdp32xtensor2", "data4xfsdp8xtensor2"),
}
# bf16 dense peak per chip and memory per chip (vendor datasheets), and an assumed on-demand price per
# chip-hour (an assumption for the projection, override with --price).
ACCELERATORS = {
    "tpu-v5e": {"name": "TPU v5e", "peak_tflops": 197.0, "hbm_gib": 16.0, "price": 1.20},
    "h100-sxm": {"name": "H100 SXM", "peak_tflops": 989.0, "hbm_gib": 80e9 / 2**30, "price": 3.00},
}
TEXT_WIDTH = {"paper": 768, "tiny": 64}  # T5 v1.1 base (GenerateCT); ctgen's built-in test T5
SR_SCALE = 4  # GenerateCT's 128 -> 512
GIB = 2**30


class ScaleError(UserError):
    """Bad benchmark arguments (one line, exit code 2)."""


# --- layouts and batches --------------------------------------------------------------------------
def parse_layout(spec: str, devices: int) -> dict[str, int]:
    """"data2xfsdp4" -> {"data": 2, "fsdp": 4, "tensor": 1}; the sizes must multiply to `devices`."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    parts = spec.split("x")
    for part in parts:
        m = re.fullmatch(r"(data|fsdp|tensor)(\d+)", part)
        if not m or int(m.group(2)) < 1:
            raise ScaleError(f"layout {spec!r}: write it as mesh axes with sizes joined by 'x', e.g. data2xfsdp4 "
                             "(axes: data, fsdp, tensor)")
        if sizes[m.group(1)] != 1 or parts.count(part) > 1:
            raise ScaleError(f"layout {spec!r}: axis {m.group(1)!r} given twice")
        sizes[m.group(1)] = int(m.group(2))
    if math.prod(sizes.values()) != devices:
        raise ScaleError(f"layout {spec!r} uses {math.prod(sizes.values())} devices, not {devices}")
    return sizes


def layout_batch(batch: int, accum: int, shards: int) -> tuple[int, int]:
    """(global batch, accumulation steps) for a layout whose batch axes split a batch `shards` ways:
    the config's if its micro-batch splits evenly, else the micro-batch is raised to the next
    multiple of `shards`, keeping the global batch where that micro-batch divides it."""
    micro = batch // accum
    if micro % shards == 0:
        return batch, accum
    micro = shards * math.ceil(micro / shards)
    if batch % micro == 0:
        return batch, batch // micro
    return micro * accum, accum


# --- one configuration (child process) -----------------------------------------------------------
def _load_config(stage: str, variant: str):
    from ctgen.configuration import load

    return load(os.path.join(REPO, "configs", f"{stage}.py") + f":{variant}")


def _abstract_batch(stage: str, variant: str, config, batch: int, slices: int) -> dict:
    """Shapes and dtypes of one global batch as the stage's data pipeline delivers it."""
    import numpy as np

    b = batch
    if stage == "ctvit":
        m = config.model
        return {"volume": ((b, config.data.num_slices, m.image_size, m.image_size), np.float32),
                "valid": ((b,), np.bool_)}
    text = (config.data.max_text_length, TEXT_WIDTH[variant])
    if stage == "maskgit":
        tok = _load_config("ctvit", variant)  # the token grid is the CT-ViT's at its training slice count
        m = tok.model
        frames = slices or tok.data.num_slices
        grid = (1 + (frames - 1) // m.temporal_patch_size, m.image_size // m.patch_size, m.image_size // m.patch_size)
        return {"tokens": ((b, *grid), np.int32), "text_embedding": ((b, *text), np.float32),
                "text_mask": ((b, text[0]), np.bool_), "valid": ((b,), np.bool_)}
    low = config.data.lowres_size
    return {"hires": ((b, SR_SCALE * low, SR_SCALE * low), np.float32), "lowres": ((b, low, low), np.float32),
            "text_embedding": ((b, *text), np.float32), "text_mask": ((b, text[0]), np.bool_),
            "slice_index": ((b,), np.int32), "valid": ((b,), np.bool_)}


def _phase_steps(config, phase: str) -> int:
    cycle = list(config.train.phase_cycle)
    return config.train.steps * cycle.count(phase) // len(cycle)


class _WarningCounter:
    """How often XLA's SPMD partitioner wrote "Involuntary full rematerialization" (it replicates a
    tensor to reshard it) to this process's stderr file since the last call (-1 without one)."""

    TEXT = "Involuntary full rematerialization"

    def __init__(self, path: str | None):
        self.path, self.pos = path, 0

    def __call__(self) -> int:
        if not self.path:
            return -1
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(self.pos)
            text = f.read()
            self.pos = f.tell()
        return text.count(self.TEXT)


@contextlib.contextmanager
def native_conv_backward():
    """While tracing: conv2d differentiates through XLA's own convolution, as on a TPU or GPU.

    `ctgen.models.layers.conv2d` picks a blocked im2col weight gradient when
    `jax.default_backend() == "cpu"` (`_blocked_wgrad_backend`), because XLA:CPU's native kernel
    gradient is slow. The programs compiled here are for accelerators and only emulated on CPU
    devices, so the switch is forced off: their memory and FLOPs are those of the native
    convolution backward the accelerator would run (tests/models/test_conv2d.py flips the same
    switch). Restored on exit."""
    from ctgen.models import layers

    saved = layers._blocked_wgrad_backend
    layers._blocked_wgrad_backend = lambda: False
    try:
        yield
    finally:
        layers._blocked_wgrad_backend = saved


def measure(stage_name: str, variant: str, layout: str, remat: bool | None, args,
            warnings=lambda: -1, on_compiled=None) -> list[dict]:
    """Compile one stage's training step(s) for one layout and remat setting; one row per phase.
    `on_compiled(phase, compiled)`, if given, sees each compiled program (tests read its HLO)."""
    import jax

    from ctgen.parallel import axes as axes_lib
    from ctgen.parallel.mesh import batch_shards, make_mesh
    from ctgen.stages import get_stage
    from ctgen.train import state as state_lib

    devices = jax.device_count()
    sizes = parse_layout(layout, devices)
    config = _load_config(stage_name, variant)
    paper_batch, paper_accum = config.train.batch_size, config.train.accum_steps
    if remat is None:  # --remat config: the config's own setting
        remat = bool(config.model.remat)
    config.model.remat = remat
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes["data"], sizes["fsdp"], sizes["tensor"]
    if stage_name == "maskgit":  # the text width otherwise comes from an embedding cache
        config.model.dim_context = TEXT_WIDTH[variant]
    if stage_name == "superres":
        config.model.text_embed_dim = TEXT_WIDTH[variant]
    mesh = make_mesh(config.mesh.to_dict())
    rules = axes_lib.rules_from_config(config.sharding_rules)
    batch, accum = layout_batch(paper_batch, paper_accum, batch_shards(mesh, rules))
    config.train.batch_size, config.train.accum_steps = batch, accum
    stage = get_stage(config)
    if stage_name == "ctvit":
        # The paper step has the perceptual loss and a trainable VGG16; the stage turns them off when
        # no VGG weights are given, which only matters for values, never for the compiled program.
        from ctgen.stages.ctvit import loss_config
        stage.loss_cfg = loss_config(config)
    setup = state_lib.setup_from_config(config, mesh, stage)
    shapes = _abstract_batch(stage_name, variant, config, batch, args.slices)
    local = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
    shardings = state_lib.batch_shardings_for(local, setup)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in local.items()}
    state = setup.abstract
    split = {"params": _common.tree_bytes(state["params"]), "opt": _common.tree_bytes(state["opt"]),
             "other": _common.tree_bytes({k: v for k, v in state.items() if k not in ("params", "opt")}),
             "batch": _common.tree_bytes(abstract_batch)}
    rows = []
    for phase in setup.phases:
        if args.phases and phase not in args.phases:
            continue
        fn = state_lib.make_train_step(setup, phase, accum, len(setup.phases) > 1)
        jitted = state_lib.jit_train_step(setup, fn, shardings)
        t0 = time.perf_counter()
        with jax.set_mesh(mesh), native_conv_backward():
            lowered = jitted.lower(state, abstract_batch)
        compiled = lowered.compile()
        seconds = time.perf_counter() - t0
        if on_compiled is not None:
            on_compiled(phase, compiled)
        spmd_warnings = warnings()
        mem = compiled.memory_analysis()
        flops = _common.compiled_flops(compiled)
        out_free = mem.output_size_in_bytes - mem.alias_size_in_bytes
        rows.append({
            "stage": stage_name, "variant": variant, "phase": phase, "devices": devices, "layout": layout,
            "mesh": sizes, "remat": remat, "batch": batch, "accum_steps": accum, "config_batch": paper_batch,
            "config_accum_steps": paper_accum, "batch_shapes": {k: list(s) for k, (s, _) in shapes.items()},
            "phase_steps": _phase_steps(config, phase), "config_steps": config.train.steps,
            "param_count": sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"])),
            "per_device_bytes": {
                "params": split["params"], "opt_state": split["opt"], "other_state": split["other"],
                "batch": split["batch"], "arguments": mem.argument_size_in_bytes,
                "temporaries": mem.temp_size_in_bytes, "outputs": mem.output_size_in_bytes,
                "aliased": mem.alias_size_in_bytes, "outputs_not_aliased": out_free,
                "total": mem.argument_size_in_bytes + mem.temp_size_in_bytes + out_free},
            "flops_per_device": flops["flops"], "xla_cost_analysis_flops": flops["xla"],
            "dot_conv_flops": flops["dot_conv"], "loops_without_trip_count": flops["unknown_loops"],
            "compile_seconds": seconds, "spmd_full_remat_warnings": spmd_warnings,
        })
    return rows


def _child(args) -> int:
    import jax

    variant = "tiny" if args.tiny else "paper"
    if jax.device_count() != args.child:
        print(f"FAILED this process has {jax.device_count()} devices, expected {args.child}", flush=True)
        return 1
    warnings = _WarningCounter(args.stderr_log)
    for stage in args.stages:
        for layout in args.layouts or LAYOUTS[args.child]:
            for remat in args.remat_values:
                warnings()  # skip what model building wrote
                try:
                    rows = measure(stage, variant, layout, remat, args, warnings)
                except Exception as e:  # noqa: BLE001 - reported per configuration, the others go on
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    rows = [{"stage": stage, "variant": variant, "devices": args.child, "layout": layout,
                             "remat": remat, "error": f"{type(e).__name__}: {first[:500]}"}]
                for row in rows:
                    print("ROW " + json.dumps(row), flush=True)
    return 0


# --- driver ---------------------------------------------------------------------------------------
def _child_env(devices: int, fast: bool) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).split()
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    if fast:
        for k, v in (("xla_backend_optimization_level", "0"), ("xla_cpu_use_fusion_emitters", "false")):
            if k not in " ".join(flags):
                flags.append(f"--{k}={v}")
    env["XLA_FLAGS"] = " ".join(flags)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_devices(devices: int, args, on_row) -> None:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(devices), "--stages", *args.stages,
           "--remat", args.remat, "--slices", str(args.slices)]
    if args.tiny:
        cmd.append("--tiny")
    if args.layouts:
        cmd += ["--layouts", *args.layouts]
    if args.phases:
        cmd += ["--phases", *args.phases]
    # The child's stderr goes to a file, not a pipe: XLA's SPMD partitioner can write megabytes of
    # warnings, which would fill a pipe nobody reads while the child runs. The child counts them.
    with tempfile.NamedTemporaryFile("w+", prefix="bench_scale_stderr_", suffix=".log") as log:
        cmd += ["--stderr-log", log.name]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                env=_child_env(devices, args.fast_compile))
        for line in proc.stdout:
            if line.startswith("ROW "):
                on_row(json.loads(line[4:]))
            elif line.startswith("FAILED "):
                on_row({"devices": devices, "error": line[7:].strip()})
        if proc.wait() != 0:
            log.seek(0)
            tail = " | ".join(log.read().strip().splitlines()[-3:])
            on_row({"devices": devices, "error": f"child exit {proc.returncode}: {tail[-800:]}"})


def project(row: dict, acc: dict, mfu: float, price: float) -> dict:
    """Projected step time and run cost of one measured row on accelerator `acc` (labelled)."""
    rate = acc["peak_tflops"] * 1e12 * mfu
    step_s = row["flops_per_device"] / rate
    # a raised layout batch processes more examples per step: scale the run's steps to the same examples
    steps = row["phase_steps"] * row["config_batch"] / row["batch"]
    chip_hours = step_s * steps * row["devices"] / 3600
    return {"accelerator": acc["name"], "assumed_mfu": mfu, "peak_tflops_bf16": acc["peak_tflops"],
            "price_per_chip_hour": price, "step_seconds": step_s, "run_steps": steps,
            "run_wall_hours": step_s * steps / 3600, "run_chip_hours": chip_hours, "run_cost": chip_hours * price}


def _amount(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def _gib(b: float) -> str:
    return f"{b / GIB:.3g}"


def _mesh_name(row) -> str:
    return row["layout"] + ("" if row.get("remat") else " (no remat)") if "layout" in row else "?"


def _run_table(good: list[dict], acc: dict) -> str:
    """The paper's whole training run per stage, device count, layout and remat (all phases summed)."""
    runs: dict[tuple, list[dict]] = {}
    for r in good:
        runs.setdefault((r["stage"], r["devices"], r["layout"], r["remat"]), []).append(r)
    table = []
    for (stage, devices, layout, remat), rs in runs.items():
        p = [r["projection"] for r in rs]
        steps = " + ".join(f"{q['run_steps']:,.0f} {r['phase']}" for r, q in zip(rs, p))
        table.append([stage, devices, layout, "on" if remat else "off", steps,
                      f"{sum(q['run_wall_hours'] for q in p) / 24:.3g}", _amount(sum(q['run_chip_hours'] for q in p)),
                      _amount(sum(q['run_cost'] for q in p))])
    return (f"Paper training run, projection on {acc['name']} (every compiled phase; steps from the config):\n\n"
            + _common.markdown_table(["stage", "devices", "layout", "remat", "steps", "wall days (projection)",
                                      "chip-hours (projection)", "$ (projection)"], table))


def add_activation_estimates(rows: list[dict]) -> None:
    """`activations_estimate_bytes` on each row compiled both with and without remat (same stage,
    phase, devices and layout): temporaries without remat - temporaries with it (module docstring)."""
    temps = {}
    for r in rows:
        if "error" not in r:
            key = (r["stage"], r["phase"], r["devices"], r["layout"], r["remat"])
            temps[key] = r["per_device_bytes"]["temporaries"]
    for r in rows:
        if "error" not in r:
            key = (r["stage"], r["phase"], r["devices"], r["layout"])
            off, on = temps.get(key + (False,)), temps.get(key + (True,))
            r["activations_estimate_bytes"] = None if off is None or on is None else off - on


def markdown(rows: list[dict], args, acc: dict) -> str:
    good = [r for r in rows if "error" not in r]
    add_activation_estimates(good)
    head = ["stage", "phase", "devices", "layout", "remat", "batch (accum)", "params GiB", "opt GiB",
            "other GiB", "batch GiB", "temps GiB", "activations GiB (temps remat off - on, estimate)",
            "outputs GiB", "total GiB", f"> {args.hbm_gib:g} GiB",
            "TFLOP/step/device", "XLA cost_analysis TFLOP", "compile s", "SPMD full-remat warnings",
            f"step s on {acc['name']} (projection)", "run chip-h (projection)", "run $ (projection)"]
    table = []
    for r in good:
        b, p = r["per_device_bytes"], r["projection"]
        table.append([r["stage"], r["phase"], r["devices"], r["layout"], "on" if r["remat"] else "off",
                      f"{r['batch']} ({r['accum_steps']})", _gib(b["params"]), _gib(b["opt_state"]),
                      _gib(b["other_state"]), _gib(b["batch"]), _gib(b["temporaries"]),
                      "–" if r.get("activations_estimate_bytes") is None else _gib(r["activations_estimate_bytes"]),
                      _gib(b["outputs_not_aliased"]), _gib(b["total"]), "**yes**" if r["over_hbm"] else "no",
                      f"{r['flops_per_device'] / 1e12:.4g}", f"{r['xla_cost_analysis_flops'] / 1e12:.4g}",
                      f"{r['compile_seconds']:.0f}", r.get("spmd_full_remat_warnings", "–"),
                      f"{p['step_seconds']:.3g}", _amount(p["run_chip_hours"]), _amount(p["run_cost"])])
    out = [_common.markdown_table(head, table), "", _run_table(good, acc)]
    for r in rows:
        if "error" in r:
            out.append(f"- FAILED {r.get('stage', '')} {r.get('layout', '')} devices={r.get('devices')} "
                       f"remat={r.get('remat')}: {r['error']}")
    out.append("")
    out.append(f"Measured: per-device bytes from XLA:CPU `memory_analysis()` of the compiled step (total = arguments "
               f"+ temporaries + outputs not aliased to donated arguments; temporaries are one figure: activations, "
               f"gradients and workspace together; the activations column, where both remat settings were compiled, "
               f"is temporaries without remat - with remat: the activations remat avoids storing, fewer than all), "
               f"conv2d with the native convolution backward (as on an accelerator), FLOPs per device from "
               f"`cost_analysis()` "
               f"corrected for while-loop trip counts. Projection: step s = FLOPs per device / ({acc['peak_tflops']:g} "
               f"TFLOP/s bf16 x assumed MFU {args.mfu:.0%}); run = the config's steps of that phase (scaled to the same "
               f"examples when the batch was raised) x step s x devices; $ at an assumed {args.price or acc['price']:.2f} "
               f"per chip-hour. The programs are float32 as configured; the projection assumes bf16-rate matmuls.")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny presets on 8 devices (the smoke test)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--devices", nargs="+", type=int, default=None, help="device counts (default: 8 64; --tiny: 8)")
    ap.add_argument("--layouts", nargs="+", help="mesh layouts such as data2xfsdp4 (default: four per device count)")
    ap.add_argument("--remat", default="both", choices=("both", "on", "off", "config"),
                    help="compile with and without remat (both), one of them, or as the config has it")
    ap.add_argument("--phases", nargs="+", help="only these phases (e.g. generator); default: every phase")
    ap.add_argument("--slices", type=int, default=0, help="MaskGIT: slices of the token grid (default: the CT-ViT "
                                                          "config's, 201 for paper)")
    ap.add_argument("--accelerator", default="tpu-v5e", choices=sorted(ACCELERATORS))
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation for projections")
    ap.add_argument("--price", type=float, default=0.0, help="assumed price per chip-hour (default: the "
                                                             "accelerator's listed assumption)")
    ap.add_argument("--hbm-gib", type=float, default=16.0, help="flag configurations above this per-device total")
    ap.add_argument("--no-fast-compile", dest="fast_compile", action="store_false",
                    help="compile with XLA:CPU's default LLVM optimisation and fusion emitters (2-3x slower to "
                         "compile; memory and FLOPs agreed within 0.1%% in a check on the tiny presets)")
    ap.add_argument("--json", help="write the rows and settings here")
    ap.add_argument("--markdown", help="write the table here")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--stderr-log", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.remat_values = {"both": (True, False), "on": (True,), "off": (False,), "config": (None,)}[args.remat]
    if args.child:
        return _child(args)
    _check(args)
    acc = ACCELERATORS[args.accelerator]
    price = args.price or acc["price"]
    devices = args.devices or ([8] if args.tiny else [8, 64])
    print(f"scale benchmark ({'tiny' if args.tiny else 'paper'} presets): stages {' '.join(args.stages)}; devices "
          f"{devices}; remat {args.remat}; projections on {acc['name']} at assumed MFU {args.mfu:.0%}, "
          f"{price:.2f} per chip-hour; machine load avg {os.getloadavg()[0]:.2f}", flush=True)
    rows: list[dict] = []
    started = time.time()

    def save():
        if args.json:
            _common.write_json(args.json, {"benchmark": "scale", "variant": "tiny" if args.tiny else "paper",
                                           "command": [os.path.basename(sys.argv[0])] + list(argv or sys.argv[1:]),
                                           "machine": _common.machine_info(), "hbm_gib": args.hbm_gib,
                                           "accelerator": acc, "assumed_mfu": args.mfu, "price_per_chip_hour": price,
                                           "seconds": time.time() - started, "rows": rows})

    def on_row(row):
        if "error" not in row:
            row["over_hbm"] = row["per_device_bytes"]["total"] > args.hbm_gib * GIB
            row["projection"] = project(row, acc, args.mfu, price)
            b = row["per_device_bytes"]
            print(f"  {row['stage']:8s} {row['phase']:13s} {row['devices']:3d} {row['layout']:20s} remat="
                  f"{'on ' if row['remat'] else 'off'} total {_gib(b['total'])} GiB (temps {_gib(b['temporaries'])})"
                  f"{' OVER ' + format(args.hbm_gib, 'g') + ' GiB' if row['over_hbm'] else ''}  "
                  f"{row['flops_per_device'] / 1e12:.4g} TFLOP/device  compiled in {row['compile_seconds']:.0f} s",
                  flush=True)
        else:
            print(f"  FAILED {row.get('stage', '')} {row.get('layout', '')} devices={row.get('devices')}: "
                  f"{row['error']}", flush=True)
        rows.append(row)
        save()

    for n in devices:
        run_devices(n, args, on_row)
    text = markdown(rows, args, acc)
    print()
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    save()
    return 1 if any("error" in r for r in rows) else 0


def _check(args) -> None:
    if args.tiny and args.devices and args.devices != [8]:
        raise ScaleError("--tiny runs on 8 devices; leave --devices out")
    for n in args.devices or []:
        if n < 1:
            raise ScaleError(f"--devices {n}: a device count must be positive")
        if not args.layouts and n not in LAYOUTS:
            raise ScaleError(f"--devices {n} has no default layouts; give --layouts (e.g. fsdp{n})")
    for n in args.devices or ([8] if args.tiny else [8, 64]):
        for spec in args.layouts or []:
            parse_layout(spec, n)
    if not 0 < args.mfu <= 1:
        raise ScaleError(f"--mfu {args.mfu}: give a fraction in (0, 1]")
    if args.price < 0:
        raise ScaleError(f"--price {args.price} must not be negative")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:  # bad arguments: one line, exit code 2
        print(f"bench_scale: error: {e}", file=sys.stderr)
        sys.exit(2)
