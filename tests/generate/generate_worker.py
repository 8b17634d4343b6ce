"""One process of the two-process `ctgen generate` test: the stand-in cascade, then the command
line as a user runs it; writes which samples it was asked to make to the JSON file argv[1]."""
import json
import sys

import jax

from ctgen.cli import main
from ctgen.generate import cascade

from fake_cascade import FakeCascade

fake = FakeCascade()
cascade.run_cascade = fake
rc = main(["generate", *sys.argv[2:]])
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "calls": fake.calls, "process_index": jax.process_index(),
               "process_count": jax.process_count()}, f)
sys.exit(rc)
