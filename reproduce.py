"""Run a named experiment of the paper end to end: stage 1 once, stage 2 + training per row and
seed, stage 4 of every row, paired comparisons with base, and the table beside the paper's.

    python reproduce.py list                       # the experiments and variants
    python reproduce.py table3 --model Qwen/Qwen1.5-7B-Chat \\
        --data qa_data/nq-open-20_total_documents.jsonl.gz [--gpus 0,1,2,3] [--dry_run]
    python reproduce.py pine --model M --data D [--p2d_checkpoint PATH]   # base, PINE, Pos2Distill, both

Steps are scheduled over the GPUs (--gpus, default CUDA_VISIBLE_DEVICES, else every GPU
nvidia-smi lists, else the CPU), one step per GPU at a time. Run it again to resume: steps
done with the same config are skipped, a step whose config changed is refused, and a step whose
outputs are gone is rerun only if something still to run needs them (so steps/, evaluate/ and
compare/ copied to another machine, without checkpoints, resume there without retraining). Everything goes
under --out: logs/STEP.log, steps/STEP.json (done markers), evaluate/, compare/, table.md.
Two experiments run with the same --out share their common steps (stage 1, p2d's trainings).
The experiments are defined in pos2distill/experiments.py.
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time

from pos2distill import experiments
from pos2distill.cli_args import dataset_name_from_path
from pos2distill.errors import PAUSED_EXIT, UserError, run_cli
from pos2distill.generation.backend_config import resolve_backend_name
from pos2distill.experiment_table import BENCH_FILE, comparison_prefix, write_table
from pos2distill.lanes import Step, finished_steps, process_launcher, run_steps, unneeded_steps
from pos2distill.names import (DEFAULT_SEED, check_name, checkpoint_name, dataset_name, eval_dir, model_name,
                               parse_kd_coef, predictions_file)

ROOT = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["list", *experiments.EXPERIMENTS], help="what to run (list: show them)")
    p.add_argument("--model", help="base model: folder, hub id or .gguf file")
    p.add_argument("--data", help="training and evaluation examples (e.g. nq-open-20_total_documents.jsonl.gz)")
    p.add_argument("--out", default=None, help="output folder (default: runs/EXPERIMENT_MODELNAME)")
    p.add_argument("--dataset_name", default=None, help="short name of --data (default: from its file name)")
    p.add_argument("--total_doc", type=int, default=20, help="documents per prompt in --data (default 20)")
    p.add_argument("--rows", default=None, help="comma list: only these rows of the experiment (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="trainings per trained row, seeds SEED, SEED+1, ... (default 3)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"first training seed; stage 1 and 4 seed (default {DEFAULT_SEED})")
    p.add_argument("--positions", default="paper",
                   help="--data's evaluated positions: paper (0,5,10,15,last), all, every5, or a list (default paper)")
    lanes = p.add_argument_group("GPUs")
    lanes.add_argument("--gpus", default=None, help="GPU ids, e.g. 0,1,2,3 (default: the visible GPUs, else the CPU)")
    lanes.add_argument("--train_gpus", type=int, default=1, help="GPUs per training (default 1)")
    lanes.add_argument("--eval_gpus", type=int, default=1, help="GPUs per evaluation, data parallel (default 1)")
    lanes.add_argument("--port", type=int, default=29500, help="first DeepSpeed MASTER_PORT (default 29500)")
    lanes.add_argument("--stop_after", type=float, default=None, metavar="SECONDS",
                       help="start no step after this many seconds; a training still running then pauses into a "
                            "checkpoint at its next optimizer step; exit status 75: run the same command again to "
                            "go on (default: run to the end)")
    s1 = p.add_argument_group("stage 1")
    s1.add_argument("--gold_doc", default="auto", help="advantageous position: auto (probed) or an index (default auto)")
    s1.add_argument("--limit", type=int, default=None, help="stage 1 on the first N questions only (default: all)")
    s1.add_argument("--probe_num", type=int, default=None,
                    help="--gold_doc auto: questions probed (default: stage 1's, 300)")
    s1.add_argument("--stage1_batch", type=int, default=128, help="stage 1 batch size (default 128)")
    s2 = p.add_argument_group("stage 2 and 3")
    s2.add_argument("--num", type=int, default=400, help="training examples (default 400)")
    s2.add_argument("--k", type=int, default=4, help="trivial positions per example (default 4)")
    s2.add_argument("--lr", default="3e-6", help="learning rate (default 3e-6, the reference)")
    s2.add_argument("--epochs", type=int, default=1, help="epochs (default 1)")
    s2.add_argument("--train_batch", type=int, default=32, help="global batch (default 32)")
    s2.add_argument("--micro_batch", type=int, default=None, help="per GPU (default: train_batch / train_gpus)")
    s2.add_argument("--max_len", type=int, default=8192, help="longest training sequence (default 8192)")
    s2.add_argument("--perserve", type=float, default=1.0, help="anchor weight of the adaptive loss (default 1.0)")
    s2.add_argument("--train_env", action="append", default=[], metavar="VAR=VALUE",
                    help="more train_nq.sh settings, e.g. GRAD_CKPT=0 or PACKING=0 (repeatable)")
    s2.add_argument("--p2d_checkpoint", default=None, metavar="PATH",
                    help="a trained Pos2Distill folder: the p2d rows evaluate it once, no stages 1-3 for them "
                         "(default: train p2d per seed)")
    s4 = p.add_argument_group("stage 4")
    s4.add_argument("--eval_num", type=int, default=500, help="the last N questions, held out of stage 1 (default 500)")
    s4.add_argument("--eval_batch", type=int, default=256, help="stage 4 batch size (default 256)")
    s4.add_argument("--pine_batch", type=int, default=16,
                    help="stage 4 batch size of PINE rows: slower and more memory than plain (default 16)")
    s4.add_argument("--positions_per_call", type=int, default=4, help="positions per generate call (default 4)")
    s4.add_argument("--backend", default="auto",
                    help="stage 1 and 4 backend: auto (vLLM on a GPU when it imports, else hf; resolved when the steps "
                         "are planned, so their configs say which ran), vllm or hf (default auto)")
    s4.add_argument("--max_new_tokens", type=int, default=None, help="stage 1 and 4 (default: theirs, 100)")
    s4.add_argument("--kv_data", default=None, help="kv experiment: kv-retrieval-K_keys file (prepare_data.py kv)")
    s4.add_argument("--kv_keys", type=int, default=75, help="keys per --kv_data record (default 75)")
    s4.add_argument("--oracle", default=None, help="docs experiment: nq-open-oracle.jsonl.gz to build NQ-K from")
    bench = p.add_argument_group("pine experiment: benchmarks/bench_pine.py on --model, the last questions")
    bench.add_argument("--bench_num", type=int, default=100, help="questions, each at positions 0 and last (default 100)")
    bench.add_argument("--bench_batch", type=int, nargs="+", default=[8, 32], help="batch sizes measured (default 8 32)")
    p.add_argument("--dry_run", action="store_true", help="print the steps and whether each is done; run nothing")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def list_experiments() -> str:
    lines = ["experiments:"]
    lines += [f"  {name:8} {e['about']}; rows {', '.join(e['rows'])}" for name, e in experiments.EXPERIMENTS.items()]
    lines += ["variants:"]
    lines += [f"  {name:13} kd_coef {v['kd_coef']}, strengthen {v['strengthen']}: {v['title']}"
              for name, v in experiments.VARIANTS.items()]
    lines += ["inference rows:"]
    lines += [f"  {name:13} {r['model']}'s models, --inference {r['inference']}: {r['title']}"
              for name, r in experiments.INFERENCE_ROWS.items()]
    return "\n".join(lines)


def visible_gpus(flag):
    if flag:
        return [g.strip() for g in flag.split(",") if g.strip()]
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()] or ["cpu"]
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.splitlines()
        return [str(i) for i, line in enumerate(listed) if line.startswith("GPU ")] or ["cpu"]
    return ["cpu"]


def eval_sets(args, spec, dataset):
    """(set id, data file, dataset name, documents, --positions, batch, prepare step or None)."""
    sets = []
    for name in spec["evals"]:
        if name == "train":
            sets.append((f"{dataset}{args.total_doc}", args.data, dataset, args.total_doc,
                         experiments.positions_for(args.positions, args.total_doc), args.eval_batch, None))
        elif name == "kv":
            if not args.kv_data:
                raise UserError("--kv_data: the kv experiment needs a key-value file (prepare_data.py kv writes one)")
            sets.append((f"kv{args.kv_keys}", os.path.abspath(args.kv_data), "kv", args.kv_keys,
                         experiments.positions_for("every5", args.kv_keys), args.eval_batch // 2, None))
        else:  # nqK, built from the oracle file
            if not args.oracle:
                raise UserError(f"--oracle: the {args.experiment} experiment builds NQ sets from nq-open-oracle.jsonl.gz")
            k = int(name[2:])
            data = os.path.join(args.out, "qa_data", f"nq-open-{k}_total_documents.jsonl.gz")
            prepare = Step(f"prepare-{name}", [PY, "prepare_data.py", "nq", "--oracle", os.path.abspath(args.oracle),
                                               "--total_doc", str(k), "--output", data], outputs=(data,))
            sets.append((name, data, "nq", k, experiments.positions_for("all" if k <= 30 else "every5", k),
                         args.eval_batch if k <= 30 else args.eval_batch // 2, prepare))
    return sets


def training_steps(args, variant, seed, stage1, dataset, model):
    """Stage 2 and stage 3 of one row and seed; returns (steps, checkpoint folder, stage-2 folder)."""
    v = experiments.VARIANTS[variant]
    filtered = v.get("filter", True)
    data_dir = os.path.join(args.out, "data", f"seed{seed}")
    folder = os.path.join(data_dir, dataset_name(model, args.total_doc, args.k, v["strengthen"], args.num, filtered,
                                                seed=seed))
    stage2 = Step(f"stage2-{v['strengthen']}strengthen-{'filter' if filtered else 'nofilter'}-seed{seed}",
                  [PY, "create_datasets.py", "--model_name", model, "--dataset_name", dataset,
                   "--total_doc", str(args.total_doc), "--position_sample_num", str(args.k),
                   "--strengthen", str(v["strengthen"]), "--example_num", str(args.num), "--seed", str(seed),
                   "--raw_data_dir", os.path.join(args.out, "raw_data"), "--output_dir", data_dir]
                  + ([] if filtered else ["--no_filter"]), needs=(stage1.id,), outputs=(folder,))
    save = os.path.join(args.out, "checkpoints", f"{variant}-seed{seed}")
    ckpt = os.path.join(save, checkpoint_name(folder, parse_kd_coef(v["kd_coef"]), args.perserve, seed))
    own_ckpt = os.path.join(save, "_deepspeed_ckpt")
    env = {"MODEL": args.model, "DATASET": folder, "DATA_ROOT": data_dir, "DATASET_NAME": dataset,
           "SAVE_PATH": save, "CKPT_PATH": own_ckpt,
           "TENSORBOARD": os.path.join(args.out, "tensorboard"), "KD_COEF": v["kd_coef"], "LR": args.lr,
           "PERSERVE": str(args.perserve), "EPOCHS": str(args.epochs), "TRAIN_BATCH": str(args.train_batch),
           "MICRO_BATCH": str(args.micro_batch or max(1, args.train_batch // args.train_gpus)),
           "MAX_LEN": str(args.max_len), "NUM_GPUS": str(args.train_gpus), "TEACHER_OFFLOAD": "0"}
    given = train_env(args.train_env)
    env.update(given)
    # a paused training resumes from CKPT_PATH (train_nq.sh: LOAD_CHECKPOINT, STOP_AT from the driver's env)
    train = Step(f"train-{variant}-seed{seed}", ["bash", os.path.join(ROOT, "train_nq.sh"), "--seed", str(seed)],
                 gpus=args.train_gpus, needs=(stage2.id,), env=env, outputs=(os.path.join(ckpt, "kd_args.json"),),
                 port=True, scratch=checkpoint_scratch(own_ckpt, given))
    return [stage2, train], ckpt, folder


def train_env(items) -> dict:
    """--train_env VAR=VALUE items as a dict."""
    env = {}
    for item in items:
        var, eq, value = item.partition("=")
        if not eq or not var.isidentifier():
            raise UserError(f"--train_env {item!r}: expected VAR=VALUE")
        env[var] = value
    return env


def checkpoint_scratch(own_ckpt: str, given: dict) -> tuple:
    """What a finished training may have removed: only the checkpoint folder reproduce.py chose
    under --out; a CKPT_PATH the user gave (``.``, SAVE_PATH, their own folder) may hold their data."""
    return () if "CKPT_PATH" in given else (own_ckpt,)


def eval_step(args, label, model_path, evalset, needs, train_dataset=None, inference="plain"):
    set_id, data, dataset, total, positions, batch, _ = evalset
    plain = inference == "plain"  # else PINE: hf backend, one GPU, its own batch (eval_data.py refuses more)
    if not plain:
        batch = max(1, args.pine_batch * batch // args.eval_batch)  # sets of longer prompts halve both
    gpus = args.eval_gpus if plain else 1
    out_dir = eval_dir(os.path.join(args.out, "evaluate"), dataset, label)
    argv = [PY, "eval_data.py", "--input-path", data, "--model", model_path, "--label", label,
            "--dataset_name", dataset, "--output-path", os.path.join(args.out, "evaluate"), "--total_doc", str(total),
            "--sample_num", str(args.eval_num), "--positions", positions, "--positions_per_call",
            # PINE: one position per call, so each is a chunk a cut run keeps (its batches gain nothing from more)
            str(args.positions_per_call if plain else 1), "--backend", args.backend if plain else "hf", "--batch_size", str(batch),
            "--num_gpus", str(gpus), "--seed", str(args.seed)]
    argv += ["--compact_finished"] if plain else ["--inference", inference]
    argv += ["--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens else []
    argv += ["--train_dataset", train_dataset] if train_dataset else []
    return Step(f"eval-{label}-{set_id}", argv, gpus=gpus, needs=tuple(needs),
                outputs=(predictions_file(out_dir, total),), final=True)  # the table reads it


def row_model(row: str) -> str:
    """The row whose models ``row`` evaluates: itself, or an inference row's."""
    return experiments.INFERENCE_ROWS.get(row, {}).get("model", row)


