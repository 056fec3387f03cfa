"""Task metrics named by each record's ``metric`` field (``../shared/data/README.md``).

``f1`` and ``exact`` use SQuAD v1.1 answer normalisation (lower case, no punctuation, no articles,
single spaces), max over references; ``exact`` against a numeric reference compares the first
number in the prediction (so the sign of "-153" counts). ``rougeL`` is rouge-score's ROUGE-L F,
``chrf`` and ``bleu`` are sacrebleu's sentence scores. Every score is in [0, 1]. ``METRICS`` is the
one list of metric names: ``export.data`` accepts a record naming one of them.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Callable, Dict, Sequence

from runtime.errors import FirstEdgeError

_NUM = re.compile(r"^\s*[-+]?\d[\d,]*(\.\d+)?\s*$")
_FIRST_NUM = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(r)
    return 2 * prec * rec / (prec + rec)


def _num(s: str):
    return float(s.replace(",", "").replace("+", ""))


def _exact(pred: str, ref: str) -> float:
    if _NUM.match(ref):
        m = _FIRST_NUM.search(pred)
        return float(m is not None and _num(m.group(0)) == _num(ref.strip()))
    return float(normalize_answer(pred) == normalize_answer(ref))


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _rouge_l(pred: str, ref: str) -> float:
    return float(_rouge().score(ref, pred)["rougeL"].fmeasure)


def chrf(pred: str, refs: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(pred, list(refs)).score) / 100.0


def bleu(pred: str, refs: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(pred, list(refs)).score) / 100.0


def _best_over_references(per_reference: Callable[[str, str], float]) -> Callable[[str, Sequence[str]], float]:
    def scorer(pred: str, refs: Sequence[str]) -> float:
        return max(per_reference(pred, r) for r in refs)

    scorer.__name__ = per_reference.__name__.lstrip("_")
    return scorer


# every metric a record may name (``export.data`` accepts exactly these): name -> scorer(pred, refs)
METRICS: Dict[str, Callable[[str, Sequence[str]], float]] = {
    "f1": _best_over_references(_f1),
    "exact": _best_over_references(_exact),
    "rougeL": _best_over_references(_rouge_l),
    "chrf": chrf,
    "bleu": bleu,
}


def score(pred: str, references: Sequence[str], metric: str) -> float:
    """The record's metric, max over references (chrF/BLEU take all references at once)."""
    refs = list(references)
    if not refs:
        raise FirstEdgeError("a record needs at least one reference")
    if metric not in METRICS:
        raise FirstEdgeError(f"unknown metric '{metric}' (known: {', '.join(METRICS)})")
    return METRICS[metric](pred.strip(), refs)


def corpus_bleu(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (first reference stream padded per record), in [0, 1]."""
    import sacrebleu

    n = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(n)]
    return float(sacrebleu.corpus_bleu(list(preds), streams).score) / 100.0
