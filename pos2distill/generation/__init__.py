"""Text generation behind one interface: Hugging Face ``generate`` or vLLM.

Both backends take prompts that are already chat-templated strings, return
one completion per prompt in input order (special tokens stripped), and
record throughput in ``last_stats``.

    config = BackendConfig.resolve(args.backend, num_gpus=args.num_gpus)  # once, with the other flags
    with build_backend(config, args.model) as backend:
        outputs = backend.generate(prompts, max_new_tokens=100, temperature=0.0)

``make_backend(name, model, ...)`` does both steps in one call.

Sampling is seeded at the start of every ``generate`` call, so the same call
with the same seed gives the same outputs (callers resume in fixed chunks and
seed each chunk).

``stop_at_newline=True`` is an optimisation for answers that are scored on
the first line of the stripped output: a row may stop once a newline follows
some non-whitespace text. A leading newline never stops a row.

Heavy imports (torch, transformers, vllm) happen inside functions: the
data-parallel workers (``worker_pool.WorkerPool``, both backends) are spawned
processes that import these modules and must set ``CUDA_VISIBLE_DEVICES`` before
anything touches CUDA. Being spawned, they also re-import the caller's main
module: scripts need an ``if __name__ == "__main__":`` guard.

Modules: ``backend_config`` (the flags resolved once, and what they add to an output's
config), ``base`` (the interface, the newline stop), ``hf`` and ``compaction`` (Hugging Face),
``parallel`` (one HF model per GPU), ``vllm_backend``, ``factory`` (``build_backend``).
"""
