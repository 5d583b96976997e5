"""``--check_saved_logits``: after saving, reload the Hugging Face folder and compare its logits
with the trained engine's on one probe row, so a broken save (a ZeRO-3 gather that misses
weights, a wrong tie, a dtype slip) fails the run instead of the next stage.

The engine's logits come from the (ZeRO-partitioned) training engine on every rank, a
collective; rank 0 reloads the folder on the host in fp32 (no second copy on the GPU beside
the optimizer states) and writes ``save_check.json`` into the folder.

Logits alone cannot tell a bf16 engine's rounding from a small save error (on a 7B shape with
random weights the two differed by 7% of the largest logit), so the saved tensors are also
compared with the engine's parameters, gathered one at a time: the save holds them in the
engine's dtype, so they must be equal bit for bit. When every tensor matches, the logit
difference is numerics and is reported, not failed (a 3B shape in bf16 with equal weights gave
5.15% of the largest logit). A LoRA folder holds the adapters only: their tensors are compared,
under the names PEFT saves them with (the adapter's name left out).
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
    release_gathered(engine)
    return logits.float().cpu()


def release_gathered(engine) -> None:
    """Return every ZeRO-3 parameter to its partition, waiting for any still being fetched. An
    eval forward outside the training step leaves parameters gathered, and on a GPU some still
    in flight (prefetched); gathering one of those again failed at the 7B shape ("Cannot
    partition a param in flight"). A no-op without ZeRO-3."""
    release = getattr(engine, "empty_partition_cache", None)
    if release is not None and getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        release()


def compare(trained: torch.Tensor, reloaded: torch.Tensor, trained_dtype: torch.dtype) -> dict:
    """Max absolute difference, its ratio to the largest logit, and argmax agreement; passes
    at a tolerance that allows for the trained model's dtype (bf16: 2^-8 relative)."""
    diff = float((trained - reloaded).abs().max())
    scale = float(trained.abs().max()) or 1.0
    tolerance = 5e-2 if trained_dtype in (torch.bfloat16, torch.float16) else 1e-4
    agree = float((trained.argmax(-1) == reloaded.argmax(-1)).float().mean())
    return {"max_abs_diff": diff, "max_abs_logit": scale, "relative": diff / scale, "tolerance": tolerance,
            "argmax_agreement": agree, "ok": diff / scale <= tolerance}


def compare_weights(module, folder: str, rank0: bool, adapter: str = None) -> dict:
    """Every parameter of ``module`` against the saved tensor of its name, bit for bit; ZeRO-3
    parameters are gathered one at a time on every rank (collective). Tied weights saved once
    are looked up under the first name they were saved as. ``adapter``: ``module`` is a PEFT
    model whose folder holds that adapter's tensors alone (``_saved_parameters``)."""
    import contextlib

    from safetensors import safe_open

    try:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters
    except ImportError:  # no ZeRO: parameters are whole already
        gather = None
    compared, differ, missing, worst = 0, [], [], 0.0
    seen = {}
    with contextlib.ExitStack() as files:
        where = {}  # tensor name -> its shard, each shard opened once
        if rank0:
            for name in sorted(os.listdir(folder)):
                if name.endswith(".safetensors"):
                    handle = files.enter_context(safe_open(os.path.join(folder, name), "pt"))
                    where.update({key: handle for key in handle.keys()})
        for name, param in _saved_parameters(module, adapter):
            zero3 = gather is not None and hasattr(param, "ds_id")
            with gather([param], modifier_rank=None) if zero3 else contextlib.nullcontext():
                if not rank0:
                    continue
                key = name if name in where else seen.get(id(param))
                if key is None:
                    missing.append(name)
                    continue
                seen.setdefault(id(param), key)
                saved = where[key].get_tensor(key)
                mine = param.detach().to("cpu", saved.dtype)
                compared += 1
                if saved.shape != mine.shape or not torch.equal(saved, mine):
                    gap = float((saved.float() - mine.float()).abs().max()) if saved.shape == mine.shape else float("inf")
                    worst = max(worst, gap)
                    differ.append(name)
    return {"compared": compared, "differ": differ[:10], "differ_count": len(differ), "missing": missing[:10],
            "missing_count": len(missing), "max_abs_diff": worst,
            "ok": compared > 0 and not differ and not missing}


def _saved_parameters(module, adapter):
    """(saved name, parameter) pairs: every parameter of a full model; for a PEFT model, what PEFT
    itself puts in the adapter folder under the names it gives them (the adapter's name left out,
    ``modules_to_save`` copies and embedding layers included)."""
    if adapter is None:
        return list(module.named_parameters(remove_duplicate=False))
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(module, state_dict=dict(module.named_parameters()),
                                          adapter_name=adapter).items())


