"""The real stage-3 path on a builder folder: train_nq.sh on a random-weight shape, the save
reloaded and its logits compared with the trained model's (kd/save_check.py)."""

import json
import os
import subprocess
import sys

import torch

from kd.save_check import compare
from test_train_kd_e2e import free_port, make_pair_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_fails_a_perturbed_reload():
    trained = torch.randn(1, 5, 11)
    assert compare(trained, trained.clone(), torch.float32)["ok"]
    broken = compare(trained, trained + 0.1 * trained.abs().max(), torch.float32)
    assert not broken["ok"] and broken["relative"] > 0.09
    bf16_noise = trained * (1 + 2 ** -9)  # what bf16 weights give against an fp32 reload
    assert compare(trained, bf16_noise, torch.bfloat16)["ok"]


def train_tiny_shape(tmp_path, *flags):
    """``train_nq.sh --check_saved_logits FLAGS`` on a tiny-qwen2 builder folder (CPU, ZeRO-3, packed
    rows): (the run's output, the saved folder, the builder folder)."""
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    model = tmp_path / "tiny-qwen2"
    subprocess.run([sys.executable, "-m", "pos2distill.model_shapes", "--shape", "tiny-qwen2", "--out", str(model),
                    "--dtype", "float32", "--device", "cpu"], check=True, env=env, cwd=ROOT, capture_output=True)
    make_pair_dataset(tmp_path / "data" / "shapepairs", n_examples=2, copies=1)
    env.update(MODEL=str(model), DATASET="shapepairs", DATA_ROOT=str(tmp_path / "data"), SAVE_PATH=str(tmp_path / "save"),
               CKPT_PATH=str(tmp_path / "ckpt"), TENSORBOARD=str(tmp_path / "tb"), TRAIN_BATCH="2", MICRO_BATCH="1",
               MAX_LEN="4096", LR="1e-2", MASTER_PORT=str(free_port()), PACKING="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # the venv's deepspeed launcher
    done = subprocess.run(["bash", os.path.join(ROOT, "train_nq.sh"), "--check_saved_logits", *flags], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (saved,) = [d for d in (tmp_path / "save").iterdir() if d.is_dir()]
    return done, saved, model


def test_train_nq_sh_on_a_shape_folder_saves_what_it_trained(tmp_path):
    done, saved, model = train_tiny_shape(tmp_path)
    check = json.loads((saved / "save_check.json").read_text())
    assert check["ok"] and check["argmax_agreement"] == 1.0 and check["probe_tokens"] > 10
    weights = check["weights"]  # gathered from ZeRO-3 one tensor at a time, equal bit for bit
    assert weights["ok"] and weights["compared"] > 10 and weights["differ_count"] == weights["missing_count"] == 0
    # training moved the weights: the save is not the builder's folder
    from safetensors.torch import load_file

    before, after = load_file(str(model / "model.safetensors")), load_file(str(saved / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "save check" in done.stdout + done.stderr


def test_compare_weights_finds_one_changed_tensor_and_a_missing_one(tmp_path):
    from kd.save_check import compare_weights
    from pos2distill.model_shapes import build_model, shape_config

    model = build_model(shape_config("tiny-qwen2", vocab_size=256), device="cpu", dtype=torch.float32, seed=0)
    model.save_pretrained(str(tmp_path / "saved"))
    same = compare_weights(model, str(tmp_path / "saved"), rank0=True)
    assert same["ok"] and same["compared"] == len(list(model.named_parameters(remove_duplicate=False)))
    with torch.no_grad():
        next(iter(model.model.layers[0].parameters())).add_(1e-3)  # trained after the save
    changed = compare_weights(model, str(tmp_path / "saved"), rank0=True)
    assert not changed["ok"] and changed["differ_count"] == 1 and changed["max_abs_diff"] > 0
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "saved" / "model.safetensors"))
    tensors.pop("model.norm.weight")
    save_file(tensors, str(tmp_path / "saved" / "model.safetensors"), metadata={"format": "pt"})
    assert compare_weights(model, str(tmp_path / "saved"), rank0=True)["missing"] == ["model.norm.weight"]


def test_checkpointing_uses_the_name_the_installed_transformers_has():
    from kd.train_kd import enable_checkpointing

    class Old:  # transformers < 5.23: only the old name
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs):
            self.called = ("old", gradient_checkpointing_kwargs)

    class New(Old):
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs):
            self.called = ("new", activation_checkpointing_kwargs)

    old, new = Old(), New()
    enable_checkpointing(old, False)
    enable_checkpointing(new, True)
    assert old.called == ("old", {"use_reentrant": False}) and new.called == ("new", {"use_reentrant": True})


