"""Cheap sanity checks of a local model folder, before anything is loaded from it.

A folder without a tokenizer or weights, or with a truncated ``.safetensors`` file, otherwise
fails deep inside transformers (or vLLM's workers) with a traceback, after the other model or
the data have been loaded. Here: the config parses, a tokenizer file and the weights are there,
every shard an index names exists, and each safetensors header is readable and matches the
file's size (the header gives the byte range of every tensor).
"""

import glob
import json
import os
import struct

from .errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
_MAX_HEADER = 100 * 1024 * 1024


def _load_json(path: str, folder: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable or not JSON ({err}); is the model folder {folder} complete?") from err


def check_safetensors(path: str) -> None:
    """The header is valid JSON and the tensors it lists end exactly at the end of the file."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise UserError(f"{path}: truncated safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, _MAX_HEADER):
                raise UserError(f"{path}: truncated or not a safetensors file (header of {length} bytes, file {size})")
            header = json.loads(fh.read(length))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: corrupt safetensors header ({err})") from err
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError) as err:
        raise UserError(f"{path}: corrupt safetensors header (bad tensor entry)") from err
    if 8 + length + end != size:
        raise UserError(f"{path}: truncated safetensors file: the header needs {8 + length + end} bytes, "
                        f"the file has {size}")


def check_model_folder(folder: str, need_tokenizer: bool = True) -> None:
    """One-line UserError for a model folder that cannot load (see the module docstring)."""
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise UserError(f"{folder}: not a model folder (no config.json)")
    _load_json(config, folder)
    if need_tokenizer and not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise UserError(f"{folder}: no tokenizer in the model folder (none of {', '.join(TOKENIZER_FILES)})")
    shards = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            weight_map = _load_json(index_path, folder).get("weight_map") or {}
            missing = sorted(f for f in set(weight_map.values()) if not os.path.isfile(os.path.join(folder, f)))
            if missing:
                raise UserError(f"{index_path}: names weight file(s) missing from the folder: {', '.join(missing[:3])}")
    if not shards and not glob.glob(os.path.join(folder, "pytorch_model*.bin")):
        raise UserError(f"{folder}: no weights in the model folder (no *.safetensors or pytorch_model*.bin)")
    for shard in shards:
        check_safetensors(shard)
