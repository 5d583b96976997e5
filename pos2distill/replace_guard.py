"""Replacing an output folder (stage-2 dataset, stage-3 model): never silently, never others' files.

A folder a stage writes gets a manifest, ``.pos2distill-files.json``: the files it wrote and the
arguments it was made with. Before the folder is replaced:

- made with the same arguments (a deterministic stage run again): replaced;
- otherwise: refused unless ``--overwrite``;
- even with ``--overwrite``: refused while it holds a file neither in its manifest nor of a kind
  the stage writes (a folder made before manifests existed is judged by those kinds alone).
"""

import fnmatch
import json
import os

from .errors import UserError
from .jsonl import write_text_atomic

MANIFEST = ".pos2distill-files.json"


def _files(folder: str) -> list[str]:
    found = []
    for root, _, names in os.walk(folder):
        found.extend(os.path.relpath(os.path.join(root, n), folder) for n in names)
    return sorted(found)


def read_manifest(folder: str):
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
        return manifest if isinstance(manifest, dict) else None
    except (OSError, ValueError):
        return None


def write_manifest(folder: str, writer: str, config=None) -> None:
    """Record every file now in ``folder`` (call it last, just before the folder is swapped in)."""
    config = json.loads(json.dumps(config, sort_keys=True, default=str))
    files = sorted(set(_files(folder)) | {MANIFEST})
    write_text_atomic(os.path.join(folder, MANIFEST),
                      json.dumps({"writer": writer, "config": config, "files": files}, indent=1, sort_keys=True))


def _differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))[:300]


def check_replaceable(folder: str, overwrite: bool, patterns: tuple, config=None, flag: str = "--overwrite") -> None:
    """Raise a UserError unless ``folder`` may be replaced (see the module docstring).

    ``patterns``: the top-level file names the stage writes (fnmatch), for folders without a manifest.
    """
    if not os.path.lexists(folder):
        return
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: exists and is a file, but the output here is a folder")
    manifest = read_manifest(folder) or {}
    config = json.loads(json.dumps(config, sort_keys=True, default=str))
    same = config is not None and manifest.get("config") == config
    if not same and not overwrite:
        if manifest.get("config") is not None and config is not None:
            why = f"was made with other arguments ({_differences(manifest['config'], config)})"
        else:
            why = "exists"
        raise UserError(f"{folder} {why}; pass {flag} to replace it, or choose another output")
    ours = set(manifest.get("files") or [])
    foreign = [f for f in _files(folder)
               if f not in ours and not (os.sep not in f and any(fnmatch.fnmatch(f, p) for p in patterns))]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"{folder} holds files this project did not write ({shown}); replacing the folder would "
                        f"delete them: move them away or choose another output")
