"""`slmops evaluate` and the Evaluate pass: a model (plus adapter), one data split, the metrics."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import field_validator

from slmops.options.fields import PositiveInt, option
from slmops.options.finetune_options import DataOptions

METRICS = ("accuracy", "f1", "exact_match", "perplexity", "bleu", "rouge", "latency", "throughput")


class EvaluateOptions(DataOptions):
    """The data options as `finetune` reads them (so its flags paste unchanged), plus what to measure."""

    # finetune's data flags that evaluation does not use: accepted, not shown in --help
    unused: ClassVar[tuple[str, ...]] = ("eval_fraction", "max_eval_samples", "max_seq_len", "train_on_prompt",
                                         "add_eos", "seed")

    model_name_or_path: str | None = option(None, "local Hugging Face folder, .gguf, catalogue alias, hub id, or "
                                                  "ONNX Runtime GenAI folder (default: the adapter's base model)",
                                            flags=("-m",), group="model")
    adapter_path: str | None = option(None, "adapter folder, or a `slmops finetune` output folder; without -m, "
                                            "the base model recorded in the adapter. For an ONNX multi-adapter "
                                            "folder: the adapter's name", flags=("--adapter",), group="model")
    eval_split: str | None = option(None, "split to evaluate, with an optional slice (default: --train_split, all "
                                          "rows of a file)", olive="split", group="data")
    max_samples: PositiveInt | None = option(None, "evaluate only the first N rows", group="data")
    metrics: list[str] | None = option(None, f"comma-separated, from {','.join(METRICS)} (default: accuracy,f1 for "
                                             f"labels; exact_match,bleu,rouge for generation)", group="evaluation")
    predict: Literal["likelihood", "generate"] = option(
        "likelihood", "for labels: 'likelihood' picks the label the model scores highest after the prompt; "
                      "'generate' decodes greedily and matches the answer to a label", group="evaluation")
    batch_size: PositiveInt = option(16, "sequences per forward pass", group="evaluation")
    max_new_tokens: PositiveInt | None = option(None, "generation budget (default: the longest label plus 2 tokens, "
                                                      "or 128)", group="evaluation")
    output_path: str | None = option(None, "write results.json and manifest.json into this folder (a path ending "
                                           "in .json: write that results file alone)", flags=("-o",))

    @field_validator("metrics", mode="before")
    @classmethod
    def _known(cls, value: Any) -> Any:
        names = [m.strip() for m in (value.split(",") if isinstance(value, str) else value or []) if m.strip()]
        unknown = [m for m in names if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {','.join(METRICS)}")
        return list(dict.fromkeys(names)) or None

    def problems(self) -> list[str]:
        found = super().problems()
        if self.model_name_or_path is None and self.adapter_path is None:
            found.append("pass --model_name_or_path, or --adapter_path to use the adapter's base model")
        return found
