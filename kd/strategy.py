"""OpenRLHF's DeepspeedStrategy, made device-neutral: CUDA + NCCL, or CPU + gloo.

OpenRLHF 0.9.5 assumes CUDA in a few places: ``torch.cuda.set_device`` and a "cuda"
device mesh in ``setup_distributed``, FusedAdam in ``create_optimizer``, tensors moved
to ``torch.cuda.current_device()`` in ``all_reduce``/``all_gather``, and
``torch.cuda.synchronize()`` after the barriers in ``save_model``/``save_ckpt``. This
subclass overrides exactly those, following DeepSpeed's accelerator (``cuda`` on GPUs,
``cpu`` with the gloo backend here), and adds model loading in fp32, which OpenRLHF's
``Actor`` does not offer.
"""

import atexit
import logging
import os
import shutil
import signal
import socket
import sys
import warnings
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
import transformers
from deepspeed.accelerator import get_accelerator
from torch.distributed.device_mesh import init_device_mesh

from pos2distill.errors import UserError
from pos2distill.jsonl import write_text_atomic

from . import flash_attn_fallback

flash_attn_fallback.import_openrlhf()

from openrlhf.models import Actor  # noqa: E402
from openrlhf.utils.deepspeed import DeepspeedStrategy  # noqa: E402
from openrlhf.utils.deepspeed.deepspeed_utils import get_optimizer_grouped_parameters  # noqa: E402


class SkippableStep:
    """Optimizer mixin: ``step()`` does nothing while ``skip_update`` is set.

    DeepSpeed's ZeRO wrappers call the inner optimizer's ``step``; a no-op there leaves
    the master weights and the Adam moments untouched, and DeepSpeed clears the
    gradients afterwards as usual. (DeepSpeed 0.18 applies non-finite bf16/fp32
    gradients unchecked; 0.19 skips them itself — this works with both.)
    """

    skip_update = False

    def step(self, *args, **kwargs):
        if self.skip_update:
            return None
        return super().step(*args, **kwargs)


def skippable(optimizer_class):
    return type(f"Skippable{optimizer_class.__name__}", (SkippableStep, optimizer_class), {})


