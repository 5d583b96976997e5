"""The JSON report a benchmark writes with ``--output``: its figures and the arguments that
produced them, written atomically (a crash leaves no half-written report)."""

import json

from pos2distill.jsonl import write_text_atomic


def library_versions() -> dict:
    """Versions that change the figures (transformers 5.17 vs 5.23 changed decoding speed 1.66x)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "deepspeed"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def write_report(path: str, report: dict, args) -> None:
    report = {**report, "versions": library_versions(),
              "args": {k: v for k, v in vars(args).items() if k != "debug"}}
    write_text_atomic(path, json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
