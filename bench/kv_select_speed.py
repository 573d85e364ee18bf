"""Device time of one layer's KV-retrieval `scores` and `select` launches (kernels/kv_retrieval.py) at
Llama-3-8B's shape (8 KV heads x 128, blocks of 16 tokens), 32k and 128k contexts, 1 and 4 rows, a
2048-token budget (128 blocks): what a decode step pays 32 times. Timed from a CUDA graph of 20 launches
(no launch gaps), best of 5. Prints a table. GPU only.

    python bench/kv_select_speed.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from actserve.kernels import kv_retrieval as K
from actserve.kernels import kv_retrieval_ref as R


def graph_us(fn: Callable[[], object], reps: int = 20, rounds: int = 5) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    best = float("inf")
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / reps)
    return best


def main() -> None:
    dev, bs, hk, d, layers = torch.device("cuda"), 16, 8, 128, 32
    g = torch.Generator(device=dev).manual_seed(0)
    print(f"{'context':>8} {'rows':>4} {'method':>7} {'scores us':>10} {'select us':>10}")
    for ctx in (32768, 131072):
        blocks = ctx // bs + 1
        ids = blocks * 4 + 1
        rep = torch.randn(ids, hk, d, device=dev, generator=g).bfloat16()
        for rows in (1, 4):
            for method in (R.INFLLM, R.ACTQKV):
                cfg = torch.tensor([[i, method, 128, 4, 8, ctx, 0] for i in range(rows)], dtype=torch.int32)
                cfg = cfg.to(dev)
                tables = torch.stack([torch.randperm(ids, device=dev)[:blocks] for _ in range(rows)]).int()
                lens = torch.full((rows,), ctx + 1, dtype=torch.int32, device=dev)
                a = torch.randn(rows, hk, d, device=dev, generator=g)
                ent = torch.ones(rows, layers, device=dev)
                rem = torch.zeros(rows, device=dev)
                cnt = torch.zeros(3, dtype=torch.int64, device=dev)
                sc = K.scores(a, a, cfg, tables, lens, rep, None, None, bs)
                t_sc = graph_us(lambda: K.scores(a, a, cfg, tables, lens, rep, None, None, bs))  # noqa: B023
                t_sel = graph_us(
                    lambda: K.select(sc, tables, lens, cfg, ent, rem, cnt, 1, 256, bs, R.ENTROPY_RATE)  # noqa: B023
                )
                name = "actqkv" if method == R.ACTQKV else "infllm"
                print(f"{ctx:>8} {rows:>4} {name:>7} {t_sc:>10.1f} {t_sel:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
