"""Smoke tests of benchmarks/bench_train.py, bench_eval.py and profile_generate.py on CPU with the tiny model.

Benchmarks are not tests: these check only that the scripts run end to end and report
what they promise (both variants, positive figures), never the timing values.
"""

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from pos2distill.errors import UserError
from pos2distill.jsonl import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 4


def _nq_file(path, n=8):
    records = []
    for i in range(n):
        ctxs = [{"title": f"Gold {i}", "text": f"The answer to question {i} is blue.", "hasanswer": True,
                 "isgold": True}]
        ctxs += [{"title": f"Other {i}.{j}", "text": f"Unrelated passage {j}.", "hasanswer": False, "isgold": False}
                 for j in range(TOTAL - 1)]
        records.append({"question": f"what is the answer to question {i}", "answers": ["blue"], "ctxs": ctxs})
    write_jsonl(str(path), records)
    return path


def _run(script, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _check_train_report(report, sizes, attention=("padded",), engine="torch"):
    results = report["results"]
    expected = {(variant, a, size) for variant in ("ours", "naive") for a in attention for size in sizes}
    assert {(r["variant"], r["attention"], r["micro_batch_size"]) for r in results} == expected
    for r in results:
        assert r["status"] == "ok"
        keys = ["step_seconds_median", "student_tokens_per_s", "achieved_tflops", "mfu", "step_memory_gib",
                "student_tokens", "teacher_tokens", "flops_per_step", "attention_flops_per_step"]
        for key in keys + (["loss_memory_gib"] if engine == "torch" else []):
            assert r[key] > 0, (key, r)
        assert r["mfu_with_attention"] > r["mfu"]
        if r["attention"] == "packed":
            assert r["hfu"] >= r["mfu_with_attention"]
        else:  # padded rows compute their padding too: no hardware-FLOPs figure
            assert r["hfu"] is None and r["hardware_flops_per_step"] is None
        assert r["peak_memory_gib"] is None  # CPU: no allocator statistics
        phases = r["phase_seconds_median"]
        assert list(phases) == ["teacher_forward", "student_forward_backward", "optimizer"]
        assert all(v > 0 for v in phases.values()) and r["host_peak_rss_gib"] > 0.1
        # the phases tile the step: their medians add up to about the median step
        assert 0.5 < sum(phases.values()) / r["step_seconds_median"] < 1.5
    pairs = len(attention) + (len(attention) == 2)  # same layout each, plus ours packed vs naive padded
    assert [c["micro_batch_size"] for c in report["comparison"]] == [s for s in sorted(sizes) for _ in range(pairs)]
    assert all(c["tokens_per_s_ratio"] > 0 and (engine != "torch" or c["loss_memory_ratio_naive_over_ours"] > 0)
               for c in report["comparison"])
    assert "6" in report["flops_formula"] and report["student_non_embedding_params"] > 0
    assert report["engine"].startswith("plain torch" if engine == "torch" else "DeepSpeed ZeRO-")
    for r in (r for r in results if r["attention"] == "packed"):  # HFU counts checkpointing's recomputation
        recomputed = r["hardware_flops_per_step"] - r["flops_per_step"] - r["attention_flops_per_step"]
        dense = 2 * report["student_non_embedding_params"] * r["student_tokens"]
        if report["args"]["gradient_checkpointing"]:
            assert recomputed > dense, (recomputed, dense)  # the dense forward plus its attention
        else:
            assert recomputed == 0


def test_bench_train_synthetic(tmp_path, tiny_model):
    out = tmp_path / "train.json"
    stdout = _run("bench_train.py", "--model", tiny_model, "--device", "cpu", "--threads", "1",
                  "--prompt_len", 48, "--response_len", 4, "--micro_batch_sizes", 1, 2, "--warmup", 1, "--steps", 2,
                  "--peak_tflops", 1.0, "--attention", "packed", "--output", out)
    report = json.loads(out.read_text())
    _check_train_report(report, [1, 2], ("packed",))
    assert report["peak_tflops"] == 1.0 and report["peak_tflops_source"] == "--peak_tflops"
    assert "FLOPs/step" in stdout and "ours/naive tokens/s" in stdout
    # every row is a distinct example: the teacher runs once per row in both variants
    assert all(r["teacher_rows"] == r["micro_batch_size"] for r in report["results"])


def test_bench_train_at_a_shape_with_random_weights(tmp_path):
    out = tmp_path / "train.json"
    stdout = _run("bench_train.py", "--shape", "tiny-qwen2", "--device", "cpu", "--threads", "1",
                  "--prompt_len", 32, "--response_len", 4, "--micro_batch_sizes", 2, "--warmup", 0, "--steps", 2,
                  "--peak_tflops", 1.0, "--attention", "packed", "--output", out)
    report = json.loads(out.read_text())
    _check_train_report(report, [2], ("packed",))
    assert report["student"].startswith("shape tiny-qwen2") and "teach ms" in stdout
    # hidden 64, 2 layers, q/k/v biases: the non-embedding count of the tiny shape
    assert report["student_non_embedding_params"] == 2 * (64 * (64 + 2 * 32) + 64 * 64 + 64 + 2 * 32
                                                          + 3 * 64 * 128 + 2 * 64) + 64


def test_bench_train_deepspeed_zero3_with_teacher_offload(tmp_path):
    data = _nq_file(tmp_path / "nq-4.jsonl.gz")
    out = tmp_path / "train.json"
    stdout = _run("bench_train.py", "--shape", "tiny-llama", "--engine", "deepspeed", "--zero_stage", 3,
                  "--teacher_offload", "--gradient_checkpointing", "--device", "cpu", "--threads", "1",
                  "--data", data, "--total_doc", TOTAL, "--micro_batch_sizes", 1, 2, "--warmup", 1, "--steps", 1,
                  "--peak_tflops", 1.0, "--attention", "packed", "--output", out)
    report = json.loads(out.read_text())
    _check_train_report(report, [1, 2], ("packed",), engine="deepspeed")
    assert "teacher_offload True" in report["engine"] and "loss_memory_gib" not in report["results"][0]
    assert "DeepSpeed ZeRO-3" in stdout


def test_bench_train_real_data_dedups_teacher(tmp_path, tiny_model):
    data = _nq_file(tmp_path / "nq-4.jsonl.gz")
    out = tmp_path / "train.json"
    _run("bench_train.py", "--model", tiny_model, "--device", "cpu", "--threads", "1", "--data", data,
         "--total_doc", TOTAL, "--copies_per_example", 2, "--micro_batch_sizes", 2, "--warmup", 0, "--steps", 1,
         "--gradient_checkpointing", "--peak_tflops", 1.0, "--profile", "--attention", "padded", "packed",
         "--output", out)
    report = json.loads(out.read_text())
    _check_train_report(report, [2], ("padded", "packed"))
    assert {(c["ours_attention"], c["naive_attention"]) for c in report["comparison"]} == {
        ("padded", "padded"), ("packed", "packed"), ("packed", "padded")}
    by_layout = {(r["variant"], r["attention"]): r for r in report["results"]}
    for variant in ("ours", "naive"):  # the same rows and FLOPs whichever the layout
        padded, packed = by_layout[(variant, "padded")], by_layout[(variant, "packed")]
        for key in ("student_tokens", "teacher_tokens", "flops_per_step", "attention_flops_per_step"):
            assert padded[key] == packed[key], key
    rows = {r["variant"]: r for r in report["results"] if r["attention"] == "padded"}
    assert rows["ours"]["teacher_rows"] == 1 and rows["naive"]["teacher_rows"] == 2
    # --profile: one more step of "ours" profiled (host operators only on a CPU), none of "naive"
    profiled = rows["ours"]["profile"]
    assert "profile" not in rows["naive"] and profiled["profiled_wall_s"] > 0
    ops = profiled["top_self_cpu_ms"]
    assert ops and all(op["calls"] >= 1 and op["ms"] >= 0 for op in ops) and "top_self_device_ms" not in profiled
    # the profiler's matmul count covers at least the dense part of the model FLOPs (the tiny
    # model's LM head and the padding add more); no device kinds without a GPU
    assert profiled["matmul_flops"] >= 0.9 * rows["ours"]["flops_per_step"] > 0
    assert "device_ms_by_kind" not in profiled
    assert report["student_prompt_tokens"]["min"] > 50  # chat-templated prompts with 4 documents


def test_bench_eval(tmp_path, tiny_model):
    data = _nq_file(tmp_path / "nq-4.jsonl.gz")
    out = tmp_path / "eval.json"
    stdout = _run("bench_eval.py", "--data", data, "--model", tiny_model, "--device", "cpu", "--threads", "1",
                  "--total_doc", TOTAL, "--sample_num", 5, "--positions", "0,last", "--batch_size", 4,
                  "--baseline_batch_size", 3, 2, "--max_new_tokens", 8, "--warmup_prompts", 1,
                  "--dtype", "float32", "--tf32", "--output", out)
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert set(runs) == {"ours_bs4", "ours_bs4_compact", "baseline", "baseline_bs2"} and report["prompts"] == 10
    assert report["precision"] == "float32 with TF32 matmuls" and "(float32 with TF32 matmuls)" in stdout
    # the second baseline size is compared with the first: the batch shape's own score changes
    again = runs["baseline_bs2"]
    assert again["batch_size"] == 2 and runs["baseline"]["batch_size"] == 3
    assert 0 <= again["score_mismatches"] <= 10 and again["speedup_vs_baseline"] > 0
    for run in runs.values():
        assert run["prompts"] == 10 and run["prompts_per_s"] > 0 and run["seconds"] > 0
        assert 0 < run["useful_decode_fraction"] <= 1 and 0 <= run["padding_fraction"] < 1
    for name in ("ours_bs4", "ours_bs4_compact"):
        ours = runs[name]
        assert ours["speedup_vs_baseline"] > 0
        assert 0 <= ours["score_mismatches"] <= 10
        assert len(ours["examples"]) == min(ours["score_mismatches"], 5)
    assert runs["ours_bs4_compact"]["compact_finished"] and not runs["ours_bs4"]["compact_finished"]
    assert "speed-up" in stdout


def test_bench_eval_baseline_only(tmp_path, tiny_model):
    data = _nq_file(tmp_path / "nq-4.jsonl.gz")
    out = tmp_path / "eval.json"
    stdout = _run("bench_eval.py", "--data", data, "--model", tiny_model, "--device", "cpu", "--threads", "1",
                  "--total_doc", TOTAL, "--sample_num", 3, "--positions", "0", "--baseline_batch_size", 2,
                  "--max_new_tokens", 4, "--warmup_prompts", 1, "--baseline_only", "--output", out)
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert set(runs) == {"baseline"} and runs["baseline"]["prompts"] == 3 and runs["baseline"]["prompts_per_s"] > 0
    # per-prompt scores, paired with their (example, position): the last 3 examples at position 0
    assert report["items"] == [[i, 0] for i in range(5, 8)]
    assert set(report["scores"]) == {"baseline"} and len(report["scores"]["baseline"]) == 3
    assert 100.0 * sum(report["scores"]["baseline"]) / 3 == runs["baseline"]["accuracy"]
    assert "ours" not in stdout.replace("ours-", "")


def test_bench_eval_positions_per_call(tmp_path, tiny_model):
    data = _nq_file(tmp_path / "nq-4.jsonl.gz")
    out = tmp_path / "eval.json"
    stdout = _run("bench_eval.py", "--data", data, "--model", tiny_model, "--device", "cpu", "--threads", "1",
         "--total_doc", TOTAL, "--sample_num", 3, "--positions", "all", "--batch_size", 8, "--compact", "off",
         "--positions_per_call", 2, "--max_new_tokens", 6, "--warmup_prompts", 0, "--dtype", "bfloat16",
         "--output", out)
    report = json.loads(out.read_text())
    assert "on cpu (bfloat16)" in stdout  # the loaded model's dtype, printed by the benchmark
    runs = report["runs"]
    ours = runs["ours_bs8"]
    assert ours["positions_per_call"] == 2 and ours["prompts"] == 3 * TOTAL
    # 2 calls of 6 prompts, one batch each: every row of a call is decoded for that call's steps
    assert ours["row_steps"] == 6 * ours["decode_steps"]


def test_bench_probe(tmp_path, tiny_model):
    data = _nq_file(tmp_path / "nq-4.jsonl.gz")
    stdout = _run("bench_probe.py", "--data", data, "--model", tiny_model, "--total_doc", TOTAL, "--probe_num", 3,
                  "--eval_holdout", 2, "--max-new-tokens", 4, "--batch_size", 4, "--repeats", 1)
    assert f"3 questions x {TOTAL} positions, batch 4:" in stdout and "same answers: True" in stdout
    assert "positions per call  1:" in stdout and f"positions per call  {TOTAL}:" in stdout


def test_profile_generate(tmp_path, tiny_model):
    data = _nq_file(tmp_path / "nq-4.jsonl.gz")
    out = tmp_path / "profile.json"
    stdout = _run("profile_generate.py", "--data", data, "--model", tiny_model, "--device", "cpu", "--total_doc", TOTAL,
                  "--position", 1, "--batch_size", 3, "--max_new_tokens", 4, "--cache", "dynamic", "static", "static_eager",
                  "--bucket", 64, "--repeats", 1, "--output", out)
    report = json.loads(out.read_text())
    assert report["batch"] == 3 and set(report["configs"]) == {"dynamic", "static", "static_eager"}
    dynamic, static = report["configs"]["dynamic"], report["configs"]["static"]
    assert static["width"] % 64 == 0 and static["width"] >= dynamic["width"] == report["longest_prompt"]
    for entry in (dynamic, static):
        assert entry["full_s"] > 0 and entry["prefill_s"] > 0 and entry["top_self_cpu_ms"]
    assert "per decoding step" in stdout


def _load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_reports_out_of_memory_and_goes_on(monkeypatch):
    import torch

    bench = _load_benchmark("bench_train")
    args = bench.parse_args(["--prompt_len", "8", "--response_len", "2", "--warmup", "1", "--steps", "1"])
    batch = bench.collate(bench.synthetic_items(args, SimpleNamespace(eos_token_id=0), 100, 2), pad_id=0)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench, "train_step", out_of_memory)
    monkeypatch.setattr(bench, "attention_flops_per_pass", lambda model, lengths: 0)
    student = torch.nn.Linear(1, 1)
    models = bench.TorchUpdater(student, None, 1e-3, torch.device("cpu"))
    naive = bench.run_config(args, "naive", "padded", 2, batch, models, None, torch.device("cpu"),
                             {"student": 1, "teacher": 1}, None)
    assert naive["status"] == "OOM" and naive["teacher_rows"] == 2 and naive["host_peak_rss_gib"] > 0
    ours = {"variant": "ours", "attention": "padded", "micro_batch_size": 2, "status": "ok", "step_seconds_median": 0.1,
            "student_tokens_per_s": 100.0, "achieved_tflops": 0.1, "mfu": None, "peak_memory_gib": None,
            "step_memory_gib": 0.1, "loss_memory_gib": "OOM", "host_peak_rss_gib": 1.0,
            "phase_seconds_median": {"teacher_forward": 0.02, "student_forward_backward": 0.07, "optimizer": 0.01}}
    assert bench.comparisons([ours, naive]) == [{"micro_batch_size": 2, "ours_attention": "padded",
                                                 "naive_attention": "padded", "ours": "ok", "naive": "OOM"}]
    table = bench.table([ours, naive])
    assert "OOM" in table.splitlines()[2] and "OOM" in table.splitlines()[1]


