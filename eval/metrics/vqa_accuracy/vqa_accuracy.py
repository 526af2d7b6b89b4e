"""VQA soft accuracy as an `evaluate` module (VQAv2 / TextVQA style; MMAT-1M section 4 benchmarks).

An answer counts as fully right when at least three annotators gave it: for each of the N reference
answers, the prediction scores min(1, matches among the other N-1 / 3), and the item score is the
mean of those N values (the leave-one-out average of the VQAv2 evaluation). Prediction and
references both pass through the VQAv2 normalisation that the Dyn-VQA scorer also uses (imported
from there, so the two never drift apart).

Choices (DESIGN.md section 6): the VQAv2 code normalises only when the annotators disagree; here
both sides are always normalised, as VLMEvalKit does, so that "Two." and "2" agree for every item.
With a single reference the leave-one-out mean is always 0, so a single reference is scored by
exact match after normalisation.
"""

import collections

import datasets
import evaluate

from eval.metrics.dynvqa_f1_recall.dynvqa_f1_recall import official_normalize_prediction


_DESCRIPTION = """
VQA soft accuracy: min(1, #annotators agreeing / 3), averaged leave-one-out over the references.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): model answers.
    references (`list[list[str]]`): the annotators' answers per item (10 for VQAv2/TextVQA; repeats
        carry weight, so pass them all).
    return_per_item (`bool`, *optional*, defaults to `False`): also return per-item scores.
Returns:
    `accuracy` (`float`): mean item score x100.
Examples:
    >>> metric = evaluate.load("eval/metrics/vqa_accuracy")
    >>> metric.compute(predictions=["two"], references=[["2", "2", "2", "3"]])
    {'accuracy': 75.0}
"""


def normalize(text):
    """VQAv2 answer normalisation (whitespace, punctuation, number words, articles, contractions)."""
    return official_normalize_prediction(str(text))


def item_accuracy(prediction, references):
    """Soft accuracy of one prediction against its annotators' answers, in [0, 1]."""
    if not references:
        raise ValueError("an item needs at least one reference answer")
    pred = normalize(prediction)
    refs = [normalize(ref) for ref in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    counts = collections.Counter(refs)
    hits = counts[pred]
    total = 0.0
    for ref in refs:
        # Matches among the other annotators: drop this annotator's own vote when it matched.
        others = hits - (1 if ref == pred else 0)
        total += min(1.0, others / 3.0)
    return total / len(refs)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    """VQA soft accuracy."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="@inproceedings{antol2015vqa, title={VQA: Visual Question Answering}, year={2015}}",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, return_per_item=False):
        if len(predictions) == 0:
            raise ValueError("no predictions to score")
        scores = []
        for i, (pred, refs) in enumerate(zip(predictions, references)):
            if pred is None:
                raise ValueError(f"item {i}: prediction is None")
            if not refs:
                raise ValueError(f"item {i}: no reference answers")
            scores.append(item_accuracy(pred, refs))
        result = {"accuracy": 100 * sum(scores) / len(scores)}
        if return_per_item:
            result["scores"] = scores
        return result
