"""ANLS (Average Normalized Levenshtein Similarity) as an `evaluate` module (DocVQA / ST-VQA).

Item score = max over references of (1 - NL) when NL < threshold, else 0, where
NL = levenshtein(pred, ref) / max(len(pred), len(ref)) after lowercasing, stripping and collapsing
whitespace (the ST-VQA/DocVQA definition, threshold 0.5). Used for the document benchmarks of the
MMAT-1M evaluation (DESIGN.md section 6).
"""

import datasets
import evaluate


_DESCRIPTION = """
Average Normalized Levenshtein Similarity with threshold tau (default 0.5).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): model answers.
    references (`list[list[str]]`): acceptable answers per item.
    threshold (`float`, *optional*, defaults to 0.5): normalised distances at or above it score 0.
    return_per_item (`bool`, *optional*, defaults to `False`): also return per-item scores.
Returns:
    `anls` (`float`): mean item score in [0, 1].
Examples:
    >>> metric = evaluate.load("eval/metrics/anls")
    >>> metric.compute(predictions=["kitten"], references=[["sitting"]])
    {'anls': 0.5714285714285714}
"""


def levenshtein(a, b):
    """Edit distance with unit insert/delete/substitute costs (two-row dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _norm(text):
    return " ".join(str(text).strip().lower().split())


def item_anls(prediction, references, threshold=0.5):
    """ANLS of one prediction against its references, in [0, 1]."""
    if not references:
        raise ValueError("an item needs at least one reference answer")
    pred = _norm(prediction)
    best = 0.0
    for ref in references:
        ref = _norm(ref)
        longest = max(len(pred), len(ref))
        distance = levenshtein(pred, ref) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Anls(evaluate.Metric):
    """Average Normalized Levenshtein Similarity."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="@inproceedings{biten2019scene, title={Scene Text Visual Question Answering}, year={2019}}",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, threshold=0.5, return_per_item=False):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if len(predictions) == 0:
            raise ValueError("no predictions to score")
        scores = []
        for i, (pred, refs) in enumerate(zip(predictions, references)):
            if pred is None or not refs:
                raise ValueError(f"item {i}: prediction is None or references are empty")
            scores.append(item_anls(pred, refs, threshold))
        result = {"anls": sum(scores) / len(scores)}
        if return_per_item:
            result["scores"] = scores
        return result
