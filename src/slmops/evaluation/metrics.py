"""Evaluation metrics as pure functions on lists, shared by every backend (PyTorch, ONNX Runtime).

Scores in [0, 1] stay fractions (accuracy, F1, exact match, ROUGE); BLEU keeps sacrebleu's 0-100
scale, so the numbers read the same as the tools people already compare against. BLEU and ROUGE
come from sacrebleu and rouge_score directly: nothing is downloaded at run time.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence

import numpy as np

OTHER = "(other)"  # a generated answer that is none of the labels
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation, so that 'Positive.' matches 'positive' but 'not positive' does not."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    return accuracy([normalize(p) for p in predictions], [normalize(r) for r in references])


def to_label(generated: str, labels: Sequence[str]) -> str:
    """The label a generated answer names (after normalisation), else OTHER."""
    by_form = {normalize(label): label for label in labels}
    return by_form.get(normalize(generated), OTHER)


def per_class(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support of each label; a class never predicted has precision 0."""
    pairs = Counter(zip(predictions, references, strict=True))
    predicted, actual = Counter(predictions), Counter(references)
    out = {}
    for label in labels:
        hit = pairs[(label, label)]
        precision = hit / predicted[label] if predicted[label] else 0.0
        recall = hit / actual[label] if actual[label] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual[label]}
    return out


def macro_f1(classes: dict[str, dict]) -> float:
    """Unweighted mean over labels, so a rare class counts as much as a common one."""
    return sum(c["f1"] for c in classes.values()) / len(classes)


def confusion_matrix(predictions: Sequence[str], references: Sequence[str],
                     labels: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    """Rows are the true labels, columns the predicted ones (plus OTHER when an answer named none)."""
    columns = list(labels) + ([OTHER] if any(p not in labels for p in predictions) else [])
    pairs = Counter(zip(references, predictions, strict=True))
    return columns, [[pairs[(true, pred)] for pred in columns] for true in labels]


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 0-100)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (rouge_score, no stemming: Hugging Face `evaluate`'s default)."""
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds))
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {k: float(np.mean([s[k].fmeasure for s in scores])) for k in kinds}


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens)


def latency(seconds: Sequence[float]) -> dict[str, float]:
    """Median and 95th percentile per request, in milliseconds (the tail is what users wait for)."""
    ms = np.asarray(seconds) * 1000
    return {"latency_p50_ms": float(np.percentile(ms, 50)), "latency_p95_ms": float(np.percentile(ms, 95))}


def throughput(tokens: int, seconds: float) -> float:
    return tokens / seconds
