"""How many CPU threads a run computes with (torch's, and ONNX Runtime's for exported models): the cores
free now, not the cores the machine has.

PyTorch starts one thread per core. When another process keeps a core busy, each of its parallel
operations waits at a barrier for the thread that shares that core, and training slows by an order of
magnitude (measured: SmolLM2-135M LoRA, 2 cores, one busy: 71.4 s of training against 6.1 s with one
thread). So a run samples how busy each core it may use is, and computes on the free ones.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

BUSY = 50.0  # percent: a core this busy with other work is taken


def allowed_cores() -> list[int]:
    """The cores this process may run on (its affinity; every core where the OS does not say)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(psutil.cpu_count() or 1))


def free_cores(sample_seconds: float = 0.2) -> tuple[int, int]:
    """(cores free now, cores allowed), from each core's load over a short sample."""
    cores = allowed_cores()
    load = psutil.cpu_percent(interval=sample_seconds, percpu=True)
    free = sum(1 for core in cores if core < len(load) and load[core] < BUSY)
    return max(1, free), len(cores)


def free_threads(requested: int | None = None) -> dict[str, Any]:
    """How many threads to compute with (`requested`, else the free cores) and why, for the manifest; `cap`:
    the most a later re-check may take (None when the user fixed the count)."""
    if requested:
        return {"threads": requested, "why": "--num_threads", "cap": None}
    free, cores = free_cores()
    cap = int(os.environ.get("OMP_NUM_THREADS") or cores)  # a cap the user set stands
    why = "every core free" if free == cores else f"{cores - free} of {cores} cores busy with other work"
    return {"threads": min(free, cap), "why": why, "cap": cap}


def choose_threads(requested: int | None) -> dict[str, Any]:
    """`free_threads`, set as torch's thread count."""
    import torch  # here, not above: ONNX Runtime's users of `free_threads` need no torch

    chosen = free_threads(requested)
    torch.set_num_threads(chosen["threads"])
    return chosen


class LoadWatch:
    """Between training steps, every `every_s` seconds: how many cores other processes keep busy now, and
    torch's threads moved to the free ones (up to `cap`). Other processes' CPU time is counted directly;
    this run's own threads, spinning at their barriers, would hide a neighbour's load in a machine-wide
    figure."""

    def __init__(self, cap: int, every_s: float = 5.0):
        self.cap, self.every_s, self.last = cap, every_s, time.monotonic()
        self.me = psutil.Process().pid
        self.others_busy()  # psutil reports CPU use since the previous call: this call starts the clock

    def others_busy(self) -> float:
        """Cores' worth of CPU the other processes used since the previous call."""
        used = 0.0
        for process in psutil.process_iter():
            if process.pid != self.me:
                try:
                    used += process.cpu_percent(None)
                except psutil.Error:  # gone, or not ours to read
                    pass
        return used / 100

    def check(self) -> int | None:
        """The new thread count when it changed, else None."""
        now = time.monotonic()
        if now - self.last < self.every_s:
            return None
        self.last = now
        import torch

        threads = max(1, min(self.cap, len(allowed_cores()) - round(self.others_busy())))
        if threads == torch.get_num_threads():
            return None
        torch.set_num_threads(threads)
        return threads
