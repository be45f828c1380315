"""The ``mlsoftmax`` command line: train, compare, predict.

Commands (each also runs as ``python -m mlsoftmax ...``):

    mlsoftmax train                                   # yeast, softmax loss, the tuned default model
    mlsoftmax train --loss bce --epochs 50 --out runs/bce
    mlsoftmax train --data data.txt --format xc --model linear --out runs/xc
    mlsoftmax compare --losses softmax,bce,warp,ranking,asl,zlpr --seeds 5 --out runs/compare
    mlsoftmax predict --checkpoint runs/train --input features.csv --top-k 3

``train`` tunes nothing on the test split: the epoch is chosen, and the decoding
rule for F1/Hamming fitted, on a validation part carved from the training data.
It writes ``metrics.json``, ``config.json``, ``checkpoint.pt`` (atomically) and
``curve.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

LOSS_CHOICES = ("softmax", "bce", "warp", "ranking", "asl", "zlpr", "pal")

# The default model, chosen on yeast's validation split (carved from train).
DEFAULTS = dict(model="mlp", hidden=1024, dropout=0.7, epochs=60, lr=3e-4, weight_decay=5e-2, batch_size=64)


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- data
def load_data(args):
    """``(fit, val, test)`` MultiLabelDatasets, with feature names for the run's config."""
    from . import data as D

    if args.data == "yeast":
        fit = D.dataset_from_dense(*D.load_yeast("fit", val_fraction=args.val_fraction, seed=args.split_seed))
        val = D.dataset_from_dense(*D.load_yeast("val", val_fraction=args.val_fraction, seed=args.split_seed))
        test = D.dataset_from_dense(*D.load_yeast("test"))
        return fit, val, test
    full = D.load_file(args.data, args.format, args.num_labels)
    if args.test_data:
        train, test = full, D.load_file(args.test_data, args.format, args.num_labels)
    else:  # hold out 20% as test, seeded
        perm = np.random.default_rng(args.split_seed).permutation(len(full))
        n_test = max(1, len(full) // 5)
        train, test = full.subset(np.sort(perm[n_test:])), full.subset(np.sort(perm[:n_test]))
    perm = np.random.default_rng(args.split_seed + 1).permutation(len(train))
    n_val = max(1, int(round(args.val_fraction * len(train))))
    return train.subset(np.sort(perm[n_val:])), train.subset(np.sort(perm[:n_val])), test


# ----------------------------------------------------------------------------- model
class Standardize(nn.Module):
    """Feature standardisation with statistics from the fit split (saved with the model)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x):
        return (x - self.mean) / self.std


def build_model(kind, d, k, hidden, dropout, mean=None, std=None):
    mean = torch.zeros(d) if mean is None else mean
    std = torch.ones(d) if std is None else std
    if kind == "linear":
        return nn.Sequential(Standardize(mean, std), nn.Linear(d, k))
    if kind == "mlp":
        return nn.Sequential(
            Standardize(mean, std), nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, k)
        )
    raise CLIError(f"unknown model {kind!r}; choose linear or mlp")


def loss_fn(name):
    from . import baselines, multilabel_softmax_loss

    if name == "softmax":
        return lambda z, t: multilabel_softmax_loss(z, t, validate=False)
    if name in baselines.LOSSES:
        return baselines.LOSSES[name]
    raise CLIError(f"unknown loss {name!r}; choose from {', '.join(LOSS_CHOICES)}")


@torch.no_grad()
def predict_scores(model, ds, device, batch_size=1024):
    model.eval()
    out = [model(ds.features[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(ds), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, ds.num_classes)


# ----------------------------------------------------------------------------- training
def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def train_run(args, *, quiet=False):
    """Train one model; returns ``(test_metrics, history, model, decoder, config)``."""
    from tqdm.auto import tqdm

    from .data import collate
    from .decode import fit_decoder
    from .metrics import MultilabelEvaluator, average_precision

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    fit, val, test = load_data(args)
    mean, std = fit.features.mean(0), fit.features.std(0).clamp_min(1e-6)
    model = build_model(args.model, fit.num_features, fit.num_classes, args.hidden, args.dropout, mean, std).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    crit = loss_fn(args.loss)
    k = fit.num_classes
    gen = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        fit, batch_size=args.batch_size, shuffle=True, generator=gen, collate_fn=lambda b: collate(b, k)
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(1, args.epochs * len(loader)))
    y_val = val.labels
    history = {"epoch": [], "train_loss": [], "val_average_precision": []}
    best = (-math.inf, None, 0)
    bar = tqdm(range(1, args.epochs + 1), desc=f"train {args.loss}", disable=quiet, leave=False)
    for epoch in bar:
        model.train()
        total, n = 0.0, 0
        for xb, tb in loader:
            xb = xb.to(device)
            loss = crit(model(xb), tb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(xb)
            n += len(xb)
        val_ap = average_precision(predict_scores(model, val, device), y_val)
        history["epoch"].append(epoch)
        history["train_loss"].append(total / max(n, 1))
        history["val_average_precision"].append(val_ap)
        bar.set_postfix(loss=f"{total / max(n, 1):.4f}", val_ap=f"{val_ap:.4f}")
        if val_ap > best[0]:
            best = (val_ap, {kk: v.detach().clone() for kk, v in model.state_dict().items()}, epoch)
    bar.close()
    if best[1] is not None:
        model.load_state_dict(best[1])
    decoder = fit_decoder(predict_scores(model, val, device), y_val, rule=args.decode, metric="micro_f1")
    ev = MultilabelEvaluator(ks=(1, 3, 5), annotation_k=3, decoder=decoder)
    ev.update(predict_scores(model, test, device), test.labels)
    metrics = ev.compute()
    metrics["best_epoch"] = best[2]
    metrics["val_average_precision"] = best[0]
    config = {k_: v for k_, v in vars(args).items() if k_ not in ("func",)}
    config.update(num_features=fit.num_features, num_classes=k, decoder=decoder.to_dict(),
                  n_fit=len(fit), n_val=len(val), n_test=len(test))
    return metrics, history, model, decoder, config


TABLE_KEYS = ("average_precision", "ranking_loss", "coverage", "one_error", "precision_at_1", "precision_at_3",
              "ndcg_at_3", "mean_average_precision", "micro_f1", "macro_f1", "hamming_loss")


def plot_curve(history, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(history["epoch"], history["train_loss"], color="tab:blue", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(history["epoch"], history["val_average_precision"], color="tab:orange", label="val AP")
    ax2.set_ylabel("validation average precision", color="tab:orange")
    ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_train(args):
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    metrics, history, model, decoder, config = train_run(args)
    test_metrics = {k: metrics[k] for k in metrics if k not in ("best_epoch", "val_average_precision")}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"test": test_metrics, "best_epoch": metrics["best_epoch"],
                   "val_average_precision": metrics["val_average_precision"], "history": history}, f, indent=2)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    atomic_save({"model": model.state_dict(), "config": config}, os.path.join(args.out, "checkpoint.pt"))
    plot_curve(history, os.path.join(args.out, "curve.png"), f"{args.loss} on {os.path.basename(str(args.data))}")
    print(f"\n{args.loss} loss, {args.model} model, data={args.data}: best epoch {metrics['best_epoch']} "
          f"(val AP {metrics['val_average_precision']:.4f}), {time.time() - t0:.1f}s")
    print(f"{'test metric':<28}{'value':>10}")
    for k in TABLE_KEYS + tuple(k for k in test_metrics if k.endswith("_at_3") and k.startswith(("per_", "overall", "n_plus"))):
        if k in test_metrics:
            print(f"{k:<28}{test_metrics[k]:>10.4f}")
    print(f"wrote {args.out}/metrics.json, config.json, checkpoint.pt, curve.png")


def cmd_compare(args):
    os.makedirs(args.out, exist_ok=True)
    losses = [l.strip() for l in args.losses.split(",") if l.strip()]
    for l in losses:
        loss_fn(l)  # fail fast on a bad name
    results = {}
    for l in losses:
        runs = []
        for s in range(args.seeds):
            a = argparse.Namespace(**vars(args))
            a.loss, a.seed = l, args.seed + s
            m = train_run(a, quiet=True)[0]
            runs.append(m)
            print(f"{l:<8} seed {a.seed}: AP {m['average_precision']:.4f}  RL {m['ranking_loss']:.4f}", flush=True)
        results[l] = runs
    keys = ("average_precision", "ranking_loss", "coverage", "one_error", "precision_at_1", "mean_average_precision",
            "micro_f1", "macro_f1")
    lines = ["| loss | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for l, runs in results.items():
        cells = []
        for k in keys:
            v = np.array([r[k] for r in runs])
            cells.append(f"{v.mean():.4f} ± {v.std():.4f}")
        lines.append(f"| {l} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    header = (f"{args.data}, {args.model} model, {args.epochs} epochs, {args.seeds} seeds (mean ± std over seeds), "
              f"test split; epoch and decoder chosen on validation\n\n")
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(header + table + "\n")
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(results, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key in zip(axes, ("average_precision", "ranking_loss")):
        vals = [np.array([r[key] for r in results[l]]) for l in losses]
        ax.bar(losses, [v.mean() for v in vals], yerr=[v.std() for v in vals], capsize=3, color="tab:blue")
        ax.set_title(key.replace("_", " "))
        lo = min(v.mean() for v in vals)
        hi = max(v.mean() for v in vals)
        ax.set_ylim(max(0, lo - (hi - lo) - 0.02), hi + (hi - lo) * 0.5 + 0.01)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "compare.png"), dpi=110)
    plt.close(fig)
    print("\n" + header + table)
    print(f"\nwrote {args.out}/compare.md, compare.json, compare.png")


def cmd_predict(args):
    from . import data as D

    path = os.path.join(args.checkpoint, "checkpoint.pt") if os.path.isdir(args.checkpoint) else args.checkpoint
    if not os.path.exists(path):
        raise CLIError(f"no checkpoint at {path}")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    cfg = ck["config"]
    d, k = cfg["num_features"], cfg["num_classes"]
    model = build_model(cfg["model"], d, k, cfg["hidden"], cfg["dropout"])
    model.load_state_dict(ck["model"])
    model.eval()
    if args.input.endswith(".npy"):
        x = torch.from_numpy(np.load(args.input).astype(np.float32))
    elif args.format or args.input.endswith((".arff", ".npz")):
        x = D.load_file(args.input, args.format, args.num_labels or k).features
    else:  # CSV of features only (a header row is skipped)
        rows = []
        with open(args.input) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append([float(t) for t in line.strip().split(",")])
                except ValueError:
                    if lineno == 1:
                        continue
                    raise CLIError(f"{args.input}:{lineno}: non-numeric value")
        x = torch.tensor(rows, dtype=torch.float32)
    if x.dim() != 2 or x.shape[1] != d:
        raise CLIError(f"{args.input}: expected rows of {d} features, got shape {tuple(x.shape)}")
    with torch.no_grad():
        scores = model(x)
    top = torch.topk(scores, min(args.top_k, k), dim=1).indices
    for row in top.tolist():
        print(",".join(str(j) for j in row))


# ----------------------------------------------------------------------------- argparse
def _common(p):
    p.add_argument("--data", default="yeast", help="yeast, or a path to a data file")
    p.add_argument("--test-data", default=None, help="a separate test file (else 20%% of --data is held out)")
    p.add_argument("--format", default=None, choices=("xc", "arff", "csv", "npz"), help="file format (else guessed)")
    p.add_argument("--num-labels", type=int, default=None, help="label count for arff/csv files")
    p.add_argument("--model", default=DEFAULTS["model"], choices=("linear", "mlp"))
    p.add_argument("--hidden", type=int, default=DEFAULTS["hidden"])
    p.add_argument("--dropout", type=float, default=DEFAULTS["dropout"])
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fit/validation partition")
    p.add_argument("--decode", default="mass", choices=("top_k", "threshold", "mass"),
                   help="decoding rule for F1/Hamming, fitted on validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))


def make_parser():
    p = argparse.ArgumentParser(prog="mlsoftmax", description="Multi-label softmax: train, compare, predict.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one model and evaluate it on the test split")
    _common(t)
    t.add_argument("--loss", default="softmax", choices=LOSS_CHOICES)
    t.add_argument("--out", default="runs/train")
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("compare", help="the same model and budget with each loss, over seeds")
    _common(c)
    c.add_argument("--losses", default="softmax,bce,warp,ranking,asl,zlpr")
    c.add_argument("--seeds", type=int, default=5)
    c.add_argument("--out", default="runs/compare")
    c.set_defaults(func=cmd_compare)
    r = sub.add_parser("predict", help="top-k labels per row of a feature file")
    r.add_argument("--checkpoint", required=True, help="a run folder or checkpoint.pt")
    r.add_argument("--input", required=True, help="features: .csv, .npy, or a data file (arff/npz/xc with --format)")
    r.add_argument("--format", default=None, choices=("xc", "arff", "csv", "npz"))
    r.add_argument("--num-labels", type=int, default=None)
    r.add_argument("--top-k", type=int, default=3)
    r.set_defaults(func=cmd_predict)
    return p


def main(argv=None):
    from .data import DataFormatError

    args = make_parser().parse_args(argv)
    try:
        if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
            raise CLIError("--device cuda given but no CUDA device is available")
        if getattr(args, "epochs", 1) < 1:
            raise CLIError(f"--epochs must be >= 1, got {args.epochs}")
        args.func(args)
    except (CLIError, DataFormatError, FileNotFoundError) as e:
        print(f"mlsoftmax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
