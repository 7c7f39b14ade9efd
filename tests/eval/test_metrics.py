"""fastlm.eval metrics equal the reference packages (rouge-score, sacrebleu) on varied texts, and
SQuAD exact match / token F1 equal hand computations."""

import pytest

from fastlm.eval import bleu, exact_match, normalize_answer, rouge, token_f1

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
sacrebleu = pytest.importorskip("sacrebleu")

PREDICTIONS = [
    "The cat sat on the mat.",
    "",  # empty prediction
    "Naïve café owners in Zürich serve crème brûlée.",
    "東京 is the capital of Japan 😀",
    "running dogs were running quickly\nover two lines",
]
REFERENCES = [
    "A cat was sitting on the mat.",
    "There is nothing here.",
    ["Owners of naive cafes in Zurich serve creme brulee.", "Zürich café owners serve crème brûlée."],
    ["Tokyo is the capital of Japan.", "東京 is Japan's capital", "the capital is Tokyo"],
    "the dogs ran quickly\nover two lines",
]


def _as_lists(refs):
    return [[r] if isinstance(r, str) else r for r in refs]


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_equals_rouge_score(use_stemmer):
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=use_stemmer)
    per = [scorer.score_multi(refs, pred) for pred, refs in zip(PREDICTIONS, _as_lists(REFERENCES))]
    expected = {t: sum(s[t].fmeasure for s in per) / len(per) for t in types}
    got = rouge(PREDICTIONS, REFERENCES, use_stemmer=use_stemmer)
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    assert 0 < got["rouge1"] < 1  # fractions, not x100


def test_rouge_single_reference_and_stemming_changes_value():
    plain = rouge(["running dogs"], ["the dog runs"])
    stemmed = rouge(["running dogs"], ["the dog runs"], use_stemmer=True)
    assert plain["rouge1"] == 0.0 and stemmed["rouge1"] > 0.5


def test_bleu_chrf_equal_sacrebleu():
    streams = [[r[0] for r in _as_lists(REFERENCES)],
               [r[1] if len(r) > 1 else None for r in _as_lists(REFERENCES)],
               [r[2] if len(r) > 2 else None for r in _as_lists(REFERENCES)]]
    got = bleu(PREDICTIONS, REFERENCES)
    assert got["bleu"] == sacrebleu.corpus_bleu(PREDICTIONS, streams).score
    assert got["chrf"] == sacrebleu.corpus_chrf(PREDICTIONS, streams).score
    assert got["bleu"] > 1  # sacrebleu's 0-100 scale
    single = bleu(PREDICTIONS[:2], REFERENCES[:2])
    assert single["bleu"] == sacrebleu.corpus_bleu(PREDICTIONS[:2], [REFERENCES[:2]]).score


def test_normalize_answer_squad_rules():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theater") == "theater"  # articles only as whole words
    assert normalize_answer("Zürich — café") == "zürich — café"  # only ASCII punctuation is removed


def test_exact_match_and_f1_by_hand():
    preds = ["The Eiffel Tower!", "", "paris france", "Tokyo"]
    refs = ["eiffel tower", "", ["Paris", "the city of Paris, France"], ["Kyoto", "Osaka"]]
    assert exact_match(preds, refs) == pytest.approx((1 + 1 + 0 + 0) / 4)
    # f1: 1; both empty -> 1; best of (2*(1/2)*(1/1)/(1.5)=2/3, tokens {city,of,paris,france}: p=2/2, r=2/4 -> 2/3); 0
    assert token_f1(preds, refs) == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)
    # "a" is an article: pred {b, b}, ref {b, b, c}: P = 1, R = 2/3, F1 = 0.8
    assert token_f1(["a b b"], ["b b c"]) == pytest.approx(0.8)
    assert token_f1(["x"], [""]) == 0.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        bleu(["a"], [[]])
    with pytest.raises(TypeError, match="not a single string"):
        exact_match("abc", "abc")


def test_missing_extra_is_named(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "rouge_score", None)
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
    with pytest.raises(ImportError, match=r"install the eval extra \(pip install 'fastlm\[eval\]'\)"):
        rouge(["a"], ["a"])
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(ImportError, match="'sacrebleu' package"):
        bleu(["a"], ["a"])
