"""Verifiers for RL post-training: a registry of TRL reward functions (ERNIE 5.0 §4 "unified verifier system").

The report gives no verifier details, so this module provides the ones this project can check locally:

- `exact_match` / `normalised_match`: the completion's answer against the dataset's `answer` column (normalised:
  lower-case, punctuation, articles and extra spaces removed, SQuAD style);
- `rr_format` / `orr_format`: the MMAT-1M output formats (MMAT-1M §3.4): an RR step
  `<THOUGHT>..</THOUGHT>[<OPERATOR>..</OPERATOR>][<RAG>..</RAG>]<SIGNAL>continue|end|reflection</SIGNAL>`, and the
  one-turn ORR answer `<THOUGHT>..</THOUGHT><ANSWER>The answer is: ..</ANSWER>`;
- `tool_use`: executes the operator and RAG calls a completion makes through the shared tool runtime
  (`processing.tools`) and rewards calls that run;
- `toy_world`: the toy world's strict checker (`processing.toy_world.check_answer`) on generated questions.

Every function follows TRL's reward contract: called with `prompts`, `completions`, `completion_ids` and one value per
completion for every other dataset column, returning one float (or `None` to skip a sample) per completion.
`get_reward_func(name)` resolves a registry name or a dotted import path.

>>> from training.rewards import get_reward_func
>>> get_reward_func("normalised_match")(prompts=["q"], completions=["The Eiffel Tower."], answer=["eiffel tower"])
[1.0]
"""

from __future__ import annotations

import importlib
import re
import string
from collections.abc import Callable
from typing import Any

RewardFunc = Callable[..., list[float | None]]

