"""`slmops review`: the statistics against hand-computed values, bad input as one line and exit 2, forged
and repeated votes refused over HTTP with nothing stored changed, a real browser voting (buttons, keyboard,
reload, resume) with the database checked after, a screenshot, and the command end to end with two tiny
models generating the answers."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import build_model, make_adapter
from slmops.cli import main
from slmops.models.adapters import model_and_adapter, split_spec
from slmops.review import tally
from slmops.review.collect import items_of

MODELS = ("model-yankee", "model-zulu")  # names that appear nowhere in prompts or answers
PROMPTS = [
    {"id": "capital", "prompt": "What is the capital of France? Answer in one sentence.",
     "answers": {"model-yankee": "The capital of France is Paris.", "model-zulu": "Lyon, I believe."}},
    {"id": "haiku", "prompt": "Write a haiku about autumn leaves.",
     "answers": {"model-yankee": "Red leaves drift and fall\ncrisp air hums a quiet tune\nbranches wave goodbye",
                 "model-zulu": "Leaves are falling down. It is autumn now."}},
    {"id": "sum", "prompt": "What is 17 + 25?",
     "answers": {"model-yankee": "42", "model-zulu": "17 + 25 = 42, since 17 + 20 = 37 and 37 + 5 = 42."}},
]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
browser_only = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                  reason="chromium and chromedriver are not on PATH (Debian: apt-get install "
                                         "chromium chromium-driver); the browser tests need them")


def vote(left: str, right: str, choice: str, reviewer: str = "r1", item: int = 0) -> dict:
    return {"left_model": left, "right_model": right, "choice": choice, "reviewer": reviewer, "item": item}


# ---------------------------------------------------------------- statistics, against values worked by hand

def test_wilson_interval_matches_hand_computation():
    # 8 of 10: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10) = 0.7167, half-width 0.2266
    low, high = tally.wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert tally.wilson(0, 0) == (0.0, 1.0)
    assert tally.wilson(5, 5)[1] == 1.0  # never beyond 1


def test_pair_win_rate_counts_ties_and_both_bad_as_half_and_ignores_sides():
    a, b = MODELS
    votes = [vote(a, b, "left"), vote(b, a, "right"), vote(a, b, "left"), vote(a, b, "right"),
             vote(b, a, "tie"), vote(a, b, "both_bad")]
    [row] = tally.pair_table(votes)
    assert (row["model_a"], row["a_wins"], row["b_wins"], row["ties"], row["both_bad"]) == (a, 3, 1, 1, 1)
    assert row["a_win_rate"] == pytest.approx(4 / 6)  # 3 wins + 2 halves of 6
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tally.wilson(4, 6))


def test_bradley_terry_recovers_strengths_that_explain_the_counts_exactly():
    # strengths 4:2:1 expect x to beat y 2 of 3, x to beat z 4 of 5, y to beat z 2 of 3: the MLE is 4/7, 2/7, 1/7
    counts = [("x", "y", 2), ("y", "x", 1), ("x", "z", 4), ("z", "x", 1), ("y", "z", 2), ("z", "y", 1)]
    votes = [vote(w, lose, "left") for w, lose, n in counts for _ in range(n)]
    strengths = tally.bradley_terry(["x", "y", "z"], votes)
    assert [strengths[m] for m in "xyz"] == pytest.approx([4 / 7, 2 / 7, 1 / 7], abs=1e-8)
    ranked = tally.ranking(["x", "y", "z"], votes)
    assert [r["model"] for r in ranked] == ["x", "y", "z"]
    assert ranked[0]["rating"] - ranked[2]["rating"] == pytest.approx(400 * 0.60206, abs=1e-3)  # log10(4)
    assert ranked[0]["win_rate"] == pytest.approx(6 / 8)
    assert tally.ranking(["w", "x", "y", "z"], votes)[-1] == {"model": "w", "strength": None, "rating": None,
                                                             "votes": 0, "win_rate": None}  # in no vote yet
    # a tie is half a win each way: one tie between two models leaves them equal
    assert tally.bradley_terry(["x", "y"], [vote("x", "y", "tie")]) == pytest.approx({"x": 0.5, "y": 0.5})


def test_cohen_kappa_matches_the_textbook_example():
    # 50 items: both yes 20, yes/no 5, no/yes 10, both no 15: p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5, kappa 0.4
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert tally.cohen_kappa(first, second) == pytest.approx(0.4)
    assert tally.cohen_kappa(["tie", "tie"], ["tie", "tie"]) is None  # chance explains all: undefined


def test_agreement_compares_reviewers_in_model_terms_not_sides():
    a, b = MODELS
    votes = [vote(a, b, "left", "ann", 1), vote(b, a, "right", "bob", 1),  # both prefer a, shown swapped
             vote(a, b, "tie", "ann", 2), vote(a, b, "right", "bob", 2),
             vote(a, b, "left", "ann", 3), vote(a, b, "left", "cy", 4)]
    [row] = tally.agreement(votes)
    assert row["reviewers"] == ["ann", "bob"] and row["shared"] == 2 and row["agreement"] == 0.5
    # ann: a, tie; bob: a, b. p_o = 1/2, p_e = (1/2)(1/2) = 1/4: kappa = (1/2 - 1/4) / (3/4) = 1/3
    assert row["kappa"] == pytest.approx(1 / 3)


def test_votes_csv_spells_out_the_winner():
    a, b = MODELS
    rows = list(csv.DictReader(io.StringIO(tally.votes_csv([vote(a, b, "right"), vote(b, a, "both_bad")]))))
    assert [r["winner"] for r in rows] == [b, "both_bad"] and rows[0]["left_model"] == a


def test_pairs_per_prompt_draws_distinct_pairs():
    items = items_of(["m1", "m2", "m3", "m4"], 5, 2, seed=0)
    assert len(items) == 10 and all(a < b for _, a, b in items)
    for prompt in range(5):
        assert len({(a, b) for p, a, b in items if p == prompt}) == 2
    assert len(items_of(["m1", "m2", "m3"], 2, None, 0)) == 6


# ---------------------------------------------------------------- helpers: a review folder, a server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def review_dir(tmp_path) -> Path:
    """A review of pre-generated answers (no model loads), made through the command line."""
    out = tmp_path / "review"
    assert main(["review", "--prompts", str(write_prompts(tmp_path / "p.jsonl", PROMPTS)), "-o", str(out),
                 "--serve", "false"]) == 0
    return out


@contextlib.contextmanager
def running(folder: Path):
    """The review site on a free loopback port, in a thread; stopped when the block ends."""
    import uvicorn

    from slmops.review.webapp import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(folder), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def request(url: str, body: dict | str | bytes | None = None, form: bool = False) -> tuple[int, str, str]:
    """(status, content type, text) of a GET, or a POST of JSON (a dict, or raw bytes) or of a form (a str)."""
    data, headers = None, {}
    if body is not None:
        data = body if isinstance(body, bytes) else body.encode() if form else json.dumps(body).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded" if form else "application/json"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=30) as r:
            return r.status, r.headers.get("content-type", ""), r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), err.read().decode()


def join(url: str, name: str) -> str:
    status, _, text = request(f"{url}/start", {"name": name})
    assert status == 200, text
    return url + json.loads(text)["reviewer"]


def ticket(page: str) -> str:
    return re.search(r'name=ticket value="([^"]+)"', page)[1]


def stored(folder: Path) -> list[dict]:
    with contextlib.closing(sqlite3.connect(folder / "votes.sqlite")) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM votes ORDER BY id")]


# ---------------------------------------------------------------- bad input: one line, exit 2

@pytest.mark.parametrize("case", ["malformed_line", "model_does_not_load", "same_name", "port_in_use",
                                  "other_models_than_the_folder"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    argv = ["review", "--prompts", str(prompts), "-o", str(tmp_path / "out"), "--log_level", "2", "--serve", "false"]
    expect = {"malformed_line": "line 2", "model_does_not_load": "cannot load model",
              "same_name": "two models are named 'tiny'", "port_in_use": "port is in use",
              "other_models_than_the_folder": "is a review of models"}[case]
    with contextlib.ExitStack() as stack:
        if case == "malformed_line":
            prompts.write_text(json.dumps(PROMPTS[0]) + '\n{"prompt": "unclosed\n')
        elif case == "model_does_not_load":
            argv += ["--models", f"model-yankee,bad={broken}"]
        elif case == "same_name":
            argv += ["--models", "a/tiny,b/tiny"]
        elif case == "port_in_use":
            taken = stack.enter_context(socket.socket())
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            argv[-2:] = ["--port", str(taken.getsockname()[1])]
        else:
            assert main(argv) == 0
            argv += ["--models", "model-yankee,model-zulu,model-x"]
            capsys.readouterr()
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err and "Traceback" not in err, err
    if case != "other_models_than_the_folder":
        assert not (tmp_path / "out").exists()


def test_model_specs_read_as_evaluate_reads_them(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "run" / "adapter", ["q_proj"], r=2, seed=0)
    read = lambda spec: model_and_adapter(*split_spec(spec))  # noqa: E731
    assert read(str(tiny_llama)) == (str(tiny_llama), None, None)
    for spec in (f"{tiny_llama}@{adapter}", f"@{adapter}", str(adapter), str(tmp_path / "run")):
        assert read(spec)[:2] == (str(tiny_llama), adapter), spec  # a finetune output folder alone, too


# ---------------------------------------------------------------- HTTP: forged and repeated votes

def test_forged_or_repeated_votes_are_refused_and_change_nothing(review_dir):
    with running(review_dir) as url:
        ann, bob = join(url, "ann"), join(url, "bob")
        page = request(ann)[2]
        assert not any(m in page for m in MODELS) and "0 of 3" in page
        first = ticket(page)
        # the request names the models too: the server ignores that and records what it showed
        assert request(f"{ann}/vote", {"ticket": first, "choice": "left", "left_model": "model-x"})[0] == 200
        before = stored(review_dir)
        assert len(before) == 1 and before[0]["left_model"] in MODELS
        refusals = [
            (f"{ann}/vote", {"ticket": first, "choice": "right"}, 409),  # a second vote on the same item
            (f"{ann}/vote", {"ticket": "forged-ticket", "choice": "left"}, 403),
            (f"{bob}/vote", {"ticket": first, "choice": "left"}, 403),  # ann's ticket on bob's link
            (f"{ann}/vote", {"ticket": ticket(request(ann)[2]), "choice": "model-zulu"}, 422),
            (f"{url}/r/no-such-reviewer/vote", {"ticket": first, "choice": "left"}, 404),
            (f"{ann}/vote", b"not json", 400),
        ]
        for target, body, status in refusals:
            got, kind, text = request(target, body)
            assert got == status and "json" in kind and "error" in json.loads(text), (target, body, got, text)
        got, kind, text = request(f"{ann}/vote", f"ticket={first}&choice=tie", form=True)  # the page's form
        assert got == 409 and "text/html" in kind and "first vote stands" in text
        assert stored(review_dir) == before
        # names are taken once; nobody sees another's progress
        assert request(f"{url}/start", {"name": "ann"})[0] == 409
        assert "0 of 3" in request(bob)[2] and "1 of 3" in request(ann)[2]
        assert request(f"{url}/results")[0] == 403 and request(f"{url}/results?key=wrong")[0] == 403
        waiting = ticket(request(ann)[2])
    with running(review_dir) as url:  # a restarted server: the same item, in the same order, continues
        again = request(ann.replace(ann.split("/r/")[0], url))[2]
        assert "1 of 3" in again and ticket(again) == waiting
        from slmops.review.collect import results_key
        status, _, html = request(f"{url}/results?key={results_key(review_dir)}")
        assert status == 200 and "Win rate per pair" in html and "model-yankee vs model-zulu" in html
        status, kind, text = request(f"{url}/results/votes.csv?key={results_key(review_dir)}")
        assert status == 200 and "text/csv" in kind and len(text.strip().splitlines()) == 2


def test_results_of_three_models_rank_them_and_compare_reviewers(tmp_path, capsys):
    from slmops.review import ballots, pages

    rows = [{"prompt": f"question {i}", "answers": {"m1": "a", "m2": "b", "m3": "c"}} for i in range(2)]
    out = tmp_path / "review"
    assert main(["review", "--prompts", str(write_prompts(tmp_path / "p.jsonl", rows)), "-o", str(out),
                 "--serve", "false"]) == 0
    with contextlib.closing(ballots.connect(out / "votes.sqlite")) as db:
        for name in ("ann", "bob"):
            ballots.join(db, name, None)
            while (item := ballots.next_item(db, name)) is not None:
                left, right = db.execute("SELECT left_model, right_model FROM shown WHERE ticket = ?",
                                         (item["ticket"],)).fetchone()
                # both prefer the model named first, except that bob calls m2 and m3 a tie
                choice = "tie" if name == "bob" and {left, right} == {"m2", "m3"} else \
                    "left" if left < right else "right"
                ballots.cast(db, name, item["ticket"], choice, "")
    capsys.readouterr()
    assert main(["review", "--results", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "ranking (Bradley-Terry)" in shown and "ann & bob" in shown and "m1 vs m2" in shown
    stats = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in stats["ranking"]] == ["m1", "m2", "m3"] and stats["votes"] == 12
    assert stats["agreement"] == [{"reviewers": ["ann", "bob"], "shared": 6, "agreement": pytest.approx(4 / 6),
                                   "kappa": pytest.approx(tally.cohen_kappa(list("aaaaaa"), list("aaaatt")))}]
    html = pages.results(stats, "key")
    assert "Ranking (Bradley-Terry)" in html and "Cohen" in html and "votes.csv?key=key" in html


# ---------------------------------------------------------------- a real browser

@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromedriver are not on PATH")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def step(driver, action, done: int) -> None:
    """Do `action`, then wait for a new page (not the old one still on screen) showing `done` of the items."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.oldPage = true")
    action()
    WebDriverWait(driver, 10, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: d.execute_script("return window.oldPage === undefined && document.readyState === 'complete'")
        and d.find_element(By.ID, "progress").text.startswith(f"{done} of"))