def test_bench_train_compiles_each_decoder_layer(tiny_model):
    import torch

    bench = _load_benchmark("bench_train")
    model = bench.load_model(tiny_model, torch.device("cpu"), torch.float32, False, False)
    ids = torch.arange(3, 19).view(2, 8)
    eager = model(input_ids=ids).logits
    bench.compile_decoder_layers(model)
    layers = model.model.layers
    assert len(layers) >= 2 and all(layer._compiled_call_impl is not None for layer in layers)
    torch.testing.assert_close(model(input_ids=ids).logits, eager, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="no model.layers"):
        bench.compile_decoder_layers(torch.nn.Linear(2, 2))


def test_profile_sorts_kernels_by_kind():
    from types import SimpleNamespace

    from benchmarks.profiling import device_time_by_kind, kernel_kind

    names = {  # kernel names as an H200 profile printed them
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1_kernel0_0":
            "attention",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>": "attention",
        "nvjet_sm90_tst_128x192_64x5_1x2_h_bz_coopB_NNN": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "triton_tem_fused_mm_0": "matmul",
        # compiled pointwise kernels name the operators they fused, attention among them
        "triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_add_cat_cos_mul": "compiled fused",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>>":
            "optimizer",
        "void at::native::vectorized_elementwise_kernel<8, at::native::silu_kernel>": "other",
    }
    assert {name: kernel_kind(name) for name in names} == names
    events = [SimpleNamespace(key=name, self_device_time_total=1500) for name in names]
    assert device_time_by_kind(events) == {"attention": 3.0, "matmul": 4.5, "compiled fused": 1.5,
                                           "optimizer": 1.5, "other": 1.5}


