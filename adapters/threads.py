"""One thread of torch intra-op parallelism per process: what a server's start-up must not break.

torch runs intra-op parallel work on OpenMP (libgomp). Every thread that runs a parallel op gets its own team of
worker threads. Once a process manages more OpenMP threads than it has CPUs, libgomp stops letting idle workers
spin (its "throttled" spin count), and each later parallel region waits for sleeping workers to wake: on 2 cores
the engine thread's matmuls then run at about one core's speed.

A server loads its model and SAEs on the main thread and serves on its engine thread. Any parallel op during
start-up (an SAE stored in fp16 converted to fp32, a weight copied) gave the main thread a team of its own, and
every request from then on ran 15-40% slower (measured: the engine thread's second worker used a quarter of the
CPU time it used in a server whose main thread never ran one; bench/results/idle_sae.json). `one_thread()`
around start-up keeps the main thread's ops inline, so the engine thread's team is the process's only one.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch ops inside run on the calling thread alone (no OpenMP team is started for it); the thread count
    is restored on the way out, for threads that start parallel work later (the engine thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
