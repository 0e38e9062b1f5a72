"""Before training: measure one step on a typical batch, then say how long an epoch will take and
whether the longest batch will fit in memory, so a run that cannot finish says so in seconds.
"""

from __future__ import annotations

import logging
import math
import os
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
    manifest and logs it, per process, with what sharding the weights, gradients and AdamW state
    (--fsdp) would leave; warns when the peak exceeds the memory a process has.
    """
    args, model = trainer.args, trainer.model
    state = _training_state(model)
    shards = args.world_size if args.world_size > 1 else 2
    if trainer.is_fsdp_enabled:  # a timed step here would hold every gradient in every process
        log.info("pre-flight (--fsdp over %d processes): weights, gradients and AdamW state %.2f GB per process "
                 "sharded, %.2f GB whole; the timed step is skipped", shards, state / shards / 2**30, state / 2**30)
        return {"state_mb": round(state / 2**20), "sharded_state_mb": round(state / shards / 2**20),
                "processes": shards, "device": args.device.type}
    estimate, peak, capacity = _timed_step(trainer, amp)
    sharded_peak = peak - state + state / shards
    estimate.update(state_mb=round(state / 2**20), sharded_state_mb=round(state / shards / 2**20),
                    est_sharded_peak_memory_mb=round(sharded_peak / 2**20), processes=shards)
    where = "GPU" if args.device.type == "cuda" else "RAM"
    log.info("pre-flight: a step of %d rows (%d tokens) took %.1f s; estimated %s per epoch, peak %s %.1f GB per "
             "process (longest batch) of %.1f GB; weights, gradients and AdamW state are %.2f GB of it, %.2f GB "
             "sharded over %d processes with --fsdp", estimate["calibration_rows"], estimate["calibration_tokens"],
             estimate["calibration_seconds"], _duration(estimate["est_epoch_seconds"]), where, peak / 2**30,
             capacity / 2**30, state / 2**30, state / shards / 2**30, shards)
    if peak > capacity:
        shard = (f"shard it with --fsdp under torchrun (about {sharded_peak / 2**30:.1f} GB per process over "
                 f"{shards}), " if sharded_peak < capacity else "")
        log.warning("this run will likely not fit in %s: estimated peak %.1f GB per process, %.1f GB available; "
                    "%slower --per_device_train_batch_size (raise --gradient_accumulation_steps to keep the batch), "
                    "lower --max_seq_len, or add --gradient_checkpointing true", where, peak / 2**30,
                    capacity / 2**30, shard)
    return estimate


def _training_state(model: Any) -> int:
    """Bytes of weights, plus gradients and AdamW's two moments for the trainable ones."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _timed_step(trainer: Any, amp: torch.dtype) -> tuple[dict[str, Any], float, float]:
    """The measured step: (estimate, peak bytes per process, bytes a process has)."""
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
    else:  # the machine's memory, shared by the processes torchrun started on it
        grown = rss.peak - before
        here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        capacity = (psutil.Process().memory_info().rss * here + psutil.virtual_memory().available) / here
    # Activations grow with tokens; AdamW's two moments come on top (gradients are inside the step).
    peak = before + grown * max(worst / tokens, 1.0) + 2 * trainable
    epoch_seconds = seconds * sum(lengths) / max(args.world_size, 1) / tokens
    return {"calibration_rows": len(rows), "calibration_tokens": tokens, "longest_batch_tokens": worst,
            "calibration_seconds": round(seconds, 3), "est_epoch_seconds": round(epoch_seconds, 3),
            "est_peak_memory_mb": round(peak / 2**20), "memory_capacity_mb": round(capacity / 2**20),
            "device": args.device.type}, peak, capacity


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{math.ceil(seconds)} s"
    if seconds < 5400:
        return f"~{math.ceil(seconds / 60)} min"
    return f"~{seconds / 3600:.1f} h"
