"""Evaluating a classifier over many labels: every metric from [N, K] scores, or the top-k metrics from top labels.

One linear classifier (``synthetic()`` data's dimensions, random weights) scores N rows over K labels two ways,
as ``mlsoftmax train`` evaluates with ``--eval full`` and ``--eval top-k``:

* full: the [N, K] scores a batch at a time, concatenated, then ``MultilabelEvaluator.update`` (every metric;
  label AP off, as under torchrun);
* top-k: each row's top 5 labels by ``linear.chunked_top_k`` (label chunks, no [N, K] buffer), then
  ``MultilabelEvaluator.update_top_k`` on the ``Positives`` target.

It prints each way's wall time and peak resident memory above the start (this process's VmHWM after a reset),
their ratios, and checks that the metrics both give (P@k, R@k, nDCG@k, one-error, annotation scores) agree.

    python benchmarks/bench_eval.py                          # N=500, D=64, K=200,000
    python benchmarks/bench_eval.py --N 2000 --K 1000000
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import reset_peak_rss, rss_kb

from mlsoftmax.data import synthetic
from mlsoftmax.linear import chunked_top_k
from mlsoftmax.metrics import MultilabelEvaluator


def full_eval(h, w, target, batch):
    scores = torch.cat([h[i:i + batch] @ w.T for i in range(0, len(h), batch)])  # [N, K]
    ev = MultilabelEvaluator(ks=(1, 3, 5), annotation_k=3, label_ap=False)
    ev.update(scores, target)
    return ev.compute()


def top_k_eval(h, w, target, batch):
    top = torch.cat([chunked_top_k(h[i:i + batch], w, 5)[1] for i in range(0, len(h), batch)])  # [N, 5]
    ev = MultilabelEvaluator(ks=(1, 3, 5), annotation_k=3)
    ev.update_top_k(top, target)
    return ev.compute()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=500)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--K", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=256, help="rows scored at a time")
    args = p.parse_args()
    data = synthetic(args.N, args.D, args.K, labels_per_row=3.0, power=0.8, seed=0)
    w = torch.randn(args.K, args.D, generator=torch.Generator().manual_seed(1)) / args.D**0.5
    h, target = data.features, data.labels
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; N={args.N} D={args.D} K={args.K:,}")
    results = {}
    for name, fn in (("top-k", top_k_eval), ("full", full_eval)):  # the small one first: its peak is not a reuse
        start = reset_peak_rss()
        t0 = time.perf_counter()
        metrics = fn(h, w, target, args.batch)
        results[name] = (time.perf_counter() - t0, (rss_kb("VmHWM") - start) / 1024, metrics)
        print(f"  {name:<6} {results[name][0]:8.2f} s   peak +{results[name][1]:8.0f} MB")
    (tf, mf, full), (tt, mt, top) = results["full"], results["top-k"]
    print(f"  full / top-k: time {tf / tt:.1f}x, peak memory {mf / max(mt, 1.0):.1f}x")
    worst = max(abs(full[key] - top[key]) for key in top)
    print(f"  the top-k metrics ({len(top)}) agree with the full evaluation's: largest difference {worst:.2e}")


if __name__ == "__main__":
    main()
