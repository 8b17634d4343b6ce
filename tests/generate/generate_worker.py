"""One process of the two-process `ctgen generate` tests: the command line as a user runs it, with
the stand-in cascade unless argv[2] is `--real-cascade`; writes which samples it was asked to make
(stand-in only) to the JSON file argv[1]. $CTGEN_TEST_SHUTDOWN_TIMEOUT shortens how long
jax.distributed lets a finished process wait for the others at exit (then it aborts them all)."""
import functools
import json
import os
import sys

import jax

from ctgen.cli import main
from ctgen.generate import cascade

from fake_cascade import FakeCascade

if "CTGEN_TEST_SHUTDOWN_TIMEOUT" in os.environ:  # jax.distributed's exit barrier (default 300 s)
    jax.distributed.initialize = functools.partial(
        jax.distributed.initialize, shutdown_timeout_seconds=int(os.environ["CTGEN_TEST_SHUTDOWN_TIMEOUT"]))
real = sys.argv[2:3] == ["--real-cascade"]
fake = None if real else FakeCascade()
if fake is not None:
    cascade.run_cascade = fake
rc = main(["generate", *sys.argv[3 if real else 2:]])
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "calls": fake.calls if fake is not None else None, "process_index": jax.process_index(),
               "process_count": jax.process_count()}, f)
sys.exit(rc)
