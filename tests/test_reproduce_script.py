"""benchmarks/reproduce.sh end to end on CPU with the tiny model: the GPU experiment's steps
(stage 1, stage 2 + train_nq.sh, stage 4 of base and checkpoint) as the device runs them,
through reproduce_lanes.sh (training and evaluation overlapping), then generalization.sh."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from pos2distill.jsonl import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANES = os.path.join(ROOT, "benchmarks", "reproduce_lanes.sh")
GPUS = os.path.join(ROOT, "benchmarks", "reproduce_gpus.sh")
GENERALIZATION = os.path.join(ROOT, "benchmarks", "generalization.sh")
TOTAL = 3


def record(i):
    ctxs = [{"title": f"Gold {i}", "text": f"The answer to question {i} is e.", "isgold": True}]
    ctxs += [{"title": f"Other {i}.{j}", "text": f"Unrelated passage {j}.", "isgold": False} for j in range(TOTAL - 1)]
    return {"question": f"what is the answer to question {i}", "answers": ["e"], "ctxs": ctxs}


def oracle_record(i):
    # answers that are no substring of one another, so other questions' passages can be distractors
    code = "code" + chr(ord("a") + i) + "z"
    return {"question": f"what is the code of item {i}", "answers": [code],
            "ctxs": [{"title": f"Item {i}", "text": f"Item {i} has the code {code}.", "isgold": True}]}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def generalize(env, step_name):
    proc = subprocess.run(["bash", GENERALIZATION, step_name], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"{step_name}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_reproduce_steps_on_cpu(tmp_path, tiny_model):
    data = tmp_path / "nq-open-3_total_documents.jsonl.gz"
    write_jsonl(str(data), [record(i) for i in range(14)])
    out = tmp_path / "out"
    env = dict(
        os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MODEL=tiny_model, DATA=str(data),
        OUT_DIR=str(out), WORK_DIR=str(tmp_path / "work"), TOTAL_DOC=str(TOTAL), GOLD_DOC="0", LIMIT="6",
        NUM="2", K="2", EVAL_NUM="4", EVAL_POSITIONS="all", EVAL_BATCH="8", POSITIONS_PER_CALL="2",
        TRAIN_BATCH="2", MICRO_BATCH="2", MAX_LEN="2048", LR="1e-4", MASTER_PORT=str(free_port()),
        # the deepspeed launcher of this interpreter's environment
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    )
    # both lanes: stage 1, then training; base evaluated meanwhile, the checkpoint once trained
    env["LR"] = "1e-3"  # overridden by the variant's own LR below
    # EVAL_PARALLEL=2: the base evaluation and the checkpoint's may overlap
    proc = subprocess.run(["bash", LANES, "p2d:LR=1e-4"], capture_output=True, text=True,
                          env=dict(env, EVAL_PARALLEL="2"), timeout=900)
    lanes_log = (out / "lanes.log").read_text()
    assert proc.returncode == 0, lanes_log + "".join((out / f).read_text()[-3000:] for f in os.listdir(out) if f.endswith(".log"))
    for entry in ("stage1 rc=0", "p2d.train rc=0", "base.eval rc=0", "p2d.eval rc=0", "lanes done status=0"):
        assert entry in lanes_log
    assert "stage1 wall" in (out / "stage1.log").read_text()
    work = tmp_path / "work"
    [answers] = (work / "raw_data" / "nq").glob("*.jsonl.gz")
    assert (out / answers.name).read_bytes() == answers.read_bytes()  # brought back, to carry to a later machine

    trained = (out / "p2d.train.log").read_text()
    assert "0 optimizer steps skipped" in trained
    assert "student and teacher loaded in" in trained and "timing: training loop" in trained
    [checkpoint] = (work / "checkpoints" / "nq" / "p2d").glob("*_kd0.0_lm0.0_rank0.0_adaptive1.0_1.0")
    assert json.loads((checkpoint / "kd_args.json").read_text())["learning_rate"] == 1e-4  # the variant's LR
    stats = json.loads((out / "p2d.train_stats.json").read_text())
    assert stats["train_wall_s"] > 0

    for name in ("base", "p2d"):
        [summary] = json.loads((out / f"{name}_nq_summary_{TOTAL}docs.json").read_text())
        assert summary["positions"] == list(range(TOTAL)) and summary["n"] == {str(p): 4 for p in range(TOTAL)}
    printed = (out / "p2d.eval.log").read_text()
    # the checkpoint's questions are the first 6, the evaluated ones the last 4: no overlap
    assert "no overlap" in printed

    # generalization.sh: base and checkpoint at other document counts (sets built from an oracle
    # file), then the NQ-trained checkpoint on KV retrieval (cross-task)
    oracle = tmp_path / "oracle.jsonl.gz"
    write_jsonl(str(oracle), [oracle_record(i) for i in range(14)])
    gen_env = dict(env, ORACLE=str(oracle), CKPT="p2d", DOC_COUNTS="2 4", POSITIONS_4="0,last")
    # base alone first (as while the checkpoint still trains): no plots or table yet
    printed = generalize(dict(gen_env, MODELS="base"), "docs")
    assert "no plots and no table" in printed and not (out / "generalization_nq.json").exists()
    assert not (out / "p2d_nq_summary_2docs.json").exists()
    generalize(gen_env, "docs")
    assert "all resumed" in (out / "base_nq_2docs.eval.log").read_text()  # base not evaluated twice
    table = json.loads((out / "generalization_nq.json").read_text())
    assert [row["total_docs"] for row in table["rows"]] == [2, 4]
    assert [row["positions"] for row in table["rows"]] == [[0, 1], [0, 3]]
    for k in (2, 4):
        assert (out / f"nq_{k}docs_base_vs_p2d.png").is_file()
        [summary] = json.loads((out / f"p2d_nq_summary_{k}docs.json").read_text())
        assert "checkpoints/nq/p2d" in summary["model"] and summary["n"]["0"] == 4
    assert (work / "qa_data" / "nq-open-4_total_documents.jsonl.gz").is_file()

    kv = tmp_path / "kv-retrieval-3_keys.jsonl.gz"
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "kv", "--num_keys", "3",
                    "--num_examples", "5", "--output", str(kv)], check=True, capture_output=True)
    generalize(dict(env, KV_DATA=str(kv), KV_KEYS=str(TOTAL), CKPT="p2d", CKPT_DATASET="nq"), "kv")
    [summary] = json.loads((out / f"p2d_kv_summary_{TOTAL}docs.json").read_text())
    assert summary["positions"] == [0, TOTAL - 1] and "checkpoints/nq/p2d" in summary["model"]
    assert (out / f"p2d_kv_predictions_{TOTAL}docs.jsonl.gz").is_file()
    [row] = json.loads((out / "generalization_kv.json").read_text())["rows"]
    assert row["total_docs"] == TOTAL and row["positions"] == [0, TOTAL - 1]
    assert not (tmp_path / "raw_data").exists() and not os.path.exists(os.path.join(ROOT, "checkpoints", "nq", "p2d"))


def test_gpus_stage1_once_then_one_lane_per_gpu(tmp_path, tiny_model):
    data = tmp_path / "nq-open-3_total_documents.jsonl.gz"
    write_jsonl(str(data), [record(i) for i in range(10)])
    out, work = tmp_path / "out", tmp_path / "work"
    # a stand-in nvidia-smi: what the memory poller asks for, one reading
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "smi_args"}\necho 1234\n')
    smi.chmod(0o755)
    # GPU id 0 twice: two lanes on one device (on CPU the id selects nothing)
    env = dict(
        os.environ, OMP_NUM_THREADS="1", GPUS="0 0", MODEL=tiny_model, DATA=str(data), OUT_DIR=str(out),
        WORK_DIR=str(work), TOTAL_DOC=str(TOTAL), GOLD_DOC="0", LIMIT="6", NUM="2", K="2", EVAL_NUM="2",
        EVAL_POSITIONS="0", EVAL_BATCH="8", TRAIN_BATCH="2", MICRO_BATCH="2", MAX_LEN="2048", LR="1e-4",
        MASTER_PORT=str(free_port()),
        PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        CHECK_ONLY="1",  # a caller's leftover: only the up-front check of the variants may see it
    )
    proc = subprocess.run(["bash", GPUS, "a:GROUP_BY_EXAMPLE=1", "b:KD_COEF=1,0,0,0", "c:FILTER=0"], capture_output=True, text=True, env=env,
                          timeout=900)
    log = (out / "gpus.log").read_text()
    logs = "".join(f"--- {f}\n" + f.read_text()[-2000:] for f in out.rglob("*.log"))
    assert proc.returncode == 0, log + logs
    assert "stage1 done" in log and "lane 0 on GPU 0: a:GROUP_BY_EXAMPLE=1 c:FILTER=0" in log and "lane 1 on GPU 0: b:KD_COEF=1,0,0,0 + base" in log
    assert log.rstrip().endswith("gpus done status=0")
    assert "stage1 rc=0" in (out / "lanes.log").read_text()
    for lane, names in ((0, ["a", "c"]), (1, ["b", "base"])):
        lanes_log = (out / f"gpu{lane}" / "lanes.log").read_text()
        assert "stage1" not in lanes_log  # stage 1 ran once, for all lanes
        for name in names:
            assert f"{name}.eval rc=0" in lanes_log
            assert (out / f"gpu{lane}" / f"{name}_nq_summary_{TOTAL}docs.json").is_file()
    [checkpoint] = (work / "gpu1" / "checkpoints" / "nq" / "b").glob("*_kd1.0_lm0.0_rank0.0_adaptive0.0_1.0")
    assert json.loads((checkpoint / "kd_args.json").read_text())["kd_coef"] == [1.0, 0.0, 0.0, 0.0]
    # GROUP_BY_EXAMPLE=1 reached the trainer: 2 examples of K + strengthen = 3 rows
    assert "--group_by_example: 2 examples (3.0 rows each)" in (out / "gpu0" / "a.train.log").read_text()
    assert "--group_by_example" not in (out / "gpu1" / "b.train.log").read_text()
    # FILTER=0: stage 2 without the correct-answer filter, and the training found that dataset
    assert list((work / "gpu0" / "checkpoints" / "nq" / "c").glob("*_3total_docs_nofilter_2random_1strengthen_2_kd*"))
    # the memory poller watched the lane's GPU only (nvidia-smi lists all GPUs unless told)
    polls = [line for line in (tmp_path / "smi_args").read_text().splitlines() if "memory.used" in line]
    assert len(polls) == 3 and all(line.startswith("-i 0 ") for line in polls), polls
    assert json.loads((out / "gpu1" / "b.train_stats.json").read_text())["peak_gpu_mem_mib"] == 1234
    # a bad variant stops the run before stage 1
    proc = subprocess.run(["bash", GPUS, "a", "a"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "given twice" in proc.stderr
    # a lane folder holding its own stage-1 answers (an earlier single-GPU run) is refused
    (work / "gpu1" / "raw_data").unlink()
    (work / "gpu1" / "raw_data").mkdir()
    proc = subprocess.run(["bash", GPUS, "a"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "gpu1/raw_data is a folder of an earlier run" in proc.stderr


def test_lanes_failed_training_skips_its_evaluation(tmp_path, tiny_model):
    data = tmp_path / "nq-open-3_total_documents.jsonl.gz"
    write_jsonl(str(data), [record(i) for i in range(4)])
    out = tmp_path / "out"
    # no stage 1 and no base evaluation: stage 2 finds no stage-1 answers, so the training fails
    env = dict(os.environ, MODEL=tiny_model, DATA=str(data), OUT_DIR=str(out), WORK_DIR=str(tmp_path / "work"),
               TOTAL_DOC=str(TOTAL), SKIP_STAGE1="1", SKIP_BASE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", LANES, "broken:LR=1e-4"], capture_output=True, text=True, env=env, timeout=300)
    lanes_log = (out / "lanes.log").read_text()
    assert proc.returncode == 1, lanes_log
    assert "broken.train rc=" in lanes_log and "broken.train rc=0" not in lanes_log
    assert "broken: training failed, not evaluated" in lanes_log and "lanes done status=1" in lanes_log
    assert not (out / "broken.eval.log").exists()


def test_lanes_rejects_bad_arguments(tmp_path):
    env = dict(os.environ, OUT_DIR=str(tmp_path / "out"))
    cases = [(["base"], "bad variant name"), (["a/b:LR=1"], "bad variant name"), ([":LR=1"], "bad variant name"),
             (["x:LR=1", "x:LR=2"], "given twice"), (["x:LR=1 rm"], "'rm' in variant"),
             (["x:A=*"], "is not VAR=VALUE")]
    for variants, message in cases:
        proc = subprocess.run(["bash", LANES, *variants], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (variants, proc.stderr)
    # no variant, no stage 1 and no base: nothing to run
    proc = subprocess.run(["bash", LANES], capture_output=True, text=True,
                          env=dict(env, SKIP_BASE="1", SKIP_STAGE1="1"), timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
    for variants, message in [(["x"], "GPUS must be GPU ids"), ([], "usage")]:
        proc = subprocess.run(["bash", GPUS, *variants], capture_output=True, text=True, env=dict(env, GPUS="0 a"),
                              timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (variants, proc.stderr)
    proc = subprocess.run(["bash", LANES, "x"], capture_output=True, text=True, env=dict(env, EVAL_PARALLEL="0"),
                          timeout=60)
    assert proc.returncode == 2 and "EVAL_PARALLEL" in proc.stderr
    # generalization.sh MODELS: base and CKPT only, each once
    for models, message in [("base base", "names a model twice"), ("base x", "base and p only"), ("", "is empty")]:
        proc = subprocess.run(["bash", GENERALIZATION, "docs"], capture_output=True, text=True,
                              env=dict(env, MODEL="m", CKPT="p", MODELS=models), timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (models, proc.stderr)


def test_lanes_stopped_stops_its_steps(tmp_path, tiny_model):
    data = tmp_path / "nq-open-3_total_documents.jsonl.gz"
    write_jsonl(str(data), [record(i) for i in range(40)])
    out = tmp_path / "out"
    env = dict(os.environ, MODEL=tiny_model, DATA=str(data), OUT_DIR=str(out), WORK_DIR=str(tmp_path / "work"),
               TOTAL_DOC=str(TOTAL), GOLD_DOC="0", EVAL_NUM="4", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    lanes = subprocess.Popen(["bash", LANES, "p2d"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "lanes.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "stage1 started" in log.read_text()):
        time.sleep(0.5)
    time.sleep(2)  # stage 1 and the base evaluation are running
    lanes.send_signal(signal.SIGTERM)
    assert lanes.wait(timeout=60) == 130
    assert "stopped" in log.read_text()
    time.sleep(1)
    # nothing started for this run is left: every step's command line names the data file
    left = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True).stdout.split()
    assert left == [], subprocess.run(["ps", "-o", "pid,args", "-p", ",".join(left)], capture_output=True,
                                      text=True).stdout