def plan(args):
    """Every step of the experiment in the order they should start, the evaluation sets, the
    table's (row, label) runs and the (reference, label) pairs compared."""
    spec = experiments.EXPERIMENTS[args.experiment]
    rows = spec["rows"] if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    known = ["base", *experiments.VARIANTS, *experiments.INFERENCE_ROWS]
    unknown = [r for r in rows if r not in known]
    if unknown or not rows:
        raise UserError(f"--rows: unknown rows {unknown} (rows: {', '.join(known)})")
    trained = list(dict.fromkeys(row_model(r) for r in rows if row_model(r) != "base"))
    given = {"p2d": args.p2d_checkpoint} if args.p2d_checkpoint else {}  # variant -> checkpoint, not trained
    if args.p2d_checkpoint and "p2d" not in trained:
        raise UserError(f"--p2d_checkpoint: no row of {args.experiment} evaluates p2d (rows: {', '.join(rows)})")
    dataset = check_name(args.dataset_name or dataset_name_from_path(args.data), "--dataset_name")
    model = check_name(model_name(args.model), "--model (its name)")
    sets = eval_sets(args, spec, dataset)
    steps = [s[6] for s in sets if s[6]]
    stage1 = Step("stage1", [PY, "gen_advantageous_pos_for_R1.py", "--input-path", args.data, "--model", args.model,
                             "--output-path", os.path.join(args.out, "raw_data"), "--dataset_name", dataset,
                             "--total_doc", str(args.total_doc), "--gold_doc", args.gold_doc,
                             "--eval_holdout", str(args.eval_num), "--backend", args.backend,
                             "--batch_size", str(args.stage1_batch), "--seed", str(args.seed)]
                  + (["--probe_num", str(args.probe_num)] if args.probe_num else [])
                  + (["--limit", str(args.limit)] if args.limit else [])
                  + (["--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens else []), gpus=1)
    if any(v not in given for v in trained):
        steps.append(stage1)
    runs = {"base": [("base", args.model, [], None)]}  # model row -> (label, model, steps needed, train data)
    for variant in trained:
        if variant in given:
            runs[variant] = [(variant, given[variant], [], None)]
            continue
        runs[variant] = []
        for seed in (args.seed + i for i in range(args.seeds)):
            more, ckpt, folder = training_steps(args, variant, seed, stage1, dataset, model)
            steps += [s for s in more if s.id not in {x.id for x in steps}]  # stage 2 is shared by rows
            # the evaluation reads the training's checkpoint and stage 2's folder (its questions are kept out)
            runs[variant].append((f"{variant}-seed{seed}", ckpt, [more[0].id, more[1].id], folder))
    labels, pairs, evals = [], [], []
    for row in rows:
        source = row_model(row)
        inference = experiments.INFERENCE_ROWS.get(row, {}).get("inference", "plain")
        for source_label, path, needs, folder in runs[source]:
            label = row + source_label[len(source):]  # p2d-seed42 -> p2d_pine-seed42, base -> pine
            labels.append((row, label))
            evals += [eval_step(args, label, path, s, needs + ([s[6].id] if s[6] else []), folder, inference)
                      for s in sets]
            if row != "base" and "base" in rows:
                pairs.append(("base", label))
            if source not in ("base", row) and source in rows:  # p2d vs p2d_pine, seed by seed
                pairs.append((source_label, label))
    steps += evals + [compare_step(args, ref, label, s) for ref, label in pairs for s in sets]
    if spec.get("bench") and any(r in experiments.INFERENCE_ROWS for r in rows):
        steps.append(bench_step(args, sets[0]))
    return steps, sets, labels, pairs


def compare_step(args, ref, label, evalset):
    set_id, _, dataset, total, _, _, _ = evalset
    files = [predictions_file(eval_dir(os.path.join(args.out, "evaluate"), dataset, name), total)
             for name in (ref, label)]
    output = comparison_prefix(args.out, set_id, ref, label)
    sid = f"compare-{label}-{set_id}" if ref == "base" else f"compare-{label}-vs-{ref}-{set_id}"
    return Step(sid, [PY, "compare_predictions.py", *files, "--label", ref, label, "--output", output],
                needs=(f"eval-{ref}-{set_id}", f"eval-{label}-{set_id}"), outputs=(output + ".json",))


def bench_step(args, evalset):
    """benchmarks/bench_pine.py: PINE's prompts/s against plain inference on the base model."""
    _, data, _, total, _, _, _ = evalset
    output = os.path.join(args.out, BENCH_FILE)
    argv = [PY, os.path.join("benchmarks", "bench_pine.py"), "--model", args.model, "--data", data,
            "--total_doc", str(total), "--sample_num", str(args.bench_num), "--positions", "0,last",
            "--batch_size", *map(str, args.bench_batch), "--max_new_tokens", str(args.max_new_tokens or 100),
            "--seed", str(args.seed), "--output", output]
    return Step("bench-pine", argv, gpus=1, outputs=(output,))


def describe(step, done, unneeded=frozenset()) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in step.env.items())
    argv = [a if a != PY else "python" for a in step.argv]
    where = f"{step.gpus} GPU" if step.gpus else "CPU"
    needs = f" after {', '.join(step.needs)}" if step.needs else ""
    state = "done" if step.id in done else "not needed" if step.id in unneeded else "todo"
    return f"[{state}] {step.id} ({where}{needs})\n    {env + ' ' if env else ''}{shlex.join(argv)}"


def steps_environ(environ, stop_at) -> dict:
    """The environment every step starts from (a step's own env goes on top). Not in the steps'
    recorded configs: when to stop does not change what a step computes."""
    env = dict(environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, environ.get("PYTHONPATH")])),
               LOAD_CHECKPOINT="1")
    env.pop("STOP_AT", None)  # an outer shell's STOP_AT would pause trainings no --stop_after asked for
    if stop_at is not None:
        env["STOP_AT"] = f"{stop_at:.0f}"
    return env


