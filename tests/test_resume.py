"""Interrupted stage 1 and stage 4 runs resume and write what an uninterrupted run writes.

Each test kills a real CLI run (tiny random model, CPU) once its first chunk is on
disk, restarts it with the same arguments and compares the final file byte for
byte with an uninterrupted run (gzip output carries no time stamp, see
pos2distill/jsonl.py). Stage 3's settings check is tested at the function level (its
launcher runs: test_train_kd_e2e.py).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from pos2distill.jsonl import read_jsonl, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 4
EXAMPLES = 16
CHUNK = 2
# One thread: the tiny model gains nothing from two, and two threads spin-wait (and slow
# down several times over) when another process holds a core.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def litm(i):
    ctxs = [{"title": f"Gold {i}", "text": f"The answer to question {i} is e.", "isgold": True}]
    ctxs += [{"title": f"Other {i}.{j}", "text": f"Unrelated passage {j} about {i}.", "isgold": False}
             for j in range(TOTAL - 1)]
    return {"question": f"what is the answer to question {i}", "answers": ["e"], "ctxs": ctxs}


def make_data(folder):
    path = str(folder / "nq-resume.jsonl")
    write_jsonl(path, [litm(i) for i in range(EXAMPLES)])
    return path


def stage1_cmd(data, model, output, seed=1, *extra):
    # CPU (--num_gpus 0) even where a GPU is visible, and --full_answers: every prompt generates all its tokens, so each chunk takes long enough to interrupt
    return [sys.executable, os.path.join(ROOT, "gen_advantageous_pos_for_R1.py"), "--input-path", data,
            "--model", model, "--backend", "hf", "--num_gpus", "0", "--total_doc", str(TOTAL), "--gold_doc", "2",
            "--max-new-tokens", "24", "--full_answers", "--chunk_size", str(CHUNK), "--batch_size", "2",
            "--seed", str(seed), "--output-path", output, *extra]


def stage4_cmd(data, model, output):
    return [sys.executable, os.path.join(ROOT, "eval_data.py"), "--input-path", data, "--model", model,
            "--label", "base", "--dataset_name", "nq", "--backend", "hf", "--num_gpus", "0", "--total_doc", str(TOTAL),
            "--sample_num", "8", "--max-new-tokens", "24", "--no_stop_at_newline", "--output-path", output]


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=ENV)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def chunks_in(partial_dir):
    if not os.path.isdir(partial_dir):
        return []
    return sorted(n for n in os.listdir(partial_dir) if n.startswith("chunk_") and n.endswith(".jsonl.gz"))


def run_and_interrupt(cmd, partial_dir, log_dir, sig):
    """Start ``cmd``, send ``sig`` as soon as its first chunk is on disk; return (exit code, stderr)."""
    with open(log_dir / "out.log", "w") as out, open(log_dir / "err.log", "w") as err:
        # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT
        # ignored: restore the default so the child turns Ctrl-C into KeyboardInterrupt wherever
        # the test runner itself was started.
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=ENV,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        while not chunks_in(partial_dir):
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, "no chunk after 300 s"
            time.sleep(0.02)
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    return code, (log_dir / "err.log").read_text()


def same_file(a, b):
    assert read_jsonl(str(a)) == read_jsonl(str(b))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()


def test_stage1_killed_run_resumes_to_the_same_file(tmp_path, tiny_model):
    data = make_data(tmp_path)
    straight = tmp_path / "straight" / "out.jsonl.gz"
    run(stage1_cmd(data, tiny_model, str(straight)))

    resumed = tmp_path / "resumed" / "out.jsonl.gz"
    partial = str(resumed) + ".partial"
    code, _ = run_and_interrupt(stage1_cmd(data, tiny_model, str(resumed)), partial, tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not resumed.exists()
    done = len(chunks_in(partial))
    assert 1 <= done < EXAMPLES // CHUNK
    interrupted = tmp_path / "interrupted.partial"
    shutil.copytree(partial, interrupted)  # kept for the "other arguments" run below

    out = run(stage1_cmd(data, tiny_model, str(resumed)))
    assert f"resuming: {done} finished chunk(s)" in out
    summary = json.loads((tmp_path / "resumed" / "out.summary.json").read_text())
    assert summary["generated_now"] == EXAMPLES - done * CHUNK  # finished records were not redone
    same_file(straight, resumed)
    # the chunk folder and every temporary are gone
    assert sorted(os.listdir(resumed.parent)) == ["out.jsonl.gz", "out.jsonl.gz.config.json", "out.summary.json"]

    # same seed, two runs: the same prompts (documents in the same order)
    prompts = [r["oracle_prompt"] for r in read_jsonl(str(straight))]
    assert prompts == [r["oracle_prompt"] for r in read_jsonl(str(resumed))]

    # a rerun of a finished output reuses it without loading the model
    out = run(stage1_cmd(data, tiny_model, str(resumed)))
    assert "already complete with these arguments" in out
    same_file(straight, resumed)

    # other arguments (seed, limit) never resume chunks made with different ones
    other = tmp_path / "other" / "out.jsonl.gz"
    shutil.copytree(interrupted, str(other) + ".partial")
    out = run(stage1_cmd(data, tiny_model, str(other), 2, "--limit", "4"))
    assert "was made with other arguments; starting over" in out
    records = read_jsonl(str(other))
    assert len(records) == 4
    assert json.loads((tmp_path / "other" / "out.summary.json").read_text())["generated_now"] == 4
    assert [r["oracle_prompt"] for r in records] != prompts[:4]  # seed 2 shuffles the distractors differently


def test_stage4_interrupted_run_resumes_to_the_same_predictions(tmp_path, tiny_model):
    data = make_data(tmp_path)
    relative = os.path.join("nq", "base", f"predictions_{TOTAL}docs.jsonl.gz")
    run(stage4_cmd(data, tiny_model, str(tmp_path / "straight")))
    straight = tmp_path / "straight" / relative

    resumed = tmp_path / "resumed" / relative
    partial = str(resumed) + ".partial"
    code, stderr = run_and_interrupt(stage4_cmd(data, tiny_model, str(tmp_path / "resumed")), partial, tmp_path,
                                     signal.SIGINT)
    assert code == 130 and stderr.rstrip().endswith("interrupted") and "Traceback" not in stderr, stderr
    assert not resumed.exists()
    done = len(chunks_in(partial))
    assert 1 <= done < TOTAL

    out = run(stage4_cmd(data, tiny_model, str(tmp_path / "resumed")))
    assert out.count("already done (resumed)") == done
    same_file(straight, resumed)
    assert not os.path.exists(partial)
    tables = [json.loads((tmp_path / run_dir / "nq" / f"positions_{TOTAL}docs_base.json").read_text())
              for run_dir in ("straight", "resumed")]
    assert tables[0][0]["accuracy"] == tables[1][0]["accuracy"]


def test_stage3_resume_refuses_a_checkpoint_saved_under_other_settings(tmp_path, monkeypatch):
    # models, losses, optimizer, schedule and LoRA are recorded with the checkpoint; a resume
    # under other ones names the first that differs, old -> new, in one line
    import pytest

    from kd.resume import check_run_settings, run_settings
    from kd.train_kd import parse_args
    from pos2distill.errors import UserError

    (tmp_path / "student").mkdir()
    base = ["--dataset", "d", "--pretrain", "student", "--teacher_model", "hub/teacher"]

    def settings(*flags):
        return run_settings(parse_args(base + list(flags)))

    monkeypatch.chdir(tmp_path)
    saved = settings()
    spelled_otherwise = run_settings(parse_args(["--dataset", "d", "--pretrain", str(tmp_path / "student"),
                                                 "--teacher_model", "hub/teacher"]))
    assert saved["pretrain"] == str(tmp_path / "student") and saved["teacher_model"] == "hub/teacher"
    check_run_settings(saved, spelled_otherwise, "ckpt")  # one folder, two spellings: the same run
    check_run_settings(None, saved, "ckpt")  # a checkpoint from before the record: accepted
    check_run_settings(saved, settings("--seed", "7", "--stop_at", "1", "--max_ckpt_num", "1"), "ckpt")  # not settings
    assert "lora_alpha" not in saved and "lora_alpha" in settings("--lora_rank", "8")
    changes = [(["--teacher_model", "hub/other"], "--teacher_model 'hub/teacher', this run has 'hub/other'"),
               (["--kd_coef", "1,0,0,0"], "--kd_coef [0.0, 0.0, 0.0, 1.0], this run has [1.0, 0.0, 0.0, 0.0]"),
               (["--perserve", "0.5"], "--perserve 1.0, this run has 0.5"),
               (["--temperature", "2"], "--temperature 1.0, this run has 2.0"),
               (["--learning_rate", "1e-5"], "--learning_rate 3e-06, this run has 1e-05"),
               (["--lr_scheduler", "constant"], "--lr_scheduler 'cosine_with_min_lr', this run has 'constant'"),
               (["--lr_warmup_ratio", "0"], "--lr_warmup_ratio 0.05, this run has 0.0"),
               (["--max_epochs", "2"], "--max_epochs 1, this run has 2"),
               (["--lora_rank", "8"], "--lora_rank 0, this run has 8"),
               # the first that differs is named, in the order of the flags recorded
               (["--max_epochs", "2", "--perserve", "0.5"], "--perserve 1.0, this run has 0.5")]
    for flags, message in changes:
        with pytest.raises(UserError) as err:
            check_run_settings(saved, settings(*flags), "ckpt")
        text = str(err.value)
        assert text.startswith(f"--load_checkpoint: ckpt was saved by a run with {message}; ") and "\n" not in text
    lora = settings("--lora_rank", "8")
    with pytest.raises(UserError, match=r"--target_modules \['all-linear'\], this run has \['q_proj', 'v_proj'\]"):
        check_run_settings(lora, settings("--lora_rank", "8", "--target_modules", "q_proj", "v_proj"), "ckpt")
    check_run_settings(lora, settings("--lora_rank", "8", "--target_modules", "all-linear"), "ckpt")
