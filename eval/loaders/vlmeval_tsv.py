"""VLMEvalKit-style TSV benchmark files (the format MMAT-1M's evaluation used; paper Appendix A8).

Columns read: ``index``, ``question``, ``answer``, option columns ``A``..``P`` (empty cells end the
options), ``hint`` (prepended to the question), ``category``, ``image`` (base64; a short all-digit
cell points at another row's ``index`` whose image it reuses, VLMEvalKit's de-duplication; a
list literal holds several images) and ``image_path`` (files under the TSV's folder or
``image_root``). MathVista-style ``choices`` list cells are turned into options, and a
``answer`` that equals an option text gets its letter. OCRBench's list-literal ``answer`` cells
become several references.

Bad rows are skipped with a reason and counted, never raised.
"""

from __future__ import annotations

import collections
import csv
import os
import sys

from .common import (
    LETTERS,
    BenchmarkSample,
    decode_base64_image,
    is_missing,
    parse_list_cell,
    resolve_under,
)

# Some benchmark TSVs hold multi-megabyte base64 cells; csv's default field limit is 128 KiB.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _options(row: dict) -> list[str] | None:
    options = []
    for letter in LETTERS:
        value = row.get(letter)
        if is_missing(value):
            break
        options.append(str(value).strip())
    if options:
        return options
    if not is_missing(row.get("choices")):
        parsed = [str(c).strip() for c in parse_list_cell(row["choices"])]
        return parsed if len(parsed) > 1 else None
    return None


def load_vlmeval_tsv(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    limit: int | None = None,
) -> tuple[list[BenchmarkSample], dict]:
    """Read a VLMEvalKit TSV file.

    Args:
        path (`str`): the `.tsv` file.
        image_root (`str`, *optional*): folder for `image_path` cells (default: the TSV's folder).
        limit (`int`, *optional*): stop after this many samples.

    Returns:
        `(samples, report)`; the report has `rows`, `kept`, `counts` (case -> n) and `skipped`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"TSV file {path} does not exist")
    image_root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and "question" not in rows[0]:
        raise ValueError(f"{path}: no 'question' column (columns: {sorted(rows[0])})")
    by_index = {str(r.get("index", i)).strip(): r for i, r in enumerate(rows)}
    counts: collections.Counter = collections.Counter()
    skipped: list[dict] = []
    samples: list[BenchmarkSample] = []
    for i, row in enumerate(rows):
        rid = str(row.get("index", i)).strip()
        if is_missing(row.get("question")):
            counts["missing_question"] += 1
            skipped.append({"id": rid, "reason": "missing_question"})
            continue
        if is_missing(row.get("answer")):
            counts["missing_answer"] += 1
            skipped.append({"id": rid, "reason": "missing_answer"})
            continue

        images: list = []
        cell = row.get("image")
        if not is_missing(cell):
            cell = cell.strip()
            if len(cell) <= 64 and cell.isdigit() and cell in by_index and cell != rid:
                counts["image_shared"] += 1
                cell = (by_index[cell].get("image") or "").strip()
            for item in parse_list_cell(cell):
                data = decode_base64_image(str(item))
                if data:
                    images.append(data)
                else:
                    counts["image_bad_base64"] += 1
        elif not is_missing(row.get("image_path")):
            for rel in parse_list_cell(row["image_path"]):
                resolved = resolve_under(image_root, str(rel))
                if resolved is None:
                    counts["image_path_missing"] += 1
                else:
                    images.append(resolved)
        if not images:
            counts["no_image"] += 1

        options = _options(row)
        answer = str(row["answer"]).strip()
        references = [str(a).strip() for a in parse_list_cell(answer)] if answer.startswith("[") else [answer]
        letter = None
        if options:
            if len(answer) == 1 and answer.upper() in LETTERS[: len(options)]:
                letter = answer.upper()
            elif answer in options:
                letter = LETTERS[options.index(answer)]
                counts["answer_given_as_option_text"] += 1
            else:
                counts["answer_not_an_option"] += 1
            if letter is not None:
                references = [options[LETTERS.index(letter)], letter]
        question = str(row["question"]).strip()
        if not is_missing(row.get("hint")):
            question = f"Hint: {str(row['hint']).strip()}\n{question}"
        known = {"index", "question", "answer", "image", "image_path", "hint", "category", "choices", *LETTERS}
        samples.append(
            BenchmarkSample(
                id=rid,
                question=question,
                answers=references,
                choices=options,
                answer_letter=letter,
                images=images,
                category=None if is_missing(row.get("category")) else str(row["category"]).strip(),
                extra={k: v for k, v in row.items() if k not in known and not is_missing(v)},
            )
        )
        if limit is not None and len(samples) >= limit:
            break
    report = {"path": path, "rows": len(rows), "kept": len(samples), "counts": dict(counts), "skipped": skipped}
    return samples, report
