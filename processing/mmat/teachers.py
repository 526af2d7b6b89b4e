"""Teacher models for the rationale and reflection stages (MMAT-1M §3.2-3.3, DESIGN.md §5).

MMAT-1M used GPT-4o as teacher. Here a teacher is any object with the methods of :class:`ChatTeacher`
(`scene_objects`, `step`, `final_answer`, `math_reflection`, `general_reflection`, `judge`, `usage`).
:class:`ChatTeacher` implements them with our own prompts on top of a chat client:

- :class:`OpenAIChatClient`: any OpenAI-compatible `/chat/completions` endpoint through httpx, images as
  base64 PNG data URLs, bounded concurrency, retries with exponential backoff on timeouts, 429 and 5xx
  (honouring `Retry-After`), and a shared per-run :class:`Budget` (requests, tokens, cost).
- :class:`TransformersChatClient`: a local transformers vision-language (or text) model.

Each reasoning step must parse strictly (:func:`processing.mmat.steps.parse_step`); a malformed step is
sent back with the reason and retried up to `max_format_retries` times, then the sample fails with
reason `malformed_step`. :mod:`processing.mmat.toy_teacher` is a deterministic program with the same
methods for offline runs.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import logging
import os
import random
import threading
import time
from pathlib import Path

from PIL import Image

from .formats import RR_SUMMARIZE, conversation_text, render_feedback, step_results, with_style
from .steps import (
    MalformedReply,
    ReasoningStep,
    parse_general_reflection,
    parse_judge,
    parse_json_object,
    parse_math_reflection,
    parse_step,
    step_to_json,
)

logger = logging.getLogger(__name__)


class TeacherError(RuntimeError):
    """A teacher call failed (retries exhausted, or a non-retryable HTTP error).

    `transient` is True when the endpoint was unavailable (timeouts, connection errors, 429/5xx to the last
    try): the sample itself is fine and a later run should retry it, so stages do not record it as done.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class BudgetExceeded(RuntimeError):
    """The per-run budget is spent; the run stops and unfinished samples wait for the next run."""


@dataclasses.dataclass
class ChatReply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


_NO_SPEND = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}


