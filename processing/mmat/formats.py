"""Text formats of MMAT-1M: the RR and ORR dialogue layouts, tool-feedback turns and system prompts.

Tag and turn strings are the released data format (MMAT-1M Figs. 2, 4, 9, 10, 12-14): they are facts
and are reproduced exactly. The system prompts are our own wording of what the paper's prompts ask
for, keeping their exact format strings. Choices where the paper is silent are marked "Choice:".

An RR dialogue (multi-turn Rationale and Reflection):

    system     RR_SYSTEM_PROMPT
    user       <image>{prompt} Please start your reasoning.
    assistant  <THOUGHT>..</THOUGHT><OPERATOR>ocr</OPERATOR><SIGNAL>continue</SIGNAL>
    user       Here are ocr results from the previous step:-ocr information: .. Please continue your reasoning.
    assistant  <THOUGHT>..</THOUGHT><SIGNAL>end</SIGNAL>
    user       Based on the above information, please summarize and give the answer to the initial question: {prompt}
    assistant  {answer}

An ORR sample is one turn: operator results (never RAG) inlined in the question between
`<|begin_api_invoke|>` markers, and the concatenated thoughts plus the answer in the reply.
"""

from __future__ import annotations

import hashlib

IMAGE_TAG = "<image>"

# ---- answer-style constraints appended to short-answer questions (MMAT-1M §3.2, Foundation)
STYLE_SHORT = "Answer the question using a single word or phrase."
STYLE_LETTER = "Answer with the option's letter from the given choices directly."
STYLE_BRIEF = "Give a short answer."
STYLE_CONSTRAINTS = (STYLE_SHORT, STYLE_LETTER, STYLE_BRIEF)

# ---- RR turn strings (verbatim data format)
RR_START = " Please start your reasoning."
RR_CONTINUE = " Please continue your reasoning."
RR_NO_RESULTS = (
    "No additional operator or rag results were selected in the previous step. Please continue your reasoning."
)
RR_MAKE_REFLECTION = (
    "No additional operator or rag results were selected in the previous step. Please make a reflection."
)
RR_SUMMARIZE = "Based on the above information, please summarize and give the answer to the initial question: "
SIGNAL_CONTINUE, SIGNAL_END, SIGNAL_REFLECTION = "continue", "end", "reflection"
# Figs. 2 and 12 put nothing between the tags of a step, Fig. 13 a newline before <SIGNAL> in
# reflection turns; we follow each figure where it applies.
STEP_SEP = ""
REFLECTION_SEP = "\n"
# Choice: the paper does not show how several operators share one <OPERATOR> tag; we use ", ".
OPERATOR_JOIN = ", "
# The released RR tags spell face detection with a space (Fig. 4); the other names are as in the prompt.
RR_OPERATOR_NAMES = {"face_detection": "face detection"}
# Fig. 4 prefixes OCR text with "-ocr information: " and gives faces without a prefix.
RESULT_PREFIX = {"ocr": "-ocr information: "}

# ---- ORR markers (Fig. 14, verbatim)
ORR_API_INTRO = "Use the following API outputs to help answer the question:"
API_INVOKE = "<|begin_api_invoke|>{name}<|end_api_invoke|>"
API_RESULT = "<|begin_result_of_api|>{result}<|end_result_of_api|>"
ORR_ANSWER = "<THOUGHT>{thought}</THOUGHT><ANSWER>The answer is: {answer}</ANSWER>"

# ---- system prompts (our wording; the format strings inside are exact)
RR_SYSTEM_PROMPT = (
    "You are a multimodal reasoning assistant. Work towards the answer to the user's question about the "
    "image one step at a time. At each step you may call none, one or several operators; their results "
    "are given back to you at the next step. You may also ask for retrieval (RAG) to look up knowledge. "
    "Write every reasoning step in this format: "
    "<THOUGHT>reasoning</THOUGHT><OPERATOR>names of the operators</OPERATOR><RAG>query for rag</RAG>"
    "<SIGNAL>signal of the next action</SIGNAL>. Leave out <OPERATOR> or <RAG> when you call no operator "
    "or need no retrieval. When you are asked for the final answer, reply with the answer to the initial "
    "question only."
)
ORR_SYSTEM_PROMPT = (
    "You are a multimodal reasoning assistant. Use the image, the question and the operator outputs you "
    "are given to reason step by step to the answer. Reply in this format: "
    "<THOUGHT>your reasoning</THOUGHT><ANSWER>The answer is: your answer</ANSWER>"
)

# Self-critique openers for the reflection trigger turn; the paper implies a pool of paraphrases
# (Figs. 2 and 13 differ). Ours are our own sentences.
MATH_OPENERS = (
    "Wait, my reasoning skipped part of the calculation. Let me write the missing steps out.",
    "Hold on, the arithmetic behind that step is not shown. I will spell it out.",
    "Let me double-check: the computation leading to the result needs more detail.",
)
GENERAL_OPENERS = (
    "Wait, my earlier steps do not actually establish the answer. Let me re-examine the evidence.",
    "Hold on, the tool results do not fully support that conclusion. Let me reconsider.",
    "Let me check whether my reasoning really leads to the answer before concluding.",
)


def pick(options: tuple[str, ...], key: str) -> str:
    """Deterministic choice from a pool, keyed by sample id (reruns produce identical data)."""
    digest = hashlib.sha256(key.encode()).digest()
    return options[digest[0] % len(options)]


def with_style(question: str, style: str | None) -> str:
    """The question as posed to the model: the style constraint follows on a new line (LLaVA convention)."""
    return f"{question}\n{style}" if style else question


