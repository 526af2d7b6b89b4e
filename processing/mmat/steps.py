"""Strict parsing of teacher replies: reasoning steps and reflection / judge verdicts (MMAT-1M §3.2-3.3).

A reasoning step is a JSON object with exactly the four fields of the data-generation prompt (Fig. 6):
`thought` (non-empty string), `operators` (list of operator names), `rag` (`{"needed": bool,
"query": str | null}`) and `next_action` (`"continue"` or `"final_answer"`). Anything else is rejected
with :class:`MalformedReply`, whose message is sent back to the teacher when the step is retried.
"""

from __future__ import annotations

import dataclasses
import json
import re

from processing.tools import OPERATOR_NAMES, canonical_operator_name

NEXT_ACTIONS = ("continue", "final_answer")
_STEP_FIELDS = {"thought", "operators", "rag", "next_action"}
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class MalformedReply(ValueError):
    """The teacher's reply does not follow the required JSON format."""


@dataclasses.dataclass
class ReasoningStep:
    thought: str
    operators: list[str]
    rag_needed: bool
    rag_query: str | None
    next_action: str

    @property
    def is_final(self) -> bool:
        return self.next_action == "final_answer"


def parse_json_object(text: str) -> dict:
    """Parse a reply that must be one JSON object, optionally inside a ```json fence."""
    if not isinstance(text, str) or not text.strip():
        raise MalformedReply("the reply is empty; answer with one JSON object")
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body)
    except json.JSONDecodeError as err:
        raise MalformedReply(f"the reply is not valid JSON ({err.msg} at char {err.pos})") from err
    if not isinstance(value, dict):
        raise MalformedReply(f"the reply must be a JSON object, got {type(value).__name__}")
    return value


def parse_step(text: str, allowed_operators: tuple[str, ...] | list[str] = OPERATOR_NAMES) -> ReasoningStep:
    """Parse and validate one reasoning step.

    Args:
        text (`str`): the teacher's reply.
        allowed_operators (`list[str]`, *optional*): operator names the teacher may request; names are
            canonicalised first (`"face detection"` -> `"face_detection"`).

    Raises:
        MalformedReply: with a sentence saying what is wrong.
    """
    obj = parse_json_object(text)
    missing = _STEP_FIELDS - set(obj)
    if missing:
        raise MalformedReply(f"the step misses field(s) {sorted(missing)}")
    extra = set(obj) - _STEP_FIELDS
    if extra:
        raise MalformedReply(f"the step has unexpected field(s) {sorted(extra)}; use only {sorted(_STEP_FIELDS)}")
    thought = obj["thought"]
    if not isinstance(thought, str) or not thought.strip():
        raise MalformedReply("`thought` must be a non-empty string")
    operators = obj["operators"]
    if not isinstance(operators, list) or not all(isinstance(o, str) for o in operators):
        raise MalformedReply("`operators` must be a list of operator names (strings)")
    canon = []
    for name in operators:
        c = canonical_operator_name(name)
        if c not in allowed_operators:
            raise MalformedReply(f"unknown operator {name!r}; choose from {list(allowed_operators)}")
        if c not in canon:
            canon.append(c)
    rag = obj["rag"]
    if not isinstance(rag, dict) or set(rag) != {"needed", "query"} or not isinstance(rag["needed"], bool):
        raise MalformedReply('`rag` must be {"needed": true|false, "query": string or null}')
    query = rag["query"]
    if rag["needed"] and (not isinstance(query, str) or not query.strip()):
        raise MalformedReply("`rag.needed` is true but `rag.query` is not a non-empty string")
    if query is not None and not isinstance(query, str):
        raise MalformedReply("`rag.query` must be a string or null")
    action = obj["next_action"]
    if action not in NEXT_ACTIONS:
        raise MalformedReply(f"`next_action` must be one of {list(NEXT_ACTIONS)}, got {action!r}")
    if action == "final_answer" and (canon or rag["needed"]):
        raise MalformedReply("a final_answer step cannot request operators or RAG; their results would never be read")
    return ReasoningStep(thought.strip(), canon, rag["needed"], query.strip() if rag["needed"] else None, action)


def _null(value) -> bool:
    # The reflection prompt writes null in quotes, so teachers answer both null and "null".
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none"))


def parse_math_reflection(text: str) -> dict:
    """`{"reason": str, "thought": str | null}` -> `{"reason", "thought"}` with thought None when no fix."""
    obj = parse_json_object(text)
    if "reason" not in obj or "thought" not in obj:
        raise MalformedReply('the math reflection must be {"reason": ..., "thought": ... or null}')
    return {"reason": str(obj["reason"]), "thought": None if _null(obj["thought"]) else str(obj["thought"]).strip()}


def parse_general_reflection(text: str) -> dict:
    """`{}` (no cheating) or `{"reason": str, "thought"?: str}` -> `{}` or `{"reason", "thought"}`."""
    obj = parse_json_object(text)
    if not obj or _null(obj.get("reason")):
        return {}
    extra = set(obj) - {"reason", "thought"}
    if extra:
        raise MalformedReply(f"the general reflection has unexpected field(s) {sorted(extra)}")
    thought = obj.get("thought")
    return {"reason": str(obj["reason"]).strip(), "thought": None if _null(thought) else str(thought).strip()}


def parse_judge(text: str) -> dict:
    """`{"quality_score": 0.0-1.0, "scoring_reason": str}` (the judge prompt's fields, Fig. 11)."""
    obj = parse_json_object(text)
    score = obj.get("quality_score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= float(score) <= 1.0:
        raise MalformedReply(f"`quality_score` must be a number in [0, 1], got {score!r}")
    return {"quality_score": round(float(score), 1), "scoring_reason": str(obj.get("scoring_reason", ""))}


def step_to_json(step: ReasoningStep) -> str:
    """Serialise a step back to the teacher's JSON (used for the assistant turns of its history)."""
    return json.dumps(
        {
            "thought": step.thought,
            "operators": step.operators,
            "rag": {"needed": step.rag_needed, "query": step.rag_query},
            "next_action": step.next_action,
        }
    )