def test_bench_packed_attention_on_cpu(tmp_path):
    out = tmp_path / "attn.json"
    stdout = _run("bench_packed_attention.py", "--rows", 3, "--min_len", 5, "--max_len", 9, "--heads", 4,
                  "--kv_heads", 2, "--head_dim", 8, "--warmup", 0, "--steps", 2, "--device", "cpu",
                  "--methods", "varlen", "per_row", "per_row_math", "--output", out)
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert rows["varlen"]["status"] == "unavailable"  # a CUDA kernel: reported, not fatal
    for method in ("per_row", "per_row_math"):
        assert rows[method]["status"] == "ok" and rows[method]["ms_median"] > 0
        assert rows[method]["max_abs_diff_fp32"] < 1e-5
    assert len(report["lengths"]) == 3 and all(5 <= n <= 9 for n in report["lengths"])
    assert "TFLOP per forward + backward" in stdout


def test_packed_attention_kernels_match_a_block_diagonal_mask():
    import torch

    bench = _load_benchmark("bench_packed_attention")
    # the FLOP count by hand: rows of 2 and 3 tokens, 1 head of width 1
    assert bench.causal_flops([2, 3], 1, 1) == int((2 * 4 + 2 * 9) * 3.5)
    lengths, heads, kv_heads, dim = [3, 5], 4, 2, 8
    torch.manual_seed(0)
    q = torch.randn(sum(lengths), heads, dim)
    k, v = torch.randn(2, sum(lengths), kv_heads, dim)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    # independent reference: one dense attention over all tokens, masked to causal within each row
    row = torch.repeat_interleave(torch.arange(2), torch.tensor(lengths))
    allowed = (row[:, None] == row[None, :]) & torch.ones(8, 8, dtype=torch.bool).tril()
    expand = lambda t: t.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)  # noqa: E731
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), expand(k), expand(v), attn_mask=allowed).transpose(0, 1)
    for method in ("per_row", "per_row_math"):
        torch.testing.assert_close(bench.attention_fn(method)(q, k, v, cu, 5), expected, rtol=1e-5, atol=1e-5)


def test_bench_pine_kernel_on_cpu(tmp_path):
    out = tmp_path / "pine_kernel.json"
    stdout = _run("bench_pine_kernel.py", "--device", "cpu", "--hidden", 32, "--heads", 4, "--kv_heads", 2,
                  "--intermediate", 64, "--layers", 1, "--rows", 2, "--docs", 3, "--doc_tokens", 4, 7,
                  "--decode_steps", 2, "--repeats", 1, "--output", out)
    report = json.loads(out.read_text())
    assert report["rows"] == 2 and report["prefill_seconds"] > 0 and report["decode_seconds_per_step"] > 0
    kernels = report["prefill_kernel_seconds"]
    assert {"prompt_importance", "document_queries", "attend"} <= set(kernels)
    assert sum(kernels.values()) <= report["prefill_seconds"] * 1.5  # the kernels are inside the prefill
    assert "prefill by kernel" in stdout
