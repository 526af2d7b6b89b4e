"""Assemble a Hugging Face Space folder from a trained checkpoint: app, requirements, Space card, model.

    python examples/space/build_space.py --model_dir outputs/demo/model --out outputs/space
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # `python examples/space/build_space.py`: make the repository importable
    sys.path.insert(0, str(HERE.parents[1]))
# The Space runs the checkpoint's own copied code, so it needs these and not the ernie5 package (same bounds as
# setup.cfg).
REQUIREMENTS = ["torch>=2.9,<2.15", "transformers==5.24.*", "gradio==6.31.*", "safetensors"]


def build_space(
    model_dir: str, out: str, title: str = "ernie5 demo", model_id: str | None = None, license: str = "apache-2.0"
) -> Path:
    """Write `out/` with the app, its requirements, a Space card and the checkpoint's `publishable_files` in
    `out/model/` (weights, configs, tokenizer, model code; no optimizer states or run logs)."""
    from huggingface_hub import SpaceCard, SpaceCardData

    from training.hub import publishable_files

    files = publishable_files(model_dir)
    model_dir, out_dir = Path(model_dir), Path(out)
    (out_dir / "model").mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "app.py", out_dir / "app.py")
    for name in files:
        shutil.copy(model_dir / name, out_dir / "model" / name)
    (out_dir / "requirements.txt").write_text("\n".join(REQUIREMENTS) + "\n")
    data = SpaceCardData(
        title=title, sdk="gradio", sdk_version="6.31.0", python_version="3.11", app_file="app.py",
        license=license, models=[model_id] if model_id else None,
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
    parser.add_argument("--license", default="apache-2.0")
    args = parser.parse_args()
    print(build_space(args.model_dir, args.out, model_id=args.model_id, license=args.license))
