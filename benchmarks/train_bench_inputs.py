"""The models and micro-batches ``bench_train.py`` times: a model folder or a random-weight shape,
regional compilation, the attention layout, and rows from ``--data`` or random ids, collated as
the trainer does."""

import math

from pos2distill.errors import UserError


def load_model(path: str, device, dtype, train: bool, gradient_checkpointing: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    return set_mode(model, train, gradient_checkpointing)


def set_mode(model, train: bool, gradient_checkpointing: bool):
    model.config.use_cache = False
    if train:
        model.train()
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def shape_models(args, device, dtype):
    """--shape: (tokenizer, student, teacher), both models built on ``device`` with the same weights."""
    import tempfile

    from pos2distill.model_shapes import load_shape_tokenizer, model_for_shape, resolve_tokenizer
    from pos2distill.models import embedded_tokenizer_dir

    source = resolve_tokenizer(args.tokenizer) if args.tokenizer else embedded_tokenizer_dir()
    with tempfile.TemporaryDirectory() as work:
        tokenizer = load_shape_tokenizer(args.shape, source, work)

    def build(train, checkpointing):
        model = model_for_shape(args.shape, tokenizer, device, dtype, args.seed)
        model.set_attn_implementation("sdpa")
        return set_mode(model, train, checkpointing)

    return tokenizer, build(True, args.gradient_checkpointing), build(False, False)


def compile_decoder_layers(model, mode: str = "default") -> None:
    """Regional compilation: torch.compile each decoder layer in place, not the whole model.

    The layers run the same code, so one compiled graph serves all of them (and the teacher's);
    a whole-model compile traces every layer and the mask code, for the student's forward and
    backward and the teacher's forward: on an H200 it had not finished its warm-up after 10
    minutes (docs/performance.md, fifth session).
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        raise UserError(f"--compile: {type(model).__name__} has no model.layers (decoder layers) to compile")
    for layer in layers:
        layer.compile(dynamic=True, mode=mode)


def set_attention(models, attention: str, longest: int) -> None:
    """Switch the models between SDPA on padded rows and the packed-rows kernel."""
    from kd.packed_attention import check_packable, register_packed_attention

    name = register_packed_attention() if attention == "packed" else "sdpa"
    for model in models:
        if attention == "packed":
            check_packable(model.config, longest)
        model.set_attn_implementation(name)


def _response_ids(tokenizer, answer: str) -> list:
    from pos2distill.metrics import first_line

    return tokenizer(first_line(answer), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def real_items(args, tokenizer, count: int) -> list:
    """``count`` rows from ``--data``: student prompt with the gold document at a trivial
    position, teacher prompt with it at ``--teacher_position``, response = first gold answer + EOS.
    Tokenized as ``kd.pair_dataset.PairDataset`` does with ``--apply_chat_template``."""
    from pos2distill.formats import load_examples
    from pos2distill.position_eval import prompt_examples

    needed = math.ceil(count / args.copies_per_example)
    examples = load_examples(args.data, total_doc=args.total_doc, limit=needed)
    if not examples:
        raise UserError(f"{args.data}: no examples")
    trivial = [p for p in range(args.total_doc) if p != args.teacher_position] or [args.teacher_position]
    stride = max(1, len(trivial) // args.copies_per_example)

    def ids(example, example_id, position):
        prompt = prompt_examples(tokenizer, [example], [example_id], position, args.seed)[0].prompt
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]

    items = []
    for row in range(count):
        # Fewer examples than rows: reuse them (the file is short), each still a distinct row.
        example_id = (row // args.copies_per_example) % len(examples)
        copy = row % args.copies_per_example
        example = examples[example_id]
        position = trivial[(example_id + copy * stride) % len(trivial)]
        response = _response_ids(tokenizer, example.answers[0] if example.answers else "")
        items.append({
            "student_ids": ids(example, example_id, position) + response,
            "teacher_ids": ids(example, example_id, args.teacher_position) + response,
            "response_len": len(response),
            "gold_idx": position,
            "is_anchor": False,
        })
    return items


def synthetic_items(args, tokenizer, vocab_size: int, count: int) -> list:
    """``count`` rows of random prompt ids of ``--prompt_len``; copies share a teacher prompt."""
    import torch

    generator = torch.Generator().manual_seed(args.seed)

    def draw(n):
        return torch.randint(0, vocab_size, (n,), generator=generator).tolist()

    items = []
    for row in range(count):
        if row % args.copies_per_example == 0:  # a new example: its teacher prompt and response
            teacher = draw(args.prompt_len)
            response = draw(args.response_len - 1) + [tokenizer.eos_token_id]
        items.append({
            "student_ids": draw(args.prompt_len) + response,
            "teacher_ids": teacher + response,
            "response_len": args.response_len,
            "gold_idx": 1 + row % 4,
            "is_anchor": False,
        })
    return items


def collate(items: list, pad_id: int) -> dict:
    """The trainer's collate (``PairDataset.collate_fn``) on hand-made rows."""
    from types import SimpleNamespace

    from kd.pair_dataset import PairDataset

    return PairDataset.collate_fn(SimpleNamespace(pad_token_id=pad_id), items)
