"""Compile every Triton kernel for the H200 (sm_90) on a machine without a GPU, through Triton's own
front end, LLVM and ptxas: type errors that the CPU interpreter never sees (it runs kernels as numpy)
fail here instead of on the lent GPU. Run by tests/test_kernels_compile.py in a process without
TRITON_INTERPRET; prints one line per compiled variant."""

from __future__ import annotations

import sys
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from actserve.kernels.argmax import _final_kernel, _partial_kernel
from actserve.kernels.fp4_gemm import _fp4_dequant_kernel, _fp4_gemm_kernel, _fp4_gemv_kernel
from actserve.kernels.gemv import _gemv_kernel
from actserve.kernels.kv_retrieval import (
    _append_kernel,
    _assemble_kernel,
    _query_vectors_kernel,
    _scores_kernel,
    _select_kernel,
    _select_merge_kernel,
    _select_part_kernel,
    _summaries_kernel,
)
from actserve.kernels.kv_tier import _recall_kernel
from actserve.kernels.moe import (
    _decode_down_kernel,
    _decode_up_kernel,
    _grouped_down_kernel,
    _grouped_up_kernel,
    _sum_kernel,
)
from actserve.kernels.moe_route import _route_kernel
from actserve.kernels.paged_decode import _decode_merge_kernel, _decode_split_kernel
from actserve.kernels.paged_prefill import _prefill_kernel
from actserve.kernels.rope_kv import _rope_kv_kernel
from actserve.kernels.silu_mul import _silu_mul_kernel
from actserve.kernels.sparse_gemv import _sparse_gemv_kernel, _sum_splits_kernel
from actserve.kernels.sparsity_ops import _count_kernel, _mask_kernel
from actserve.kernels.steer_rmsnorm import _add_steer_rmsnorm_kernel

BF, F32, I32, I64, U8 = "*bf16", "*fp32", "*i32", "*i64", "*u8"


def signature(fn: Any, types: dict[str, str], consts: dict[str, Any]) -> dict[str, str]:
    """Every parameter: its type, or "constexpr"; a parameter missing from both is an error here."""
    return {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}


VARIANTS: list[tuple[Any, dict[str, str], dict[str, Any]]] = []
gemv_types = {
    "x_ptr": BF,
    "w_ptr": BF,
    "b_ptr": BF,
    "y_ptr": BF,
    "M": "i32",
    "N": "i32",
    "K": "i32",
    "stride_xm": "i32",
    "stride_wn": "i32",
    "stride_ym": "i32",
}
for block_m, silu in ((1, False), (1, True), (16, False), (16, True)):
    VARIANTS.append(
        (
            _gemv_kernel,
            gemv_types,
            dict(
                BLOCK_M=block_m,
                BLOCK_N=32,
                BLOCK_K=256,
                HAS_BIAS=True,
                SILU_MUL=silu,
                PREC="tf32",
                USE_PDL=True,
            ),
        )
    )
sparse_types = {
    **dict.fromkeys(("x_ptr", "wt_ptr", "b_ptr", "y_ptr"), BF),
    "thr_ptr": F32,
    "ws_ptr": F32,
    "cnt_ptr": I32,
    **dict.fromkeys(("M", "N", "K", "k_split", "splits", "stride_xm", "stride_thr", "stride_wk"), "i32"),
    **dict.fromkeys(("stride_ym", "stride_ws"), "i32"),
    "cnt_tab_ptr": BF,  # without COUNT the launcher passes the output for both
    "cnt_at_ptr": BF,
}
# (rows tile, threshold, silu·mul, accumulation: 0 direct, 1 workspace, 2 atomic, 3 serial, 4 atomic_cast)
for block_m, thr, silu, accum in (
    (1, True, False, 0), (1, True, True, 3), (1, False, False, 3), (16, True, False, 3), (16, True, True, 2),
    (1, True, True, 2), (1, True, False, 4), (16, True, False, 4), (16, True, False, 1),
):  # fmt: skip
    consts = dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=32 if block_m == 1 else 64, THRESHOLD=thr)
    consts.update(
        HAS_BIAS=True, SILU_MUL=silu, ACCUM=accum, PREC="tf32", LOOP_STAGES=1 + 2 * silu, USE_PDL=True,
        SUM_CHUNK=8 if block_m == 1 else 2, ONE_SHOT=block_m == 1 and accum in (2, 4), X_SUMS=False,
        COUNT=False,
    )  # fmt: skip
    VARIANTS.append((_sparse_gemv_kernel, sparse_types, consts))
