"""Stage 1, curate (MMAT-1M §3.2 "Foundation"): local VQA files -> one schema with answer-style constraints.

Reads JSONL, JSON (a list or `{"data": [...]}`), CSV, Parquet or a saved `datasets` folder (a Dataset, or a
DatasetDict whose splits all become sources `<name>/<split>`). Each input is a source named by its file stem,
or explicitly with `name=path`; two inputs with the same stem are told apart by their parent folder
(`textvqa/train`, `docvqa/train`), and two inputs that still share a source are refused. Flat records
name their fields in any of the common spellings below; LLaVA-style `conversations` records yield one
QA pair per human/assistant exchange. Every pair becomes
`{id, source, image, question, answer, style, meta}`: `image` is an absolute path checked to lie under
the image root and to decode, `style` the constraint appended to short-answer questions, `meta` the
record's other fields as JSON. Bad pairs (a row that is not an object, no question, missing or corrupt image,
duplicate id) are recorded with a reason and skipped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .engine import SampleError, Stage
from .formats import IMAGE_TAG, STYLE_BRIEF, STYLE_CONSTRAINTS, STYLE_LETTER, STYLE_SHORT

QUESTION_KEYS = ("question", "query", "prompt", "Question", "instruction")
ANSWER_KEYS = ("answer", "answers", "gt_answer", "label", "Answer", "response", "multiple_choice_answer")
IMAGE_KEYS = ("image", "image_path", "img", "image_file", "file_name", "img_path", "filename")
ID_KEYS = ("id", "question_id", "qid", "sample_id", "idx")
_OPTION_LINE = re.compile(r"(^|\n)\s*\(?[A-F][\.\):]\s+\S")
_NAMED_INPUT = re.compile(r"([A-Za-z0-9_.-]+)=(.+)")


def _first(record: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in record and record[key] not in (None, ""):
            return key, record[key]
    return None, None


def read_vqa_rows(path: str | os.PathLike) -> Iterator[tuple[str | None, int, str, object]]:
    """`(split, index, location, row)` for each row of a local VQA file or saved `datasets` folder.

    `split` names the split of a saved DatasetDict (None otherwise), `index` counts rows within it, and
    `location` (`file:line` for JSONL, `file#index` otherwise) lets a failure point at the row. Rows come as
    read, objects or not: curate records a non-object row as a failure instead of stopping the run.
    """
    path = Path(path)
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
        for split, dataset in splits:
            for index, row in enumerate(dataset):
                yield split, index, f"{path}[{split}]#{index}" if split else f"{path}#{index}", row
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            index = 0
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
                    yield None, index, f"{path}:{lineno}", row
                    index += 1
        return
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = data.get("data") or data.get("annotations") or data.get("questions")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        rows = data
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(
            f"{path}: unsupported VQA file type {suffix!r}; use .jsonl, .json, .csv, .parquet or a datasets folder"
        )
    for index, row in enumerate(rows):
        yield None, index, f"{path}#{index}", row


def input_sources(inputs: list[str]) -> list[tuple[str, Path]]:
    """`(source, path)` per input: `name=path` names it, else the file stem (folder name for a datasets folder).

    Sources prefix the sample ids, so two inputs sharing one would make the second's ids duplicates. Inputs with
    the same stem (`textvqa/train.jsonl`, `docvqa/train.jsonl`) take their parent folder as a prefix; inputs
    that still collide (the same file twice, two equal explicit names) are refused.
    """
    parsed = []
    for spec in inputs:
        match = _NAMED_INPUT.fullmatch(str(spec))
        if match and not Path(spec).exists():
            parsed.append((match[1], Path(match[2]), True))
        else:
            path = Path(spec)
            parsed.append((path.name if path.is_dir() else path.stem, path, False))
    stems = Counter(name for name, _, named in parsed if not named)
    sources = [
        (f"{path.resolve().parent.name}/{name}" if not named and stems[name] > 1 else name, path)
        for name, path, named in parsed
    ]
    for name, count in Counter(name for name, _ in sources).items():
        if count > 1:
            clashing = [str(path) for source, path in sources if source == name]
            raise ValueError(
                f"inputs {clashing} all map to the source {name!r}, so their ids would collide; name them apart "
                f"with `name=path` (e.g. `{name.replace('/', '_')}_a={clashing[0]}`)"
            )
    return sources


def _majority(answers) -> str:
    """VQA-style answer lists (strings or {"answer": ...}) -> the most frequent answer."""
    values = [a.get("answer") if isinstance(a, dict) else a for a in answers]
    values = [str(v) for v in values if v not in (None, "")]
    if not values:
        return ""
    return max(sorted(set(values)), key=values.count)


def expand_record(row: dict, source: str, index: int) -> list[dict]:
    """One raw row -> candidate QA pairs (not yet validated)."""
    _, rid = _first(row, ID_KEYS)
    base_id = f"{source}/{rid if rid is not None else index}"
    _, image = _first(row, IMAGE_KEYS)
    if "conversations" in row and isinstance(row["conversations"], list):
        pairs, turns = [], row["conversations"]
        question = None
        for turn in turns:
            who = turn.get("from", turn.get("role"))
            text = turn.get("value", turn.get("content"))
            if who in ("human", "user"):
                question = text
            elif who in ("gpt", "assistant") and question is not None:
                pairs.append((question, text))
                question = None
        meta = {k: v for k, v in row.items() if k not in ("conversations",) + IMAGE_KEYS + ID_KEYS}
        return [
            {
                "id": f"{base_id}#{k}" if len(pairs) > 1 else base_id,
                "source": source,
                "raw_image": image,
                "question": q,
                "answer": a,
                "meta": meta,
            }
            for k, (q, a) in enumerate(pairs)
        ] or [{"id": base_id, "source": source, "raw_image": image, "question": None, "answer": None, "meta": meta}]
    qkey, question = _first(row, QUESTION_KEYS)
    akey, answer = _first(row, ANSWER_KEYS)
    if isinstance(answer, list):
        answer = _majority(answer)
    used = {qkey, akey, "meta"} | set(IMAGE_KEYS) | set(ID_KEYS)
    meta = {k: v for k, v in row.items() if k not in used}
    if isinstance(row.get("meta"), dict):
        meta = {**row["meta"], **meta}
    return [{"id": base_id, "source": source, "raw_image": image, "question": question, "answer": answer, "meta": meta}]


def style_constraint(question: str, answer: str) -> str | None:
    """The answer-style constraint for a pair, or None when the answer is long or the question has one."""
    if any(question.rstrip().endswith(c) or c in question for c in STYLE_CONSTRAINTS):
        return None
    words = answer.split()
    if re.fullmatch(r"[A-F]", answer.strip()) and _OPTION_LINE.search(question):
        return STYLE_LETTER
    if len(words) <= 3:
        return STYLE_SHORT
    if len(words) <= 8:
        return STYLE_BRIEF
    return None


def _stored_image_name(sample_id: str) -> str:
    # Sanitising alone maps `a/b` and `a_b` to one file; the hash of the raw id keeps them apart.
    digest = hashlib.sha256(sample_id.encode("utf-8")).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', sample_id)}-{digest}.png"


def resolve_image(raw, root: Path, store_dir: Path, sample_id: str) -> str:
    """An image reference -> an absolute path under `root` that decodes; SampleError otherwise."""
    if raw is None or raw == "":
        raise SampleError("missing_image", "the record names no image")
    if isinstance(raw, dict) and raw.get("bytes"):
        store_dir.mkdir(parents=True, exist_ok=True)
        path = store_dir / _stored_image_name(sample_id)
        import io

        try:
            Image.open(io.BytesIO(raw["bytes"])).convert("RGB").save(path)
        except (UnidentifiedImageError, OSError) as err:
            raise SampleError("corrupt_image", f"embedded image bytes do not decode ({err})") from err
        return str(path)
    if isinstance(raw, dict):
        raw = raw.get("path")
    if isinstance(raw, Image.Image):
        store_dir.mkdir(parents=True, exist_ok=True)
        path = store_dir / _stored_image_name(sample_id)
        raw.convert("RGB").save(path)
        return str(path)
    candidate = (root / str(raw)).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise SampleError("unsafe_image_path", f"{raw!r} resolves outside the image root {root}")
    if not candidate.is_file():
        raise SampleError("missing_image", f"{candidate} does not exist")
    try:
        with Image.open(candidate) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise SampleError("corrupt_image", f"{candidate} does not decode ({type(err).__name__}: {err})") from err
    return str(candidate)


class CurateStage(Stage):
    name = "curate"

    @property
    def features(self):
        import datasets

        return datasets.Features(
            {k: datasets.Value("string") for k in ("id", "source", "image", "question", "answer", "style", "meta")}
        )

    def input_records(self) -> list[dict]:
        if not self.config.inputs:
            raise ValueError("curate needs at least one input file (`inputs`)")
        records, seen = [], {}
        for name, path in input_sources(self.config.inputs):
            root = Path(self.config.image_root) if self.config.image_root else path.resolve().parent
            for split, index, where, row in read_vqa_rows(path):
                source = f"{name}/{split}" if split else name
                if isinstance(row, dict):
                    candidates = expand_record(row, source, index)
                else:
                    bad = f"{where}: expected a JSON object, got {type(row).__name__}"
                    # `#` keeps the id apart from a record whose own id is the same number.
                    candidates = [{"id": f"{source}/#{index}", "source": source, "not_an_object": bad}]
                for cand in candidates:
                    cand["image_root"] = str(root)
                    # A repeated id becomes a recorded failure, not a crash of the whole run.
                    if cand["id"] in seen:
                        seen[cand["id"]] += 1
                        cand["duplicate_of"] = cand["id"]
                        cand["id"] = f"{cand['id']}~dup{seen[cand['id']]}"
                    else:
                        seen[cand["id"]] = 0
                    records.append(cand)
                    if self.config.max_samples and len(records) >= self.config.max_samples:
                        return records
        return records

    def process(self, record: dict) -> dict:
        if record.get("not_an_object"):
            raise SampleError("not_an_object", record["not_an_object"])
        if record.get("duplicate_of"):
            raise SampleError("duplicate_id", f"id {record['duplicate_of']!r} already used by an earlier record")
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise SampleError("missing_question", "no question field found")
        if answer is None or not str(answer).strip():
            raise SampleError("missing_answer", "no answer field found")
        question = question.replace(IMAGE_TAG, "").strip()
        answer = str(answer).strip()
        store = Path(self.config.output_dir) / self.name / "images"
        image = resolve_image(record.get("raw_image"), Path(record["image_root"]), store, record["id"])
        meta = record.get("meta") or {}
        return {
            "id": record["id"],
            "source": record["source"],
            "image": image,
            "question": question,
            "answer": answer,
            "style": style_constraint(question, answer) or "",
            "meta": json.dumps(meta, ensure_ascii=False, default=str),
        }

    def counters(self, record: dict) -> dict[str, int]:
        return {f"source/{record['source']}": 1, f"style/{'none' if not record['style'] else record['style'][:24]}": 1}