def main(argv):
    args = parse_args(argv)
    if args.experiment == "list":
        print(list_experiments())
        return 0
    if not args.model or not args.data:
        raise UserError("--model and --data are required")
    if not os.path.isfile(args.data):
        raise UserError(f"--data {args.data}: no such file (prepare_data.py nq writes one)")
    for flag in ("seeds", "train_gpus", "eval_gpus", "num", "eval_num", "pine_batch", "bench_num"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if args.stop_after is not None and args.stop_after < 0:
        raise UserError(f"--stop_after must be at least 0 seconds, got {args.stop_after}")
    if min(args.bench_batch) < 1:
        raise UserError("--bench_batch: batch sizes must be at least 1")
    if args.p2d_checkpoint:
        if not os.path.isdir(args.p2d_checkpoint):
            raise UserError(f"--p2d_checkpoint {args.p2d_checkpoint}: no such folder")
        args.p2d_checkpoint = os.path.abspath(args.p2d_checkpoint)
    args.data = os.path.abspath(args.data)
    if os.path.exists(args.model):
        args.model = os.path.abspath(args.model)
    args.out = os.path.abspath(args.out or os.path.join("runs", f"{args.experiment}_{model_name(args.model)}"))
    # auto is resolved here, so the steps' recorded configs say which backend ran (a resume elsewhere
    # with another backend is refused rather than mixing vLLM and HF rows in one table)
    args.backend = resolve_backend_name(args.backend)
    steps, sets, labels, pairs = plan(args)
    done = finished_steps(steps, args.out, ROOT)
    gpus = visible_gpus(args.gpus)
    unneeded = unneeded_steps(steps, done)
    if args.dry_run:
        counts = f"{len(done)} done" + (f", {len(unneeded)} not needed" if unneeded else "")
        print(f"{len(steps)} steps ({counts}) on {'the CPU' if gpus == ['cpu'] else 'GPU ' + ','.join(gpus)}, "
              f"output {args.out}")
        print("\n".join(describe(s, done, unneeded) for s in steps))
        return 0
    os.makedirs(args.out, exist_ok=True)
    print(f"{len(steps)} steps, {len(done)} done earlier" + (f", {len(unneeded)} no longer needed (what needs them is done)"
          if unneeded else "") + f"; logs in {os.path.join(args.out, 'logs')}", flush=True)
    stop_at = None if args.stop_after is None else time.time() + args.stop_after
    env = steps_environ(os.environ, stop_at)
    status = run_steps(steps, gpus, process_launcher(args.out, ROOT, env, args.port), done=done,
                       log=lambda line: print(line, flush=True), stop_at=stop_at)
    print(write_table(args.out, args.experiment, sets, labels, pairs))
    failed = sorted(sid for sid, s in status.items() if s in ("failed", "skipped"))
    if failed:
        print(f"error: {len(failed)} steps failed or were skipped: {', '.join(failed)} (logs/STEP.log)", file=sys.stderr)
        return 1
    left = [sid for sid, s in status.items() if s in ("paused", "waiting")]
    if left:
        print(f"stopped at --stop_after: {len(left)} steps left ({sum(status[s] == 'paused' for s in left)} "
              f"paused in a checkpoint); run the same command again to go on")
        return PAUSED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
