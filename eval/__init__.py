"""Evaluation for ernie5 and MMAT-1M-tuned models (DESIGN.md §6).

- `eval.metrics.<name>`: `evaluate` modules loadable by path (Dyn-VQA token F1-recall in official
  and clean modes, VQA soft accuracy, ANLS, relaxed accuracy, multiple-choice accuracy, OCRBench).
- `eval.loaders`: Dyn-VQA releases, VLMEvalKit TSV files, datasets saved to disk.
- `eval.run`: `python -m eval.run ...` evaluates a local model (direct / agent / golden-query modes
  for Dyn-VQA, the MMAT-1M image benchmarks otherwise) and writes JSON, Markdown and a plot.
- `eval.report`: `python -m eval.report compare ...` puts runs next to the papers' numbers.
- `eval.score`: `python -m eval.score FILE --lang en` rescores official-format prediction files.
"""