# the decode hot path: one row, atomic adds left for the reader (no cast kernel); the down projection reads
# the gate/up launch's float32 sums (X_SUMS), the qkv projection counts its input's entries below threshold
# (COUNT: float64 counters, an int32 slot index)
hot = dict(
    BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, THRESHOLD=True, HAS_BIAS=False, ACCUM=4, PREC="tf32", LOOP_STAGES=1,
    SUM_CHUNK=8, ONE_SHOT=True, USE_PDL=True,
)  # fmt: skip
VARIANTS.append(
    (_sparse_gemv_kernel, {**sparse_types, "x_ptr": F32}, dict(hot, SILU_MUL=True, X_SUMS=True, COUNT=False))
)
count_types = {**sparse_types, "cnt_tab_ptr": "*fp64", "cnt_at_ptr": I32}
VARIANTS.append((_sparse_gemv_kernel, count_types, dict(hot, SILU_MUL=False, X_SUMS=False, COUNT=True)))
sum_types = {
    "ws_ptr": F32,
    "b_ptr": BF,
    "y_ptr": BF,
    **dict.fromkeys(("N", "splits", "stride_ws", "stride_ym"), "i32"),
}
VARIANTS.append((_sum_splits_kernel, sum_types, dict(BLOCK=1024, HAS_BIAS=True, ZERO=True, USE_PDL=True)))
fp4_types = {
    "x_ptr": BF,
    "w_ptr": U8,
    "s_ptr": U8,
    "gs_ptr": F32,
    "b_ptr": BF,
    "y_ptr": BF,
    **dict.fromkeys(("M", "N", "K", "k_split", "stride_xm", "stride_wn", "stride_sn"), "i32"),
    **dict.fromkeys(("stride_gs", "stride_ym", "stride_ys"), "i32"),
}
for nvfp4 in (True, False):
    fp4 = dict(NVFP4=nvfp4, GROUP=16 if nvfp4 else 32, HAS_BIAS=True, PREC="tf32")
    for block_m, partial in ((1, False), (1, True), (16, False), (16, True)):
        types = {**fp4_types, "y_ptr": F32} if partial else dict(fp4_types)
        if block_m == 1:  # one row reads the packed codes as int32 words
            types["w_ptr"] = I32
        consts = dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=256, PARTIAL=partial, USE_PDL=True, ASM=True)
        VARIANTS.append((_fp4_gemv_kernel, types, dict(consts, **fp4)))
    gemm_types = {a: t for a, t in fp4_types.items() if a not in ("k_split", "stride_ys")}
    VARIANTS.append((_fp4_gemm_kernel, gemm_types, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, **fp4)))
    dequant_types = {
        "w_ptr": U8,
        "s_ptr": U8,
        "gs_ptr": F32,
        "y_ptr": BF,  # what fp4_linear writes for bf16 activations (the integer rounding path)
        **dict.fromkeys(("N", "K", "stride_wn", "stride_sn", "stride_gs", "stride_yn"), "i32"),
    }
    dequant = dict(BLOCK_N=32, BLOCK_K=256, NVFP4=nvfp4, GROUP=fp4["GROUP"])
    VARIANTS.append((_fp4_dequant_kernel, dequant_types, dequant))
