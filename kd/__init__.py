"""Stage 3 of Pos2Distill: knowledge distillation on top of OpenRLHF and DeepSpeed.

Modules: ``losses`` (the four losses and their mix), ``pair_dataset`` (stage-2 rows as
teacher/student token sequences), ``example_sampler`` (batches that keep an example's
copies together: one teacher forward for all of them), ``strategy`` (OpenRLHF's DeepSpeed strategy made
device-neutral), ``flash_attn_fallback`` (pure-torch stand-ins so OpenRLHF imports
without flash-attn), ``trainer`` (the KDTrainer subclass), ``train_kd`` (the CLI).
"""
