"""The one owner of the names that tie the stages together, and of the check on names users give.

    stage 1   {raw}/{dataset}/{model}_{total}docs_{position}.jsonl.gz (+ .summary.json)
    stage 2   {model}_{total}total_docs_{filter|nofilter}_{K}random_{strengthen}strengthen_{N}
    stage 3   {stage-2 dataset}_kd{a}_lm{b}_rank{c}_adaptive{d}_{perserve}
    stage 4   {output}/{dataset}/{label}/predictions_{total}docs.jsonl.gz, summary_{total}docs.*

Shell scripts ask through one call, e.g. ``python -m pos2distill.names dataset --model_name M ...``
(``python -m pos2distill.names --help`` lists the names).
"""

import argparse
import math
import os
import re
import sys

from .errors import UserError, run_cli
from .flag_types import parse_float
from .output_guard import fit_name

MAX_NAME_LENGTH = 100  # room for the prefixes and suffixes above inside a 255-byte file name
LOSS_FLAGS = ("kd", "lm", "rank", "adaptive")  # --kd_coef's order, as written in checkpoint names
DEFAULT_SEED = 42  # every stage's --seed default; names of default-seed runs carry no suffix

# quantization tags at the end of GGUF file names: .Q4_1, .Q8_0, .IQ3_M, .f16, .bf16, ...
_GGUF_QUANT_SUFFIX = re.compile(r"[.-](I?Q\d\w*|[Bb]?[Ff]16|[Ff]32)$")


def check_name(value, flag: str) -> str:
    """``value`` as given for ``flag`` if it is a plain name (one path component), else a UserError.

    A name is joined into output paths: a separator, ``.``/``..`` or an absolute path would
    write outside the output folder."""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{flag}: the name is empty")
    bad = "/" in value or "\\" in value or (os.altsep and os.altsep in value) or value in {".", ".."}
    if bad or os.path.isabs(value) or any(ord(c) < 32 for c in value):
        raise UserError(f"{flag} {value!r}: must be a plain name (no path separators, '.', '..' or control "
                        f"characters); it names a file or folder inside the output folder")
    if len(value) > MAX_NAME_LENGTH:
        raise UserError(f"{flag}: the name is {len(value)} characters long, at most {MAX_NAME_LENGTH}")
    return value


def check_names(args: argparse.Namespace, *flags: str) -> None:
    """``check_name`` for each given flag of ``args`` (``--dataset_name``; a list flag: each item)."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None:
                check_name(item, flag)


def gguf_stem(path: str) -> str:
    """Qwen2.5-Coder-0.5B-Instruct.Q8_0.gguf -> Qwen2.5-Coder-0.5B-Instruct (dots in names kept)."""
    base = os.path.basename(path)
    base = base[: -len(".gguf")] if base.endswith(".gguf") else base
    return _GGUF_QUANT_SUFFIX.sub("", base)


def model_name(name_or_path: str) -> str:
    """Short name of ``--model`` in output file names (last path component, no GGUF suffix)."""
    base = os.path.basename(os.path.normpath(name_or_path))
    return gguf_stem(base) if base.endswith(".gguf") else base


def seed_suffix(seed: int) -> str:
    """``_seed{N}`` when ``seed`` is not the default: runs of several seeds do not overwrite each other,
    and names of default-seed runs stay as they were."""
    return "" if seed == DEFAULT_SEED else f"_seed{seed}"


def stage1_file(raw_dir: str, dataset: str, model: str, total_docs: int, position, seed: int = DEFAULT_SEED) -> str:
    """Stage 1's answers; ``position="*"`` gives the pattern stage 2 looks for."""
    return os.path.join(raw_dir, dataset, f"{model}_{total_docs}docs_{position}{seed_suffix(seed)}.jsonl.gz")


def stage1_summary(path: str) -> str:
    stem = path[: -len(".jsonl.gz")] if path.endswith(".jsonl.gz") else path
    return stem + ".summary.json"


def dataset_name(model: str, total_docs: int, k: int, strengthen: int, n: int, filtered: bool = True,
                 seed: int = DEFAULT_SEED) -> str:
    """Stage 2's dataset folder ("nofilter" when examples were not selected for correct answers)."""
    kind = "filter" if filtered else "nofilter"
    return f"{model}_{total_docs}total_docs_{kind}_{k}random_{strengthen}strengthen_{n}{seed_suffix(seed)}"