norm_types = {
    "x_ptr": BF,
    "res_ptr": BF,
    "w_ptr": BF,
    "out_ptr": BF,
    "res_out_ptr": BF,
    "table_ptr": BF,
    "mask_ptr": "*i1",
    "idx_ptr": I64,
    "scale_ptr": F32,
    "norm_ptr": I64,
    "layer": "i32",
    "num_layers": "i32",
    "hidden": "i32",
    "eps": "fp32",
    "zero_ptr": BF,  # unused without ZERO_BLOCK: the launcher passes the residual
    "rows": "i32",
    "zero_n": "i32",
    "parts_ptr": I32,
}
# without steering the launcher passes the residual (bf16) for every steering pointer
no_steer = {**norm_types, **dict.fromkeys(("table_ptr", "mask_ptr", "idx_ptr", "scale_ptr", "norm_ptr"), BF)}
for has_x, steer in ((True, True), (True, False), (False, False)):
    VARIANTS.append(
        (
            _add_steer_rmsnorm_kernel,
            norm_types if steer else no_steer,
            dict(
                K=9,
                K_PAD=16,
                HAS_X=has_x,
                HAS_STEER=steer,
                BLOCK=4096,
                USE_PDL=True,
                X_SUMS=False,
                ZERO_BLOCK=0,
                PARTS=0,
            ),
        )
    )
# a one-row sparse GEMV's float32 sums as x (rounded, zeroed), and another buffer of sums zeroed
for steer, zero_block in ((False, 4096), (True, 0)):
    VARIANTS.append(
        (
            _add_steer_rmsnorm_kernel,
            {**(norm_types if steer else no_steer), "x_ptr": F32, "zero_ptr": F32},
            dict(
                K=9,
                K_PAD=16,
                HAS_X=True,
                HAS_STEER=steer,
                BLOCK=4096,
                USE_PDL=True,
                X_SUMS=True,
                ZERO_BLOCK=zero_block,
                PARTS=0,
            ),
        )
    )
# a MoE layer's unadded columns as x (kernels/moe_ref.PendingSum), added in the residual add
for steer in (False, True):
    consts = dict(K=2, K_PAD=2, HAS_X=True, HAS_STEER=steer, BLOCK=2048, USE_PDL=True, X_SUMS=False)
    types = {**(norm_types if steer else no_steer), "x_ptr": F32}
    VARIANTS.append((_add_steer_rmsnorm_kernel, types, dict(consts, ZERO_BLOCK=0, PARTS=8)))
split_types = {
    "q_ptr": BF,
    "k_ptr": BF,
    "v_ptr": BF,
    "bt_ptr": I32,
    "ctx_ptr": I32,
    "m_ptr": F32,
    "l_ptr": F32,
    "acc_ptr": F32,
    "out_ptr": BF,
    "scale": "fp32",
    "window": "i32",
    "stride_qb": "i32",
    "stride_qh": "i32",
    "stride_ks": "i32",
    "stride_kh": "i32",
    "stride_bt": "i32",
    "stride_ob": "i32",
    "stride_oh": "i32",
}
for splits in (1, 33):
    VARIANTS.append(
        (
            _decode_split_kernel,
            split_types,
            dict(
                SPLITS=splits,
                GROUP=4,
                GROUP_PAD=16,
                HEAD_DIM=128,
                BLOCK_SIZE=16,
                TILE=64,
                PREC="tf32",
                SHORT_TILES=4,
                EARLY=splits == 1,
                USE_PDL=True,
            ),
        )
    )
for short in (0, 4):  # paged prefill's merge (no short sequences), decode's
    VARIANTS.append(
        (
            _decode_merge_kernel,
            {
                "m_ptr": F32,
                "l_ptr": F32,
                "acc_ptr": F32,
                "out_ptr": BF,
                "ctx_ptr": I32,
                "stride_ob": "i32",
                "stride_oh": "i32",
                "kv_heads": "i32",
                "splits": "i32",
                "window": "i32",
            },
            dict(
                SPLITS_PAD=64, GROUP=4, GROUP_PAD=16, HEAD_DIM=128, TILE=64, SHORT_TILES=short, USE_PDL=True
            ),
        )
    )
