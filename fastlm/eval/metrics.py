"""Text metrics: ROUGE (rouge-score), BLEU and chrF (sacrebleu), SQuAD exact match and token F1.

The numbers are the reference packages' own: fastlm only arranges the inputs. Scales, the
same everywhere in fastlm.eval (results.json, the report table, the Python API):

- ROUGE, exact match, token F1 (and the accuracies of fastlm.eval.tasks): fractions in [0, 1],
  as rouge-score and lm-evaluation-harness report them.
- BLEU and chrF: sacrebleu's scores, on its 0–100 scale (the numbers published results quote).

``references`` is one entry per prediction, each a string or a list of strings (several
references). Corpus values:

- ROUGE: the mean over examples of rouge-score's F-measure; with several references the best
  per example and per ROUGE type, exactly ``RougeScorer.score_multi``.
- BLEU / chrF: ``sacrebleu.corpus_bleu`` / ``corpus_chrf`` with default settings (13a
  tokenizer); examples with fewer references than others get ``None`` in the missing streams,
  which sacrebleu ignores.
- exact match / F1: SQuAD normalisation (lower case, no punctuation, no articles a/an/the,
  single spaces), the best over references per example, then the mean over examples. F1 is
  2·P·R/(P+R) over the bags of normalised tokens; when either side has no tokens it is
  1 if both are empty else 0 (SQuAD v2's rule).

rouge-score and sacrebleu form the optional ``eval`` extra (``pip install fastlm[eval]``) and are
imported only when a metric needs them.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

#: Metric names a task may ask for, and the keys each adds to the results.
METRICS = {
    "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "bleu": ("bleu", "chrf"),
    "exact_match": ("exact_match",),
    "f1": ("f1",),
}
ROUGE_TYPES = METRICS["rouge"]


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"fastlm.eval.{what} needs the '{module.split('.')[0]}' package: install the eval extra "
            f"(pip install 'fastlm[eval]')"
        ) from None


_PACKAGES = {"rouge": "rouge_score.rouge_scorer", "bleu": "sacrebleu"}


def check_available(metric: str) -> None:
    """Raise ImportError (naming the eval extra) now if ``metric`` needs a package that is missing."""
    if metric in _PACKAGES:
        _require(_PACKAGES[metric], metric)


def reference_lists(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                    what: str) -> list[list[str]]:
    """Check the inputs and return the references as one non-empty list of strings per prediction."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError(f"{what}: predictions and references must be sequences (one entry per example), "
                        "not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"{what}: {len(predictions)} predictions but {len(references)} references")
    out = []
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise TypeError(f"{what}: prediction {i} must be a str, got {type(pred).__name__}")
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"{what}: references[{i}] must be a string or a non-empty list of strings, "
                             f"got {references[i]!r}")
        out.append(refs)
    return out


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]], *,
          use_stemmer: bool = False) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measures (fractions in [0, 1]), each the mean over examples of
    rouge-score's per-example F (best reference per example with several references)."""
    refs = reference_lists(predictions, references, "rouge")
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, targets in zip(predictions, refs):
        scores = scorer.score(targets[0], pred) if len(targets) == 1 else scorer.score_multi(targets, pred)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    n = max(len(predictions), 1)
    return {key: total / n for key, total in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """sacrebleu's corpus BLEU and chrF (0–100) with its default settings."""
    refs = reference_lists(predictions, references, "bleu")
    if not predictions:
        raise ValueError("bleu: no predictions")
    sacrebleu = _require("sacrebleu", "bleu")
    width = max(len(r) for r in refs)
    # sacrebleu wants reference streams: stream j holds each example's j-th reference (None if absent).
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(width)]
    return {"bleu": sacrebleu.corpus_bleu(list(predictions), streams).score,
            "chrf": sacrebleu.corpus_chrf(list(predictions), streams).score}


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop ASCII punctuation and the articles a/an/the,
    collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match_scores(predictions, references) -> list[float]:
    """Per example: 1.0 if the normalised prediction equals a normalised reference, else 0.0."""
    refs = reference_lists(predictions, references, "exact_match")
    return [float(any(normalize_answer(p) == normalize_answer(r) for r in rs)) for p, rs in zip(predictions, refs)]


def f1_scores(predictions, references) -> list[float]:
    """Per example: the best token F1 over the references."""
    refs = reference_lists(predictions, references, "f1")
    return [max(_f1(p, r) for r in rs) for p, rs in zip(predictions, refs)]


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean SQuAD exact match (fraction in [0, 1]; 0.0 for no examples)."""
    scores = exact_match_scores(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0


def token_f1(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean SQuAD token F1 (fraction in [0, 1]; 0.0 for no examples)."""
    scores = f1_scores(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0


def compute(metric: str, predictions, references, *, use_stemmer: bool = False) -> dict[str, float]:
    """One named metric of :data:`METRICS` as a dict of its result keys."""
    if metric == "rouge":
        return rouge(predictions, references, use_stemmer=use_stemmer)
    if metric == "bleu":
        return bleu(predictions, references)
    if metric == "exact_match":
        return {"exact_match": exact_match(predictions, references)}
    if metric == "f1":
        return {"f1": token_f1(predictions, references)}
    raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
