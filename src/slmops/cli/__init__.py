"""The `slmops` executable: one thin module per command; flags come from the options models.

Errors the user can fix (`UsageError`) print one line and exit 2; `--log_level 0` shows tracebacks.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

from slmops.errors import UsageError

LOG_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR, 4: logging.CRITICAL}
QUIET_LIBRARIES = {"TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "critical",
                   "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   "HF_HUB_VERBOSITY": "error"}  # the hub warns that a data folder's README has no metadata


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (plus the hint to --help) and exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log_level", type=int, default=1, choices=sorted(LOG_LEVELS),
                        help="0 debug (with tracebacks), 1 info (default), 2 warning, 3 error, 4 critical")


def add_save_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save_config_file", metavar="FILE",
                        help="also write the workflow this command runs (.yaml or .json) for `slmops run --config`")


def columns(header: list[str], rows: list[list[str]]) -> list[str]:
    """A plain-text table: the first column left-aligned, the numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in [header, *rows]]


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, so a redirected or captured stderr keeps working."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING, force=True,
                        handlers=[_Stderr()])
    logging.getLogger("slmops").setLevel(LOG_LEVELS[level])
    if level > 0:
        # through the variables the libraries read at import, so that a command that fails before it needs
        # them (a wrong path, a bad option) does not import them (~2 s); datasets' read errors reach the
        # user as ours
        os.environ.update(QUIET_LIBRARIES)
        if "datasets" in sys.modules:  # already imported (the Python API, a test): told directly
            sys.modules["datasets"].disable_progress_bars()
            sys.modules["datasets"].logging.set_verbosity(logging.CRITICAL)
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.set_verbosity_error()
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore")


def build_parser(chosen: str | None = None) -> tuple[Parser, dict[str, Callable[[argparse.Namespace], int]]]:
    """Every command's parser; only `chosen` gets its TrainingArguments flags (importing them costs seconds)."""
    from slmops.cli import benchmark, data, evaluate, export, finetune, generate, models, report, review, run, serve

    parser = Parser(prog="slmops", description="Fine-tune, evaluate, optimise and ship small language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    for module in (finetune, generate, models, data, report, evaluate, benchmark, export, run, serve, review):
        handlers.update(module.register(sub, full=module.__name__.endswith(f".{chosen}")))
    return parser, handlers


def main(argv: list[str] | None = None, whole_process: bool = False) -> int:
    """One command. `whole_process`: the command is all this process will run (the executable), so what
    it cannot use may be left out of the process."""
    argv = sys.argv[1:] if argv is None else argv
    parser, handlers = build_parser(next((a for a in argv if not a.startswith("-")), None))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad flag already reported in one line
        return int(exit_.code or 0)
    setup_logging(args.log_level)
    if whole_process and not _may_need_bitsandbytes(args):
        # peft imports bitsandbytes wherever it is installed (~1 s, and a warning about a CPU kernel only
        # QLoRA could use); hidden from a process that will load no 4- or 8-bit model
        sys.modules.setdefault("bitsandbytes", None)  # type: ignore[arg-type]
    try:
        return handlers[args.command](args)
    except Exception as err:
        if args.log_level == 0:
            raise
        message = _user_message(err)
        if message is None:
            raise
        print(f"slmops {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slmops {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `slmops` executable: `main`, then exit without the interpreter's last garbage collection, which
    walks every object torch, transformers and peft created at import (~1 s after each command). Objects
    are still freed as their last reference goes; only cycles are left to the operating system."""
    code = main(whole_process=True)
    gc.disable()
    gc.freeze()
    sys.exit(code)


def _may_need_bitsandbytes(args: argparse.Namespace) -> bool:
    """False only where it is certain: `finetune` with a method that does not quantize (not qlora) of a
    catalogue model or a local folder whose config.json names no quantization (a hub model or a folder
    saved in 4 or 8 bits needs bitsandbytes to load)."""
    from slmops.models import catalog
    from slmops.options.finetune_options import FinetuneOptions
    from slmops.options.methods import METHODS

    options = vars(args)
    if args.command != "finetune" or \
            METHODS[options.get("method", FinetuneOptions.model_fields["method"].default)].quantized:
        return True
    model = options.get("model_name_or_path") or ""
    if catalog.is_alias(model):
        return False
    try:
        return "quantization_config" in json.loads((Path(model).expanduser() / "config.json").read_text())
    except (OSError, ValueError):  # a hub id, or no readable config: the command says what is wrong
        return True


def _user_message(err: Exception) -> str | None:
    """The one-line message for failures a user can act on; None means a bug (keep the traceback)."""
    if isinstance(err, UsageError):
        return str(err)
    torch = sys.modules.get("torch")  # a command that never imported torch cannot have run out of its memory
    if isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError)):
        return ("out of memory; lower --per_device_train_batch_size or --max_seq_len, or add "
                "--gradient_checkpointing true")
    return None
