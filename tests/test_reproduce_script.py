"""reproduce.py end to end on CPU with the tiny model: the whole Table-3 ablation (stage 1,
stage 2 per anchor setting, five trainings through train_nq.sh, six evaluations, paired
comparisons, the table beside the paper's numbers) with one seed, two CPU lanes; then a re-run
that finds every step done, and one with a changed setting that is refused."""

import json
import shutil
import os
import socket
import subprocess
import sys

from pos2distill.jsonl import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 3
ROWS = ["base", "seqkd", "kl", "align", "p2d", "kl_anchor"]


def record(i):
    ctxs = [{"title": f"Gold {i}", "text": f"The answer to question {i} is e.", "isgold": True}]
    ctxs += [{"title": f"Other {i}.{j}", "text": f"Unrelated passage {j}.", "isgold": False} for j in range(TOTAL - 1)]
    return {"question": f"what is the answer to question {i}", "answers": ["e"], "ctxs": ctxs}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reproduce(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))  # its deepspeed
    return subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def tiny_run(experiment, model, data, out):
    """reproduce.py arguments for a run at tiny sizes: 1 seed, two CPU lanes, 6 stage-1 questions,
    2 training examples, the last 4 questions evaluated, 4 new tokens."""
    return [experiment, "--model", model, "--data", str(data), "--total_doc", str(TOTAL), "--out", str(out),
            "--seeds", "1", "--gpus", "cpu,cpu", "--gold_doc", "0", "--limit", "6", "--num", "2", "--k", "2",
            "--eval_num", "4", "--train_batch", "2", "--max_len", "2048", "--max_new_tokens", "4",
            "--eval_batch", "8", "--lr", "1e-4", "--port", str(free_port())]


def test_table3_on_cpu_then_resume(tmp_path, tiny_model):
    data = tmp_path / "nq-open-3_total_documents.jsonl.gz"
    write_jsonl(str(data), [record(i) for i in range(10)])
    out = tmp_path / "out"
    args = tiny_run("table3", tiny_model, data, out)
    proc = reproduce(*args)
    logs = "".join(f"--- {f.name}\n{f.read_text()[-1500:]}" for f in (out / "logs").glob("*.log")) if proc.returncode else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    steps = sorted(p.stem for p in (out / "steps").glob("*.json"))
    # stage 1 once; one stage 2 per anchor setting; per trained row a training, an evaluation and a comparison
    assert steps.count("stage1") == 1 and len([s for s in steps if s.startswith("stage2-")]) == 2
    assert len(steps) == 1 + 2 + 5 * 3 + 1
    for variant, coef, strengthen in [("seqkd", [0, 1, 0, 0], 1), ("kl", [1, 0, 0, 0], 0), ("align", [0, 0, 0, 1], 0),
                                      ("p2d", [0, 0, 0, 1], 1), ("kl_anchor", [1, 0, 0, 0], 1)]:
        [ckpt] = (out / "checkpoints" / f"{variant}-seed42").glob("*_kd*")
        saved = json.loads((ckpt / "kd_args.json").read_text())
        assert saved["kd_coef"] == coef and saved["learning_rate"] == 1e-4 and saved["seed"] == 42
        assert f"_{strengthen}strengthen_2_kd" in ckpt.name
        compared = json.loads((out / "compare" / f"nq3-{variant}-seed42.json").read_text())
        assert compared["average"]["examples"] == 4
    assert "no overlap" in (out / "logs" / "eval-p2d-seed42-nq3.log").read_text()  # trained vs evaluated questions
    table = (out / "table.md").read_text()
    assert table in proc.stdout
    numbers = json.loads((out / "table.json").read_text())["nq3"]
    assert list(numbers) == ROWS and all(numbers[row]["runs"] == 1 for row in ROWS)
    for row in ROWS:
        line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
        assert f"{numbers[row]['average']:.1f}" in line
    p2d = next(line for line in table.splitlines() if line.startswith("| p2d | 1/1 |"))
    assert p2d.endswith(" 68.4 |")  # the paper's Pos2Distill average beside ours
    assert "p2d-seed42: average" in table and "95% CI" in table

    # run again: every step is found done, nothing is started, the same table
    again = reproduce(*args, timeout=120)
    assert again.returncode == 0 and f"{len(steps)} steps, {len(steps)} done earlier" in again.stdout
    assert "start " not in again.stdout and (out / "table.md").read_text() == table
    dry = reproduce(*args, "--dry_run", timeout=60)
    assert dry.returncode == 0 and dry.stdout.count("[done]") == len(steps) and "[todo]" not in dry.stdout
    # another machine got steps/, evaluate/, compare/ and logs/ back, not the checkpoints, stage 1's
    # answers or stage 2's datasets: what needs those is done, so nothing runs again
    kept = {"steps", "evaluate", "compare", "logs"}
    for path in out.iterdir():
        if path.is_dir() and path.name not in kept:
            shutil.rmtree(path)
    assert not (out / "checkpoints").exists()
    moved = reproduce(*args, timeout=120)
    assert moved.returncode == 0 and "no longer needed" in moved.stdout, moved.stdout[-2000:] + moved.stderr[-2000:]
    assert "start " not in moved.stdout and (out / "table.md").read_text() == table
    # a changed setting would mix runs of two configs: refused before anything runs
    changed = reproduce(*[a if a != "1e-4" else "2e-4" for a in args], timeout=60)
    assert changed.returncode == 2 and "steps done earlier with another config" in changed.stderr
    assert "train-p2d-seed42 (env)" in changed.stderr and changed.stderr.count("\n") == 1


