"""Relaxed accuracy as an `evaluate` module (ChartQA; used for numeric free-form answers).

A numeric answer is right when its relative error to the reference is at most `tolerance`
(5% by default, ChartQA's rule); a percentage sign is read as /100 on either side, thousands
separators and a leading currency sign are ignored. Anything non-numeric, or a zero reference
(relative error undefined), falls back to case-insensitive exact match. The best reference counts.
"""

import re

import datasets
import evaluate


_DESCRIPTION = """
Relaxed accuracy: numeric answers within a relative tolerance (default 5%) count as correct,
other answers need a case-insensitive exact match.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): model answers.
    references (`list[list[str]]`): acceptable answers per item.
    tolerance (`float`, *optional*, defaults to 0.05): maximal relative error for numbers; 0 asks
        for numeric equality ("3.0" == "3").
    return_per_item (`bool`, *optional*, defaults to `False`): also return per-item scores.
Returns:
    `relaxed_accuracy` (`float`): mean item score x100.
Examples:
    >>> metric = evaluate.load("eval/metrics/relaxed_accuracy")
    >>> metric.compute(predictions=["10.4"], references=[["10"]])
    {'relaxed_accuracy': 100.0}
"""

_NUMBER_RE = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def to_number(text):
    """The answer as a float, or None when it is not a plain number ("12%" -> 0.12)."""
    text = str(text).strip().rstrip(".")
    scale = 1.0
    if text.endswith("%"):
        text, scale = text[:-1].strip(), 0.01
    text = text.lstrip("$€£¥").replace(",", "")
    if not _NUMBER_RE.match(text):
        return None
    return float(text) * scale


def item_relaxed(prediction, references, tolerance=0.05):
    """1.0 when the prediction matches any reference under the relaxed rule, else 0.0."""
    if not references:
        raise ValueError("an item needs at least one reference answer")
    pred_num = to_number(prediction)
    for ref in references:
        ref_num = to_number(ref)
        if pred_num is not None and ref_num is not None and ref_num != 0:
            if abs(pred_num - ref_num) / abs(ref_num) <= tolerance:
                return 1.0
        elif pred_num is not None and ref_num is not None and pred_num == ref_num:
            return 1.0
        elif str(prediction).strip().lower() == str(ref).strip().lower():
            return 1.0
    return 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RelaxedAccuracy(evaluate.Metric):
    """ChartQA relaxed accuracy."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="@inproceedings{masry2022chartqa, title={ChartQA}, year={2022}}",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, tolerance=0.05, return_per_item=False):
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        if len(predictions) == 0:
            raise ValueError("no predictions to score")
        scores = []
        for i, (pred, refs) in enumerate(zip(predictions, references)):
            if pred is None or not refs:
                raise ValueError(f"item {i}: prediction is None or references are empty")
            scores.append(item_relaxed(pred, refs, tolerance))
        result = {"relaxed_accuracy": 100 * sum(scores) / len(scores)}
        if return_per_item:
            result["scores"] = scores
        return result
