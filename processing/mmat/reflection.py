"""Stage 3, reflection (MMAT-1M §3.3), plus optional judge scoring (§3.5, Fig. 11).

Two passes over each RR trajectory:

- general ("reasoning cheating"): the teacher decides whether the conclusion was really derived from
  the tool results; if not, a reflection is inserted whose thought is the corrected reasoning (Choice:
  the paper does not show the insertion template for this kind; we reuse the math one, with the
  teacher's corrected thought, or its reason when it gives none). With `drop_cheating` the sample is
  dropped instead (`cheating`).
- math ("step skipping"), for math samples (numeric gold answers or a source in `math_sources`): the
  teacher supplies the calculation skipped between the last two rounds, or nothing.

Choice: at most one reflection per sample, general first, because the paper's examples show one.
The judge (optional) scores 0-1 with a reason; `min_quality` drops samples below the threshold.
"""

from __future__ import annotations

import json
import re

from .engine import RetryLater, SampleError, Stage
from .formats import GENERAL_OPENERS, MATH_OPENERS, pick, render_rr
from .steps import MalformedReply
from .teachers import TeacherError


def is_math_sample(record: dict, math_sources: list[str]) -> bool:
    # Sources may carry a folder or split (`mathvista/testmini`, `geoqa/train`): any part can name a math set.
    parts = set(record["source"].lower().split("/")) | {record["source"].lower()}
    if parts & {s.lower() for s in math_sources}:
        return True
    return re.fullmatch(r"-?\d+(\.\d+)?", record["answer"].strip()) is not None


class ReflectionStage(Stage):
    name = "reflection"

    def __init__(self, config, teacher=None):
        super().__init__(config)
        self._teacher = teacher

    @property
    def teacher(self):
        if self._teacher is None:
            from .stages import build_teacher

            self._teacher = build_teacher(self.config, self.name)
        return self._teacher

    def setup(self) -> None:
        self.teacher  # noqa: B018 - touching the property loads it

    @property
    def features(self):
        import datasets

        names = (
            "id",
            "source",
            "image",
            "question",
            "answer",
            "style",
            "meta",
            "steps",
            "objects",
            "teacher_answer",
            "reflection",
            "judge_reason",
        )
        feats = {k: datasets.Value("string") for k in names}
        feats["n_steps"] = datasets.Value("int32")
        feats["judge_score"] = datasets.Value("float32")
        return datasets.Features(feats)

    def input_records(self) -> list[dict]:
        from .engine import read_records

        return read_records(self.config.output_dir, "rationale")

    def usage(self) -> dict:
        return self.teacher.usage() if self._teacher is not None else {}

    def process(self, record: dict) -> dict:
        steps = json.loads(record["steps"])
        messages = render_rr(record, steps, None, record["answer"])
        reflection = None
        try:
            if self.config.general_reflection:
                verdict = self.teacher.general_reflection(record, messages)
                if verdict:
                    if self.config.drop_cheating:
                        raise SampleError("cheating", verdict["reason"])
                    reflection = {
                        "kind": "general",
                        "reason": verdict["reason"],
                        "opener": pick(GENERAL_OPENERS, record["id"]),
                        "thought": verdict.get("thought") or verdict["reason"],
                    }
            if reflection is None and self.config.math_reflection and is_math_sample(record, self.config.math_sources):
                verdict = self.teacher.math_reflection(record, messages)
                if verdict["thought"]:
                    reflection = {
                        "kind": "math",
                        "reason": verdict["reason"],
                        "opener": pick(MATH_OPENERS, record["id"]),
                        "thought": verdict["thought"],
                    }
            score, reason = None, ""
            if self.config.judge:
                final = render_rr(record, steps, reflection, record["answer"])
                verdict = self.teacher.judge(record, final)
                score, reason = verdict["quality_score"], verdict["scoring_reason"]
        except MalformedReply as err:
            raise SampleError("malformed_reflection", str(err)) from err
        except TeacherError as err:
            # An unreachable endpoint says nothing about the sample: leave it for the next run.
            if err.transient:
                raise RetryLater(str(err)) from err
            raise SampleError("teacher_error", str(err)) from err
        if self.config.min_quality is not None and score is not None and score < self.config.min_quality:
            raise SampleError("low_quality", f"judge score {score} < {self.config.min_quality}: {reason}")
        return {
            **record,
            "reflection": json.dumps(reflection, ensure_ascii=False),
            "judge_score": score,
            "judge_reason": reason,
        }

    def counters(self, record: dict) -> dict[str, int]:
        reflection = json.loads(record["reflection"])
        counts = {f"reflection/{reflection['kind'] if reflection else 'none'}": 1}
        if record["judge_score"] is not None:
            counts[f"judge/{record['judge_score']:.1f}"] = 1
        return counts
