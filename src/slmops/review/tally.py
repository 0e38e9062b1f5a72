"""What the votes say: win rate per pair of models with a 95% interval, a Bradley-Terry ranking, how far
reviewers agree, and every vote as CSV.

A vote names the models shown left and right and the choice (left, right, tie, both_bad). The statistics
read it in model terms: for the pair (a, b), a before b by name, each vote is a win for a, a win for b, a
tie or both bad. Ties and both-bad votes count as half a win for each side in win rates and in the
ranking: neither answer was preferred. The page's left/right order is random, so it carries no signal.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from itertools import combinations
from typing import Any, Sequence

import numpy as np

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
NEITHER = ("tie", "both_bad")
CSV_COLUMNS = ("id", "reviewer", "item", "prompt_id", "prompt", "left_model", "right_model", "choice", "winner",
               "comment", "cast_at")


def outcome(vote: dict[str, Any]) -> tuple[str, str, str]:
    """(a, b, result), a before b by name; result is "a", "b", "tie" or "both_bad"."""
    a, b = sorted((vote["left_model"], vote["right_model"]))
    if vote["choice"] in NEITHER:
        return a, b, vote["choice"]
    winner = vote["left_model"] if vote["choice"] == "left" else vote["right_model"]
    return a, b, "a" if winner == a else "b"


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion: unlike the normal approximation it stays inside [0, 1]
    and is honest for small n and rates near 0 or 1. `successes` may be fractional (half wins)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def pair_table(votes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per pair of models that met: the counts, a's win rate (ties and both-bad as half) and its interval."""
    counts: dict[tuple[str, str], Counter] = {}
    for vote in votes:
        a, b, result = outcome(vote)
        counts.setdefault((a, b), Counter())[result] += 1
    rows = []
    for (a, b), c in sorted(counts.items()):
        n = sum(c.values())
        wins = c["a"] + 0.5 * (c["tie"] + c["both_bad"])
        low, high = wilson(wins, n)
        rows.append({"model_a": a, "model_b": b, "votes": n, "a_wins": c["a"], "b_wins": c["b"], "ties": c["tie"],
                     "both_bad": c["both_bad"], "a_win_rate": wins / n, "ci_low": low, "ci_high": high})
    return rows


def bradley_terry(models: Sequence[str], votes: Sequence[dict[str, Any]], tol: float = 1e-10,
                  max_iter: int = 10_000) -> dict[str, float]:
    """Bradley-Terry strengths (summing to 1) by Hunter's MM algorithm: P(i beats j) = p_i / (p_i + p_j).

    Each step sets p_i = W_i / sum_j n_ij / (p_i + p_j) (W_i: i's wins, n_ij: i and j's comparisons), which
    raises the likelihood every time and converges to the maximum. A model that never won gets 0."""
    index = {m: i for i, m in enumerate(models)}
    wins = np.zeros((len(models), len(models)))
    for vote in votes:
        a, b, result = outcome(vote)
        i, j = index[a], index[b]
        if result == "a":
            wins[i, j] += 1
        elif result == "b":
            wins[j, i] += 1
        else:
            wins[i, j] += 0.5
            wins[j, i] += 0.5
    met = wins + wins.T
    p = np.full(len(models), 1 / len(models))
    for _ in range(max_iter):
        pair_sums = p[:, None] + p[None, :]
        ratios = np.divide(met, pair_sums, out=np.zeros_like(met), where=met > 0)
        denominator = ratios.sum(axis=1)
        new = np.divide(wins.sum(axis=1), denominator, out=p.copy(), where=denominator > 0)
        new /= new.sum()
        done = np.abs(new - p).max() < tol
        p = new
        if done:
            break
    return {m: float(p[index[m]]) for m in models}


def ranking(models: Sequence[str], votes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Models by Bradley-Terry strength, with the same strength on the Elo scale (mean model 1000;
    400 points apart: 10 to 1 odds) and each model's votes and overall win rate. A model in no vote yet
    comes last, unrated."""
    seen: Counter = Counter()
    won: Counter = Counter()
    for vote in votes:
        a, b, result = outcome(vote)
        seen.update((a, b))
        won[a] += 1.0 if result == "a" else 0.5 if result in NEITHER else 0.0
        won[b] += 1.0 if result == "b" else 0.5 if result in NEITHER else 0.0
    compared = [m for m in models if seen[m]]
    strengths = bradley_terry(compared, votes) if compared else {}
    rows = [{"model": m, "strength": s, "rating": 1000 + 400 * math.log10(s * len(compared)) if s > 0 else None,
             "votes": seen[m], "win_rate": won[m] / seen[m]} for m, s in strengths.items()]
    rows.sort(key=lambda r: -r["strength"])
    return rows + [{"model": m, "strength": None, "rating": None, "votes": 0, "win_rate": None}
                   for m in models if not seen[m]]


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' labels for the same items: agreement beyond what their own label
    frequencies give by chance. None when chance alone explains everything (both always chose one label)."""
    n = len(first)
    observed = sum(x == y for x, y in zip(first, second, strict=True)) / n
    f1, f2 = Counter(first), Counter(second)
    expected = sum(f1[c] * f2[c] for c in f1.keys() | f2.keys()) / (n * n)
    return None if expected == 1 else (observed - expected) / (1 - expected)


def agreement(votes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every two reviewers who judged some of the same items: how many, the share where they chose the
    same (in model terms: a better, b better, tie, both bad), and Cohen's kappa."""
    chosen: dict[str, dict[int, str]] = {}
    for vote in votes:
        chosen.setdefault(vote["reviewer"], {})[vote["item"]] = outcome(vote)[2]
    rows = []
    for r1, r2 in combinations(sorted(chosen), 2):
        shared = sorted(chosen[r1].keys() & chosen[r2].keys())
        if shared:
            x, y = [chosen[r1][i] for i in shared], [chosen[r2][i] for i in shared]
            rows.append({"reviewers": [r1, r2], "shared": len(shared),
                         "agreement": sum(a == b for a, b in zip(x, y)) / len(shared), "kappa": cohen_kappa(x, y)})
    return rows


def summarize(models: Sequence[str], votes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Everything the results view and results.json show; the ranking only with more than two models."""
    return {"models": list(models), "votes": len(votes), "reviewers": sorted({v["reviewer"] for v in votes}),
            "ties": "ties and both-bad votes count as half a win for each model; intervals are Wilson 95%",
            "pairs": pair_table(votes), "ranking": ranking(models, votes) if len(models) > 2 else None,
            "agreement": agreement(votes)}


def headline(summary: dict[str, Any]) -> str:
    """"20 votes by 1 reviewer on 2 models", as the results view and the terminal both say it."""
    def count(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"
    return (f"{count(summary['votes'], 'vote')} by {count(len(summary['reviewers']), 'reviewer')} on "
            f"{count(len(summary['models']), 'model')}")


def votes_csv(votes: Sequence[dict[str, Any]]) -> str:
    """Every vote, one row each, with the winning model spelled out (tie or both_bad when neither)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for vote in votes:
        winner = {"left": vote["left_model"], "right": vote["right_model"]}.get(vote["choice"], vote["choice"])
        writer.writerow({**vote, "winner": winner})
    return out.getvalue()
