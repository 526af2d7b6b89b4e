"""Benchmark loaders: Dyn-VQA releases, VLMEvalKit TSV files, and datasets saved to disk."""

from .common import BenchmarkSample
from .dynvqa import DynVQALoadReport, DynVQASample, load_dynvqa, parse_dynvqa_filename, release_path
from .hf_disk import load_hf_disk
from .vlmeval_tsv import load_vlmeval_tsv

__all__ = [
    "BenchmarkSample",
    "DynVQALoadReport",
    "DynVQASample",
    "load_dynvqa",
    "load_hf_disk",
    "load_vlmeval_tsv",
    "parse_dynvqa_filename",
    "release_path",
]