def shm_buffer_path(rank: int) -> str:
    """The /dev/shm file DeepSpeed's CPU shared-memory allreduce creates for ``rank`` of this run
    (named in its shm.cpp after the user id, MASTER_ADDR and MASTER_PORT)."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    return os.path.join("/dev/shm", name)


def _remove_shm_buffer_at_exit(rank: int) -> None:
    # DeepSpeed never unlinks it: every CPU run left ~69 MB per rank in /dev/shm (memory), and a
    # day of test runs filled a 24 GB machine. At exit every rank is past its last collective.
    path = shm_buffer_path(rank)

    def remove():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    atexit.register(remove)
    # A rank the launcher stops (another rank failed, or a timeout) gets SIGTERM, whose default
    # action skips atexit: turn it into a normal exit so the buffer goes too.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


class _DropUntestedOptimizer(logging.Filter):
    """ZeRO's "untested optimizer" warning: ZeRO matches optimizer classes exactly, and ours are
    wrapped by ``skippable()`` around AdamW, FusedAdam or DeepSpeedCPUAdam, which the tests train with."""

    def filter(self, record):
        return "untested optimizer" not in record.getMessage()


def _quiet_unactionable_warnings() -> None:
    """Silence, by message, warnings about library internals that a user cannot act on."""
    from deepspeed.utils import logger

    # ZeRO-3's own collectives (DeepSpeed calls them, not us)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            r"is deprecated", category=FutureWarning)
    # OpenRLHF's StatefulDataLoader (torchdata) calls a deprecated torch hook
    warnings.filterwarnings("ignore", message=r"'set_vital' is deprecated", category=UserWarning,
                            module=r"torchdata\.")
    if not any(isinstance(f, _DropUntestedOptimizer) for f in logger.filters):
        logger.addFilter(_DropUntestedOptimizer())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class KDStrategy(DeepspeedStrategy):
    """DeepspeedStrategy that runs on GPUs (NCCL) and on CPU (gloo, fp32, torch AdamW)."""

    def __init__(self, args):
        _quiet_unactionable_warnings()
        self.use_cuda = get_accelerator().device_name() == "cuda" and torch.cuda.is_available()
        # bf16 only on GPUs: on CPU it is slower and DeepSpeed's CPU path is tested in fp32.
        args.param_dtype = "bf16" if (args.bf16 and self.use_cuda) else "fp32"
        super().__init__(
            seed=args.seed,
            full_determinism=args.full_determinism,
            max_norm=args.max_norm,
            micro_train_batch_size=args.micro_train_batch_size,
            train_batch_size=args.train_batch_size,
            zero_stage=args.zero_stage,
            args=args,
        )
        self.skippable_optimizers = []

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.use_cuda else torch.device("cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.param_dtype, torch.float32)

    def setup_distributed(self, timeout=timedelta(minutes=60)) -> None:
        if self.full_determinism:
            transformers.enable_full_determinism(self.seed)
        else:
            transformers.set_seed(self.seed)
        if self.args.local_rank != -1:
            os.environ["LOCAL_RANK"] = str(self.args.local_rank)
        if "RANK" not in os.environ:
            # Started without a launcher: a one-process group.
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.use_cuda:
            torch.cuda.set_device(local_rank)
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), timeout=timeout)
        if not self.use_cuda:
            _remove_shm_buffer_at_exit(dist.get_rank())

        self.world_size = dist.get_world_size()
        if self.ring_attn_size != 1 or self.ds_tensor_parallel_size != 1:
            raise UserError("ring attention and tensor parallelism are not supported by kd/train_kd.py")
        self.ds_device_mesh = init_device_mesh(
            self.device.type, (self.world_size, 1, 1), mesh_dim_names=("dp", "sp", "tp")
        )
        self.setup_ring_attn(self.ds_device_mesh)
        per_step = self.micro_train_batch_size * self.world_size
        if self.train_batch_size % per_step:
            raise UserError(
                f"--train_batch_size {self.train_batch_size} is not a multiple of "
                f"--micro_train_batch_size x processes = {per_step}"
            )
        self.accumulated_gradient = self.train_batch_size // per_step

    def load_actor(self, path: str, ds_config: dict, lora_rank: int = 0, attn_implementation: str = "sdpa") -> Actor:
        """An OpenRLHF Actor for ``path`` in this strategy's dtype.

        ``Actor`` loads bf16/fp16 itself; for fp32 the model is loaded here (under
        ZeRO-3 partitioned at load time, as Actor does) and wrapped.
        """
        args = self.args
        if self.param_dtype in ("bf16", "fp16"):
            return Actor(
                path,
                attn_implementation=attn_implementation,
                param_dtype=self.param_dtype,
                lora_rank=lora_rank,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=args.target_modules,
                ds_config=ds_config,
            )
        from transformers import AutoModelForCausalLM
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        # Must stay referenced while from_pretrained runs: it tells transformers to use zero.Init.
        zero3_config = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attn_implementation, trust_remote_code=True
        )
        del zero3_config
        model.config.use_cache = False
        if lora_rank > 0:
            from peft import LoraConfig, TaskType, get_peft_model

            model.enable_input_require_grads()
            model = get_peft_model(model, LoraConfig(
                task_type=TaskType.CAUSAL_LM, r=lora_rank, lora_alpha=args.lora_alpha,
                target_modules=args.target_modules, lora_dropout=args.lora_dropout, bias="none",
            ))
        return Actor(model)

    def create_optimizer(self, model, **kwargs):
        """AdamW: FusedAdam on GPUs, DeepSpeedCPUAdam with --adam_offload, torch AdamW on CPU.

        The class is wrapped by :class:`SkippableStep` so the trainer can veto an update.
        """
        if isinstance(model, Actor):
            model = model.model
        if self.adam_offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam as optimizer_class
        elif self.use_cuda:
            from deepspeed.ops.adam import FusedAdam as optimizer_class
        else:
            optimizer_class = torch.optim.AdamW
        # Empty groups (e.g. no trainable norms under LoRA) would be dropped by DeepSpeed after
        # the LR scheduler has counted them.
        params = [group for group in get_optimizer_grouped_parameters(model, kwargs["weight_decay"]) if group["params"]]
        optimizer = skippable(optimizer_class)(params, **kwargs)
        self.skippable_optimizers.append(optimizer)
        return optimizer

    def skip_next_update(self, skip: bool) -> None:
        for optimizer in self.skippable_optimizers:
            optimizer.skip_update = skip

    def get_ds_train_config(self, is_actor):
        config = super().get_ds_train_config(is_actor)
        # The skippable subclass is not in DeepSpeed's list of tested ZeRO optimizers.
        config["zero_allow_untested_optimizer"] = True
        if not self.use_cuda:
            config["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
        return config

    def get_ds_eval_config(self, offload=False):
        config = super().get_ds_eval_config(offload=offload)
        if not self.use_cuda:
            config["zero_optimization"]["offload_param"]["pin_memory"] = False
        return config

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce(self, data, op="mean"):
        if isinstance(data, dict):
            return {key: self.all_reduce(value, op) for key, value in data.items()}
        if op not in ("mean", "max", "sum"):
            raise ValueError(f"unknown reduction {op!r}")
        is_tensor = isinstance(data, torch.Tensor)
        tensor = data if is_tensor else torch.tensor([float(data)])
        original_device = tensor.device
        tensor = tensor.detach().to(self._comm_device(), copy=True)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= self.world_size
        return tensor.to(original_device) if is_tensor else tensor.item()

    def all_gather(self, data):
        """Concatenate ``data`` (same shape on every rank) over ranks along dim 0, in rank order."""
        if isinstance(data, dict):
            return {key: self.all_gather(value) for key, value in data.items()}
        tensor = data if isinstance(data, torch.Tensor) else torch.tensor([data])
        original_device = tensor.device
        local = tensor.detach().to(self._comm_device()).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(original_device)

    def barrier(self) -> None:
        dist.barrier()
        if self.use_cuda:
            torch.cuda.synchronize()

    def save_model(self, model, tokenizer, output_dir, **kwargs) -> None:
        """Save a Hugging Face folder (weights, config, tokenizer) from rank 0.

        Under ZeRO-3 every rank takes part in gathering the partitioned weights.
        """
        from peft import PeftModel, get_peft_model_state_dict

        module = self._unwrap_model(model)
        engine = model.model if isinstance(model, Actor) else model
        state_dict = None
        if self.stage == 3:
            state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective; None off rank 0
        elif self.is_rank_0():
            state_dict = {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}
        if self.is_rank_0():
            os.makedirs(output_dir, exist_ok=True)
            if isinstance(module, PeftModel):
                module.save_pretrained(output_dir, state_dict=get_peft_model_state_dict(module, state_dict), **kwargs)
            else:
                module.save_pretrained(output_dir, state_dict=state_dict, **kwargs)
            tokenizer.save_pretrained(output_dir)
        del state_dict
        self.barrier()

    def save_ckpt(self, model, save_dir, tag=None, max_num=3, max_mem=1000, client_state={}, save_latest=True):
        """DeepSpeed checkpoint under ``save_dir/tag``, then rank 0 drops the oldest beyond
        ``max_num`` folders or ``max_mem`` GiB.

        ``latest`` is written (atomically) only after every rank has finished its files, and
        old checkpoints are deleted only after that: a run killed at any moment leaves
        ``latest`` naming a complete checkpoint. (DeepSpeed itself writes ``latest`` from
        rank 0 before the other ranks are known to be done.)
        """
        tag = tag or f"global_step{model.global_steps}"  # DeepSpeed's own default, needed for 'latest'
        if self.is_rank_0():
            os.makedirs(save_dir, exist_ok=True)
        self.barrier()
        model.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
        self.barrier()
        if self.is_rank_0():
            if save_latest:
                write_text_atomic(os.path.join(save_dir, "latest"), str(tag))
            self._rotate_checkpoints(save_dir, max_num, max_mem, keep=str(tag))
        self.barrier()

    def load_ckpt(self, model, load_dir, tag=None, **kwargs):
        """DeepSpeed's ``load_checkpoint``; a checkpoint it cannot find is a one-line error."""
        load_path, states = model.load_checkpoint(load_dir, tag, **kwargs)
        if load_path is None:
            raise UserError(
                f"--load_checkpoint: no loadable DeepSpeed checkpoint in {load_dir} "
                f"(its 'latest' file names a missing folder?)"
            )
        return load_path, states

    def _rotate_checkpoints(self, save_dir: str, max_num: int, max_mem: float, keep: str) -> None:
        def size(folder):
            return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)

        folders = sorted(
            (os.path.join(save_dir, d) for d in os.listdir(save_dir)
             if os.path.isdir(os.path.join(save_dir, d)) and d != keep),
            key=os.path.getmtime,
        )
        # The newest checkpoint (``keep``) counts towards the limits but is never deleted.
        keep_size = size(os.path.join(save_dir, keep))
        while folders and (len(folders) + 1 > max_num or sum(map(size, folders)) + keep_size > max_mem * 1024**3):
            oldest = folders.pop(0)
            shutil.rmtree(oldest, ignore_errors=True)
            self.print(f"deleted old checkpoint {oldest}")
