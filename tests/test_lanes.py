"""pos2distill.lanes: the scheduler with fake GPUs and fake steps (no real work), and the
done-markers that let a run resume."""

import json

import pytest

from pos2distill.errors import UserError
from pos2distill.lanes import Step, finished_steps, mark_done, run_steps


class FakeRun:
    """A step that 'runs' for ``ticks`` polls and exits with ``rc``; records GPU use per tick."""

    def __init__(self, world, step, gpus):
        self.world, self.step, self.gpus = world, step, gpus
        self.left = world["ticks"].get(step.id, 2)
        world["started"].append((step.id, tuple(gpus), list(world["finished"])))

    def poll(self):
        busy = [g for run in self.world["running"] for g in run.gpus]
        assert len(busy) == len(set(busy)) or self.world["shared"], f"a GPU runs two steps: {busy}"
        self.world["most_busy"] = max(self.world["most_busy"], len(busy))
        self.left -= 1
        if self.left > 0:
            return None
        self.world["running"].remove(self)
        self.world["finished"].append(self.step.id)
        return self.world["rc"].get(self.step.id, 0)

    def terminate(self):
        self.world["terminated"].append(self.step.id)


def fake_world(ticks=None, rc=None):
    world = {"ticks": ticks or {}, "rc": rc or {}, "started": [], "finished": [], "running": [], "terminated": [],
             "shared": False, "most_busy": 0}

    def launch(step, gpus):
        run = FakeRun(world, step, gpus)
        world["running"].append(run)
        return run

    return world, launch


def experiment(rows=("a", "b", "c")):
    steps = [Step("stage1", ["x"], gpus=1), Step("eval-base", ["x"], gpus=1)]
    for row in rows:
        steps += [Step(f"train-{row}", ["x"], gpus=1, needs=("stage1",)),
                  Step(f"eval-{row}", ["x"], gpus=1, needs=(f"train-{row}",)),
                  Step(f"compare-{row}", ["x"], needs=("eval-base", f"eval-{row}"))]
    return steps


def test_steps_spread_over_gpus_after_what_they_need():
    world, launch = fake_world(ticks={"stage1": 3, "train-a": 5})
    status = run_steps(experiment(), ["0", "1", "2"], launch, poll_s=0, log=lambda _: None)
    assert set(status.values()) == {"ok"} and len(status) == 11
    started = {sid: (gpus, before) for sid, gpus, before in world["started"]}
    assert [s for s, _, _ in world["started"]].count("stage1") == 1  # stage 1 once
    for sid, (gpus, before) in started.items():
        step = next(s for s in experiment() if s.id == sid)
        assert set(step.needs) <= set(before), (sid, before)  # only after what it needs
        assert len(gpus) == step.gpus
    # the base evaluation does not wait for stage 1: both start at once on two GPUs
    assert started["stage1"][0] != started["eval-base"][0] and started["eval-base"][1] == []
    # all three GPUs were used
    assert len({g for g, _ in started.values() for g in g}) == 3


def test_a_failed_step_skips_what_needs_it_only():
    world, launch = fake_world(rc={"train-b": 1})
    status = run_steps(experiment(), ["0"], launch, poll_s=0, log=lambda _: None)
    assert status["train-b"] == "failed"
    assert status["eval-b"] == "skipped" and status["compare-b"] == "skipped"
    assert status["compare-a"] == status["compare-c"] == "ok"


def test_done_steps_are_not_run_and_multi_gpu_steps_wait_for_enough_gpus():
    world, launch = fake_world()
    steps = experiment() + [Step("wide", ["x"], gpus=2, needs=("stage1",))]
    status = run_steps(steps, ["0", "1"], launch, done={"stage1", "train-a"}, poll_s=0, log=lambda _: None)
    assert status["stage1"] == "done" and "stage1" not in [s for s, _, _ in world["started"]]
    [(_, gpus, _)] = [s for s in world["started"] if s[0] == "wide"]
    assert sorted(gpus) == ["0", "1"]
    # an id given twice is two lanes on one device
    world, launch = fake_world()
    world["shared"] = True
    status = run_steps(experiment(), ["cpu", "cpu"], launch, poll_s=0, log=lambda _: None)
    assert set(status.values()) == {"ok"} and world["most_busy"] == 2
    with pytest.raises(UserError, match="needs 2 GPU"):
        run_steps([Step("wide", ["x"], gpus=2)], ["cpu"], launch, poll_s=0)


