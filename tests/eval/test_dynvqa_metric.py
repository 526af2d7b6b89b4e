"""Dyn-VQA token F1-recall: the official scorer's behaviour case by case, the clean mode, and the
download-free English tokenizer against `nltk.word_tokenize` itself."""

from __future__ import annotations

import json
import os

import pytest

from conftest import DYNVQA_DIR, DYNVQA_FILES
from eval.metrics.dynvqa_f1_recall.dynvqa_f1_recall import (
    OFFICIAL_PERIOD_CAP,
    clean_item_scores,
    clean_tokenize,
    nltk_word_tokenize,
    official_item_score,
    official_normalize_prediction,
    official_strip_punctuation,
    official_tokenize,
)

METRIC_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "eval", "metrics", "dynvqa_f1_recall")


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(METRIC_DIR)


# (prediction, golds, lang, official score, why)
OFFICIAL_CASES = [
    ("Al Nassr.", ["Al Nassr", "Al Nassr FC"], "en", 1.0, "trailing period stripped; best gold wins"),
    ("Al Nassr", ["Al Nassr FC"], "en", 2 / 3, "recall of gold tokens, no precision term"),
    ("The club is Al Nassr and many other words", ["Al Nassr"], "en", 1.0, "extra words cost nothing"),
    ("hello world", ['"Hello" world'], "en", 0.5, "gold keeps NLTK's `` and '' quote tokens"),
    ("Kappa", ["Kappa"], "zh", 0.0, "zh mode lowercases the prediction but not the gold"),
    ("Kappa", ["Kappa"], "en", 1.0, "en mode lowercases both"),
    ("?", ["x"], "en", 0.0, "prediction empty after normalisation scores 0"),
    (":", ["?"], "en", 1.0, "both token lists empty count as equal"),
    ("Al-Nassr", ["Al-Nassr"], "en", 0.0, "a hyphen not next to a space becomes a space in the prediction only"),
    ("dont", ["don't"], "en", 1.0, "VQA contraction map, then NLTK splits do + n't on both sides"),
    ("two", ["2"], "en", 1.0, "number words become digits in the prediction"),
    ("none", ["0"], "en", 1.0, "'none' maps to 0"),
    ("the answer", ["the answer"], "en", 0.5, "articles dropped from the prediction only"),
    ("1,000 (approx)", ["1000"], "en", 1.0, "a digit,digit comma removes every punctuation mark outright"),
    ("He won 3.5 million.", ["3.5 million"], "en", 1.0, "a period before a digit stays"),
    ("2018", [str(2018)], "en", 1.0, "numeric gold answers are str()-ed"),
    ("", ["x"], "zh", 0.0, "empty prediction"),
]


@pytest.mark.parametrize("prediction,golds,lang,expected,why", OFFICIAL_CASES, ids=[c[4] for c in OFFICIAL_CASES])
def test_official_cases(prediction, golds, lang, expected, why):
    assert official_item_score(prediction, golds, lang) == pytest.approx(expected), why


def test_period_cap_is_32():
    # 32 periods before "mr." are stripped, so "mr." keeps its period and misses the gold "mr".
    assert OFFICIAL_PERIOD_CAP == 32
    capped = "cat. " * 32 + "mr. smith"
    under_cap = "cat. " * 31 + "mr. smith"
    assert official_normalize_prediction(capped).endswith("cat mr. smith")
    assert official_normalize_prediction(under_cap).endswith("cat mr smith")
    assert official_item_score(capped, ["Mr Smith"], "en") == 0.5
    assert official_item_score(under_cap, ["Mr Smith"], "en") == 1.0


def test_punctuation_rule_looks_at_the_original_text():
    assert official_strip_punctuation("a ,b") == "a b"  # next to a space: removed
    assert official_strip_punctuation("a,b") == "a b"  # not next to a space: a space instead
    assert official_strip_punctuation("1,5 (x)") == "15 x"  # digit comma present: all removed