SIGNALS = ("continue", "end", "reflection")
_RR_STEP = re.compile(
    r"^<THOUGHT>(?P<thought>.+?)</THOUGHT>\s*"
    r"(?:<OPERATOR>(?P<operator>.+?)</OPERATOR>\s*)?"
    r"(?:<RAG>(?P<rag>.+?)</RAG>\s*)?"
    r"<SIGNAL>(?P<signal>continue|end|reflection)</SIGNAL>$",
    re.DOTALL,
)
_ORR = re.compile(
    r"^<THOUGHT>(?P<thought>.+?)</THOUGHT>\s*<ANSWER>\s*The answer is:\s*(?P<answer>.+?)\s*</ANSWER>$", re.DOTALL
)
_ANSWER_TAG = re.compile(r"<ANSWER>\s*(?:The answer is:)?\s*(?P<answer>.*?)\s*</ANSWER>", re.DOTALL)
_ANSWER_PREFIX = re.compile(r"the answer is:?\s*(?P<answer>.+)", re.IGNORECASE | re.DOTALL)
_OPERATOR_TAG = re.compile(r"<OPERATOR>(.*?)</OPERATOR>", re.DOTALL)
_RAG_TAG = re.compile(r"<RAG>(.*?)</RAG>", re.DOTALL)
_API_INVOKE = re.compile(r"<\|begin_api_invoke\|>(.*?)<\|end_api_invoke\|>", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of a completion in TRL's standard (`str`) or conversational (list of messages) form."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content", "") if isinstance(m.get("content"), str) else "" for m in completion)
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    raise ValueError(f"unsupported completion type {type(completion).__name__}; expected str or list of messages")


def extract_answer(text: str) -> str:
    """The answer part of a completion: the `<ANSWER>` tag, else what follows "The answer is", else the text."""
    match = _ANSWER_TAG.search(text)
    if match:
        return match.group("answer").strip()
    match = _ANSWER_PREFIX.search(text)
    if match:
        return match.group("answer").strip()
    return text.strip()


def normalise_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _column(kwargs: dict, name: str, n: int, reward: str) -> list:
    if name not in kwargs:
        raise ValueError(f"reward {reward!r} needs a dataset column {name!r}; columns given: {sorted(kwargs)}")
    values = kwargs[name]
    if len(values) != n:
        raise ValueError(f"reward {reward!r}: column {name!r} has {len(values)} values for {n} completions")
    return list(values)


def _references(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def exact_match_reward(completions: list, answer: list | None = None, **kwargs) -> list[float | None]:
    """1.0 when the extracted answer equals a reference exactly (after stripping), else 0.0; `None` without one."""
    answers = _column({"answer": answer} if answer is not None else kwargs, "answer", len(completions), "exact_match")
    out: list[float | None] = []
    for completion, ref in zip(completions, answers):
        refs = [r.strip() for r in _references(ref)]
        out.append(None if not refs else float(extract_answer(completion_text(completion)) in refs))
    return out


def normalised_match_reward(completions: list, answer: list | None = None, **kwargs) -> list[float | None]:
    """1.0 when the normalised extracted answer equals a normalised reference, else 0.0."""
    columns = {"answer": answer} if answer is not None else kwargs
    answers = _column(columns, "answer", len(completions), "normalised_match")
    out: list[float | None] = []
    for completion, ref in zip(completions, answers):
        refs = [normalise_answer(r) for r in _references(ref)]
        out.append(None if not refs else float(normalise_answer(extract_answer(completion_text(completion))) in refs))
    return out


def rr_format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion is one well-formed RR reasoning step (THOUGHT, optional OPERATOR / RAG, SIGNAL)."""
    return [float(bool(_RR_STEP.match(completion_text(c).strip()))) for c in completions]


def orr_format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 for a well-formed ORR answer: `<THOUGHT>..</THOUGHT><ANSWER>The answer is: ..</ANSWER>`."""
    return [float(bool(_ORR.match(completion_text(c).strip()))) for c in completions]


def toy_world_reward(
    completions: list, question: list | None = None, answer: list | None = None, kind: list | None = None, **kwargs
) -> list[float | None]:
    """The toy world's strict checker on the extracted answer; needs `question`, `answer` and `kind` columns."""
    from processing.toy_world import QA, check_answer

    n = len(completions)
    columns = {k: v for k, v in (("question", question), ("answer", answer), ("kind", kind)) if v is not None}
    questions = _column(columns, "question", n, "toy_world")
    answers = _column(columns, "answer", n, "toy_world")
    kinds = _column(columns, "kind", n, "toy_world")
    out: list[float | None] = []
    for completion, q, a, k in zip(completions, questions, answers, kinds):
        if a is None or k is None:
            out.append(None)
            continue
        out.append(float(check_answer(QA(q or "", str(a), k), extract_answer(completion_text(completion)))))
    return out


def parse_tool_calls(text: str) -> list[tuple[str, str | None]]:
    """Tool calls in a completion as `(name, query)`: RR `<OPERATOR>` names (comma or semicolon separated) and
    `<RAG>` queries, and ORR `<|begin_api_invoke|>name<|end_api_invoke|>` markers."""
    calls: list[tuple[str, str | None]] = []
    for block in _OPERATOR_TAG.findall(text):
        calls.extend((name.strip(), None) for name in re.split(r"[,;\n]", block) if name.strip())
    calls.extend(("rag", query.strip()) for query in _RAG_TAG.findall(text))
    calls.extend((name.strip(), None) for name in _API_INVOKE.findall(text) if name.strip())
    return calls


class ToolUseReward:
    """Executes the tool calls of each completion through a `processing.tools.ToolRuntime`.

    Reward: the fraction of calls that ran successfully (`ToolResult.ok`), plus `expected_bonus` when the set of
    operators called equals the dataset's `expected_tools` column (when present); completions without any call get
    `no_call_reward`. Operators needing a query (open-vocabulary detection) receive the `query` column or the
    prompt's question text.

    Args:
        runtime (`ToolRuntime`): the shared runtime (`processing.tools.build_runtime(...)`).
        image_column (`str`, *optional*, defaults to `"image"`): dataset column with the PIL image.
        no_call_reward (`float`, *optional*, defaults to 0.0): reward when the completion calls no tool.
        expected_bonus (`float`, *optional*, defaults to 0.5): added when the called operators match `expected_tools`.
    """

    def __init__(self, runtime, image_column: str = "image", no_call_reward: float = 0.0, expected_bonus: float = 0.5):
        self.runtime = runtime
        self.image_column = image_column
        self.no_call_reward = no_call_reward
        self.expected_bonus = expected_bonus
        self.__name__ = "tool_use"

    def __call__(self, completions: list, **kwargs) -> list[float]:
        from processing.tools import canonical_operator_name

        n = len(completions)
        images = kwargs.get(self.image_column) or [None] * n
        queries = kwargs.get("query") or [None] * n
        expected = kwargs.get("expected_tools") or [None] * n
        out: list[float] = []
        for i, completion in enumerate(completions):
            calls = parse_tool_calls(completion_text(completion))
            if not calls:
                out.append(self.no_call_reward)
                continue
            ok = 0
            for name, query in calls:
                result = self.runtime.call(name, image=images[i], query=query if query is not None else queries[i])
                ok += int(result.ok)
            reward = ok / len(calls)
            if expected[i] is not None:
                wanted = {canonical_operator_name(t) for t in _references(expected[i])}
                if {canonical_operator_name(name) for name, _ in calls} == wanted:
                    reward += self.expected_bonus
            out.append(reward)
        return out


REWARD_FUNCS: dict[str, RewardFunc] = {
    "exact_match": exact_match_reward,
    "normalised_match": normalised_match_reward,
    "rr_format": rr_format_reward,
    "orr_format": orr_format_reward,
    "toy_world": toy_world_reward,
}
# Rewards that need construction arguments (a tool runtime): name -> factory(**kwargs).
REWARD_FACTORIES: dict[str, Callable[..., RewardFunc]] = {"tool_use": ToolUseReward}


def get_reward_func(name: str, **factory_kwargs) -> RewardFunc:
    """A reward by registry name (`REWARD_FUNCS`, or `REWARD_FACTORIES` with `factory_kwargs`), or by dotted path
    (`package.module.function` or `package.module:function`).

    Raises:
        ValueError: the name is neither registered nor importable; the message lists the registered names.
    """
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    if name in REWARD_FACTORIES:
        if name == "tool_use" and "runtime" not in factory_kwargs:
            from processing.tools import build_runtime

            factory_kwargs = {"runtime": build_runtime(ocr=False, face=True), **factory_kwargs}
        return REWARD_FACTORIES[name](**factory_kwargs)
    module_name, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    if sep and module_name:
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import reward {name!r}: {err}") from err
        if not callable(fn):
            raise ValueError(f"reward {name!r} is not callable")
        return fn
    raise ValueError(
        f"unknown reward {name!r}; registered: {sorted(REWARD_FUNCS) + sorted(REWARD_FACTORIES)}, "
        "or give a dotted path such as 'my_package.rewards.my_reward'"
    )


__all__ = [
    "REWARD_FACTORIES",
    "REWARD_FUNCS",
    "ToolUseReward",
    "completion_text",
    "exact_match_reward",
    "extract_answer",
    "get_reward_func",
    "normalise_answer",
    "orr_format_reward",
    "parse_tool_calls",
    "rr_format_reward",
    "toy_world_reward",
]
