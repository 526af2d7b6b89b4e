"""Publishing ernie5 checkpoints: a model card written from the checkpoint itself, and an offline-safe push.

The card's facts (architecture, active/total parameters, what a sub-model was cut from, evaluation numbers)
are read from the saved config and from the results a caller passes, never typed by hand. Nothing here sends a
request unless `push_to_hub` is called with the Hub reachable; in offline mode it says so and returns.
"""

from __future__ import annotations

import logging
import os
from fnmatch import fnmatch
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

Cut from {{ elastic_source.parent }} without retraining: {{ elastic_source.layers }} of {{ elastic_source.parent_layers }}
layers, {{ elastic_source.experts }} of {{ elastic_source.parent_experts }} experts (chosen by {{ elastic_source.chosen_by }}),
top-{{ top_k }} of {{ elastic_source.parent_top_k }}; {{ elastic_source.active }} of the parent's active and
{{ elastic_source.total }} of its total parameters. The kept layer and expert indices are in `config.json`
(`elastic_source`).
{% endif %}
## Usage

```python
from transformers import {{ auto_class }}, AutoTokenizer

model = {{ auto_class }}.from_pretrained("{{ repo_id }}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}")
inputs = tokenizer("Return the", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))
```
{% if multimodal %}
Images go through `Ernie5Processor`, which expands each image into its placeholder tokens and returns
`pixel_values`: `AutoProcessor.from_pretrained("{{ repo_id }}", trust_remote_code=True)` when the processor was saved
with the model (its code travels with it), else from the `ernie5` package (`processing/processing_ernie5.py`).
{% endif %}
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


def _is_hub_id(name: str) -> bool:
    """`owner/name` that is not a folder on this machine: a parent worth linking as `base_model`."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def _submodel_summary(source: dict) -> dict:
    """What the card says about a cut sub-model; a local parent path is not published, only its folder name."""
    parent = source.get("parent_name_or_path") or "its parent"
    if parent != "its parent" and not _is_hub_id(parent):
        parent = f"a local checkpoint (`{Path(parent).name}`)"
    experts = source.get("experts")
    kept_experts = len(next(iter(experts.values()))) if experts else source["parent_num_experts"]
    return {
        "parent": parent,
        "layers": len(source["layers"]),
        "parent_layers": source["parent_num_hidden_layers"],
        "experts": kept_experts,
        "parent_experts": source["parent_num_experts"],
        "chosen_by": source.get("experts_chosen_by") or "none cut",
        "parent_top_k": source["parent_num_experts_per_tok"],
        "active": f"{source['active_params'] / source['parent_active_params']:.0%}",
        "total": f"{source['total_params'] / source['parent_total_params']:.0%}",
    }


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
    eval_dataset: str | None = None,
) -> ModelCard:
    """Build a model card for a saved ernie5 checkpoint folder.

    Args:
        model_dir: folder written by `save_pretrained` (its `config.json` is read).
        repo_id: the Hub name used in the usage snippet; defaults to the folder name.
        results: metric name -> value, written as a table; also as `model-index` evaluation results when
            `eval_dataset` names the dataset they were measured on (the Hub's metadata needs one).
        training_summary: free text for the Training section.
        datasets: identifiers of the training datasets, for the card metadata.
        license: the card's license identifier.
        eval_dataset: Hub identifier of the dataset behind `results`.
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
    multimodal = "Ernie5ForConditionalGeneration" in (config.architectures or [])
    task = "image-text-to-text" if multimodal else "text-generation"
    source = getattr(config, "elastic_source", None)
    parent = (source or {}).get("parent_name_or_path") or None
    card_data = ModelCardData(
        language="en",
        license=license,
        library_name="transformers",
        pipeline_tag=task,
        tags=["ernie5", "moe", "mixture-of-experts", "custom_code"],
        datasets=datasets,
        base_model=parent if parent and _is_hub_id(parent) else None,
        model_name=repo_id,
        eval_results=[
            EvalResult(
                task_type=task,
                dataset_type=eval_dataset,
                dataset_name=eval_dataset,
                metric_type=name,
                metric_value=float(value),
            )
            for name, value in results.items()
        ]
        if eval_dataset
        else None,
    )
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
        elastic_source=_submodel_summary(source) if source else None,
        auto_class="AutoModelForImageTextToText" if multimodal else "AutoModelForCausalLM",
        multimodal=multimodal,
        results=results,
        training_summary=training_summary,
    )


def write_model_card(model_dir: str | os.PathLike, **kwargs) -> Path:
    """Build the card and save it as `README.md` in the checkpoint folder."""
    path = Path(model_dir) / "README.md"
    build_model_card(model_dir, **kwargs).save(path)
    return path


# What a checkpoint repo holds: weights, configs, tokenizer files, the model code and the card, at the folder's top
# level. A training run's folder also holds checkpoint-N/ (optimizer states), TensorBoard runs/, the run's tokenizer
# copy, pickled trainer arguments and plots: none of that is published.
PUBLISHED_PATTERNS = ("*.safetensors", "*.json", "*.py", "*.jinja", "*.txt", "*.model", "README.md")


def publishable_files(model_dir: str | os.PathLike) -> list[str]:
    """Names of the top-level files of `model_dir` that `push_to_hub` uploads and the Space build copies."""
    folder = Path(model_dir)
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder} is not a saved checkpoint (no config.json); save it with save_pretrained first")
    return sorted(
        p.name for p in folder.iterdir() if p.is_file() and any(fnmatch(p.name, pat) for pat in PUBLISHED_PATTERNS)
    )


def push_to_hub(model_dir: str | os.PathLike, repo_id: str, private: bool = True, token: str | None = None):
    """Upload a checkpoint folder's `publishable_files`. Offline (HF_HUB_OFFLINE=1) it logs and returns None.

    The token comes from the argument, `HF_TOKEN`, or the cached login; it is never logged.
    """
    files = publishable_files(model_dir)
    if is_offline_mode():
        logger.warning("HF_HUB_OFFLINE is set: %s was not pushed (the folder is complete and can be pushed later)", model_dir)
        return None
    from huggingface_hub import HfApi, get_token

    if token is None and get_token() is None:
        raise ValueError("no Hugging Face token: pass token=..., set HF_TOKEN, or run `hf auth login`")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, allow_patterns=files)


__all__ = ["PUBLISHED_PATTERNS", "build_model_card", "publishable_files", "push_to_hub", "write_model_card"]
