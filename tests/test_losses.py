"""`--loss`: built-in losses, the user's own nn.Module from a file, and sentence-pair training."""

from __future__ import annotations

import json
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import TEMPLATE, WORDS, sentiment_rows, write_jsonl
from slmops import finetune
from slmops.cli import main
from slmops.options.finetune_options import LOSSES
from slmops.training.losses import BUILTINS, ContrastiveLoss, LabelSmoothing

# fp32 so that a loss computed here and one computed by the run agree to rounding
RUN = dict(per_device_train_batch_size=8, logging_steps=1, learning_rate=5e-3, save_steps=1000, lora_dropout=0.0,
           report_to="none", torch_dtype="float32")
TWICE_CE = """\
import torch.nn.functional as F
from torch import nn


class Scaled(nn.Module):
    def __init__(self, factor: float = 1.0):
        super().__init__()
        self.factor = factor

    def forward(self, outputs, batch):
        logits, labels = outputs.logits, batch["labels"]
        assert logits.shape[:2] == labels.shape, "slmops promised logits aligned with the labels"
        return self.factor * F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
"""


def manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def first_loss(out) -> float:
    return next(r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r)


def test_builtins_are_the_names_the_config_accepts():
    assert tuple(BUILTINS) == LOSSES


def test_label_smoothing_is_torch_label_smoothing_on_supervised_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = labels[1, :4] = -100  # the prompt
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), label_smoothing=0.2)
    full = LabelSmoothing(0.2)(SimpleNamespace(logits=logits), {"labels": labels})
    kept = LabelSmoothing(0.2)(SimpleNamespace(logits=logits[:, :-1][labels[:, 1:] != -100]), {"labels": labels})
    assert torch.allclose(full, expected) and torch.allclose(kept, expected)
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert not torch.allclose(full, plain)


def test_contrastive_costs_far_similar_and_near_dissimilar_pairs_only():
    a, b, c = [1.0, 0.0], [0.0, 1.0], [1.0, 0.1]  # c is close to a, b far from it (cosine distance 1)
    hidden = torch.tensor([[a], [a], [b], [c]])  # rows: first texts of 2 pairs, then their second texts
    batch = {"attention_mask": torch.ones(4, 1), "labels": torch.tensor([1.0, 0.0])}
    out = SimpleNamespace(last_hidden_state=hidden)
    d_far, d_near = 1.0, 1 - F.cosine_similarity(torch.tensor([a]), torch.tensor([c])).item()
    expected = 0.5 * (d_far ** 2 + max(0.0, 0.5 - d_near) ** 2) / 2
    assert ContrastiveLoss(margin=0.5)(out, batch).item() == pytest.approx(expected)
    swapped = {**batch, "labels": torch.tensor([0.0, 1.0])}  # dissimilar far apart, similar close: ~free
    assert ContrastiveLoss(margin=0.5)(out, swapped).item() == pytest.approx(0.5 * d_near ** 2 / 2)


@pytest.fixture
def eight(tmp_path):
    return write_jsonl(tmp_path / "eight.jsonl", sentiment_rows(8))


