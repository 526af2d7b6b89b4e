"""Dyn-VQA loader for every monthly release format (OmniSearch, arXiv 2411.02937; DESIGN.md §6).

One JSON object per line with ``image_url``, ``question``, ``question_id``, ``answer`` and the
text-only rewrite of the question, spelt ``gloden_query`` up to 202412 and ``golden_query`` from
202502. The releases differ in ways a loader has to survive; each case is handled explicitly and
counted in :class:`DynVQALoadReport` (kept, normalised, or skipped; never a crash):

==============================  ===================================================  ============
case                            handling                                             count key
==============================  ===================================================  ============
line is not valid JSON          skipped                                              invalid_json
not an object / no question_id  skipped                                              not_an_object, missing_question_id
repeated question_id            later copies skipped                                 duplicate_question_id
missing or blank question       skipped                                              missing_question
``answer: null`` (202408)       skipped: nothing to score against                    answer_null
answer is a bare str/number     wrapped into a one-element list                      answer_scalar
nested lists (202410)           flattened (the official scorer would ``str()`` the   answer_nested
                                inner list and score its Python repr)
int / float answers             ``str()``-ed, as the official scorer does            answer_numeric
NaN / bool / blank elements     dropped; record skipped if nothing is left           answer_bad_element, answer_empty
repeated answer in one record   kept once                                            answer_duplicate
``gloden_query``                read as ``golden_query``                             golden_query_spelt_gloden
missing / NaN golden query      ``None``; golden-query mode falls back to the        golden_query_missing, golden_query_nan
                                question and says so
English question whose answers  kept and flagged (reports give scores with and       answer_language_mismatch
are all Chinese (202502)        without them); dropped with ``drop_language_mismatch``
English question with some      kept (informational count)                           answer_has_chinese_variant
Chinese answer variants
missing image url               kept, image ``None``                                 image_url_missing
image not in the local store    kept, image ``None``; the run goes on text-only      image_missing
==============================  ===================================================  ============

The record as read (``raw``) is kept so that predictions can be written back in the official
scorer's input format unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from pathlib import Path

from ..images import ImageStore

RELEASES = ("202406", "202408", "202410", "202412", "202502")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_FILE_RE = re.compile(r"DynVQA_(?P<lang>en|zh)(?:\.(?P<release>\d{6}))?\.jsonl$")


@dataclasses.dataclass
class DynVQASample:
    """One Dyn-VQA item after normalisation.

    Args:
        question_id (`str`): e.g. `"en302"`.
        question (`str`): the question about the image.
        answers (`list[str]`): acceptable answers, flattened and stringified.
        golden_query (`str`, *optional*): the text-only rewrite, `None` when absent.
        image_url (`str`, *optional*): where the image came from.
        image_path (`str`, *optional*): the cached local file, `None` when not available.
        lang (`str`): `"en"` or `"zh"`, the scorer language of the file.
        flags (`list[str]`): the normalisations applied (count keys above).
        raw (`dict`): the record exactly as read.
    """

    question_id: str
    question: str
    answers: list[str]
    golden_query: str | None
    image_url: str | None
    image_path: str | None
    lang: str
    flags: list[str]
    raw: dict

    @property
    def official_answers(self) -> list[str]:
        """Gold answers as the official scorer sees them: `str()` of each element of the raw list."""
        raw = self.raw.get("answer")
        items = raw if isinstance(raw, list) else [raw]
        return [str(item) for item in items if item is not None]

    @property
    def language_mismatch(self) -> bool:
        return "answer_language_mismatch" in self.flags


@dataclasses.dataclass
class DynVQALoadReport:
    """What the loader did with one file: counts per case and the skipped records with reasons."""

    path: str
    lang: str
    release: str | None
    lines: int = 0
    kept: int = 0
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped: list[dict] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "lang": self.lang,
            "release": self.release,
            "lines": self.lines,
            "kept": self.kept,
            "counts": dict(sorted(self.counts.items())),
            "skipped": self.skipped,
        }


def parse_dynvqa_filename(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """`(lang, release)` from a file name like `DynVQA_en.202412.jsonl`; `None` where absent."""
    match = _FILE_RE.search(Path(path).name)
    if not match:
        return None, None
    return match.group("lang"), match.group("release")


def release_path(root: str | os.PathLike, lang: str = "en", release: str = "202412") -> Path:
    """`<root>/DynVQA_<lang>.<release>.jsonl`, the release naming of the OmniSearch repository.

    202412 is the default: it is the cleanest English release (no null, nested or Chinese-only
    answers), the one later work (R1-Router) reports on.
    """
    if lang not in ("en", "zh"):
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    if release not in RELEASES:
        raise ValueError(f"unknown Dyn-VQA release {release!r}; known: {RELEASES}")
    path = Path(root) / f"DynVQA_{lang}.{release}.jsonl"
    if not path.is_file():
        available = sorted(p.name for p in Path(root).glob("DynVQA_*.jsonl"))
        raise ValueError(f"{path} not found; {root} holds {available or 'no Dyn-VQA files'}")
    return path


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _flatten(value, out: list, flags: set):
    for item in value:
        if isinstance(item, list):
            flags.add("answer_nested")
            _flatten(item, out, flags)
        else:
            out.append(item)


def normalise_answers(answer) -> tuple[list[str], set[str]]:
    """Turn a release's `answer` field into a list of non-blank strings, with the flags applied."""
    flags: set[str] = set()
    if answer is None:
        return [], {"answer_null"}
    if not isinstance(answer, list):
        flags.add("answer_scalar")
        answer = [answer]
    items: list = []
    _flatten(answer, items, flags)
    answers: list[str] = []
    for item in items:
        if isinstance(item, bool) or item is None or _is_nan(item) or isinstance(item, dict):
            flags.add("answer_bad_element")
            continue
        if isinstance(item, (int, float)):
            flags.add("answer_numeric")
            item = str(item)
        text = str(item).strip()
        if not text:
            flags.add("answer_bad_element")
            continue
        if text in answers:
            flags.add("answer_duplicate")
        else:
            answers.append(text)
    return answers, flags


