"""Loader for the released MMAT-1M JSONL files (`dataset_qa_rr_{train,val}_all_{RR_sys,ORR}.jsonl`).

The per-record schema of the release is not documented (research note A6): training used ms-swift, so the
records are most likely `{"messages": [{"role", "content"}], "images": [...]}` with `<image>` tags in the
content, possibly in ShareGPT spelling (`conversations` / `from` / `value`). All field names we accept are
mapped in the tables below, the one place to edit once a real file has been inspected; any other field
raises, so a schema surprise is noticed instead of silently dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .formats import IMAGE_TAG, to_trl_layout

# record field -> our field
RECORD_FIELDS = {"id": "id", "messages": "messages", "conversations": "messages", "images": "images", "image": "images"}
# message field spellings: ms-swift / OpenAI (role, content) and ShareGPT (from, value)
MESSAGE_FIELDS = {"role": "role", "content": "content", "from": "role", "value": "content"}
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


def parse_record(raw: dict, where: str, image_root: str | os.PathLike | None = None) -> dict:
    """One released record -> `{"id", "messages" (released layout), "images" (paths)}`.

    Raises:
        ValueError: unknown record or message fields, unknown roles, or `<image>` tags that do not match
            the number of images; the message names the file and line.
    """
    unknown = sorted(set(raw) - set(RECORD_FIELDS))
    if unknown:
        raise ValueError(
            f"{where}: unknown field(s) {unknown}; known: {sorted(RECORD_FIELDS)} (update RECORD_FIELDS in {__name__})"
        )
    out: dict = {"id": None, "messages": None, "images": []}
    for key, value in raw.items():
        target = RECORD_FIELDS[key]
        if out[target] not in (None, []):
            raise ValueError(f"{where}: both {key!r} and another spelling of {target!r} are present")
        out[target] = value
    if not isinstance(out["messages"], list) or not out["messages"]:
        raise ValueError(f"{where}: no messages")
    messages = []
    for i, message in enumerate(out["messages"]):
        bad = sorted(set(message) - set(MESSAGE_FIELDS))
        if bad:
            raise ValueError(f"{where}: message {i} has unknown field(s) {bad}; known: {sorted(MESSAGE_FIELDS)}")
        fields = {MESSAGE_FIELDS[k]: v for k, v in message.items()}
        role = ROLES.get(fields.get("role"))
        if role is None:
            raise ValueError(f"{where}: message {i} has unknown role {fields.get('role')!r}; known: {sorted(ROLES)}")
        messages.append({"role": role, "content": str(fields.get("content", ""))})
    images = out["images"]
    images = [images] if isinstance(images, str) else list(images or [])
    n_tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    if n_tags != len(images):
        raise ValueError(f"{where}: {n_tags} {IMAGE_TAG} tags but {len(images)} images")
    if image_root is not None:
        root = Path(image_root).resolve()
        resolved = []
        for image in images:
            path = (root / image).resolve()
            if not path.is_relative_to(root):
                raise ValueError(f"{where}: image path {image!r} leaves the image root {root}")
            resolved.append(str(path))
        images = resolved
    return {"id": str(out["id"]) if out["id"] is not None else where, "messages": messages, "images": images}


def load_mmat1m_jsonl(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    layout: str = "trl",
    max_samples: int | None = None,
):
    """Read a released MMAT-1M JSONL file into a `datasets.Dataset` with `id`, `messages`, `images`.

    Args:
        path (`str`): the JSONL file.
        image_root (`str`, *optional*): folder the image paths are relative to (images are not released;
            they come from the source datasets).
        layout (`str`, *optional*, defaults to `"trl"`): `"trl"` drops `<image>` tags (TRL inserts images
            itself); `"released"` keeps the content as in the file.
        max_samples (`int`, *optional*): stop after this many records.
    """
    import datasets

    if layout not in ("trl", "released"):
        raise ValueError(f"layout must be 'trl' or 'released', got {layout!r}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
            record = parse_record(raw, where, image_root)
            if layout == "trl":
                record["messages"] = to_trl_layout(record["messages"])
            rows.append(record)
            if max_samples and len(rows) >= max_samples:
                break
    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    features = datasets.Features(
        {"id": datasets.Value("string"), "messages": [message], "images": datasets.Sequence(datasets.Value("string"))}
    )
    return datasets.Dataset.from_list(rows, features=features)