def test_stopping_terminates_running_steps():
    world, launch = fake_world(ticks={"stage1": 10**6})

    def log(line):
        if line.startswith("start eval-base"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_steps(experiment(), ["0", "1"], launch, poll_s=0, log=log)
    assert world["terminated"] == ["stage1"]


def test_markers_skip_same_config_and_refuse_a_changed_one(tmp_path):
    out, root = tmp_path / "out", tmp_path / "repo"
    output = out / "result.json"
    step = Step("eval-base", ["python", "eval_data.py", "--output-path", str(out / "evaluate")], gpus=1,
                outputs=(str(output),), env={"LR": "1e-5"})
    assert finished_steps([step], str(out), str(root)) == set()
    mark_done(step, str(out), str(root), 1.0)
    saved = json.loads((out / "steps" / "eval-base.json").read_text())
    assert saved["config"]["argv"][-1] == "{out}/evaluate"  # recorded relative to the output folder
    assert finished_steps([step], str(out), str(root)) == set()  # its output is gone: run again
    output.write_text("{}")
    assert finished_steps([step], str(out), str(root)) == {"eval-base"}
    changed = Step(step.id, step.argv, gpus=1, outputs=step.outputs, env={"LR": "3e-6"})
    with pytest.raises(UserError, match=r"eval-base \(env\)"):
        finished_steps([changed], str(out), str(root))


def test_steps_whose_users_are_done_are_not_run_again():
    # A later machine got the evaluations and comparisons back, not the checkpoints or stage 1:
    # only what is still missing runs, and no training repeats for an evaluation that is done.
    from pos2distill.lanes import unneeded_steps

    steps = experiment()
    for step in steps:
        step.final = step.id.startswith("eval-")
    done = {"eval-base", "eval-a", "compare-a", "eval-b", "compare-b"}
    assert unneeded_steps(steps, done) == {"train-a", "train-b"}
    world, launch = fake_world()
    status = run_steps(steps, ["0"], launch, done=done, poll_s=0, log=lambda _: None)
    assert status["train-a"] == status["train-b"] == "unneeded"
    assert [s for s, _, _ in world["started"]] == ["stage1", "train-c", "eval-c", "compare-c"]
    # a final step that is not done runs, and with it what it needs, even when its users are done
    assert unneeded_steps(steps, done - {"eval-a"}) == {"train-b"}
    # without final steps, a whole done chain settles back to its start
    plain = experiment(rows=("a",))
    assert unneeded_steps(plain, {"eval-base", "compare-a"}) == {"eval-a", "train-a", "stage1"}


def test_a_paused_step_leaves_what_needs_it_waiting_and_the_rest_runs():
    world, launch = fake_world(rc={"train-b": 75})
    status = run_steps(experiment(), ["0"], launch, poll_s=0, log=lambda _: None)
    assert status["train-b"] == "paused"
    assert status["eval-b"] == status["compare-b"] == "waiting"
    assert "eval-b" not in [s for s, _, _ in world["started"]]
    assert status["compare-a"] == status["compare-c"] == "ok"


def test_no_step_starts_after_stop_at():
    world, launch = fake_world()
    status = run_steps(experiment(), ["0"], launch, poll_s=0, log=lambda _: None, stop_at=0.0)
    assert set(status.values()) == {"waiting"} and world["started"] == []


def finish(launch, step):
    handle = launch(step, [])
    while (code := handle.poll()) is None:
        pass
    return code


def test_a_steps_scratch_is_removed_once_it_succeeded_only(tmp_path):
    import sys

    from pos2distill.lanes import process_launcher

    out = tmp_path / "out"
    launch = process_launcher(str(out), str(tmp_path), {})
    for rc, kept in ((75, True), (0, False)):
        scratch = out / f"ckpt{rc}"
        (scratch / "global_step1").mkdir(parents=True)
        step = Step(f"train{rc}", [sys.executable, "-c", f"raise SystemExit({rc})"], scratch=(str(scratch),))
        assert finish(launch, step) == rc and scratch.exists() == kept


def test_only_scratch_inside_the_output_folder_and_without_outputs_is_removed(tmp_path):
    import sys

    from pos2distill.lanes import process_launcher, removable_scratch

    root, out = tmp_path / "repo", tmp_path / "repo" / "out"
    save = out / "checkpoints" / "p2d"
    model = save / "run" / "kd_args.json"
    folders = {"repo": root, "out": out, "outside": tmp_path / "mine", "save": save, "own": save / "_deepspeed_ckpt"}
    for path in folders.values():
        (path / "global_step1").mkdir(parents=True)
    model.parent.mkdir(parents=True)
    model.write_text("{}")
    # relative paths are the step's: resolved against root (its working directory), not the driver's cwd
    scratch = (".", "out", str(folders["outside"]), "out/checkpoints/p2d", "out/checkpoints/p2d/_deepspeed_ckpt")
    step = Step("train", [sys.executable, "-c", "pass"], outputs=(str(model),), scratch=scratch)
    assert removable_scratch(step, str(out), str(root)) == [str(folders["own"])]
    assert finish(process_launcher(str(out), str(root), {}), step) == 0
    assert {name for name, path in folders.items() if path.exists()} == {"repo", "out", "outside", "save"}
    assert model.exists() and (root / "global_step1").exists()