class Budget:
    """Thread- and process-safe per-run limits on requests, tokens and cost.

    Without `ledger` the counts live in this object. With one they live in a JSON file that every stage and
    every datatrove task of a run shares, read and updated under an exclusive `fcntl` lock before each
    request: the limits then hold for the whole run, not once per stage or per process.

    Args:
        max_requests (`int`, *optional*): request cap (counted when a request is sent, retries included).
        max_tokens (`int`, *optional*): prompt + completion token cap.
        max_cost_usd (`float`, *optional*): cost cap, from the two prices below.
        prompt_price_per_1k (`float`, *optional*, defaults to 0.0): USD per 1000 prompt tokens.
        completion_price_per_1k (`float`, *optional*, defaults to 0.0): USD per 1000 completion tokens.
        ledger (`str` or `os.PathLike`, *optional*): the run's spend file (`<output_dir>/_spend/<run_id>.json`).
        scope (`str`, *optional*, defaults to `""`): the stage spending; the ledger keeps a sub-total per scope,
            which :meth:`snapshot` reports, while the limits apply to the total.
    """

    def __init__(
        self,
        max_requests: int | None = None,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
        prompt_price_per_1k: float = 0.0,
        completion_price_per_1k: float = 0.0,
        ledger: str | os.PathLike | None = None,
        scope: str = "",
    ):
        self.max_requests, self.max_tokens, self.max_cost_usd = max_requests, max_tokens, max_cost_usd
        self.prompt_price_per_1k, self.completion_price_per_1k = prompt_price_per_1k, completion_price_per_1k
        self.ledger = Path(ledger) if ledger is not None else None
        self.scope = scope
        self._state: dict = {"total": dict(_NO_SPEND), "scopes": {}}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _spend(self):
        """The spend counts, to read and change; with a ledger, locked against other processes and saved on exit."""
        with self._lock:
            if self.ledger is None:
                yield self._state
                return
            import fcntl

            self.ledger.parent.mkdir(parents=True, exist_ok=True)
            with open(self.ledger.with_name(self.ledger.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    text = self.ledger.read_text() if self.ledger.exists() else ""
                    state = json.loads(text) if text else {"total": dict(_NO_SPEND), "scopes": {}}
                    yield state
                    if json.dumps(state) != text:
                        tmp = self.ledger.with_name(f".{self.ledger.name}.{os.getpid()}.tmp")
                        tmp.write_text(json.dumps(state))
                        os.replace(tmp, self.ledger)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _cost(self, counts: dict) -> float:
        return (
            counts["prompt_tokens"] * self.prompt_price_per_1k
            + counts["completion_tokens"] * self.completion_price_per_1k
        ) / 1000

    def _add(self, state: dict, **amounts: int) -> None:
        for counts in (state["total"], state["scopes"].setdefault(self.scope, dict(_NO_SPEND))):
            for key, value in amounts.items():
                counts[key] += int(value)

    def reserve(self) -> None:
        """Count one request, or raise :class:`BudgetExceeded` if any limit is reached."""
        with self._spend() as state:
            total = state["total"]
            if self.max_requests is not None and total["requests"] >= self.max_requests:
                raise BudgetExceeded(f"request budget spent ({total['requests']}/{self.max_requests})")
            tokens = total["prompt_tokens"] + total["completion_tokens"]
            if self.max_tokens is not None and tokens >= self.max_tokens:
                raise BudgetExceeded(f"token budget spent ({tokens}/{self.max_tokens})")
            cost = self._cost(total)
            if self.max_cost_usd is not None and cost >= self.max_cost_usd:
                raise BudgetExceeded(f"cost budget spent (${cost:.4f}/${self.max_cost_usd})")
            self._add(state, requests=1)

    def record(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._spend() as state:
            self._add(state, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    def snapshot(self) -> dict:
        """What this scope (stage) has spent in the run."""
        with self._spend() as state:
            counts = dict(state["scopes"].get(self.scope, _NO_SPEND))
        return {**counts, "cost_usd": round(self._cost(counts), 6)}


def image_to_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _to_openai(messages: list[dict]) -> list[dict]:
    """Neutral messages (content str or parts with `{"type": "image", "image": PIL}`) -> OpenAI format."""
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            out.append({"role": m["role"], "content": m["content"]})
            continue
        parts = []
        for part in m["content"]:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": image_to_data_url(part["image"])}})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": m["role"], "content": parts})
    return out


class OpenAIChatClient:
    """Client for an OpenAI-compatible chat-completions endpoint.

    Args:
        base_url (`str`): API root, e.g. `"https://api.openai.com/v1"` or `"http://127.0.0.1:8000/v1"`.
        model (`str`): model name sent in the request.
        api_key_env (`str`, *optional*, defaults to `"OPENAI_API_KEY"`): environment variable with the key;
            when unset no `Authorization` header is sent (local servers). The key is never logged.
        timeout_s (`float`, *optional*, defaults to 120.0): per-request timeout.
        max_retries (`int`, *optional*, defaults to 4): retries after a timeout, 429, 5xx or an unreadable body.
        backoff_s (`float`, *optional*, defaults to 1.0): first backoff; doubles per retry (with jitter).
        max_backoff_s (`float`, *optional*, defaults to 30.0): backoff ceiling (also caps `Retry-After`).
        max_concurrency (`int`, *optional*, defaults to 4): requests in flight at once across threads.
        budget (`Budget`, *optional*): shared per-run limits.
        temperature (`float`, *optional*, defaults to 0.0), max_tokens (`int`, *optional*, defaults to 1024).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_concurrency: int = 4,
        budget: Budget | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
    ):
        import httpx

        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self._httpx = httpx
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.budget = budget or Budget()
        self.temperature, self.max_tokens = temperature, max_tokens
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._client = httpx.Client(timeout=timeout_s)
        self.retries = 0

    def _headers(self) -> dict:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_s * (2**attempt) * (1 + 0.25 * random.random())
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        time.sleep(min(delay, self.max_backoff_s))

    def chat(self, messages: list[dict], json_mode: bool = False) -> ChatReply:
        """Send one chat request; retry transient failures; raise :class:`TeacherError` when out of tries."""
        body = {
            "model": self.model,
            "messages": _to_openai(messages),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        last, transient = "no attempt made", False
        for attempt in range(self.max_retries + 1):
            self.budget.reserve()
            retry_after = None
            with self._slots:
                try:
                    response = self._client.post(self.url, json=body, headers=self._headers())
                except self._httpx.TimeoutException:
                    last, transient = f"timeout after {self.timeout_s:g} s", True
                    response = None
                except self._httpx.TransportError as err:
                    last, transient = f"transport error: {type(err).__name__}", True
                    response = None
            if response is not None:
                if response.status_code == 429 or response.status_code >= 500:
                    last, transient = f"HTTP {response.status_code}", True
                    retry_after = response.headers.get("retry-after")
                elif response.status_code >= 400:
                    raise TeacherError(f"HTTP {response.status_code} (not retried): {response.text[:200]}")
                else:
                    try:
                        payload = response.json()
                        text = payload["choices"][0]["message"]["content"]
                        if not isinstance(text, str):
                            raise TypeError("message content is not a string")
                    except (ValueError, KeyError, IndexError, TypeError) as err:
                        # The server answered, but not in the chat format: a property of the endpoint, not an outage.
                        last, transient = f"unreadable response body ({type(err).__name__})", False
                    else:
                        usage = payload.get("usage") or {}
                        reply = ChatReply(
                            text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
                        )
                        self.budget.record(reply.prompt_tokens, reply.completion_tokens)
                        return reply
            if attempt < self.max_retries:
                self.retries += 1
                logger.info("teacher request failed (%s); retry %d/%d", last, attempt + 1, self.max_retries)
                self._sleep(attempt, retry_after)
        raise TeacherError(f"teacher request failed after {self.max_retries + 1} attempts: {last}", transient=transient)


class TransformersChatClient:
    """A local transformers model as teacher (vision-language through `AutoModelForImageTextToText`).

    Args:
        model_path (`str`): local folder with the model and its processor (chat template required).
        max_new_tokens (`int`, *optional*, defaults to 512): reply length cap.
        device (`str`, *optional*, defaults to `"cpu"`).
        budget (`Budget`, *optional*): counts requests and tokens (cost stays 0 unless priced).
    """

    def __init__(self, model_path: str, max_new_tokens: int = 512, device: str = "cpu", budget: Budget | None = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not os.path.isdir(model_path):
            raise ValueError(f"teacher weights must be a local folder, got {model_path!r}")
        self._torch = torch
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.model = AutoModelForImageTextToText.from_pretrained(model_path).to(device).eval()
        self.max_new_tokens = max_new_tokens
        self.budget = budget or Budget()
        # One generate at a time: the model is shared by the stage's worker threads.
        self._lock = threading.Lock()

    def chat(self, messages: list[dict], json_mode: bool = False) -> ChatReply:
        self.budget.reserve()
        with self._lock:
            inputs = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            ).to(self.model.device)
            with self._torch.no_grad():
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        text = self.processor.decode(new, skip_special_tokens=True)
        self.budget.record(inputs["input_ids"].shape[1], new.shape[0])
        return ChatReply(text, inputs["input_ids"].shape[1], int(new.shape[0]))


# ---------------------------------------------------------------- prompts (our wording)

OPERATOR_HELP = {
    "image_caption": "a one-sentence description of the whole image",
    "label_bbox": "boxes of the objects relevant to the question, normalised [x1, y1, x2, y2]",
    "ocr": "the text written in the image",
    "face_detection": "pixel boxes of the faces in the image",
}

GENERATION_PROMPT = """You are a careful multimodal reasoner. Answer the question about the image one small step at a time.
At each step you may request operators; their results come back in the next message. Operators:
{operators}
If the operators cannot help, you may request text retrieval (RAG); it searches text with a text query only, never with an image.
You are shown the reference answer so that your reasoning heads towards it. Never state, quote or hint that you were given it: every conclusion must follow from the image and the results you received.
Reply with one JSON object and nothing else, with exactly these fields:
"thought": one short reasoning step that uses the previous results,
"operators": a list of operator names to run next (empty if none),
"rag": {{"needed": true or false, "query": a search string or null}},
"next_action": "continue" while more steps are needed, "final_answer" once the reasoning is complete.
Example: {{"thought": "The question is about the sign, so I will read its text.", "operators": ["ocr"], "rag": {{"needed": false, "query": null}}, "next_action": "continue"}}
Reference answer: {answer}"""

ANSWER_PROMPT = """You are a careful multimodal reasoner. You have reasoned about the image step by step with the help of operators.
Now answer the question from that reasoning. Reply with the answer only, in the form the question asks for: no JSON, no explanation.
As during the reasoning, you are shown the reference answer; never say that you were given it.
Reference answer: {answer}"""

SCENE_GRAPH_PROMPT = """{question}
For the image and the question above, write only a scene graph in JSON: {{"objects": [names of the objects that matter for the question], "attributes": [{{"name": object, "value": attribute}}], "relationships": [{{object: {{relation: [objects]}}}}]}}. Output the JSON only."""

MATH_REFLECTION_PROMPT = """Below is a multi-round dialogue in which an assistant answered a question about an image.
{conversations}
A reader who is not strong at calculation needs every computation written out. Look only at how the assistant got from this round:
{second_to_last}
to this round:
{last}
If a calculation between them was skipped, write the missing steps. If the reasoning is already explicit, add nothing.
Reply with JSON only: {{"reason": why extra reasoning is or is not needed, "thought": the missing reasoning, or null}}"""

GENERAL_REFLECTION_PROMPT = """Below is a multi-round dialogue in which an assistant reasoned about an image and called tools, without its final answer.
{conversations}
Decide whether the reasoning "cheats": the tools or the assistant's own observations were not enough to establish the answer, yet the conclusion claims it was derived.
Reply with JSON only: {{}} if there is no cheating; otherwise {{"reason": why the reasoning does not support its conclusion, "thought": a corrected reasoning step grounded in the evidence}}."""

JUDGE_PROMPT = """Rate the quality of this reasoning dialogue about an image for training a model.
Criteria: coherence, relevance, accuracy, completeness, and how well it ties the text to the image.
{conversations}
Reference answer: {answer}
Reply with JSON only: {{"quality_score": a number from 0.0 to 1.0 with one decimal, "scoring_reason": a short reason}}"""


class ChatTeacher:
    """Teacher on top of a chat client (:class:`OpenAIChatClient` or :class:`TransformersChatClient`).

    Args:
        client: an object with `chat(messages, json_mode=False) -> ChatReply` and a `budget`.
        max_format_retries (`int`, *optional*, defaults to 2): re-asks after a malformed step.
    """

    def __init__(self, client, max_format_retries: int = 2):
        self.client = client
        self.max_format_retries = max_format_retries
        self.rejected_replies = 0
        self._count_lock = threading.Lock()

    def usage(self) -> dict:
        snap = self.client.budget.snapshot()
        snap["rejected_replies"] = self.rejected_replies
        snap["http_retries"] = getattr(self.client, "retries", 0)
        return snap

    def _ask_json(self, messages: list[dict], parse):
        """Ask, parse, and on a malformed reply re-ask with the reason; raise MalformedReply at the end."""
        messages = list(messages)
        for attempt in range(self.max_format_retries + 1):
            reply = self.client.chat(messages, json_mode=True)
            try:
                return parse(reply.text)
            except MalformedReply as err:
                with self._count_lock:
                    self.rejected_replies += 1
                if attempt == self.max_format_retries:
                    raise
                messages += [
                    {"role": "assistant", "content": reply.text},
                    {
                        "role": "user",
                        "content": f"Your reply was rejected: {err}. Reply again with the JSON object only.",
                    },
                ]

    @staticmethod
    def _question_turn(sample: dict, image: Image.Image, text: str) -> dict:
        return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}

    def _dialogue(self, sample: dict, image: Image.Image, history: list[dict], operators: list[str]) -> list[dict]:
        ops = "\n".join(f"- {name}: {OPERATOR_HELP.get(name, name)}" for name in operators) or "- (none available)"
        messages = [
            {"role": "system", "content": GENERATION_PROMPT.format(operators=ops, answer=sample["answer"])},
            self._question_turn(sample, image, with_style(sample["question"], sample.get("style"))),
        ]
        for step in history:
            messages.append(
                {
                    "role": "assistant",
                    "content": step_to_json(
                        ReasoningStep(
                            step["thought"],
                            step["operators"],
                            step["rag"]["needed"],
                            step["rag"]["query"],
                            step["next_action"],
                        )
                    ),
                }
            )
            messages.append({"role": "user", "content": render_feedback(step_results(step))})
        return messages

    def scene_objects(self, sample: dict, image: Image.Image) -> list[str]:
        """Object names for `label_bbox`, from a scene graph (MMAT-1M Fig. 5)."""

        def parse(text):
            objects = parse_json_object(text).get("objects")
            if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects) or not objects:
                raise MalformedReply('the scene graph needs a non-empty "objects" list of names')
            return objects

        prompt = SCENE_GRAPH_PROMPT.format(question=with_style(sample["question"], sample.get("style")))
        return self._ask_json([self._question_turn(sample, image, prompt)], parse)

    def step(
        self, sample: dict, image: Image.Image, history: list[dict], operators: list[str], rag: bool = True
    ) -> ReasoningStep:
        allowed = tuple(operators)

        def parse(text):
            step = parse_step(text, allowed_operators=allowed)
            if step.rag_needed and not rag:
                raise MalformedReply("RAG is not available in this run; set rag.needed to false")
            return step

        return self._ask_json(self._dialogue(sample, image, history, operators), parse)

    def final_answer(self, sample: dict, image: Image.Image, history: list[dict], operators: list[str]) -> str:
        """The plain answer after the last step, asked as the RR data asks it (`render_rr`)."""
        messages = self._dialogue(sample, image, history, operators)
        # The step that said `final_answer` gets no feedback turn (as in RR), so user and assistant keep
        # alternating; and the JSON-only step instructions would ask for JSON where a bare answer is wanted.
        if history and history[-1]["next_action"] == "final_answer":
            messages.pop()
        # The reference answer stays in view, as in MMAT-1M's generation prompt: the released RR answers follow it.
        messages[0] = {"role": "system", "content": ANSWER_PROMPT.format(answer=sample["answer"])}
        messages.append({"role": "user", "content": RR_SUMMARIZE + with_style(sample["question"], sample.get("style"))})
        return self.client.chat(messages).text.strip()

    def math_reflection(self, sample: dict, messages: list[dict]) -> dict:
        body = [m for m in messages if m["role"] != "system"]
        prompt = MATH_REFLECTION_PROMPT.format(
            conversations=conversation_text(body),
            second_to_last=conversation_text(body[-4:-2]),
            last=conversation_text(body[-2:]),
        )
        return self._ask_json([{"role": "user", "content": prompt}], parse_math_reflection)

    def general_reflection(self, sample: dict, messages: list[dict]) -> dict:
        prompt = GENERAL_REFLECTION_PROMPT.format(conversations=conversation_text(messages[:-1]))
        return self._ask_json([{"role": "user", "content": prompt}], parse_general_reflection)

    def judge(self, sample: dict, messages: list[dict]) -> dict:
        prompt = JUDGE_PROMPT.format(conversations=conversation_text(messages), answer=sample["answer"])
        return self._ask_json([{"role": "user", "content": prompt}], parse_judge)