def rr_operator_name(name: str) -> str:
    return RR_OPERATOR_NAMES.get(name, name)


def render_result_body(result: dict) -> str:
    """One operator or RAG result as fed back to the model; failures are stated, not hidden."""
    name = result["name"]
    if not result.get("ok"):
        return f"The {rr_operator_name(name)} operator returned no result ({result.get('error') or 'failed'})."
    return RESULT_PREFIX.get(name, "") + result["text"]


def render_feedback(results: list[dict]) -> str:
    """The user turn that follows a step: every result, then the request to continue."""
    if not results:
        return RR_NO_RESULTS
    parts = [
        f"Here are {rr_operator_name(r['name'])} results from the previous step:{render_result_body(r)}"
        for r in results
    ]
    return " ".join(parts) + RR_CONTINUE


def render_step(thought: str, operators: list[str], rag_query: str | None, signal: str, sep: str = STEP_SEP) -> str:
    """One assistant reasoning turn in RR tags."""
    out = f"<THOUGHT>{thought}</THOUGHT>"
    if operators:
        out += f"<OPERATOR>{OPERATOR_JOIN.join(rr_operator_name(o) for o in operators)}</OPERATOR>"
    if rag_query:
        out += f"<RAG>{rag_query}</RAG>"
    return out + f"{sep}<SIGNAL>{signal}</SIGNAL>"


def step_results(step: dict) -> list[dict]:
    """Operator results then the RAG result of a recorded step, in the order they are fed back."""
    results = list(step.get("results") or [])
    if step.get("rag_result"):
        results.append(step["rag_result"])
    return results


def render_rr(sample: dict, steps: list[dict], reflection: dict | None, answer: str, system: bool = True) -> list[dict]:
    """The RR dialogue as chat messages (content strings, `<image>` in the first user turn).

    Args:
        sample (`dict`): curated record with `question` and `style`.
        steps (`list[dict]`): recorded teacher steps (`thought`, `operators`, `rag`, `results`, `rag_result`).
        reflection (`dict`, *optional*): `{"kind", "opener", "thought"}` inserted before the final `end`.
        answer (`str`): the final assistant turn.
        system (`bool`, *optional*, defaults to True): start with the RR system prompt (the `_RR_sys` files).
    """
    prompt = with_style(sample["question"], sample.get("style"))
    messages = [{"role": "system", "content": RR_SYSTEM_PROMPT}] if system else []
    messages.append({"role": "user", "content": f"{IMAGE_TAG}{prompt}{RR_START}"})
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        signal = SIGNAL_END if last and reflection is None else SIGNAL_CONTINUE
        rag_query = step["rag"]["query"] if step["rag"].get("needed") else None
        messages.append(
            {"role": "assistant", "content": render_step(step["thought"], step["operators"], rag_query, signal)}
        )
        if not last or reflection is not None:
            messages.append({"role": "user", "content": render_feedback(step_results(step))})
    if reflection is not None:
        messages.append(
            {
                "role": "assistant",
                "content": render_step(reflection["opener"], [], None, SIGNAL_REFLECTION, REFLECTION_SEP),
            }
        )
        messages.append({"role": "user", "content": RR_MAKE_REFLECTION})
        messages.append(
            {"role": "assistant", "content": render_step(reflection["thought"], [], None, SIGNAL_END, REFLECTION_SEP)}
        )
    messages.append({"role": "user", "content": f"{RR_SUMMARIZE}{prompt}"})
    messages.append({"role": "assistant", "content": answer})
    return messages


def _reads_retrieval(steps: list[dict], index: int) -> bool:
    """Whether a step asked for retrieval, or follows one that did (its thought reads the retrieved text)."""

    def asked(step: dict) -> bool:
        return bool((step.get("rag") or {}).get("needed") or step.get("rag_result"))

    return asked(steps[index]) or (index > 0 and asked(steps[index - 1]))


def render_orr(
    sample: dict, steps: list[dict], reflection: dict | None, answer: str, system: bool = True
) -> list[dict]:
    """The one-turn ORR sample: successful operator results inlined, thoughts joined.

    ORR carries no RAG (MMAT-1M §3.2): neither the retrieved text in the user turn nor the thoughts of steps
    that asked for or read it, which quote or announce the retrieval.
    """
    prompt = with_style(sample["question"], sample.get("style"))
    api = ""
    for step in steps:
        for result in step.get("results") or []:
            if result.get("ok") and result["name"] != "rag":
                api += API_INVOKE.format(name=result["name"]) + API_RESULT.format(result=result["text"])
    user = f"{IMAGE_TAG}{prompt}" + (f"{ORR_API_INTRO}{api}" if api else "")
    thoughts = [s["thought"].strip() for i, s in enumerate(steps) if not _reads_retrieval(steps, i)]
    if reflection is not None:
        thoughts += [reflection["opener"].strip(), reflection["thought"].strip()]
    reply = ORR_ANSWER.format(thought=" ".join(t for t in thoughts if t), answer=answer)
    messages = [{"role": "system", "content": ORR_SYSTEM_PROMPT}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def to_trl_layout(messages: list[dict]) -> list[dict]:
    """Drop the `<image>` placeholders: TRL's `prepare_multimodal_messages` inserts the images itself."""
    return [{"role": m["role"], "content": m["content"].replace(IMAGE_TAG, "")} for m in messages]


def conversation_text(messages: list[dict]) -> str:
    """A dialogue as plain text for the reflection and judge prompts."""
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages if m["role"] != "system")
