"""Find the rows: a hub dataset, a builder plus files, or a direct path, with `datasets` slicing.

Local files are checked before `datasets` sees them, because its own errors for a bad line
are a long traceback from deep inside a generator; ours name the file and the line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slmops.errors import UsageError, first_line

if TYPE_CHECKING:  # datasets takes ~0.6 s to import: only the commands that load rows pay it
    from datasets import Dataset

log = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
LOCAL_BUILDERS = ("json", "csv", "parquet")


def load_split(data_name: str | None, data_files: list[str] | None, split: str,
               subset: str | None = None) -> Dataset:
    """Load one split (`train`, `train[:4096]`, `train[:10%]`) of a hub subset, and refuse an empty one."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError
    from pyarrow import ArrowException

    builder, kwargs = _resolve_source(data_name, data_files)
    if subset:
        kwargs["name"] = subset
    try:
        rows = load_dataset(builder, split=split, **kwargs)
    except (ArrowException, DatasetGenerationError) as err:  # before ValueError: ArrowInvalid is one
        raise _unreadable(data_name, data_files, err) from None
    except (ValueError, KeyError) as err:
        raise UsageError(f"cannot take split {split!r} of {_describe_source(data_name, data_files)}: "
                         f"{first_line(err)}; use a split name with an optional slice such as "
                         f"train, train[:4096], train[4096:4224] or train[:10%]") from None
    except FileNotFoundError as err:
        raise UsageError(f"dataset {data_name!r} is neither a local file nor a dataset in the Hugging "
                         f"Face cache ({first_line(err)}); pass a path to a .json/.jsonl/.csv/.tsv/"
                         f".parquet file, or download the dataset while online first") from None
    except Exception as err:  # datasets wraps reader failures in many types
        if builder not in LOCAL_BUILDERS:
            raise UsageError(f"could not load dataset {data_name!r}: {first_line(err)}; check the name, "
                             f"or pass a local file") from None
        raise _unreadable(data_name, data_files, err) from None
    if len(rows) == 0:
        raise UsageError(f"split {split!r} of {_describe_source(data_name, data_files)} has no rows; "
                         f"check the slice or the file")
    return rows


def hold_out(rows: Dataset, fraction: float, seed: int, stratify_values: list | None) -> tuple[Dataset, Dataset]:
    """Carve a validation set off `rows`, per class when the response is a label.

    Stratifying matters for the small, imbalanced label sets typical of classification:
    a plain random 10% of 200 rows can miss a rare class entirely.
    """
    if len(rows) < 2:
        raise UsageError(f"only {len(rows)} training row(s): too few to hold out a validation set; "
                         f"add rows or pass --eval_split")
    rng = np.random.default_rng(seed)
    groups = [np.arange(len(rows))]
    if stratify_values is not None:
        values = np.asarray([str(v) for v in stratify_values])
        groups = [np.flatnonzero(values == v) for v in np.unique(values)]
    held = []
    for idx in groups:
        take = int(round(len(idx) * fraction))
        if stratify_values is not None and len(idx) >= 2:
            take = max(take, 1)  # every class with two or more rows is seen in validation
        held.extend(rng.permutation(idx)[:take].tolist())
    if not held:
        held = [int(rng.integers(len(rows)))]
    held_set = set(held)
    keep = [i for i in range(len(rows)) if i not in held_set]
    return rows.select(keep), rows.select(sorted(held))


def local_files(data_name: str | None, data_files: list[str] | None) -> list[str]:
    """The local data files a source names, each checked to exist and be readable (none for a hub dataset
    or a folder of splits). Cheap, so that a command can refuse a wrong path before it loads a model."""
    if data_name and not data_files and Path(data_name).expanduser().is_dir():
        return []
    if data_name and not data_files and (os.path.exists(data_name) or Path(data_name).suffix in BUILDERS):
        data_files = [data_name]
    files = [str(Path(f).expanduser()) for f in data_files or []]
    for f in files:
        _check_file(f)
    return files


def _resolve_source(data_name: str | None, data_files: list[str] | None) -> tuple[str, dict]:
    if data_name is None and not data_files:
        raise UsageError("no data given: pass --data_name (a hub dataset or a file path) or "
                         "--data_name json|csv|parquet --data_files FILE")
    if data_name and not data_files and Path(data_name).expanduser().is_dir():
        return str(Path(data_name).expanduser()), {}  # a folder of split files (train.jsonl, validation.jsonl, ...)
    files = local_files(data_name, data_files)
    if files:
        data_name = None if not data_files else data_name
        suffixes = {Path(f).suffix.lower() for f in files}
        builder = data_name or BUILDERS.get(next(iter(suffixes)), "")
        if builder not in LOCAL_BUILDERS:
            raise UsageError(f"cannot tell how to read {files[0]}: use --data_name json|csv|parquet "
                             f"with --data_files, or a file ending in {', '.join(BUILDERS)}")
        kwargs: dict = {"data_files": files}
        if builder == "csv" and suffixes == {".tsv"}:
            kwargs["delimiter"] = "\t"
        if builder == "json":
            for f in files:
                _check_json(f)
        return builder, kwargs
    if data_name in LOCAL_BUILDERS:
        raise UsageError(f"--data_name {data_name} needs --data_files FILE[,FILE...]")
    return data_name, {}


def _check_file(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"data file not found: {path}; check the path")
    if p.is_dir():
        raise UsageError(f"{path} is a folder; pass the data file inside it")
    if Path(path).suffix.lower() not in BUILDERS:
        raise UsageError(f"{path}: unsupported file type; use .json, .jsonl, .csv, .tsv or .parquet")
    try:
        with open(p, "rb") as fh:
            fh.read(1)
    except OSError as err:
        raise UsageError(f"cannot read data file {path}: {err.strerror}; check its permissions") from None


def _check_json(path: str) -> None:
    """Accept JSON Lines or one JSON array of objects; report the first bad line."""
    with open(path, encoding="utf-8", errors="strict") as fh:
        try:
            text = fh.read()
        except UnicodeDecodeError as err:
            raise UsageError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                             f"re-encode the file as UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{err.lineno}:{err.colno}: malformed JSON ({err.msg}); "
                             f"fix that line") from None
        if not all(isinstance(r, dict) for r in rows):
            raise UsageError(f"{path}: a JSON array must hold one object per row")
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{lineno}: malformed JSON line ({err.msg} at column {err.colno}); "
                             f"fix or remove that line") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{lineno}: each JSON line must be an object like "
                             f'{{"field": "value"}}, got {type(row).__name__}')


def _describe_source(data_name: str | None, data_files: list[str] | None) -> str:
    return ", ".join(data_files) if data_files else repr(data_name)


def _unreadable(data_name: str | None, data_files: list[str] | None, err: BaseException) -> UsageError:
    return UsageError(f"could not read {_describe_source(data_name, data_files)}: {first_line(_root_cause(err))}")


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return err
