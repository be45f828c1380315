"""Registers, spills and residency of the loss kernels on an H100 (sm_90), from Triton's compiler alone: no GPU.

The one-read kernel holds each program's slice of a row in registers, so how many columns an SM can hold at once
(programs per SM x columns per program) bounds the bytes it has in flight. This compiles the kernels as the
launchers call them at the issue's point (sparse positives, no options; pointers and strides aligned to 16, as
Triton specializes them), runs ``ptxas -v`` on each, and prints registers per thread, spills, programs per SM
(limited by 64K registers and 2048 threads per SM) and columns resident per SM. ``one-read/32`` is the one-read
kernel with ptxas capped at 32 registers a thread (``ONE_READ_MAXNREG``, a benchmark knob).

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

ALIGNED = ("X", "stride_x", "G", "stride_g", "IDX", "OFFS", "SCRATCH", "RS", "LOSS", "STATS", "ARRIVED")
SPARSE = dict(HAS_DENSE=False, HAS_SPARSE=True, HAS_VALUES=False, HAS_WEIGHT=False, HAS_SMOOTH=False)


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """``(registers per thread, spill bytes)`` that ptxas reports for sm_90a, with the flags Triton passes."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90)
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


def main():
    from mlsoftmax.kernels import triton_loss as tl_

    print(f"{'kernel':<14}{'dtype':<6}{'columns':>8}{'warps':>6}{'regs':>6}{'spills':>7}{'progs/SM':>9}"
          f"{'cols/SM':>9}")
    for dt in ("bf16", "fp32"):
        x = f"*{dt}"
        common = dict(X=x, stride_x="i32", G=x, stride_g="i32", T="*fp32", stride_t="i32", IDX="*i64",
                      OFFS="*i64", VALS="*fp32", SCRATCH="*fp32", W="*fp32")
        runs = [("two-pass", tl_._msl_fwd_kernel, dict(common, RS="*fp32", LOSS="*fp32", B="i32", K="i32", eps="fp32"),
                 dict(SPARSE, COMPUTE_GRAD=True, REVERSE=True, EVICT_STORE=False, BLOCK=tl_.MAX_BLOCK, BLOCK_P=tl_.BLOCK_P),
                 tl_._num_warps(tl_.MAX_BLOCK), tl_.MAX_BLOCK, {})]
        runs.append(("two-pass/32w", *runs[0][1:4], 32, tl_.MAX_BLOCK, {}))  # the ROW_WARPS=32 knob
        for width, cap in [(2048, None), (4096, None)] + [(w, None) for w in tl_.ONE_READ_BLOCKS] + [(8192, 32)]:
            runs.append(("one-read" + (f"/{cap}" if cap else ""), tl_._msl_one_read_kernel,
                         dict(common, WSUM="*fp32", RS="*fp32", LOSS="*fp32", STATS="*fp32", ARRIVED="*i32", K="i32",
                              S="i32", eps="fp32"),
                         dict(SPARSE, PHASE=2, BLOCK=width, BLOCK_P=tl_.BLOCK_P, BLOCK_S=64),
                         tl_._one_read_warps(width), width, {"maxnreg": cap} if cap else {}))
        for name, fn, sig, consts, warps, width, options in runs:
            kernel = build(fn, sig, consts, num_warps=warps, aligned=[a for a in ALIGNED if a in sig], **options)
            regs, spills = ptxas_usage(kernel.asm["ptx"])
            threads = 32 * warps
            per_sm = min(65536 // (threads * -(-regs // 8) * 8), 2048 // threads)  # registers go in units of 8
            held = per_sm * width if name.startswith("one-read") else "-"  # the two-pass kernel streams its rows
            print(f"{name:<14}{dt:<6}{width:>8}{warps:>6}{regs:>6}{spills:>7}{per_sm:>9}{held:>9}")


if __name__ == "__main__":
    main()
