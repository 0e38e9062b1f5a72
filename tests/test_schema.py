"""One schema per pass: an option declared once is a CLI flag, a workflow key and a documented flag;
a method registered once is a `--method` choice, a workflow pass type and a documented method."""

from __future__ import annotations

import argparse
import os

import pytest

import slmops.cli.reference as reference
from slmops.cli.flags import add_options, given
from slmops.errors import UsageError
from slmops.options import methods
from slmops.options.fields import PositiveInt, option
from slmops.options.finetune_options import FinetuneOptions
from slmops.workflow import passes
from slmops.workflow.reading import validate


class WithShiny(FinetuneOptions):
    shiny_level: PositiveInt = option(3, "how shiny the adapter gets", olive="shine", group="method")


REQUIRED = ["-m", "model", "-o", "out", "--text_template", "{a} {b}"]


def test_a_new_field_is_a_flag_with_its_help_and_default():
    parser = argparse.ArgumentParser()
    add_options(parser, WithShiny)
    assert "--shiny_level" in parser.format_help() and "how shiny the adapter gets (default 3)" in parser.format_help()
    assert WithShiny.build(**given(parser.parse_args([*REQUIRED, "--shiny_level", "5"]))).shiny_level == 5
    assert WithShiny.build(**given(parser.parse_args(REQUIRED))).shiny_level == 3  # the default lives in the model
    with pytest.raises(UsageError, match="--shiny_level must be a positive integer, got 0"):
        WithShiny.build(**given(parser.parse_args([*REQUIRED, "--shiny_level", "0"])))


def test_a_new_field_is_a_workflow_key_under_either_name(monkeypatch):
    monkeypatch.setitem(passes.OTHER_TYPES, "Shiny", passes.PassType(WithShiny, passes.finetune))
    raw = {"model": {"config": {"model_path": "model"}},
           "data_configs": [{"name": "d", "load_dataset_config": {"data_files": "d.jsonl"},
                             "pre_process_data_config": {"text_template": "{a} {b}"}}],
           "passes": {"p": {"type": "Shiny", "config": {"shiny_level": 7}}, "q": {"type": "Shiny", "shine": 8}}}
    wf = validate(raw)
    assert wf.passes["p"].options.shiny_level == 7 and wf.passes["q"].options.shiny_level == 8
    raw["passes"]["p"]["config"]["shiny_level"] = -1
    with pytest.raises(UsageError, match=r"passes\.p\.config\.shiny_level: must be a positive integer, got -1"):
        validate(raw)


def test_a_new_field_is_documented(monkeypatch):
    monkeypatch.setattr(reference, "COMMANDS", (("finetune", WithShiny, ""),))
    assert "| `--shiny_level` | integer | `3` | shine | method: how shiny the adapter gets |" in reference.render()


def test_a_registered_method_is_everywhere(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "halflora", methods.Method("halflora", "HalfLoRA", 1e-4,
                                                                  methods.METHODS["lora"].build))
    parser = argparse.ArgumentParser()
    add_options(parser, FinetuneOptions)
    assert FinetuneOptions.build(**given(parser.parse_args([*REQUIRED, "--method", "halflora"]))).method == "halflora"
    assert "HalfLoRA" in passes.pass_types() and passes.is_finetune("HalfLoRA")
    assert "`halflora` (HalfLoRA, learning rate 0.0001)" in reference.render()
    with pytest.raises(UsageError, match="--method: got 'magic'; choose one of lora, qlora"):
        FinetuneOptions.build(model_name_or_path="m", output_path="o", text_field="t", method="magic")


def test_training_arguments_are_flags_from_a_memo_of_transformers_schema(tmp_path, monkeypatch):
    """Every TrainingArguments field is a flag typed from transformers' dataclass; the schema is remembered
    per transformers version, so `finetune --help` or a mistyped flag need not import the trainer."""
    import dataclasses
    import subprocess
    import sys

    from transformers import TrainingArguments

    from slmops.cli.flags import add_training_arguments
    from slmops.options.training_args import training_argument_fields, training_argument_names

    monkeypatch.setenv("SLMOPS_HOME", str(tmp_path))
    names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert {f["name"] for f in training_argument_fields()} == names and list(tmp_path.glob("training-arguments-*"))
    assert {"evaluation_strategy", "weight_decay"} <= training_argument_names()
    memo = next(tmp_path.glob("training-arguments-*"))
    memo.write_text('[{"name": "weight_decay"}]')  # a memo this version cannot use is read again from transformers
    assert {f["name"] for f in training_argument_fields()} == names
    parser = argparse.ArgumentParser()
    add_training_arguments(parser, set(FinetuneOptions.model_fields))
    args = parser.parse_args(["--gradient_checkpointing", "--weight_decay", "0.1", "--fsdp_config", '{"a": 1}',
                              "--bf16", "false", "--lr_scheduler_type", "cosine"])
    assert vars(args) == {"gradient_checkpointing": True, "weight_decay": 0.1, "fsdp_config": {"a": 1},
                          "bf16": False, "lr_scheduler_type": "cosine"}
    probe = ("import sys; from slmops.cli import main\ntry: main(['finetune', '--help'])\nexcept SystemExit: pass\n"
             "print('trainer imported' if 'transformers.training_args' in sys.modules else 'not imported')")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ})
    assert "--weight_decay" in shown.stdout and shown.stdout.rstrip().endswith("not imported"), shown.stderr[-500:]
