"""Model card from a checkpoint, what a push uploads, and the Gradio Space served on loopback."""

import importlib.util
import json
import shutil
import socket
import sys

import pytest
import torch

from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM
from processing.tokenizer import train_text_tokenizer
from training.hub import build_model_card, publishable_files, push_to_hub, write_model_card


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tok = train_text_tokenizer(["Return the number of items in a container."] * 30, vocab_size=280)
    torch.manual_seed(0)
    cfg = Ernie5Config.from_preset("tiny", vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    Ernie5ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_folder(checkpoint, tmp_path_factory):
    """A training run's output folder: the final checkpoint plus what the Trainer and the scripts leave beside it."""
    run = tmp_path_factory.mktemp("run")
    for path in checkpoint.iterdir():
        shutil.copy(path, run / path.name)
    for name in ("checkpoint-5/optimizer.pt", "checkpoint-5/config.json", "runs/events.out.tfevents.1",
                 "tokenizer/tokenizer.json", "training_args.bin", "elastic_losses.png"):  # fmt: skip
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_bytes(b"not for the Hub")
    return run


def test_model_card_reads_facts_from_the_checkpoint(checkpoint):
    from huggingface_hub import ModelCard

    path = write_model_card(
        checkpoint, repo_id="someone/ernie5-tiny", results={"val_loss": 4.5}, eval_dataset="someone/val-set"
    )
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers" and "custom_code" in card.data.tags
    assert card.data.pipeline_tag == "text-generation" and card.data.base_model is None
    result = card.data.eval_results[0]
    assert (result.metric_value, result.dataset_type, result.task_type) == (4.5, "someone/val-set", "text-generation")
    text = path.read_text()
    assert "8 routed (width 32) + 1 shared, top-2" in text
    assert "125.50K active / 272.96K total" in text
    assert 'AutoModelForCausalLM.from_pretrained("someone/ernie5-tiny", trust_remote_code=True)' in text
    # Without the dataset they were measured on, results stay in the table only: no made-up Hub dataset.
    bare = build_model_card(checkpoint, results={"val_loss": 4.5})
    assert bare.data.eval_results is None and "| val_loss | 4.5 |" in str(bare)


def test_multimodal_card_names_the_class_its_auto_map_holds(tmp_path):
    from modeling_ernie5.configuration_ernie5_vision import Ernie5VisionConfig
    from modeling_ernie5.modeling_ernie5_vl import Ernie5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Ernie5Config(vocab_size=64, vision_config=Ernie5VisionConfig(), image_token_id=60, image_gen_token_id=61,
                       boi_token_id=62, eoi_token_id=63, pad_token_id=0)  # fmt: skip
    Ernie5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    card = build_model_card(tmp_path, repo_id="someone/ernie5-vl")
    assert card.data.pipeline_tag == "image-text-to-text"
    assert "AutoModelForImageTextToText" in json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert 'AutoModelForImageTextToText.from_pretrained("someone/ernie5-vl", trust_remote_code=True)' in str(card)


def test_submodel_card_summarises_the_cut_and_links_only_a_hub_parent(checkpoint, tmp_path):
    from modeling_ernie5.elastic import extract_submodel

    def card_of(model, name):
        model.save_pretrained(tmp_path / name)
        return build_model_card(tmp_path / name)

    parent = Ernie5ForCausalLM.from_pretrained(checkpoint)
    child = extract_submodel(parent, layers=3, num_experts=4, top_k=1, calibration_data=torch.randint(1, 200, (2, 16)))
    with_local_parent = card_of(child, "local")
    assert with_local_parent.data.base_model is None
    text = str(with_local_parent)
    assert str(checkpoint) not in text and f"a local checkpoint (`{checkpoint.name}`)" in text
    assert "3 of 4\nlayers, 4 of 8 experts (chosen by routing usage on calibration data),\ntop-1 of 2" in text
    parent.config._name_or_path = "someone/ernie5-parent"
    with_hub_parent = card_of(extract_submodel(parent, layers=3), "hub")
    assert with_hub_parent.data.base_model == "someone/ernie5-parent" and "Cut from someone/ernie5-parent" in str(
        with_hub_parent
    )


def test_model_card_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        build_model_card(tmp_path)


def test_push_is_a_logged_no_op_offline(checkpoint, caplog):
    assert push_to_hub(checkpoint, "someone/x") is None
    assert "not pushed" in caplog.text


def test_push_uploads_the_checkpoint_files_only(checkpoint, run_folder, monkeypatch):
    """A run folder's optimizer states, TensorBoard logs, pickled arguments and plots stay home; the token is
    checked before any request."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    import training.hub as hub

    files = publishable_files(run_folder)
    assert files == sorted(p.name for p in checkpoint.iterdir())
    assert {"model.safetensors", "config.json", "modeling_ernie5.py", "tokenizer.json"} <= set(files)
    everything = sorted(str(p.relative_to(run_folder)) for p in run_folder.rglob("*") if p.is_file())
    assert list(filter_repo_objects(everything, allow_patterns=files)) == files  # the Hub client's own filter

    calls = []

    class RecordingHubClient:  # stands in for the Hub service, which tests cannot reach
        def __init__(self, token=None):
            calls.append(("client", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))

        def upload_folder(self, folder_path, repo_id, allow_patterns):
            calls.append(("upload", folder_path, repo_id, allow_patterns))
            return "commit-url"

    monkeypatch.setattr(hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHubClient)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match="no Hugging Face token"):
        push_to_hub(run_folder, "someone/x")
    assert calls == []
    assert push_to_hub(run_folder, "someone/x", token="hf_test") == "commit-url"
    assert calls == [("client", "hf_test"), ("create", "someone/x", True), ("upload", str(run_folder), "someone/x", files)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio is the optional `space` extra")
def test_space_serves_generation_over_http(run_folder, tmp_path, monkeypatch, without_ernie5_packages):
    from examples.space.build_space import build_space

    space = build_space(str(run_folder), str(tmp_path / "space"), model_id="someone/ernie5-tiny", license="mit")
    card = (space / "README.md").read_text()
    assert "sdk: gradio" in card and "license: mit" in card
    assert sorted(p.name for p in (space / "model").iterdir()) == publishable_files(run_folder)
    requirements = (space / "requirements.txt").read_text()
    assert all(name in requirements for name in ("torch", "transformers", "gradio")) and "ernie5" not in requirements
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
    with pytest.raises(ValueError, match="set MODEL_DIR"):
        app.load(str(tmp_path / "nothing"))

    # On the Space only the uploaded folder exists: the app must run from the checkpoint's own copied code.
    stdout = without_ernie5_packages(
        f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("space_app", {str(space / "app.py")!r})
        app = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(app)
        model, _ = app.load()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        print("REPLY", repr(app.respond("Return the", max_new_tokens=5, temperature=0)))
        """,
        tmp_path,
        MODEL_DIR=str(space / "model"),
    )
    assert f"REPLY {greedy!r}" in stdout

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
