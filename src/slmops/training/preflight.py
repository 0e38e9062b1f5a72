"""Before training: measure one step on a typical batch, then say how long an epoch will take and
whether the longest batch will fit in memory, so a run that cannot finish says so in seconds.
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
    """One forward and backward pass (no update; random state restored) on rows of median length.

    Time scales with tokens; memory grows by the measured activations per token up to the longest
    possible batch (the longest rows together), which is what must fit. Returns the estimate for the
    manifest and logs it; warns when that peak exceeds the memory there is.
    """
    args, model, data = trainer.args, trainer.model, trainer.train_dataset
    # a row's tokens: input_ids, or a preference row's prompt and answers (TRL's *_ids columns)
    columns = [data[c] for c in data.column_names if c.endswith("ids")]
    lengths = [sum(map(len, parts)) for parts in zip(*columns)]
    size = min(args.per_device_train_batch_size, len(lengths))
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    middle = max(0, len(order) // 2 - size // 2)
    rows = order[middle: middle + size]
    batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v  # ORPO's batch carries the texts too
             for k, v in trainer.data_collator([data[i] for i in rows]).items()}
    tokens = sum(lengths[i] for i in rows)
    worst = sum(lengths[i] for i in order[-size:])
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    gpu = args.device.type == "cuda"
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(args.device)
        before = torch.cuda.memory_allocated(args.device)
    else:
        before = psutil.Process().memory_info().rss
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
    if gpu:
        grown = torch.cuda.max_memory_allocated(args.device) - before
        capacity = torch.cuda.get_device_properties(args.device).total_memory
    else:
        grown = rss.peak - before
        capacity = psutil.Process().memory_info().rss + psutil.virtual_memory().available
    # Activations grow with tokens; AdamW's two moments come on top (gradients are inside the step).
    peak = before + grown * max(worst / tokens, 1.0) + 2 * trainable
    epoch_seconds = seconds * sum(lengths) / max(args.world_size, 1) / tokens
    estimate = {"calibration_rows": len(rows), "calibration_tokens": tokens, "longest_batch_tokens": worst,
                "calibration_seconds": round(seconds, 3), "est_epoch_seconds": round(epoch_seconds, 3),
                "est_peak_memory_mb": round(peak / 2**20), "memory_capacity_mb": round(capacity / 2**20),
                "device": args.device.type}
    where = "GPU" if gpu else "RAM"
    log.info("pre-flight: a step of %d rows (%d tokens) took %.1f s; estimated %s per epoch, peak %s %.1f GB "
             "(longest batch) of %.1f GB", len(rows), tokens, seconds, _duration(epoch_seconds), where,
             peak / 2**30, capacity / 2**30)
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
