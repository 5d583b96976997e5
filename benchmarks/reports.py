"""The JSON report a benchmark writes with ``--output``: its figures and the arguments that
produced them, written atomically (a crash leaves no half-written report)."""

import json

from pos2distill.jsonl import write_text_atomic


def write_report(path: str, report: dict, args) -> None:
    report = {**report, "args": {k: v for k, v in vars(args).items() if k != "debug"}}
    write_text_atomic(path, json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
