"""Verifier registry for RL (training/rewards.py): answer matching, RR/ORR format, tool use, toy world. CPU only."""

import random

import pytest

from training.rewards import (
    ToolUseReward,
    exact_match_reward,
    extract_answer,
    get_reward_func,
    normalise_answer,
    normalised_match_reward,
    orr_format_reward,
    parse_tool_calls,
    rr_format_reward,
    toy_world_reward,
)


def test_answer_extraction_and_normalisation():
    assert extract_answer("<THOUGHT>x</THOUGHT><ANSWER>The answer is: B</ANSWER>") == "B"
    assert extract_answer("so the answer is: 35") == "35"
    assert extract_answer("  red ") == "red"
    assert normalise_answer("The  Eiffel Tower!") == "eiffel tower"


def test_exact_and_normalised_match():
    completions = ["Paris", "paris.", "<ANSWER>The answer is: Paris</ANSWER>", "Lyon", "x"]
    answers = ["Paris", "Paris", "Paris", ["Paris", "Lyon"], None]
    assert exact_match_reward(completions, answer=answers) == [1.0, 0.0, 1.0, 1.0, None]
    assert normalised_match_reward(completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, None]
    conversational = [[{"role": "assistant", "content": "The Paris"}]]
    assert normalised_match_reward(conversational, answer=["paris"]) == [1.0]
    with pytest.raises(ValueError, match="needs a dataset column 'answer'"):
        exact_match_reward(["a"], question=["q"])
    with pytest.raises(ValueError, match="1 values for 2 completions"):
        exact_match_reward(["a", "b"], answer=["a"])


def test_rr_and_orr_format():
    good_rr = [
        "<THOUGHT>Read the sign.</THOUGHT><OPERATOR>ocr</OPERATOR><SIGNAL>continue</SIGNAL>",
        "<THOUGHT>Look it up.</THOUGHT>\n<RAG>who built it</RAG>\n<SIGNAL>end</SIGNAL>",
        "<THOUGHT>Rethink.</THOUGHT>\n<SIGNAL>reflection</SIGNAL>",
    ]
    bad_rr = [
        "<THOUGHT>no signal</THOUGHT>",
        "<THOUGHT>x</THOUGHT><SIGNAL>stop</SIGNAL>",
        "<RAG>q</RAG><THOUGHT>x</THOUGHT><SIGNAL>end</SIGNAL>",
        "<THOUGHT>x</THOUGHT><SIGNAL>end</SIGNAL> trailing",
    ]
    assert rr_format_reward(good_rr + bad_rr) == [1.0] * 3 + [0.0] * 4
    orr = [
        "<THOUGHT>Sum then divide.</THOUGHT><ANSWER>The answer is: 35</ANSWER>",
        "<THOUGHT>x</THOUGHT><ANSWER>35</ANSWER>",
        "<ANSWER>The answer is: 35</ANSWER>",
    ]
    assert orr_format_reward(orr) == [1.0, 0.0, 0.0]


def test_toy_world_reward_uses_the_strict_checker():
    from processing.toy_world import draw_scene, make_questions

    _, scene = draw_scene(seed=5)
    qas = make_questions(scene, random.Random(0))
    completions = [qa.answer for qa in qas] + ["red or blue"]
    color = next((qa for qa in qas if qa.kind == "color"), None)
    questions = [qa.question for qa in qas] + [color.question if color else "What color is the circle?"]
    answers = [qa.answer for qa in qas] + [color.answer if color else "red"]
    kinds = [qa.kind for qa in qas] + ["color"]
    rewards = toy_world_reward(completions, question=questions, answer=answers, kind=kinds)
    assert rewards == [1.0] * len(qas) + [0.0]
    with pytest.raises(ValueError, match="'kind'"):
        toy_world_reward(["2"], question=["q"], answer=["2"])


def test_parse_tool_calls_rr_and_orr():
    text = (
        "<THOUGHT>t</THOUGHT><OPERATOR>ocr, face detection</OPERATOR><RAG>capital of France</RAG>"
        "<SIGNAL>continue</SIGNAL>"
        "<|begin_api_invoke|>image_caption<|end_api_invoke|>"
    )
    assert parse_tool_calls(text) == [
        ("ocr", None),
        ("face detection", None),
        ("rag", "capital of France"),
        ("image_caption", None),
    ]


def test_tool_use_reward_runs_calls_through_the_shared_runtime():
    from PIL import Image

    from processing.tools import build_runtime

    corpus = [{"id": "1", "title": "Paris", "text": "Paris is the capital of France."}]
    runtime = build_runtime(corpus=corpus, ocr=False)
    reward = ToolUseReward(runtime, expected_bonus=0.5)
    image = Image.new("RGB", (64, 64), (30, 30, 30))
    completions = [
        "<THOUGHT>t</THOUGHT><RAG>capital of France</RAG><SIGNAL>continue</SIGNAL>",  # runs; matches expected
        "<THOUGHT>t</THOUGHT><OPERATOR>face detection</OPERATOR><SIGNAL>continue</SIGNAL>",  # runs on the image
        "<THOUGHT>t</THOUGHT><OPERATOR>teleport</OPERATOR><SIGNAL>continue</SIGNAL>",  # unknown operator fails
        "<THOUGHT>no tools</THOUGHT><SIGNAL>end</SIGNAL>",
    ]
    got = reward(completions, image=[image] * 4, expected_tools=[["rag"], None, None, None])
    assert got == [1.5, 1.0, 0.0, 0.0]
    assert reward.__name__ == "tool_use"


def test_registry_resolution():
    assert get_reward_func("toy_world") is toy_world_reward
    assert get_reward_func("training.rewards.rr_format_reward") is rr_format_reward
    assert get_reward_func("training.rewards:orr_format_reward") is orr_format_reward
    with pytest.raises(ValueError, match="unknown reward 'nope'.*exact_match"):
        get_reward_func("nope")
    with pytest.raises(ValueError, match="cannot import"):
        get_reward_func("training.rewards.missing")
