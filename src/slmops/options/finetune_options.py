"""`finetune` and `data check`: the model, the data, the method and the run, each option declared once.

Every Hugging Face TrainingArguments name is a `finetune` option too: given as a flag, a keyword of
`slmops.finetune()` or a key of a fine-tuning pass, it lands in `training_args` unchanged.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import field_validator, model_validator

from slmops.options.fields import Dropout, Options, Positive, PositiveInt, Share, option
from slmops.options.methods import METHODS
from slmops.options.training_args import training_argument_names

EVAL_METRICS = ("accuracy", "f1")  # computed during training from the evaluation's logits
# Built-in losses by name; anything else is FILE.py:ClassName, the user's torch.nn.Module.
LOSSES = ("cross_entropy", "label_smoothing", "contrastive")
TOKEN_LOSSES = ("cross_entropy", "label_smoothing")
USER_LOSS = re.compile(r".+\.py:[A-Za-z_]\w*")


class DataOptions(Options):
    """The model (for its tokenizer) and how to read, render and split the data."""

    model_name_or_path: str = option(help="local Hugging Face folder, .gguf file, catalogue alias (slmops models "
                                          "list) or hub id", flags=("-m",), group="model")
    trust_remote_code: bool = option(False, "run the model repository's own Python code (off unless given)",
                                     group="model")
    data_name: str | None = option(None, "hub dataset, json|csv|parquet (with --data_files), or a path to a "
                                         ".json/.jsonl/.csv/.tsv/.parquet file", flags=("-d",), group="data")
    data_files: list[str] | None = option(None, "comma-separated data files", group="data")
    train_subset: str | None = option(None, "hub dataset configuration (subset) for training", group="data")
    train_split: str = option("train", "split with optional slice: train, train[:4096], train[:10%]",
                              group="data")
    eval_subset: str | None = option(None, "hub dataset configuration for validation (default: --train_subset)",
                                     group="data")
    eval_split: str | None = option(None, "validation split, same syntax; default: hold out --eval_fraction",
                                    group="data")
    eval_fraction: Share = option(0.1, "share held out for validation when no --eval_split (stratified by label)",
                                  group="data")
    max_eval_samples: PositiveInt = option(1000, "cap on the rows held out by --eval_fraction", group="data")
    text_template: str | None = option(None, r"row -> text, e.g. 'Review: {phrase}\nTone: {tone}'; the last "
                                             "placeholder and what follows is the response the loss covers",
                                       group="data")
    text_field: str | None = option(None, "column holding ready text (or the messages, with --use_chat_template)",
                                    group="data")
    use_chat_template: bool = option(False, "render a message list (column 'messages') with the tokenizer's chat "
                                            "template; the loss covers the assistant turns", group="data")
    max_seq_len: PositiveInt = option(1024, "truncate longer rows", group="data")
    max_samples: PositiveInt | None = option(None, "use at most this many training rows", group="data")
    train_on_prompt: bool = option(False, "compute the loss on the prompt as well as the response", group="data")
    add_eos: bool = option(True, "end each example with the EOS token so generation learns to stop", group="data")
    seed: int = option(42, "seed for the validation hold-out, initialisation and data order")
    stage: Literal["sft", "dpo", "orpo", "kto"] = option(
        "sft", "what the run learns from: sft (responses), dpo or orpo (preference pairs: prompt, chosen, "
               "rejected), kto (unpaired answers: prompt, completion, label), the last three through TRL")
    prompt_field: str = option("prompt", "preference stages: the prompt column (text, or messages with "
                                         "--use_chat_template)", group="data")
    chosen_field: str = option("chosen", "dpo, orpo: the preferred answer's column", group="data")
    rejected_field: str = option("rejected", "dpo, orpo: the other answer's column", group="data")
    completion_field: str = option("completion", "kto: the answer's column", group="data")
    label_field: str = option("label", "kto: the column saying whether the answer is desirable (true/false, 1/0)",
                              group="data")

    @field_validator("data_files", mode="before")
    @classmethod
    def _one_file(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def problems(self) -> list[str]:
        if self.stage != "sft":
            return [f"--stage {self.stage} reads the prompt and answers from their columns (--prompt_field and the "
                    f"others); drop --{flag}" for flag in ("text_template", "text_field") if getattr(self, flag)]
        found = []
        if self.text_template and self.text_field:
            found.append("--text_template and --text_field are exclusive: give one of them")
        if self.use_chat_template and self.text_template:
            found.append("--use_chat_template renders message lists; drop --text_template (name the messages "
                         "column with --text_field)")
        if not (self.text_template or self.text_field or self.use_chat_template):
            found.append("say how to turn a row into text: --text_template, --text_field or --use_chat_template")
        return found


class FinetuneOptions(DataOptions):
    """Everything `slmops finetune` takes besides TrainingArguments (those travel in `training_args`)."""

    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "dtype of the frozen base weights (auto: bf16 where the hardware has it, else fp32)", group="model")
    packing: bool = option(True, "lay each batch's rows end to end without padding, attention kept inside each "
                                 "row, where the model supports it (same examples and loss, less compute)",
                           group="method")
    share_prefix: bool | None = option(
        None, "with packing on CPU: compute once per batch the leading tokens every row shares and learns "
              "nothing from (template opening, system prompt); same logits and loss. Default: on where that is "
              "exact: nothing drops out (--lora_dropout 0, no dropout in the model). With dropout, true draws one "
              "mask for the shared tokens of a batch instead of one per row", group="method")
    text_pair_field: str | None = option(None, "sentence pairs: the second text column (the first is "
                                               "--text_field), for --loss contrastive or your own pair loss",
                                         group="data")
    pair_label_field: str = option("label", "with --text_pair_field: the column holding 1 (similar pair) or 0",
                                   group="data")
    method: str = option("lora", "fine-tuning method", group="method", choices=METHODS)
    lora_r: PositiveInt = option(16, "adapter rank", olive="r", group="method")
    lora_alpha: Positive = option(32, "adapter scaling numerator", olive="alpha", group="method")
    lora_dropout: Dropout = option(0.05, "adapter dropout", group="method")
    target_modules: list[str] | None = option(None, "comma-separated layer names (default: every linear layer "
                                                    "except the LM head)", group="method")
    modules_to_save: list[str] | None = option(None, "comma-separated layers trained fully besides the adapter",
                                               group="method")
    loss: str = option("cross_entropy", "cross_entropy (on the response tokens), label_smoothing, contrastive "
                                        "(sentence pairs), or FILE.py:ClassName, your torch.nn.Module called as "
                                        "loss(outputs, batch)", group="method")
    loss_args: dict[str, Any] = option({}, """the loss's keyword arguments as a JSON object, e.g. '{"margin": 1.0}'""",
                                       group="method")
    adapter_path: str | None = option(None, "an adapter (or `slmops finetune` output folder) to go on training "
                                            "instead of a new one: SFT, then --stage dpo from its adapter",
                                      group="method")
    beta: Positive | None = option(None, "dpo, kto: how far the model may move from the reference (lower: "
                                         "further); orpo: the weight of the preference term. TRL's default 0.1",
                                   group="method")
    output_path: str = option(help="output folder (adapter/, model/, manifest.json)", flags=("-o",))
    task_name: str | None = option(None, "free label for this adapter (recorded in the manifest)")
    overwrite: bool = option(False, "replace an existing --output_path", flags=("--overwrite_output_dir",))
    merge: bool = option(False, "also write the base model with the adapter merged in, as model/")
    quantization_aware: Literal["int4"] | None = option(
        None, "train the adapter against the base weights rounded as an int4 ONNX export holds them; "
              "`auto-opt --precision int4` then keeps the adapter in float beside the int4 base")
    num_threads: PositiveInt | None = option(None, "CPU threads to compute with (default: the cores not busy with "
                                                   "other work when the run starts)")
    early_stopping_patience: PositiveInt | None = option(
        None, "stop after this many evaluations without a better validation loss")
    eval_metrics: list[str] | None = option(None, "task metrics at each evaluation besides the loss: accuracy "
                                                  "(responses greedy decoding gets exactly right), f1 (macro, "
                                                  "over the labels); default both where the responses are "
                                                  "labels; '' for none")
    resume_from_checkpoint: str | None = option(None, "checkpoint folder, or 'auto' for the latest in this run")
    logging_dir: str | None = option(None, "TensorBoard folder (default OUTPUT/logs; with --report_to tensorboard)")
    training_args: dict[str, Any] = option({}, "Hugging Face TrainingArguments, passed through", cli=False)

    @model_validator(mode="before")
    @classmethod
    def _gather(cls, options: Any) -> Any:
        """TrainingArguments names given among the options move into `training_args`; a workflow file's
        `loss: {type: ..., args: {...}}` is `loss` plus `loss_args`."""
        if not isinstance(options, dict):
            return options
        ours = set(cls.model_fields) | {info.alias for info in cls.model_fields.values() if info.alias}
        theirs = [k for k in options if k not in ours]
        passed = set(theirs) & training_argument_names() if theirs else set()
        if passed:
            options = {k: v for k, v in options.items() if k not in passed} | {
                "training_args": {**(options.get("training_args") or {}), **{k: options[k] for k in theirs
                                                                             if k in passed}}}
        if isinstance(options.get("loss"), dict):
            block = dict(options["loss"])
            unknown = sorted(set(block) - {"type", "args"})
            if unknown or "type" not in block:
                raise ValueError(f"loss: expected {{type: NAME or FILE.py:ClassName, args: {{...}}}}, got keys "
                                 f"{', '.join(map(str, block)) or 'none'}")
            options = {**options, "loss": block["type"], "loss_args": block.get("args") or {}}
        return options

    def _preference_problems(self) -> list[str]:
        """What a preference stage cannot take: it has its own loss and scores pairs, not responses."""
        found = []
        if self.text_pair_field:
            found.append(f"--stage {self.stage} learns from answers to prompts; --text_pair_field is for sentence "
                         f"pairs with --stage sft")
        if self.loss != "cross_entropy":
            found.append(f"--stage {self.stage} trains with its own loss (TRL's); drop --loss {self.loss}")
        if self.eval_metrics:
            found.append(f"--stage {self.stage} reports reward accuracy and margins at each evaluation; drop "
                         f"--eval_metrics")
        return found

    @field_validator("method")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"got {value!r}; choose one of {', '.join(METHODS)}")
        return value

    @field_validator("loss_args", mode="before")
    @classmethod
    def _json_args(cls, value: Any) -> Any:
        """The CLI passes --loss_args as JSON text."""
        if not isinstance(value, str):
            return value
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON ({err}); give an object such as '{{\"margin\": 1.0}}'") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object such as '{{\"margin\": 1.0}}', got {json.dumps(value)}")
        return value

    def problems(self) -> list[str]:
        found = super().problems()
        if self.loss not in LOSSES and not USER_LOSS.fullmatch(self.loss):
            found.append(f"--loss: got {self.loss!r}; give a built-in ({', '.join(LOSSES)}) or FILE.py:ClassName "
                         f"naming your torch.nn.Module")
        if self.stage != "sft":
            found += self._preference_problems()
        elif self.text_pair_field:
            if not self.text_field or self.use_chat_template:
                found.append("--text_pair_field pairs two text columns: name the first with --text_field (no "
                             "--text_template or --use_chat_template)")
            if self.loss in TOKEN_LOSSES:
                found.append(f"--loss {self.loss} predicts tokens; sentence pairs (--text_pair_field) need --loss "
                             f"contrastive or your own FILE.py:ClassName")
            if self.eval_metrics:
                found.append("--eval_metrics score generated responses; sentence pairs (--text_pair_field) have "
                             "none: drop --eval_metrics")
        elif self.loss == "contrastive":
            found.append("--loss contrastive compares sentence pairs: name the second text column with "
                         "--text_pair_field (and its 0/1 label column with --pair_label_field)")
        if self.stage == "sft" and self.beta is not None:
            found.append("--beta weighs a preference loss: add --stage dpo, orpo or kto (or drop --beta)")
        if self.adapter_path and METHODS[self.method].build is None:
            found.append(f"--adapter_path goes on training an adapter; --method {self.method} trains every "
                         f"weight: merge the adapter first (slmops finetune --merge) and pass its model/ as -m")
        if self.method == "full" and self.merge:
            found.append("--merge has nothing to merge with --method full (it writes model/ already)")
        chosen = METHODS[self.method]
        if self.quantization_aware and (chosen.build is None or chosen.quantized):
            found.append(f"--quantization_aware trains an adapter against a frozen int4-rounded base; --method "
                         f"{self.method} has no such base (use lora, dora, loha, lokr or ia3)")
        if self.quantization_aware and self.merge:
            found.append("--quantization_aware with --merge: merging into float weights undoes what the adapter "
                         "learned; export it with auto-opt --precision int4 instead (kept unmerged)")
        unknown = sorted(set(self.eval_metrics or ()) - set(EVAL_METRICS))
        if unknown:
            found.append(f"--eval_metrics: unknown metric(s) {', '.join(unknown)}; known: {', '.join(EVAL_METRICS)}")
        return found