def test_dry_run_lists_the_plan_and_bad_input_is_refused(tmp_path, tiny_model):
    data = tmp_path / "nq-open-20_total_documents.jsonl.gz"
    write_jsonl(str(data), [record(i) for i in range(2)])
    out = tmp_path / "out"
    proc = reproduce("table3", "--model", tiny_model, "--data", str(data), "--out", str(out), "--gpus", "0,1",
                     "--dry_run", timeout=60)
    assert proc.returncode == 0, proc.stderr
    # 3 seeds by default: 2 stage-2 datasets per seed, 5 trainings, evaluations and comparisons per seed
    assert proc.stdout.startswith("53 steps (0 done) on GPU 0,1") and not out.exists()
    assert "--positions 0,5,10,15,last" in proc.stdout and "train-kl_anchor-seed44" in proc.stdout
    # an evaluation reads its stage-2 folder too (its training questions are kept out): gone, it is redone
    assert "eval-p2d-seed42-nq20 (1 GPU after stage2-1strengthen-filter-seed42, train-p2d-seed42)" in proc.stdout
    assert "--backend hf" in proc.stdout and "--backend auto" not in proc.stdout  # resolved: the configs say which ran
    for args, message in [(["--dataset_name", "../x"], "error: --dataset_name '../x': must be a plain name"),
                          (["--rows", "base,nope"], "error: --rows: unknown rows ['nope']"),
                          (["--train_env", "oops"], "error: --train_env 'oops': expected VAR=VALUE")]:
        proc = reproduce("table3", "--model", tiny_model, "--data", str(data), "--out", str(out), *args, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr
    assert not out.exists()
    proc = reproduce("kv", "--model", tiny_model, "--data", str(data), timeout=60)
    assert proc.returncode == 2 and "--kv_data" in proc.stderr


def test_a_paused_training_resumes_in_the_next_run_and_its_checkpoint_goes(tmp_path, tiny_model):
    # STOP_AT in the past: each run's training writes a DeepSpeed checkpoint after one optimizer
    # step and pauses (reproduce.py exits 75, what needs it waits); the next run resumes it from
    # there (LOAD_CHECKPOINT) and the run that finishes it removes the checkpoint
    data = tmp_path / "nq-open-3_total_documents.jsonl.gz"
    write_jsonl(str(data), [record(i) for i in range(10)])
    out = tmp_path / "out"
    args = tiny_run("table3", tiny_model, data, out) + ["--rows", "p2d", "--train_env", "STOP_AT=1"]
    ckpt = out / "checkpoints" / "p2d-seed42" / "_deepspeed_ckpt"
    late = reproduce(*args, "--stop_after", "0", timeout=60)  # past its stop: no step starts
    assert late.returncode == 75 and "start " not in late.stdout and "steps left (0 paused" in late.stdout
    for expected_step in (1, 2):
        proc = reproduce(*args)
        assert proc.returncode == 75, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "paused train-p2d-seed42" in proc.stdout and "run the same command again to go on" in proc.stdout
        assert (ckpt / "latest").read_text() == f"global_step{expected_step}"
        assert not (out / "steps" / "eval-p2d-seed42-nq3.json").exists()
    log = (out / "logs" / "train-p2d-seed42.log").read_text()
    assert "resumed from" in log and "2 samples consumed" in log
    proc = reproduce(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "steps" / "eval-p2d-seed42-nq3.json").exists() and not ckpt.exists()
    assert "4 samples consumed" in (out / "logs" / "train-p2d-seed42.log").read_text()
    stopped = reproduce(*args, "--stop_after", "0", timeout=60)  # everything is done: nothing is left to stop
    assert stopped.returncode == 0 and "start " not in stopped.stdout


def test_only_the_checkpoint_folder_reproduce_chose_is_scratch(tmp_path):
    # a CKPT_PATH given with --train_env (the repository, SAVE_PATH, a user's folder, even the
    # default's own path) is never removed after the training; the default under --out is
    import reproduce
    from pos2distill.lanes import Step, removable_scratch

    out = tmp_path / "out"

    def train_step(*train_env):
        argv = ["table3", "--model", "m", "--data", "d", "--out", str(out)]
        args = reproduce.parse_args(argv + [a for item in train_env for a in ("--train_env", item)])
        (_, train), _, _ = reproduce.training_steps(args, "p2d", 42, Step("stage1", []), "nq", "m")
        return train

    own = str(out / "checkpoints" / "p2d-seed42" / "_deepspeed_ckpt")
    default = train_step("GRAD_CKPT=0")
    assert default.env["CKPT_PATH"] == own and default.scratch == (own,)
    assert removable_scratch(default, str(out), reproduce.ROOT) == [own]
    for given in (".", "checkpoints", str(out / "checkpoints" / "p2d-seed42"), str(tmp_path / "mine"), own):
        train = train_step(f"CKPT_PATH={given}")
        assert train.env["CKPT_PATH"] == given and train.scratch == ()
        assert removable_scratch(train, str(out), reproduce.ROOT) == []


def test_an_outer_stop_at_does_not_reach_the_steps():
    import reproduce

    outer = {"STOP_AT": "1", "PATH": "/bin", "PYTHONPATH": "/lib"}
    env = reproduce.steps_environ(outer, None)
    assert "STOP_AT" not in env and env["PATH"] == "/bin" and env["LOAD_CHECKPOINT"] == "1"
    assert env["PYTHONPATH"] == os.pathsep.join([reproduce.ROOT, "/lib"]) and outer["STOP_AT"] == "1"
    assert reproduce.steps_environ(outer, 1234.4)["STOP_AT"] == "1234"  # --stop_after's deadline replaces it
