"""One process of the two-process test:
`python multihost_worker.py WORKDIR LOG.json steps stop_after TEACHER_WEIGHTS`.

jax.distributed is initialised from CTGEN_* environment variables, as `ctgen train
--distributed` does; the process records which examples it read. The toy stage's frozen teacher
is restored over both processes' devices and used by eval and by previews, which run on every
process (process 0 writes them)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from ctgen.parallel.distributed import maybe_initialize  # noqa: E402

maybe_initialize(None)

from ctgen.train.loop import train  # noqa: E402

from helpers import RecordingToyStage, toy_config  # noqa: E402

workdir, log_path, teacher = sys.argv[1], sys.argv[2], sys.argv[5]
steps, stop_after = int(sys.argv[3]), int(sys.argv[4])
cfg = toy_config("two_phase", **{"train.steps": steps, "train.stop_after_steps": stop_after,
                                 "train.checkpoint_every": 4, "train.batch_size": 16, "train.eval_every": 4,
                                 "train.preview_every": 4, "teacher.weights": teacher})
with cfg.unlocked():
    cfg.mesh.update({"data": 2, "fsdp": 4, "tensor": 1})
log = []
out = train(cfg, workdir, RecordingToyStage(cfg, log))
kernel = out["state"]["params"]["mid"]["kernel"][...]
info = {
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "devices": jax.device_count(),
    "local_devices": jax.local_device_count(),
    "start_step": out["start_step"],
    "final_step": out["final_step"],
    "batches": log,
    "shard_shape": list(kernel.addressable_shards[0].data.shape),
    "eval": out.get("eval"),
}
with open(log_path, "w") as f:
    json.dump(info, f)
