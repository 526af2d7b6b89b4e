"""ERNIE 5.0 for transformers.

Importing this package registers the ernie5 classes with the Auto classes (so `AutoModelForCausalLM` and
friends resolve `model_type="ernie5"`), marks them for `save_pretrained` to write an `auto_map` plus the model
code (so a saved folder loads with `trust_remote_code=True` without this package), and registers the fast
expert kernels.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_ernie5 import PRESETS, Ernie5Config
from .elastic import ElasticSpec
from .modeling_ernie5 import (
    Ernie5CausalLMOutput,
    Ernie5ForCausalLM,
    Ernie5ForSequenceClassification,
    Ernie5Model,
    Ernie5ModelOutput,
    Ernie5PreTrainedModel,
)
from .moe import EXPERTS_BACKENDS, register_experts_backend
from .modeling_ernie5_vl import Ernie5ForConditionalGeneration  # registers the multimodal Auto classes

from . import kernels  # noqa: F401  (registers the fast expert back-ends)

AutoConfig.register("ernie5", Ernie5Config, exist_ok=True)
AutoModel.register(Ernie5Config, Ernie5Model, exist_ok=True)
AutoModelForCausalLM.register(Ernie5Config, Ernie5ForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(Ernie5Config, Ernie5ForSequenceClassification, exist_ok=True)

Ernie5Config.register_for_auto_class()
Ernie5Model.register_for_auto_class("AutoModel")
Ernie5ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
Ernie5ForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "EXPERTS_BACKENDS",
    "Ernie5ForConditionalGeneration",
    "PRESETS",
    "ElasticSpec",
    "Ernie5CausalLMOutput",
    "Ernie5Config",
    "Ernie5ForCausalLM",
    "Ernie5ForSequenceClassification",
    "Ernie5Model",
    "Ernie5ModelOutput",
    "Ernie5PreTrainedModel",
    "register_experts_backend",
]
