"""Registers, spills, residency and access width of the loss kernels on an H100 (sm_90), from Triton's compiler
alone: no GPU.

Each kernel is compiled as the launchers call it with sparse positives and no options, specialized as Triton's
launcher specializes its arguments: pointers aligned to 16 bytes, and every integer argument that is a multiple
of 16 marked so. Two points: the issue's K = 131072 (the rows, ``K`` and the stride whole 16-byte vectors, so
``PEEL`` is off) and K = 131071 (any row start, ``PEEL`` on: each row is streamed from its first 16-byte
boundary). For each this runs ``ptxas -v`` and prints registers per thread, spills, programs per SM (64K
registers and 2048 threads per SM), and the global loads and stores of the logits and gradient in the PTX that
are 128-bit vectors against those that are not (the two-pass kernel's row streams: four vector accesses of x
and g per step; scalar ones there mean a 16-bit or 32-bit access per column). ``two-pass/32w`` and
``two-pass/n3`` are the two-pass kernel at 32 warps (``ROW_WARPS``) and with its loops pipelined, three stages
(``ROW_STAGES``: its loads become cp.async copies, and the shared memory they take, in kB, limits programs per SM
too); ``lagged`` is the lagged kernel (``LAGGED``, its slices streamed in blocks of ``LAGGED_BLOCK``). Run it with another
Triton on the path to see that version's figures (the device's was 3.6, this repository's is 3.9).

    python benchmarks/kernel_registers.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the compiler, not the interpreter (before Triton is imported)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from compile_kernels import build  # noqa: E402

POINTERS = ("X", "G", "T", "IDX", "OFFS", "VALS", "SCRATCH", "W", "WSUM", "RS", "LOSS", "STATS", "ARRIVED")
SPARSE = dict(HAS_DENSE=False, HAS_SPARSE=True, HAS_VALUES=False, HAS_WEIGHT=False, HAS_SMOOTH=False)


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """``(registers per thread, spill bytes)`` that ptxas reports for sm_90a, with the flags Triton passes."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(90)  # Triton >= 3.6 takes the architecture
    except TypeError:
        ptxas = get_ptxas()  # Triton 3.4 and 3.5
    ptxas = getattr(ptxas, "path", ptxas)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "k.ptx")
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(src), "-o",
                              str(Path(d, "k.o"))],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill", out))
    return regs, spills


def access_widths(ptx: str) -> tuple[int, int]:
    """``(vector, narrow)``: global loads and stores in the PTX that move 128 bits, and those of one 16- or 32-bit
    element (the loss's positives and per-row scalars are among the latter whatever the alignment). A pipelined
    loop's loads are asynchronous copies to shared memory: ``cp.async.cg`` moves 16 bytes, ``cp.async.ca`` less."""
    ops = re.findall(r"\b(?:ld|st)\.global[.\w:]*", ptx)
    copies = re.findall(r"\bcp\.async\.c[ag]\.shared\.global", ptx)
    vector = sum(".v4" in op or ".v2.b64" in op for op in ops) + sum(".cg." in op for op in copies)
    narrow = sum(op.endswith((".b16", ".b32")) and ".v" not in op for op in ops) + sum(".ca." in op for op in copies)
    return vector, narrow


def main():
    import triton

    from mlsoftmax.kernels import triton_loss as tl_

    print(f"Triton {triton.__version__}, sm_90")
    print(f"{'kernel':<14}{'dtype':<6}{'K':>8}{'columns':>8}{'warps':>6}{'regs':>6}{'spills':>7}{'progs/SM':>9}"
          f"{'vector/narrow':>15}{'smem kB':>10}")
    for dt in ("bf16", "fp32"):
        x = f"*{dt}"
        common = dict(X=x, stride_x="i32", G=x, stride_g="i32", T="*fp32", stride_t="i32", IDX="*i64",
                      OFFS="*i64", VALS="*fp32", SCRATCH="*fp32", W="*fp32")
        for k, peel in ((131072, False), (131071, True)):
            # integers that Triton marks divisible by 16 at this K (B = 4096, S and SPAN; the strides and K itself
            # only when K is a multiple of 16)
            ints = {"B", "S", "SPAN"} | ({"K", "stride_x", "stride_g"} if k % 16 == 0 else set())
            two_pass = dict(common, RS="*fp32", LOSS="*fp32", B="i32", K="i32", eps="fp32")
            flags = dict(SPARSE, COMPUTE_GRAD=True, REVERSE=True, EVICT_STORE=False, PEEL=peel, G_ALIGNED=peel,
                         BLOCK=tl_.MAX_BLOCK, BLOCK_P=tl_.BLOCK_P, STAGES=1)
            warps = tl_._num_warps(tl_.MAX_BLOCK)
            runs = [("two-pass", tl_._msl_fwd_kernel, two_pass, flags, warps, tl_.MAX_BLOCK, {}),
                    ("two-pass/32w", tl_._msl_fwd_kernel, two_pass, flags, 32, tl_.MAX_BLOCK, {}),  # ROW_WARPS=32
                    ("two-pass/n3", tl_._msl_fwd_kernel, two_pass, dict(flags, STAGES=3), warps, tl_.MAX_BLOCK,
                     {}),  # ROW_STAGES=3
                    ("lagged", tl_._msl_lagged_kernel,
                     dict(common, WSUM="*fp32", RS="*fp32", LOSS="*fp32", REC="*i64", B="i32", K="i32", S="i32",
                          SPAN="i32", eps="fp32"),
                     dict(SPARSE, REVERSE=True, EVICT_STORE=False, PEEL=peel, G_ALIGNED=peel, PHASE=2, LAG=tl_.LAG,
                          BLOCK=tl_.LAGGED_BLOCK, BLOCK_P=tl_.BLOCK_P, BLOCK_S=16, STAGES=1),
                     tl_._num_warps(tl_.LAGGED_BLOCK), tl_.LAGGED_BLOCK, {})]  # LAGGED
            for name, fn, sig, consts, warps, width, options in runs:
                aligned = [a for a in sig if a in POINTERS or a in ints]
                kernel = build(fn, sig, consts, num_warps=warps, aligned=aligned, **options)
                regs, spills = ptxas_usage(kernel.asm["ptx"])
                vector, narrow = access_widths(kernel.asm["ptx"])
                threads = 32 * warps
                shared = kernel.metadata.shared  # bytes; an SM has 228 KB, 1 KB of it reserved per program
                per_sm = min(65536 // (threads * -(-regs // 8) * 8), 2048 // threads,  # registers go in units of 8
                             228 * 1024 // (shared + 1024))
                print(f"{name:<14}{dt:<6}{k:>8}{width:>8}{warps:>6}{regs:>6}{spills:>7}{per_sm:>9}"
                      f"{f'{vector}/{narrow}':>15}{shared / 1024:>10.0f}")


if __name__ == "__main__":
    main()
