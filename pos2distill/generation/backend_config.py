"""Which backend runs, with what precision and devices: resolved once from the flags.

``BackendConfig.resolve`` checks the choice (``auto`` resolved, the dtype normalised) before
any data is read or model loaded; ``factory.build_backend`` builds from it, and ``record``
gives the keys it adds to a resumable output's config.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

from ..errors import UserError

BACKENDS = ("auto", "hf", "vllm")
_DTYPES = {
    "auto": "auto",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


def vllm_available() -> bool:
    """Whether ``import vllm`` would find a package (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_import_error() -> str | None:
    """None when ``import vllm`` works, else why not in one line. vLLM pins torch exactly, so an
    installed vLLM beside another torch is found by ``vllm_available`` but fails to import."""
    if not vllm_available():
        return "not installed"
    try:
        importlib.import_module("vllm")
    except Exception as exc:  # any failure of a broken install (ImportError, OSError of a .so, ...)
        first = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__
    return None


def resolve_backend_name(name: str) -> str:
    """``auto`` -> ``vllm`` when a CUDA GPU is visible and vLLM imports, else ``hf``."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r} (--backend); choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        if not (vllm_available() and _cuda_available()):
            return "hf"
        error = vllm_import_error()
        if error:
            print(f"note: --backend auto: vLLM is installed but does not import ({error}); using hf", file=sys.stderr)
        return "hf" if error else "vllm"
    if name == "vllm":
        error = vllm_import_error()
        if error == "not installed":
            raise UserError("vLLM requested (--backend vllm) but not installed; pip install vllm or use --backend hf")
        if error:
            raise UserError(f"vLLM requested (--backend vllm) but it does not import ({error}); see README, GPU users")
    return name


def vllm_version() -> str:
    """The version of the vLLM that ``import vllm`` finds (for an output's config)."""
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def _normalize_dtype(dtype: str) -> str:
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of auto, bfloat16, float16, float32")
    return _DTYPES[key]


def check_precision(backend_name: str, dtype: str, tf32: bool) -> str:
    """The dtype normalised; ``tf32`` only for the hf backend with float32 weights (bf16 and fp16
    matrix multiplies already run on tensor cores; vLLM sets its own kernels)."""
    dtype = _normalize_dtype(dtype)
    if tf32 and backend_name != "hf":
        raise UserError("--tf32 is for the hf backend (--backend hf)")
    if tf32 and dtype != "float32":
        raise UserError(f"--tf32 changes float32 matrix multiplies only; pass --dtype float32 (got {dtype})")
    return dtype


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """The generation flags, checked: ``backend`` is ``hf`` or ``vllm`` (never ``auto``), ``dtype``
    normalised (bf16 and bfloat16 are one config). ``inference`` (``plain`` | ``pine``) is checked
    by ``pine.resolve_inference``; it rides here so that one object says how outputs are made."""

    backend: str
    dtype: str = "auto"
    tf32: bool = False
    num_gpus: int | None = None
    tensor_parallel_size: int | None = None
    batch_size: int = 16
    inference: str = "plain"

    @classmethod
    def resolve(cls, backend: str = "auto", *, dtype: str = "auto", tf32: bool = False, num_gpus: int | None = None,
                tensor_parallel_size: int | None = None, batch_size: int = 16,
                inference: str = "plain") -> "BackendConfig":
        name = resolve_backend_name(backend)
        dtype = check_precision(name, dtype, tf32)
        if batch_size < 1:
            raise UserError(f"--batch_size must be at least 1, got {batch_size}")
        if name == "hf" and (tensor_parallel_size or 1) > 1:
            raise UserError("the hf backend has no tensor parallelism; use --backend vllm to shard a model over GPUs")
        return cls(name, dtype, tf32, num_gpus, tensor_parallel_size, batch_size, inference)

    @classmethod
    def from_args(cls, args) -> "BackendConfig":
        """From the flags of ``cli_args.add_model_flags`` (after ``pine.resolve_inference``)."""
        return cls.resolve(args.backend, dtype=args.dtype, tf32=args.tf32, num_gpus=args.num_gpus,
                           tensor_parallel_size=args.tensor_parallel_size, batch_size=args.batch_size,
                           inference=getattr(args, "inference", "plain"))

    def record(self) -> dict:
        """What a resumable output's config holds of this (a change starts the output over).

        Keys away from their defaults only (``hf_workers``, ``dtype``, ``tf32``, ``inference``),
        so outputs written before they existed still match and resume.
        """
        config = {"backend": self.backend, "batch_size": self.batch_size}
        # Sampled answers depend on the hf worker count, and greedy ones on the batch shapes it gives.
        if self.backend == "hf" and (self.num_gpus or 0) > 1:
            config["hf_workers"] = self.num_gpus
        if self.dtype != "auto":
            config["dtype"] = self.dtype
        if self.tf32:
            config["tf32"] = True
        if self.inference != "plain":
            config["inference"] = self.inference
        return {**config, **self.software()}

    def software(self) -> dict:
        """torch and transformers, and vLLM's version with the vllm backend: a resumed run under
        other versions starts over instead of mixing chunks."""
        from importlib.metadata import PackageNotFoundError, version

        software = {}
        for package in ("torch", "transformers"):
            try:
                software[package] = version(package)
            except PackageNotFoundError:
                software[package] = None
        if self.backend == "vllm":
            software["vllm"] = vllm_version()
        return {"software": software}
