"""Assemble a Hugging Face Space folder from a trained checkpoint: app, requirements, Space card, model.

    python examples/space/build_space.py --model_dir outputs/demo/model --out outputs/space
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = ["torch>=2.9", "transformers==5.24.*", "gradio==6.31.*", "safetensors"]


def build_space(model_dir: str, out: str, title: str = "ernie5 demo", model_id: str | None = None) -> Path:
    from huggingface_hub import SpaceCard, SpaceCardData

    model_dir, out_dir = Path(model_dir), Path(out)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"{model_dir} is not a saved checkpoint (no config.json)")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "app.py", out_dir / "app.py")
    shutil.copytree(model_dir, out_dir / "model", dirs_exist_ok=True)
    (out_dir / "requirements.txt").write_text("\n".join(REQUIREMENTS) + "\n")
    data = SpaceCardData(
        title=title, sdk="gradio", sdk_version="6.31.0", python_version="3.11", app_file="app.py",
        license="apache-2.0", models=[model_id] if model_id else None,
    )  # fmt: skip
    SpaceCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n# {{ title }}\n", title=title).save(
        out_dir / "README.md"
    )
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="outputs/demo/model")
    parser.add_argument("--out", default="outputs/space")
    parser.add_argument("--model_id", default=None)
    args = parser.parse_args()
    print(build_space(args.model_dir, args.out, model_id=args.model_id))
