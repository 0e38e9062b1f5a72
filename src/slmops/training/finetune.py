"""`slmops finetune`: options -> data -> model with adapter -> Trainer -> published output folder.

The run works in `<output_path>.partial/` and renames it into place only when complete, so
an output folder is either whole or absent; an interrupted run keeps its checkpoints there.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import Trainer, TrainerCallback, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import EarlyStoppingCallback, PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from slmops.config import FinetuneConfig
from slmops.data import prepare_data
from slmops.data.collate import Collator
from slmops.data.pairs import PairCollator, prepare_pairs
from slmops.errors import Interrupted, UsageError, first_line
from slmops.evaluation import forgetting
from slmops.manifest import peak_memory_mb, write_manifest
from slmops.methods import METHODS, keep_4bit_trainable, quantization_config
from slmops.models.loading import is_encoder, linear_module_names, load_model, load_tokenizer, resolve
from slmops.outputs import publish, refuse_existing
from slmops.training.args import autocast_dtype, build_training_args, on_gpu
from slmops.training.callbacks import GracefulStop, MetricsLog, Progress, Resources
from slmops.training.efficiency import (attends_row_by_row, causal_lm_loss, drops_out, keep_freed_memory,
                                        mlp_at_kept_positions, supports_packing, takes_logits_to_keep,
                                        use_segmented_attention)
from slmops.training.fast_lora import use_fast_lora
from slmops.training.losses import build_loss, reads_kept_logits, use_loss
from slmops.training.metrics import compute_metrics, response_correct
from slmops.training.preflight import preflight

log = logging.getLogger(__name__)


def finetune(callbacks: Sequence[TrainerCallback] = (), **options: Any) -> Path:
    """Fine-tune a model; takes the CLI's options as keywords and returns the output folder.

    Options that are not slmops's own go to Hugging Face TrainingArguments, e.g.
    `finetune(model_name_or_path=..., data_name=..., text_template=..., output_path=...,
    max_steps=100, learning_rate=1e-4)`.
    """
    own = set(FinetuneConfig.model_fields)
    training_args = {k: options.pop(k) for k in list(options) if k not in own}
    training_args.update(options.pop("training_args", {}))
    return run(FinetuneConfig.build(training_args=training_args, **options), callbacks)


def run(cfg: FinetuneConfig, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    started = time.perf_counter()
    out = Path(cfg.output_path).expanduser()
    work = out.with_name(out.name + ".partial")
    resume = _plan_output(cfg, out, work)
    set_seed(cfg.seed)

    model_path = resolve(cfg.model_name_or_path)
    loss, loss_record = build_loss(cfg.loss, cfg.loss_args)
    pairs = cfg.text_pair_field is not None
    encoder = is_encoder(model_path, cfg.trust_remote_code)
    if encoder and not pairs:
        raise UsageError(f"{cfg.model_name_or_path} is an encoder without a language-model head: train it on "
                         f"sentence pairs (--text_pair_field, --loss contrastive; see docs/custom-loss.md)")
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    data = prepare_pairs(cfg, tokenizer) if pairs else prepare_data(cfg, tokenizer)
    amp = autocast_dtype(cfg)
    args = build_training_args(cfg, work / "checkpoints", amp)
    if encoder:
        args.label_names = ["labels"]  # an encoder's forward takes no labels, so the Trainer cannot infer them
    model, targets = _build_model(cfg, model_path, amp, args.gradient_checkpointing, encoder)
    if not on_gpu(cfg):
        keep_freed_memory()
    packing = cfg.packing and not pairs and supports_packing(model)
    if cfg.packing and not pairs and not packing:
        log.info("this model cannot keep packed rows apart; padding each batch instead")
    if packing:
        args.include_num_input_tokens_seen = "all"  # no padding to leave out (and pad may equal EOS)
    kept_logits = packing and reads_kept_logits(loss)  # users' losses see plain packed rows
    # Row-by-row attention is what lets rows continue from one prefix. By default only where sharing is
    # exact: a dropout mask drawn for the prefix would be shared by every row of the batch.
    share = cfg.share_prefix if cfg.share_prefix is not None else not drops_out(model)
    shared = kept_logits and share and attends_row_by_row(model)
    if pairs:
        collator = PairCollator(tokenizer.pad_token_id, skip_logits=takes_logits_to_keep(model))
    else:
        collator = Collator(tokenizer.pad_token_id, pack=packing, keep_logits=kept_logits, share_prefix=shared)
        if kept_logits:
            mlp_at_kept_positions(model)

    work.mkdir(parents=True, exist_ok=True)
    stop = GracefulStop()
    extra = [EarlyStoppingCallback(cfg.early_stopping_patience)] if cfg.early_stopping_patience else []
    metrics_log = MetricsLog(work / "metrics.jsonl")
    trainer = Trainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                      data_collator=collator, compute_loss_func=causal_lm_loss if loss is None else None,
                      processing_class=tokenizer,
                      compute_metrics=compute_metrics if cfg.eval_metrics else None,
                      preprocess_logits_for_metrics=response_correct if cfg.eval_metrics else None,
                      callbacks=[metrics_log, Progress(), stop, *extra, *callbacks])
    if loss is not None:
        use_loss(trainer, loss)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.callback_handler.callbacks.insert(0, Resources())  # before TensorBoard and metrics.jsonl see the logs
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):  # transformers 5 dropped TrainingArguments.logging_dir
            cb.logging_dir = str(Path(cfg.logging_dir or work / "logs").expanduser())
    estimate = preflight(trainer, amp)
    lm = trainer.is_world_process_zero() and not encoder  # an encoder has no perplexity to check
    general_before = forgetting.reference_perplexity(model, tokenizer) if lm else None
    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        stop.uninstall()
    if stop.received is not None:
        last = get_last_checkpoint(str(work / "checkpoints"))
        raise Interrupted(f"interrupted: checkpoint saved in {last}; continue with the same command plus "
                          f"--resume_from_checkpoint auto", last)
    eval_metrics = _final_eval(trainer)
    if not trainer.is_world_process_zero():
        return out
    general = forgetting.compare(general_before, forgetting.reference_perplexity(
        trainer.accelerator.unwrap_model(trainer.model), tokenizer)) if lm else None
    _save(cfg, trainer, tokenizer, model_path, work)
    runtime = result.metrics.get("train_runtime") or 1e-9
    training = max(runtime - metrics_log.eval_seconds, 1e-9)  # tokens/s counts training, not evaluations
    results = {
        "train_loss": result.training_loss,
        "eval_loss": eval_metrics.get("eval_loss"),
        **{k: eval_metrics[k] for k in eval_metrics if k.startswith("eval_") and k[5:] in (cfg.eval_metrics or ())},
        "eval_before": _before(trainer, cfg.eval_metrics or ()),
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "train_runtime_s": runtime,
        "eval_seconds_in_training": round(metrics_log.eval_seconds, 2),
        "train_tokens": trainer.state.num_input_tokens_seen,
        "tokens_per_second": round((trainer.state.num_input_tokens_seen - metrics_log.tokens_at_start) / training, 2),
        **peak_memory_mb(),
        "preflight": estimate,
        "forgetting": general,
    }
    write_manifest(work / "manifest.json", "finetune", cfg.model_dump(), {
        "model_path": model_path, "target_modules": targets, "packing": packing,
        "share_prefix": shared, "loss": loss_record,
        "autocast_dtype": str(amp).removeprefix("torch."), "device": str(args.device), "world_size": args.world_size,
        "training_args": {k: v for k, v in args.to_dict().items() if not k.startswith(("hub_", "push_"))},
    }, data.stats, results)
    _write_report(work, out)
    publish(work, out)
    changes = "; ".join(f"{k.removeprefix('eval_')} {v:.4f} -> {results[k]:.4f}"
                        for k, v in results["eval_before"].items() if results.get(k) is not None)
    log.info("train loss %.4f; %s; %.0f tokens/s, %.0f s; wrote %s", results["train_loss"], changes,
             results["tokens_per_second"], results["wall_time_s"], out)
    return out


def _write_report(work: Path, out: Path) -> None:
    """report.html inside the run; a page that cannot be drawn must not cost the trained weights."""
    try:
        from slmops.report import write_report
        write_report(work)
    except Exception as err:
        log.warning("could not write report.html (%s); the run is complete, draw the page later with "
                    "`slmops report %s`", first_line(err), out)


def _before(trainer: Trainer, metrics: Sequence[str]) -> dict:
    """The validation metrics of the untrained model (`eval_on_start`), for "before -> after" reports."""
    first = next((e for e in trainer.state.log_history if "eval_loss" in e), {})
    return {k: v for k, v in first.items() if k == "eval_loss" or k[5:] in metrics} if first.get("step") == 0 else {}


def _final_eval(trainer: Trainer) -> dict:
    """Validation metrics for the final weights, reusing an evaluation already run at the last step."""
    last = trainer.state.log_history[-2:] if not trainer.args.load_best_model_at_end else []
    for entry in last:
        if "eval_loss" in entry and entry.get("step") == trainer.state.global_step:
            return entry
    return trainer.evaluate()


def _plan_output(cfg: FinetuneConfig, out: Path, work: Path) -> str | None:
    """Refuse to clobber results; decide what to resume from. Runs before any heavy work."""
    refuse_existing(out, cfg.overwrite)
    checkpoints = work / "checkpoints"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if cfg.resume_from_checkpoint not in (None, "auto"):
        path = Path(cfg.resume_from_checkpoint).expanduser()
        if not (path / "trainer_state.json").exists():
            raise UsageError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no trainer_state.json); "
                             f"pass a checkpoint-N folder or 'auto'")
        return str(path)
    if cfg.resume_from_checkpoint == "auto":
        if last is None:
            log.info("--resume_from_checkpoint auto: no checkpoint in %s, starting from the beginning", checkpoints)
        return last
    if last is not None and not cfg.overwrite:
        raise UsageError(f"an interrupted run left checkpoints in {checkpoints}; add --resume_from_checkpoint "
                         f"auto to continue it, or --overwrite to start over")
    if work.exists() and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(work)  # a failed run's leftovers without checkpoints: nothing to keep
    return None


def _build_model(cfg: FinetuneConfig, model_path: str, amp: torch.dtype, checkpointing: bool, encoder: bool):
    method = METHODS[cfg.method]
    if method.quantized:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if on_gpu(cfg) else "cpu"
        model = load_model(model_path, amp, cfg.trust_remote_code, quantization_config(amp), {"": device}, encoder)
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(checkpointing))
        keep_4bit_trainable(model)
    else:
        # Adapters train in fp32 on a frozen base; holding that base in the autocast dtype saves
        # memory and a cast per step. Full fine-tuning keeps fp32 master weights.
        base_dtype = amp if method.build is not None else torch.float32
        if cfg.torch_dtype != "auto":
            base_dtype = getattr(torch, cfg.torch_dtype)
        model = load_model(model_path, base_dtype, cfg.trust_remote_code, encoder=encoder)
        if cfg.quantization_aware:
            from slmops.models.fake_quant import fake_quantize
            log.info("quantization-aware: %d weight matrices rounded as the int4 export will hold them",
                     fake_quantize(model))
    model.config.use_cache = False
    # measured on CPU; GPUs run masked attention over a packed row well. Pairs are padded, never packed.
    if cfg.packing and not cfg.text_pair_field and not on_gpu(cfg):
        use_segmented_attention(model)
    targets = cfg.target_modules or linear_module_names(model)
    if method.build is None:
        return model, []
    from peft import get_peft_model
    peft_config = method.build(cfg, targets, model)
    if encoder:
        peft_config.task_type = "FEATURE_EXTRACTION"  # peft's causal-LM wrapper needs generation methods
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as err:
        raise UsageError(f"--method {cfg.method} with --target_modules {','.join(targets)}: "
                         f"{first_line(err)}; layers with weights here: "
                         f"{', '.join(linear_module_names(model))}") from None
    use_fast_lora(model)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s on %s: %s trainable of %s parameters (%.2f%%)", cfg.method, ",".join(targets),
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model, targets


def _save(cfg: FinetuneConfig, trainer: Trainer, tokenizer: Any, model_path: str, work: Path) -> None:
    model = trainer.accelerator.unwrap_model(trainer.model)
    if cfg.method == "full":
        model.config.use_cache = True
        model.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        return
    model.save_pretrained(work / "adapter")
    tokenizer.save_pretrained(work / "adapter")
    if cfg.merge:
        # Merge into a full-precision copy of the base: merging into bf16 or 4-bit weights loses precision.
        from peft import PeftModel
        base = load_model(model_path, torch.float32, cfg.trust_remote_code,
                          encoder=is_encoder(model_path, cfg.trust_remote_code))
        merged = PeftModel.from_pretrained(base, work / "adapter").merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")

