"""Convert a checkpoint saved before the (E, out, in) expert layout into the current one.

Until `expert_weight_layout` appeared in config.json, `experts.gate_up_proj` was stored (E, D, 2F) and
`experts.down_proj` (E, F, D). This rewrites such a folder: the two tensors of every MoE layer (and MTP block) are
transposed, the model is rebuilt with this package's classes and saved again, so the folder gets current weights,
config and remote code. Other files (tokenizer, processor, generation config, model card) are copied as they are.

    python -m modeling_ernie5.convert_expert_layout OLD_DIR NEW_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .configuration_ernie5 import EXPERT_WEIGHT_LAYOUT, Ernie5Config

EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj")
# Written by save_pretrained itself: weights, config and the modeling code.
REWRITTEN = ("config.json", "model.safetensors", "model.safetensors.index.json")


def _load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    single = folder / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"no model.safetensors (or index) in {folder}")
    return load_file(single)


def convert(src: str | Path, dst: str | Path) -> Path:
    """Write the current-layout version of the old checkpoint folder `src` to `dst` (a new folder)."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("write the converted checkpoint to a new folder (the source is kept untouched)")
    config_dict = json.loads((src / "config.json").read_text())
    if config_dict.get("model_type") != "ernie5":
        raise ValueError(f"{src} holds a {config_dict.get('model_type')!r} model, not ernie5")
    if "expert_weight_layout" in config_dict:
        raise ValueError(f"{src} already records expert_weight_layout={config_dict['expert_weight_layout']!r}")
    config_dict["expert_weight_layout"] = EXPERT_WEIGHT_LAYOUT
    config_dict.pop("auto_map", None)  # rewritten by save_pretrained for the current code
    config = Ernie5Config.from_dict(config_dict)

    state = _load_state_dict(src)
    converted = 0
    for name in list(state):
        if name.endswith(EXPERT_TENSORS):
            state[name] = state[name].transpose(1, 2).contiguous()
            converted += 1
    if not converted:
        raise ValueError(f"{src} has no {' / '.join(EXPERT_TENSORS)} tensors to convert")

    import modeling_ernie5  # registers the classes named in config.architectures

    architecture = (config.architectures or ["Ernie5ForCausalLM"])[0]
    model_class = getattr(modeling_ernie5, architecture)
    model = model_class(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output weights and non-persistent buffers may be absent from the file; anything else is an error.
    tied = getattr(model, "_tied_weights_keys", None) or {}
    missing = [k for k in missing if k not in tied and not k.endswith("expert_load")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {architecture}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    for path in src.iterdir():
        keep = path.is_file() and path.name not in REWRITTEN and not path.name.endswith((".py", ".safetensors"))
        if keep and not (dst / path.name).exists():
            shutil.copy2(path, dst / path.name)
    print(f"converted {converted} expert tensors of {src} -> {dst}")
    return dst


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", help="checkpoint folder saved before the (E, out, in) expert layout")
    parser.add_argument("dst", help="new folder for the converted checkpoint")
    args = parser.parse_args(argv)
    convert(args.src, args.dst)


if __name__ == "__main__":
    main()
