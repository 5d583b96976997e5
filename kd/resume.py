"""Resuming stage 3: the data order and settings a checkpoint must match, and pausing at a deadline.

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


# Flags that change what the remaining steps compute: models, losses, optimizer, schedule, LoRA.
SETTINGS = ("pretrain", "teacher_model", "kd_coef", "perserve", "temperature", "rank_top_k", "adaptive_legacy_scale",
            "learning_rate", "lr_scheduler", "lr_warmup_ratio", "min_lr_ratio", "l2", "adam_betas", "max_norm",
            "max_epochs", "lora_rank")
LORA_SETTINGS = ("lora_alpha", "lora_dropout", "target_modules")  # only with --lora_rank > 0


def run_settings(args) -> dict:
    """The settings a resumed run must share with the checkpoint (models already resolved)."""
    settings = {key: getattr(args, key) for key in SETTINGS + (LORA_SETTINGS if args.lora_rank > 0 else ())}
    for key in ("pretrain", "teacher_model"):  # a local folder by where it is, not how it was spelled
        if os.path.exists(settings[key]):
            settings[key] = os.path.abspath(settings[key])
    for key in ("kd_coef", "adam_betas", "target_modules"):  # tuples and lists compare as lists
        if key in settings:
            value = settings[key]
            settings[key] = [value] if isinstance(value, str) else list(value)
    return settings


def check_run_settings(saved, current: dict, ckpt_path: str) -> None:
    """A checkpoint resumed under other models, losses or schedule would end at weights no run
    with either flags produces (DeepSpeed also restores the old optimizer hyperparameters)."""
    if saved is None:
        # Written before settings were recorded: accepted (with a warning in train_kd.py), so a run
        # paused by the previous version is not thrown away; its data order is still checked.
        return
    for key in dict.fromkeys([*current, *saved]):
        if saved.get(key) != current.get(key):
            raise UserError(
                f"--load_checkpoint: {ckpt_path} was saved by a run with --{key} {saved.get(key)!r}, this run has "
                f"{current.get(key)!r}; resume with the same flags, or use another --ckpt_path"
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
