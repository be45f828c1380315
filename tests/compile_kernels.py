"""Compile every Triton kernel for an H100 (sm_90) on this machine, without a GPU.

The interpreter (``TRITON_INTERPRET=1``) runs kernels as Python, so it accepts
code that the compiler rejects (a non-constexpr global, a type that changes in a
loop). This script lowers each kernel, for the flag combinations the launchers
use, all the way to a cubin with Triton's own compiler and bundled ptxas. Run by
``tests/test_kernels.py`` in a subprocess (the interpreter must be off here).

    TRITON_INTERPRET=0 python tests/compile_kernels.py     # prints one line per kernel variant
"""

import itertools
import os
import sys

FLAGS = ("HAS_DENSE", "HAS_SPARSE", "HAS_VALUES", "HAS_WEIGHT", "HAS_SMOOTH")
BUILT = [0]  # variants compiled by this process


def build(fn, sig, consts, num_warps=4, num_stages=3, aligned=(), **options):
    """Compile ``fn`` for sm_90; ``aligned`` names arguments to treat as multiples of 16 (as Triton's launcher
    specializes aligned pointers and strides). Returns the compiled kernel (``.asm["ptx"]``, ``.metadata``)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(fn.fn).parameters)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    sig = dict(sig, **{k: "constexpr" for k in consts})
    BUILT[0] += 1
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, **options})


def loss_variants():
    """Target forms as the launchers pass them: dense xor sparse (values only with sparse), every option.

    Every form in bf16; fp32 and fp16 get the common one (sparse positives, no options). Each is built with its
    gradient pass both ways (``REVERSE``: backwards in the loss, forwards in the fused linear routes)."""
    for dense, values, weight, smooth in itertools.product((False, True), repeat=4):
        if dense and values:
            continue
        yield dict(HAS_DENSE=dense, HAS_SPARSE=not dense, HAS_VALUES=values, HAS_WEIGHT=weight, HAS_SMOOTH=smooth)


def main():
    # Everything is imported here, after the interpreter is switched off (pytest's doctest collection imports
    # this module too, and must not change the test process's environment).
    os.environ["TRITON_INTERPRET"] = "0"
    from mlsoftmax.kernels import triton_linear as tlin
    from mlsoftmax.kernels import triton_loss as tl_

    for dt in ("fp32", "bf16", "fp16"):
        x = f"*{dt}"
        ptrs = {"T": "*fp32", "IDX": "*i64", "OFFS": "*i64", "VALS": "*fp32", "SCRATCH": "*fp32", "W": "*fp32"}
        for flags in loss_variants() if dt == "bf16" else [dict(zip(FLAGS, (False, True, False, False, False)))]:
            blocks = dict(BLOCK=16384, BLOCK_P=tl_.BLOCK_P)
            one_row = dict(blocks, STAGES=1)  # the one-row kernel's loops unpipelined (ROW_STAGES = 1)
            sig = dict(X=x, stride_x="i32", G=x, stride_g="i32", T=ptrs["T"], stride_t="i32", IDX="*i64",
                       OFFS="*i64", VALS="*fp32", SCRATCH="*fp32", W="*fp32", RS="*fp32", LOSS="*fp32", B="i32",
                       K="i32", eps="fp32")
            common = dt != "bf16" or flags == dict(zip(FLAGS, (False, True, False, False, False)))
            # PEEL=False: the rows and K whole 16-byte vectors (evict: the STORE_EVICT_FIRST knob)
            for grad, rev, evict in ((False, False, False), (True, False, False), (True, True, False)) + (
                    ((True, True, True),) if common else ()):
                build(tl_._msl_fwd_kernel, sig, dict(flags, COMPUTE_GRAD=grad, REVERSE=rev, EVICT_STORE=evict,
                                                     PEEL=False, G_ALIGNED=False, **one_row), num_warps=16)
            # PEEL=True: rows peeled to a 16-byte boundary (any K, any row start); the gradient's rows aligned
            # alike, or (common form) not
            for g_aligned in (True, False) if common else (True,):
                build(tl_._msl_fwd_kernel, sig, dict(flags, COMPUTE_GRAD=True, REVERSE=True, EVICT_STORE=False,
                                                     PEEL=True, G_ALIGNED=g_aligned, **one_row), num_warps=16)
            if common:  # the ROW_WARPS knob at 32
                build(tl_._msl_fwd_kernel, sig, dict(flags, COMPUTE_GRAD=True, REVERSE=True, EVICT_STORE=False,
                                                     PEEL=False, G_ALIGNED=False, **one_row), num_warps=32)
                # the ROW_STAGES knob (software-pipelined loops: cp.async into shared memory), aligned and peeled
                for peel, evict in ((False, False), (False, True), (True, False)):
                    build(tl_._msl_fwd_kernel, sig, dict(flags, COMPUTE_GRAD=True, REVERSE=True, EVICT_STORE=evict,
                                                         PEEL=peel, G_ALIGNED=peel, **dict(blocks, STAGES=3)),
                          num_warps=16)
            sig = dict(X=x, stride_x="i32", T="*fp32", stride_t="i32", IDX="*i64", OFFS="*i64", VALS="*fp32",
                       W="*fp32", STATS="*fp32", K="i32", SPAN="i32", S="i32")
            for peel in (False, True) if common else (False,):
                build(tl_._msl_split_stats_kernel, sig, dict(flags, PEEL=peel, **blocks), num_warps=16)
            sig = dict(X=x, stride_x="i32", G=x, stride_g="i32", T="*fp32", stride_t="i32", IDX="*i64",
                       OFFS="*i64", VALS="*fp32", SCRATCH="*fp32", W="*fp32", COEF="*fp32", K="i32", SPAN="i32")
            for rev, peel in itertools.product((False, True), (False, True) if common else (False,)):
                build(tl_._msl_split_grad_kernel, sig, dict(flags, REVERSE=rev, PEEL=peel, G_ALIGNED=peel, **blocks),
                      num_warps=16)
            # the lagged kernel (a benchmark knob): its GPU form, the gradient pass backwards; aligned for every form
            # in bf16, peeled, pipelined and with evict_first stores too for the common one
            sig = dict(X=x, stride_x="i32", G=x, stride_g="i32", T="*fp32", stride_t="i32", IDX="*i64", OFFS="*i64",
                       VALS="*fp32", SCRATCH="*fp32", W="*fp32", WSUM="*fp32", RS="*fp32", LOSS="*fp32", REC="*i64",
                       B="i32", K="i32", S="i32", SPAN="i32", eps="fp32")
            for peel, evict, stages in ((False, False, 1),) + (((True, False, 1), (False, True, 3)) if common else ()):
                build(tl_._msl_lagged_kernel, sig, dict(flags, REVERSE=True, EVICT_STORE=evict, PEEL=peel,
                                                        G_ALIGNED=peel, PHASE=2, LAG=tl_.LAG, BLOCK=tl_.LAGGED_BLOCK,
                                                        BLOCK_P=tl_.BLOCK_P, BLOCK_S=64, STAGES=stages),
                      num_warps=tl_._num_warps(tl_.LAGGED_BLOCK))
            build(tl_._msl_split_combine_kernel, dict(STATS="*fp32", WSUM="*fp32", RS="*fp32", LOSS="*fp32",
                                                      COEF="*fp32", S="i32", K="i32", eps="fp32"),
                  dict(HAS_WEIGHT=flags["HAS_WEIGHT"], HAS_SMOOTH=flags["HAS_SMOOTH"], BLOCK_S=64))
        # the slab form (no target in the kernel: a sparse one's entries are left to torch) that the labels route and
        # fp16's two passes launch, the gradient pass as REVERSE_GRAD has it
        slab = dict(zip(FLAGS, (False,) * 5), BLOCK=16384, BLOCK_P=tl_.BLOCK_P)
        build(tl_._msl_split_stats_kernel, dict(X=x, stride_x="i32", T="*fp32", stride_t="i32", IDX="*i64",
                                                OFFS="*i64", VALS="*fp32", W="*fp32", STATS="*fp32", K="i32",
                                                SPAN="i32", S="i32"), dict(slab, PEEL=False), num_warps=16)
        build(tl_._msl_split_grad_kernel, dict(X=x, stride_x="i32", G=x, stride_g="i32", T="*fp32", stride_t="i32",
                                               IDX="*i64", OFFS="*i64", VALS="*fp32", SCRATCH="*fp32", W="*fp32",
                                               COEF="*fp32", K="i32", SPAN="i32"),
              dict(slab, REVERSE=tl_.REVERSE_GRAD, PEEL=False, G_ALIGNED=False), num_warps=16)
        for peel in (False, True):
            build(tl_._scale_rows_kernel, dict(G=x, stride_g="i32", GO="*fp32", stride_go="i32", B="i32", K="i32"),
                  dict(PEEL=peel, BLOCK=16384), num_warps=16)
        build(tlin._positive_logits_kernel, dict(H=x, stride_h="i32", Wt=x, stride_w="i32", IDX="*i64",
                                                 ROWS="*i64", OUT="*fp32", NNZ="i32", D="i32"),
              dict(BLOCK_N=tlin.BLOCK_N, BLOCK_D=tlin.BLOCK_D))
        for add in (False, True):  # the labels route's exact entries; the lean rows route's target terms added back
            build(tlin._entries_kernel, dict(G=x, stride_g="i32", IDX="*i64", ROWS="*i64", VALS="*fp32", NNZ="i32",
                                             r0="i32", R="i32", c0="i32", C="i32"), dict(ADD=add, BLOCK_N=tlin.BLOCK_N))
        for has_scale in (False, True):  # the lean rows route's final E^T h, in fp32, one class's run a program
            build(tlin._target_rows_kernel, dict(DW=x, stride_dw="i32", H=x, stride_h="i32", SIDX="*i64",
                                                 ORDER="*i64", END="*i64", ROWS="*i64", TGT="*fp32", SCALE="*fp32",
                                                 NNZ="i32", D="i32"), dict(HAS_SCALE=has_scale, BLOCK_D=tlin.BLOCK_D))
        # the epilogue GEMM: the rows route's mode (logits and their statistics), the labels route's two (statistics
        # alone, the gradient), plain and with every option, in each autotuning configuration for bf16 (the first
        # mode and configuration alone for fp32 and fp16)
        sig = dict(H=x, stride_h="i32", Wt=x, stride_w="i32", BIAS=x, SCALE="*fp32", CW="*fp32", Z=x, stride_z="i32",
                   STATS="*fp32", COEF="*fp32", B="i32", C="i32", D="i32", S="i32")
        modes = ((True, True, False), (False, True, False), (False, False, True))
        both = (False, True)
        for (wz, st, gr), opts, (bm, bk, warps, stages) in itertools.product(
                *((modes, both, tlin.GEMM_CONFIGS) if dt == "bf16" else (modes[:1], both[:1], tlin.GEMM_CONFIGS[:1]))):
            flags = dict(WRITE_Z=wz, STATS_OUT=st, GRAD=gr, ROUND_Z=wz, HAS_BIAS=opts, HAS_SCALE=opts,
                         HAS_WEIGHT=opts, HAS_SMOOTH=opts, IEEE=dt == "fp32", EVEN_K=True, N_TILES=tlin.STATS_TILES if st else 1,
                         BLOCK_M=bm, BLOCK_N=tlin.TILE_N, BLOCK_K=bk)
            build(tlin._gemm_loss_kernel, sig, flags, num_warps=warps, num_stages=stages)
        build(tlin._positive_sums_kernel, dict(X=x, stride_x="i32", IDX="*i64", OFFS="*i64", VALS="*fp32",
                                               W="*fp32", STATS="*fp32", S="i32"),
              dict(HAS_VALUES=False, HAS_WEIGHT=False, BLOCK_P=tl_.BLOCK_P))
    print(f"compiled {BUILT[0]} kernel variants for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
