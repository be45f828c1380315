"""One million labels on the CPU in bounded memory: the fused linear + loss on synthetic data.

The classifier has K = 1,000,000 rows; the [batch, K] logits (2 GB at batch 512)
are never built, neither in training (label chunks with an online
log-sum-exp) nor in prediction (chunked top-k). It reports P@1 and P@5 on
held-out rows against the label-frequency prior (always predict the most
frequent training labels), and the process's peak resident memory.

    python examples/extreme_synthetic.py                       # K = 1M (see README for the measured run)
    python examples/extreme_synthetic.py --classes 100000 --steps 100
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from tqdm.auto import tqdm

from mlsoftmax import LinearMultiLabelSoftmaxLoss
from mlsoftmax.data import collate, synthetic


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--train", type=int, default=30_000)
    p.add_argument("--test", type=int, default=2_000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)

    t0 = time.time()
    data = synthetic(args.train + args.test, args.features, args.classes, labels_per_row=3.0, power=0.8,
                     noise=0.5, seed=args.seed)
    train, test = data.subset(range(args.train)), data.subset(range(args.train, len(data)))
    print(f"data: {len(train)} train / {len(test)} test rows, K={args.classes:,}, D={args.features} "
          f"({time.time() - t0:.0f}s)")

    head = LinearMultiLabelSoftmaxLoss(args.features, args.classes, validate=False)
    opt = torch.optim.Adam(head.parameters(), lr=args.lr)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True,
                                         collate_fn=lambda b: collate(b, args.classes), drop_last=True)
    step, t0 = 0, time.time()
    bar = tqdm(total=args.steps, desc="train")
    while step < args.steps:
        for xb, yb in loader:
            loss = head(xb, yb)  # [batch, K] never materialised
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step == args.steps:
                break
    bar.close()
    print(f"trained {step} steps in {time.time() - t0:.0f}s")

    # prediction in label chunks: top-5 without the [rows, K] scores
    top = torch.cat([head.top_k(test.features[i:i + 256], 5)[1] for i in range(0, len(test), 256)])  # [N, 5]
    freq = torch.bincount(train.labels.indices, minlength=args.classes)
    prior = freq.topk(5).indices.expand(len(test), 5)  # the same 5 most frequent labels for every row

    def p_at(pred, k):  # precision@k from the predicted ids and the true label sets
        hits = [len(set(pr[:k].tolist()) & set(test[i][1].tolist())) / k for i, pr in enumerate(pred)]
        return sum(hits) / len(hits)

    for name, pred in (("fused linear + softmax loss", top), ("label-frequency prior", prior)):
        print(f"{name:<30} P@1 {p_at(pred, 1):.4f}   P@5 {p_at(pred, 5):.4f}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dense_gb = args.batch_size * args.classes * 4 / 2**30
    print(f"peak resident memory {peak_mb:.0f} MB (one [batch, K] fp32 logits tensor alone would be {dense_gb:.1f} GB)")


if __name__ == "__main__":
    main()
