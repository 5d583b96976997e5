"""Stage 3 on CPU: a step whose gradients are not finite changes nothing under ZeRO-3, is skipped
and counted, and too many in a row stop the run, also across a pause."""

import os

import torch
import torch.multiprocessing as mp

from test_train_kd_e2e import free_port, load_state, make_pair_dataset


def _single_process_env(port):
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def skip_worker(_, port, model, out_file):
    """ZeRO-3 engine: an update vetoed with skip_next_update leaves weights and Adam state untouched."""
    _single_process_env(port)
    from kd.losses import response_logits
    from kd.strategy import KDStrategy
    from kd.train_kd import parse_args

    args = parse_args(["--dataset", "x", "--pretrain", model, "--train_batch_size", "1",
                       "--micro_train_batch_size", "1", "--learning_rate", "1e-2", "--l2", "0.1"])
    strategy = KDStrategy(args)
    strategy.setup_distributed()
    actor = strategy.load_actor(model, strategy.get_ds_train_config(is_actor=True))
    optim = strategy.create_optimizer(actor, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    actor, wrapped, _ = strategy.prepare((actor, optim, None))
    engine = actor.model
    ids = torch.tensor([[5, 6, 7, 8, 9]], device=strategy.device)

    def step(poison):
        loss = response_logits(engine, ids, torch.ones_like(ids), 2).float().logsumexp(-1).mean()
        if poison:
            loss = loss * float("nan")
        engine.backward(loss)
        strategy.skip_next_update(poison is not None)
        engine.step()
        strategy.skip_next_update(False)
        return {k: v.clone() for k, v in engine._zero3_consolidated_16bit_state_dict().items()}

    start = {k: v.clone() for k, v in engine._zero3_consolidated_16bit_state_dict().items()}
    after_finite_skip = step(poison=False)  # finite gradients, update vetoed
    adam_state_after_skip = len(optim.state)
    after_nan_skip = step(poison=True)  # NaN gradients, update vetoed
    after_update = step(poison=None)  # a normal step afterwards
    torch.save({"start": start, "finite_skip": after_finite_skip, "nan_skip": after_nan_skip,
                "update": after_update, "adam_state_after_skip": adam_state_after_skip}, out_file)
    torch.distributed.destroy_process_group()


def test_vetoed_update_changes_nothing_under_zero3(tmp_path, tiny_model):
    out_file = str(tmp_path / "skip.pt")
    mp.spawn(skip_worker, args=(free_port(), tiny_model, out_file), nprocs=1, join=True)
    r = torch.load(out_file)
    for name in r["start"]:
        assert torch.equal(r["start"][name], r["finite_skip"][name]), name
        assert torch.equal(r["start"][name], r["nan_skip"][name]), name
        assert torch.isfinite(r["update"][name]).all(), name
    assert r["adam_state_after_skip"] == 0
    assert any(not torch.equal(r["start"][n], r["update"][n]) for n in r["start"])


def nan_worker(_, port, argv, poison_micro_steps, out_file):
    """Run train_kd.main in-process with the loss of some micro-steps replaced by NaN."""
    _single_process_env(port)
    from kd import trainer
    from kd.train_kd import main
    from pos2distill.errors import UserError

    original = trainer.Pos2DistillTrainer.compute_losses
    calls = []

    def poisoned(self, batch, weights=None):
        losses = original(self, batch, weights)
        calls.append(1)
        if poison_micro_steps is None or len(calls) in poison_micro_steps:
            losses["total"] = losses["total"] * float("nan")
        return losses

    trainer.Pos2DistillTrainer.compute_losses = poisoned
    try:
        code = main(argv)
        result = "ok" if code == 0 else f"exit {code}"
    except UserError as err:
        result = f"error: {err}"
    torch.save({"result": result}, out_file)


def _nan_argv(model, data_root, out):
    return ["--dataset", "nqtiny", "--data_root", str(data_root), "--pretrain", model,
            "--train_batch_size", "2", "--micro_train_batch_size", "1", "--max_samples", "6",
            "--zero_stage", "3", "--learning_rate", "1e-3", "--lr_warmup_ratio", "0",
            "--save_path", str(out / "save"), "--use_tensorboard", str(out / "tb"), "--max_consecutive_skips", "2"]


def test_non_finite_step_is_skipped_and_counted(tmp_path, tiny_model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_pair_dataset(tmp_path / "data" / "nqtiny")
    argv = _nan_argv(tiny_model, tmp_path / "data", tmp_path)
    out_file = str(tmp_path / "nan.pt")
    # micro-step 2 belongs to optimizer step 1 (2 micro-steps per step): only step 1 is skipped
    mp.spawn(nan_worker, args=(free_port(), argv, (2,), out_file), nprocs=1, join=True)
    assert torch.load(out_file)["result"] == "ok"
    run_name = "nqtiny_kd0.0_lm0.0_rank0.0_adaptive1.0_1.0"
    state = load_state(str(tmp_path / "save" / run_name))
    assert all(torch.isfinite(t).all() for t in state.values())
    acc = EventAccumulator(str(tmp_path / "tb" / run_name))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/skipped_steps")] == [1, 1, 1]


def test_consecutive_non_finite_steps_abort(tmp_path, tiny_model):
    make_pair_dataset(tmp_path / "data" / "nqtiny")
    argv = _nan_argv(tiny_model, tmp_path / "data", tmp_path)
    out_file = str(tmp_path / "nan.pt")
    mp.spawn(nan_worker, args=(free_port(), argv, None, out_file), nprocs=1, join=True)
    result = torch.load(out_file)["result"]
    assert result.startswith("error: 2 optimizer steps in a row had a non-finite loss or gradient"), result


def test_a_paused_run_keeps_its_streak_of_non_finite_steps(tmp_path, tiny_model):
    # every step non-finite, at most 2 in a row, a pause after every step (--stop_at in the past):
    # the first call pauses after skipped step 1; in the resumed call step 2 is the second in a
    # row (the streak came back with the checkpoint) and aborts rather than pausing again
    make_pair_dataset(tmp_path / "data" / "nqtiny")
    argv = _nan_argv(tiny_model, tmp_path / "data", tmp_path) + ["--ckpt_path", str(tmp_path / "ckpt"), "--stop_at", "1"]
    out_file = str(tmp_path / "nan.pt")
    mp.spawn(nan_worker, args=(free_port(), argv, None, out_file), nprocs=1, join=True)
    assert torch.load(out_file)["result"] == "exit 75"
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step1"
    mp.spawn(nan_worker, args=(free_port(), argv + ["--load_checkpoint"], None, out_file), nprocs=1, join=True)
    result = torch.load(out_file)["result"]
    assert result.startswith("error: 2 optimizer steps in a row had a non-finite loss or gradient (up to step 2)"), result
