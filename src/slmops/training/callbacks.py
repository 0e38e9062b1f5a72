"""Trainer callbacks: what the Trainer lacks for an unattended CPU run.

A JSONL log that is always written, a progress bar that shows loss and tokens/s, and a
signal handler that turns Ctrl-C / SIGTERM into a checkpoint instead of lost work.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from slmops.artifacts.folders import read_json, write_json

log = logging.getLogger(__name__)


class MetricsLog(TrainerCallback):
    """Append every log event to metrics.jsonl with wall time and non-padding tokens/s."""

    def __init__(self, path: Path):
        self.path = path
        self._start = time.perf_counter()
        self._last = (self._start, 0)
        self.tokens_at_start = 0  # > 0 when resuming: this session's tokens are the difference
        self.eval_seconds = 0.0  # evaluations inside this session's training time

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen
        self._last = (self._start, self.tokens_at_start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.eval_seconds += logs.get("eval_runtime", 0.0)
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        record = {"step": state.global_step, "epoch": state.epoch, "time_s": round(now - self._start, 3), **logs}
        if "loss" in logs and now > self._last[0]:
            record["tokens_per_second"] = round((tokens - self._last[1]) / (now - self._last[0]), 2)
            self._last = (now, tokens)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


class Resources(TrainerCallback):
    """Adds resource use to every log event, training and evaluation, so metrics.jsonl and TensorBoard
    both carry it: resident memory, CPU use since the previous event (100 = every core busy), and on
    CUDA the peak GPU memory since the previous event and the GPU's utilisation. Must run first."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.cores = len(self.proc.cpu_affinity()) if hasattr(self.proc, "cpu_affinity") else psutil.cpu_count()
        self.proc.cpu_percent(None)  # starts the CPU-time window

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        pre = "eval_" if any(k.startswith("eval_") for k in logs) else ""  # TensorBoard: eval/... vs train/...
        logs[pre + "rss_mb"] = round(self.proc.memory_info().rss / 2**20, 1)
        # over windows of a few ms the CPU-time clock's granularity can overshoot: cap at all cores busy
        logs[pre + "cpu_percent"] = round(min(100.0, self.proc.cpu_percent(None) / (self.cores or 1)), 1)
        if torch.cuda.is_available() and args.device.type == "cuda":
            logs[pre + "gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(args.device) / 2**20, 1)
            torch.cuda.reset_peak_memory_stats(args.device)
            try:
                logs[pre + "gpu_utilization"] = torch.cuda.utilization(args.device)
            except Exception:  # needs NVML (pynvml); memory alone is still worth logging
                pass


class Progress(TrainerCallback):
    """A tqdm bar over optimizer steps (postfix: last loss and tokens/s), and one per evaluation."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.eval_bar: tqdm | None = None
        self._t0 = 0.0
        self._tokens0 = 0

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.eval_bar is None:
            total = len(eval_dataloader) if eval_dataloader is not None else None
            self.eval_bar = tqdm(total=total, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True)
            self._t0, self._tokens0 = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            elapsed = time.perf_counter() - self._t0
            if elapsed > 0:
                self.bar.set_postfix_str(self._postfix(state, elapsed), refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "eval_loss" in logs:
            self.bar.write(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _postfix(self, state, elapsed: float) -> str:
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        tok_s = (state.num_input_tokens_seen - self._tokens0) / elapsed
        return (f"loss {losses[-1]:.4f}, " if losses else "") + f"{tok_s:,.0f} tok/s"


class GracefulStop(TrainerCallback):
    """On SIGINT/SIGTERM: finish the current step, save a checkpoint, stop.

    A second signal falls through to the default handler, so a stuck run can still be killed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.received = signum
        self.uninstall()

    def on_step_end(self, args, state, control, **kwargs):
        if self._anywhere(args):
            control.should_save = True
            control.should_training_stop = True

    def _anywhere(self, args: Any) -> bool:
        """Whether any process got the signal: processes that stopped at different steps would wait on
        each other's collectives for ever, so all stop at the first step end after any one is told."""
        if args.world_size < 2:
            return self.received is not None
        import torch.distributed as dist

        flag = torch.tensor([0 if self.received is None else 1], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = signal.SIGTERM  # stopping because another process was told to
        return bool(flag.item())


class RunLoss(TrainerCallback):
    """The whole run's mean training loss, as an uninterrupted run reports it.

    After a resume, the Trainer's own `training_loss` averages only the steps run since the resume. This
    callback adds up each step's loss (what `training_step` returns, kept on the device: no sync per
    step) and writes the sum so far into every checkpoint; a run resumed from that checkpoint adds it back.
    """

    FILE = "slmops_loss.json"

    def __init__(self) -> None:
        self.prior_sum = 0.0  # the loss summed over the steps before the resume
        self.prior_steps = 0
        self.session: torch.Tensor | None = None

    def bind(self, trainer: Any, resume: str | None) -> None:
        """Count every step `trainer` takes; `resume` is the checkpoint it continues from, if any."""
        saved = (read_json(Path(resume) / self.FILE) if resume else None) or {}
        self.prior_sum, self.prior_steps = float(saved.get("loss_sum", 0.0)), int(saved.get("global_step", 0))
        step = trainer.training_step

        def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = step(*args, **kwargs)
            self.session = loss.detach() if self.session is None else self.session + loss.detach()
            return loss

        trainer.training_step = counted

    def loss_sum(self) -> float:
        return self.prior_sum + (float(self.session) if self.session is not None else 0.0)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_json(folder / self.FILE, {"global_step": state.global_step, "loss_sum": self.loss_sum()})

    def whole_run(self, trainer_loss: float, global_step: int) -> float:
        """The Trainer's figure for an uninterrupted run; after a resume, the mean over every step from the
        sums kept here (transformers versions differ in what their figure averages after a resume)."""
        if not self.prior_steps:
            return trainer_loss
        return self.loss_sum() / max(global_step, 1)


class FollowLoad(TrainerCallback):
    """Moves the run's CPU threads to the cores other work leaves free, as that work starts and ends; each
    change is logged and kept in `changes` (step, threads) for the manifest."""

    def __init__(self, watch: Any):
        self.watch, self.changes = watch, []

    def on_step_end(self, args, state, control, **kwargs):
        threads = self.watch.check()
        if threads is not None:
            self.changes.append([state.global_step, threads])
            log.info("other work on this machine changed: computing on %d thread(s) from step %d", threads,
                     state.global_step)
