from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

import slmops.data.prepare as data
from conftest import TEMPLATE
from slmops.options.finetune_options import FinetuneOptions
from slmops.errors import UsageError


def test_eval_split_missing_template_fields_is_named(tokenizer_dir, monkeypatch):
    """Hub datasets can give splits different columns; the eval split is checked like the train split."""
    splits = {"train": Dataset.from_dict({"phrase": ["good", "bad"], "tone": ["positive", "negative"]}),
              "validation": Dataset.from_dict({"text": ["a"]})}
    monkeypatch.setattr(data, "load_split", lambda name, files, split, subset=None: splits[split])
    cfg = FinetuneOptions(model_name_or_path="m", data_name="some/hub-set", eval_split="validation",
                         text_template=TEMPLATE, output_path="o")
    with pytest.raises(UsageError, match="--eval_split 'validation' lacks field.s. phrase, tone; fields present: text"):
        data.prepare_data(cfg, AutoTokenizer.from_pretrained(tokenizer_dir))
