"""`slmops finetune`: Olive's flags, plus every Hugging Face TrainingArguments flag."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing


from slmops.cli import add_log_level, add_save_config, str2bool
from slmops.config import METHODS

# TrainingArguments fields we own, or that make no sense on a command line.
NOT_PASSED = {"output_dir", "seed", "resume_from_checkpoint", "local_rank", "do_train", "do_eval", "do_predict",
              "hub_token", "log_level", "log_level_replica"}


def register(sub: argparse._SubParsersAction, full: bool = True) -> dict:
    """`full=False` registers the command without the TrainingArguments flags (for fast top-level help)."""
    p = sub.add_parser("finetune", help="fine-tune a model on a dataset (LoRA, QLoRA, DoRA, ... or full)",
                       description="Fine-tune a causal language model. Accepts Olive's `finetune` flags and "
                                   "any Hugging Face TrainingArguments flag.")
    model, data = add_data_args(p)
    model.add_argument("--torch_dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="dtype of the frozen base weights (auto: bf16 where the hardware has it, else fp32)")
    data.add_argument("--packing", type=str2bool, nargs="?", const=True, default=True,
                      help="lay each batch's rows end to end without padding, attention kept inside each row, "
                           "where the model supports it (default true; same examples and loss, less compute)")
    data.add_argument("--share_prefix", type=str2bool, nargs="?", const=True, default=None,
                      help="with packing on CPU: compute once per batch the leading tokens every row shares and "
                           "learns nothing from (template opening, system prompt); same logits and loss. Default: "
                           "on where that is exact: nothing drops out (--lora_dropout 0, no dropout in the model). With "
                           "dropout, true draws one mask for the shared tokens of a batch instead of one per row")
    data.add_argument("--text_pair_field", help="sentence pairs: the second text column (the first is "
                                                "--text_field), for --loss contrastive or your own pair loss")
    data.add_argument("--pair_label_field",
                      help="with --text_pair_field: the column holding 1 (similar pair) or 0 (default: label)")

    a = p.add_argument_group("method")
    a.add_argument("--method", default="lora", choices=METHODS, metavar="{" + ",".join(METHODS) + "}",
                   help="fine-tuning method (default lora)")
    a.add_argument("--lora_r", type=int, default=16, help="adapter rank (default 16)")
    a.add_argument("--lora_alpha", type=float, default=32, help="adapter scaling numerator (default 32)")
    a.add_argument("--lora_dropout", type=float, default=0.05, help="adapter dropout (default 0.05)")
    a.add_argument("--target_modules", type=_csv,
                   help="comma-separated layer names (default: every linear layer except the LM head)")
    a.add_argument("--modules_to_save", type=_csv, help="comma-separated layers trained fully besides the adapter")
    a.add_argument("--loss", default="cross_entropy",
                   help="cross_entropy (default, on the response tokens), label_smoothing, contrastive (sentence "
                        "pairs), or FILE.py:ClassName, your torch.nn.Module called as loss(outputs, batch)")
    a.add_argument("--loss_args", type=_json_object, default={},
                   help="""the loss's keyword arguments as a JSON object, e.g. '{"margin": 1.0}'""")

    r = p.add_argument_group("run")
    r.add_argument("-o", "--output_path", required=True, help="output folder (adapter/, model/, manifest.json)")
    r.add_argument("--overwrite", "--overwrite_output_dir", type=str2bool, nargs="?", const=True, default=False,
                   help="replace an existing --output_path")
    r.add_argument("--merge", type=str2bool, nargs="?", const=True, default=False,
                   help="also write the base model with the adapter merged in, as model/")
    r.add_argument("--quantization_aware", choices=["int4"],
                   help="train the adapter against the base weights rounded as an int4 ONNX export holds them; "
                        "`auto-opt --precision int4` then keeps the adapter in float beside the int4 base")
    r.add_argument("--task_name", help="free label for this adapter (recorded in the manifest)")
    r.add_argument("--early_stopping_patience", type=int,
                   help="stop after this many evaluations without a better validation loss")
    r.add_argument("--eval_metrics", type=_csv, help="task metrics at each evaluation besides the loss: "
                                                     "accuracy (responses greedy decoding gets exactly right)")
    r.add_argument("--resume_from_checkpoint", help="checkpoint folder, or 'auto' for the latest in this run")
    r.add_argument("--logging_dir", help="TensorBoard folder (default OUTPUT/logs; with --report_to tensorboard)")
    add_save_config(r)
    add_log_level(r)

    if full:
        _add_training_flags(p)
    return {"finetune": handle}