prefill_types = {
    **dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "o_ptr"), BF),
    **dict.fromkeys(("bt_ptr", "ctx_ptr", "nq_ptr", "qstart_ptr", "tile_seq_ptr", "tile_m_ptr"), I32),
    **dict.fromkeys(("m_ptr", "l_ptr", "acc_ptr"), F32),
    "qk_scale": "fp32",
    **dict.fromkeys(
        ("window", "splits", "stride_qt", "stride_qh", "stride_ks", "stride_kh", "stride_bt"), "i32"
    ),
    **dict.fromkeys(("stride_ot", "stride_oh"), "i32"),
}
for block_m, block_n, partials in ((16, 64, False), (32, 128, False), (16, 64, True)):
    VARIANTS.append(
        (
            _prefill_kernel,
            prefill_types,
            dict(
                GROUP=4,
                GROUP_PAD=4,
                HEAD_DIM=128,
                BLOCK_SIZE=16,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                PARTIALS=partials,
                PREC="tf32",
            ),
        )
    )
rope_types = {
    **dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "q_out_ptr", "k_out_ptr", "kc_ptr", "vc_ptr"), BF),
    **dict.fromkeys(("qw_ptr", "kw_ptr"), BF),
    "cos_ptr": F32,
    "sin_ptr": F32,
    "pos_ptr": I64,
    "slot_ptr": I64,
    "eps": "fp32",
    **dict.fromkeys(("stride_q", "stride_k", "stride_v", "stride_cos", "stride_kc", "n_q", "n_kv"), "i32"),
}
for norm in (False, True):  # Qwen3's per-head q/k norm fused in, or not
    consts = dict(HEAD_DIM=128, HALF=64, NORM=norm, USE_PDL=True, SUMS=False)
    VARIANTS.append((_rope_kv_kernel, rope_types, consts))
# q/k/v read from a one-row sparse GEMV's float32 sums (rounded, zeroed)
sums_rope = {**rope_types, **dict.fromkeys(("q_ptr", "k_ptr", "v_ptr"), F32)}
VARIANTS.append(
    (_rope_kv_kernel, sums_rope, dict(HEAD_DIM=128, HALF=64, NORM=False, USE_PDL=True, SUMS=True))
)

# the fused MoE layer at Qwen3-30B-A3B's shape: all resident (ids are slots), and an expert cache (a table
# mapping int64 expert ids to slots, misses read from a host copy, pairs counted)
moe_types = {
    **dict.fromkeys(("x_ptr", "w13_ptr", "w2_ptr", "host_ptr", "inter_ptr", "out_ptr"), BF),
    "table_ptr": I32,
    "cnt_ptr": I32,
    "ids_ptr": I64,
    "sorted_ptr": I32,
    "bslot_ptr": I32,
    "wt_ptr": F32,
    "y_ptr": F32,
    **dict.fromkeys(("K", "H", "NI", "COLS", "P", "stride_ws", "stride_wn"), "i32"),
}
for table, host, count in ((False, False, False), (True, True, True), (True, False, False)):
    cache = dict(TABLE=table, HOST=host)
    dec = dict(BLOCK_N=16, BLOCK_K=256, USE_PDL=True, **cache)
    VARIANTS.append((_decode_up_kernel, moe_types, dict(dec, COUNT=count)))
    for fused in (False, True):
        down_types = {**moe_types, "y_ptr": BF} if fused else moe_types
        VARIANTS.append((_decode_down_kernel, down_types, dict(dec, SUM=fused, EARLY=not table)))
    grp = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, PREC="tf32", **cache)
    VARIANTS.append((_grouped_up_kernel, moe_types, dict(grp, COUNT=count)))
    VARIANTS.append((_grouped_down_kernel, moe_types, grp))
