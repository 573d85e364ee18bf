"""The retrieval methods by name (kernels/kv_retrieval_ref.py defines what each computes)."""

from __future__ import annotations

from actserve.kernels.kv_retrieval_ref import ACTQKV, INFLLM, QUEST

METHODS = {"infllm": INFLLM, "quest": QUEST, "actqkv": ACTQKV}
