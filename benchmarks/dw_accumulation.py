"""How much accuracy does dW lose when the rows route accumulates it across row chunks in bf16 instead of fp32?

The fused linear route over row chunks adds each chunk's ``G_r^T @ h_r`` into dW. Issue #5 asks for a dW error,
against an fp32 reference, within 2x of the naive bf16 path's (bf16 logits, the bf16 gradient, one GEMM over all
rows with fp32 inside, rounded once). This emulates on the CPU what cuBLAS does in each case (an fp32 product, then
one rounding of ``C + A B`` to the output dtype) and prints each error relative to the naive path's, overall and on
the classes with no positive in the batch (whose small gradients are the softmax term alone):

* ``fp32 acc``: the fast rows route (an fp32 accumulator, rounded once at the end);
* ``bf16 acc``: dW accumulated in bf16 chunk by chunk;
* ``lean``: the lean rows route (``triton_linear.run(lean=True)``): bf16 accumulation of the gradient with the
  positives' target terms added back (each such entry rounded once more), and those terms' ``E^T h`` taken off
  once at the end in fp32.

The reference is the gradient of the fp32 path, computed in fp64 from the same bf16-valued inputs.

    python benchmarks/dw_accumulation.py                              # B=8192, D=128, K=65536, 1..32 chunks
    python benchmarks/dw_accumulation.py --chunks 17                  # the 256 MB point's chunks (B=8192, K=262144)
"""

from __future__ import annotations

import argparse

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=8192)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--K", type=int, default=65536)
    p.add_argument("--npos", type=int, default=8)
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 8, 16, 17, 32])
    p.add_argument("--step", type=int, default=64, help="rows formed at a time, at most (memory)")
    args = p.parse_args()
    b, d, k, npos = args.B, args.D, args.K, args.npos
    g = torch.Generator().manual_seed(0)
    h = torch.randn(b, d, generator=g).bfloat16()
    w = (torch.randn(k, d, generator=g) / d**0.5).bfloat16()
    idx = torch.stack([torch.randperm(k, generator=g)[:npos] for _ in range(b)])  # [B, npos] distinct in a row
    touched = torch.zeros(k, dtype=torch.bool)
    touched[idx.reshape(-1)] = True
    bounds = {n: [min(b, i * -(-b // n)) for i in range(1, n + 1)] for n in args.chunks}  # balanced chunk ends
    ref = torch.zeros(k, d, dtype=torch.float64)
    naive = torch.zeros(k, d)
    t_part = torch.zeros(k, d, dtype=torch.float64)  # E^T h, as the lean route's final fp32 step forms it
    acc32 = {n: torch.zeros(k, d) for n in args.chunks}
    acc16 = {n: torch.zeros(k, d).bfloat16() for n in args.chunks}
    lean16 = {n: torch.zeros(k, d).bfloat16() for n in args.chunks}
    part = {n: torch.zeros(k, d) for n in args.chunks}  # this chunk's product so far (fp32 inside the GEMM)
    part_lean = {n: torch.zeros(k, d) for n in args.chunks}
    ends = sorted(set(range(args.step, b, args.step)).union(*bounds.values()))  # every chunk's end is a step's
    for r0, r1 in zip([0] + ends[:-1], ends):
        hr, rows = h[r0:r1], r1 - r0
        t = torch.zeros(rows, k).scatter_(1, idx[r0:r1], 1.0 / npos)  # [R, K] Y / |Y|
        z32 = hr.float() @ w.float().T
        ref += ((torch.softmax(z32.double(), 1) - t.double()) / b).T @ hr.double()  # the fp32 path, exactly
        gb = ((torch.softmax(z32.bfloat16().float(), 1) - t) / b).bfloat16()  # bf16 logits, bf16 gradient
        prod = gb.float().T @ hr.float()
        pl = gb.float() + t / b  # the lean route's P: the target terms added back, rounded once more
        prod_lean = pl.bfloat16().float().T @ hr.float()
        t_part += (t.double() / b).T @ hr.double()
        naive += prod
        for n in args.chunks:
            part[n] += prod
            part_lean[n] += prod_lean
            if r1 in bounds[n]:  # a chunk ends: C + A B rounded once into each accumulator
                acc32[n] += part[n]
                acc16[n] = (acc16[n].float() + part[n]).bfloat16()
                lean16[n] = (lean16[n].float() + part_lean[n]).bfloat16()
                part[n].zero_()
                part_lean[n].zero_()

    def err(x, rows=slice(None)):
        return ((x.double() - ref)[rows].norm() / ref[rows].norm()).item()

    naive = naive.bfloat16()
    e0, u0 = err(naive), err(naive, ~touched)
    print(f"B={b} D={d} K={k}, {npos} positives/row ({int(touched.sum())} classes with one); dW relative error "
          f"against the fp32 path: naive bf16 {e0:.3e} overall, {u0:.3e} on the classes without a positive")
    print(f"{'chunks':>6}{'fp32 acc':>12}{'bf16 acc':>12}{'lean':>12}   (x naive; without a positive: "
          f"{'fp32 acc':>8}{'bf16 acc':>10}{'lean':>8})")
    for n in args.chunks:
        lean = (lean16[n].double() - t_part).bfloat16()  # E^T h taken off once, in fp32, rounded once
        row = [acc32[n].bfloat16(), acc16[n], lean]
        print(f"{n:>6}" + "".join(f"{err(x) / e0:>12.2f}" for x in row) + "   " + " " * 29
              + "".join(f"{err(x, ~touched) / u0:>{wd}.2f}" for x, wd in zip(row, (8, 10, 8))))


if __name__ == "__main__":
    main()