VARIANTS.append((_sum_kernel, moe_types, dict(BLOCK_N=256, USE_PDL=True)))
route_types = {"logits_ptr": BF, "ids_ptr": I64, "wt_ptr": F32, "E": "i32", "stride_l": "i32"}
for k, renorm in ((8, True), (2, False)):
    consts = dict(K=k, K_PAD=k, BLOCK_E=128, RENORM=renorm, USE_PDL=True)
    VARIANTS.append((_route_kernel, route_types, consts))
VARIANTS.append(
    (
        _partial_kernel,
        {"x_ptr": F32, "part_ptr": I64, "V": "i32", "stride_x": "i32", "P": "i32"},
        dict(BLOCK=2048),
    )
)
VARIANTS.append((_final_kernel, {"part_ptr": I64, "out_ptr": I64, "P": "i32"}, dict(P_PAD=64)))
VARIANTS.append(
    (_silu_mul_kernel, {"x_ptr": BF, "out_ptr": BF, "inter": "i32"}, dict(BLOCK=1024, USE_PDL=True))
)

# KV retrieval's decode kernels at Llama-3-8B's shape (32 query heads, 8 KV heads, head size 128, 16-token
# blocks, a 64-query ring); "*i32" row configuration
i32s = dict.fromkeys(("C", "T", "W", "L", "layer", "width", "res_base", "host_base", "half"), "i32")
kvr_strides = [
    "stride_q", "stride_cfg", "stride_rqs", "stride_rqt", "stride_rps", "stride_ms", "stride_a", "stride_bt",
    "stride_xi", "stride_xg", "stride_o", "stride_s", "stride_e", "stride_held", "stride_w", "stride_c",
    "stride_ks", "stride_kh", "stride_out", "layer_lag", "layer_n", "layer_out",
]  # fmt: skip
kvr_types = {
    "q_ptr": BF, "cfg_ptr": I32, "rq_ptr": BF, "rp_ptr": I64, "rb_ptr": F32, "mean_ptr": F32, "var_ptr": F32,
    "cnt_ptr": F32, "cap": "fp32", "a_ptr": F32, "b_ptr": F32, "bt_ptr": I32, "len_ptr": I32, "rep_ptr": BF,
    "kmin_ptr": BF, "kmax_ptr": BF, "out_ptr": F32, "s_ptr": F32, "ent_ptr": F32, "rem_ptr": F32,
    "newlen_ptr": I32, "held_ptr": I32, "work_ptr": I32, "csrc_ptr": I32, "cdst_ptr": I32, "cn_ptr": I32,
    "blk_ptr": I64, "row_ptr": I64, "k_ptr": BF, "scale": "fp32", "store_ptr": BF, "kv_ptr": BF,
    "src_ptr": I32, "dst_ptr": I32, "n_ptr": I32, "flag_ptr": I32, "lcol_ptr": I32, "lat_ptr": I32,
    "ln_ptr": I32, "tag_ptr": I64, "now_ptr": I32, "next_ptr": I32, "stride_lag": "i32",
    **i32s, **dict.fromkeys(kvr_strides, "i32"),
}  # fmt: skip
VARIANTS.append((_append_kernel, {**kvr_types}, dict(BLOCK_C=4096)))
VARIANTS.append((_query_vectors_kernel, kvr_types, dict(G=4, G_PAD=4, D=128, T_PAD=64, T_CHUNK=32)))
for has_rep, has_mm in ((True, True), (True, False), (False, True)):
    VARIANTS.append(
        (
            _scores_kernel,
            kvr_types,
            dict(HK=8, D=128, HD_PAD=1024, BS=16, BLOCK_W=8, HAS_REP=has_rep, HAS_MINMAX=has_mm),
        )
    )