def answers_only_chinese(answers: list[str]) -> bool:
    """True when every answer contains Chinese characters (no answer is free of them)."""
    return bool(answers) and all(_CJK.search(a) for a in answers)


def load_dynvqa(
    path: str | os.PathLike,
    lang: str | None = None,
    image_dir: str | os.PathLike | None = None,
    drop_language_mismatch: bool = False,
    limit: int | None = None,
) -> tuple[list[DynVQASample], DynVQALoadReport]:
    """Read one Dyn-VQA release file.

    Args:
        path (`str`): a `DynVQA_{en,zh}.<release>.jsonl` file (any name works when `lang` is given).
        lang (`str`, *optional*): `"en"` or `"zh"`; read from the file name, else from the ids.
        image_dir (`str`, *optional*): local image folder (see :class:`eval.images.ImageStore`).
        drop_language_mismatch (`bool`, *optional*, defaults to `False`): skip English questions
            whose answers are all Chinese instead of keeping them flagged.
        limit (`int`, *optional*): stop after this many kept samples.

    Returns:
        `(samples, report)`.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Dyn-VQA file {path} does not exist")
    file_lang, release = parse_dynvqa_filename(path)
    lang = lang or file_lang
    if lang is not None and lang not in ("en", "zh"):
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    store = ImageStore(image_dir) if image_dir is not None else None
    report = DynVQALoadReport(path=str(path), lang=lang or "", release=release)
    samples: list[DynVQASample] = []
    seen: set[str] = set()

    def skip(lineno: int, qid, reason: str):
        report.counts[reason] += 1
        report.skipped.append({"line": lineno, "question_id": qid, "reason": reason})

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                report.counts["blank_line"] += 1
                continue
            report.lines += 1
            try:
                # Python's json accepts the bare NaN that en625's gloden_query holds.
                record = json.loads(line)
            except json.JSONDecodeError:
                skip(lineno, None, "invalid_json")
                continue
            if not isinstance(record, dict):
                skip(lineno, None, "not_an_object")
                continue
            qid = record.get("question_id")
            if qid is None or not str(qid).strip():
                skip(lineno, None, "missing_question_id")
                continue
            qid = str(qid).strip()
            if qid in seen:
                skip(lineno, qid, "duplicate_question_id")
                continue
            question = record.get("question")
            if not isinstance(question, str) or not question.strip():
                skip(lineno, qid, "missing_question")
                continue
            answers, flags = normalise_answers(record.get("answer"))
            if "answer_null" in flags:
                skip(lineno, qid, "answer_null")
                continue
            if not answers:
                skip(lineno, qid, "answer_empty")
                continue

            if "golden_query" in record and "gloden_query" in record:
                flags.add("golden_query_both_spellings")
            if "golden_query" in record:
                golden = record["golden_query"]
            elif "gloden_query" in record:
                flags.add("golden_query_spelt_gloden")
                golden = record["gloden_query"]
            else:
                golden = None
                flags.add("golden_query_missing")
            if _is_nan(golden):
                golden = None
                flags.add("golden_query_nan")
            elif golden is not None:
                golden = str(golden).strip() or None
                if golden is None:
                    flags.add("golden_query_missing")

            item_lang = lang or ("zh" if qid.startswith("zh") else "en")
            if item_lang == "en" and answers_only_chinese(answers):
                if drop_language_mismatch:
                    skip(lineno, qid, "answer_language_mismatch")
                    continue
                flags.add("answer_language_mismatch")
            elif item_lang == "en" and any(_CJK.search(a) for a in answers):
                flags.add("answer_has_chinese_variant")

            image_url = record.get("image_url") or None
            image_path = None
            if image_url is None:
                flags.add("image_url_missing")
            elif store is not None:
                located, _ = store.locate(str(image_url))
                if located is None:
                    flags.add("image_missing")
                else:
                    image_path = str(located)

            seen.add(qid)
            for flag in flags:
                report.counts[flag] += 1
            samples.append(
                DynVQASample(
                    question_id=qid,
                    question=question.strip(),
                    answers=answers,
                    golden_query=golden,
                    image_url=image_url,
                    image_path=image_path,
                    lang=item_lang,
                    flags=sorted(flags),
                    raw=record,
                )
            )
            report.kept += 1
            if limit is not None and report.kept >= limit:
                break
    if store is None:
        report.counts["image_dir_not_set"] = report.kept
    if not report.lang:
        report.lang = samples[0].lang if samples else "en"
    return samples, report
