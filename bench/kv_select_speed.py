"""Device time of one layer's KV-retrieval `scores` and `select` launches (kernels/kv_retrieval.py) at
Llama-3-8B's shape (8 KV heads x 128, blocks of 16 tokens), 32k and 128k contexts, 1 and 4 rows, a
2048-token budget (128 blocks): what a decode step pays 32 times. Tables are 8208 columns wide at every
context (what decode graphs of a server taking 128k tokens pass). `select` at a few (chunk, warps).
Timed from a CUDA graph of 20 launches (no launch gaps), best of 5. Prints a table. GPU only.
`--baseline FILE`: another version of kernels/kv_retrieval.py (e.g. main's), its `select` timed beside.

    git show main:kernels/kv_retrieval.py > /tmp/kv_retrieval_main.py
    python bench/kv_select_speed.py --baseline /tmp/kv_retrieval_main.py
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from actserve.kernels import kv_retrieval as K
from actserve.kernels import kv_retrieval_ref as R

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_profile import graph_time_us as graph_us  # noqa: E402


def select_call(args: tuple, chunk: int, warps: int) -> Callable[[], object]:
    return lambda: K.select(*args, chunk=chunk, num_warps=warps)


def same_choice(fn: Callable[..., Any], other: Callable[..., Any], args: tuple) -> bool:
    """Whether two `select`s build the same tables and lengths from the same state (cloned for each)."""
    outs = []
    for f in (fn, other):
        sc, tables, lens, cfg, ent, rem, cnt, *rest = args
        outs.append(f(sc, tables, lens, cfg, ent.clone(), rem.clone(), cnt.clone(), *rest)[:2])
    (o1, l1), (o2, l2) = outs
    if not torch.equal(l1, l2):
        return False
    bs = args[9]
    return all(
        torch.equal(o1[r, : -(-int(l1[r]) // bs)], o2[r, : -(-int(l1[r]) // bs)]) for r in range(len(l1))
    )


def load(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("kv_retrieval_baseline", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=None, help="a kernels/kv_retrieval.py to time `select` of beside")
    a = ap.parse_args()
    base = load(a.baseline) if a.baseline else None
    dev, bs, hk, d, layers = torch.device("cuda"), 16, 8, 128, 32
    g = torch.Generator(device=dev).manual_seed(0)
    configs = [(1024, 4), (2048, 8), (4096, 16), (8192, 16), (16384, 16)]
    head = " ".join(f"{f'sel {c}/{w}':>11}" for c, w in configs) + (f" {'baseline':>9}" if base else "")
    print(f"{'context':>8} {'rows':>4} {'method':>7} {'scores us':>10} {head}")
    width = 8208
    for ctx in (32768, 131072):
        ids = width * 4 + 1
        rep = torch.randn(ids, hk, d, device=dev, generator=g).bfloat16()
        for rows in (1, 4):
            for method in (R.INFLLM, R.ACTQKV):
                cfg = torch.tensor([[i, method, 128, 4, 8, ctx, 0] for i in range(rows)], dtype=torch.int32)
                cfg = cfg.to(dev)
                tables = torch.stack([torch.randperm(ids, device=dev)[:width] for _ in range(rows)]).int()
                lens = torch.full((rows,), ctx + 1, dtype=torch.int32, device=dev)
                q = torch.randn(rows, hk, d, device=dev, generator=g)
                ent = torch.ones(rows, layers, device=dev)
                rem = torch.zeros(rows, device=dev)
                cnt = torch.zeros(3, dtype=torch.int64, device=dev)
                sc = K.scores(q, q, cfg, tables, lens, rep, None, None, bs)
                t_sc = graph_us(lambda: K.scores(q, q, cfg, tables, lens, rep, None, None, bs))  # noqa: B023
                args = (sc, tables, lens, cfg, ent, rem, cnt, 1, 256, bs, R.ENTROPY_RATE)
                sel = [graph_us(select_call(args, c, w)) for c, w in configs]
                name = "actqkv" if method == R.ACTQKV else "infllm"
                cells = " ".join(f"{t:>11.1f}" for t in sel)
                if base is not None:
                    cells += f" {graph_us(lambda: base.select(*args)):>9.1f}"  # noqa: B023
                    cells += "  same" if same_choice(K.select, base.select, args) else "  DIFFERENT"
                print(f"{ctx:>8} {rows:>4} {name:>7} {t_sc:>10.1f} {cells}", flush=True)


if __name__ == "__main__":
    main()
