"""bench_scale compiles programs meant for accelerators on emulated CPU devices: conv2d must take XLA's
native convolution backward there, not ctgen's CPU-only im2col weight gradient; the activation
estimate pairs remat-on and remat-off rows."""
import collections
import os
import re
import sys
import types

import jax
import jax.numpy as jnp
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_scale  # noqa: E402

from ctgen.models import layers  # noqa: E402

_CONV = re.compile(r"= f32\[([\d,]+)\]\S* convolution\(")


def _kernel_grad_convs(compiled) -> list[tuple[int, int]]:
    """(in, out) channels of every convolution in the compiled HLO whose output is a 3x3 kernel
    gradient (XLA lays it out as [in, 3, 3, out]): the native weight gradient. The im2col path
    computes it with a dot instead, so it has none."""
    found = []
    for m in _CONV.finditer(compiled.as_text()):
        dims = [int(d) for d in m.group(1).split(",")]
        if len(dims) == 4 and dims[1:3] == [3, 3]:
            found.append((dims[0], dims[3]))
    return found


def test_native_conv_backward_switch():
    """The detector tells the two paths apart on one convolution, and the context flips and restores."""
    x = jnp.ones((2, 8, 8, 4))
    kernel = jnp.ones((3, 3, 4, 5))

    def compiled_grad():
        return jax.jit(jax.grad(lambda k: jnp.sum(layers.conv2d(x, k, None, 1) ** 2))).lower(kernel).compile()

    assert jax.default_backend() == "cpu" and layers._blocked_wgrad_backend()
    assert _kernel_grad_convs(compiled_grad()) == []  # im2col on CPU
    with bench_scale.native_conv_backward():
        assert not layers._blocked_wgrad_backend()
        assert _kernel_grad_convs(compiled_grad()) == [(4, 5)]
    assert layers._blocked_wgrad_backend()


def test_scale_sr_step_takes_native_conv_backward():
    """bench_scale's compiled SR training step (tiny preset, 8 devices, data8: kernels replicated)
    computes every 3x3 kernel's gradient as a native convolution."""
    from ctgen.models.unet import UNet, UNetConfig

    programs = {}
    args = types.SimpleNamespace(slices=0, phases=None)
    rows = bench_scale.measure("superres", "tiny", "data8", None, args,
                               on_compiled=lambda phase, compiled: programs.setdefault(phase, compiled))
    assert [r["phase"] for r in rows] == list(programs) and len(programs) == 1
    cfg = bench_scale._load_config("superres", "tiny").model.to_dict()
    cfg["text_embed_dim"] = bench_scale.TEXT_WIDTH["tiny"]
    model = nnx.eval_shape(lambda: UNet(UNetConfig.from_dict(cfg), rngs=nnx.Rngs(0)))
    kernels = [x.shape for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if x.ndim == 4 and x.shape[:2] == (3, 3)]
    assert len(kernels) > 10
    (compiled,) = programs.values()
    assert collections.Counter(_kernel_grad_convs(compiled)) == collections.Counter((k[2], k[3]) for k in kernels)
    assert layers._blocked_wgrad_backend()  # restored after compiling


def test_activation_estimate_pairs_remat_rows():
    def row(stage, layout, remat, temps):
        return {"stage": stage, "phase": "main", "devices": 8, "layout": layout, "remat": remat,
                "per_device_bytes": {"temporaries": temps}}

    rows = [row("maskgit", "fsdp8", True, 100), row("maskgit", "fsdp8", False, 350), row("maskgit", "data8", True, 80),
            row("superres", "fsdp8", False, 500), {"stage": "ctvit", "error": "x"}]
    bench_scale.add_activation_estimates(rows)
    assert [r.get("activations_estimate_bytes") for r in rows] == [250, 250, None, None, None]
