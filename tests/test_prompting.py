import pytest

from pos2distill.errors import UserError
from pos2distill.prompting import (
    CORRECTED_INSTRUCTION,
    R1_INSTRUCTION,
    chat_prompt,
    kv_user_message,
    qa_user_message,
    resolve_instruction,
    user_message,
)
from pos2distill.records import Document, Example

DOCS = [Document("Nobel Prize", "The first prize went to Röntgen."), Document("Physics", "A natural science.")]


def test_reference_r1_user_message_byte_for_byte():
    expected = (
        "Please write a high-quantify answer for the given question using only the provided search documents "
        "(some of which might be irrelevant).\n"
        "- Title: Nobel Prize\nThe first prize went to Röntgen.\n"
        "- Title: Physics\nA natural science.\n"
        "\nQuestion: who got the first nobel prize in physics\n"
    )
    assert qa_user_message("who got the first nobel prize in physics", DOCS) == expected


def test_reference_prompt_through_the_chat_template(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    message = qa_user_message("q?", DOCS[:1])
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n" + message + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_prompt(tokenizer, message) == expected


def test_instruction_variants():
    assert "high-quantify" in R1_INSTRUCTION
    assert "high-quality" in CORRECTED_INSTRUCTION
    assert resolve_instruction("reference") == R1_INSTRUCTION
    assert resolve_instruction("corrected") == CORRECTED_INSTRUCTION
    with pytest.raises(UserError, match="--instruction"):
        resolve_instruction("fancy")


def test_kv_prompt_lists_pairs_in_order_and_asks_for_the_key():
    pairs = [Document("k1", "v1"), Document("k2", "v2")]
    text = kv_user_message("k2", pairs)
    assert text.index('"k1": "v1"') < text.index('"k2": "v2"')
    assert text.endswith('Key: "k2"\nCorresponding value:')
    example = Example("k2", ["v2"], pairs[1], [pairs[0]], kind="kv")
    assert user_message(example, pairs) == text


def test_missing_chat_template_is_a_user_error():
    class NoTemplate:
        chat_template = None
        name_or_path = "base-model"

    with pytest.raises(UserError, match="no chat template"):
        chat_prompt(NoTemplate(), "hi")
