"""Generation backends: the hf backend on tiny random models (backend names and precision:
``test_backend_choice.py``; the vllm adapter on a stand-in: ``test_vllm_backend.py``).

Two tiny models, both made from the ``tiny_model`` fixture in memory:

- "sharp": an untied random head and sharpened attention, so greedy outputs
  depend on the whole prompt (the tied random model only repeats its last token).
- "scripted": a bigram model (attention and MLP outputs zeroed) whose tied head
  is edited so that given tokens follow given tokens (A -> B: the row of B is
  3x the embedding of A); other tokens repeat themselves. It writes predictable
  text such as " Paris\\n Paris\\n..." for the newline stop.
"""

import json
import shutil

import pytest
import torch

from benchmarks.generate_counts import GenerateCounter
from pos2distill.errors import UserError
from pos2distill.generation.base import GenerationBackend, newline_stopper, newline_token_table
from pos2distill.generation.backend_config import BackendConfig
from pos2distill.generation.factory import make_backend
from pos2distill.metrics import first_line
from pos2distill.prompting import chat_prompt

from conftest import MESSAGES


# --------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _sharpen(model) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head = model.get_output_embeddings()
        weight = torch.randn(head.weight.shape, generator=generator)
        head.weight = torch.nn.Parameter(weight.to(head.weight.device, head.weight.dtype))
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)


def _single_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def _script(model, transitions: dict[int, int]) -> None:
    with torch.no_grad():
        # No attention or MLP output: the model sees only its last token (a bigram model).
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.get_input_embeddings().weight
        head = embeddings.detach().clone()  # tied: every token repeats itself ...
        for follows in set(transitions.values()):
            head[follows] = 0
        for after, follows in transitions.items():  # ... except where a transition is scripted
            head[follows] += 3 * embeddings[after]
        model.get_output_embeddings().weight = torch.nn.Parameter(head)


@pytest.fixture(scope="module")
def sharp(tiny_model):
    backend = make_backend("hf", tiny_model, batch_size=4, num_gpus=0)
    _sharpen(backend.model)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def scripted(tiny_model, tmp_path_factory):
    """The scripted model, loaded from a copy whose generation_config.json tries every trick."""
    folder = tmp_path_factory.mktemp("models") / "noisy-generation-config"
    shutil.copytree(tiny_model, folder)
    noisy = {
        "do_sample": True, "temperature": 5.0, "top_k": 3, "repetition_penalty": 3.0,
        "no_repeat_ngram_size": 1, "max_new_tokens": 2, "min_new_tokens": 10,
        "suppress_tokens": [198], "bad_words_ids": [[198]],
        "bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 2,
    }
    (folder / "generation_config.json").write_text(json.dumps(noisy))
    backend = make_backend("hf", str(folder), batch_size=4, num_gpus=0)
    tok = backend.tokenizer
    ids = {word: _single_token(tok, word) for word in ("\n", " Paris", " capital", " answer")}
    _script(backend.model, {
        ids[" capital"]: ids[" Paris"],   # "... capital" -> " Paris"
        ids[" Paris"]: ids["\n"],         # " Paris" -> "\n"
        ids["\n"]: ids[" Paris"],         # "\n" -> " Paris"
        ids[" answer"]: ids["\n"],        # "... answer" -> "\n" (a leading newline)
    })
    yield backend
    backend.close()


# --------------------------------------------------------------------------- hf backend


