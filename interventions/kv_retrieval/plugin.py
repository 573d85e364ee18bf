"""`kv_retrieval`: long-context decoding over a budget of KV blocks per layer (docs/architecture.md §10
"KV retrieval", docs/api.md). `{"kv_retrieval": {"method": "actqkv", "budget_tokens": 2048}}`: at each
decode step every layer attends to the sequence's first blocks (sink), its last blocks (window) and the
best-scoring blocks between them, chosen by the request's method:

- `infllm`: each full block keeps a representative key per KV head (the mean of the `representatives`
  keys that receive the most attention within the block); a block's score is the current query's dot
  product with it, summed over heads;
- `quest`: each full block keeps the elementwise min and max of its keys; its score is the upper bound
  sum_h sum_d max(q_hd min_d, q_hd max_d);
- `actqkv`: InfLLM's blocks, scored against a probe query (the last `ring_tokens` queries weighted by
  their activation bias: deviation from the sequence's running mean, scaled by its running variance),
  and the step's retrieved blocks spread over layers by the entropy of their block scores.

Rows without the key attend to everything, unchanged. A budget that covers the whole context changes
nothing either. Options (`configure`): slots, ring_tokens, representatives, max_budget_tokens, methods.
With a host tier (`--kv-offload-gb`) a retrieving sequence's blocks outside its sink and window move to
host memory once a decode step has run; each layer then reads the blocks it chose at this step, the
ones on the host through GPU blocks reserved per slot, recalled within the step (on the device, from
pinned host memory: no host sync) unless the slot holds them already.

`lag` (default 1): a decode step reads the blocks chosen from the previous step's query, with the current
sink and window, while the choice for the next step runs on a side stream (CUDA), off the critical
path; with a host tier its recalls land before the step that reads them. The first decode step after a
prompt chunk chooses from its own query. `lag: 0` chooses from the step's own query.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from actserve.interventions.base import (
    AttentionHook,
    InterventionCapacityError,
    InterventionError,
    InterventionPlugin,
    KVResidency,
    KVSpace,
    ModelInfo,
    PluginHooks,
    RowInput,
    RowSpan,
)
from actserve.interventions.kv_retrieval import methods as M
from actserve.interventions.kv_retrieval.hook import COLUMNS, INPUT, RetrievalHook
from actserve.interventions.kv_retrieval.schema import KVRetrievalSpec, RetrievalPlan, plan_of
from actserve.interventions.kv_retrieval.state import RetrievalState
from actserve.kernels.kv_retrieval_ref import LAG, METHOD, OFFLOAD, POS, RETRIEVE, SINK, SLOT, WINDOW

HOST = "host"  # the graph variant of steps with offloaded rows
LAGGED = "lag"  # ... of steps with lag-1 rows (both: "host+lag")
ALL_LAGGED = "all"  # with LAGGED, no HOST: every row reads its previous step's choice ("lag+all")

DEFAULTS: dict[str, Any] = {
    "slots": 16,  # retrieving sequences at once
    "ring_tokens": 64,  # queries kept per sequence (ActQKV's probe window; at least a block)
    "representatives": 2,  # InfLLM's representative keys per block (averaged)
    "max_budget_tokens": 4096,  # the largest budget_tokens a request may ask for
    "methods": "actqkv,infllm,quest",  # which summaries to keep (quest: min and max; others: one key)
}


class KVRetrievalPlugin(InterventionPlugin):
    name = "kv_retrieval"
    description = (
        "Long-context KV retrieval: each decode step attends, per layer, to the initial tokens, a local "
        "window and the best-scoring KV blocks in between (actqkv, infllm or quest), within budget_tokens."
    )
    hook_points = ("attention",)
    spec_model = KVRetrievalSpec
    row_inputs = (RowInput(INPUT, torch.int32, COLUMNS, -1),)
    graph_safe = True

    def __init__(self, model_info: ModelInfo) -> None:
        super().__init__(model_info)
        self.options = dict(DEFAULTS)
        self._lock = threading.Lock()
        self._free: list[int] = []
        self.state: RetrievalState | None = None
        self.kv: KVSpace | None = None
        self._hooks: dict[tuple[bool, bool, bool], RetrievalHook] = {}
        self.methods = frozenset(M.METHODS.values())

    # -- start-up ----------------------------------------------------------------------------------
    def configure(self, options: Mapping[str, Any]) -> None:
        """Options: slots, ring_tokens, representatives, max_budget_tokens, methods (see DEFAULTS)."""
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"kv_retrieval: unknown options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        self.options.update(options)
        o, bs = self.options, self.model_info.block_size
        for key in ("slots", "ring_tokens", "representatives", "max_budget_tokens"):
            if not isinstance(o[key], int) or o[key] < 1:
                raise ValueError(f"kv_retrieval option {key} must be a positive integer, got {o[key]!r}")
        if o["ring_tokens"] < bs:
            raise ValueError(f"kv_retrieval option ring_tokens must be >= the KV block size {bs}")
        if o["representatives"] > bs:
            raise ValueError(f"kv_retrieval option representatives must be <= the KV block size {bs}")
        if o["max_budget_tokens"] < 3 * bs:
            raise ValueError(f"kv_retrieval option max_budget_tokens must be >= 3 blocks ({3 * bs} tokens)")
        names = [m.strip() for m in str(o["methods"]).split(",") if m.strip() and m.strip() != "none"]
        bad = [m for m in names if m not in M.METHODS]
        if bad:
            raise ValueError(
                f"kv_retrieval option methods: unknown {bad}; choose among {sorted(M.METHODS)} or 'none'"
            )
        self.methods = frozenset(M.METHODS[m] for m in names)
        self._free = list(range(o["slots"] - 1, -1, -1))

    @property
    def width(self) -> int:
        """Blocks a layer may retrieve at most (ActQKV may give a layer twice the mean)."""
        return 2 * (self.options["max_budget_tokens"] // self.model_info.block_size)

    def _native(self) -> bool:
        """Serving at all: a native model, and some method enabled."""
        info = self.model_info
        return info.implementation == "native" and info.num_kv_heads > 0 and bool(self.methods)

    def kv_block_bytes(self) -> int:
        if not self._native():
            return 0
        quest = M.QUEST in self.methods
        return RetrievalState.block_bytes(self.model_info, quest, bool(self.methods - {M.QUEST}))

    def reserved_kv_blocks(self) -> int:
        """With a host tier: per slot, one GPU block per retrieved block a layer may read."""
        return self.options["slots"] * self.width if self._native() else 0

    def bind_kv(self, kv: KVSpace) -> None:
        if not self._native():
            return
        self.kv = kv
        self.state = RetrievalState(
            self.model_info,
            self.options["slots"],
            self.options["ring_tokens"],
            self.width,
            kv.num_ids,
            quest=M.QUEST in self.methods,
            reps=bool(self.methods - {M.QUEST}),
            tier=kv.tier is not None,
        )

    # -- requests ----------------------------------------------------------------------------------
    def prepare(self, spec: BaseModel, param: str) -> RetrievalPlan:
        assert isinstance(spec, KVRetrievalSpec)
        info = self.model_info
        if not self.methods:
            raise InterventionError(
                f"{param}: KV retrieval is turned off on this server (--kv-retrieval-methods none)", param
            )
        if not self._native():
            why = info.fallback_reason or "not a native model"
            raise InterventionError(f"{param}: needs the native model implementation ({why})", param)
        if M.METHODS[spec.method] not in self.methods:
            raise InterventionError(
                f"{param}.method {spec.method!r} is not enabled on this server (kv_retrieval option methods: "
                f"{sorted(k for k, v in M.METHODS.items() if v in self.methods)})",
                f"{param}.method",
            )
        plan = plan_of(spec, param, info.block_size, self.options["max_budget_tokens"])
        with self._lock:
            if not self._free:
                raise InterventionCapacityError(
                    f"all {self.options['slots']} kv_retrieval slots are in use; retry shortly"
                )
            plan.slot = self._free.pop()
        return plan

    def activate(self, plan: RetrievalPlan) -> None:  # type: ignore[override]
        if plan.active:
            return
        plan.active = True
        if self.state is not None:
            self.state.reset(plan.slot)

    def release(self, plan: RetrievalPlan) -> None:  # type: ignore[override]
        if plan.released:
            return
        plan.released = True
        with self._lock:
            self._free.append(plan.slot)

    def kv_residency(self, plan: RetrievalPlan) -> KVResidency:  # type: ignore[override]
        """The engine asks before it moves the sequence's cold blocks: from now on its table may hold host
        ids (`_on_host` looks)."""
        plan.may_host = True
        return KVResidency(plan.sink, plan.window)

    def blocks_moved(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        if self.state is not None:
            self.state.move(src.to(self.model_info.device), dst.to(self.model_info.device))

    def prefix_key(self, plan: RetrievalPlan) -> tuple[str]:  # type: ignore[override]
        """The prompt's K/V is a plain request's, but a retrieving request needs the block summaries that
        only retrieving requests write: its prompt blocks are shared among retrieving requests only."""
        return ("block summaries",)

    def metric_label(self, plan: RetrievalPlan) -> str:  # type: ignore[override]
        return next(k for k, v in M.METHODS.items() if v == plan.method)

    def stats(self) -> dict[str, float]:
        if self.state is None:
            return {}
        blocks, selections, recalled = (float(x) for x in self.state.counters.tolist())
        out = {"retrieved_blocks": blocks, "retrieval_selections": selections}
        if self.state.held is not None:
            out["recalled_blocks"] = recalled
        return out

    # -- steps -------------------------------------------------------------------------------------
    def _on_host(self, sp: RowSpan) -> bool:
        """Whether this decode row's table holds host-tier ids (its cold blocks moved): looked up once the
        engine may have moved them, then remembered until the sequence (re)starts (a prompt chunk)."""
        p = sp.plan
        if sp.count > 1 or sp.pos0 < sp.prompt_len:
            return False
        if not p.on_host and p.may_host and self.kv is not None and sp.block_table:
            p.on_host = max(sp.block_table) >= self.kv.host_base
        return p.on_host

    def fill_row_inputs(self, spans: list[RowSpan], arrays: dict[str, np.ndarray]) -> None:
        """Each row's slot, method, sizes and position, and whether its cold blocks are on the host (its
        table holds host ids: the hook maps them to the slot's reserved blocks)."""
        out = arrays[INPUT]
        st = self.state
        tier = st is not None and st.held is not None
        for sp in spans:
            p = sp.plan
            rows = out[sp.start : sp.start + sp.count]
            rows[:, SLOT], rows[:, METHOD], rows[:, RETRIEVE] = p.slot, p.method, p.retrieve
            rows[:, SINK], rows[:, WINDOW], rows[:, OFFLOAD] = p.sink, p.window, 0
            rows[:, POS] = np.arange(sp.pos0, sp.pos0 + sp.count)
            rows[:, LAG] = p.lag
            prompt = sp.count > 1 or sp.pos0 < sp.prompt_len
            if prompt and p.lag and st is not None:  # a (re)start: no previous choice to read
                st.forget_lag(p.slot)
            # a decode row of a lag-1 sequence keeps a choice for the position after it (`graph_mode`)
            p.lag_next = sp.pos0 + 1 if p.lag and not prompt else -1
            if not tier:
                continue
            if prompt:  # a prompt chunk: a (re)start holds no host blocks
                if p.may_host or p.on_host:
                    st.forget_host(p.slot)  # type: ignore[union-attr]
                p.may_host = p.on_host = False
            elif self._on_host(sp):
                rows[:, OFFLOAD] = 1

    def _hook(
        self, decode: bool, host: bool = True, lag: bool = False, all_lagged: bool = False
    ) -> RetrievalHook:
        """`host`: with the host tier's work (offloaded rows' mapping and recalls), if the server has one;
        `lag`: with the lag-1 rows' work (assembly, the next step's choice); `all_lagged`: no fresh
        choice on the step's path (RetrievalHook)."""
        key = (decode, host, lag, all_lagged)
        if key not in self._hooks:
            assert self.state is not None
            info = self.model_info
            self._hooks[key] = RetrievalHook(
                self.state, info.num_layers, info.num_kv_heads, info.block_size, info.head_dim**-0.5,
                self.options["representatives"], decode, self.kv if host else None, lag, all_lagged,
            )  # fmt: skip
        return self._hooks[key]

    def attention_hook(self, spans: list[RowSpan], num_rows: int) -> AttentionHook | None:
        """The decode path when each of the plugin's sequences has one row in the step (decode rows, a
        prompt's one-token chunk; other requests' rows do not matter), the packed path otherwise; with
        the lag work when a sequence of the step has lag 1."""
        if self.state is None:
            return None
        return self._hook(all(sp.count == 1 for sp in spans), lag=any(sp.plan.lag for sp in spans))

    def graph_mode(self, spans: list[RowSpan], num_rows: int) -> str:
        """HOST when a row of the step has blocks on the host tier (the graph maps them and recalls them),
        LAGGED when a row has lag 1 (the graph assembles its table and forks its next choice), both
        joined by "+"; "" otherwise: the graph of steps without either. LAGGED without HOST adds
        ALL_LAGGED when every row's previous step was a decode step of the same sequence (its choice for
        this position is kept): that graph runs no fresh choice on the step's path."""
        tier = self.kv is not None and self.kv.tier is not None
        modes = [HOST] if tier and any(self._on_host(sp) for sp in spans) else []
        modes += [LAGGED] if any(sp.plan.lag for sp in spans) else []
        if modes == [LAGGED] and all(sp.pos0 == sp.plan.lag_next for sp in spans):
            modes.append(ALL_LAGGED)  # each row's previous step was a decode step that chose for this one
        return "+".join(modes)

    def graph_hooks(self, mode: str = "") -> PluginHooks:
        """Decode graphs: the decode path (every method is served by the same kernels), with the host
        tier's work in the HOST variants only, the lag work in the LAGGED ones only (the next step's choice
        on a side stream: `side_stream`)."""
        parts = set(mode.split("+"))
        hook = self._hook(True, host=HOST in parts, lag=LAGGED in parts, all_lagged=ALL_LAGGED in parts)
        return PluginHooks(attention=hook, side_stream=LAGGED in parts)
