"""Multiple-choice accuracy with answer-letter extraction, as an `evaluate` module.

Used for the multiple-choice benchmarks of the MMAT-1M evaluation (MMStar, MMMU, AI2D,
RealWorldQA, HallusionBench's yes/no, MathVista/MathVision choice items; paper section 4). The
letter is read from free text by rules only (no judge model, DESIGN.md section 6), tried in order,
first hit wins:

1. the whole answer is a letter, maybe bracketed or followed by ``.``/``:``/``)``;
2. the answer opens with a letter followed by a delimiter: "B. cat", "(C) ...", "D: ...";
3. an explicit phrase: "answer is B", "Answer: (C)", "option D", "choice A", "答案是B", "选C";
4. exactly one distinct standalone capital letter among the offered letters appears ("I think B";
   an "A" that starts a sentence and is followed by a lowercase word is read as the article);
5. the answer starts with exactly one option's text, or contains exactly one option's text as
   whole words (e.g. "Yes, ..." for yes/no items).

Nothing found, or an ambiguous case, scores 0 and is counted in `extraction_failures`.
"""

import re

import datasets
import evaluate


_DESCRIPTION = """
Multiple-choice accuracy; letters are extracted from free-form answers by ordered rules.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): model answers (free text).
    references (`list[str]`): the correct letter per item ("A", "B", ...).
    choices (`list[list[str]]`, *optional*): option texts per item, in letter order; they limit
        the letters that can be extracted and allow matching by option text.
    return_per_item (`bool`, *optional*, defaults to `False`): also return the extracted letters
        and per-item scores.
Returns:
    `accuracy` (`float`): x100. `extraction_failures` (`int`): answers with no letter found.
Examples:
    >>> metric = evaluate.load("eval/metrics/mc_accuracy")
    >>> metric.compute(predictions=["The answer is (B)."], references=["B"])
    {'accuracy': 100.0, 'extraction_failures': 0}
"""

LETTERS = "ABCDEFGHIJKLMNOP"
_PHRASE_RE = re.compile(
    r"(?:answer\s*(?:is|:)?|option|choice|答案\s*(?:是|为|:|：)?|选项?)\s*[:：]?\s*[\(\[（]?([A-P])\b(?![a-z])",
    re.IGNORECASE,
)


def _offered(n_choices):
    return LETTERS[:n_choices] if n_choices else LETTERS[:5]


def _words(text):
    return re.findall(r"[^\W_]+", text.lower())


def extract_letter(prediction, choices=None):
    """The option letter a free-form answer picks, or None when none (or several) can be read.

    Args:
        prediction (`str`): the model's answer.
        choices (`list[str]`, *optional*): option texts in letter order.
    """
    text = str(prediction).strip()
    offered = _offered(len(choices) if choices else 0)
    match = re.fullmatch(r"[\(\[（]?([A-P])[\)\]）]?[.:：)]?", text)
    if match and match.group(1) in offered:
        return match.group(1)
    match = re.match(r"[\(\[（]([A-P])[\)\]）]|([A-P])(?:[.:：)]|\s*$)", text)
    if match:
        letter = match.group(1) or match.group(2)
        if letter in offered:
            return letter
    phrase_hits = {m.group(1).upper() for m in _PHRASE_RE.finditer(text)} & set(offered)
    if len(phrase_hits) == 1:
        return phrase_hits.pop()
    standalone = set()
    for m in re.finditer(r"(?<![A-Za-z])([A-P])(?![A-Za-z'])", text):
        letter = m.group(1)
        follows = text[m.end():m.end() + 2]
        sentence_start = m.start() == 0 or re.search(r"[.!?]\s+$", text[:m.start()]) is not None
        if letter == "A" and sentence_start and re.match(r" [a-z]", follows):
            continue
        if letter in offered:
            standalone.add(letter)
    if len(standalone) == 1:
        return standalone.pop()
    if choices:
        words = _words(text)
        option_words = [_words(str(c)) for c in choices]
        starts = [i for i, ow in enumerate(option_words) if ow and words[: len(ow)] == ow]
        if len(starts) >= 1:
            # The longest option that opens the answer ("No" vs "No, never").
            best = max(starts, key=lambda i: len(option_words[i]))
            if sum(len(option_words[i]) == len(option_words[best]) for i in starts) == 1:
                return offered[best]
        contained = [
            i for i, ow in enumerate(option_words)
            if ow and any(words[k:k + len(ow)] == ow for k in range(len(words) - len(ow) + 1))
        ]
        if len(contained) == 1:
            return offered[contained[0]]
    return None


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class McAccuracy(evaluate.Metric):
    """Multiple-choice accuracy with letter extraction."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, choices=None, return_per_item=False):
        if len(predictions) == 0:
            raise ValueError("no predictions to score")
        if choices is not None and len(choices) != len(predictions):
            raise ValueError(f"{len(choices)} choice lists for {len(predictions)} predictions")
        letters, scores = [], []
        for i, (pred, ref) in enumerate(zip(predictions, references)):
            ref = str(ref).strip().upper()
            if len(ref) != 1 or ref not in LETTERS:
                raise ValueError(f"item {i}: reference {ref!r} is not an option letter")
            letter = extract_letter(pred or "", choices[i] if choices is not None else None)
            letters.append(letter)
            scores.append(float(letter == ref))
        result = {
            "accuracy": 100 * sum(scores) / len(scores),
            "extraction_failures": sum(letter is None for letter in letters),
        }
        if return_per_item:
            result["letters"] = letters
            result["scores"] = scores
        return result
