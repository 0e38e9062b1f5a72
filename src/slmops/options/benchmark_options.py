"""`slmops benchmark`: lm-evaluation-harness tasks on one model, or on several side by side."""

from __future__ import annotations

from typing import Literal

from slmops.options.fields import Options, PositiveInt, option


class BenchmarkOptions(Options):
    model_name_or_path: str | None = option(None, "local Hugging Face folder, .gguf, catalogue alias, hub id, or "
                                                  "ONNX Runtime GenAI folder (default: the adapter's base model)",
                                            flags=("-m",), group="model")
    adapter_path: str | None = option(None, "adapter folder, or a `slmops finetune` output folder (its report page "
                                            "then shows the scores); for an exported multi-adapter folder: the "
                                            "adapter's name", flags=("--adapter",), group="model")
    compare: list[str] = option([], "several models scored on the same tasks, one column each: MODEL, "
                                    "MODEL@ADAPTER or @ADAPTER (its recorded base); replaces -m/--adapter_path",
                                group="model", metavar="MODEL,...")
    trust_remote_code: bool = option(False, "run the model repository's own Python code (off unless given)",
                                     group="model")
    tasks: list[str] = option(..., "lm-eval task or group names, or paths to task YAML files or folders of them "
                                   "(lm-eval's own format; data from local json/csv/parquet files works offline)",
                              group="evaluation", metavar="TASK,...")
    backend: Literal["auto", "torch", "ort", "ortgenai"] = option(
        "auto", "auto: ONNX Runtime GenAI for an exported folder, PyTorch otherwise; naming one checks the model "
                "is of that kind (ort, Olive's name, is the same as ortgenai: exported folders run on ONNX Runtime "
                "through its GenAI layer)", group="evaluation")
    device: Literal["auto", "cpu", "gpu"] = option("auto", "PyTorch models: gpu (CUDA) when present under auto",
                                                   group="evaluation")
    num_fewshot: int | None = option(None, "examples in each prompt (default: the task's own)", group="evaluation")
    limit: float | None = option(None, "score only the first N documents of each task (below 1: that fraction); "
                                       "for quick checks, not for reported figures", group="evaluation")
    batch_size: PositiveInt = option(8, "requests per forward pass", group="evaluation")
    seed: int = option(1234, "seed of the harness's sampling (few-shot examples, bootstrap of standard errors)")
    output_path: str | None = option(None, "write lm-eval's results JSON for each model, benchmark.json (the "
                                           "table) and manifest.json into this folder", flags=("-o",))

    def problems(self) -> list[str]:
        found = []
        if self.compare and (self.model_name_or_path or self.adapter_path):
            found.append("--compare names every model itself (MODEL, MODEL@ADAPTER or @ADAPTER); drop "
                         "-m/--adapter_path")
        elif not self.compare and self.model_name_or_path is None and self.adapter_path is None:
            found.append("pass --model_name_or_path, --adapter_path (its base model is recorded) or --compare")
        if not self.tasks:
            found.append("--tasks is empty; name at least one lm-eval task or task YAML")
        if self.limit is not None and self.limit <= 0:
            found.append(f"--limit must be positive, got {self.limit}")
        return found
