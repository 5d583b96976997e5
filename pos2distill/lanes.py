"""Steps of an experiment, their done-markers, and a scheduler over the visible GPUs.

A step is one command (a stage CLI or train_nq.sh). It holds ``gpus`` GPUs while it runs (0: a
CPU step); no GPU runs two steps at once. A step starts once the steps it needs have succeeded;
a failed step skips everything that needs it, the others go on. A step that succeeded leaves
``{out}/steps/{id}.json`` with its config (command and environment, paths relative to the
output folder): a later run skips it if the config is the same and refuses if it changed. A step
that exits with ``PAUSED_EXIT`` stopped to be resumed: what needs it waits for a later run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .errors import PAUSED_EXIT, UserError
from .jsonl import write_text_atomic


@dataclass
class Step:
    id: str
    argv: list
    gpus: int = 0  # GPUs held while it runs (0: a CPU step)
    needs: tuple = ()  # ids of the steps it reads the outputs of
    env: dict = field(default_factory=dict)  # recorded in its config
    outputs: tuple = ()  # paths that exist once it succeeded
    port: bool = False  # a DeepSpeed launch: gets its own MASTER_PORT
    final: bool = False  # its outputs are read after the run (the table): needed until done
    scratch: tuple = ()  # folders it may leave for its own resume (checkpoints): removed once it succeeded,
    # if inside the output folder (removable_scratch)


def step_config(step: Step, out: str, root: str) -> dict:
    """What the step's outputs depend on, with the output folder and repository as placeholders
    and the interpreter as ``python`` (a moved output folder, checkout or environment keeps them valid)."""
    config = {"argv": [("python" if a == sys.executable else a) for a in step.argv], "env": step.env, "gpus": step.gpus}
    text = json.dumps(config, ensure_ascii=False)
    return json.loads(text.replace(os.path.abspath(out), "{out}").replace(os.path.abspath(root), "{repo}"))


def removable_scratch(step: Step, out: str, root: str) -> list:
    """The step's scratch folders that may be deleted once it succeeded, as absolute paths.

    A relative one is resolved against ``root``, the steps' working directory (where the command
    wrote it). Only folders strictly inside ``out`` qualify, and none that holds one of the step's
    outputs: a scratch path that names the repository, a user's folder or the saved model is kept."""
    out_real = os.path.realpath(out)
    outputs = [os.path.realpath(os.path.join(root, p)) for p in step.outputs]
    removable = []
    for path in step.scratch:
        full = os.path.realpath(os.path.join(root, path))
        inside = full != out_real and os.path.commonpath([full, out_real]) == out_real
        if inside and not any(os.path.commonpath([full, o]) == full for o in outputs):
            removable.append(full)
    return removable


def marker_path(out: str, step: Step) -> str:
    return os.path.join(out, "steps", f"{step.id}.json")


def finished_steps(steps: list, out: str, root: str) -> set:
    """Ids of the steps done earlier with the same config; a changed config is a UserError."""
    done, changed = set(), []
    for step in steps:
        path = marker_path(out, step)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            saved = json.load(f)["config"]
        if saved != step_config(step, out, root):
            keys = [k for k in ("argv", "env", "gpus") if saved.get(k) != step_config(step, out, root)[k]]
            changed.append(f"{step.id} ({', '.join(keys)})")
        elif all(os.path.exists(p) for p in step.outputs):
            done.add(step.id)
    if changed:
        raise UserError(f"{out}: steps done earlier with another config: {'; '.join(changed[:5])}"
                        f"{' ...' if len(changed) > 5 else ''}; use another --out, or delete those steps' "
                        f"files under {os.path.join(out, 'steps')} to redo them")
    return done


