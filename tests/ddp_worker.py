"""`resexp train` as the distributed tests run it, under torchrun or alone, with three instruments set by
environment variables (each off unless set):

    RESEXP_TEST_FLOAT64=1        the net and torch's default float type in float64: a reference computation
    RESEXP_TEST_WEIGHTS=DIR      each rank writes its final weights to DIR/rank<R>.pt
    RESEXP_TEST_STEP_SECONDS=S   each training step waits S seconds first: a run slow enough to stop
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import torch

from resexp import cli, distributed, jobs, train
from resexp.models import NetSpec

if os.environ.get("RESEXP_TEST_FLOAT64"):
    build = NetSpec.build

    def in_float64(spec):  # the same initial weights as in float32 (float64 draws take other random numbers)
        torch.set_default_dtype(torch.float32)
        try:
            return build(spec).double()
        finally:
            torch.set_default_dtype(torch.float64)

    NetSpec.build = in_float64
    torch.set_default_dtype(torch.float64)

if folder := os.environ.get("RESEXP_TEST_WEIGHTS"):
    loop = jobs.train_loop

    @functools.wraps(loop)
    def keeping_weights(model, *args, **kwargs):
        summary = loop(model, *args, **kwargs)
        torch.save(model.state_dict(), Path(folder) / f"rank{distributed.WORLD.rank}.pt")
        return summary

    jobs.train_loop = keeping_weights

if seconds := float(os.environ.get("RESEXP_TEST_STEP_SECONDS", 0)):
    to_device = train.to_device

    def slowly(*args):
        time.sleep(seconds)
        return to_device(*args)

    train.to_device = slowly

if __name__ == "__main__":
    cli.main(sys.argv[1:])