def _eval_loss_here(model_dir, data, smoothing: float) -> float:
    """The validation loss of the untrained model, computed without slmops's training code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmops.options.finetune_options import FinetuneOptions
    from slmops.data.prepare import prepare_data

    cfg = FinetuneOptions.build(model_name_or_path=str(model_dir), data_name=str(data), text_template=TEMPLATE,
                               eval_split="train[:8]", output_path="-")
    rows = prepare_data(cfg, AutoTokenizer.from_pretrained(model_dir)).eval
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    logits, targets = [], []
    with torch.no_grad():
        for row in rows:
            logits.append(model(torch.tensor([row["input_ids"]])).logits[0, :-1])
            targets.append(torch.tensor(row["labels"][1:]))
    return F.cross_entropy(torch.cat(logits), torch.cat(targets), label_smoothing=smoothing).item()


def test_label_smoothing_run_differs_from_cross_entropy_as_torch_says(tiny_llama, eight, tmp_path):
    kw = dict(model_name_or_path=str(tiny_llama), data_name=str(eight), text_template=TEMPLATE, max_steps=1,
              eval_split="train[:8]", **RUN)
    plain = manifest(finetune(output_path=str(tmp_path / "ce"), **kw))
    smooth = manifest(finetune(output_path=str(tmp_path / "ls"), loss="label_smoothing", **kw))
    assert smooth["resolved"]["loss"] == {"type": "label_smoothing", "args": {"smoothing": 0.1}}
    before = {name: m["results"]["eval_before"]["eval_loss"] for name, m in (("ce", plain), ("ls", smooth))}
    assert before["ce"] == pytest.approx(_eval_loss_here(tiny_llama, eight, 0.0), rel=1e-4)
    assert before["ls"] == pytest.approx(_eval_loss_here(tiny_llama, eight, 0.1), rel=1e-4)
    assert abs(before["ls"] - before["ce"]) > 1e-3


def test_users_loss_file_is_the_loss(tiny_llama, eight, tmp_path):
    """A loss that is exactly twice the token cross-entropy logs exactly twice the default's loss."""
    file = tmp_path / "my_loss.py"
    file.write_text(TWICE_CE)
    common = ["finetune", "-m", str(tiny_llama), "-d", str(eight), "--text_template", TEMPLATE, "--max_steps", "1",
              "--eval_split", "train[:8]", "--logging_steps", "1", "--torch_dtype", "float32"]
    assert main([*common, "-o", str(tmp_path / "ce")]) == 0
    assert main([*common, "-o", str(tmp_path / "twice"), "--loss", f"{file}:Scaled",
                 "--loss_args", '{"factor": 2.0}']) == 0
    ce, twice = tmp_path / "ce", tmp_path / "twice"
    assert first_loss(twice) == pytest.approx(2 * first_loss(ce), rel=1e-3)
    assert (manifest(twice)["results"]["eval_before"]["eval_loss"]
            == pytest.approx(2 * manifest(ce)["results"]["eval_before"]["eval_loss"], rel=1e-5))
    record = manifest(twice)["resolved"]["loss"]
    assert record["type"] == f"{file}:Scaled" and record["args"] == {"factor": 2.0} and len(record["sha256"]) == 64
    assert (twice / "adapter" / "adapter_model.safetensors").exists()


# ---- sentence pairs ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer random BERT encoder with a WordPiece vocabulary of the test words. Weights drawn wider than
    BERT's 0.02 spread the texts apart, so that there is something for the loss to pull together."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.5)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.fixture
def pairs_file(tmp_path):
    """Eight sentence pairs: same tone (label 1) or opposite tones (label 0), half of each."""
    rows = sentiment_rows(16)  # even rows positive, odd rows negative
    pairs = [{"first": rows[i]["phrase"], "second": rows[j]["phrase"], "same": int(i % 2 == j % 2)}
             for i, j in ((0, 2), (1, 3), (4, 6), (5, 7), (8, 9), (10, 11), (12, 13), (14, 15))]
    return write_jsonl(tmp_path / "pairs.jsonl", pairs)


def _distances(model_dir, adapter, encoder: bool, pairs_file) -> tuple[float, float]:
    """Mean cosine distance of the similar and of the dissimilar pairs' mean-pooled last hidden states,
    computed here."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = (AutoModel if encoder else AutoModelForCausalLM).from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()

    def embed(text: str) -> torch.Tensor:
        with torch.no_grad():
            out = model(**tok(text, return_tensors="pt"), output_hidden_states=True)
        return (out.last_hidden_state if encoder else out.hidden_states[-1])[0].mean(0)

    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    distance = {1: [], 0: []}
    for r in rows:
        distance[r["same"]].append(1 - F.cosine_similarity(embed(r["first"]), embed(r["second"]), dim=0).item())
    return sum(distance[1]) / len(distance[1]), sum(distance[0]) / len(distance[0])


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_contrastive_pulls_similar_pairs_together(family, tiny_bert, tiny_llama, pairs_file, tmp_path):
    model_dir = tiny_bert if family == "bert" else tiny_llama
    out = finetune(model_name_or_path=str(model_dir), data_name=str(pairs_file), text_field="first",
                   text_pair_field="second", pair_label_field="same", loss="contrastive",
                   loss_args={"margin": 0.5}, eval_split="train[:8]", max_steps=8, output_path=str(tmp_path / "out"),
                   **{**RUN, "learning_rate": 2e-2})
    m = manifest(out)
    assert m["resolved"]["loss"] == {"type": "contrastive", "args": {"margin": 0.5, "distance": "cosine"}}
    assert m["data"]["train"]["rows"] == 8 and m["data"]["checks"]["label_counts"] == {"1.0": 4, "0.0": 4}
    assert m["results"]["eval_loss"] < 0.5 * m["results"]["eval_before"]["eval_loss"]
    assert (m["results"]["forgetting"] is None) == (family == "bert")  # an encoder has no perplexity
    similar, dissimilar = _distances(model_dir, None, family == "bert", pairs_file)
    similar_after, dissimilar_after = _distances(model_dir, out / "adapter", family == "bert", pairs_file)
    assert similar_after < 0.5 * similar and dissimilar_after > dissimilar, (similar, similar_after, dissimilar,
                                                                             dissimilar_after)


# ---- bad input: one line, exit 2, the user's file:line ----------------------------------------

def _fail(args: list[str], capsys) -> str:
    """The error line (progress logs may precede it; --log_level would change the logger for later tests)."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("slmops finetune: error: "), err
    return err.splitlines()[-1]