# passes over a row in chunks of 2048 (the default; with and without tier) and 4096 columns; lag 1's
# phases 1 (this step's fresh rows) and 2 (the next step's choice)
for block_w, tier, phase in (
    (2048, True, 0), (2048, False, 0), (4096, False, 0), (2048, True, 1), (2048, False, 1), (2048, True, 2),
    (2048, False, 2),
):  # fmt: skip
    VARIANTS.append(
        (
            _select_kernel,
            {**kvr_types, "out_ptr": I32, "cnt_ptr": I64, "key_ptr": I32},
            dict(BS=16, BLOCK_W=block_w, L_PAD=32, RATE=0.1, K_PAD=256, H_CHUNK=32, TIER=tier, PHASE=phase),
        )
    )
# `select` split over programs (SELECT_SPLIT): parts of 1024 columns, then one program a row
split_types = {
    **kvr_types, "ckey_ptr": I32, "ccol_ptr": I32, "st_ptr": F32, "copies_ptr": I32, "cnt_ptr": I64,
    "out_ptr": I32, "parts": "i32", "stride_cr": "i32", "stride_cp": "i32", "stride_sr": "i32",
}  # fmt: skip
for phase in (0, 1, 2):
    VARIANTS.append((_select_part_kernel, split_types, dict(BS=16, BLOCK_S=1024, PHASE=phase)))
for tier, phase in ((True, 0), (False, 0), (True, 1), (False, 1), (True, 2), (False, 2)):
    VARIANTS.append(
        (
            _select_merge_kernel,
            split_types,
            dict(
                BS=16,
                BLOCK_W=2048,
                L_PAD=32,
                RATE=0.1,
                K_PAD=256,
                P_PAD=8,
                H_CHUNK=32,
                TIER=tier,
                PHASE=phase,
            ),
        )
    )
for tier, full in ((True, False), (False, False), (False, True)):  # full: steps without phase 1
    VARIANTS.append(
        (
            _assemble_kernel,
            {**kvr_types, "out_ptr": I32, "cnt_ptr": I64},
            dict(BS=16, BLOCK_W=2048, K_PAD=256, C_PAD=8, H_CHUNK=32, TIER=tier, FULL=full),
        )
    )
VARIANTS.append(
    (
        _summaries_kernel,
        kvr_types,
        dict(G=4, D=128, BS=16, REPS=2, HAS_REP=True, HAS_MINMAX=True, USE_DOT=True),
    )
)
VARIANTS.append((_recall_kernel, {**kvr_types, "cnt_ptr": I64}, dict(E=16384, E_PAD=16384, PROGRAMS=32)))
count_types = {
    "table_ptr": "*fp64", "x_ptr": BF, "counted_ptr": I32, "level_ptr": I32, "method_ptr": I32,
    "slot_ptr": I32, "thr_ptr": F32, "cost_ptr": "*fp64",
    **dict.fromkeys(("K", "stride_x", "stride_level", "stride_method", "stride_slot", "stride_thr"), "i32"),
}  # fmt: skip
for thr, cost in ((True, False), (False, True)):
    consts = dict(HAS_THR=thr, HAS_COST=cost, BLOCK_K=8192, USE_PDL=True)
    VARIANTS.append((_count_kernel, count_types, consts))
mask_types = {
    "x_ptr": BF,
    "thr_ptr": F32,
    "y_ptr": BF,
    **dict.fromkeys(("K", "stride_x", "stride_thr", "stride_y"), "i32"),
}
VARIANTS.append((_mask_kernel, mask_types, dict(BLOCK_K=1024, USE_PDL=True)))


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for fn, types, consts in VARIANTS:
        name = f"{fn.__name__} {consts}"
        try:
            triton.compile(ASTSource(fn, signature(fn, types, consts), constexprs=consts), target=target)
            print("ok", name)
        except Exception as e:  # noqa: BLE001 - report every variant, then fail
            failed += 1
            print("FAILED", name, type(e).__name__, str(e)[-600:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
