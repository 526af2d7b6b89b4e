"""The image benchmarks of the MMAT-1M evaluation and how each is prompted and scored (paper §4, Table 3).

Every benchmark maps to one of the `evaluate` modules in `eval/metrics/`: multiple-choice items to
`mc_accuracy` (letter extraction), free-form items of the same benchmark to `relaxed_accuracy`
with zero tolerance (numeric equality, else exact text), OCRBench to its substring rule on the
0-1000 scale. The official MathVista/MathVision/MMMU evaluations extract answers with a GPT judge;
rules stand in for it here (no paid API, DESIGN.md §6), so those scores are rule-based estimates.
TextVQA, DocVQA and ChartQA are registered too (VQA accuracy, ANLS, relaxed accuracy).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os

from .loaders.common import LETTERS, BenchmarkSample

METRICS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics")
METRIC_NAMES = ("dynvqa_f1_recall", "vqa_accuracy", "anls", "relaxed_accuracy", "mc_accuracy", "ocrbench_match")

MC_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_SUFFIX = "Answer the question using a single word or phrase."


@functools.lru_cache(maxsize=None)
def load_metric(name: str, config_name: str | None = None):
    """`evaluate.load` of one of our metric modules by local path (works offline)."""
    import evaluate

    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; available: {METRIC_NAMES}")
    return evaluate.load(os.path.join(METRICS_DIR, name), config_name)


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """How one benchmark is asked and scored.

    Args:
        name (`str`): registry key.
        paper_name (`str`): column name in MMAT-1M Table 3 (None when not there).
        metric (`str`): metric of its items (multiple-choice benchmarks use `mc_accuracy` for items
            with options and `free_form_metric` for the rest).
        free_form_metric (`str`, *optional*): metric for items without options.
        metric_kwargs (`tuple`): keyword arguments for the metric, as pairs.
        scale (`float`): multiplier from the [0, 1] item mean to the reported number.
        yes_no (`bool`): items are yes/no questions scored as a two-option choice.
    """

    name: str
    paper_name: str | None
    metric: str
    free_form_metric: str | None = None
    metric_kwargs: tuple = ()
    scale: float = 100.0
    yes_no: bool = False


BENCHMARKS = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("mmstar", "MMStar", "mc_accuracy", "relaxed_accuracy", (("tolerance", 0.0),)),
        BenchmarkSpec("mmmu", "MMMU", "mc_accuracy", "relaxed_accuracy", (("tolerance", 0.0),)),
        BenchmarkSpec("mathvista", "MathVista", "mc_accuracy", "relaxed_accuracy", (("tolerance", 0.0),)),
        BenchmarkSpec("mathvision", "MathVision", "mc_accuracy", "relaxed_accuracy", (("tolerance", 0.0),)),
        BenchmarkSpec("ai2d", "AI2D", "mc_accuracy", "relaxed_accuracy", (("tolerance", 0.0),)),
        BenchmarkSpec("ocrbench", "OCRBench", "ocrbench_match", scale=1000.0),
        BenchmarkSpec("realworldqa", "RealWorldQA", "mc_accuracy", "relaxed_accuracy", (("tolerance", 0.0),)),
        BenchmarkSpec("hallusionbench", "HallusionBench", "mc_accuracy", yes_no=True),
        BenchmarkSpec("textvqa", None, "vqa_accuracy"),
        BenchmarkSpec("docvqa", None, "anls"),
        BenchmarkSpec("chartqa", None, "relaxed_accuracy", metric_kwargs=(("tolerance", 0.05),)),
    )
}


def get_benchmark(name: str) -> BenchmarkSpec:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {sorted(BENCHMARKS)} and 'dynvqa'")
    return BENCHMARKS[key]


def _yes_no_letter(answer: str) -> str | None:
    value = answer.strip().lower()
    if value in ("yes", "1", "true"):
        return "A"
    if value in ("no", "0", "false"):
        return "B"
    return None


def prepare(spec: BenchmarkSpec, sample: BenchmarkSample) -> BenchmarkSample:
    """Give yes/no items their two options, so one scorer serves every choice benchmark."""
    if spec.yes_no and not sample.choices:
        letter = _yes_no_letter(sample.answers[0])
        return dataclasses.replace(sample, choices=["Yes", "No"], answer_letter=letter)
    return sample


def build_prompt(spec: BenchmarkSpec, sample: BenchmarkSample) -> str:
    """The question text sent to the model."""
    if spec.name == "ocrbench":
        return sample.question
    if spec.yes_no:
        return f"{sample.question}\nAnswer yes or no."
    if sample.choices and spec.metric == "mc_accuracy":
        options = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(sample.choices))
        return f"{sample.question}\n{options}\n{MC_SUFFIX}"
    return f"{sample.question}\n{SHORT_SUFFIX}"


def _hallusion_keys(sample: BenchmarkSample) -> tuple[str, str] | None:
    """HallusionBench's (figure, question) group keys, as VLMEvalKit forms them: the `l2-category` column with the
    set, figure and question ids, taken from columns of those names or else from the 4th-6th `_`-separated fields
    of the item's index. None when the item does not carry them."""
    extra = sample.extra
    l2 = extra.get("l2-category", extra.get("l2_category"))
    ids = [extra.get(name) for name in ("set_id", "figure_id", "question_id")]
    if any(v is None for v in ids):
        fields = str(sample.id).split("_")
        ids = fields[3:6] if len(fields) >= 6 else None
    if l2 is None or ids is None:
        return None
    set_id, figure_id, question_id = (str(v).strip() for v in ids)
    return f"{l2}|{set_id}|{figure_id}", f"{l2}|{set_id}|{question_id}"


