"""Two gloo ranks on CPU for the DDP and FSDP tests, with a teardown torch's exit race cannot abort.

``spawn_ranks(worker, out_dir)`` runs ``worker(rank, init_file, out_dir)`` in ``WORLD``
processes; a worker calls ``run_rank(body, rank, init_file, out_dir)``, which runs
``body(rank, out_dir)`` in a process group and leaves without interpreter finalization.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def run_rank(body: Callable[[int, str], None], rank: int, init_file: str, out_dir: str) -> None:
    """One rank: ``body(rank, out_dir)`` in a gloo group, then a teardown that leaves no
    process-group work for interpreter exit.

    DDP and FSDP modules sit in reference cycles, so without ``gc.collect()`` they (and the gloo
    work they hold) are freed during interpreter finalization, where a gloo worker thread
    that drops the last reference to a tensor with a Python object must take the GIL:
    CPython ends that thread with a forced unwind, which crosses a noexcept frame -> "terminate
    called without an active exception" (SIGABRT; torch's, pytorch/pytorch#190489). So: the
    DDP/FSDP objects are collected while the interpreter is alive, every rank passes a barrier
    before any closes its connections, and a rank that succeeded leaves with ``os._exit(0)``
    (its results are on disk), skipping finalization.
    """
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        body(rank, out_dir)  # returns no DDP object: all of them are garbage from here
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(worker: Callable[[int, str, str], None], out_dir: str) -> None:
    """``mp.spawn`` the two ranks; once, on a rank killed by SIGABRT, again.

    A rank once died with "terminate called without an active exception" (SIGABRT) on an
    Intel host and passed on rerun, and in session 8's CI an FSDP rank did the same: torch's interpreter-exit race, which ``run_rank`` now
    keeps out of the ranks (see there). The retry stays for whatever else torch/gloo teardown
    may do; a second SIGABRT fails the test.
    """
    for attempt in range(2):
        init = os.path.join(out_dir, f"init{attempt}")
        try:
            mp.spawn(worker, args=(init, out_dir), nprocs=WORLD, join=True)
            return
        except mp.ProcessExitedException as exc:
            if attempt or exc.exit_code != -signal.SIGABRT:
                raise
            warnings.warn(f"rank aborted in teardown ({exc}); retrying once", stacklevel=2)