def test_chinese_tokens_and_score():
    gold = "莱昂纳多·迪卡普里奥没有任何孩子。"
    gold_toks = official_tokenize(gold, "zh")
    assert gold_toks == ["莱昂纳多", "·", "迪卡", "普里", "奥", "没有", "任何", "孩子"]  # "。" dropped
    pred = "莱昂纳多·迪卡普里奥没有孩子"
    assert official_item_score(pred, [gold], "zh") == pytest.approx(7 / 8)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="at least one gold"):
        official_item_score("x", [], "en")
    with pytest.raises(ValueError, match="at least one gold"):
        official_item_score("x", None, "en")
    with pytest.raises(ValueError, match="lang"):
        official_item_score("x", ["x"], "fr")
    with pytest.raises(ValueError, match="string"):
        official_item_score(None, ["x"], "en")


def test_clean_mode_is_symmetric():
    for pred, gold in [("well-known", "well-known"), ("Al-Nassr", "Al-Nassr"), ("Kappa", "Kappa"),
                       ("hello world", '"Hello" world'), ("the answer", "The answer."), ("1,000", "1000")]:
        assert clean_item_scores(pred, [gold]) == (1.0, 1.0), (pred, gold)
    assert clean_tokenize("The U.S. has 1,000,000 people; 3.5% don’t") == ["u", "s", "has", "1000000", "people", "3.5", "don't"]
    assert clean_tokenize("他有Two个孩子") == ["他", "有", "2", "个", "孩子"]
    recall, f1 = clean_item_scores("Al Nassr football club", ["Al Nassr"])
    assert recall == 1.0 and f1 == pytest.approx(2 * 2 / (2 + 4))


def test_evaluate_module_official_and_clean(metric):
    preds = ["Al Nassr.", "Kappa", "well-known"]
    refs = [["Al Nassr", "Al Nassr FC"], ["Kappa"], ["well-known"]]
    assert metric.compute(predictions=preds, references=refs, lang="en") == {"f1_recall": 66.67}
    zh = metric.compute(predictions=preds, references=refs, lang="zh", return_per_item=True)
    assert zh["scores"][1] == 0.0
    clean = metric.compute(predictions=preds, references=refs, mode="clean")
    assert clean == {"f1_recall": 100.0, "token_f1": 100.0}
    with pytest.raises(ValueError, match="mode"):
        metric.compute(predictions=preds, references=refs, mode="fuzzy")


def _agreement_texts():
    texts = [
        "Mr. Smith went to Washington. He arrived at 5 p.m. on Jan. 3rd. Then he left!",
        "U.S. Open winner: Carlos Alcaraz.  \"Quoted\" text... e.g. this (i.e. that).",
        "It's 3.5 km; they'd've gone... 'single' `back` [brackets] {braces} <tags> a/b c\\d",
        "Dr. J. R. R. Tolkien wrote it in 1937. St. Louis, Mo. is far. No. 5 is next.",
        "He said: \"I can't.\" She replied -- \"You won't!\" (2024-05-01) $1,000.50 #1 @home",
    ]
    base = list(texts)
    for t in base:
        texts.append(t.lower())
        texts.append(official_normalize_prediction(t))
    if all((DYNVQA_DIR / name).is_file() for name in DYNVQA_FILES):
        real = []
        for name in DYNVQA_FILES[:2]:
            with open(DYNVQA_DIR / name, encoding="utf-8") as f:
                for line in f:
                    record = json.loads(line)
                    real.append(record["question"].lower())
                    real.extend(str(a).lower() for a in record["answer"])
                    real.append(official_normalize_prediction(record["question"]))
        # Every English text where sentence splitting can matter (a period, quote or apostrophe),
        # plus every 8th of the rest, keeps the test to a few seconds.
        texts += [t for i, t in enumerate(real) if any(c in t for c in ".'\"") or i % 8 == 0]
    return texts


def test_tokenizer_matches_nltk_word_tokenize(nltk_punkt_tab_dir):
    import nltk

    texts = _agreement_texts()
    mismatches = [t for t in texts if nltk.word_tokenize(t) != nltk_word_tokenize(t)]
    assert len(texts) >= 15
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]}"
