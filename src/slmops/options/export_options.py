"""`auto-opt`, `generate-adapter` and the merge pass: what to export, for which device, at which precision."""

from __future__ import annotations

from typing import Literal

from slmops.options.fields import Options, PositiveInt, option
from slmops.options.finetune_options import DataOptions

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


BLOCK_SIZES = (16, 32, 64, 128, 256)
INT8_LAYERS = ("last_matmul", "mixed_layers")


CALIBRATED = ("autoround",)  # algorithms that measure the model on rows of data


class Quantization(Options):
    """How int4 and int8 weights are made: ONNX Runtime's MatMulNBits quantizers through the model builder, or
    Intel's AutoRound on the PyTorch model with the builder packing its result.

    Measured on SmolLM2-135M with the README's SST-2 adapter merged (docs/export.md): RTN loses 7.8 points of
    dev accuracy at int4 and k-quant 5.4, so k-quant is the uncalibrated int4 default; AutoRound, calibrated
    on the adapter's own training rows, keeps it within a point; int8 loses nothing with either."""

    algorithm: Literal["auto", "rtn", "k_quant", "autoround"] = option(
        "auto", "weight quantizer: rtn (round to nearest, seconds), k_quant (llama.cpp's k-quant scale search, "
                "~30 s for 135M) or autoround (int4: Intel's AutoRound tunes the rounding on calibration rows, "
                "minutes); auto: autoround at int4 when calibration data is known (a finetune output folder, "
                "or --data_name), else k_quant; rtn at int8", group="export")
    block_size: PositiveInt = option(32, f"weights sharing one scale, one of {', '.join(map(str, BLOCK_SIZES))}",
                                     olive="int4_block_size", group="export")
    accuracy_level: int | None = option(None, "precision of MatMulNBits' activations: 1 fp32, 2 fp16, 3 bf16, 4 "
                                              "int8 (default: 4 on CPU, the fastest; 1 measured no more accurate)",
                                        olive="int4_accuracy_level", group="export")
    int8_layers: list[str] = option([], f"int4 exports: MatMuls kept at int8, from {', '.join(INT8_LAYERS)} "
                                        f"(last_matmul: the LM head; mixed_layers: llama.cpp's most sensitive, the "
                                        f"first and last eighth of layers and every third layer's q/k/v, v and "
                                        f"down projections)", group="export")

    def quantizer(self, precision: str, trained_on_rtn: bool = False) -> dict[str, str]:
        """The model builder's options for these settings at `precision` (none for fp32/fp16). An adapter
        trained on the RTN-rounded base (`--quantization_aware`) gets RTN under auto: the weights it learnt
        beside. RTN is the builder's `default` method, the rounding `models.fake_quant` mirrors."""
        if precision not in ("int4", "int8"):
            return {}
        algorithm = self.algorithm
        if algorithm == "auto" or algorithm in CALIBRATED:  # calibrated: the builder rounds only the LM head
            algorithm = "k_quant" if precision == "int4" and not trained_on_rtn else "rtn"
        built = {"algo_config": {"rtn": "default"}.get(algorithm, algorithm), "block_size": str(self.block_size)}
        if self.accuracy_level is not None:
            built["accuracy_level"] = str(self.accuracy_level)
        if self.int8_layers:
            built["matmul_mixed_precision"] = ",".join(f"{layer}:int8" for layer in self.int8_layers)
        return built

    def quantization_problems(self, precision: str) -> list[str]:
        found = []
        if self.block_size not in BLOCK_SIZES:
            found.append(f"--block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        if self.accuracy_level is not None and not 0 <= self.accuracy_level <= 4:
            found.append(f"--accuracy_level must lie in 0..4, got {self.accuracy_level}")
        unknown = [layer for layer in self.int8_layers if layer not in INT8_LAYERS]
        if unknown:
            found.append(f"--int8_layers: unknown {', '.join(unknown)}; choose from {', '.join(INT8_LAYERS)}")
        elif self.int8_layers and precision != "int4":
            found.append(f"--int8_layers keeps layers of an int4 export at int8; --precision is {precision}")
        if self.algorithm in CALIBRATED and precision != "int4":
            found.append(f"--algorithm {self.algorithm} makes int4 weights; at --precision {precision} use rtn "
                         f"(int8 loses nothing measurable)")
        elif self.algorithm in CALIBRATED and "mixed_layers" in self.int8_layers:
            found.append(f"--int8_layers mixed_layers applies to rtn and k_quant; --algorithm {self.algorithm} "
                         f"rounds every layer at int4 (keep last_matmul only)")
        return found


_DATA = DataOptions.model_fields


class Calibration(Options):
    """The rows a calibrated algorithm measures the model on: `finetune`'s data flags, so a training command's
    data part pastes unchanged. Without them, a finetune output folder's own training data is used."""

    data_name: str | None = _DATA["data_name"]
    data_files: list[str] | None = _DATA["data_files"]
    train_subset: str | None = _DATA["train_subset"]
    train_split: str = _DATA["train_split"]
    text_template: str | None = _DATA["text_template"]
    text_field: str | None = _DATA["text_field"]
    use_chat_template: bool = _DATA["use_chat_template"]
    max_samples: PositiveInt = option(256, "calibration rows (the first N of the split)", group="data")
    seed: int = option(42, "seed of the calibrated algorithm")

    def names_data(self) -> bool:
        return self.data_name is not None or bool(self.data_files)

    def calibration_data(self, model_name_or_path: str) -> DataOptions | None:
        """The data options for the calibration rows, when the user named data."""
        if not self.names_data():
            return None
        fields = {k: getattr(self, k) for k in Calibration.model_fields if k in DataOptions.model_fields}
        return DataOptions(model_name_or_path=model_name_or_path, **fields)

    def calibration_problems(self, algorithm: str, precision: str) -> list[str]:
        named = self.names_data()
        if named and algorithm not in CALIBRATED and (algorithm != "auto" or precision != "int4"):
            what = f"--algorithm {algorithm}" if algorithm != "auto" else f"--precision {precision}"
            return [f"--data_name and --data_files give calibration rows, which {what} does not read; drop them, "
                    f"or quantize at int4 with --algorithm autoround"]
        if named and not (self.text_template or self.text_field or self.use_chat_template):
            return ["say how to turn a calibration row into text: --text_template, --text_field or "
                    "--use_chat_template"]
        return []


class ExportOptions(Target, Quantization, Calibration):
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
        return (found + self.quantization_problems(self.precision)
                + self.calibration_problems(self.algorithm, self.precision))


class ExtractAdaptersOptions(Target, Quantization):
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
        if self.algorithm in CALIBRATED:
            return [f"--algorithm {self.algorithm} tunes one merged model's weights; generate-adapter keeps the "
                    f"adapters beside one base: use k_quant, or quantize each adapter merged (slmops quantize)"]
        return self.quantization_problems(self.precision)


class MergeOptions(Options):
    """The merge pass: the base with its adapter merged in, as a plain Hugging Face folder."""

    model_name_or_path: str = option(help="the base model", group="model")
    adapter_path: str | None = option(None, "the adapter to merge (in a workflow: the one trained so far)",
                                      group="model")
    trust_remote_code: bool = option(False, "run the model repository's own Python code", group="model")
    output_path: str = option(help="output folder", flags=("-o",))
    overwrite: bool = option(False, "replace an existing --output_path")


class QuantizeOptions(ExportOptions):
    """`slmops quantize`: `auto-opt` at int4 or int8, Olive's quantize flags; the same pass, the same parity gate."""

    precision: Literal["int4", "int8"] = option("int4", "weight precision", group="export")
