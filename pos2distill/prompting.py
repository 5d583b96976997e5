"""Prompts: the reference R1 search-documents prompt and a KV-retrieval prompt.

The R1 instruction keeps the reference's typo ("high-quantify"): the published
checkpoints were trained with it. ``--instruction corrected`` fixes it.
"""

import json
from typing import Sequence

from .errors import UserError
from .records import Document, Example

R1_INSTRUCTION = (
    "Please write a high-quantify answer for the given question using only the provided "
    "search documents (some of which might be irrelevant)."
)
CORRECTED_INSTRUCTION = (
    "Please write a high-quality answer for the given question using only the provided "
    "search documents (some of which might be irrelevant)."
)
INSTRUCTIONS = {"reference": R1_INSTRUCTION, "corrected": CORRECTED_INSTRUCTION}

KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."


def qa_document(doc: Document) -> str:
    return f"- Title: {doc.title}\n{doc.text}\n"


def qa_user_message(question: str, documents: Sequence[Document], instruction: str = R1_INSTRUCTION) -> str:
    """``{instruction}\\n{context}\\nQuestion: {question}\\n``, context = ``- Title: t\\ntext\\n`` per document."""
    context = "".join(qa_document(doc) for doc in documents)
    return f"{instruction}\n{context}\nQuestion: {question}\n"


def kv_user_message(key: str, documents: Sequence[Document]) -> str:
    """Lost-in-the-middle style KV prompt; each document is one key-value pair, in order."""
    pairs = ",\n ".join(f"{json.dumps(doc.title)}: {json.dumps(doc.text)}" for doc in documents)
    return f"{KV_INSTRUCTION}\n\nJSON data:\n{{{pairs}}}\n\nKey: {json.dumps(key)}\nCorresponding value:"


def user_message(example: Example, documents: Sequence[Document], instruction: str = R1_INSTRUCTION) -> str:
    """The user turn for ``example`` shown with ``documents`` in the given order."""
    if example.kind == "kv":
        return kv_user_message(example.question, documents)
    return qa_user_message(example.question, documents, instruction)


def resolve_instruction(name: str) -> str:
    if name not in INSTRUCTIONS:
        raise UserError(f"--instruction must be one of {sorted(INSTRUCTIONS)}, got {name!r}")
    return INSTRUCTIONS[name]


def require_chat_template(tokenizer) -> None:
    """Stages 1, 3 and 4 prompt through the chat template; a base model's tokenizer has none."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise UserError(
            f"{name}: the tokenizer has no chat template (neither chat_template.jinja nor a 'chat_template' "
            f"in tokenizer_config.json); use a chat/instruct model"
        )


def chat_prompt(tokenizer, message: str) -> str:
    """One user turn through the tokenizer's chat template, generation prompt added."""
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )


class SegmentedPrompt(str):
    """A chat-templated prompt that also knows its pieces, ``segments`` = (prefix, document 1,
    ..., document k, suffix), which concatenate to the string. ``--inference pine`` tokenizes
    the pieces one by one; everything else sees a plain ``str``."""

    def __new__(cls, segments):
        prompt = super().__new__(cls, "".join(segments))
        prompt.segments = tuple(segments)
        return prompt

    def __reduce__(self):
        return (SegmentedPrompt, (self.segments,))


def segmented_chat_prompt(tokenizer, example: Example, documents: Sequence[Document],
                          instruction: str = R1_INSTRUCTION) -> str:
    """``chat_prompt`` of ``user_message``; for a QA prompt a ``SegmentedPrompt`` (the same text).

    KV prompts stay plain strings: their pairs are joined by separators, so a pair's text
    depends on its place. So does a QA prompt whose template rewrites the documents' text.
    """
    prompt = chat_prompt(tokenizer, user_message(example, documents, instruction))
    if example.kind == "kv":
        return prompt
    pieces = [qa_document(doc) for doc in documents]
    context = "".join(pieces)
    start = prompt.find(context)
    if start < 0 or not pieces:
        return prompt
    return SegmentedPrompt([prompt[:start], *pieces, prompt[start + len(context):]])
