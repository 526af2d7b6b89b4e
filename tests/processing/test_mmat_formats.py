"""MMAT text formats and strict parsing: inline records, each case asserting the result and the reason."""

import json

import pytest

from processing.mmat.formats import (
    ORR_SYSTEM_PROMPT,
    RR_SYSTEM_PROMPT,
    render_feedback,
    render_orr,
    render_rr,
    to_trl_layout,
)
from processing.mmat.steps import (
    MalformedReply,
    parse_general_reflection,
    parse_judge,
    parse_math_reflection,
    parse_step,
)

SAMPLE = {
    "id": "s1",
    "question": "What does the sign say?",
    "style": "Answer the question using a single word or phrase.",
}
PROMPT = "What does the sign say?\nAnswer the question using a single word or phrase."

STEPS = [
    {
        "thought": "I will read the sign and look up the place.",
        "operators": ["ocr", "face_detection"],
        "rag": {"needed": True, "query": "ADEDNI city"},
        "next_action": "continue",
        "results": [
            {"name": "ocr", "ok": True, "text": "ADEDNI", "error": None},
            {"name": "face_detection", "ok": False, "text": "", "error": "timeout: no result after 30 s"},
        ],
        "rag_result": {"name": "rag", "ok": True, "text": "1. Adedni: a town.", "error": None},
    },
    {
        "thought": "The sign reads CALIFORNIA.",
        "operators": [],
        "rag": {"needed": False, "query": None},
        "next_action": "final_answer",
        "results": [],
        "rag_result": None,
    },
]


def step_json(**overrides):
    step = {
        "thought": "Read the text.",
        "operators": ["ocr"],
        "rag": {"needed": False, "query": None},
        "next_action": "continue",
    }
    step.update(overrides)
    return json.dumps(step)


# ---------------------------------------------------------------- step parsing


def test_valid_step_and_canonical_names():
    step = parse_step(step_json(operators=["face detection", "OCR", "ocr"]))
    assert step.operators == ["face_detection", "ocr"] and not step.is_final and step.rag_query is None
    fenced = parse_step("```json\n" + step_json(rag={"needed": True, "query": " capital of France "}) + "\n```")
    assert fenced.rag_needed and fenced.rag_query == "capital of France"


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("", "empty"),
        ("The answer is 42", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (
            json.dumps({"thought": "x", "operators": [], "rag": {"needed": False, "query": None}}),
            r"misses field\(s\) \['next_action'\]",
        ),
        (step_json(answer="42"), r"unexpected field\(s\) \['answer'\]"),
        (step_json(thought="  "), "`thought` must be a non-empty string"),
        (step_json(operators="ocr"), "`operators` must be a list"),
        (step_json(operators=["teleport"]), "unknown operator 'teleport'"),
        (step_json(rag={"needed": "yes", "query": None}), "`rag` must be"),
        (step_json(rag={"needed": True, "query": ""}), "rag.query` is not a non-empty string"),
        (step_json(next_action="stop"), "`next_action` must be one of"),
        (step_json(next_action="final_answer"), "cannot request operators or RAG"),
    ],
)
def test_malformed_steps_are_rejected_with_reason(reply, reason):
    with pytest.raises(MalformedReply, match=reason):
        parse_step(reply)


def test_operator_outside_runtime_is_rejected():
    with pytest.raises(MalformedReply, match="unknown operator 'label_bbox'"):
        parse_step(step_json(operators=["label_bbox"]), allowed_operators=("ocr",))


def test_reflection_and_judge_parsing():
    assert parse_math_reflection('{"reason": "complete", "thought": "null"}') == {"reason": "complete", "thought": None}
    assert parse_math_reflection('{"reason": "skipped", "thought": null}')["thought"] is None
    assert parse_math_reflection('{"reason": "r", "thought": "3 + 4 = 7"}')["thought"] == "3 + 4 = 7"
    with pytest.raises(MalformedReply, match="math reflection"):
        parse_math_reflection('{"reason": "r"}')
    assert parse_general_reflection("{}") == {}
    assert parse_general_reflection('{"reason": "claims the OCR text"}') == {
        "reason": "claims the OCR text",
        "thought": None,
    }
    assert parse_judge('{"quality_score": 0.83, "scoring_reason": "ok"}') == {
        "quality_score": 0.8,
        "scoring_reason": "ok",
    }
    with pytest.raises(MalformedReply, match=r"quality_score` must be a number in \[0, 1\]"):
        parse_judge('{"quality_score": 7}')


