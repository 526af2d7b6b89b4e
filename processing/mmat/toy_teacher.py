"""A deterministic teacher for the toy world: a program, not a model (issue 6, item 5).

It lets the whole MMAT engine run end to end offline with meaningful data. Scenes come from
:mod:`processing.toy_world` (coloured shapes with a written word); every fifth item is a drawn portrait
with one or two cartoon faces so that `face_detection` has something real to find, and a small text
corpus of shape facts makes "how many sides" questions need RAG.

The teacher knows the ground truth of each item (stored in the record's `meta`), asks for the operators
a careful reasoner would use (OCR for words, the detector for shapes, face detection for faces, RAG for
shape facts), receives the REAL results from the tool runtime, and writes its thoughts from them. Where
a tool result does not support the truth (a misread word, a random detector's boxes), it still states the
truth, which is exactly the "reasoning cheating" the general reflection is meant to catch; its reflection
methods check the evidence and say so. Its final answer to OCR and face questions is the tool's reading,
so the gold-answer filter has real disagreements to remove.

`make_toy_vqa` writes such items as a local VQA dataset (PNG images + JSONL) that `curate` reads like any
other source.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from processing import toy_world

from .steps import ReasoningStep

SIDES = {"triangle": 3, "square": 4, "circle": 0}
_NUMBER = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def toy_corpus() -> list[dict]:
    """Shape facts (and distractors) for the toy world's RAG questions."""
    facts = [
        ("triangle", "Triangle", "A triangle is a polygon with three sides and three corners."),
        ("square", "Square", "A square is a polygon with four equal sides and four right angles."),
        ("circle", "Circle", "A circle has no sides and no corners: it is a single curved line."),
        ("pentagon", "Pentagon", "A pentagon is a polygon with five sides."),
        ("hexagon", "Hexagon", "A hexagon has six sides; honeycomb cells are hexagons."),
        ("rainbow", "Rainbow", "A rainbow shows red, orange, yellow, green, blue and violet light."),
        ("tesseract", "Tesseract", "Tesseract is an open-source optical character recognition engine."),
    ]
    return [{"id": i, "title": t, "text": x, "url": f"https://toy.example/{i}"} for i, t, x in facts]


