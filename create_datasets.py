"""Stage 2: build advantageous/trivial position pairs for distillation.

Reads the stage-1 file raw_data/{dataset}/{model}_{total_doc}docs_{pos}.jsonl.gz,
keeps the first --example_num examples whose sampled answer is correct (--no_filter:
the first ones whatever their answer, a control) and
writes a Hugging Face dataset (save_to_disk) named
{model}_{total_doc}total_docs_filter_{K}random_{strengthen}strengthen_{N}
(+ _seed{S} for a --seed other than 42) under --output_dir, with position_counts.json
(rows per gold position).
"""

import glob
import hashlib
import json
import os
import shutil
import sys

from pos2distill.cli_help import new_parser
from pos2distill.errors import UserError, run_cli
from pos2distill.flag_types import harden_numbers
from pos2distill.jsonl import iter_jsonl, remove_stale_temporaries, replace_dir, temporary_name, write_text_atomic
from pos2distill.metrics import score_prediction
from pos2distill.names import DEFAULT_SEED, check_names, dataset_name, stage1_file
from pos2distill.output_guard import claim_output, releasing_locks
from pos2distill.pairs import build_rows, position_counts, select_correct
from pos2distill.replace_guard import check_replaceable, write_manifest

# What save_to_disk writes: a dataset folder made before manifests may be replaced when it holds only these.
DATASET_FILES = ("data-*.arrow", "dataset_info.json", "state.json")


def build_parser():
    parser = new_parser(__doc__.splitlines()[0])
    parser.add_argument("--model_name", default="SmolLM2-135M-Instruct", help="model name used in stage 1's file name")
    parser.add_argument("--dataset_name", default="nq", help="stage 1's dataset folder under --raw_data_dir")
    parser.add_argument("--total_doc", type=int, default=20, help="documents per prompt, as in stage 1")
    parser.add_argument("--position_sample_num", type=int, default=4, help="K trivial positions per example")
    parser.add_argument("--strengthen", type=int, default=1, help="anchor copies at the advantageous position")
    parser.add_argument("--example_num", type=int, default=400, help="examples to keep (-1: every correct one)")
    parser.add_argument("--no_filter", action="store_true",
                        help="keep the first --example_num examples whatever their answer (a control; the dataset "
                             "name says nofilter instead of filter)")
    parser.add_argument("--input_path", default=None, help="stage-1 file (default: found under --raw_data_dir)")
    parser.add_argument("--raw_data_dir", default="raw_data", help="stage 1's --output-path")
    parser.add_argument("--output_dir", default="data", help="where the dataset folder is written")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"trivial positions and distractor shuffles (default {DEFAULT_SEED}; another seed adds "
                             "_seed{N} to the dataset name)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset of this name built from other rows (other seed or stage-1 file); "
                             "default: refuse. Files this project did not write are never deleted")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return harden_numbers(parser)


def parse_args(argv):
    return build_parser().parse_args(argv)


def find_stage1_file(args) -> str:
    if args.input_path:
        return args.input_path
    pattern = stage1_file(args.raw_data_dir, args.dataset_name, args.model_name, args.total_doc, "*")
    matches = sorted(glob.glob(pattern))
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(matches)
        raise UserError(f"need exactly one stage-1 file matching {pattern} (found {found}); pass --input_path")
    return matches[0]


def rows_fingerprint(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def save_dataset(rows: list[dict], path: str, config: dict = None) -> None:
    """save_to_disk into a temporary folder, then swap it in; fingerprint from content (reproducible)."""
    import pyarrow as pa
    from datasets import Dataset

    fingerprint = rows_fingerprint(rows)
    dataset = Dataset(pa.Table.from_pylist(rows), fingerprint=fingerprint)
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        dataset.save_to_disk(tmp)
        write_manifest(tmp, "create_datasets.py", config)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


@releasing_locks
def main(argv):
    args = parse_args(argv)
    check_names(args, "--model_name", "--dataset_name")
    source = find_stage1_file(args)
    records = [(f"{source}:{line}", record) for line, record in iter_jsonl(source)]
    kept = select_correct(records, args.example_num, args.total_doc, require_correct=not args.no_filter)
    correct = sum(bool(score_prediction(r["oracle_answer"], r["answers"])) for _, r in kept)
    rows = build_rows(kept, args.total_doc, args.position_sample_num, args.strengthen, args.seed)
    if not rows:
        raise UserError("no rows to write (K = 0 and --strengthen 0?)")
    name = dataset_name(args.model_name, args.total_doc, args.position_sample_num, args.strengthen, len(kept),
                        filtered=not args.no_filter, seed=args.seed)
    path = os.path.join(args.output_dir, name)
    claim_output(path, {"--input_path": source}, folder=True, flag="--output_dir")
    # Same rows again (a rerun): replaced by the same bytes. Other rows: only with --overwrite.
    config = {"source": os.path.abspath(source), "seed": args.seed, "rows_sha256": rows_fingerprint(rows)}
    check_replaceable(path, args.overwrite, DATASET_FILES, config)
    save_dataset(rows, path, config)
    counts = position_counts(rows, args.total_doc)
    stats = {
        "source": source, "examples_read": len(records), "examples_kept": len(kept), "kept_correct": correct,
        "filtered": not args.no_filter,
        "advantageous_position": rows[0]["teacher_gold_idx"], "rows": len(rows),
        "anchor_rows": sum(r["is_anchor"] for r in rows), "rows_per_position": counts, "seed": args.seed,
    }
    write_text_atomic(os.path.join(args.output_dir, f"{name}.position_counts.json"), json.dumps(stats, indent=1))
    print(f"kept {len(kept)} examples, {correct} with a correct answer (read {len(records)}); {len(rows)} rows, "
          f"{stats['anchor_rows']} anchors at position {stats['advantageous_position']}")
    print("rows per position: " + " ".join(f"{p}:{n}" for p, n in counts.items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
