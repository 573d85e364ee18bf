"""Structured outputs: per-row token masks from a grammar (JSON Schema, regex, choices, EBNF)."""