ZERO3_PROBE = r"""
import os, sys, torch, deepspeed
from kd.losses import response_logits
from kd.save_check import engine_logits
from pos2distill.model_shapes import build_model, shape_config
deepspeed.init_distributed("gloo")
model = build_model(shape_config("tiny-qwen2", vocab_size=256), device="cpu", dtype=torch.float32, seed=0)
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
for _ in range(2):
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
def held():
    return sum(p.ds_status.name != "NOT_AVAILABLE" for p in engine.module.parameters())
engine.eval()
with torch.no_grad():
    response_logits(engine, ids, torch.ones_like(ids), 8)  # a bare eval forward
print("bare", held())
engine.empty_partition_cache()
engine_logits(engine, ids, "cpu", packed=False)
print("check", held())
"""


def test_the_probe_forward_leaves_no_zero3_parameter_gathered(tmp_path):
    # At the 7B shape on the H200 the weight comparison after the probe forward failed with
    # "Cannot partition a param in flight": that forward had left parameters gathered or being
    # prefetched. On CPU nothing is in flight, but the same forward leaves parameters gathered;
    # engine_logits must hand every one back before compare_weights gathers them one at a time.
    env = dict(os.environ, PYTHONPATH=ROOT, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", ZERO3_PROBE], env=env, cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    counts = dict(line.split() for line in done.stdout.splitlines() if line.startswith(("bare", "check")))
    assert int(counts["bare"]) > 0, "a bare eval forward no longer leaves parameters gathered: the test shows nothing"
    assert int(counts["check"]) == 0


def test_compare_weights_checks_a_lora_folder_by_its_adapter_tensors(tmp_path):
    from peft import LoraConfig, get_peft_model

    from kd.save_check import compare_weights
    from pos2distill.model_shapes import build_model, shape_config

    base = build_model(shape_config("tiny-qwen2", vocab_size=256), device="cpu", dtype=torch.float32, seed=0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    lora = [p for name, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for param in lora:  # lora_B starts at zero: give every adapter tensor its own values
            param.normal_(0.0, 0.02)
    model.save_pretrained(str(tmp_path / "adapter"))
    same = compare_weights(model, str(tmp_path / "adapter"), rank0=True, adapter="default")
    assert same["ok"] and same["compared"] == len(lora) > 0
    # read as a full model, the folder lacks every base weight
    assert compare_weights(model, str(tmp_path / "adapter"), rank0=True)["missing_count"] > 0
    with torch.no_grad():
        lora[-1].add_(1e-3)
    changed = compare_weights(model, str(tmp_path / "adapter"), rank0=True, adapter="default")
    assert not changed["ok"] and changed["differ_count"] == 1
    from kd.save_check import compare_adapter_config

    assert compare_adapter_config(model, str(tmp_path / "adapter"), "default")["ok"]
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), r=8)))
    wrong = compare_adapter_config(model, str(tmp_path / "adapter"), "default")
    assert not wrong["ok"] and wrong["differ"] == ["r: saved 8, trained 4"]
    # PEFT's other saved kinds: an embedding adapter (saved with its base embedding), DoRA magnitudes
    for extra in ({"target_modules": ["q_proj", "embed_tokens"]}, {"target_modules": ["q_proj"], "use_dora": True}):
        base = build_model(shape_config("tiny-qwen2", vocab_size=256), device="cpu", dtype=torch.float32, seed=0)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **extra))
        folder = tmp_path / f"adapter-{len(extra)}-{extra['target_modules'][-1]}"
        model.save_pretrained(str(folder))
        same = compare_weights(model, str(folder), rank0=True, adapter="default")
        assert same["ok"] and same["compared"] >= 6, (extra, same)


def test_train_nq_sh_with_lora_saves_the_adapters_it_trained(tmp_path):
    _, saved, _ = train_tiny_shape(tmp_path, "--lora_rank", "4")
    from safetensors.torch import load_file

    adapters = load_file(str(saved / "adapter_model.safetensors"))
    check = json.loads((saved / "save_check.json").read_text())
    assert check["ok"] and check["weights"]["compared"] == len(adapters) > 0 and check["adapter_config"]["ok"]
    assert any(float(t.abs().max()) > 0 for k, t in adapters.items() if "lora_B" in k)  # trained off zero
