"""Bad input through the real command line: one line naming the problem, exit 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import TEMPLATE, write_jsonl
from slmops.cli import main


def fails_cleanly(capsys, argv, expect, out=None):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("slmops")]
    assert len(lines) == 1, err
    assert expect in lines[0], err
    if out is not None:
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return lines[0]


@pytest.fixture
def base(tiny_llama, sentiment_file, tmp_path):
    out = tmp_path / "out"
    return out, ["finetune", "-m", str(tiny_llama), "-d", str(sentiment_file), "--text_template", TEMPLATE,
                 "-o", str(out), "--max_steps", "1"]


@pytest.mark.parametrize("change, expect", [
    ({"-m": "no/such/model"}, "model path not found"),
    ({"-m": "not-a-catalogue-alias-or-cached-id"}, "cannot load model"),
    ({"--text_template": "{phrase} => {label}"}, "template field(s) label not in the data; fields present: phrase, tone"),
    ({"--train_split": "train[:0]"}, "corresponds to no data"),
    ({"--train_split": "train[x:]"}, "cannot take split"),
    ({"--method": "magic"}, "invalid choice: 'magic'"),
    ({"-d": "nope/data.jsonl"}, "data file not found"),
    ({"--lora_r": "-4"}, "--lora_r must be a positive integer, got -4"),
    ({"--learning_rate": "fast"}, "invalid float value: 'fast'"),
    ({"--text_field": "phrase"}, "--text_template and --text_field are exclusive"),
    ({"-d": "xxyyzzz/phrase_classification"}, "xxyyzzz/phrase_classification"),
    ({"--max_seq_len": "0"}, "--max_seq_len must be a positive integer"),
    ({"--lora_alpha": "-1", "--eval_fraction": "2"}, "between 0 and 1, got 2.0; --lora_alpha must be positive, got -1.0"),
])
def test_bad_input_is_one_line_exit_2(capsys, base, change, expect):
    out, argv = base
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    fails_cleanly(capsys, argv, expect, out)


def test_qlora_with_full_is_impossible(capsys, base):
    out, argv = base
    fails_cleanly(capsys, argv + ["--method", "qlora", "--method", "full", "--merge"], "--merge has nothing", out)


def test_malformed_line_unreadable_file_and_all_rows_filtered(capsys, base, tmp_path):
    out, argv = base
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"phrase": "a", "tone": "b"}\n{oops}\n')
    i = argv.index("-d") + 1
    argv[i] = str(bad)
    fails_cleanly(capsys, argv, "bad.jsonl:2: malformed JSON line", out)
    empty = write_jsonl(tmp_path / "empty_fields.jsonl", [{"phrase": "", "tone": "x"}] * 4)
    argv[i] = str(empty)
    fails_cleanly(capsys, argv, "no rows left after dropping rows with an empty phrase/tone", out)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not really parquet")
    argv[i] = str(corrupt)
    fails_cleanly(capsys, argv, "could not read", out)


def test_output_exists(capsys, base):
    out, argv = base
    out.mkdir()
    (out / "x").write_text("keep")
    fails_cleanly(capsys, argv, "already exists; choose another --output_path or add --overwrite")
    assert (out / "x").read_text() == "keep"


def test_unknown_flag_and_resume_from_missing_checkpoint(capsys, base, tmp_path):
    out, argv = base
    fails_cleanly(capsys, argv + ["--warp_speed", "9"], "unrecognized arguments: --warp_speed 9", out)
    fails_cleanly(capsys, argv + ["--resume_from_checkpoint", str(tmp_path / "nope")], "not a checkpoint folder", out)


def test_models_list_and_unknown_pull(capsys):
    assert main(["models", "list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
    fails_cleanly(capsys, ["models", "pull", "gpt-17"], "unknown catalogue model 'gpt-17'")


def test_generate_with_adapter_streams(capsys, tiny_llama, sentiment_file, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", "-m", str(tiny_llama), "-d", str(sentiment_file), "--text_template", TEMPLATE,
                 "-o", str(out), "--max_steps", "2"]) == 0
    capsys.readouterr()
    assert main(["generate", "--adapter_path", str(out), "--prompt", "Review: good film\nTone:",
                 "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    fails_cleanly(capsys, ["generate", "--adapter_path", str(tmp_path), "--prompt", "x"], "no adapter_config.json")


def test_console_script_exit_status_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "slmops", "finetune", "-m", str(tmp_path / "missing"), "-d",
                             "x.jsonl", "--text_field", "t", "-o", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("slmops finetune: error: model path not found")
    assert "Traceback" not in result.stderr


def test_a_wrong_model_or_data_path_is_refused_before_torch_is_imported(tiny_llama, tmp_path):
    """A typo costs a fraction of a second, not the ~5 s of importing the trainer first."""
    probe = ("import sys; from slmops.cli import main; code = main(sys.argv[1:]); "
             "print(code, [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules])")
    out = str(tmp_path / "o")
    cases = []
    for model, data, said in ((tmp_path / "missing", tmp_path / "x.jsonl", "model path not found"),
                              (tiny_llama, tmp_path / "missing.jsonl", "data file not found")):
        given = ["-m", str(model), "-d", str(data), "--text_field", "t"]
        cases += [(["finetune", *given, "-o", out], said), (["evaluate", *given, "-o", out], said),
                  (["data", "check", *given], said)]
    cases += [([command, "-m", str(tmp_path / "missing"), "-o", out], "model path not found")
              for command in ("auto-opt", "quantize")]
    for args, said in cases:
        result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
        assert result.stdout.split("\n")[0] == "2 []" and said in result.stderr, (args, result.stderr[-2000:])
    assert not (tmp_path / "o").exists()


def test_a_data_folder_with_a_plain_readme_trains_without_hub_warnings(tiny_llama, sentiment_file, tmp_path, capsys):
    """datasets reads a folder's README.md as a dataset card, and the hub warns when it has no metadata."""
    folder = tmp_path / "reviews"
    folder.mkdir()
    (folder / "train.jsonl").write_text(sentiment_file.read_text())
    (folder / "README.md").write_text("# Reviews\n\nSentences and their tone.\n")
    assert main(["finetune", "-m", str(tiny_llama), "--data_name", str(folder), "--text_template", TEMPLATE,
                 "--max_steps", "1", "--report_to", "none", "-o", str(tmp_path / "run")]) == 0
    assert "metadata" not in capsys.readouterr().err


