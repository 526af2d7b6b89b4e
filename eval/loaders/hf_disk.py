"""Benchmarks stored as Hugging Face datasets saved to disk (`Dataset.save_to_disk`; DESIGN.md §6).

Columns are found by common names unless given: id (`id`, `question_id`, `index`, `qid`, `pid`),
question (`question`, `query`, `prompt`), answer (`answer`, `answers`, `label`, `gt_answer`),
options (`choices`, `options`), image (`image`, `images`, `decoded_image`), category
(`category`, `question_type`). Image cells may be PIL images, `{"bytes", "path"}` dicts or lists
of either; an answer may be a string, a number, a list, or an integer index into the options.
"""

from __future__ import annotations

import collections
import os

from PIL import Image

from .common import LETTERS, BenchmarkSample, is_missing

DEFAULT_COLUMNS = {
    "id": ("id", "question_id", "index", "qid", "pid"),
    "question": ("question", "query", "prompt"),
    "answer": ("answer", "answers", "label", "gt_answer"),
    "choices": ("choices", "options"),
    "image": ("image", "images", "decoded_image"),
    "category": ("category", "question_type"),
}


def _pick(names: list[str], wanted: str | None, candidates: tuple[str, ...]) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"column {wanted!r} not in the dataset (columns: {names})")
        return wanted
    return next((c for c in candidates if c in names), None)


def _image_items(cell) -> list:
    items = cell if isinstance(cell, list) else [cell]
    out = []
    for item in items:
        if item is None:
            continue
        if isinstance(item, Image.Image):
            out.append(item)
        elif isinstance(item, dict) and item.get("bytes"):
            out.append(item["bytes"])
        elif isinstance(item, dict) and item.get("path") and os.path.isfile(item["path"]):
            out.append(item["path"])
        elif isinstance(item, (bytes, bytearray)):
            out.append(bytes(item))
    return out


def load_hf_disk(
    path: str | os.PathLike,
    split: str | None = None,
    columns: dict[str, str] | None = None,
    limit: int | None = None,
) -> tuple[list[BenchmarkSample], dict]:
    """Read a dataset written by `save_to_disk`.

    Args:
        path (`str`): the saved folder (a `Dataset` or a `DatasetDict`).
        split (`str`, *optional*): which split of a `DatasetDict`; required when it has several.
        columns (`dict`, *optional*): overrides, e.g. `{"question": "query", "answer": "gt"}`.
        limit (`int`, *optional*): stop after this many samples.
    """
    import datasets

    loaded = datasets.load_from_disk(os.fspath(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if len(loaded) != 1:
                raise ValueError(f"{path} holds splits {list(loaded)}; pass split=")
            split = next(iter(loaded))
        if split not in loaded:
            raise ValueError(f"split {split!r} not in {list(loaded)}")
        loaded = loaded[split]
    names = loaded.column_names
    columns = columns or {}
    unknown = set(columns) - set(DEFAULT_COLUMNS)
    if unknown:
        raise ValueError(f"unknown column roles {sorted(unknown)}; roles are {sorted(DEFAULT_COLUMNS)}")
    col = {role: _pick(names, columns.get(role), cands) for role, cands in DEFAULT_COLUMNS.items()}
    for role in ("question", "answer"):
        if col[role] is None:
            raise ValueError(f"no {role} column found in {names}; pass columns={{'{role}': ...}}")
    counts: collections.Counter = collections.Counter()
    skipped: list[dict] = []
    samples: list[BenchmarkSample] = []
    for i, row in enumerate(loaded):
        rid = str(row[col["id"]]) if col["id"] else str(i)
        answer = row[col["answer"]]
        if is_missing(row[col["question"]]) or answer is None or answer == []:
            reason = "missing_question" if is_missing(row[col["question"]]) else "missing_answer"
            counts[reason] += 1
            skipped.append({"id": rid, "reason": reason})
            continue
        options = None
        if col["choices"] and row[col["choices"]]:
            options = [str(c).strip() for c in row[col["choices"]]]
        answers = [str(a).strip() for a in (answer if isinstance(answer, list) else [answer])]
        letter = None
        if options:
            first = answers[0]
            if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
                letter = LETTERS[answer]
                counts["answer_given_as_index"] += 1
            elif len(first) == 1 and first.upper() in LETTERS[: len(options)]:
                letter = first.upper()
            elif first in options:
                letter = LETTERS[options.index(first)]
            else:
                counts["answer_not_an_option"] += 1
            if letter is not None:
                answers = [options[LETTERS.index(letter)], letter]
        images = _image_items(row[col["image"]]) if col["image"] else []
        if not images:
            counts["no_image"] += 1
        samples.append(
            BenchmarkSample(
                id=rid,
                question=str(row[col["question"]]).strip(),
                answers=answers,
                choices=options,
                answer_letter=letter,
                images=images,
                category=str(row[col["category"]]) if col["category"] and row[col["category"]] is not None else None,
            )
        )
        if limit is not None and len(samples) >= limit:
            break
    report = {"path": os.fspath(path), "rows": len(loaded), "kept": len(samples), "counts": dict(counts),
              "skipped": skipped, "columns": col}
    return samples, report
