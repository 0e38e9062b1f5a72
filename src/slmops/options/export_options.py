"""`auto-opt`, `generate-adapter` and the merge pass: what to export, for which device, at which precision."""

from __future__ import annotations

from typing import Literal

from slmops.options.fields import Options, PositiveInt, option

PRECISIONS = ("fp32", "fp16", "int8", "int4")
PROVIDERS = {  # provider -> (builder execution provider, device, what to install when it is missing)
    "CPUExecutionProvider": ("cpu", "cpu", "onnxruntime-genai"),
    "CUDAExecutionProvider": ("cuda", "gpu", "onnxruntime-genai-cuda (pip install onnxruntime-genai-cuda)"),
    "DmlExecutionProvider": ("dml", "gpu", "onnxruntime-genai-directml on Windows (pip install "
                                           "onnxruntime-genai-directml)"),
}
DEFAULT_PROVIDER = {"cpu": "CPUExecutionProvider", "gpu": "CUDAExecutionProvider"}
Precision = Literal[PRECISIONS]  # type: ignore[valid-type]
Provider = Literal[tuple(PROVIDERS)]  # type: ignore[valid-type]


class Target(Options):
    """Where an export goes and what it must run on."""

    device: Literal["cpu", "gpu"] = option("cpu", "target device", group="export")
    provider: Provider | None = option(None, "execution provider (default: CPUExecutionProvider on cpu, "
                                             "CUDAExecutionProvider on gpu)", group="export")
    trust_remote_code: bool = option(False, "run the model repository's own Python code (off unless given)",
                                     group="model")
    output_path: str = option(help="output folder", flags=("-o",))
    overwrite: bool = option(False, "replace an existing --output_path")

    @property
    def execution_provider(self) -> str:
        return self.provider or DEFAULT_PROVIDER[self.device]


class ExportOptions(Target):
    """`slmops auto-opt`: a model (plus adapter) as an ONNX Runtime GenAI folder that passed the parity gate."""

    model_name_or_path: str | None = option(None, "model folder, .gguf, catalogue alias, hub id, or a `slmops "
                                                  "finetune` output folder (its adapter is merged)", flags=("-m",),
                                            group="model")
    adapter_path: str | None = option(None, "LoRA adapter folder (or finetune output folder) merged into the "
                                            "weights before export", flags=("-a",), group="model")
    precision: Precision = option("fp32", "weight precision", group="export")
    use_ort_genai: bool = option(True, "write an ONNX Runtime GenAI folder (always on: the builder writes one; "
                                       "accepted for Olive compatibility)", group="export")
    exporter: Literal["auto", "builder", "torch"] = option(
        "auto", "auto: onnxruntime-genai's model builder, or torch.onnx for architectures it does not know; "
                "builder or torch: only that one", group="export")
    parity_prompts: PositiveInt = option(16, "prompts for the parity check (from the adapter's training data "
                                             "when known)", group="export")

    def problems(self) -> list[str]:
        found = []
        if not self.use_ort_genai:
            found.append("--use_ort_genai false: slmops writes ONNX Runtime GenAI folders only (they hold a plain "
                         "model.onnx too); drop the flag")
        if self.model_name_or_path is None and self.adapter_path is None:
            found.append("pass --model_name_or_path (and optionally --adapter_path)")
        return found


class ExtractAdaptersOptions(Target):
    """`slmops generate-adapter`: one ONNX base whose LoRA weights are inputs, one file per adapter."""

    base_model_path: str = option(help="the base model the adapters were trained on (folder, .gguf, alias or "
                                       "hub id)", flags=("-m", "--model_name_or_path"), group="model")
    adapter_paths: list[str] | None = option(None, "comma-separated adapter folders or `slmops finetune` output "
                                                   "folders (in a workflow: the adapter trained so far)",
                                             group="model")
    adapter_names: list[str] | None = option(None, "comma-separated names, one per adapter (default: the run's "
                                                   "--task_name, else the folder name)", group="model")
    precision: Precision = option("fp32", "base weight precision (adapter weights stay fp32: they are inputs, "
                                          "not quantizable)", group="export")
    exporter: Literal["auto", "builder"] = option("auto", "LoRA as graph inputs needs the model builder's graph",
                                                  group="export")
    parity_prompts: PositiveInt = option(8, "prompts per adapter for the parity check", group="export")

    def problems(self) -> list[str]:
        if self.adapter_names is not None and self.adapter_paths is not None \
                and len(self.adapter_names) != len(self.adapter_paths):
            return [f"--adapter_names gives {len(self.adapter_names)} names for {len(self.adapter_paths)} "
                    f"adapters; give one name per adapter"]
        return []


class MergeOptions(Options):
    """The merge pass: the base with its adapter merged in, as a plain Hugging Face folder."""

    model_name_or_path: str = option(help="the base model", group="model")
    adapter_path: str | None = option(None, "the adapter to merge (in a workflow: the one trained so far)",
                                      group="model")
    trust_remote_code: bool = option(False, "run the model repository's own Python code", group="model")
    output_path: str = option(help="output folder", flags=("-o",))
    overwrite: bool = option(False, "replace an existing --output_path")
