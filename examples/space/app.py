"""Gradio Space for an ernie5 checkpoint: text generation with the model's own sampling controls.

The checkpoint folder is `MODEL_DIR` (default: `model/` next to this file) and loads with
`trust_remote_code=True`, so the Space needs only transformers, torch and gradio — not the ernie5 package.
Run locally with `MODEL_DIR=path/to/checkpoint python examples/space/app.py`; `examples/space/build_space.py`
assembles a ready-to-push folder with the checkpoint in `model/`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from functools import lru_cache  # noqa: E402

MODEL_DIR = os.environ.get("MODEL_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "model"))
MAX_PROMPT_CHARS = 2000  # a Space is public: bound the work one request can ask for
MAX_NEW_TOKENS = 128


@lru_cache(maxsize=1)
def load(model_dir: str = MODEL_DIR):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(
            f"no checkpoint in {model_dir}: set MODEL_DIR to a saved ernie5 model, or build the Space folder with "
            "examples/space/build_space.py"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    return model, tokenizer


def respond(prompt: str, max_new_tokens: int = 32, temperature: float = 0.8, top_k: int = 20) -> str:
    """Continue `prompt`; greedy when temperature is 0."""
    import torch

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    max_new_tokens = int(min(max(1, max_new_tokens), MAX_NEW_TOKENS))
    model, tokenizer = load()
    inputs = tokenizer(prompt, return_tensors="pt")
    sampling = dict(do_sample=True, temperature=float(temperature), top_k=int(top_k)) if temperature > 0 else {}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def build_demo():
    import gradio as gr

    def safe_respond(prompt, max_new_tokens, temperature, top_k):
        try:
            return respond(prompt, max_new_tokens, temperature, top_k)
        except ValueError as err:
            raise gr.Error(str(err)) from err

    with gr.Blocks(title="ernie5 demo") as demo:
        gr.Markdown("# ernie5\nA tiny ERNIE 5.0-style ultra-sparse MoE model, trained from scratch on CPU.")
        prompt = gr.Textbox(label="Prompt", value="Return the", max_length=MAX_PROMPT_CHARS)
        with gr.Row():
            n = gr.Slider(1, MAX_NEW_TOKENS, value=32, step=1, label="new tokens")
            temperature = gr.Slider(0.0, 1.5, value=0.8, step=0.05, label="temperature (0 = greedy)")
            top_k = gr.Slider(1, 100, value=20, step=1, label="top-k")
        output = gr.Textbox(label="Continuation")
        gr.Button("Generate").click(safe_respond, [prompt, n, temperature, top_k], output, api_name="respond")
    return demo


if __name__ == "__main__":
    build_demo().launch()
