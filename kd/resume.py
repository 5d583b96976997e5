"""Resuming stage 3: the data order a checkpoint must match, and pausing at a deadline.

``--stop_at T`` (seconds since the epoch) lets a training run in calls shorter than itself: the
first optimizer step that ends after T writes a DeepSpeed checkpoint to ``--ckpt_path`` and the
run exits with ``PAUSED_EXIT``; the same command with ``--load_checkpoint`` goes on from there
and ends at the weights of a run never stopped (the optimizer, scheduler and data position are
in the checkpoint).
"""

import os
import time

from pos2distill.errors import PAUSED_EXIT, UserError  # noqa: F401 (train_kd.py's exit status)


class TrainingPaused(Exception):
    """Stopped at ``--stop_at`` after writing a checkpoint; not an error."""


def data_order(args, dataset_path: str, usable_rows: int, world_size: int) -> dict:
    """What decides which rows each optimizer step sees; a resumed run must match it."""
    order = {"dataset": os.path.abspath(dataset_path), "usable_rows": usable_rows, "seed": args.seed,
             "train_batch_size": args.train_batch_size, "micro_train_batch_size": args.micro_train_batch_size,
             "processes": world_size}
    if args.group_by_example:  # only when set: checkpoints from before the flag stay resumable
        order["group_by_example"] = True
    return order


def check_data_order(saved, current: dict, ckpt_path: str) -> None:
    """A checkpoint from a run with other data or batching would resume at the wrong rows."""
    if saved is None:  # a checkpoint written before the order was recorded
        return
    changed = [f"{key} {saved.get(key)!r} -> {current[key]!r}" for key in current if saved.get(key) != current[key]]
    if changed:
        raise UserError(
            f"--load_checkpoint: {ckpt_path} was saved by a run with another data order ({'; '.join(changed)}); "
            f"resume with the same flags and processes, or use another --ckpt_path"
        )


def stop_due(strategy, stop_at) -> bool:
    """Whether the run pauses now; every rank gets the same answer (any rank past the time)."""
    if stop_at is None:
        return False
    return strategy.all_reduce(1.0 if time.time() >= stop_at else 0.0, op="max") > 0


def pause(strategy, engine, args, global_step: int, total_steps: int, client_states: dict, saved_now: bool):
    """Write the checkpoint (unless this step's ``--save_steps`` one was just written), wait for
    every rank's shards, and stop."""
    tag = f"global_step{global_step}"
    if not saved_now:
        strategy.save_ckpt(engine, args.ckpt_path, tag, args.max_ckpt_num, args.max_ckpt_mem, client_states)
    strategy.barrier()  # no rank leaves before all have written their part
    raise TrainingPaused(
        f"paused at --stop_at after optimizer step {global_step} of {total_steps}: checkpoint {tag} in "
        f"{args.ckpt_path}; run the same command with --load_checkpoint to go on"
    )
