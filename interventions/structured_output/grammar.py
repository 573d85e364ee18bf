"""The grammar engine behind structured outputs: xgrammar (picked by bench/grammar_engines.py: the
lower token-mask time at batch 64 on the CPU). One compiler per served tokenizer, built on first use."""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any

import xgrammar as xgr

from actserve.interventions.structured_output.schema import StructuredSpec

# compiled grammars are cached by the compiler (n choices and repeated schemas compile once); bounded
CACHE_BYTES = 256 * 2**20
# xgrammar's C++ errors start with "[time] /path/file.cc:line: "; the rest is the message for the user
_CPP_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s*\S+:\d+:\s*")


class GrammarError(ValueError):
    """A schema, regex, choice list or grammar the engine cannot compile; the message says why."""


def clean_error(e: Exception) -> str:
    text = _CPP_PREFIX.sub("", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


class GrammarEngine:
    """Compiles specs into grammars for one tokenizer and fills token bitmasks for many matchers."""

    def __init__(self, tokenizer_path: str, vocab_size: int, stop_token_ids: list[int]) -> None:
        self._path, self.vocab_size, self.stop_token_ids = tokenizer_path, vocab_size, stop_token_ids
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self.batch = xgr.BatchGrammarMatcher(max_threads=min(8, os.cpu_count() or 1))

    def compiler(self) -> xgr.GrammarCompiler:
        """Built once, on the first structured request (the tokenizer's vocabulary is scanned then)."""
        with self._lock:
            if self._compiler is None:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(self._path)
                info = xgr.TokenizerInfo.from_huggingface(
                    tok, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=min(8, os.cpu_count() or 1), cache_limit_bytes=CACHE_BYTES
                )
            return self._compiler

    def compile(self, spec: StructuredSpec) -> Any:
        """The compiled grammar of `spec`; GrammarError when it is invalid. JSON is produced without
        free whitespace (separators ", " and ": "), so small models cannot loop on blank lines."""
        c = self.compiler()
        try:
            if spec.json_schema is not None:
                return c.compile_json_schema(json.dumps(spec.json_schema), any_whitespace=False)
            if spec.json_object:
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.regex is not None:
                return c.compile_regex(spec.regex)
            if spec.choice is not None:  # JSON string literals are valid EBNF literals
                return c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in spec.choice))
            assert spec.grammar is not None
            return c.compile_grammar(spec.grammar)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError for bad input
            raise GrammarError(clean_error(e)) from None

    @staticmethod
    def matcher(grammar: Any) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(grammar)