def test_hf_interface_and_count_tokens(sharp):
    assert isinstance(sharp, GenerationBackend) and sharp.name == "hf"
    prompts = [chat_prompt(sharp.tokenizer, m) for m in MESSAGES[:3]]
    counts = sharp.count_tokens(prompts)
    assert counts == [len(sharp.tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    # The chat template's markers are single special tokens; nothing is added in front.
    first = sharp.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    assert first[0] == sharp.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert counts[0] < counts[1] < counts[2]
    assert sharp.count_tokens([]) == []
    assert sharp.model.dtype == torch.float32  # dtype="auto" on CPU


def test_hf_batched_greedy_matches_one_by_one(sharp):
    prompts = [chat_prompt(sharp.tokenizer, m) for m in MESSAGES]
    assert len(set(sharp.count_tokens(prompts))) == len(prompts)  # lengths differ: padding and sorting matter
    batched = sharp.generate(prompts, max_new_tokens=6)
    stats = sharp.last_stats
    assert stats["prompts"] == len(prompts) and stats["new_tokens"] == 6 * len(prompts)
    assert stats["seconds"] > 0 and stats["prompts_per_s"] > 0
    assert len(set(batched)) == len(prompts), batched  # the outputs are worth comparing
    alone = [sharp.generate([p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone


def test_hf_sampling_is_seeded(sharp):
    prompts = [chat_prompt(sharp.tokenizer, m) for m in MESSAGES[:3]]
    kwargs = dict(max_new_tokens=5, temperature=1.0, top_p=0.95)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = sharp.generate(prompts, seed=1, **kwargs)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    assert sharp.generate(prompts, seed=1, **kwargs) == first
    assert sharp.generate(prompts, seed=2, **kwargs) != first
    assert sharp.generate(prompts, max_new_tokens=5) != first  # greedy differs from sampling


def test_hf_rejects_bad_arguments(sharp):
    assert sharp.generate([], max_new_tokens=5) == []
    with pytest.raises(UserError, match="max_new_tokens"):
        sharp.generate(["x"], max_new_tokens=0)
    with pytest.raises(UserError, match="top_p"):
        sharp.generate(["x"], max_new_tokens=1, temperature=0.7, top_p=0)


def test_hf_max_model_len(tiny_model):
    backend = make_backend("hf", tiny_model, max_model_len=8, num_gpus=0)
    try:
        with pytest.raises(UserError, match="more than --max_model_len 8"):
            backend.generate(["short", "a prompt that is clearly longer than eight tokens in all"], max_new_tokens=1)
    finally:
        backend.close()


def test_hf_ignores_the_checkpoint_generation_config(scripted):
    # The noisy file asked for sampling, 2 tokens, no repeats and a banned "\n";
    # greedy decoding with our arguments still writes the scripted cycle.
    out = scripted.generate(["What is the capital"], max_new_tokens=6)
    assert out == [" Paris\n Paris\n Paris\n"]
    assert 7 in scripted.eos_ids and 2 in scripted.eos_ids  # its EOS ids are kept


def test_hf_stop_at_newline(scripted):
    prompts = [
        "What is the capital",   # " Paris" "\n" ...: stops after 2 tokens
        "Here is my answer",     # "\n" " Paris" "\n": the leading newline does not stop it
        "Paris, Rome",           # " Rome" repeats: never a newline
        "Lines:\n\n",            # "\n\n" repeats: whitespace only, never stops
    ]
    full = scripted.generate(prompts, max_new_tokens=6)
    assert full[:2] == [" Paris\n Paris\n Paris\n", "\n Paris\n Paris\n Paris"]
    assert "\n" not in full[2] and not full[3].strip()
    stopped = scripted.generate(prompts, max_new_tokens=6, stop_at_newline=True)
    assert stopped == [" Paris\n", "\n Paris\n", full[2], full[3]]
    assert scripted.last_stats["new_tokens"] == 2 + 3 + 6 + 6
    assert [first_line(s) for s in stopped] == [first_line(f) for f in full]


def _with_extra_eos(backend, prompts, picks):
    """EOS ids that end the given rows early: the greedy token of row r at step t, for (r, t) in picks."""
    encoded = backend.tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    raw = backend.model.generate(**encoded, max_new_tokens=12, do_sample=False, pad_token_id=backend.pad_id)
    new = raw[:, encoded["input_ids"].shape[1]:]
    return [int(new[row, step]) for row, step in picks]


def test_hf_compact_finished_gives_the_same_answers(sharp):
    prompts = [chat_prompt(sharp.tokenizer, m) for m in MESSAGES]
    eos_ids = list(sharp.eos_ids)
    # Rows end at different steps (the sharp model's outputs depend on the whole prompt and
    # cache, so a wrong cache row, mask or position after compaction changes the text).
    sharp.eos_ids = eos_ids + _with_extra_eos(sharp, prompts, [(0, 2), (3, 5), (4, 0), (1, 8)])
    batch_size = sharp.batch_size
    try:
        for size in (6, 4):
            sharp.batch_size = size
            with GenerateCounter(sharp.model) as counter:  # what generate computes
                plain = sharp.generate(prompts, max_new_tokens=12)
            plain_stats = dict(sharp.last_stats, **counter.totals)
            sharp.compact_finished = True
            try:
                with GenerateCounter(sharp.model) as counter:
                    compact = sharp.generate(prompts, max_new_tokens=12)
            finally:
                sharp.compact_finished = False
            stats = dict(sharp.last_stats, **counter.totals)
            assert compact == plain
            assert len({len(t) for t in plain}) > 2  # rows really ended at different steps
            assert stats["new_tokens"] == plain_stats["new_tokens"]
            assert stats["decode_steps"] == plain_stats["decode_steps"]
            assert stats["row_steps"] < plain_stats["row_steps"]  # finished rows were dropped
            assert plain_stats["row_steps"] > plain_stats["new_tokens"]  # plain decoding computes finished rows
            assert stats["batches"] == -(-len(prompts) // size)
            assert stats["padded_prompt_tokens"] >= stats["prompt_tokens"] == sum(sharp.count_tokens(prompts))
        # sampling never compacts: the same call gives the same samples either way
        sampled = sharp.generate(prompts, max_new_tokens=6, temperature=1.0, seed=3)
        sharp.compact_finished = True
        try:
            assert sharp.generate(prompts, max_new_tokens=6, temperature=1.0, seed=3) == sampled
        finally:
            sharp.compact_finished = False
    finally:
        sharp.eos_ids = eos_ids
        sharp.batch_size = batch_size


def test_hf_compact_finished_keeps_the_newline_state(scripted):
    prompts = ["What is the capital", "Here is my answer", "Paris, Rome", "Lines:\n\n"]
    plain = scripted.generate(prompts, max_new_tokens=6, stop_at_newline=True)
    scripted.compact_finished = True
    try:
        # Row 0 ends at step 2 and is dropped; row 1 ("\n Paris\n") must still remember that it
        # has written text when its second newline comes, in the next generate call.
        assert scripted.generate(prompts, max_new_tokens=6, stop_at_newline=True) == plain
    finally:
        scripted.compact_finished = False
    assert plain[:2] == [" Paris\n", "\n Paris\n"]


def test_hf_compact_finished_passes_the_cache_by_the_supported_name(sharp):
    """transformers 5.24 renamed generate's past_key_values to cache (the old name warns and goes
    in 6.0); 5.23, the oldest in requirements.txt, knows only past_key_values."""
    import transformers
    from packaging.version import Version

    expected = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    prompts = [chat_prompt(sharp.tokenizer, m) for m in MESSAGES[:4]]
    eos_ids, generate, calls = list(sharp.eos_ids), sharp.model.generate, []
    sharp.eos_ids = eos_ids + _with_extra_eos(sharp, prompts, [(0, 1), (2, 4)])  # two calls at least

    def spy(*args, **kwargs):
        calls.append({k: v is not None for k, v in kwargs.items() if k in ("cache", "past_key_values")})
        out = generate(*args, **kwargs)
        assert getattr(out, expected) is not None
        return out

    try:
        plain = sharp.generate(prompts, max_new_tokens=8)
        sharp.compact_finished, sharp.model.generate = True, spy
        compact = sharp.generate(prompts, max_new_tokens=8)
    finally:
        sharp.compact_finished, sharp.model.generate, sharp.eos_ids = False, generate, eos_ids
    assert compact == plain
    assert len(calls) >= 2 and calls[0] == {expected: False}
    assert all(call == {expected: True} for call in calls[1:]), calls


def test_hf_reuses_the_counted_token_ids(sharp):
    prompts = [chat_prompt(sharp.tokenizer, m) for m in MESSAGES[:3]]
    sharp.count_tokens(prompts)
    counted = sharp._encoded[1]
    assert sharp._token_ids(list(prompts)) is counted  # generate() takes these, no second tokenization
    assert sharp._token_ids(prompts[:2]) is not counted  # other prompts are tokenized afresh
    sharp.generate(prompts, max_new_tokens=2)
    assert sharp._encoded is None  # used once, then dropped


class _ToyTokenizer:
    """Just enough of a tokenizer for newline_token_table."""

    vocab = ["<eos>", "a", "\n", " ", "b\n", " \n", "\n\nc", "\n\n"]

    def __len__(self):
        return len(self.vocab)

    def batch_decode(self, sequences, skip_special_tokens=True):
        return ["" if skip_special_tokens and ids == [0] else "".join(self.vocab[i] for i in ids) for ids in sequences]


def test_newline_table_and_stopper():
    has_newline, content_before, has_content = newline_token_table(_ToyTokenizer(), vocab_size=10)
    assert has_newline.tolist() == [False, False, True, False, True, True, True, True, False, False]
    assert content_before.tolist() == [False, False, False, False, True, False, False, False, False, False]
    assert has_content.tolist() == [False, True, False, False, True, False, True, False, False, False]

    A, NL, SP, B_NL, SP_NL, NL_NL_C, NL_NL = 1, 2, 3, 4, 5, 6, 7
    rows = torch.tensor([
        [NL, NL, A, NL],              # leading newlines, then text, then a newline: stops at step 3
        [A, SP_NL, A, A],             # stops at step 1
        [SP, NL, SP_NL, NL_NL],       # whitespace only: never
        [B_NL, A, A, A],              # text and newline in one token: step 0
        [NL_NL_C, SP, NL_NL, A],      # text after leading newlines, then "\n\n": step 2
        [0, NL, A, A],                # a special token is no text: never
    ])
    prompt = torch.full((rows.shape[0], 3), 9)  # prompt tokens are not looked at
    stopper = newline_stopper((has_newline, content_before, has_content), prompt_width=3)
    done = []
    for step in range(rows.shape[1]):
        ids = torch.cat([prompt, rows[:, : step + 1]], dim=1)
        done.append(stopper(ids, None).tolist())
    firsts = [next((s for s in range(4) if done[s][row]), -1) for row in range(rows.shape[0])]
    assert firsts == [3, 1, -1, 0, 2, -1]
    assert stopper.stop_step.tolist() == firsts


def test_newline_table_of_the_real_tokenizer(sharp):
    has_newline, content_before, has_content = sharp._table()
    assert len(has_newline) == sharp.model.get_output_embeddings().weight.shape[0]
    newline = _single_token(sharp.tokenizer, "\n")
    assert has_newline[newline] and not content_before[newline] and not has_content[newline]
    paris = _single_token(sharp.tokenizer, " Paris")
    assert has_content[paris] and not has_newline[paris]
    assert not has_content[sharp.tokenizer.eos_token_id]


def test_generate_rejects_a_backend_that_drops_answers():
    class Dropping(GenerationBackend):
        name = "dropping"

        def __init__(self):
            super().__init__()
            self.tokenizer = lambda prompts, add_special_tokens=False: {"input_ids": [[1] for _ in prompts]}

        def _generate_ids(self, token_ids, **kwargs):
            return ["only one"], 1

    with pytest.raises(RuntimeError, match="answered 1 of 2 prompts"):
        Dropping().generate(["a", "b"], max_new_tokens=4)


def test_precision_flags_enter_the_output_config_only_when_set():
    software = BackendConfig.resolve("hf").software()
    assert set(software["software"]) == {"torch", "transformers"}
    # defaults add nothing, so outputs written before the flags existed still resume
    assert BackendConfig.resolve("hf").record() == {"backend": "hf", "batch_size": 16, **software}
    config = BackendConfig.resolve("hf", dtype="fp32", tf32=True, num_gpus=2, batch_size=4, inference="pine")
    assert config.dtype == "float32"  # normalised once: fp32 and float32 are one config
    assert config.record() == {"backend": "hf", "batch_size": 4, "hf_workers": 2, "dtype": "float32", "tf32": True,
                               "inference": "pine", **software}
    assert "hf_workers" not in BackendConfig.resolve("hf", num_gpus=1).record()
    assert "hf_workers" not in BackendConfig.resolve("hf", num_gpus=0).record()
