"""OCRBench scoring as an `evaluate` module (MMAT-1M Table 3 reports OCRBench on a 0-1000 scale).

OCRBench counts an item right when any reference answer, lowercased and stripped, is a substring
of the lowercased prediction; for handwritten mathematical expressions all whitespace is removed
from both first. The benchmark has 1000 items, so the score is reported as accuracy x 1000.
"""

import datasets
import evaluate


_DESCRIPTION = """
OCRBench substring match, reported as correct items per 1000.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): model answers.
    references (`list[list[str]]`): acceptable answers per item.
    categories (`list[str]`, *optional*): OCRBench question types; items of type
        "Handwritten Mathematical Expression Recognition" are compared without whitespace.
Returns:
    `score` (`float`): accuracy x1000 (the OCRBench scale). `accuracy` (`float`): x100.
Examples:
    >>> metric = evaluate.load("eval/metrics/ocrbench_match")
    >>> metric.compute(predictions=["The sign says STOP"], references=[["stop"]])
    {'score': 1000.0, 'accuracy': 100.0}
"""

HME_CATEGORY = "Handwritten Mathematical Expression Recognition"


def item_match(prediction, references, category=None):
    """1.0 when a reference occurs inside the prediction (OCRBench rule), else 0.0."""
    pred = str(prediction).strip().lower()
    if category == HME_CATEGORY:
        pred = "".join(pred.split())
    for ref in references:
        ref = str(ref).strip().lower()
        if category == HME_CATEGORY:
            ref = "".join(ref.split())
        if ref and ref in pred:
            return 1.0
    return 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class OcrbenchMatch(evaluate.Metric):
    """OCRBench substring match."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="@article{liu2023ocrbench, title={OCRBench}, year={2023}}",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, categories=None, return_per_item=False):
        if len(predictions) == 0:
            raise ValueError("no predictions to score")
        if categories is not None and len(categories) != len(predictions):
            raise ValueError(f"{len(categories)} categories for {len(predictions)} predictions")
        scores = []
        for i, (pred, refs) in enumerate(zip(predictions, references)):
            if not refs:
                raise ValueError(f"item {i}: no reference answers")
            scores.append(item_match(pred or "", refs, categories[i] if categories else None))
        accuracy = sum(scores) / len(scores)
        result = {"score": 1000 * accuracy, "accuracy": 100 * accuracy}
        if return_per_item:
            result["scores"] = scores
        return result
