"""Stage 4, integration (MMAT-1M §3.4): render RR and ORR samples.

Each output record holds both formats twice:

- `rr_released` / `orr_released`: chat messages exactly as the released files are laid out (ms-swift
  style, `<image>` in the first user turn, system prompt first, as the `_RR_sys` file names suggest);
- `rr_messages` / `orr_messages`: the same without `<image>` tags, with `images` (paths) beside them —
  the `messages` + `images` layout TRL's `SFTTrainer` (and `training/sft.py`) accept.

The final assistant turn is the gold answer (the paper's examples end with the standard answer).
When the stage completes, `rr.jsonl` and `orr.jsonl` are exported in the released layout
(`{"id", "messages", "images"}` per line).
"""

from __future__ import annotations

import json
from pathlib import Path

from .engine import Stage
from .formats import render_orr, render_rr, to_trl_layout


def render_sample(record: dict) -> dict:
    steps = json.loads(record["steps"])
    reflection = json.loads(record["reflection"]) if record.get("reflection") else None
    rr = render_rr(record, steps, reflection, record["answer"])
    orr = render_orr(record, steps, reflection, record["answer"])
    return {
        "id": record["id"],
        "images": [record["image"]],
        "rr_messages": to_trl_layout(rr),
        "orr_messages": to_trl_layout(orr),
        "rr_released": rr,
        "orr_released": orr,
        "reflection_kind": reflection["kind"] if reflection else "",
    }


class IntegrateStage(Stage):
    name = "integrate"

    @property
    def features(self):
        import datasets

        message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
        feats = {
            "id": datasets.Value("string"),
            "images": datasets.Sequence(datasets.Value("string")),
            "reflection_kind": datasets.Value("string"),
        }
        for key in ("rr_messages", "orr_messages", "rr_released", "orr_released"):
            feats[key] = [message]
        return datasets.Features(feats)

    def input_records(self) -> list[dict]:
        from .engine import read_records

        return read_records(self.config.output_dir, "reflection")

    def process(self, record: dict) -> dict:
        return render_sample(record)

    def counters(self, record: dict) -> dict[str, int]:
        turns = sum(m["role"] == "assistant" for m in record["rr_messages"])
        return {"rr": 1, "orr": 1, f"rr_assistant_turns/{turns}": 1}

    def on_complete(self, stage_dir: Path) -> None:
        import pyarrow.parquet as pq

        rows = []
        for path in sorted((stage_dir / "data").glob("shard-*.parquet")):
            rows.extend(pq.read_table(path).to_pylist())
        for fmt in ("rr", "orr"):
            tmp = stage_dir / f".{fmt}.jsonl.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(
                        json.dumps(
                            {"id": row["id"], "messages": row[f"{fmt}_released"], "images": row["images"]},
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
            tmp.replace(stage_dir / f"{fmt}.jsonl")
