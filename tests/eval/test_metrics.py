"""VQA soft accuracy, ANLS, relaxed accuracy, multiple-choice accuracy and OCRBench matching on
hand-computed cases, each loaded offline through `evaluate.load` by local path."""

from __future__ import annotations

import os

import evaluate
import pytest

from eval.metrics.anls.anls import item_anls, levenshtein
from eval.metrics.mc_accuracy.mc_accuracy import extract_letter
from eval.metrics.relaxed_accuracy.relaxed_accuracy import item_relaxed, to_number
from eval.metrics.vqa_accuracy.vqa_accuracy import item_accuracy

METRICS = os.path.join(os.path.dirname(__file__), "..", "..", "eval", "metrics")


def load(name):
    return evaluate.load(os.path.join(METRICS, name))


def test_vqa_soft_accuracy():
    ten = ["2"] * 3 + ["3"] * 7
    # Each of the 3 "2" annotators sees 2 others agreeing (2/3); the 7 "3" annotators see 3 (1).
    assert item_accuracy("two", ten) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert item_accuracy("3", ten) == 1.0
    assert item_accuracy("4", ten) == 0.0
    assert item_accuracy("A dog.", ["dog", "dog", "dog", "cat"]) == pytest.approx(0.75)
    assert item_accuracy("Dog", ["dog"]) == 1.0  # one reference: exact match after normalisation
    out = load("vqa_accuracy").compute(predictions=["two", "x"], references=[["2", "2", "2", "3"], ["y"]])
    assert out == {"accuracy": pytest.approx(37.5)}


def test_anls():
    assert levenshtein("kitten", "sitting") == 3
    assert item_anls("kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)
    assert item_anls("abc", ["xyz"]) == 0.0  # distance 1.0 >= 0.5
    assert item_anls("  Hello   World ", ["hello world"]) == 1.0
    assert item_anls("abcd", ["abce", "zzzz"]) == pytest.approx(0.75)  # best reference
    out = load("anls").compute(predictions=["abcd", "abc"], references=[["abce"], ["xyz"]])
    assert out["anls"] == pytest.approx(0.375)
    with pytest.raises(ValueError, match="threshold"):
        load("anls").compute(predictions=["a"], references=[["a"]], threshold=0)


def test_relaxed_accuracy():
    assert to_number("12%") == pytest.approx(0.12)
    assert to_number("$1,234.5") == pytest.approx(1234.5)
    assert to_number("twelve") is None
    assert item_relaxed("10.4", ["10"]) == 1.0
    assert item_relaxed("10.6", ["10"]) == 0.0
    assert item_relaxed("0", ["0"]) == 1.0  # zero reference: exact numeric equality
    assert item_relaxed("Paris", ["paris"]) == 1.0
    assert item_relaxed("3.0", ["3"], tolerance=0.0) == 1.0
    assert item_relaxed("3.01", ["3"], tolerance=0.0) == 0.0
    out = load("relaxed_accuracy").compute(predictions=["10.4", "no"], references=[["10"], ["yes"]])
    assert out == {"relaxed_accuracy": 50.0}


@pytest.mark.parametrize(
    "text,choices,expected",
    [
        ("B", None, "B"),
        ("(C)", None, "C"),
        ("D. a bird", None, "D"),
        ("The answer is (B).", None, "B"),
        ("Answer: C", None, "C"),
        ("答案是B", None, "B"),
        ("I think it is B because of the shape", None, "B"),
        ("A cat is sitting on the mat", ["dog", "cat", "bird"], "B"),  # "A" read as the article
        ("A", ["dog", "cat"], "A"),
        ("Yes, the light is red.", ["Yes", "No"], "A"),
        ("No.", ["Yes", "No"], "B"),
        ("E", ["x", "y", "z"], None),  # not an offered letter
        ("Either A or B", None, None),  # ambiguous
        ("no idea", None, None),
    ],
)
def test_letter_extraction(text, choices, expected):
    assert extract_letter(text, choices) == expected


def test_mc_accuracy_module():
    metric = load("mc_accuracy")
    out = metric.compute(predictions=["(B)", "cat", "hmm"], references=["B", "B", "A"],
                         choices=[["a", "b"], ["dog", "cat"], ["x", "y"]], return_per_item=True)
    assert out["accuracy"] == pytest.approx(200 / 3)
    assert out["extraction_failures"] == 1
    assert out["letters"] == ["B", "B", None]
    with pytest.raises(ValueError, match="option letter"):
        metric.compute(predictions=["A"], references=["cat"])
    for bad in ("", "AB"):  # substrings of the letter run, but no single letter: refused, not scored 0
        with pytest.raises(ValueError, match="option letter"):
            metric.compute(predictions=["A"], references=[bad])


def test_ocrbench_match():
    metric = load("ocrbench_match")
    out = metric.compute(
        predictions=["The sign says STOP", "x ^ 2 + 1", "nothing"],
        references=[["stop"], ["x^2+1"], ["something"]],
        categories=["Scene Text-centric VQA", "Handwritten Mathematical Expression Recognition", "Key Information Extraction"],
    )
    assert out["score"] == pytest.approx(2000 / 3)
