"""The Pos2Distill training loop: OpenRLHF's KDTrainer with our losses and step guards."""

import torch

from pos2distill.errors import UserError
from pos2distill.progress import progress_bar

from . import flash_attn_fallback
from .example_sampler import ExampleGroupedSampler
from .losses import LOSS_NAMES, DistillationLoss, adaptive_scale, adaptive_step_weights, student_teacher_logits
from .resume import pause, stop_due

flash_attn_fallback.import_openrlhf()

from openrlhf.trainer.kd_trainer import KDTrainer  # noqa: E402
from openrlhf.utils.distributed_sampler import DistributedSampler  # noqa: E402


class TrainingAborted(UserError):
    """Too many consecutive optimizer steps had to be skipped."""


class Pos2DistillTrainer(KDTrainer):
    """Distils a frozen teacher (gold document at the advantageous position) into the student.

    Per micro-batch: one student forward, one teacher forward per distinct teacher input,
    logits only at the response-predicting positions, the ``--kd_coef`` mix of losses.
    An optimizer step whose loss or gradients are non-finite on any rank is skipped (no
    parameter or optimizer-state update), counted, and logged; ``max_consecutive_skips``
    skipped steps in a row abort training.
    """

    def __init__(self, model, teacher_model, strategy, optim, train_dataloader, scheduler, tokenizer, args,
                 skipped_steps: int = 0, consecutive_skips: int = 0):
        super().__init__(
            model=model,
            teacher_model=teacher_model,
            strategy=strategy,
            optim=optim,
            train_dataloader=train_dataloader,
            eval_dataloader=None,
            scheduler=scheduler,
            max_norm=args.max_norm,
            batch_size=args.train_batch_size,
            max_epochs=args.max_epochs,
            tokenizer=tokenizer,
            save_hf_ckpt=args.save_hf_ckpt,
            disable_ds_ckpt=args.disable_ds_ckpt,
        )
        self.objective = DistillationLoss(
            args.kd_coef,
            perserve=args.perserve,
            temperature=args.temperature,
            top_k=args.rank_top_k,
            gather=strategy.all_gather,
            rank=strategy.get_rank(),
            adaptive_scale=adaptive_scale(args.micro_train_batch_size, args.adaptive_legacy_scale),
        )
        # Weights over the whole optimizer step need a no-grad pass over its micro-batches first.
        self.step_weights = (args.kd_coef[3] > 0 and not args.adaptive_legacy_scale
                             and strategy.accumulated_gradient > 1)
        self.max_consecutive_skips = args.max_consecutive_skips
        self.packed = args.packing_samples
        self.skipped_steps = skipped_steps
        self.consecutive_skips = consecutive_skips  # from the checkpoint: a pause does not reset the streak
        self._finite_flags = []
        for param in self.model.model.parameters():
            if param.requires_grad:
                param.register_hook(self._watch_grad)

    def _watch_grad(self, grad: torch.Tensor) -> None:
        # Read-only: runs before the gradient reaches DeepSpeed's reduction.
        self._finite_flags.append(torch.isfinite(grad).all())

    def _logits(self, batch: dict) -> tuple:
        return student_teacher_logits(self.model.model, self.teacher_model.model, batch, batch["labels"].shape[1],
                                      self.packed)

    def compute_losses(self, batch: dict, weights=None) -> dict:
        """Loss components of one micro-batch (already on the device); ``weights``: its adaptive
        weights when computed over the optimizer step."""
        student_logits, teacher_logits = self._logits(batch)
        return self.objective(
            student_logits, teacher_logits, batch["labels"], batch["response_mask"], batch["gold_idx"],
            batch["is_anchor"], weights,
        )

    def micro_batches(self, accumulation: int):
        """(micro-batch on the device, its adaptive weights or None), in data order.

        With accumulation and the adaptive loss, the group weights must see the whole global
        batch, as one large batch would: the step's micro-batches are read ahead and their KL_i
        computed without gradient (the parameters do not change within a step, so they equal the
        KL_i of the gradient pass), then gathered over ranks. Cost: one extra student and teacher
        forward per micro-batch, no backward (about +50% compute per step); none without
        accumulation.
        """
        device = self.strategy.device
        batches = ({key: value.to(device) for key, value in batch.items()} for batch in self.train_dataloader)
        if not self.step_weights:
            yield from ((batch, None) for batch in batches)
            return
        step = []
        for batch in batches:
            step.append(batch)
            if len(step) < accumulation:
                continue
            with torch.no_grad():
                kls = [self.objective.sample_kl(*self._logits(b), b["response_mask"]) for b in step]
            weights = adaptive_step_weights(
                kls, [b["gold_idx"] for b in step], [b["is_anchor"] for b in step],
                [b["response_mask"].sum(-1) > 0 for b in step], self.objective.perserve, self.objective.gather,
                self.objective.rank)
            yield from zip(step, weights)
            step = []

    def fit(self, args, consumed_samples=0, num_update_steps_per_epoch=None):
        steps_per_epoch = num_update_steps_per_epoch
        accumulation = self.strategy.accumulated_gradient
        if args.eval_steps == -1:
            args.eval_steps = steps_per_epoch
        if args.save_steps == -1:
            args.save_steps = float("inf")

        global_step = consumed_samples // args.train_batch_size
        start_epoch = global_step // steps_per_epoch
        self.teacher_model.eval()
        self.model.train()

        for epoch in range(start_epoch, self.epochs):
            done = global_step - epoch * steps_per_epoch
            sampler = self.train_dataloader.sampler
            if isinstance(sampler, (DistributedSampler, ExampleGroupedSampler)):
                sampler.set_epoch(epoch, consumed_samples=done * args.train_batch_size)
            step_bar = progress_bar(
                total=steps_per_epoch, initial=done, desc=f"Train epoch {epoch}", disable=not self.strategy.is_rank_0()
            )
            # Stop at the last full optimizer step: a partial accumulation would leak into the next epoch.
            micro_budget = (steps_per_epoch - done) * accumulation
            sums = {}
            self._finite_flags = []
            for micro_step, (batch, weights) in enumerate(self.micro_batches(accumulation)):
                if micro_step >= micro_budget:
                    break
                losses = self.compute_losses(batch, weights)
                total = losses["total"]
                self._finite_flags.append(torch.isfinite(total.detach()))
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float()
                self.strategy.backward(total, self.model, self.optimizer)

                boundary = (micro_step + 1) % accumulation == 0
                skip = False
                if boundary:
                    finite = bool(torch.stack(self._finite_flags).all())
                    skip = self.strategy.all_reduce(0.0 if finite else 1.0, op="max") > 0
                    self._finite_flags = []
                self.strategy.skip_next_update(skip)
                self.strategy.optimizer_step(self.optimizer, self.model, self.scheduler)
                self.strategy.skip_next_update(False)
                if not boundary:
                    continue

                global_step += 1
                if skip:
                    self.skipped_steps += 1
                    self.consecutive_skips += 1
                    self.strategy.print(f"step {global_step}: non-finite loss or gradient, update skipped")
                else:
                    self.consecutive_skips = 0
                logs = self.strategy.all_reduce({name: float(v) / accumulation for name, v in sums.items()})
                sums = {}
                logs["lr"] = self.scheduler.get_last_lr()[0]
                logs["skipped_steps"] = self.skipped_steps
                grad_norm = self.model.model.get_global_grad_norm()
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                step_bar.set_postfix({k: logs[k] for k in ("total", *LOSS_NAMES, "lr") if k in logs})
                step_bar.update()
                client_states = {"consumed_samples": global_step * args.train_batch_size,
                                 "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                                 "data_order": getattr(args, "data_order", None),
                                 "settings": getattr(args, "run_settings", None)}
                self.save_logs_and_checkpoints(args, global_step, step_bar, logs, client_states)
                # Abort before pausing: a run that has to stop for bad steps must not look resumable.
                if self.consecutive_skips >= self.max_consecutive_skips:
                    self._close_loggers()
                    raise TrainingAborted(
                        f"{self.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient "
                        f"(up to step {global_step}); stopping. Check the data around these steps, "
                        f"--learning_rate and --max_len."
                    )
                total_steps = steps_per_epoch * self.epochs
                if global_step < total_steps and stop_due(self.strategy, getattr(args, "stop_at", None)):
                    step_bar.close()
                    self._close_loggers()
                    saved_now = global_step % args.save_steps == 0 and not args.disable_ds_ckpt
                    pause(self.strategy, self.model.model, args, global_step, total_steps, client_states, saved_now)
            step_bar.close()
        self._close_loggers()

    def _close_loggers(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