def add_data_args(p: argparse.ArgumentParser) -> tuple[argparse._ArgumentGroup, argparse._ArgumentGroup]:
    """The model and data flags, shared by `finetune` and `data check`; returns the two groups."""
    m = p.add_argument_group("model")
    m.add_argument("-m", "--model_name_or_path", required=True,
                   help="local Hugging Face folder, .gguf file, catalogue alias (slmops models list) or hub id")
    m.add_argument("--trust_remote_code", type=str2bool, nargs="?", const=True, default=False,
                   help="run the model repository's own Python code (off unless given)")

    d = p.add_argument_group("data")
    d.add_argument("-d", "--data_name", help="hub dataset, json|csv|parquet (with --data_files), or a path to a "
                                             ".json/.jsonl/.csv/.tsv/.parquet file")
    d.add_argument("--data_files", type=_csv, help="comma-separated data files")
    d.add_argument("--train_subset", help="hub dataset configuration (subset) for training")
    d.add_argument("--eval_subset", help="hub dataset configuration for validation (default: --train_subset)")
    d.add_argument("--train_split", default="train", help="split with optional slice: train, train[:4096], "
                                                          "train[:10%%] (default train)")
    d.add_argument("--eval_split", help="validation split, same syntax; default: hold out --eval_fraction")
    d.add_argument("--eval_fraction", type=float, default=0.1,
                   help="share held out for validation when no --eval_split (default 0.1, stratified by label)")
    d.add_argument("--max_eval_samples", type=int, default=1000,
                   help="cap on the rows held out by --eval_fraction (default 1000)")
    d.add_argument("--text_template", help=r"row -> text, e.g. 'Review: {phrase}\nTone: {tone}'; the last "
                                           "placeholder and what follows is the response the loss covers")
    d.add_argument("--text_field", help="column holding ready text (or the messages, with --use_chat_template)")
    d.add_argument("--use_chat_template", type=str2bool, nargs="?", const=True, default=False,
                   help="render a message list (column 'messages') with the tokenizer's chat template; "
                        "the loss covers the assistant turns")
    d.add_argument("--max_seq_len", type=int, default=1024, help="truncate longer rows (default 1024)")
    d.add_argument("--max_samples", type=int, help="use at most this many training rows")
    d.add_argument("--train_on_prompt", type=str2bool, nargs="?", const=True, default=False,
                   help="compute the loss on the prompt as well as the response")
    d.add_argument("--add_eos", type=str2bool, nargs="?", const=True, default=True,
                   help="end each example with the EOS token so generation learns to stop (default true)")
    d.add_argument("--seed", type=int, default=42,
                   help="seed for the validation hold-out, initialisation and data order (default 42)")
    return m, d


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    from transformers import TrainingArguments

    t = p.add_argument_group("Hugging Face TrainingArguments (passed through; defaults are transformers' "
                             "unless noted: learning_rate 2e-4 for adapters, 2e-5 full; logging_steps 10)")
    for f in dataclasses.fields(TrainingArguments):
        if f.init and f.name not in NOT_PASSED and f.name != "logging_dir":
            _add_training_flag(t, f)
    t.add_argument("--evaluation_strategy", dest="ta_evaluation_strategy", default=argparse.SUPPRESS,
                   help="old name of --eval_strategy")
    t.add_argument("--group_by_length", dest="ta_group_by_length", type=str2bool, nargs="?", const=True,
                   default=argparse.SUPPRESS, help="old name of --train_sampling_strategy group_by_length")


def handle(args: argparse.Namespace) -> int:
    from slmops.config import FinetuneConfig
    from slmops.errors import Interrupted
    from slmops.workflow.commands import finetune_workflow, run_command

    options = vars(args).copy()
    for key in ("command", "log_level", "save_config_file"):
        options.pop(key)
    options = {k: v for k, v in options.items() if v is not None}  # unset: the option's default
    options["training_args"] = {k[3:]: options.pop(k) for k in list(options) if k.startswith("ta_")}
    FinetuneConfig.build(**options)  # problems reported under the flags' names, before any loading
    try:
        run_command(finetune_workflow(options), args.save_config_file)
    except Interrupted as err:
        print(f"slmops finetune: {err}", file=sys.stderr)
        return 130
    print(f"wrote {args.output_path}")
    return 0


def _add_training_flag(group: argparse._ArgumentGroup, field: dataclasses.Field) -> None:
    kind = _scalar_type(field.type)
    kwargs: dict = {"dest": f"ta_{field.name}", "default": argparse.SUPPRESS,
                    "help": (field.metadata.get("help") or "").split(". ")[0].replace("%", "%%")}
    if kind is bool:
        kwargs.update(type=str2bool, nargs="?", const=True, metavar="BOOL")
    elif kind in (int, float):
        kwargs.update(type=kind)
    group.add_argument(f"--{field.name}", **kwargs)


def _scalar_type(annotation: typing.Any) -> type:
    """The argparse type of a TrainingArguments field: str wherever a string is accepted."""
    if isinstance(annotation, str):
        annotation = {"bool": bool, "int": int, "float": float}.get(annotation, str)
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    args = typing.get_args(annotation) if union else (annotation,)
    for candidate in (str, bool, int, float):
        if candidate in args:
            return candidate
    return str


def _json_object(value: str) -> dict | str:
    """A JSON object as a dict; anything else stays text, for FinetuneConfig to reject in one line."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value
    return parsed if isinstance(parsed, dict) else value


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]
