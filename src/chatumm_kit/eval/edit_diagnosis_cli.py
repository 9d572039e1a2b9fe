"""``chatumm diagnose-edits REPORT``: where each model of a ShapesChat benchmark report loses its edits.

Reads ``eval_report.json`` (or the folder that holds it) and the held-out shards it was run on (the report's
``settings.shards`` unless ``--shards`` says otherwise), and prints :class:`~.edit_diagnosis.EditDiagnosis` tables,
one per model; ``--json`` adds one JSON object of all the rates as the last line.

Example:
    >>> run(argparse.Namespace(report="runs/shapes/eval", shards=None, model=None, json=False))   # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from chatumm_kit.data.shapes import WorldConfig
from chatumm_kit.data.shards import ShardFormatError, read_samples
from chatumm_kit.eval.edit_diagnosis import diagnose_report

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", help="a benchmark report: eval_report.json, or the output_dir of chatumm eval")
    parser.add_argument("--shards", help="the held-out dialogues the report was run on (default: its settings.shards)")
    parser.add_argument("--model", action="append", help="only this model of the report (repeatable; default: all)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object of the rates, last")


def _report_file(path: str) -> Path:
    file = Path(path)
    if file.is_dir():
        file = file / "eval_report.json"
    if not file.is_file():
        raise SystemExit(f"chatumm diagnose-edits: no benchmark report at {file}")
    return file


def run(args: argparse.Namespace) -> int:
    """Print the tables (and the JSON line); returns the exit code."""
    file = _report_file(args.report)
    report = json.loads(file.read_text())
    settings = report.get("settings") or {}
    shards = args.shards or settings.get("shards")
    if not shards:
        raise SystemExit(f"chatumm diagnose-edits: {file} names no shards (settings.shards); pass --shards")
    world = WorldConfig(**(settings.get("world") or {}))
    try:
        samples = list(read_samples(shards))
    except (FileNotFoundError, ShardFormatError) as err:
        relative = not args.shards and isinstance(shards, str) and not Path(shards).is_absolute()
        where = " (the report's settings.shards, relative to the folder chatumm eval ran in)" if relative else ""
        raise SystemExit(
            f"chatumm diagnose-edits: cannot read the held-out dialogues {shards}{where}: {err}; run from that folder "
            "or pass --shards"
        ) from None
    out = {}
    for model in args.model or list(report.get("models") or {}):
        try:
            diagnosis = diagnose_report(report, samples, model=model, world=world)
        except (KeyError, ValueError) as err:
            raise SystemExit(f"chatumm diagnose-edits: {file}: {err.args[0]}") from None
        print(diagnosis.table(), end="\n\n")
        out[model] = diagnosis.to_dict()
    if args.json:
        print(json.dumps({"report": str(file), "models": out}))
    return 0
