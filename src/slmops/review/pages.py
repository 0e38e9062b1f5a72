"""The review pages, rendered on the server: plain HTML, inline CSS and a few lines of JavaScript for the
keyboard, so they work with no network. The page never names a model: answers are "A" (left) and "B"
(right), and the form carries only the server's opaque ticket."""

from __future__ import annotations

from html import escape
from typing import Any

from slmops.review import tally

STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:16px 24px;color:#1b1f24}
h1{font-size:1.3em;margin:0 0 8px} .bar{height:6px;background:#e5e7eb;border-radius:3px;margin:6px 0 16px}
.bar div{height:6px;background:#2563eb;border-radius:3px} .meta{color:#57606a;font-size:.9em}
.prompt,.answer{white-space:pre-wrap;border:1px solid #d0d7de;border-radius:6px;padding:12px;
overflow-wrap:anywhere} .prompt{background:#f6f8fa;margin-bottom:16px}
.answers{display:grid;grid-template-columns:1fr 1fr;gap:16px} .answer h2{font-size:1em;margin:0 0 8px}
.choices{display:flex;gap:8px;margin:16px 0 8px;flex-wrap:wrap} button{font-size:1em;padding:8px 14px;
border-radius:6px;border:1px solid #8c959f;background:#fff;cursor:pointer} button:hover{background:#eef2ff}
kbd{border:1px solid #8c959f;border-radius:3px;padding:0 4px;font-size:.8em;background:#f6f8fa}
textarea{width:100%;box-sizing:border-box;height:4em;font:inherit} table{border-collapse:collapse;margin:8px 0 20px}
td,th{border:1px solid #d0d7de;padding:4px 10px;text-align:right} td:first-child,th:first-child{text-align:left}
.error{color:#b42318}
"""

# 1/2 or the arrow keys: A or B is better; 3 or T: tie; 4 or X: both bad; C: write a comment (Esc leaves it).
KEYS = """
const form = document.getElementById('vote');
let sent = false;
form.addEventListener('submit', e => { if (sent) e.preventDefault(); sent = true; });
const keys = {'1': 'left', 'ArrowLeft': 'left', '2': 'right', 'ArrowRight': 'right',
              '3': 'tie', 't': 'tie', '4': 'both_bad', 'x': 'both_bad'};
document.addEventListener('keydown', e => {
  const typing = e.target.tagName === 'TEXTAREA';
  if (typing) { if (e.key === 'Escape') e.target.blur(); return; }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
  if (key === 'c') { e.preventDefault(); document.getElementById('comment').focus(); return; }
  const choice = keys[key];
  if (choice) { e.preventDefault(); form.requestSubmit(document.querySelector(`button[value="${choice}"]`)); }
});
"""


def page(title: str, body: str, status_line: str = "") -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{STYLE}</style></head>"
            f"<body>{status_line}{body}</body></html>")


def landing(message: str = "") -> str:
    """The front page: a reviewer names themself once; a cookie brings them back to their place."""
    error = f"<p class=error>{escape(message)}</p>" if message else ""
    return page("Review", f"""<h1>Blind review</h1>
<p>You will see a prompt and two answers from different models, in random order, and pick the better one,
a tie, or both bad. Your votes are saved as you cast them; come back any time to continue.</p>{error}
<form method=post action=/start><label>Your name <input name=name id=name maxlength=40 required autofocus>
</label> <button type=submit id=start>Start</button></form>""")


def review(name: str, token: str, item: dict[str, Any], done: int, total: int) -> str:
    """One item: the prompt, answers A (left) and B (right), the four choices and a comment."""
    share = 100 * done / total if total else 100
    return page(f"Review: {done} of {total}", f"""
<h1>Which answer is better?</h1>
<div class=meta>Reviewer <b>{escape(name)}</b> &middot; <span id=progress>{done} of {total}</span> done &middot;
resume link: <a href="/r/{token}">/r/{token}</a></div>
<div class=bar><div style="width:{share:.1f}%"></div></div>
<div class=prompt id=prompt>{escape(item['prompt'])}</div>
<div class=answers><div class=answer><h2>A</h2><div id=answer-a>{escape(item['left_answer'])}</div></div>
<div class=answer><h2>B</h2><div id=answer-b>{escape(item['right_answer'])}</div></div></div>
<form method=post action="/r/{token}/vote" id=vote><input type=hidden name=ticket value="{escape(item['ticket'])}">
<div class=choices><button name=choice value=left>A is better <kbd>1</kbd> <kbd>&larr;</kbd></button>
<button name=choice value=tie>Tie <kbd>3</kbd> <kbd>T</kbd></button>
<button name=choice value=both_bad>Both bad <kbd>4</kbd> <kbd>X</kbd></button>
<button name=choice value=right>B is better <kbd>2</kbd> <kbd>&rarr;</kbd></button></div>
<label>Comment (optional, <kbd>C</kbd>; <kbd>Esc</kbd> to leave it)
<textarea name=comment id=comment maxlength=2000></textarea></label></form>
<script>{KEYS}</script>""")


def finished(name: str, total: int) -> str:
    return page("Review: done", f"<h1>All done</h1><p id=progress>{total} of {total} done. Thank you, "
                                f"{escape(name)}: every vote is saved.</p>")


def error(status: int, message: str) -> str:
    return page(f"Error {status}", f"<h1>Error {status}</h1><p class=error>{escape(message)}</p>"
                                   f"<p><a href=/>Back to the review</a></p>")


def results(summary: dict[str, Any], key: str) -> str:
    """The organiser's view: win rates per pair, the ranking, agreement, and the CSV of every vote."""
    pairs = _table(["pair", "votes", "a wins", "b wins", "ties", "both bad", "a win rate", "95% CI"],
                   [[f"{r['model_a']} vs {r['model_b']}", r["votes"], r["a_wins"], r["b_wins"], r["ties"],
                     r["both_bad"], f"{r['a_win_rate']:.3f}", f"{r['ci_low']:.3f} to {r['ci_high']:.3f}"]
                    for r in summary["pairs"]])
    body = [f"<h1>Review results</h1><p class=meta>{escape(tally.headline(summary))}; {escape(summary['ties'])}. <a href='/results/votes.csv?key={escape(key)}'>votes.csv</a>"
            f"</p><h2>Win rate per pair</h2>{pairs}"]
    if summary["ranking"] is not None:
        body.append("<h2>Ranking (Bradley-Terry)</h2>" + _table(
            ["model", "strength", "Elo scale", "votes", "win rate"],
            [[r["model"], _num(r["strength"], ".3f"), _num(r["rating"], ".0f"), r["votes"],
              _num(r["win_rate"], ".3f")] for r in summary["ranking"]]))
    if summary["agreement"]:
        body.append("<h2>Agreement between reviewers</h2>" + _table(
            ["reviewers", "shared items", "agreement", "Cohen's kappa"],
            [[" & ".join(r["reviewers"]), r["shared"], f"{r['agreement']:.3f}", _num(r["kappa"], ".3f")]
             for r in summary["agreement"]]))
    return page("Review results", "".join(body))


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
