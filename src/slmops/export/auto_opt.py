"""`slmops auto-opt`: a model (plus adapter) -> an ONNX Runtime GenAI folder that passed the parity gate."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from slmops.artifacts.folders import folder_mb, publish, refuse_existing, work_dir
from slmops.artifacts.manifest import write_manifest
from slmops.errors import ParityError, UsageError, first_line
from slmops.export import calibrated, parity, torch_onnx
from slmops.export.builder import UnsupportedArchitecture, build, check_provider, lora_kept_float
from slmops.export.source import Source, find_source, load_reference, run_data, save_for_builder, trained_for
from slmops.models.genai import GenaiModel
from slmops.options.export_options import CALIBRATED, ExportOptions, Target
from slmops.options.finetune_options import DataOptions

log = logging.getLogger(__name__)


def check_target(opts: Target) -> tuple[Path, str]:
    """What can be refused before a model is loaded: (output folder, the builder's provider name)."""
    out = Path(opts.output_path).expanduser()
    refuse_existing(out, opts.overwrite)
    return out, check_provider(opts.execution_provider, opts.device)


def auto_opt(opts: ExportOptions) -> Path:
    """Export, check parity, and publish `output_path`; raises ParityError below the precision's thresholds."""
    started = time.perf_counter()
    out, ep = check_target(opts)
    source = find_source(opts.model_name_or_path, opts.adapter_path)
    aware = trained_for(source)
    calibration_data = plan(opts, source, aware)
    precision, exporter, trust_remote_code = opts.precision, opts.exporter, opts.trust_remote_code
    unmerged = aware is not None and aware == precision and exporter != "torch" and calibration_data is None
    if aware and not unmerged:  # LoRA beside the int4 base needs the builder and its RTN rounding
        log.warning("the adapter was trained for a %s export; at %s it is merged into the weights instead",
                    aware, precision)
    if unmerged and not Path(source.base).is_dir():
        raise UsageError(f"exporting a quantization-aware adapter needs its base model as a local folder; "
                         f"{source.base} is not one (pull it, or pass the folder with --model_name_or_path)")
    model, tokenizer = load_reference(source, trust_remote_code, int4_base=unmerged)
    calibration, calibration_used = read_calibration(opts, calibration_data, tokenizer)
    work = work_dir(out)
    try:
        with tempfile.TemporaryDirectory(dir=work.parent, prefix=f".{out.name}-merged-") as tmp:
            log.info("exporting %s%s to ONNX (%s, %s)", source.base, f" + {source.adapter}" if source.adapter else "",
                     precision, opts.execution_provider)
            used = "builder"
            if unmerged:  # int4 base, the adapter beside it in float: the weights it was trained against
                probe = Path(tmp) / "probe"
                probe.mkdir()
                build(Path(source.base), probe, "fp32", ep, {"adapter_path": str(source.adapter)}, trust_remote_code)
                build(Path(source.base), work, precision, ep,
                      {**lora_kept_float(probe, source.adapter), **opts.quantizer(precision, trained_on_rtn=True)},
                      trust_remote_code)
            else:
                used = export_merged(model, tokenizer, source, Path(tmp), work, opts, calibration)
        built = time.perf_counter()
        items, origin = parity.probes(tokenizer, source.manifest, opts.parity_prompts)
        result = parity.check(model, tokenizer, GenaiModel(work), precision, items, origin)
        parity.write(work, [result])
        adapter = str(source.adapter) if source.adapter else None
        write_manifest(work / "manifest.json", "auto-opt", {**opts.model_dump(), "provider": opts.execution_provider}, {
            "base_model": source.base, "exporter": used, "adapter": adapter,
            "adapter_merged": source.adapter is not None and not unmerged,
            "adapter_float_beside_int4_base": unmerged, "calibration": calibration_used,
            "algorithm": algorithm_used(opts, calibration is not None, used, unmerged)}, {}, {
            "parity": result, "export_seconds": round(built - started, 2),
            "wall_time_s": round(time.perf_counter() - started, 2), "size_mb": folder_mb(work)})
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info(parity.verdict(result))
    publish_checked(work, out, [result], f"the {precision} export")
    log.info("wrote %s (%.0f MB) in %.0f s", out, folder_mb(out), time.perf_counter() - started)
    return out


def plan(opts: ExportOptions, source: Source, aware: str | None) -> DataOptions | None:
    """The calibration rows' data options when the weights will be calibrated: under `--algorithm auto`, at
    int4 when rows are known (the user's data flags, or the finetune run's own training data) and the
    builder exports, unless the adapter was trained quantization-aware (it keeps the RTN rounding it learnt
    beside). Otherwise auto means k-quant at int4 and RTN at int8, which loses nothing."""
    auto_calibrates = opts.algorithm == "auto" and opts.precision == "int4" and aware != opts.precision \
        and opts.exporter != "torch"
    if opts.algorithm not in CALIBRATED and not auto_calibrates:
        return None
    data = opts.calibration_data(source.base) or (run_data(source.manifest) if source.manifest else None)
    if data is None and opts.algorithm in CALIBRATED:
        raise UsageError(f"--algorithm {opts.algorithm} calibrates on rows of data: pass --data_name (with "
                         f"--text_template or --text_field), or quantize a `slmops finetune` output folder, whose "
                         f"training data it uses; --algorithm k_quant needs none")
    return data


def read_calibration(opts: ExportOptions, data: DataOptions | None,
                     tokenizer: Any) -> tuple[list[torch.Tensor] | None, dict | None]:
    """The calibration sequences and what they hold; under `--algorithm auto`, rows that cannot be read (a
    finetune run's data moved since) mean k-quant instead of an error."""
    if data is None:
        return None, None
    try:
        return calibrated.calibration_sequences(data, tokenizer, opts.max_samples)
    except UsageError as err:
        if opts.algorithm != "auto":
            raise
        log.warning("calibration rows: %s; quantizing with k_quant instead", err)
        return None, None


def algorithm_used(opts: ExportOptions, calibrated_weights: bool, exporter: str, unmerged: bool) -> str | None:
    """What rounded the weights, for the manifest (`--algorithm auto` made concrete)."""
    if opts.precision not in ("int4", "int8"):
        return None
    if exporter == "torch.onnx":
        return "rtn"
    if calibrated_weights:
        return "autoround"
    algo = opts.quantizer(opts.precision, trained_on_rtn=unmerged)["algo_config"]
    return "rtn" if algo == "default" else algo


def export_merged(model: Any, tokenizer: Any, source: Source, tmp: Path, work: Path, opts: ExportOptions,
                  calibration: list[torch.Tensor] | None = None) -> str:
    """The builder's fused graph where it knows the architecture, torch.onnx elsewhere (or when asked);
    returns which one wrote `work`. With `calibration`, AutoRound rounds the weights first."""
    precision, ep = opts.precision, check_provider(opts.execution_provider, opts.device)
    if opts.exporter != "torch":
        try:
            if calibration is not None:
                hf_dir = calibrated.autoround(model, tokenizer, calibration, tmp / "autoround", opts.block_size,
                                              opts.seed, work / "quantize.log")
            else:
                hf_dir = save_for_builder(model, tokenizer, source, tmp)
            build(hf_dir, work, precision, ep, opts.quantizer(precision), opts.trust_remote_code)
            return "builder"
        except UnsupportedArchitecture as err:
            if opts.exporter == "builder":
                raise
            if opts.algorithm in ("k_quant", *CALIBRATED) and precision in ("int4", "int8"):
                raise UsageError(f"--algorithm {opts.algorithm}: {first_line(err)}; torch.onnx, which exports it "
                                 f"instead, quantizes with rtn only: pass --algorithm rtn") from None
            log.info("%s; exporting with torch.onnx instead (a graph without the builder's fused operators)",
                     first_line(err).split(" (")[0])
            for leftover in work.iterdir():
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    torch_onnx.export(model, tokenizer, work, precision, ep, opts.block_size, opts.accuracy_level)
    return "torch.onnx"


def publish_checked(work: Path, out: Path, results: list[dict], what: str) -> None:
    """Publish `work` as `out` when every parity check passed; otherwise keep it as OUT.failed and raise."""
    failing = [r for r in results if not r["passed"]]
    if not failing:
        publish(work, out)
        return
    failed = out.with_name(out.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    work.rename(failed)
    who = ", ".join(f"adapter {r['adapter']}" if r.get("adapter") else what for r in failing)
    raise ParityError(f"{who} does not match the PyTorch model closely enough (see {failed}/parity.json); "
                      f"not published to {out}. Try a higher --precision")
