"""Command line of the MMAT engine.

    python -m processing.mmat toy --output_dir toy_data --n_items 40     # write a toy-world VQA source
    python -m processing.mmat all --inputs toy_data/toy_vqa.jsonl --output_dir mmat_out
    python -m processing.mmat rationale --config run.yaml --concurrency 4
    python -m processing.mmat all --config run.yaml --executor datatrove --tasks 4 --workers 2

Every MMATConfig field is a flag; `--config` loads a YAML file first and flags override it. Heavy imports
happen after parsing, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

from .config import MMATConfig

STAGE_COMMANDS = ("curate", "rationale", "reflection", "integrate", "all")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(MMATConfig)
    for field in dataclasses.fields(MMATConfig):
        hint = hints[field.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        kwargs: dict = {
            "default": argparse.SUPPRESS,
            "help": f"(default: {field.default if field.default is not dataclasses.MISSING else field.default_factory()})",
        }
        if typing.get_origin(base) is list:
            kwargs.update(nargs="+", type=str)
        elif base is bool:
            kwargs.update(type=_bool, metavar="BOOL")
        elif base in (int, float, str):
            kwargs.update(type=base)
        parser.add_argument(f"--{field.name}", **kwargs)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m processing.mmat",
        description="MMAT-1M data engine (curate -> rationale -> reflection -> integrate).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGE_COMMANDS:
        p = sub.add_parser(name, help=f"run {'all four stages' if name == 'all' else 'the ' + name + ' stage'}")
        p.add_argument("--config", help="YAML file with MMATConfig fields")
        _add_config_flags(p)
    toy = sub.add_parser("toy", help="write a toy-world VQA source (images + JSONL) for offline runs")
    toy.add_argument("--output_dir", required=True)
    toy.add_argument("--n_items", type=int, default=40)
    toy.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    if args.command == "toy":
        from .toy_teacher import make_toy_vqa

        print(make_toy_vqa(args.output_dir, n_items=args.n_items, seed=args.seed))
        return 0
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    config = MMATConfig.from_yaml(args.config, **overrides) if args.config else MMATConfig.from_dict(overrides)

    from .report import plot_summaries
    from .stages import ORDER, run_pipeline

    stages = ORDER if args.command == "all" else (args.command,)
    summaries = run_pipeline(config, stages)
    plot_summaries(summaries, config.output_dir)
    brief = {
        name: {k: s.get(k) for k in ("complete", "n_inputs", "finished_samples", "retry_samples", "counts", "cost")}
        for name, s in summaries.items()
    }
    print(json.dumps(brief, indent=2))
    for name, summary in summaries.items():
        if summary.get("retry_samples"):
            print(
                f"stage {name}: {summary['retry_samples']} samples failed transiently (teacher unreachable or "
                "overloaded) and were not recorded as done; rerun the same command to retry them",
                file=sys.stderr,
            )
    return 0 if all(s["complete"] for s in summaries.values()) else 3


if __name__ == "__main__":
    sys.exit(main())
