"""Model card from a checkpoint, offline-safe push, and the Gradio Space served on loopback."""

import importlib.util
import socket
import sys

import pytest
import torch

from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM
from processing.tokenizer import train_text_tokenizer
from training.hub import build_model_card, push_to_hub, write_model_card


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tok = train_text_tokenizer(["Return the number of items in a container."] * 30, vocab_size=280)
    torch.manual_seed(0)
    cfg = Ernie5Config.from_preset("tiny", vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    Ernie5ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_model_card_reads_facts_from_the_checkpoint(checkpoint):
    from huggingface_hub import ModelCard

    path = write_model_card(checkpoint, repo_id="someone/ernie5-tiny", results={"val_loss": 4.5})
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers" and "custom_code" in card.data.tags
    assert card.data.eval_results[0].metric_value == 4.5
    text = path.read_text()
    assert "8 routed (width 32) + 1 shared, top-2" in text
    assert "125.50K active / 272.96K total" in text
    assert 'from_pretrained("someone/ernie5-tiny", trust_remote_code=True)' in text


def test_model_card_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        build_model_card(tmp_path)


def test_push_is_a_logged_no_op_offline(checkpoint, caplog):
    assert push_to_hub(checkpoint, "someone/x") is None
    assert "not pushed" in caplog.text


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio is the optional `space` extra")
def test_space_serves_generation_over_http(checkpoint, tmp_path, monkeypatch):
    from examples.space.build_space import build_space

    space = build_space(str(checkpoint), str(tmp_path / "space"), model_id="someone/ernie5-tiny")
    assert "sdk: gradio" in (space / "README.md").read_text()
    monkeypatch.setenv("MODEL_DIR", str(space / "model"))
    sys.path.insert(0, str(space))
    try:
        spec = importlib.util.spec_from_file_location("space_app", space / "app.py")
        app = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(app)
    finally:
        sys.path.remove(str(space))
    greedy = app.respond("Return the", max_new_tokens=5, temperature=0)
    assert isinstance(greedy, str) and greedy == app.respond("Return the", max_new_tokens=5, temperature=0)
    with pytest.raises(ValueError, match="empty"):
        app.respond("   ")
    with pytest.raises(ValueError, match="limit"):
        app.respond("x" * 5000)

    from gradio_client import Client

    demo = app.build_demo()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        got = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            "Return the", 5, 0.0, 20, api_name="/respond"
        )
    finally:
        demo.close()
    assert got == greedy
