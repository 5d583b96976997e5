"""Stage 3 end to end on CPU: data pipeline, the deepspeed launcher with ZeRO-3, resume (non-finite
steps: ``test_nonfinite_steps.py``)."""

import glob
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "kd", "train_kd.py")
RUN = "nqtiny_kd0.5_lm0.5_rank0.5_adaptive1.0_1.0"
# Two CPU processes (gloo) here; on a GPU machine one process per GPU, at most two.
CUDA = torch.cuda.is_available()
PROCS = min(2, torch.cuda.device_count()) if CUDA else 2


def make_pair_dataset(path, n_examples=3, copies=3, n_docs=5, seed=0, answers=None):
    """A stage-2 style dataset: per example `copies` trivial rows plus one anchor (gold first)."""
    from datasets import Dataset

    from pos2distill.prompting import R1_INSTRUCTION

    rng = random.Random(seed)
    rows = []
    for ex in range(n_examples):
        # examples differ in length, so micro-batches that mix them need padding
        gold = {"title": f"Gold {ex}", "text": f"The answer to question {ex} is value{ex}." + " Indeed." * ex}
        distractors = [{"title": f"D{ex}-{j}", "text": f"Unrelated passage {j} on topic {ex}."}
                       for j in range(n_docs - 1)]
        answer = answers[ex] if answers else f"value{ex}\nA second line that is not part of the response."
        for copy in range(copies + 1):
            anchor = copy == copies
            shuffled = distractors[:]
            rng.shuffle(shuffled)
            pos = 0 if anchor else rng.randrange(1, n_docs)
            rows.append({
                "example_id": ex, "question": f"What is question {ex}?", "answers": [f"value{ex}"], "kind": "qa",
                "instruction": R1_INSTRUCTION, "oracle_answer": answer,
                "documents": shuffled[:pos] + [gold] + shuffled[pos:], "gold_idx": pos,
                "teacher_documents": [gold] + distractors, "teacher_gold_idx": 0, "is_anchor": anchor,
            })
    Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_cmd(num_procs):
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.exists(launcher):
        launcher = shutil.which("deepspeed")
    return [launcher, "--num_gpus", str(num_procs), "--master_port", str(free_port()), SCRIPT]


def train_flags(model, data_root, out):
    return [
        "--dataset", "nqtiny", "--data_root", str(data_root), "--pretrain", model, "--teacher_model", model,
        "--input_key", "question", "--output_key", "oracle_answer", "--max_len", "4096",
        "--train_batch_size", "4", "--micro_train_batch_size", "1", "--max_samples", "12",
        "--zero_stage", "3", "--max_epochs", "1", "--l2", "0.01", "--bf16", "--flash_attn",
        "--kd_coef", "0.5,0.5,0.5,1.0", "--learning_rate", "1e-3", "--teacher_offload",
        "--apply_chat_template", "--gradient_checkpointing", "--perserve", "1.0",
        "--dataset_name", "nq", "--logging_steps", "1", "--eval_steps", "-1",
        "--save_path", str(out / "save"), "--ckpt_path", str(out / "ckpt"), "--use_tensorboard", str(out / "tb"),
    ]


def run(cmd, cwd):
    """Run cmd; a launch whose free port was taken in the meantime (another job bound it between
    free_port() and the launcher) is retried on a new port, written back into cmd."""
    for _ in range(3):
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
        output = proc.stdout + proc.stderr
        if proc.returncode == 0 or "--master_port" not in cmd or "Address already in use" not in output:
            break
        cmd[cmd.index("--master_port") + 1] = str(free_port())
    return proc.returncode, output