def draw_portrait(rng: random.Random, size: int = 192) -> tuple[Image.Image, list[list[float]]]:
    """One or two cartoon faces (skin oval, dark eyes and brows, nose, mouth) on a grey background.

    Returns the image and the faces' pixel boxes. The drawing is what OpenCV's frontal-face cascade
    responds to; the detector is not told where the faces are.
    """
    n = rng.choice((1, 2))
    image = Image.new("RGB", (size * n, size), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    boxes = []
    for k in range(n):
        s = rng.randint(int(size * 0.45), int(size * 0.6))
        ox = k * size + rng.randint(10, size - s - 10)
        oy = rng.randint(10, size - s - 10)
        skin = rng.choice([(225, 185, 150), (200, 150, 110), (240, 200, 170)])
        draw.ellipse([ox + s * 0.1, oy, ox + s * 0.9, oy + s], fill=skin)
        for ex in (0.32, 0.68):
            draw.ellipse([ox + s * (ex - 0.09), oy + s * 0.36, ox + s * (ex + 0.09), oy + s * 0.44], fill=(40, 30, 30))
            draw.rectangle(
                [ox + s * (ex - 0.12), oy + s * 0.27, ox + s * (ex + 0.12), oy + s * 0.30], fill=(60, 40, 30)
            )
        draw.polygon(
            [(ox + s * 0.5, oy + s * 0.45), (ox + s * 0.44, oy + s * 0.64), (ox + s * 0.56, oy + s * 0.64)],
            fill=(190, 140, 110),
        )
        draw.ellipse([ox + s * 0.36, oy + s * 0.72, ox + s * 0.64, oy + s * 0.80], fill=(150, 60, 60))
        boxes.append([float(ox + s * 0.1), float(oy), float(ox + s * 0.9), float(oy + s)])
    return image.filter(ImageFilter.GaussianBlur(1)), boxes


def make_toy_vqa(out_dir: str | Path, n_items: int = 20, seed: int = 0, size: int = 128) -> Path:
    """Write `n_items` toy VQA items (PNG + one JSONL line each) and return the JSONL path.

    Each line has `id`, `image` (file name relative to `out_dir`), `question`, `answer` and `meta` (the
    ground truth the toy teacher reads: shapes, word, faces, question kind).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    scene_seed = seed * 100_003
    while len(lines) < n_items:
        scene_seed += 1
        item = len(lines)
        if item % 5 == 4:
            image, faces = draw_portrait(rng)
            name = f"images/portrait-{scene_seed}.png"
            image.save(out / name)
            meta = {"qa_kind": "face", "faces": faces, "shapes": [], "text": None}
            lines.append(
                {
                    "id": f"toy-{item:05d}",
                    "image": name,
                    "question": "How many faces are there?",
                    "answer": str(len(faces)),
                    "meta": meta,
                }
            )
            continue
        image, scene = toy_world.draw_scene(scene_seed, size=size, with_text=True)
        name = f"images/scene-{scene_seed}.png"
        image.save(out / name)
        shapes = [{"kind": s.kind, "color": s.color, "bbox": list(s.bbox)} for s in scene.shapes]
        base = {"shapes": shapes, "text": scene.text, "faces": []}
        if item % 5 == 3:
            shape = rng.choice(scene.shapes)
            question = f"How many sides does the {shape.color} {shape.kind} have?"
            meta = {**base, "qa_kind": "knowledge", "target": {"kind": shape.kind, "color": shape.color}}
            lines.append(
                {
                    "id": f"toy-{item:05d}",
                    "image": name,
                    "question": question,
                    "answer": str(SIDES[shape.kind]),
                    "meta": meta,
                }
            )
            continue
        qa_list = toy_world.make_questions(scene, rng)
        # Prefer the OCR question on every other item so text reading is well represented.
        text_qa = [q for q in qa_list if q.kind == "text"]
        qa = text_qa[0] if text_qa and item % 2 == 0 else rng.choice(qa_list)
        lines.append(
            {
                "id": f"toy-{item:05d}",
                "image": name,
                "question": qa.question,
                "answer": qa.answer,
                "meta": {**base, "qa_kind": qa.kind},
            }
        )
    path = out / "toy_vqa.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+", text or "")


class ToyTeacher:
    """The toy world's teacher program (same methods as :class:`~processing.mmat.teachers.ChatTeacher`).

    Args:
        latency_s (`float`, *optional*, defaults to 0.0): sleep per reasoning step, to imitate a remote
            teacher when exercising concurrency and resume.
    """

    def __init__(self, latency_s: float = 0.0):
        self.latency_s = latency_s
        self._calls = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self._calls += 1

    def usage(self) -> dict:
        return {"requests": self._calls, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}

    @staticmethod
    def _meta(sample: dict) -> dict:
        meta = sample.get("meta")
        meta = json.loads(meta) if isinstance(meta, str) else (meta or {})
        if "qa_kind" not in meta:
            raise ValueError(
                f"sample {sample.get('id')}: the toy teacher only handles toy-world items (no meta.qa_kind)"
            )
        return meta

    def _targets(self, sample: dict, meta: dict) -> list[dict]:
        """The shapes a question is about."""
        q = sample["question"].lower()
        shapes = meta["shapes"]
        if meta["qa_kind"] == "knowledge":
            t = meta["target"]
            return [s for s in shapes if s["kind"] == t["kind"] and s["color"] == t["color"]]
        named = [s for s in shapes if f"{s['color']} {s['kind']}" in q]
        if named:
            return named
        by_kind = [s for s in shapes if s["kind"] in q or toy_world._PLURAL.get(s["kind"], "") in q]
        if by_kind:
            return by_kind
        by_color = [s for s in shapes if s["color"] in q]
        return by_color or shapes

    def scene_objects(self, sample: dict, image) -> list[str]:
        meta = self._meta(sample)
        if meta["qa_kind"] == "exists":
            m = re.search(r"is there an? (\w+) (\w+)", sample["question"].lower())
            if m:
                return [f"{m.group(1)} {m.group(2)}"]
        names = []
        for s in self._targets(sample, meta):
            name = f"{s['color']} {s['kind']}"
            if name not in names:
                names.append(name)
        return names or ["shape"]

    # ---- reasoning
    def step(self, sample: dict, image, history: list[dict], operators: list[str], rag: bool = True) -> ReasoningStep:
        self._count()
        if self.latency_s:
            time.sleep(self.latency_s)
        meta = self._meta(sample)
        kind = meta["qa_kind"]
        n = len(history)
        if kind == "text":
            if n == 0:
                return self._ask(
                    "The question asks for the word written in the image, so I will read the text.", ["ocr"], operators
                )
            return self._final(self._text_thought(history, meta))
        if kind == "face":
            if n == 0:
                return self._ask(
                    "The question is about people's faces, so I will run face detection.", ["face_detection"], operators
                )
            return self._final(self._face_thought(history))
        if kind == "knowledge":
            target = meta["target"]
            if n == 0:
                return self._ask(
                    f"First I locate the {target['color']} object in the image.", ["label_bbox"], operators
                )
            if n == 1:
                q = f"How many sides does a {target['kind']} have?"
                thought = f"{self._box_phrase(history[-1], sample, meta)}The {target['color']} object is a {target['kind']}; how many sides that shape has is general knowledge I should look up."
                if rag:
                    return ReasoningStep(thought, [], True, q, "continue")
                return self._final(thought + f" A {target['kind']} has {_NUMBER[SIDES[target['kind']]]} sides.")
            return self._final(self._rag_thought(history[-1], target["kind"]))
        # count, color, shape, position, exists: locate the shapes first
        if n == 0:
            return self._ask(
                "I will locate the shapes the question mentions with the object detector.", ["label_bbox"], operators
            )
        return self._final(self._shape_thought(history[-1], sample, meta))

    def _ask(self, thought: str, wanted: list[str], operators: list[str]) -> ReasoningStep:
        ops = [o for o in wanted if o in operators]
        if not ops and "image_caption" in operators:
            ops = ["image_caption"]
        if not ops:
            thought += " No suitable operator is available, so I will inspect the image directly."
        return ReasoningStep(thought, ops, False, None, "continue")

    @staticmethod
    def _final(thought: str) -> ReasoningStep:
        return ReasoningStep(thought, [], False, None, "final_answer")

    @staticmethod
    def _result(step: dict, name: str) -> dict | None:
        return next((r for r in step.get("results") or [] if r["name"] == name), None)

    def _ocr_word(self, history: list[dict], meta: dict) -> str | None:
        result = self._result(history[0], "ocr") if history else None
        if not result or not result["ok"]:
            return None
        words = _words(result["text"])
        # Tesseract reads shape edges as stray glyphs; a real word is the longest alphanumeric token.
        return max(words, key=len) if words else None

    def _text_thought(self, history: list[dict], meta: dict) -> str:
        truth = meta["text"]
        word = self._ocr_word(history, meta)
        if word is None:
            return f"No usable OCR reading came back, but the letters in the bottom band spell {truth}, so the word is {truth.lower()}."
        if word.upper() == truth.upper():
            return f"The OCR output contains '{word}', which is the word written below the shapes, so the answer is {word.lower()}."
        return f"The OCR output gives '{word}', but the letters in the bottom band actually spell {truth}, so the word is {truth.lower()}."

    def _face_thought(self, history: list[dict]) -> str:
        result = self._result(history[0], "face_detection")
        if result and result["ok"]:
            k = len(result["data"].get("boxes", []))
            return f"The face detector found {_NUMBER.get(k, str(k))} face{'s' if k != 1 else ''}, so there {'is' if k == 1 else 'are'} {k} in the image."
        return (
            "Face detection gave no result, but looking at the picture I can see the faces, and I count them directly."
        )

    def _box_phrase(self, step: dict, sample: dict, meta: dict) -> str:
        result = self._result(step, "label_bbox")
        if result and result["ok"] and result["data"].get("boxes"):
            label, boxes = next(iter(result["data"]["boxes"].items()))
            return f"The detector returned {len(boxes)} box(es) for '{label}', the first at {boxes[0]}. "
        if result and result["ok"]:
            return "The detector found none of the queried objects. "
        caption = self._result(step, "image_caption")
        if caption and caption["ok"]:
            return f"The caption says: '{caption['text'][:80]}'. "
        return ""

    def _shape_thought(self, step: dict, sample: dict, meta: dict) -> str:
        lead = self._box_phrase(step, sample, meta)
        answer = sample["answer"]
        kind = meta["qa_kind"]
        targets = self._targets(sample, meta)
        where = "; ".join(f"a {s['color']} {s['kind']} in the {self._position(s)}" for s in targets)
        if kind == "count":
            return f"{lead}Looking at the image I find {where}, so the count is {answer}."
        if kind == "exists":
            return f"{lead}Checking every shape in the image, the answer to whether it is present is {answer}."
        if kind == "position":
            s = targets[0]
            cx, cy = (s["bbox"][0] + s["bbox"][2]) / 2, (s["bbox"][1] + s["bbox"][3]) / 2
            return f"{lead}The {s['color']} {s['kind']} is centred near ({cx:.2f}, {cy:.2f}), which is the {answer} of the image."
        return f"{lead}In the image I see {where}, so the answer is {answer}."

    @staticmethod
    def _position(shape: dict) -> str:
        cx, cy = (shape["bbox"][0] + shape["bbox"][2]) / 2, (shape["bbox"][1] + shape["bbox"][3]) / 2
        return f"{'top' if cy < 0.5 else 'bottom'} {'left' if cx < 0.5 else 'right'}"

    @staticmethod
    def _rag_thought(step: dict, kind: str) -> str:
        rag = step.get("rag_result") or {}
        hits = (rag.get("data") or {}).get("results") or []
        for hit in hits:
            if kind in hit["text"].lower():
                return f"The retrieved text says: '{hit['text']}' So the {kind} has {SIDES[kind]} sides."
        return f"The search did not return the fact, but a {kind} has {_NUMBER[SIDES[kind]]} sides."

    def final_answer(self, sample: dict, image, history: list[dict], operators: list[str]) -> str:
        self._count()
        meta = self._meta(sample)
        if meta["qa_kind"] == "text":
            word = self._ocr_word(history, meta)
            return word.lower() if word else sample["answer"]
        if meta["qa_kind"] == "face":
            result = self._result(history[0], "face_detection") if history else None
            if result and result["ok"]:
                return str(len(result["data"].get("boxes", [])))
        return sample["answer"]

    # ---- reflection and judging
    def _evidence(self, sample: dict) -> tuple[bool, str]:
        """Whether the recorded tool results support the gold answer, and why not."""
        meta = self._meta(sample)
        steps = json.loads(sample["steps"]) if isinstance(sample.get("steps"), str) else sample.get("steps") or []
        kind = meta["qa_kind"]
        if kind == "text":
            word = self._ocr_word(steps, meta)
            ok = word is not None and word.upper() == meta["text"].upper()
            return (
                ok,
                f"the OCR output ({word!r}) does not contain the word {meta['text']!r}, yet the reasoning states it",
            )
        if kind == "face":
            result = self._result(steps[0], "face_detection") if steps else None
            found = len(result["data"].get("boxes", [])) if result and result["ok"] else None
            return found == len(
                meta["faces"]
            ), f"the face detector found {found} face(s), which does not establish the answer {sample['answer']}"
        if kind == "knowledge":
            rag = (steps[-2].get("rag_result") if len(steps) >= 2 else None) or {}
            hits = (rag.get("data") or {}).get("results") or []
            ok = any(meta["target"]["kind"] in h["text"].lower() for h in hits)
            return ok, "no retrieved passage states the number of sides, yet the reasoning gives it"
        result = self._result(steps[0], "label_bbox") if steps else None
        if not result or not result["ok"]:
            return False, "no detection result locates the shapes, yet the reasoning describes them exactly"
        truth = [s["bbox"] for s in self._targets(sample, meta)]
        found = [b for boxes in result["data"].get("boxes", {}).values() for b in boxes]
        matched = sum(any(_iou(t, f) >= 0.5 for f in found) for t in truth)
        return (
            matched == len(truth),
            f"only {matched} of {len(truth)} relevant shapes overlap a detected box, yet the reasoning describes all of them",
        )

    def general_reflection(self, sample: dict, messages: list[dict]) -> dict:
        self._count()
        supported, why = self._evidence(sample)
        if supported:
            return {}
        meta = self._meta(sample)
        truth = meta["text"] if meta["qa_kind"] == "text" else sample["answer"]
        return {
            "reason": f"The conclusion is not supported: {why}.",
            "thought": f"The tool output is not reliable here, so I verify against the image itself: {self._visual_check(sample, meta, truth)}",
        }

    def _visual_check(self, sample: dict, meta: dict, truth: str) -> str:
        kind = meta["qa_kind"]
        if kind == "text":
            return f"the bottom band clearly shows the letters {truth}, so the word is {truth.lower()}."
        if kind == "face":
            return f"the picture shows {len(meta['faces'])} face(s)."
        if kind == "knowledge":
            k = meta["target"]["kind"]
            return f"the object is a {k}, and a {k} has {SIDES[k]} sides."
        shapes = "; ".join(f"a {s['color']} {s['kind']} in the {self._position(s)}" for s in meta["shapes"])
        return f"the image contains {shapes}, which gives the answer {sample['answer']}."

    def math_reflection(self, sample: dict, messages: list[dict]) -> dict:
        self._count()
        meta = self._meta(sample)
        if meta["qa_kind"] not in ("count", "knowledge"):
            return {"reason": "The question needs no calculation.", "thought": None}
        if meta["qa_kind"] == "knowledge":
            k = meta["target"]["kind"]
            return {
                "reason": "The final count of sides is stated without counting.",
                "thought": f"Walking around the {k} edge by edge and counting each straight side gives {SIDES[k]} in total.",
            }
        targets = self._targets(sample, meta)
        if len(targets) < 2:
            return {"reason": "Only one object is counted; nothing was skipped.", "thought": None}
        tally = ", ".join(
            f"the {s['color']} {s['kind']} in the {self._position(s)} makes {i}" for i, s in enumerate(targets, 1)
        )
        return {
            "reason": "The total is given without counting the objects one by one.",
            "thought": f"Counting one at a time: {tally}. So there are {len(targets)} in total.",
        }

    def judge(self, sample: dict, messages: list[dict]) -> dict:
        self._count()
        supported, why = self._evidence(sample)
        steps = json.loads(sample["steps"]) if isinstance(sample.get("steps"), str) else []
        calls = [r for s in steps for r in (s.get("results") or [])]
        ok_rate = sum(r["ok"] for r in calls) / len(calls) if calls else 0.5
        score = round(min(1.0, 0.3 + 0.4 * ok_rate + (0.3 if supported else 0.0)), 1)
        reason = "Tool results support the answer." if supported else f"Weak grounding: {why}."
        return {"quality_score": score, "scoring_reason": reason}