def mark_done(step: Step, out: str, root: str, seconds: float) -> None:
    record = {"config": step_config(step, out, root), "seconds": round(seconds, 1),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text_atomic(marker_path(out, step), json.dumps(record, indent=1) + "\n")


def unneeded_steps(steps: list, done) -> set:
    """Steps not done that nothing left to run needs: every step that needs them is done, or
    unneeded itself. A training whose evaluations are done needs no rerun when its checkpoint is
    gone (the evaluations' outputs came back from another machine without it). A step that no
    other step needs, or that is ``final``, is needed until it is done."""
    dependents = {s.id: [] for s in steps}
    for step in steps:
        for need in step.needs:
            dependents.setdefault(need, []).append(step.id)
    settled, unneeded = set(done), set()
    changed = True
    while changed:  # to a fixed point: a chain is settled from its done end backwards
        changed = False
        for step in steps:
            users = dependents[step.id]
            if step.id not in settled and not step.final and users and all(u in settled for u in users):
                settled.add(step.id)
                unneeded.add(step.id)
                changed = True
    return unneeded


def run_steps(steps: list, gpu_ids: list, launch, done=(), cpu_slots: int = 1, poll_s: float = 1.0,
              log=print, stop_at: float = None) -> dict:
    """Run ``steps`` (in list order as resources allow); returns ``{id: status}``.

    ``launch(step, gpus)`` starts a step on the given GPU ids and returns a handle whose
    ``poll()`` is None while it runs, then its exit status, and which has ``terminate()``.
    Status: ``done`` (earlier run), ``unneeded`` (see ``unneeded_steps``), ``ok``, ``failed``,
    ``skipped`` (a needed step failed), ``paused`` (it exited with ``PAUSED_EXIT``), ``waiting``
    (not started: a needed step paused, or ``stop_at``, a ``time.time()``, had passed)."""
    status = {sid: "done" for sid in done}
    status.update({sid: "unneeded" for sid in unneeded_steps(steps, done)})
    by_id = {s.id: s for s in steps}
    for step in steps:
        missing = [n for n in step.needs if n not in by_id]
        if missing or step.gpus > len(gpu_ids):
            raise UserError(f"step {step.id}: needs {step.gpus} GPU(s) of {len(gpu_ids)} visible"
                            if not missing else f"step {step.id}: unknown steps {missing}")
    pending = [s for s in steps if s.id not in status]
    free, running = list(range(len(gpu_ids))), {}  # lane indices: an id given twice is two lanes
    try:
        while pending or running:
            for step in list(pending):
                if any(status.get(n) in ("failed", "skipped") for n in step.needs):
                    status[step.id] = "skipped"
                    pending.remove(step)
                    log(f"skipped {step.id}: a step it needs failed")
                    continue
                if any(status.get(n) in ("paused", "waiting") for n in step.needs) or (
                        stop_at is not None and time.time() >= stop_at):
                    status[step.id] = "waiting"  # for the next run
                    pending.remove(step)
                    continue
                if not all(status.get(n) in ("done", "ok") for n in step.needs):
                    continue
                cpu_busy = sum(1 for s, _, _ in running.values() if s.gpus == 0)
                if (step.gpus and len(free) < step.gpus) or (not step.gpus and cpu_busy >= cpu_slots):
                    continue
                taken, free = free[: step.gpus], free[step.gpus :]
                ids = [gpu_ids[i] for i in taken]
                log(f"start {step.id}" + (f" on GPU {','.join(map(str, ids))}" if ids else ""))
                running[step.id] = (step, taken, launch(step, ids))
                pending.remove(step)
            finished = [(sid, rc) for sid, (_, _, h) in running.items() if (rc := h.poll()) is not None]
            for sid, rc in finished:
                _, taken, _ = running.pop(sid)
                free = sorted(free + taken)  # the caller's order
                status[sid] = {0: "ok", PAUSED_EXIT: "paused"}.get(rc, "failed")
                log({"ok": f"done {sid}", "paused": f"paused {sid} (run again to resume it)"}.get(
                    status[sid], f"FAILED (exit {rc}) {sid}"))
            if not finished and running:
                time.sleep(poll_s)
    finally:  # stopped (Ctrl-C) or an error: no step outlives the driver
        for _, _, handle in running.values():
            handle.terminate()
    return status


class Process:
    """A step's command in its own process group, output to its log, marked done on success."""

    def __init__(self, step: Step, gpus: list, out: str, root: str, env: dict):
        self.step, self.out, self.root, self.began = step, out, root, time.time()
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)
        self.log = open(os.path.join(out, "logs", f"{step.id}.log"), "w")
        self.proc = subprocess.Popen(step.argv, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def poll(self):
        rc = self.proc.poll()
        if rc is None:
            return None
        self.log.close()
        missing = [p for p in self.step.outputs if not os.path.exists(p)]
        if rc == 0 and missing:
            with open(self.log.name, "a") as f:
                f.write(f"reproduce.py: exit 0 but missing outputs: {missing}\n")
            return 1
        if rc == 0:
            mark_done(self.step, self.out, self.root, time.time() - self.began)
            for path in removable_scratch(self.step, self.out, self.root):  # resume checkpoints (GBs)
                shutil.rmtree(path, ignore_errors=True)
        return rc

    def terminate(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the step's own process group only
            self.proc.wait()


def process_launcher(out: str, root: str, base_env: dict, port0: int = 29500):
    """``launch`` for ``run_steps``: GPU ids through CUDA_VISIBLE_DEVICES ("" on a CPU lane), one
    MASTER_PORT per DeepSpeed launch."""
    ports = iter(range(port0, port0 + 10000))

    def launch(step: Step, gpus: list) -> Process:
        env = dict(base_env, **step.env)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus if g != "cpu") if gpus else ""
        if step.port:
            env["MASTER_PORT"] = str(next(ports))
        return Process(step, gpus, out, root, env)

    return launch
