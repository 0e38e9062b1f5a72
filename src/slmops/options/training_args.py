"""Hugging Face TrainingArguments' names: every one is a `finetune` option that passes through unchanged.

Their single list is transformers' own dataclass, remembered per transformers version: importing the
trainer takes seconds, which a workflow re-run that reuses every pass should not pay.
"""

from __future__ import annotations

from importlib.metadata import version

from slmops.artifacts.folders import cache_root, read_json, write_json

# TrainingArguments fields that slmops sets itself, or that make no sense on a command line
OWNED = frozenset({"output_dir", "seed", "resume_from_checkpoint", "local_rank", "do_train", "do_eval",
                   "do_predict", "hub_token", "log_level", "log_level_replica", "logging_dir"})
# Names Olive users type that transformers 5 renamed or dropped -> what they mean now
RENAMED = {"evaluation_strategy": "eval_strategy", "group_by_length": "train_sampling_strategy"}


def training_argument_names() -> frozenset[str]:
    """Every name TrainingArguments takes, plus the old names in RENAMED."""
    memo = cache_root() / f"training-argument-names-{version('transformers')}.json"
    names = read_json(memo)
    if not isinstance(names, list):
        import dataclasses

        from transformers import TrainingArguments

        names = sorted(f.name for f in dataclasses.fields(TrainingArguments) if f.init)
        try:
            write_json(memo, names)
        except OSError:
            pass  # a read-only home only costs the import next time
    return frozenset(names) | frozenset(RENAMED)
