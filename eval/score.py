"""Score files in the Dyn-VQA official scorer's input format, in both modes (DESIGN.md §6).

A drop-in for OmniSearch's `evaluate.py --evaluate_file_path F --lang L`: the same input (JSONL with
`prediction` and `answer`), the same printed official number, plus the clean-mode numbers and a
count of lines that the official script would crash on (null or empty `answer`, a non-string
`prediction`), which are skipped here and reported instead.

    python -m eval.score runs/base/official_input.agent.en.jsonl --lang en
"""

from __future__ import annotations

import argparse
import json

from .metrics.dynvqa_f1_recall.dynvqa_f1_recall import clean_item_scores, official_item_score


def score_file(path: str, lang: str) -> dict:
    """Official and clean F1-recall of one official-format file, with the skipped lines listed."""
    official, clean, f1, skipped = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped.append({"line": lineno, "reason": "invalid_json"})
                continue
            prediction, answers = record.get("prediction"), record.get("answer")
            if not isinstance(prediction, str):
                skipped.append({"line": lineno, "reason": "prediction_not_a_string"})
                continue
            if not isinstance(answers, list) or all(a is None for a in answers):
                skipped.append({"line": lineno, "reason": "answer_null_or_empty"})
                continue
            official.append(official_item_score(prediction, answers, lang))
            recall, token_f1 = clean_item_scores(prediction, [a for a in answers if a is not None])
            clean.append(recall)
            f1.append(token_f1)
    if not official:
        raise ValueError(
            f"{path}: no scorable lines ({len(skipped)} skipped). This scorer reads the official scorer's input "
            "(JSONL with 'prediction' and 'answer'); `eval.run` writes it as official_input.<mode>.<lang>.jsonl"
        )
    n = len(official)
    return {
        "n": n,
        "official_f1_recall": round(100 * sum(official) / n, 2),
        "clean_f1_recall": round(100 * sum(clean) / n, 2),
        "clean_token_f1": round(100 * sum(f1) / n, 2),
        "skipped": skipped,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="JSONL with 'prediction' and 'answer' per line")
    parser.add_argument("--lang", choices=("en", "zh"), required=True)
    args = parser.parse_args(argv)
    result = score_file(args.path, args.lang)
    print("Token F1-Recall: ", result["official_f1_recall"])
    print(f"clean F1-recall: {result['clean_f1_recall']}  clean token F1: {result['clean_token_f1']}  "
          f"items: {result['n']}  skipped lines: {len(result['skipped'])}")
    return result


if __name__ == "__main__":
    main()
