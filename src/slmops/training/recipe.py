"""The fine-tuning recipe, read top to bottom: set up the model, the data and the trainer; train; save.

The run works in `<output_path>.partial/` and renames it into place only when complete, so an output
folder is either whole or absent; an interrupted run keeps its checkpoints there to resume from.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import (
    EarlyStoppingCallback,
    PrinterCallback,
    ProgressCallback,
)

from slmops.artifacts.folders import partial_dir, publish, read_json, refuse_existing
from slmops.artifacts.manifest import peak_memory_mb, write_manifest
from slmops.data.pairs import prepare_pairs
from slmops.data.preference import prepare_preferences
from slmops.data.prepare import prepare_data
from slmops.errors import Interrupted, UsageError, first_line
from slmops.models.catalog import resolve
from slmops.models.loading import is_encoder, load_model
from slmops.models.threads import LoadWatch, choose_threads
from slmops.models.tokenizers import load_tokenizer
from slmops.options.finetune_options import FinetuneOptions
from slmops.training import forgetting
from slmops.training.accuracy import compute_metrics, response_outcomes
from slmops.training.args import autocast_dtype, build_training_args, on_gpu
from slmops.training.callbacks import (
    FollowLoad,
    GracefulStop,
    MetricsLog,
    Progress,
    Resources,
    RunLoss,
)
from slmops.training.losses import build_loss, reads_kept_logits, use_loss
from slmops.training.model_setup import attach_method, load_base
from slmops.training.preflight import preflight
from slmops.training.sharding import full_state_dict, shard_on_cpu
from slmops.training.speed import Batching, speed_up
from slmops.training.speed.logits import causal_lm_loss
from slmops.training.speed.memory import give_back_freed_memory, keep_freed_memory
from slmops.training.stages import STAGES, preference_trainer, stage_config

log = logging.getLogger(__name__)


def finetune(opts: FinetuneOptions, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """Fine-tune as `opts` say and return the published output folder."""
    recipe = FinetuneRecipe(opts, callbacks)
    recipe.setup()
    recipe.train()
    return recipe.save()


class FinetuneRecipe:
    def __init__(self, opts: FinetuneOptions, callbacks: Sequence[TrainerCallback] = ()):
        self.opts, self.callbacks = opts, tuple(callbacks)
        self.started = time.perf_counter()
        self.out = Path(opts.output_path).expanduser()
        self.work = partial_dir(self.out)
        self.gpu = on_gpu(opts)
        self.timing: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the block's seconds to `timing[name]`: the manifest then says where the wall time went."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timing[name] = round(self.timing.get(name, 0.0) + time.perf_counter() - start, 2)

    # ---- set up -------------------------------------------------------------------------------------
    def _eval_metrics(self) -> list[str]:
        """--eval_metrics, or by default accuracy and macro-F1 where the responses are labels (a few distinct
        answers, as `data check` finds them): every evaluation then says how often greedy decoding gets the label."""
        opts = self.opts
        if opts.eval_metrics is not None or self.preference or opts.text_pair_field is not None:
            return list(opts.eval_metrics or ())
        return ["accuracy", "f1"] if "label_counts" in self.data.stats.get("checks", {}) else []

    def setup(self) -> None:
        opts = self.opts
        self.resume = self._plan_output()
        set_seed(opts.seed)
        self.threads = None if self.gpu else choose_threads(opts.num_threads)
        with self.phase("load"):
            self.model_path = resolve(opts.model_name_or_path)
        self.loss, self.loss_record = build_loss(opts.loss, opts.loss_args)  # a bad loss fails in a second
        pairs = opts.text_pair_field is not None
        self.encoder = is_encoder(self.model_path, opts.trust_remote_code)
        if self.encoder and not pairs:
            raise UsageError(f"{opts.model_name_or_path} is an encoder without a language-model head: train it on "
                             f"sentence pairs (--text_pair_field, --loss contrastive; see docs/custom-loss.md)")
        self.tokenizer = load_tokenizer(self.model_path, opts.trust_remote_code)
        self.preference = opts.stage != "sft"
        with self.phase("data"):
            if self.preference:
                self.data = prepare_preferences(opts, self.tokenizer)
            else:
                self.data = prepare_pairs(opts, self.tokenizer) if pairs else prepare_data(opts, self.tokenizer)
        self.eval_metrics = self._eval_metrics()
        self.amp, self.amp_why = autocast_dtype(opts)
        config, stage = stage_config(opts.stage, opts.beta, opts.max_seq_len) if self.preference else \
            (TrainingArguments, {})
        self.args = build_training_args(opts, self.work / "checkpoints", self.amp, config, **stage)
        if self.encoder:
            self.args.label_names = ["labels"]  # an encoder's forward takes no labels: the Trainer cannot tell
        if not self.gpu and self.args.fsdp:
            give_back_freed_memory()  # before loading: the whole model's weights go once it is sharded
        with self.phase("load"):
            base = load_base(opts, self.model_path, self.amp, self.args.gradient_checkpointing, self.encoder,
                             self.gpu)
            self.model, self.targets = attach_method(base, opts, self.encoder, self.gpu)
        if not self.gpu and not self.args.fsdp:  # sharding is for memory: give freed blocks back
            keep_freed_memory()
        self.batching = Batching(None, False, False, False) if self.preference else \
            speed_up(self.model, opts.packing, opts.share_prefix, reads_kept_logits(self.loss), pairs,
                     self.tokenizer.pad_token_id)
        if self.batching.packing:
            self.args.include_num_input_tokens_seen = "all"  # no padding to leave out (and pad may equal EOS)
        self.trainer = self._trainer()

    def _trainer(self) -> Trainer:
        opts, work = self.opts, self.work
        work.mkdir(parents=True, exist_ok=True)
        self.stop, self.metrics_log, self.run_loss = GracefulStop(), MetricsLog(work / "metrics.jsonl"), RunLoss()
        extra = [EarlyStoppingCallback(opts.early_stopping_patience)] if opts.early_stopping_patience else []
        if self.threads and self.threads["cap"]:  # the count was chosen, not given: it follows the machine's load
            follow = FollowLoad(LoadWatch(self.threads["cap"]))
            self.threads["changes"] = follow.changes
            extra.append(follow)
        callbacks = [self.metrics_log, Progress(), self.stop, self.run_loss, *extra, *self.callbacks]
        if self.preference:
            trainer = preference_trainer(opts.stage, self.model, self.args, self.data, self.tokenizer, callbacks)
        else:
            trainer = Trainer(model=self.model, args=self.args, train_dataset=self.data.train,
                              eval_dataset=self.data.eval, data_collator=self.batching.collator,
                              compute_loss_func=causal_lm_loss if self.loss is None else None,
                              processing_class=self.tokenizer,
                              compute_metrics=compute_metrics if self.eval_metrics else None,
                              preprocess_logits_for_metrics=response_outcomes if self.eval_metrics else None,
                              callbacks=callbacks)
        if trainer.args.fsdp and not self.gpu:
            shard_on_cpu(trainer)
        if self.loss is not None:
            use_loss(trainer, self.loss)
        self.run_loss.bind(trainer, self.resume)
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        trainer.callback_handler.callbacks.insert(0, Resources())  # before TensorBoard and metrics.jsonl see logs
        for cb in trainer.callback_handler.callbacks:
            if isinstance(cb, TensorBoardCallback):  # transformers 5 dropped TrainingArguments.logging_dir
                cb.logging_dir = str(Path(opts.logging_dir or work / "logs").expanduser())
        return trainer

    def _plan_output(self) -> str | None:
        """Refuse to clobber results; decide what to resume from. Runs before any heavy work."""
        opts, work = self.opts, self.work
        refuse_existing(self.out, opts.overwrite)
        checkpoints = work / "checkpoints"
        last = last_checkpoint(checkpoints)
        if opts.resume_from_checkpoint not in (None, "auto"):
            path = Path(opts.resume_from_checkpoint).expanduser()
            if not (path / "trainer_state.json").exists():
                raise UsageError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no trainer_state.json); "
                                 f"pass a checkpoint-N folder or 'auto'")
            return str(path)
        if opts.resume_from_checkpoint == "auto":
            if last is None:
                log.info("--resume_from_checkpoint auto: no checkpoint in %s, starting from the beginning", checkpoints)
            return last
        if last is not None and not opts.overwrite:
            raise UsageError(f"an interrupted run left checkpoints in {checkpoints}; add --resume_from_checkpoint "
                             f"auto to continue it, or --overwrite to start over")
        if work.exists() and int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(work)  # a failed run's leftovers without checkpoints: nothing to keep
        return None

    # ---- train --------------------------------------------------------------------------------------
    def train(self) -> None:
        trainer = self.trainer
        with self.phase("preflight"):
            self.estimate = preflight(trainer, self.amp)
        # an encoder has no perplexity to check; sharded, every process takes part in each forward pass
        self.lm = (trainer.is_world_process_zero() or trainer.is_fsdp_enabled) and not self.encoder
        with self.phase("forgetting_check"):
            self.general_before = forgetting.reference_perplexity(self.model, self.tokenizer) if self.lm else None
        self.stop.install()
        try:
            with self.phase("training"):
                self.result = trainer.train(resume_from_checkpoint=self.resume)
        finally:
            self.stop.uninstall()
        # the Trainer's own evaluations, inside train(); the final one, if any, comes after
        self.eval_in_training = evaluations = self.metrics_log.eval_seconds
        self.timing.update(training=round(self.timing["training"] - evaluations, 2), evaluation=round(evaluations, 2))
        if self.stop.received is not None:
            last = last_checkpoint(self.work / "checkpoints")
            raise Interrupted(f"interrupted: checkpoint saved in {last}; continue with the same command plus "
                              f"--resume_from_checkpoint auto", last)
        with self.phase("evaluation"):
            self.final_metrics = final_eval(trainer)

    # ---- save ---------------------------------------------------------------------------------------
    def save(self) -> Path:
        trainer, opts, work = self.trainer, self.opts, self.work
        model = trainer.accelerator.unwrap_model(trainer.model)
        with self.phase("forgetting_check"):
            general = forgetting.compare(self.general_before, forgetting.reference_perplexity(model, self.tokenizer)) \
                if self.lm else None
        with self.phase("saving"):
            weights = full_state_dict(model) if trainer.is_fsdp_enabled else None  # all processes gather
            if not trainer.is_world_process_zero():
                return self.out
            self._save_weights(model, weights)
        results = self._results(general)
        write_manifest(work / "manifest.json", "finetune", opts.model_dump(), {
            "model_path": self.model_path, "target_modules": self.targets, "packing": self.batching.packing,
            "share_prefix": self.batching.shared_prefix, "rounded_lengths": self.batching.rounded_lengths,
            "loss": self.loss_record, "autocast_dtype": str(self.amp).removeprefix("torch."),
            "autocast_why": self.amp_why, "device": str(self.args.device), "world_size": self.args.world_size,
            "cpu_threads": self.threads, "eval_metrics": self.eval_metrics,
            "training_args": {k: v for k, v in self.args.to_dict().items() if not k.startswith(("hub_", "push_"))},
        }, self.data.stats, results)
        write_report_safely(work, self.out)
        publish(work, self.out)
        changes = "".join(f"{k.removeprefix('eval_')} {v:.4f} -> {results[k]:.4f}; "
                          for k, v in results["eval_before"].items() if results.get(k) is not None)
        speed = f"{results['tokens_per_second']:.0f} tokens/s, " if results["tokens_per_second"] else ""
        log.info("train loss %.4f; %s%s%.0f s; wrote %s", results["train_loss"], changes, speed,
                 results["wall_time_s"], self.out)
        return self.out

    def _results(self, general: dict | None) -> dict[str, Any]:
        trainer, metrics = self.trainer, self.final_metrics
        runtime = self.result.metrics.get("train_runtime") or 1e-9
        training = max(runtime - self.eval_in_training, 1e-9)  # tokens/s counts training, not evaluations
        tokens = trainer.state.num_input_tokens_seen
        wanted = STAGES[self.opts.stage].metrics if self.preference else self.eval_metrics
        return {
            "train_loss": self.run_loss.whole_run(self.result.training_loss, trainer.state.global_step),
            "eval_loss": metrics.get("eval_loss"),
            **{k: metrics[k] for k in metrics if k.startswith("eval_") and k[5:] in wanted},
            "eval_before": eval_before(trainer, wanted),
            "global_step": trainer.state.global_step,
            "epoch": trainer.state.epoch,
            "wall_time_s": round(time.perf_counter() - self.started, 2),
            "train_runtime_s": runtime,
            "eval_seconds_in_training": round(self.eval_in_training, 2),
            "train_tokens": tokens,
            # None where the trainer's batches do not count tokens (TRL's ORPO)
            "tokens_per_second": round((tokens - self.metrics_log.tokens_at_start) / training, 2) if tokens else None,
            **peak_memory_mb(),
            "preflight": self.estimate,
            "forgetting": general,
            "timing": dict(self.timing),  # seconds per phase: load, data, preflight, training, evaluation, ...
        }

    def _save_weights(self, model: Any, weights: dict | None) -> None:
        """`weights`: the gathered state of a sharded model (its own parameters hold only a shard)."""
        work, tokenizer = self.work, self.tokenizer
        if self.opts.method == "full":
            model.config.use_cache = True
            model.save_pretrained(work / "model", state_dict=weights)
            tokenizer.save_pretrained(work / "model")
            return
        model.save_pretrained(work / "adapter", state_dict=weights)
        tokenizer.save_pretrained(work / "adapter")
        if self.opts.merge:
            # Merge into a full-precision copy of the base: merging into bf16 or 4-bit weights loses precision.
            import torch
            from peft import PeftModel
            base = load_model(self.model_path, torch.float32, self.opts.trust_remote_code, encoder=self.encoder)
            merged = PeftModel.from_pretrained(base, work / "adapter").merge_and_unload()
            merged.config.use_cache = True
            merged.save_pretrained(work / "model")
            tokenizer.save_pretrained(work / "model")


def last_checkpoint(folder: Path) -> str | None:
    """The latest complete checkpoint. A process killed while saving leaves a checkpoint-N folder without
    its trainer_state.json (the Trainer writes it last), or with that file cut short (killed while writing
    it); resuming from either would fail, so it is passed over."""
    steps = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
                   if p.name.split("-")[1].isdigit()) if folder.is_dir() else []
    for _, path in reversed(steps):
        if isinstance(read_json(path / "trainer_state.json"), dict):
            return str(path)
        log.warning("%s is incomplete (its process stopped while saving it); resuming from an earlier one", path)
    return None


def write_report_safely(work: Path, out: Path) -> None:
    """report.html inside the run; a page that cannot be drawn must not cost the trained weights."""
    try:
        from slmops.artifacts.report import write_report
        write_report(work)
    except Exception as err:
        log.warning("could not write report.html (%s); the run is complete, draw the page later with "
                    "`slmops report %s`", first_line(err), out)


def eval_before(trainer: Trainer, metrics: Sequence[str]) -> dict:
    """The validation metrics of the untrained model (`eval_on_start`), for "before -> after" reports."""
    first = next((e for e in trainer.state.log_history if "eval_loss" in e), {})
    return {k: v for k, v in first.items() if k == "eval_loss" or k[5:] in metrics} if first.get("step") == 0 else {}


def final_eval(trainer: Trainer) -> dict:
    """Validation metrics for the final weights, reusing an evaluation already run at the last step."""
    last = trainer.state.log_history[-2:] if not trainer.args.load_best_model_at_end else []
    for entry in last:
        if "eval_loss" in entry and entry.get("step") == trainer.state.global_step:
            return entry
    return trainer.evaluate()
