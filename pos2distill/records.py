"""The normalized record every loader yields and every stage consumes."""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Document:
    """One retrieved passage (for KV retrieval: title = key, text = value)."""

    title: str
    text: str

    def to_dict(self) -> dict:
        return {"title": self.title, "text": self.text}

    @classmethod
    def from_dict(cls, d: dict) -> "Document":
        return cls(title=str(d.get("title", "")), text=str(d["text"]))


@dataclass
class Example:
    """A question, its gold answers, the gold document and the distractors.

    ``kind`` selects the prompt: "qa" (search documents) or "kv" (key-value retrieval).
    ``meta`` carries format-specific fields through the pipeline untouched.
    """

    question: str
    answers: list[str]
    gold: Document
    distractors: list[Document]
    kind: str = "qa"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total_docs(self) -> int:
        return len(self.distractors) + 1
