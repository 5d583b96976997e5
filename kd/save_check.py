"""``--check_saved_logits``: after saving, reload the Hugging Face folder and compare its logits
with the trained engine's on one probe row, so a broken save (a ZeRO-3 gather that misses
weights, a wrong tie, a dtype slip) fails the run instead of the next stage.

The engine's logits come from the (ZeRO-partitioned) training engine on every rank, a
collective; rank 0 reloads the folder on the host in fp32 (no second copy on the GPU beside
the optimizer states) and writes ``save_check.json`` into the folder.
"""

import json
import os
import time

import torch

from pos2distill.errors import UserError

PROBE_TOKENS = 64


def probe_ids(dataset, tokens: int = PROBE_TOKENS) -> torch.Tensor:
    """The last ``tokens`` ids of the first training row's student input (prompt tail + answer)."""
    return torch.tensor([dataset.items[0]["student_ids"][-tokens:]])


def engine_logits(engine, ids: torch.Tensor, device, packed: bool) -> torch.Tensor:
    """Logits at positions 0..S-2 through the training path (``response_logits``, packed or not)."""
    from .losses import response_logits

    was_training = engine.training
    engine.eval()
    ids = ids.to(device)
    with torch.no_grad():
        logits = response_logits(engine, ids, torch.ones_like(ids), ids.shape[1] - 1, packed)
    engine.train(was_training)
    return logits.float().cpu()


def compare(trained: torch.Tensor, reloaded: torch.Tensor, trained_dtype: torch.dtype) -> dict:
    """Max absolute difference, its ratio to the largest logit, and argmax agreement; passes
    at a tolerance that allows for the trained model's dtype (bf16: 2^-8 relative)."""
    diff = float((trained - reloaded).abs().max())
    scale = float(trained.abs().max()) or 1.0
    tolerance = 5e-2 if trained_dtype in (torch.bfloat16, torch.float16) else 1e-4
    agree = float((trained.argmax(-1) == reloaded.argmax(-1)).float().mean())
    return {"max_abs_diff": diff, "max_abs_logit": scale, "relative": diff / scale, "tolerance": tolerance,
            "argmax_agreement": agree, "ok": diff / scale <= tolerance}


def check_saved_logits(strategy, model, dataset, folder: str, packed: bool) -> None:
    from transformers import AutoModelForCausalLM

    began = time.perf_counter()
    ids = probe_ids(dataset)
    engine = model.model  # Actor -> DeepSpeed engine
    trained = engine_logits(engine, ids, strategy.device, packed)  # every rank: ZeRO-3 gathers are collective
    if strategy.is_rank_0():
        dtype = next(engine.module.parameters()).dtype
        reloaded_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            reloaded = reloaded_model(ids, use_cache=False).logits.float()[:, :-1]
        del reloaded_model
        result = compare(trained, reloaded, dtype)
        result.update(probe_tokens=int(ids.shape[1]), trained_dtype=str(dtype).replace("torch.", ""),
                      seconds=time.perf_counter() - began)
        with open(os.path.join(folder, "save_check.json"), "w") as handle:
            json.dump(result, handle, indent=1)
        strategy.print(f"save check: reloaded {folder}: max |logit diff| {result['max_abs_diff']:.3g} "
                       f"({100 * result['relative']:.2f}% of the largest logit), argmax agreement "
                       f"{100 * result['argmax_agreement']:.0f}%, {result['seconds']:.1f} s")
        if not result["ok"]:
            raise UserError(f"{folder}: the saved model's logits differ from the trained model's "
                            f"(relative {result['relative']:.3g} > {result['tolerance']}); the save is broken")
    strategy.barrier()
