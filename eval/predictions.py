"""Append-only prediction files that let an interrupted run resume (DESIGN.md §7, "never lose work").

Each finished item is one JSON line, flushed and fsynced as soon as it exists. On start the file is
read back and finished ids are skipped. A torn last line (the process died mid-write) is ignored
and counted, and a rerun simply produces that item again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class PredictionStore:
    """Resumable JSONL of `{"id": ..., "prediction": ..., ...}` records.

    Args:
        path (`str`): the JSONL file (created with its folder when absent).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        self.torn_lines = 0
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        self.torn_lines += 1
                        continue
                    if isinstance(record, dict) and "id" in record and "prediction" in record:
                        self.records[str(record["id"])] = record
            # A last line without its newline (the writer stopped right after the JSON) would swallow the next
            # append into one torn line: rewrite then too.
            if self.torn_lines or not self._ends_with_newline():
                self._rewrite()

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _rewrite(self) -> None:
        # Drop torn lines now so that later appends do not land after half a record.
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for record in self.records.values():
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)

    def __contains__(self, item_id: str) -> bool:
        return str(item_id) in self.records

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: dict) -> None:
        """Append one finished item and make it durable before returning."""
        if "id" not in record or "prediction" not in record:
            raise ValueError(f"a prediction record needs 'id' and 'prediction', got keys {sorted(record)}")
        record = {**record, "id": str(record["id"])}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record["id"]] = record
