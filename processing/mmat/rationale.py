"""Stage 2, rationale (MMAT-1M §3.2): the teacher reasons step by step, calling operators and RAG.

Loop per sample: the teacher writes a JSON step -> the requested operators run on the image (object
names for `label_bbox` come from the teacher's scene graph, as the paper takes the detector vocabulary
from it) and RAG runs if asked -> the results are fed back as the next user turn -> repeat until
`next_action == "final_answer"` or `max_steps` (then the sample fails with `step_cap`). The teacher then
answers the question; with `gold_filter` a sample whose answer differs from the gold one is dropped
(`answer_mismatch`). Tool failures are kept in the trajectory (the teacher sees them) and counted.
"""

from __future__ import annotations

import json
import re

from PIL import Image, UnidentifiedImageError

from processing.tools import LABEL_BBOX, RAG

from .engine import RetryLater, SampleError, Stage
from .steps import MalformedReply
from .teachers import TeacherError

_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {
    "zero": "0",
    "none": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}


# A word in any script (`\w`, so "上海" survives) with an optional decimal part; a minus sign belongs to the number
# only where it does not join two words ("-5" keeps its sign, "5-3" is two numbers).
_WORD = re.compile(r"(?:(?<!\w)-)?\w+(?:\.\d+)?")


def normalize_answer(text: str) -> str:
    """Lower-case, drop "The answer is:", punctuation and articles, map number words to digits.

    A one-word answer keeps its article-like word: the gold answer "A" is an option letter, not an article.
    """
    text = re.sub(r"^\s*(the answer is:?)", "", str(text).strip(), flags=re.IGNORECASE)
    words = _WORD.findall(text.lower())
    if len(words) > 1:
        words = [w for w in words if w not in _ARTICLES]
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words)


def answers_match(prediction: str, gold: str) -> bool:
    """Equal normalised answers; an answer that normalises to nothing matches nothing."""
    normalized = normalize_answer(prediction)
    return bool(normalized) and normalized == normalize_answer(gold)


def open_image(path: str) -> Image.Image:
    """Load an image for the teacher and the tools; SampleError `missing_image` / `corrupt_image`."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise SampleError("missing_image", f"{path} does not exist") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise SampleError("corrupt_image", f"{path} does not decode ({type(err).__name__}: {err})") from err


def _result_dict(result) -> dict:
    return {
        "name": result.name,
        "ok": result.ok,
        "text": result.text,
        "data": result.data,
        "error": result.error,
        "elapsed_s": round(result.elapsed_s, 4),
    }


class RationaleStage(Stage):
    name = "rationale"

    def __init__(self, config, teacher=None, runtime=None):
        super().__init__(config)
        self._teacher, self._runtime = teacher, runtime

    @property
    def teacher(self):
        if self._teacher is None:
            from .stages import build_teacher

            self._teacher = build_teacher(self.config, self.name)
        return self._teacher

    @property
    def runtime(self):
        if self._runtime is None:
            from .stages import build_tools

            self._runtime = build_tools(self.config)
        return self._runtime

    def setup(self) -> None:
        self.teacher, self.runtime  # noqa: B018 - touching the properties loads them

    @property
    def features(self):
        import datasets

        names = ("id", "source", "image", "question", "answer", "style", "meta", "steps", "objects", "teacher_answer")
        feats = {k: datasets.Value("string") for k in names}
        feats["n_steps"] = datasets.Value("int32")
        return datasets.Features(feats)

    def input_records(self) -> list[dict]:
        from .engine import read_records

        return read_records(self.config.output_dir, "curate")

    def usage(self) -> dict:
        return self.teacher.usage() if self._teacher is not None else {}

    def process(self, record: dict) -> dict:
        image = open_image(record["image"])
        runtime, teacher = self.runtime, self.teacher
        available = runtime.available()
        operators = [name for name in available if name != RAG]
        rag_on = RAG in available
        history: list[dict] = []
        objects: list[str] | None = None
        try:
            for _ in range(self.config.max_steps):
                step = teacher.step(record, image, history, operators, rag=rag_on)
                results = []
                for name in step.operators:
                    query = None
                    if name == LABEL_BBOX:
                        if objects is None:
                            objects = teacher.scene_objects(record, image)
                        query = ", ".join(objects)
                    results.append(_result_dict(runtime.call(name, image, query=query)))
                rag_result = None
                if step.rag_needed:
                    rag_result = _result_dict(runtime.search(step.rag_query, top_k=self.config.rag_top_k))
                history.append(
                    {
                        "thought": step.thought,
                        "operators": step.operators,
                        "rag": {"needed": step.rag_needed, "query": step.rag_query},
                        "next_action": step.next_action,
                        "results": results,
                        "rag_result": rag_result,
                    }
                )
                if step.is_final:
                    break
            else:
                raise SampleError("step_cap", f"no final_answer within {self.config.max_steps} steps")
            answer = teacher.final_answer(record, image, history, operators)
        except MalformedReply as err:
            raise SampleError("malformed_step", str(err)) from err
        except TeacherError as err:
            # An unreachable endpoint says nothing about the sample: leave it for the next run.
            if err.transient:
                raise RetryLater(str(err)) from err
            raise SampleError("teacher_error", str(err)) from err
        if self.config.gold_filter and not answers_match(answer, record["answer"]):
            raise SampleError("answer_mismatch", f"teacher answered {answer!r}, gold is {record['answer']!r}")
        return {
            **{k: record[k] for k in ("id", "source", "image", "question", "answer", "style", "meta")},
            "steps": json.dumps(history, ensure_ascii=False),
            "objects": json.dumps(objects),
            "teacher_answer": answer,
            "n_steps": len(history),
        }

    def counters(self, record: dict) -> dict[str, int]:
        counts: dict[str, int] = {f"steps/{record['n_steps']}": 1}
        for step in json.loads(record["steps"]):
            for result in step["results"] + ([step["rag_result"]] if step["rag_result"] else []):
                key = f"operator/{result['name']}"
                counts[key] = counts.get(key, 0) + 1
                if not result["ok"]:
                    counts[f"tool_error/{result['name']}"] = counts.get(f"tool_error/{result['name']}", 0) + 1
        return counts