ADAPTER_FIELDS = ("r", "lora_alpha", "target_modules", "bias", "use_dora", "modules_to_save", "use_rslora")


def compare_adapter_config(module, folder: str, adapter: str) -> dict:
    """The saved ``adapter_config.json`` against the PEFT model's config on the fields that change
    what the reloaded adapters compute; lists and sets compare as sets."""
    def plain(value):
        return sorted(value) if isinstance(value, (list, set, tuple)) else value

    path = os.path.join(folder, "adapter_config.json")
    if not os.path.exists(path):
        return {"ok": False, "differ": ["adapter_config.json missing"]}
    with open(path) as handle:
        saved = json.load(handle)
    mine = module.peft_config[adapter].to_dict()
    differ = [f"{k}: saved {saved.get(k)!r}, trained {mine.get(k)!r}" for k in ADAPTER_FIELDS
              if plain(saved.get(k)) != plain(mine.get(k))]
    return {"ok": not differ, "differ": differ}


def check_saved_logits(strategy, model, dataset, folder: str, packed: bool) -> None:
    from transformers import AutoModelForCausalLM

    began = time.perf_counter()
    ids = probe_ids(dataset)
    engine = model.model  # Actor -> DeepSpeed engine
    trained = engine_logits(engine, ids, strategy.device, packed)  # every rank: ZeRO-3 gathers are collective
    from peft import PeftModel

    adapter = engine.module.active_adapter if isinstance(engine.module, PeftModel) else None
    weights = compare_weights(engine.module, folder, strategy.is_rank_0(), adapter)
    if strategy.is_rank_0():
        dtype = next(engine.module.parameters()).dtype
        reloaded_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            reloaded = reloaded_model(ids, use_cache=False).logits.float()[:, :-1]
        del reloaded_model
        result = compare(trained, reloaded, dtype)
        result["logits_ok"] = result["ok"]
        result["weights"] = weights  # equal weights settle it; the logit gap is then numerics
        result["ok"] = weights["ok"]
        if adapter is not None:  # adapters also need the config that says where and how they apply
            result["adapter_config"] = compare_adapter_config(engine.module, folder, adapter)
            result["ok"] = result["ok"] and result["adapter_config"]["ok"]
        result.update(probe_tokens=int(ids.shape[1]), trained_dtype=str(dtype).replace("torch.", ""),
                      seconds=time.perf_counter() - began)
        with open(os.path.join(folder, "save_check.json"), "w") as handle:
            json.dump(result, handle, indent=1)
        same = (f"; weights: {weights['compared']} tensors compared, {weights['differ_count']} differ, "
                f"{weights['missing_count']} missing")
        strategy.print(f"save check: reloaded {folder}: max |logit diff| {result['max_abs_diff']:.3g} "
                       f"({100 * result['relative']:.2f}% of the largest logit), argmax agreement "
                       f"{100 * result['argmax_agreement']:.0f}%{same}, {result['seconds']:.1f} s")
        if adapter is not None and not result["adapter_config"]["ok"]:
            raise UserError(f"{folder}: the saved adapter config differs from the trained model's "
                            f"({'; '.join(result['adapter_config']['differ'][:3])}); the save is broken")
        if not result["ok"]:
            raise UserError(f"{folder}: the saved weights differ from the trained model's ({weights['differ_count']} "
                            f"differ, e.g. {weights['differ'][:3]}; {weights['missing_count']} missing, e.g. "
                            f"{weights['missing'][:3]}); the save is broken")
    strategy.barrier()