# ---------------------------------------------------------------- RR / ORR rendering


def test_rr_dialogue_exact_strings():
    messages = render_rr(SAMPLE, STEPS, None, "california")
    assert messages == [
        {"role": "system", "content": RR_SYSTEM_PROMPT},
        {"role": "user", "content": f"<image>{PROMPT} Please start your reasoning."},
        {
            "role": "assistant",
            "content": "<THOUGHT>I will read the sign and look up the place.</THOUGHT><OPERATOR>ocr, face detection</OPERATOR>"
            "<RAG>ADEDNI city</RAG><SIGNAL>continue</SIGNAL>",
        },
        {
            "role": "user",
            "content": "Here are ocr results from the previous step:-ocr information: ADEDNI "
            "Here are face detection results from the previous step:The face detection operator returned no result "
            "(timeout: no result after 30 s). Here are rag results from the previous step:1. Adedni: a town. "
            "Please continue your reasoning.",
        },
        {"role": "assistant", "content": "<THOUGHT>The sign reads CALIFORNIA.</THOUGHT><SIGNAL>end</SIGNAL>"},
        {
            "role": "user",
            "content": f"Based on the above information, please summarize and give the answer to the initial question: {PROMPT}",
        },
        {"role": "assistant", "content": "california"},
    ]
    assert "<image>" not in json.dumps(to_trl_layout(messages))


def test_rr_reflection_turns_inserted_before_final_end():
    reflection = {"kind": "math", "opener": "Wait, let me show the arithmetic.", "thought": "30 + 5 = 35."}
    messages = render_rr(SAMPLE, STEPS, reflection, "35", system=False)
    contents = [m["content"] for m in messages]
    assert contents[3] == "<THOUGHT>The sign reads CALIFORNIA.</THOUGHT><SIGNAL>continue</SIGNAL>"
    assert (
        contents[4]
        == "No additional operator or rag results were selected in the previous step. Please continue your reasoning."
    )
    assert contents[5] == "<THOUGHT>Wait, let me show the arithmetic.</THOUGHT>\n<SIGNAL>reflection</SIGNAL>"
    assert (
        contents[6]
        == "No additional operator or rag results were selected in the previous step. Please make a reflection."
    )
    assert contents[7] == "<THOUGHT>30 + 5 = 35.</THOUGHT>\n<SIGNAL>end</SIGNAL>"
    assert contents[-1] == "35" and messages[0]["role"] == "user"


def test_orr_inlines_successful_operators_and_never_rag():
    reflection = {"kind": "general", "opener": "Hold on.", "thought": "The sign is CALIFORNIA."}
    system, user, assistant = render_orr(SAMPLE, STEPS, reflection, "california")
    assert system == {"role": "system", "content": ORR_SYSTEM_PROMPT}
    assert user["content"] == (
        f"<image>{PROMPT}Use the following API outputs to help answer the question:"
        "<|begin_api_invoke|>ocr<|end_api_invoke|><|begin_result_of_api|>ADEDNI<|end_result_of_api|>"
    )
    assert "rag" not in user["content"].lower() and "Adedni: a town" not in user["content"]
    # Both steps touch retrieval (the first asks for it, the second reads it), so only the reflection is left.
    assert assistant["content"] == (
        "<THOUGHT>Hold on. The sign is CALIFORNIA.</THOUGHT><ANSWER>The answer is: california</ANSWER>"
    )


def test_orr_thoughts_skip_the_steps_that_ask_for_or_read_retrieval():
    ocr = {**STEPS[1], "thought": "I read the sign first.", "next_action": "continue", "results": STEPS[0]["results"]}
    ask = {**STEPS[1], "thought": "I will look up the town.", "rag": {"needed": True, "query": "ADEDNI"}}
    ask.update(next_action="continue", rag_result={"name": "rag", "ok": True, "text": "1. Adedni: a town."})
    read = {**STEPS[1], "thought": "The retrieved text says Adedni is a town."}
    _, user, assistant = render_orr(SAMPLE, [ocr, ask, read], None, "town")
    assert assistant["content"] == "<THOUGHT>I read the sign first.</THOUGHT><ANSWER>The answer is: town</ANSWER>"
    assert "Adedni" not in user["content"] + assistant["content"]


def test_feedback_without_results():
    assert (
        render_feedback([])
        == "No additional operator or rag results were selected in the previous step. Please continue your reasoning."
    )
