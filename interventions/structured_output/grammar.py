"""The grammar engine behind structured outputs: xgrammar (picked by bench/grammar_engines.py: the
lower token-mask time at batch 64 on the CPU). One compiler per served tokenizer, built on first use."""

from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import Future
from typing import Any

import xgrammar as xgr

from actserve.interventions.base import InterventionCapacityError
from actserve.interventions.structured_output.schema import DEFAULT_COMPILE_TIMEOUT_S, StructuredSpec

# compiled grammars are cached by the compiler (n choices and repeated schemas compile once); bounded
CACHE_BYTES = 256 * 2**20
# compiles running at once, abandoned ones included, and how long a request waits for one of them
COMPILE_SLOTS = 4
SLOT_WAIT_S = 1.0
# xgrammar's C++ errors start with "[time] /path/file.cc:line: "; the rest is the message for the user
_CPP_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s*\S+:\d+:\s*")


class GrammarError(ValueError):
    """A schema, regex, choice list or grammar the engine cannot compile; the message says why."""


class GrammarTimeout(GrammarError):
    """A compile that ran past the limit: the input is valid, the request is refused all the same."""


def clean_error(e: Exception) -> str:
    text = _CPP_PREFIX.sub("", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


class GrammarEngine:
    """Compiles specs into grammars for one tokenizer and fills token bitmasks for many matchers."""

    def __init__(
        self, tokenizer_path: str, vocab_size: int, stop_token_ids: list[int], slots: int = COMPILE_SLOTS
    ) -> None:
        self._path, self.vocab_size, self.stop_token_ids = tokenizer_path, vocab_size, stop_token_ids
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self.compile_timeout_s = DEFAULT_COMPILE_TIMEOUT_S
        self.slots = slots
        self._free = threading.BoundedSemaphore(slots)
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
        """The compiled grammar of `spec`, within `compile_timeout_s`: GrammarTimeout past it,
        GrammarError when `spec` is invalid, InterventionCapacityError (a 503) when no slot frees up.

        A thread cannot be killed, and xgrammar's compile cannot be interrupted, so a compile given up
        on runs to its end in a daemon thread (which releases the GIL: the server keeps serving), and
        its grammar lands in the compiler's cache. Its slot is held until then: `slots` bounds the
        CPU that abandoned compiles can take, so repeated pathological inputs cannot pile up threads.
        A request that finds every slot busy is refused with a 503 and Retry-After, as the steering
        slots are: the server, not the client, is short of capacity, and it frees up on its own."""
        c = self.compiler()  # built once, outside the limit (scanning the vocabulary is not the input's)
        if not self._free.acquire(timeout=SLOT_WAIT_S):
            raise InterventionCapacityError(
                f"structured output: all {self.slots} grammar compile slots are busy (compiles that ran past "
                "--max-grammar-compile-seconds keep theirs until they end); retry later"
            )
        done: Future[Any] = Future()

        def run() -> None:
            try:
                done.set_result(self._compile(c, spec))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                done.set_exception(e)
            finally:
                self._free.release()

        threading.Thread(target=run, name="actserve-grammar-compile", daemon=True).start()
        try:
            return done.result(timeout=self.compile_timeout_s)
        except TimeoutError:
            raise GrammarTimeout(
                f"took longer than {self.compile_timeout_s:g} s to compile (--max-grammar-compile-seconds)"
            ) from None

    @staticmethod
    def _compile(c: xgr.GrammarCompiler, spec: StructuredSpec) -> Any:
        """The compile itself; JSON is produced without free whitespace (separators ", " and ": "), so
        small models cannot loop on blank lines."""
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
