"""reproduce.py's pine experiment (issue 19's four-way table) on CPU with the tiny model: base, PINE,
Pos2Distill (trained, 1 seed) and Pos2Distill + PINE through the real CLIs, paired comparisons,
PINE's flatness and its cost; and the dry-run plan (sharing with table3, --p2d_checkpoint)."""

import json

from test_reproduce_script import record, reproduce, tiny_run

from pos2distill.jsonl import write_jsonl

ROWS = ["base", "pine", "p2d", "p2d_pine"]


def test_pine_experiment_on_cpu(tmp_path, tiny_model):
    data = tmp_path / "nq-open-3_total_documents.jsonl.gz"
    write_jsonl(str(data), [record(i) for i in range(10)])
    out = tmp_path / "out"
    args = tiny_run("pine", tiny_model, data, out) + ["--pine_batch", "4", "--bench_num", "2", "--bench_batch", "2"]
    proc = reproduce(*args)
    logs = "".join(f"--- {f.name}\n{f.read_text()[-1500:]}" for f in (out / "logs").glob("*.log")) if proc.returncode else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    steps = sorted(p.stem for p in (out / "steps").glob("*.json"))
    assert steps == sorted(["stage1", "stage2-1strengthen-filter-seed42", "train-p2d-seed42", "eval-base-nq3",
                            "eval-pine-nq3", "eval-p2d-seed42-nq3", "eval-p2d_pine-seed42-nq3", "compare-pine-nq3",
                            "compare-p2d-seed42-nq3", "compare-p2d_pine-seed42-nq3",
                            "compare-p2d_pine-seed42-vs-p2d-seed42-nq3", "bench-pine"])
    for label, batch in [("pine", "4"), ("p2d_pine-seed42", "4"), ("base", "8"), ("p2d-seed42", "8")]:
        argv = json.loads((out / "steps" / f"eval-{label}-nq3.json").read_text())["config"]["argv"]
        assert argv[argv.index("--batch_size") + 1] == batch and ("--inference" in argv) == ("pine" in label)
    [ckpt] = (out / "checkpoints" / "p2d-seed42").glob("*_kd*")
    assert ckpt.name in (out / "steps" / "eval-p2d_pine-seed42-nq3.json").read_text()  # the trained checkpoint
    compared = json.loads((out / "compare" / "nq3-p2d_pine-seed42-vs-p2d-seed42.json").read_text())
    assert compared["label_a"] == "p2d-seed42" and compared["average"]["examples"] == 4
    numbers = json.loads((out / "table.json").read_text())["nq3"]
    assert list(numbers) == ROWS and all(numbers[row]["runs"] == 1 for row in ROWS)
    table = (out / "table.md").read_text()
    assert table in proc.stdout
    # the tiny model's answers are all wrong, so every curve is flat here: this checks the plumbing
    # (tests/test_flatness.py checks the flag on biased and flat curves; tests/test_pine.py PINE's invariance)
    for row in ("pine", "p2d_pine"):
        [flat] = numbers[row]["flatness"].values()
        assert flat["positions"] == [0, 1, 2] and flat["questions"] == 4
        assert flat["q"] == 0.0 and flat["p"] == 1.0 and flat["gap_ci95"] == [0.0, 0.0] and flat["flat"]
        assert len(set(numbers[row]["accuracy"].values())) == 1
        assert next(line for line in table.splitlines() if line.startswith(f"| {row} | 1/1 |")).endswith("| yes |")
    for line in ("- pine: average", "- p2d-seed42: average", "- p2d_pine-seed42: average",
                 "- p2d_pine-seed42: average %+.1f points vs p2d-seed42" % compared["average"]["difference"],
                 "- pine: Q 0.00 (df 2), p 1: flat; gap 0.0 [0.0, 0.0] points (4 questions)"):
        assert line in table, line
    bench = json.loads((out / "bench_pine.json").read_text())
    assert bench["prompts"] == 4 and [r["batch_size"] for r in bench["runs"]] == [2]
    assert "### PINE's cost (benchmarks/bench_pine.py): 4 prompts" in table
    assert f"| 2 | {bench['runs'][0]['plain']['prompts_per_s']:.2f} |" in table


def test_pine_dry_run_shares_table3_steps_and_takes_a_checkpoint(tmp_path, tiny_model):
    data = tmp_path / "nq-open-20_total_documents.jsonl.gz"
    write_jsonl(str(data), [record(i) for i in range(2)])
    out = tmp_path / "out"
    common = ["--model", tiny_model, "--data", str(data), "--out", str(out), "--gpus", "0", "--seeds", "1", "--dry_run"]
    pine, table3 = reproduce("pine", *common, timeout=60), reproduce("table3", *common, timeout=60)
    assert pine.returncode == 0 and table3.returncode == 0, pine.stderr + table3.stderr
    # stage 1 + stage 2 + training, 4 evaluations, 4 comparisons, the benchmark
    assert pine.stdout.startswith("12 steps (0 done) on GPU 0") and not out.exists()

    def blocks(text):  # step id -> its description (id line and command)
        lines = text.splitlines()[1:]
        return {lines[i].split()[1]: lines[i] + lines[i + 1] for i in range(0, len(lines), 2)}

    pine_steps, table3_steps = blocks(pine.stdout), blocks(table3.stdout)
    shared = ["stage1", "stage2-1strengthen-filter-seed42", "train-p2d-seed42", "eval-base-nq20",
              "eval-p2d-seed42-nq20", "compare-p2d-seed42-nq20"]
    assert all(pine_steps[s] == table3_steps[s] for s in shared)  # same --out: done once for both
    assert "--inference pine" in pine_steps["eval-pine-nq20"] and "--batch_size 16" in pine_steps["eval-pine-nq20"]
    assert "--batch_size 256" in pine_steps["eval-base-nq20"] and "--inference" not in pine_steps["eval-base-nq20"]
    # a cut PINE evaluation keeps each finished position; plain ones group 4 per generate call
    assert "--positions_per_call 1 " in pine_steps["eval-pine-nq20"]
    assert "--positions_per_call 4 " in pine_steps["eval-base-nq20"]
    assert "--positions 0,5,10,15,last" in pine_steps["eval-pine-nq20"]
    assert "bench_pine.py" in pine_steps["bench-pine"] and "--batch_size 8 32" in pine_steps["bench-pine"]

    # a given checkpoint: no stages 1-3, the p2d rows evaluate it once
    given = reproduce("pine", *common, "--p2d_checkpoint", tiny_model, "--pine_batch", "5", timeout=60)
    assert given.returncode == 0, given.stderr
    steps = blocks(given.stdout)
    assert sorted(steps) == sorted(["eval-base-nq20", "eval-pine-nq20", "eval-p2d-nq20", "eval-p2d_pine-nq20",
                                    "compare-pine-nq20", "compare-p2d-nq20", "compare-p2d_pine-nq20",
                                    "compare-p2d_pine-vs-p2d-nq20", "bench-pine"])
    assert f"--model {tiny_model} --label p2d_pine" in steps["eval-p2d_pine-nq20"]
    assert "--batch_size 5" in steps["eval-p2d_pine-nq20"] and "(1 GPU)" in steps["eval-p2d-nq20"]
    for args, message in [(["--p2d_checkpoint", str(tmp_path / "none")], "error: --p2d_checkpoint "),
                          (["--p2d_checkpoint", tiny_model, "--rows", "base,pine"],
                           "error: --p2d_checkpoint: no row of pine evaluates p2d"),
                          (["--pine_batch", "0"], "error: --pine_batch must be at least 1")]:
        proc = reproduce("pine", *common, *args, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert not out.exists()