def parse_kd_coef(text: str) -> tuple:
    """``--kd_coef a,b,c,d``: four finite non-negative numbers, not all zero."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(parse_float(p) for p in parts)  # float() would read 1_0 as 10
    except ValueError:
        values = ()
    if len(values) != 4 or any(not math.isfinite(v) or v < 0 for v in values):
        raise UserError(
            f"--kd_coef must be four non-negative numbers a,b,c,d (kd,lm,rank,adaptive), got {text!r}"
        )
    if not any(values):
        raise UserError(f"--kd_coef {text!r}: all four coefficients are zero, nothing to train")
    return values


def checkpoint_name(dataset: str, kd_coef: tuple, perserve: float, seed: int = DEFAULT_SEED) -> str:
    """Stage 3's saved folder, from the stage-2 dataset (name or path) and the loss mix."""
    basename = os.path.basename(os.path.normpath(dataset))
    mix = "_".join(f"{name}{float(value)}" for name, value in zip(LOSS_FLAGS, kd_coef))
    return f"{basename}_{mix}_{float(perserve)}{seed_suffix(seed)}"


def eval_dir(output: str, dataset: str, label: str) -> str:
    return os.path.join(output, dataset, label)


def predictions_file(out_dir: str, total_docs: int) -> str:
    return os.path.join(out_dir, f"predictions_{total_docs}docs.jsonl.gz")


def summary_prefix(out_dir: str, total_docs: int) -> str:
    """Stage 4's per-model summary, written as PREFIX.json, .csv and .md."""
    return os.path.join(out_dir, f"summary_{total_docs}docs")


def overlay_prefix(output: str, dataset: str, total_docs: int, labels: list[str]) -> str:
    """Stage 4's table and plot of all the models of one run."""
    # many or long labels: a name too long for the file system is shortened with a hash of the whole
    return os.path.join(output, dataset, fit_name(f"positions_{total_docs}docs_" + "_vs_".join(labels)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pos2distill.names", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    names = parser.add_subparsers(dest="name", required=True)
    model = names.add_parser("model", help="the short name of --model (stage 1's file, stage 2's --model_name)")
    model.add_argument("--model", required=True, help="folder, hub id or .gguf file")
    data = names.add_parser("dataset", help="stage 2's dataset folder name")
    data.add_argument("--model_name", required=True, help="the name stage 1 used (see: model)")
    data.add_argument("--total_doc", type=int, required=True, help="documents per prompt")
    data.add_argument("--position_sample_num", type=int, required=True, help="K trivial positions per example")
    data.add_argument("--strengthen", type=int, required=True, help="anchor copies per example")
    data.add_argument("--example_num", type=int, required=True, help="examples kept")
    data.add_argument("--no_filter", action="store_true", help="the unfiltered control (default: filtered)")
    data.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"stage 2's --seed (default {DEFAULT_SEED})")
    ckpt = names.add_parser("checkpoint", help="stage 3's checkpoint folder name")
    ckpt.add_argument("--dataset", required=True, help="stage-2 dataset name or folder")
    ckpt.add_argument("--kd_coef", required=True, help="a,b,c,d as given to kd/train_kd.py")
    ckpt.add_argument("--perserve", type=float, default=1.0, help="anchor weight (default 1.0)")
    ckpt.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"stage 3's --seed (default {DEFAULT_SEED})")
    check = names.add_parser("check", help="exit 2 with an error unless VALUE is a plain name")
    check.add_argument("--flag", required=True, help="the flag or variable named in the error")
    check.add_argument("value", help="the name to check")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.name == "model":
        print(model_name(args.model))
    elif args.name == "dataset":
        check_name(args.model_name, "--model_name")
        print(dataset_name(args.model_name, args.total_doc, args.position_sample_num, args.strengthen,
                           args.example_num, filtered=not args.no_filter, seed=args.seed))
    elif args.name == "checkpoint":
        print(checkpoint_name(args.dataset, parse_kd_coef(args.kd_coef), args.perserve, args.seed))
    else:
        check_name(args.value, args.flag)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
