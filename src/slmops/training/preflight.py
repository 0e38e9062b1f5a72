"""Before training: measure one step on the longest rows, then say how long an epoch will take and
whether the run fits in memory, so a run that cannot finish fails in seconds, not after an hour.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import psutil
import torch

log = logging.getLogger(__name__)


class _PeakRss:
    """Samples this process's resident memory in a thread (torch releases the GIL while it computes)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def preflight(trainer: Any, amp: torch.dtype) -> dict[str, Any]:
    """One forward and backward pass (no update; random state restored) on the batch of longest rows.

    Returns the estimate recorded in the manifest and logs it; warns when the peak will not fit.
    """
    args, model, data = trainer.args, trainer.model, trainer.train_dataset
    lengths = [len(ids) for ids in data["input_ids"]]
    longest = sorted(range(len(lengths)), key=lengths.__getitem__)[-args.per_device_train_batch_size:]
    batch = {k: v.to(args.device) for k, v in trainer.data_collator([data[i] for i in longest]).items()}
    tokens = sum(lengths[i] for i in longest)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    gpu = args.device.type == "cuda"
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(args.device)
    with torch.random.fork_rng(devices=[args.device] if gpu else []), _PeakRss() as rss:
        model.train()
        start = time.perf_counter()
        with torch.autocast(args.device.type, dtype=amp, enabled=amp != torch.float32):
            loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        if gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    optimizer_state = 2 * trainable  # AdamW's two moments (gradients are inside the measured step)
    if gpu:
        peak = torch.cuda.max_memory_allocated(args.device) + optimizer_state
        capacity = torch.cuda.get_device_properties(args.device).total_memory
    else:
        peak = rss.peak + optimizer_state
        capacity = psutil.Process().memory_info().rss + psutil.virtual_memory().available
    # Time scales with tokens; the longest rows make this a slight over-estimate (attention grows faster).
    epoch_tokens = sum(lengths) / max(args.world_size, 1)
    epoch_seconds = seconds * epoch_tokens / tokens
    estimate = {"calibration_rows": len(longest), "calibration_tokens": tokens,
                "calibration_seconds": round(seconds, 3), "est_epoch_seconds": round(epoch_seconds, 1),
                "est_peak_memory_mb": round(peak / 2**20), "memory_capacity_mb": round(capacity / 2**20),
                "device": args.device.type}
    where = "GPU" if gpu else "RAM"
    log.info("pre-flight: %d longest rows (%d tokens) took %.1f s; estimated %s per epoch, peak %s %.1f GB of "
             "%.1f GB", len(longest), tokens, seconds, _duration(epoch_seconds), where, peak / 2**30,
             capacity / 2**30)
    if peak > capacity:
        log.warning("this run will likely not fit in %s: estimated peak %.1f GB, %.1f GB available; lower "
                    "--per_device_train_batch_size (raise --gradient_accumulation_steps to keep the batch), "
                    "lower --max_seq_len, or add --gradient_checkpointing true", where, peak / 2**30,
                    capacity / 2**30)
    return estimate


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{math.ceil(seconds)} s"
    if seconds < 5400:
        return f"~{math.ceil(seconds / 60)} min"
    return f"~{seconds / 3600:.1f} h"
