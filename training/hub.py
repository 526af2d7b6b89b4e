"""Publishing ernie5 checkpoints: a model card written from the checkpoint itself, and an offline-safe push.

The card's facts (architecture, active/total parameters, what a sub-model was cut from, evaluation numbers)
are read from the saved config and from the results a caller passes, never typed by hand. Nothing here sends a
request unless `push_to_hub` is called with the Hub reachable; in offline mode it says so and returns.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub import is_offline_mode

logger = logging.getLogger(__name__)

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

An ERNIE 5.0-style decoder-only, ultra-sparse Mixture-of-Experts model trained with the `ernie5` package.

## Architecture

| | |
|---|---|
| layers | {{ layers }} |
| hidden size | {{ hidden_size }} |
| attention | {{ heads }} query heads, {{ kv_heads }} key/value heads, head dim {{ head_dim }}, Uni-RoPE (t, h, w) |
| experts | {{ experts }} routed (width {{ expert_width }}) + {{ shared }} shared, top-{{ top_k }}, auxiliary-loss-free balancing |
| parameters | {{ active }} active / {{ total }} total (embeddings excluded), {{ embedding }} embedding |
| multi-token prediction | depth {{ mtp_depth }} (training only) |
{% if elastic_source %}
## Elastic sub-model

Cut from a larger elastic-trained checkpoint: {{ elastic_source }}.
{% endif %}
## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{{ repo_id }}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}")
inputs = tokenizer("Return the", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))
```

The model code travels with the weights (`trust_remote_code=True`); with the `ernie5` package installed,
`import modeling_ernie5` registers the classes and no remote code is needed.
{% if results %}
## Evaluation

| metric | value |
|---|---|
{% for name, value in results.items() %}| {{ name }} | {{ value }} |
{% endfor %}{% endif %}
## Training

{{ training_summary }}

## Limitations

A research checkpoint of a small model; it has not been evaluated for safety and should not be deployed to
end users without further work.
"""


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def build_model_card(
    model_dir: str | os.PathLike,
    repo_id: str | None = None,
    results: dict[str, float] | None = None,
    training_summary: str = "Trained from scratch with `training/pretrain.py`.",
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """Build a model card for a saved ernie5 checkpoint folder.

    Args:
        model_dir: folder written by `save_pretrained` (its `config.json` is read).
        repo_id: the Hub name used in the usage snippet; defaults to the folder name.
        results: metric name -> value, written as a table and as `model-index` evaluation results.
        training_summary: free text for the Training section.
        datasets: dataset identifiers for the card metadata.
    """
    from modeling_ernie5 import Ernie5Config
    from modeling_ernie5.elastic import parameter_counts

    config_path = Path(model_dir) / "config.json"
    if not config_path.exists():
        raise ValueError(f"{model_dir} has no config.json; save the model with save_pretrained first")
    config = Ernie5Config.from_pretrained(model_dir)
    counts = parameter_counts(config)
    repo_id = repo_id or Path(model_dir).resolve().name
    results = dict(results or {})
    card_data = ModelCardData(
        language="en",
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["ernie5", "moe", "mixture-of-experts", "custom_code"],
        datasets=datasets,
        model_name=repo_id,
        eval_results=[
            EvalResult(
                task_type="text-generation",
                dataset_type=(datasets or ["local"])[0],
                dataset_name=(datasets or ["local"])[0],
                metric_type=name,
                metric_value=float(value),
            )
            for name, value in results.items()
        ]
        or None,
    )
    source = getattr(config, "elastic_source", None)
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=repo_id,
        repo_id=repo_id,
        layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        experts=config.num_experts,
        expert_width=config.moe_intermediate_size,
        shared=config.num_shared_experts,
        top_k=config.num_experts_per_tok,
        active=_human(counts["active"]),
        total=_human(counts["total"]),
        embedding=_human(counts["embedding"]),
        mtp_depth=config.num_nextn_predict_layers,
        elastic_source=json.dumps(source) if source else None,
        results=results,
        training_summary=training_summary,
    )


def write_model_card(model_dir: str | os.PathLike, **kwargs) -> Path:
    """Build the card and save it as `README.md` in the checkpoint folder."""
    path = Path(model_dir) / "README.md"
    build_model_card(model_dir, **kwargs).save(path)
    return path


def push_to_hub(model_dir: str | os.PathLike, repo_id: str, private: bool = True, token: str | None = None):
    """Upload a checkpoint folder. Offline (HF_HUB_OFFLINE=1) it logs and returns None instead of failing.

    The token comes from the argument, `HF_TOKEN`, or the cached login; it is never logged.
    """
    if is_offline_mode():
        logger.warning("HF_HUB_OFFLINE is set: %s was not pushed (the folder is complete and can be pushed later)", model_dir)
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(folder_path=str(model_dir), repo_id=repo_id)


__all__ = ["build_model_card", "push_to_hub", "write_model_card"]