def load_state(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def assert_same_weights(resumed_folder, straight_folder):
    """A resumed run's saved weights against those of a run never stopped (fp32 on CPU)."""
    resumed, straight = load_state(str(resumed_folder)), load_state(str(straight_folder))
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.allclose(resumed[name], straight[name], atol=1e-6), name


# --------------------------------------------------------------------------- data and imports


def test_pair_dataset_response_prompts_and_collate(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from kd.pair_dataset import PairDataset, load_pairs

    path = make_pair_dataset(tmp_path / "d", n_examples=2, copies=2, answers=["  Paris\nmore", ""])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = load_pairs(path, "question", "oracle_answer")
    data = PairDataset(rows, tokenizer, max_len=4096, apply_chat_template=True)
    assert len(data) == 6 and data.dropped == 0 and data.empty_answers == 3
    first = data[0]
    response = tokenizer("Paris", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert first["response_len"] == len(response)
    assert first["student_ids"][-len(response):] == response == first["teacher_ids"][-len(response):]
    student_text = tokenizer.decode(first["student_ids"])
    assert student_text.startswith("<|im_start|>") and "Question: What is question 0?" in student_text
    assert data[3]["response_len"] == 1  # empty answer: EOS only
    assert first["teacher_ids"] == data[1]["teacher_ids"] and first["student_ids"] != data[1]["student_ids"]

    batch = data.collate_fn([data[0], data[3], data[1]])
    assert batch["teacher_input_ids"].shape[0] == 2  # two distinct teacher inputs
    assert batch["teacher_index"].tolist() == [0, 1, 0]
    width = batch["labels"].shape[1]
    assert width == len(response)
    assert batch["response_mask"].tolist()[1] == [0.0] * (width - 1) + [1.0]
    assert batch["labels"][0].tolist() == response
    for b, item in enumerate((data[0], data[3], data[1])):
        mask = batch["student_attention_mask"][b].bool()
        assert batch["student_input_ids"][b][mask].tolist() == item["student_ids"]  # unpadding gives the row back
        # pads sit inside, before the last prompt token and the response, never at the start
        assert mask[0] and mask[-(item["response_len"] + 1):].all()
    assert batch["teacher_attention_mask"][:, 0].all()

    short = PairDataset(rows, tokenizer, max_len=len(first["student_ids"]) - 1, apply_chat_template=True)
    assert short.dropped > 0 and len(short) + short.dropped == 6


def test_missing_dataset_and_columns_are_user_errors(tmp_path):
    from datasets import Dataset

    from kd.pair_dataset import load_pairs, resolve_dataset_path
    from pos2distill.errors import UserError

    with pytest.raises(UserError, match="no such folder"):
        resolve_dataset_path("nope", str(tmp_path))
    Dataset.from_list([{"question": "q"}]).save_to_disk(str(tmp_path / "bad"))
    assert resolve_dataset_path("bad", str(tmp_path)) == str(tmp_path / "bad")
    with pytest.raises(UserError, match="missing column"):
        load_pairs(str(tmp_path / "bad"), "question", "oracle_answer")


def test_openrlhf_imports_without_flash_attn():
    import importlib.util

    from transformers.utils import is_flash_attn_2_available

    import kd.strategy  # noqa: F401  (imports OpenRLHF through the fallback)
    import kd.trainer  # noqa: F401
    from kd import flash_attn_fallback as fb

    assert importlib.util.find_spec("flash_attn") is None
    assert not any(name.split(".")[0] == "flash_attn" for name in sys.modules)
    assert not is_flash_attn_2_available()
    hidden = torch.arange(24.0).reshape(2, 4, 3)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    packed, indices, cu_seqlens, max_seqlen, _ = fb.unpad_input(hidden, mask)
    assert packed.shape == (5, 3) and cu_seqlens.tolist() == [0, 3, 5] and max_seqlen == 3
    assert torch.equal(fb.pad_input(packed, indices, 2, 4), hidden * mask[..., None])
    assert fb.rearrange(hidden, "b s ... -> (b s) ...").shape == (8, 3)


# --------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize("coef", ["1,2,3", "1,2,3,4,5", "0,0,0,0", "1,-1,0,0", "a,b,c,d", "nan,0,0,1"])
def test_bad_kd_coef_is_a_one_line_error(tmp_path, coef):
    proc = subprocess.run([sys.executable, SCRIPT, "--dataset", "x", "--pretrain", "y", "--kd_coef", coef],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --kd_coef"), proc.stderr


def test_bad_kd_coef_through_the_deepspeed_launcher(tmp_path):
    code, output = run(deepspeed_cmd(1) + ["--dataset", "x", "--pretrain", "y", "--kd_coef", "1,2"], tmp_path)
    assert code != 0
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == ["error: --kd_coef must be four non-negative numbers a,b,c,d (kd,lm,rank,adaptive), got '1,2'"]
    assert "Traceback" not in output


def test_train_nq_sh_lets_the_launcher_take_cuda_visible_devices(tmp_path):
    # deepspeed ignores CUDA_VISIBLE_DEVICES once --num_gpus is given (it would start on GPU 0):
    # a stand-in launcher records what train_nq.sh passes
    (tmp_path / "deepspeed").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "args"}\n')
    (tmp_path / "deepspeed").chmod(0o755)
    script = os.path.join(ROOT, "train_nq.sh")

    def launch(**env):
        full = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}", **env)
        proc = subprocess.run(["bash", script], capture_output=True, text=True, env=full, timeout=60)
        args = (tmp_path / "args").read_text() if (tmp_path / "args").exists() else ""
        (tmp_path / "args").unlink(missing_ok=True)
        return proc, args

    proc, args = launch(CUDA_VISIBLE_DEVICES="2,3", NUM_GPUS="2")
    assert proc.returncode == 0 and args.startswith("--master_port 6666 kd/train_kd.py") and "--num_gpus" not in args
    proc, args = launch(CUDA_VISIBLE_DEVICES="2,3", NUM_GPUS="1")
    assert proc.returncode == 2 and "NUM_GPUS=1 but CUDA_VISIBLE_DEVICES=2,3 names 2 GPU(s)" in proc.stderr
    assert args == ""
    proc, args = launch(CUDA_VISIBLE_DEVICES="", NUM_GPUS="4")
    assert proc.returncode == 0 and args.startswith("--master_port 6666 --num_gpus 4 kd/train_kd.py")
    # rows are packed unless PACKING=0 asks for the padded micro-batches
    assert "--packing_samples" in args.split()
    proc, args = launch(CUDA_VISIBLE_DEVICES="", NUM_GPUS="4", PACKING="0")
    assert proc.returncode == 0 and "--packing_samples" not in args.split()
    # a run that pauses or resumes keeps one DeepSpeed checkpoint (each holds the optimizer state);
    # others keep the trainer's default
    for env, resumes in (({}, False), ({"STOP_AT": "1"}, True), ({"LOAD_CHECKPOINT": "1"}, True)):
        proc, args = launch(CUDA_VISIBLE_DEVICES="", **{"STOP_AT": "", "LOAD_CHECKPOINT": "0", **env})
        words = args.split()
        assert proc.returncode == 0 and ("--load_checkpoint" in words) == resumes, proc.stderr
        assert (words[words.index("--max_ckpt_num") + 1] == "1") if resumes else "--max_ckpt_num" not in words


def test_resume_refuses_a_checkpoint_with_another_data_order():
    from kd.resume import check_data_order, data_order
    from kd.train_kd import parse_args
    from pos2distill.errors import UserError

    args = parse_args(["--dataset", "d", "--pretrain", "m", "--train_batch_size", "8", "--micro_train_batch_size", "2"])
    saved = data_order(args, "d", 100, 2)
    check_data_order(saved, data_order(args, "d", 100, 2), "ckpt")  # same order: fine
    check_data_order(None, saved, "ckpt")  # older checkpoints carry no order
    args.seed = 7
    with pytest.raises(UserError, match=r"--load_checkpoint: ckpt was saved by a run with another data order "
                                        r"\(seed 42 -> 7; processes 2 -> 1\)"):
        check_data_order(saved, data_order(args, "d", 100, 1), "ckpt")
    args.seed, args.group_by_example = 42, True  # another sampler: another order
    with pytest.raises(UserError, match=r"group_by_example None -> True"):
        check_data_order(saved, data_order(args, "d", 100, 2), "ckpt")


# --------------------------------------------------------------------------- launcher runs


@pytest.fixture(scope="module")
def trained(tiny_model):
    """One ZeRO-3 run through the deepspeed launcher (2 processes on CPU): 12 rows, batch 4 -> 3 optimizer steps."""
    # Its own folder, not pytest's tmp_path: pytest may prune those while another pytest run starts.
    with tempfile.TemporaryDirectory(prefix="kd_e2e_") as folder:
        base = Path(folder)
        make_pair_dataset(base / "data" / "nqtiny")
        out = base / "run"
        flags = train_flags(tiny_model, base / "data", out) + ["--save_steps", "1", "--max_ckpt_num", "5"]
        cmd = deepspeed_cmd(PROCS)
        code, output = run(cmd + flags, base)
        port = cmd[cmd.index("--master_port") + 1]
        yield {"base": base, "out": out, "code": code, "output": output, "flags": flags, "port": port}


def test_run_leaves_no_shared_memory_buffers(trained):
    # DeepSpeed's CPU allreduce creates one /dev/shm file per rank and never removes it (before
    # kd/strategy.py removed them at exit, every such run left 2 x 69 MB here)
    assert trained["code"] == 0, trained["output"][-3000:]
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{trained['port']}_*") == []


def test_a_rank_stopped_by_sigterm_removes_its_shared_memory_buffer(tmp_path):
    # the launcher stops the other ranks with SIGTERM when one fails; its default action skips atexit
    port = str(free_port())
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONPATH=ROOT)
    code = ("import sys, time; from kd import strategy; path = strategy.shm_buffer_path(0); open(path, 'w').close(); "
            "strategy._remove_shm_buffer_at_exit(0); print('SHM', path, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    path = next(line.split(" ", 1)[1].strip() for line in proc.stdout if line.startswith("SHM "))
    assert path.endswith(f"_{port}_0") and os.path.exists(path)
    proc.terminate()
    assert proc.wait(timeout=60) == 128 + 15
    assert not os.path.exists(path)


def test_train_exits_0_and_saves_a_loadable_changed_model(trained, tiny_model):
    from transformers import AutoTokenizer

    assert trained["code"] == 0, trained["output"][-5000:]
    assert "using SDPA attention" in trained["output"]  # --flash_attn without flash-attn
    folder = trained["out"] / "save" / RUN
    assert (folder / "config.json").exists()
    after, before = load_state(str(folder)), load_state(tiny_model)
    assert after.keys() == before.keys()
    assert all(torch.isfinite(t).all() for t in after.values())
    changed = [name for name in before if not torch.allclose(before[name], after[name], atol=1e-6)]
    assert len(changed) > len(before) // 2
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.chat_template
    config = json.loads((folder / "kd_args.json").read_text())
    assert config["kd_coef"] == [0.5, 0.5, 0.5, 1.0] and config["param_dtype"] == ("bf16" if CUDA else "fp32")


def test_the_log_says_what_runs_and_drops_what_a_user_cannot_act_on(trained):
    output = trained["output"]
    assert trained["code"] == 0, output[-3000:]
    if not CUDA:  # --bf16 --flash_attn asked for; the CPU trains fp32 with SDPA
        assert "runs: fp32 weights and compute, attention sdpa (--bf16 applies on GPUs only)" in output
    assert '"bf16": true' not in output and '"flash_attn": true' not in output  # the config dump shows what runs
    assert json.loads((trained["out"] / "save" / RUN / "kd_args.json").read_text())["attention"]
    for noise in ("untested optimizer", "FutureWarning", "set_vital", "gradient_checkpointing_enable", "\r"):
        assert noise not in output, noise
    assert "Train epoch 0: 3/3" in output or "Train epoch 0: 2/3" in output  # the bar, as lines in a log


def test_tensorboard_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert trained["code"] == 0, trained["output"][-3000:]
    run_dir = trained["out"] / "tb" / "nq" / RUN
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("total", "kd", "lm", "rank", "adaptive", "lr", "skipped_steps"):
        assert f"train/{name}" in tags
    assert [e.step for e in acc.Scalars("train/total")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("train/skipped_steps")] == [0, 0, 0]


def test_packing_samples_trains_the_same_weights(trained, tiny_model):
    # ZeRO-3, gradient checkpointing and teacher offload with packed rows (kd/packed_attention.py):
    # micro-batches of 2 rows of one example (one shared teacher row) run packed and padded
    # through the launcher end at the same weights
    assert trained["code"] == 0, trained["output"][-3000:]
    base = trained["base"]
    grouped = ["--micro_train_batch_size", "2", "--group_by_example"]
    states = {}
    for name, extra in (("padded", []), ("packed", ["--packing_samples"])):
        flags = train_flags(tiny_model, base / "data", base / name) + grouped + extra
        code, output = run(deepspeed_cmd(PROCS) + flags, base)
        assert code == 0, output[-5000:]
        assert ('"packing_samples": true' in output) == (name == "packed")
        states[name] = load_state(str(base / name / "save" / RUN))
    for name, padded in states["padded"].items():
        assert torch.allclose(states["packed"][name], padded, atol=1e-4), name


def test_resume_continues_the_same_data_order(trained, tiny_model):
    assert trained["code"] == 0, trained["output"][-3000:]
    base, out = trained["base"], trained["out"]
    ckpt = base / "resume_ckpt"
    shutil.copytree(out / "ckpt", ckpt)
    assert {p.name for p in ckpt.iterdir() if p.is_dir()} == {"global_step1", "global_step2", "global_step3"}
    assert (ckpt / "latest").read_text() == "global_step3"  # written once every rank has saved
    shutil.rmtree(ckpt / "global_step2")
    shutil.rmtree(ckpt / "global_step3")
    (ckpt / "latest").write_text("global_step1")

    flags = train_flags(tiny_model, base / "data", base / "resumed")
    flags[flags.index("--ckpt_path") + 1] = str(ckpt)
    code, output = run(deepspeed_cmd(PROCS) + flags + ["--load_checkpoint"], base)
    assert code == 0, output[-5000:]
    assert "4 samples consumed" in output
    assert_same_weights(base / "resumed" / "save" / RUN, out / "save" / RUN)


def test_stop_at_pauses_into_a_checkpoint_and_the_rerun_ends_at_the_same_weights(trained, tiny_model):
    # --stop_at in the past: the first optimizer step writes a checkpoint and the run exits 75
    # without a model folder; the same command with --load_checkpoint ends where the run never
    # stopped did (`trained`: 3 steps straight through)
    assert trained["code"] == 0, trained["output"][-3000:]
    base, out = trained["base"], trained["out"]
    flags = train_flags(tiny_model, base / "data", base / "paused")
    code, output = run(deepspeed_cmd(PROCS) + flags + ["--stop_at", "1"], base)
    assert code == 75, output[-5000:]
    assert "paused at --stop_at after optimizer step 1 of 3" in output
    ckpt = base / "paused" / "ckpt"
    assert (ckpt / "latest").read_text() == "global_step1"
    assert not (base / "paused" / "save" / RUN).exists()
    code, output = run(deepspeed_cmd(PROCS) + flags + ["--stop_at", "1", "--load_checkpoint"], base)
    assert code == 75 and "after optimizer step 2 of 3" in output, output[-5000:]
    code, output = run(deepspeed_cmd(PROCS) + flags + ["--load_checkpoint"], base)
    assert code == 0, output[-5000:]
    assert "8 samples consumed" in output
    assert_same_weights(base / "paused" / "save" / RUN, out / "save" / RUN)
