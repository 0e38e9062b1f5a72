"""report.html: what it draws is what was logged, its warnings fire on bad curves only, it escapes the
manifest, bad input is one line, `finetune` writes it, and a real browser renders the plots."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from conftest import TEMPLATE, sentiment_rows, write_jsonl
from slmops import finetune
from slmops.cli import main
from slmops.artifacts.report import curves, diagnose, write_report

SVG = "{http://www.w3.org/2000/svg}"
FAST = dict(per_device_train_batch_size=8, logging_steps=1, learning_rate=5e-3, save_steps=1000, report_to="none")


@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory):
    """One real fine-tune with evaluations every 2 steps (plus the one before training)."""
    root = tmp_path_factory.mktemp("report")
    data = write_jsonl(root / "d.jsonl", sentiment_rows(48))
    return finetune(model_name_or_path=str(tiny_llama), data_name=str(data), text_template=TEMPLATE,
                    output_path=str(root / "out"), max_steps=6, eval_steps=2, **FAST)


def events(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def svgs(page: str) -> list[ET.Element]:
    return [ET.fromstring(m) for m in re.findall(r"<svg.*?</svg>", page, flags=re.S)]


def markers(svg: ET.Element, gid: str) -> list[tuple[float, float]]:
    group = next(g for g in svg.iter(f"{SVG}g") if g.get("id") == gid)
    return [(float(u.get("x")), float(u.get("y"))) for u in group.iter(f"{SVG}use")]


def test_finetune_writes_the_report_into_the_published_folder(run_dir):
    page = (run_dir / "report.html").read_text()
    assert not run_dir.with_name(run_dir.name + ".partial").exists()
    # loss, learning rate, throughput, memory, and task metrics (the responses are labels)
    assert len(svgs(page)) == 5 and "Not enough logged points" not in page
    accuracy = [(e["step"], e["eval_accuracy"]) for e in events(run_dir) if "eval_accuracy" in e]
    assert len(accuracy) == 4 and len(markers(svgs(page)[4], "validation-accuracy")) == 4
    assert len(markers(svgs(page)[4], "validation-f1")) == 4
    assert "<script" not in page and "<link" not in page and not re.search(r"(src|href)=\"?(https?:)?//", page)


def test_plotted_losses_are_the_logged_ones(run_dir):
    logged = events(run_dir)
    train = [(e["step"], e["loss"]) for e in logged if "loss" in e]
    val = [(e["step"], e["eval_loss"]) for e in logged if "eval_loss" in e]
    assert len(train) == 6 and len(val) == 4 and val[0][0] == 0
    assert curves(logged)["train loss"] == train and curves(logged)["validation loss"] == val
    loss_plot = svgs((run_dir / "report.html").read_text())[0]
    drawn = markers(loss_plot, "train-loss") + markers(loss_plot, "validation-loss")
    assert len(drawn) == len(train) + len(val)
    # One pair of linear axes maps every (step, loss) to its marker: fit it and check each point lies on it.
    data = np.array(train + val)
    for axis in (0, 1):
        design = np.column_stack([data[:, axis], np.ones(len(data))])
        (scale, offset), *_ = np.linalg.lstsq(design, np.array(drawn)[:, axis], rcond=None)
        assert np.abs(design @ (scale, offset) - np.array(drawn)[:, axis]).max() < 0.01
        assert (scale > 0) if axis == 0 else (scale < 0)  # SVG y grows downwards


def series(train: list[float], val: list[float], every: int = 3) -> list[dict]:
    return ([{"step": i + 1, "loss": v} for i, v in enumerate(train)]
            + [{"step": i * every, "eval_loss": v} for i, v in enumerate(val)])


def test_overfitting_warns_and_a_healthy_run_does_not():
    falling = [3.0 - 0.2 * i for i in range(12)]
    overfit = diagnose({}, curves(series(falling, [2.5, 1.5, 1.6, 1.8, 2.0])))
    assert len(overfit) == 1 and overfit[0].startswith("overfitting"), overfit
    assert diagnose({}, curves(series(falling, [2.5, 1.9, 1.5, 1.2, 1.1]))) == []
    # one rise is noise, not a trend
    assert diagnose({}, curves(series(falling, [2.5, 1.9, 1.5, 1.2, 1.3]))) == []


def test_divergence_truncation_and_recorded_warnings():
    assert diagnose({}, curves(series([2.0, 1.5, math.nan], [])))[0].startswith("divergence: the loss became NaN")
    assert "1.8x the first" in diagnose({}, curves(series([2.0, 2.5, 3.6], [])))[0]
    healthy = {"data": {"max_seq_len": 64, "train": {"rows": 100, "truncated": 5, "dropped": 0}},
               "results": {"forgetting": {"ratio": 1.2}, "preflight": {"est_peak_memory_mb": 9,
                                                                          "memory_capacity_mb": 10}}}
    assert diagnose(healthy, {"train loss": [], "validation loss": []}) == []
    bad = {"data": {"max_seq_len": 64, "train": {"rows": 90, "truncated": 20, "dropped": 10},
                    "checks": {"duplicate_train_rows": 3, "eval_rows_in_train": 2, "label_imbalance": 12.0}},
           "results": {"forgetting": {"ratio": 2.0}, "preflight": {"est_peak_memory_mb": 11,
                                                                      "memory_capacity_mb": 10}}}
    found = diagnose(bad, {"train loss": [], "validation loss": []})
    assert [w.split(":")[0] for w in found] == ["heavy truncation", "data", "data", "data", "forgetting",
                                                "pre-flight"], found
    assert "20 of 100 train rows" in found[0]


def test_preference_runs_warn_at_chance_accuracy_and_collapsing_margins():
    def evals(accuracy, margin):
        return [{"step": 3 * i, "eval_loss": 0.7, "eval_rewards/accuracies": a, "eval_rewards/margins": m}
                for i, (a, m) in enumerate(zip(accuracy, margin))]
    assert diagnose({}, curves(evals([0.0, 0.8, 0.9], [0.0, 0.4, 0.9]))) == []
    stuck = diagnose({}, curves(evals([0.0, 0.5, 0.52], [0.0, 0.01, 0.02])))
    assert [w.split(":")[0] for w in stuck] == ["reward accuracy at chance"] and "0.52" in stuck[0]
    collapsing = diagnose({}, curves(evals([0.0, 0.9, 0.9, 0.8], [0.0, 1.0, 2.0, 0.6])))
    assert [w.split(":")[0] for w in collapsing] == ["reward margins collapsing"] and "2 to 0.6" in collapsing[0]


def fake_run(tmp_path, manifest: dict, lines: list[str]):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return tmp_path


def test_manifest_strings_are_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    run = fake_run(tmp_path, {"options": {"task_name": evil, "data_name": "a&b", evil: 1},
                              "versions": {"torch": evil}}, [json.dumps({"step": 1, "loss": 1.0})])
    page = write_report(run).read_text()
    assert "<script" not in page and "a&b" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 5  # title, heading, key, value, version


def test_a_run_with_one_log_line_says_so_instead_of_empty_plots(tmp_path):
    run = fake_run(tmp_path, {}, [json.dumps({"step": 1, "loss": 2.0, "learning_rate": 1e-4})])
    page = write_report(run).read_text()
    assert "<svg" not in page and page.count("Not enough logged points") == 4
    assert "recorded no validation metrics" in page and "no data statistics" in page


def fails_cleanly(capsys, argv, expect):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("slmops report: error:") and expect in err, err


def test_bad_input_is_one_line_exit_2(capsys, tmp_path):
    fails_cleanly(capsys, ["report", str(tmp_path)], "not a slmops run folder (no manifest.json)")
    run = fake_run(tmp_path, {}, [json.dumps({"step": 1, "loss": 2.0})])
    fails_cleanly(capsys, ["report", str(run), "--output", str(tmp_path / "no" / "r.html")], "does not exist")
    fake_run(tmp_path, {}, [json.dumps({"step": 1, "loss": 2.0}), '{"step": 2, loss: 1.5}'])
    fails_cleanly(capsys, ["report", str(run)], "metrics.jsonl:2: malformed JSON line; fix or delete that line")
    (tmp_path / "manifest.json").write_text("{")
    fails_cleanly(capsys, ["report", str(run)], "manifest.json: not valid JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "metrics.jsonl"]  # nothing written


def test_cli_redraws_the_same_page(capsys, run_dir, tmp_path):
    assert main(["report", str(run_dir), "--output", str(tmp_path / "page.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "page.html")
    assert (tmp_path / "page.html").read_text() == (run_dir / "report.html").read_text()  # from the folder alone
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]  # the temporary file was renamed away


def test_a_failed_report_keeps_the_trained_adapter(tiny_llama, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")
    monkeypatch.setattr("slmops.artifacts.report.write_report", broken)
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(16))
    with caplog.at_level(logging.WARNING, logger="slmops"):
        out = finetune(model_name_or_path=str(tiny_llama), data_name=str(data), text_template=TEMPLATE,
                       output_path=str(tmp_path / "out"), max_steps=1, **FAST)
    assert (out / "adapter" / "adapter_model.safetensors").exists() and not (out / "report.html").exists()
    assert "could not write report.html (no fonts)" in caplog.text


CHROMIUM = shutil.which("chromium")
# These two colours are matplotlib's first two line colours: on the page only the plots' curves have them.
CURVE_COLOURS = ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E))


def chromium(page, profile, *args: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1280,1200", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def curve_pixels(png) -> list[int]:
    from PIL import Image
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    return [int((np.abs(pixels - colour).max(axis=2) < 40).sum()) for colour in CURVE_COLOURS]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium); "
                                             "the browser rendering test needs it")
def test_chromium_renders_the_plots(run_dir, tmp_path):
    page = run_dir / "report.html"
    dom = chromium(page, tmp_path / "profile", "--dump-dom")
    assert dom.count("<svg") == 5 and 'id="train-loss"' in dom and 'id="validation-loss"' in dom
    chromium(page, tmp_path / "profile", f"--screenshot={tmp_path / 'page.png'}")
    blue, orange = curve_pixels(tmp_path / "page.png")
    assert blue > 500 and orange > 100, (blue, orange)  # train and validation loss curves are on screen
    # the same page without its SVGs has none of those pixels: the count above is the plots
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<svg.*?</svg>", "", page.read_text(), flags=re.S))
    chromium(bare, tmp_path / "profile", f"--screenshot={tmp_path / 'bare.png'}")
    assert max(curve_pixels(tmp_path / "bare.png")) < 20