def test_a_lora_run_prints_nothing_about_4bit_kernels(tiny_llama, sentiment_file, tmp_path):
    """peft imports bitsandbytes, whose CPU build warns at import about a kernel only QLoRA would use: neither
    the command nor the Python API shows it, and the command, one process with no 4-bit base, skips it."""
    probe = ("import sys; from slmops.cli import main; code = main(sys.argv[1:], whole_process=True); "
             "print(code, sys.modules.get('bitsandbytes') is not None)")
    result = subprocess.run([sys.executable, "-c", probe, "finetune", "-m", str(tiny_llama), "-d",
                             str(sentiment_file), "--text_template", TEMPLATE, "--max_steps", "1",
                             "--report_to", "none", "-o", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 0 and "bitsandbytes" not in result.stderr, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "0 False"  # the executable does not even import it (~1 s)
    saved_in_4bit = tmp_path / "bnb-model"  # a folder saved in 4 bits needs bitsandbytes to load: not hidden
    saved_in_4bit.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    (saved_in_4bit / "config.json").write_text(json.dumps({**config, "quantization_config": {"load_in_4bit": True}}))
    hidden = ("import sys; from slmops.cli import main; main(sys.argv[1:], whole_process=True); "
              "print('bitsandbytes' in sys.modules and sys.modules['bitsandbytes'] is None)")
    result = subprocess.run([sys.executable, "-c", hidden, "finetune", "-m", str(saved_in_4bit), "-d",
                             str(sentiment_file), "--text_template", TEMPLATE, "-o", str(tmp_path / "x")],
                            capture_output=True, text=True)
    assert result.stdout.splitlines()[-1] == "False", result.stderr[-2000:]
    api = (f"import slmops; slmops.finetune(model_name_or_path={str(tiny_llama)!r}, data_name={str(sentiment_file)!r}, "
           f"text_template={TEMPLATE!r}, max_steps=1, output_path={str(tmp_path / 'api')!r})")
    result = subprocess.run([sys.executable, "-c", api], capture_output=True, text=True)
    assert result.returncode == 0 and "bitsandbytes" not in result.stderr, result.stderr[-2000:]
