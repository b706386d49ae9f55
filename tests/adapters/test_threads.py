"""Start-up torch work starts no OpenMP team on the calling thread (adapters/threads.py): a second team made
every later request of a server 15-40% slower on 2 cores."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import os, sys, threading, torch
from saelora.adapters.threads import one_thread
threads = lambda: len(os.listdir("/proc/self/task"))
before, n0 = threads(), torch.get_num_threads()
if sys.argv[1] == "one_thread":
    with one_thread():
        torch.randn(4_000_000).half().float()  # a parallel op (fp16 -> fp32, as an fp16 SAE's load)
else:
    torch.randn(4_000_000).half().float()
after = threads()
seen = []
t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
t.start(); t.join()
print(after - before, seen[0], torch.get_num_threads(), n0)
"""


def _run(mode: str) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(x) for x in out.stdout.split()]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="OpenMP starts no worker threads on one CPU")
def test_one_thread_starts_no_openmp_team_and_restores_the_thread_count():
    started, _, _, n0 = _run("plain")
    assert started >= 1 or n0 == 1  # the control: a parallel op on a fresh thread starts OpenMP workers
    started, in_new_thread, restored, n0 = _run("one_thread")
    assert started == 0
    assert in_new_thread == restored == n0  # the engine thread still gets torch's full thread count