@browser_only
def test_browser_votes_with_buttons_keys_reload_and_resume(browser, review_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with running(review_dir) as url:
        browser.delete_all_cookies()
        browser.get(url)
        browser.find_element(By.ID, "name").send_keys("ann")
        step(browser, browser.find_element(By.ID, "start").click, 0)
        assert not any(m in browser.page_source for m in MODELS)
        step(browser, browser.find_element(By.CSS_SELECTOR, "button[value=left]").click, 1)  # a vote by button
        assert len(stored(review_dir)) == 1  # committed as it was cast
        waiting = browser.find_element(By.NAME, "ticket").get_attribute("value")
        step(browser, browser.refresh, 1)  # a reload mid-review shows the same item again
        assert browser.find_element(By.NAME, "ticket").get_attribute("value") == waiting
        comment = browser.find_element(By.ID, "comment")
        comment.send_keys("both read fine, 3 is a key here")  # typing does not vote
        comment.send_keys(Keys.ESCAPE)
        body = browser.find_element(By.TAG_NAME, "body")
        step(browser, lambda: body.send_keys("t"), 2)  # a tie by keyboard, with the comment
        step(browser, lambda: browser.get(url), 2)  # the front page brings the reviewer back (cookie)
        body = browser.find_element(By.TAG_NAME, "body")
        step(browser, lambda: body.send_keys(Keys.ARROW_RIGHT), 3)  # B is better, by arrow key
        assert "All done" in browser.page_source
    votes = stored(review_dir)
    assert [v["choice"] for v in votes] == ["left", "tie", "right"] and {v["reviewer"] for v in votes} == {"ann"}
    assert votes[1]["comment"] == "both read fine, 3 is a key here" and votes[0]["comment"] == ""
    assert len({v["item"] for v in votes}) == 3 and all({v["left_model"], v["right_model"]} == set(MODELS)
                                                       for v in votes)
    with contextlib.closing(sqlite3.connect(review_dir / "votes.sqlite")) as db:  # each as it was shown
        shown = {(r[0], r[1]) for r in db.execute("SELECT item, left_model FROM shown WHERE reviewer = 'ann'")}
    assert {(v["item"], v["left_model"]) for v in votes} == shown


@browser_only
def test_browser_screenshot_of_the_review_page(browser, review_dir, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    with running(review_dir) as url:
        browser.delete_all_cookies()
        step(browser, lambda: browser.get(join(url, "reviewer")), 0)
        a, b = browser.find_element(By.ID, "answer-a"), browser.find_element(By.ID, "answer-b")
        assert a.is_displayed() and b.is_displayed() and browser.find_element(By.ID, "prompt").text
        assert a.location["x"] < b.location["x"] and abs(a.location["y"] - b.location["y"]) < 5  # side by side
        shot = tmp_path / "review.png"
        assert browser.save_screenshot(str(shot))
    shutil.copy(shot, "/tmp/review_screenshot.png")
    image = Image.open(shot).convert("RGB")
    assert image.size[0] >= 1000 and len(set(image.getdata())) > 50  # rendered text, not a blank page


# ---------------------------------------------------------------- the command, end to end

def test_cli_generates_answers_serves_and_reports(tiny_llama, tokenizer_dir, models_root, tmp_path, capsys):
    qwen = build_model(tokenizer_dir, models_root, "qwen2")
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "good film"}, {"prompt": "the plot was"}])
    out, port = tmp_path / "review", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "slmops", "review", "--models", f"llama={tiny_llama},{qwen}",
                             "--prompts", str(prompts), "-o", str(out), "--port", str(port), "--use_chat_template",
                             "--max_new_tokens", "6"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(OSError):
                if request(f"{url}/health")[0] == 200:
                    break
            time.sleep(0.3)
        me = join(url, "ann")
        for choice in ("left", "both_bad"):
            assert request(f"{me}/vote", {"ticket": ticket(request(me)[2]), "choice": choice})[0] == 200
        assert "All done" in request(me)[2]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert "Traceback" not in log and f"{url}/results?key=" in log, log
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["1", "2"] and all(set(r["answers"]) == {"llama", "tiny-qwen2"} for r in rows)
    assert json.loads((out / "manifest.json").read_text())["command"] == "review"
    capsys.readouterr()
    assert main(["review", "--results", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "llama vs tiny-qwen2" in shown and "2 votes by 1 reviewer on 2 models" in shown
    assert len((out / "votes.csv").read_text().splitlines()) == 3
    assert json.loads((out / "results.json").read_text())["pairs"][0]["votes"] == 2
