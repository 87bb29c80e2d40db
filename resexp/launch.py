"""`resexp train --nproc-per-node=N ...`: one run over N processes, started as torchrun starts them, with
what the user sees resexp's own: one line and resexp's exit code for a refusal, a stop or a lost process.

`torchrun ... -m resexp train` works too, but torchrun answers any process that ends otherwise than with
0 by a report of its own and exit code 1 (ChildFailedError), and a SIGTERM to it by its SignalException's
traceback. Here torchrun's launch (torch.distributed.run.run, the same code and flags) runs inside resexp:
its logs are quiet, each process writes its one line into the error file torchrun gives it
(TORCHELASTIC_ERROR_FILE, which torchrun's own report also shows) instead of printing it, and this
process prints one line from them: what the first process to fail said (a refusal), or, where a signal
killed it, which rank that was and what the lowest rank here said (the command that resumes); after a
stop, what the lowest rank said. Its exit code is the first failed process's, or the stop's: 2 for bad
input, 1 for a lost process, 128 + N for signal N.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

# torchrun's flags that `resexp train` takes (the rest of torchrun's would mean something else to Hydra's
# parser: -m is Hydra's multirun), each followed by its value unless it is a switch.
FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id",
         "--rdzv-conf", "--master-addr", "--master-port", "--max-restarts", "--monitor-interval", "--local-addr")  # fmt: skip
SWITCHES = ("--standalone",)
LAUNCHED = "RESEXP_TORCHRUN"  # set for the processes: torchrun's flags as given, for the resume commands


def split(args: list[str]) -> tuple[list[str], list[str]]:
    """torchrun's flags among `resexp train`'s arguments (underscores or dashes), and the rest."""
    flags, rest, pending = [], [], False
    for arg in args:
        name = arg.split("=", 1)[0].replace("_", "-")
        if pending:
            flags.append(arg)
            pending = False
        elif name in FLAGS or name in SWITCHES:
            flags.append(arg)
            pending = name in FLAGS and "=" not in arg
        else:
            rest.append(arg)
    return flags, rest


def error_file_line(message: str) -> None:
    """Under torchrun, `message` (what the process would print) in the error file torchrun gives it."""
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with open(path, "w") as file:  # torchrun's own file in its own folder: no run directory's
            json.dump({"message": message, "timestamp": int(time.time())}, file)


def quiet() -> bool:
    """Whether this process is one that `resexp train --nproc-per-node` started: it prints no line of its
    own, the launching process prints one for all."""
    return LAUNCHED in os.environ and "RANK" in os.environ


def lines(log_dir: Path) -> dict[int, str]:
    """What each local process wrote into its error file, by local rank."""
    found = {}
    for path in log_dir.glob("*/attempt_*/*/error.json"):
        try:
            message = json.loads(path.read_text())["message"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(message, str) and path.parent.name.isdigit():
            found[int(path.parent.name)] = message
    return found


def exit_code(code: int) -> int:
    """A process's exit code as a shell says it: a signal N as 128 + N."""
    return 128 - code if code < 0 else code


def first_failure(failures: dict[int, Any]) -> tuple[int, Any]:
    """The (rank, failure) among torchrun's `failures` (its ProcessFailures) that says why the run ended.

    A process killed from outside (a signal other than torchrun's own SIGTERM to the rest) is what the others'
    lost peer was, whichever exit torchrun saw first. Else the earliest process that ended of itself (an exit
    code > 0: a refusal, a lost peer): torchrun's SIGTERM can reach a process that was refusing too, and
    torchrun's timestamps are whole seconds, so "earliest" alone would often name the one it killed."""
    ranks = sorted(failures)
    outside = [r for r in ranks if failures[r].exitcode < 0 and failures[r].exitcode != -signal.SIGTERM]
    ended = [r for r in ranks if failures[r].exitcode > 0]
    rank = outside[0] if outside else min(ended or ranks, key=lambda r: failures[r].timestamp)
    return rank, failures[rank]


def meeting_point(flags: list[str]) -> list[str]:
    """torchrun's flags, with a free --master-port where they give one node and no meeting point: torchrun's
    default is a fixed port (29500), on which two runs started on one machine would meet each other. Its
    static rendezvous stays (--standalone's c10d store prints the C++ store's warnings when a stop ends it)."""
    where = ("--nnodes", "--rdzv-endpoint", "--rdzv-backend", "--master-addr", "--master-port", *SWITCHES)
    if any(flag.split("=", 1)[0].replace("_", "-") in where for flag in flags):
        return flags
    with socket.socket() as probe:  # a port free now; torchrun binds it at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [*flags, f"--master-port={port}"]


def torchrun(flags: list[str], rest: list[str]) -> NoReturn:
    """Train one run over the processes `flags` ask for (torchrun's), then exit as the run ended."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.root.manager.loggerDict):  # each has a level of its own (LOGLEVEL's)
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # its notes on each exit: the line below says it
    os.environ[LAUNCHED] = " ".join(flags)
    flags = meeting_point(flags)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's choice for its processes, without its banner
    log_dir = Path(tempfile.mkdtemp(prefix="resexp-torchrun-"))
    code, killed, first_local = 0, [], None
    try:
        run(parse_args([*flags, "--log-dir", str(log_dir), "--module", "resexp", "train", *rest]))
    except ChildFailedError as error:
        rank, first = first_failure(error.failures)
        code, first_local = exit_code(first.exitcode), first.local_rank
        if first.exitcode < 0:  # killed from outside (the OOM killer, a SIGKILL): it could say nothing itself
            killed = [f"rank {rank} was killed by {first.signal_name()}"]
    except SignalException as stop:  # a stop asked of this process, which torchrun passed to every process
        code = 128 + stop.sigval
    finally:
        said = lines(log_dir)
        shutil.rmtree(log_dir, ignore_errors=True)
    # the first failed process's own line, else the lowest local rank's (rank 0's, on its node)
    line = said.get(first_local) or (said[min(said)] if said else None)
    told = [*killed, *([line] if line else [])]
    if told:
        print(f"resexp: {'; '.join(told)}", file=sys.stderr)
    sys.exit(code)


def lost_peer(error: BaseException) -> str | None:
    """What a collective's error says in a few words, where it was raised because another process of the
    run ended or was lost (gloo's or NCCL's: torch's DistError, or a RuntimeError naming them); None for
    any other error."""
    import torch.distributed as dist

    text = str(error)
    if not isinstance(error, getattr(dist, "DistError", ())) and not (
        isinstance(error, RuntimeError) and re.search(r"gloo|NCCL|by peer", text)
    ):
        return None
    said = re.search(r"Connection (reset|closed) by peer|[Tt]imed? ?out[^.;]*", text)
    return said[0] if said else text.strip().splitlines()[0][:200]
