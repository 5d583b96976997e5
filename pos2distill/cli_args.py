"""Flags shared by the stage scripts (spelled as in the reference scripts)."""

import argparse
import os
import re

from .errors import UserError
from .names import DEFAULT_SEED



def add_model_flags(parser: argparse.ArgumentParser, several_models: bool = False) -> None:
    help_text = "local folder, hub id, .gguf file, or SmolLM2-135M-Instruct (embedded default)"
    if several_models:
        parser.add_argument("--model", nargs="+", required=True, help=help_text + "; several models are overlaid")
    else:
        parser.add_argument("--model", default="SmolLM2-135M-Instruct", help=help_text)
    parser.add_argument("--backend", default="auto", help="auto | vllm | hf (auto: vLLM when installed and a GPU is visible)")
    parser.add_argument("--num_gpus", type=int, default=None,
                        help="vLLM: GPUs in all (default: all visible); hf: 1 by default, 0 the CPU, N > 1 one "
                             "model per GPU (data parallel)")
    parser.add_argument("--tensor_parallel_size", type=int, default=None,
                        help="vLLM: GPUs per replica for a model too large for one GPU (default 1; "
                             "--num_gpus / this many replicas)")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per batch (HF backend)")
    parser.add_argument("--dtype", default="auto",
                        help="weights and activations: auto (bf16 on GPUs, fp32 on the CPU) | bfloat16 | float16 | float32")
    parser.add_argument("--tf32", action="store_true",
                        help="HF backend, --dtype float32: TF32 tensor cores for the float32 matrix multiplies "
                             "on CUDA (fp32 activations, faster; docs/performance.md)")
    parser.add_argument("--max-prompt-length", dest="max_prompt_length", type=int, default=32768,
                        help="longest prompt in tokens; longer prompts are an error, never truncated")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=100, help="longest answer in tokens")
    parser.add_argument("--inference", default="plain",
                        help="plain | pine (PINE: documents attend bidirectionally, positions re-assigned by "
                             "importance, order-invariant; hf backend, Llama/Qwen2, QA prompts; docs/pine.md)")
    parser.add_argument("--instruction", default="reference", help="reference (the R1 prompt, typo kept) | corrected")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seeds prompts' distractor order and sampling (another seed adds _seed{N} to stage 1's file)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def dataset_name_from_path(path: str) -> str:
    """nq-open-20_total_documents.jsonl.gz -> nq; kv-retrieval-75_keys -> kv; tqa_dev -> tqa."""
    base = os.path.basename(path)
    return re.split(r"[-_.]", base, maxsplit=1)[0] or "data"


def require_at_least(args: argparse.Namespace, minimums: dict) -> None:
    """``{"--chunk_size": 1, "--max-new-tokens": 1}``: each flag, when given, must be at least its minimum."""
    for flag, minimum in minimums.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < minimum:
            raise UserError(f"{flag} must be at least {minimum}, got {value}")


def check_model_flags(args: argparse.Namespace):
    """Validate the flags of ``add_model_flags`` before any data is read or model loaded.

    Returns the ``generation.backend_config.BackendConfig`` they resolve to (``auto`` resolved, the
    dtype normalised; it builds the backend and feeds the output's config) and the instruction text.
    """
    from .generation.backend_config import BackendConfig
    from .prompting import resolve_instruction

    require_at_least(args, {"--max-new-tokens": 1, "--max-prompt-length": 1, "--batch_size": 1, "--num_gpus": 0,
                            "--tensor_parallel_size": 1})
    return BackendConfig.from_args(args), resolve_instruction(args.instruction)