def consistency_accuracies(samples: list[BenchmarkSample], per_item: dict[str, float], scale: float) -> dict:
    """HallusionBench's figure accuracy (fAcc: every question about one figure right) and question accuracy (qAcc:
    one question right on every figure variant it is asked about), beside the per-question accuracy (aAcc).

    Only scored items count, so a group with an item that was not predicted is judged on the rest; `missing_keys`
    counts scored items without group ids, and with any such item the two numbers are None."""
    figures: dict[str, list[bool]] = collections.defaultdict(list)
    questions: dict[str, list[bool]] = collections.defaultdict(list)
    missing = 0
    for sample in samples:
        if sample.id not in per_item:
            continue
        keys = _hallusion_keys(sample)
        if keys is None:
            missing += 1
            continue
        right = per_item[sample.id] >= 1.0
        figures[keys[0]].append(right)
        questions[keys[1]].append(right)

    def share(groups):
        return scale * sum(all(v) for v in groups.values()) / len(groups) if groups and not missing else None

    return {"fAcc": share(figures), "qAcc": share(questions), "figures": len(figures), "questions": len(questions),
            "missing_keys": missing}


def score(spec: BenchmarkSpec, samples: list[BenchmarkSample], predictions: dict[str, str]) -> dict:
    """Score the predicted items of a benchmark; returns the headline number and breakdowns.

    Items whose gold letter could not be determined are left out and counted (`unscorable`). `score` is the mean
    over the predicted items; items with no prediction (their batch failed, see `errors.jsonl`) are counted in
    `not_predicted`, and `score_missing_as_wrong` scores them 0, as toolkits that record a failure as the answer
    text do. HallusionBench also gets fAcc / qAcc (`consistency_accuracies`).
    """
    per_item: dict[str, float] = {}
    unscorable = not_predicted = 0
    groups: dict[str, list[BenchmarkSample]] = collections.defaultdict(list)
    for sample in samples:
        gold_unknown = spec.metric == "mc_accuracy" and sample.choices and sample.answer_letter is None
        if sample.id not in predictions:
            not_predicted += not gold_unknown
            continue
        if spec.metric == "mc_accuracy" and sample.choices:
            if gold_unknown:
                unscorable += 1
                continue
            groups["mc_accuracy"].append(sample)
        elif spec.metric == "mc_accuracy":
            groups[spec.free_form_metric or "relaxed_accuracy"].append(sample)
        else:
            groups[spec.metric].append(sample)
    extraction_failures = 0
    for metric_name, items in groups.items():
        metric = load_metric(metric_name)
        preds = [predictions[s.id] for s in items]
        if metric_name == "mc_accuracy":
            out = metric.compute(
                predictions=preds,
                references=[s.answer_letter for s in items],
                choices=[s.choices for s in items],
                return_per_item=True,
            )
            extraction_failures += out["extraction_failures"]
        elif metric_name == "ocrbench_match":
            out = metric.compute(
                predictions=preds,
                references=[s.answers for s in items],
                categories=[s.category or "" for s in items],
                return_per_item=True,
            )
        else:
            out = metric.compute(
                predictions=preds,
                references=[s.answers for s in items],
                return_per_item=True,
                **dict(spec.metric_kwargs),
            )
        for sample, value in zip(items, out["scores"]):
            per_item[sample.id] = float(value)
    n = len(per_item)
    by_category: dict[str, list[float]] = collections.defaultdict(list)
    for sample in samples:
        if sample.id in per_item:
            by_category[sample.category or "all"].append(per_item[sample.id])
    result = {
        "score": spec.scale * sum(per_item.values()) / n if n else None,
        "n_scored": n,
        "not_predicted": not_predicted,
        "score_missing_as_wrong": spec.scale * sum(per_item.values()) / (n + not_predicted) if n + not_predicted else None,
        "unscorable": unscorable,
        "extraction_failures": extraction_failures,
        "metric": spec.metric if len(groups) <= 1 else "+".join(sorted(groups)),
        "scale": spec.scale,
        "by_category": {k: spec.scale * sum(v) / len(v) for k, v in sorted(by_category.items())},
        "per_item": per_item,
    }
    if spec.name == "hallusionbench":
        result["consistency"] = consistency_accuracies(samples, per_item, spec.scale)
    return result