@pytest.fixture
def cli(tiny_llama, sentiment_file, tmp_path):
    return ["finetune", "-m", str(tiny_llama), "-d", str(sentiment_file), "--text_template", TEMPLATE,
            "--max_steps", "1", "-o", str(tmp_path / "out")]


@pytest.mark.parametrize("source, loss_args, expected", [
    ("class Loss:\n    pass\n", None, "Loss is not a torch.nn.Module subclass"),
    ("from torch import nn\nclass Other(nn.Module):\n    pass\n", None, "defines no 'Loss'; torch.nn.Module classes "
                                                                           "there: Other"),
    ("from torch import nn\nclass Loss(nn.Module):\n    pass\n", '{"margin": 1}', "--loss_args for Loss: got an "
                                                                                  "unexpected keyword argument"),
    ("from torch import nn\n\nclass Loss(nn.Module)\n    pass\n", None, "my_loss.py:3: SyntaxError"),
    ("import torch\n\nraise RuntimeError('no GPU here')\n", None, "my_loss.py:3: RuntimeError: no GPU here "
                                                                  "(in loading --loss"),
    ("from torch import nn\nclass Loss(nn.Module):\n    def __init__(self, margin):\n        super().__init__()\n"
     "        self.margin = 1 / margin\n", '{"margin": 0}', "my_loss.py:5: ZeroDivisionError: division by zero "
                                                            "(in Loss.__init__: `self.margin = 1 / margin`)"),
])
def test_bad_loss_files_are_one_line(source, loss_args, expected, cli, tmp_path, capsys):
    file = tmp_path / "my_loss.py"
    file.write_text(source)
    err = _fail([*cli, "--loss", f"{file}:Loss", *(["--loss_args", loss_args] if loss_args else [])], capsys)
    assert expected in err, err


def test_missing_file_and_bad_json_are_one_line(cli, tmp_path, capsys):
    assert "nope.py" in _fail([*cli, "--loss", str(tmp_path / "nope.py:Loss")], capsys)
    assert "--loss_args: not valid JSON" in _fail([*cli, "--loss", "label_smoothing", "--loss_args", "{smoothing: 1"],
                                                  capsys)
    assert "--loss: got 'focal'" in _fail([*cli, "--loss", "focal"], capsys)


def test_error_inside_forward_names_the_users_line(cli, tmp_path, capsys):
    file = tmp_path / "my_loss.py"
    file.write_text(textwrap.dedent("""\
        from torch import nn


        def helper(logits):
            return logits.mean() / {}["missing"]


        class Loss(nn.Module):
            def forward(self, outputs, batch):
                return helper(outputs.logits)
    """))
    err = _fail([*cli, "--loss", f"{file}:Loss"], capsys)
    assert f"{file}:5: KeyError: 'missing' (in Loss.forward: `return logits.mean() / {{}}[\"missing\"]`)" in err
    assert not (tmp_path / "out").exists()


def test_pair_options_are_checked_together(tiny_llama, sentiment_file, tmp_path):
    from slmops.errors import UsageError
    kw = dict(model_name_or_path=str(tiny_llama), data_name=str(sentiment_file), output_path=str(tmp_path / "o"))
    with pytest.raises(UsageError, match="--loss contrastive compares sentence pairs"):
        finetune(text_template=TEMPLATE, loss="contrastive", **kw)
    with pytest.raises(UsageError, match="--loss cross_entropy predicts tokens"):
        finetune(text_field="phrase", text_pair_field="tone", **kw)
    with pytest.raises(UsageError, match="row 0 has 'positive'; a pair label is 1"):
        finetune(text_field="phrase", text_pair_field="phrase", pair_label_field="tone", loss="contrastive", **kw)


def test_an_encoder_needs_pairs(tiny_bert, sentiment_file, tmp_path):
    from slmops.errors import UsageError
    with pytest.raises(UsageError, match="is an encoder without a language-model head"):
        finetune(model_name_or_path=str(tiny_bert), data_name=str(sentiment_file), text_template=TEMPLATE,
                 output_path=str(tmp_path / "o"))
