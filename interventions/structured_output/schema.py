"""The `structured_output` intervention's spec: exactly one grammar kind per request."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# bounds on what one request may ask the grammar compiler to build (compile time grows with them)
MAX_PATTERN_CHARS = 8192
MAX_GRAMMAR_CHARS = 65536
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
# and how long its compile may take (`--max-grammar-compile-seconds`; GrammarEngine.compile): the
# size bounds do not bound the time, e.g. a 50 kB EBNF of rules that each use the next twice
DEFAULT_COMPILE_TIMEOUT_S = 5.0
KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class StructuredSpec(BaseModel):
    """Set exactly one: `json_schema` (a JSON Schema object), `json_object` (any JSON object),
    `regex`, `choice` (the output is one of these strings) or `grammar` (xgrammar's EBNF, GBNF-style)."""

    model_config = ConfigDict(extra="forbid")

    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = Field(None, min_length=1, max_length=MAX_PATTERN_CHARS)
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredSpec:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)}; got {given or 'none'}")
        for i, c in enumerate(self.choice or []):
            if not c or len(c) > MAX_CHOICE_CHARS:
                raise ValueError(f"choice[{i}] must have 1 to {MAX_CHOICE_CHARS} characters")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))
