"""The ``mlsoftmax`` command line: train, compare, predict, plot.

Commands (each also runs as ``python -m mlsoftmax ...``):

    mlsoftmax train                                   # yeast, softmax loss, the tuned default model
    mlsoftmax train --loss bce --epochs 50 --out runs/bce
    mlsoftmax train --data data.txt --format xc --model linear --out runs/xc
    mlsoftmax compare --losses softmax,bce,warp,ranking,asl,zlpr --seeds 5 --out runs/compare
    mlsoftmax predict --checkpoint runs/train --input features.csv --top-k 3
    mlsoftmax plot runs/train runs/bce --out curves.png  # training curves of several runs in one figure
    mlsoftmax train --model linear --fused --out runs/fused             # fused linear + loss head
    mlsoftmax train --data xc.txt --model linear --eval top-k --out runs/xc  # XC metrics from top-5 labels only
    mlsoftmax train --amp --device cuda --out runs/amp                  # bf16 autocast (mixed precision)
    mlsoftmax train --amp fp16 --device cuda --out runs/amp16           # fp16 autocast and a GradScaler
    mlsoftmax train --resume runs/train --out runs/train                # continue after the last finished epoch
    torchrun --nproc-per-node 2 -m mlsoftmax train --out runs/ddp       # data-parallel (DDP), gloo on CPU
    torchrun --nproc-per-node 2 -m mlsoftmax train --model linear --shard-labels --out runs/sharded

``train`` tunes nothing on the test split: the epoch is chosen, and the decoding
rule for F1/Hamming fitted, on a validation part carved from the training data.
It writes ``metrics.json``, ``config.json``, ``checkpoint.pt`` (atomically) and
``curve.png`` to ``--out``, and after every epoch ``last.pt`` (model, optimiser,
schedule, every rank's RNG, history; atomically) for ``--resume``. With
``--shard-labels`` each rank writes its own ``last.rank{r}.pt``.
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


FUSED_MIN_CLASSES = 65536  # --model linear uses the fused linear + loss from this many labels on


class Classifier(nn.Module):
    """Features ``[b, D]`` -> scores ``[b, K]``: ``body`` (standardise, optional hidden layer), then a linear ``head``.

    With ``fused=True`` the head is a :class:`~mlsoftmax.LinearMultiLabelSoftmaxLoss`
    (same initialisation as ``nn.Linear``): training never builds the ``[b, K]``
    logits. ``forward(x, target)`` returns the loss (so that DDP sees it);
    ``forward(x)`` returns the scores.
    """

    def __init__(self, kind, d, k, hidden, dropout, mean=None, std=None, *, fused=False, criterion=None):
        super().__init__()
        mean = torch.zeros(d) if mean is None else mean
        std = torch.ones(d) if std is None else std
        if kind == "linear":
            self.body, dh = nn.Sequential(Standardize(mean, std)), d
        elif kind == "mlp":
            self.body = nn.Sequential(Standardize(mean, std), nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout))
            dh = hidden
        else:
            raise CLIError(f"unknown model {kind!r}; choose linear or mlp")
        from . import LinearMultiLabelSoftmaxLoss

        self.fused = fused
        self.head = LinearMultiLabelSoftmaxLoss(dh, k, validate=False) if fused else nn.Linear(dh, k)
        self.criterion = criterion

    def forward(self, x, target=None):
        h = self.body(x)
        if target is not None and self.fused:
            return self.head(h, target)
        scores = self.head.logits(h) if self.fused else self.head(h)
        return scores if target is None else self.criterion(scores, target)


def build_model(kind, d, k, hidden, dropout, mean=None, std=None, *, fused=False, criterion=None):
    return Classifier(kind, d, k, hidden, dropout, mean, std, fused=fused, criterion=criterion)


def loss_fn(name):
    from . import baselines, multilabel_softmax_loss

    if name == "softmax":
        return lambda z, t: multilabel_softmax_loss(z, t, validate=False)
    if name in baselines.LOSSES:
        return baselines.LOSSES[name]
    raise CLIError(f"unknown loss {name!r}; choose from {', '.join(LOSS_CHOICES)}")


@torch.no_grad()
def predict_scores(model, ds, device, batch_size=None):
    """Scores ``[N, K]`` in row batches of at most ~64M scores."""
    model.eval()
    batch_size = batch_size or max(1, min(1024, (1 << 26) // max(ds.num_classes, 1)))
    out = [model(ds.rows(slice(i, i + batch_size)).to(device)).float().cpu() for i in range(0, len(ds), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, ds.num_classes)


@torch.no_grad()
def top_labels(model, x, device, m, batch_size=1024):
    """Each row's ``m`` best labels ``[N, m]`` (best first), scored in label chunks: no ``[N, K]`` scores.

    ``x``: a dense features tensor, or a ``MultiLabelDataset`` (dense rows a batch at a time)."""
    from .linear import chunked_top_k

    model.eval()
    head = model.head
    m = min(m, head.weight.shape[0])
    batch = x.rows if hasattr(x, "rows") else x.__getitem__
    out = [chunked_top_k(model.body(batch(slice(i, i + batch_size)).to(device)), head.weight, m, bias=head.bias,
                         weight_scale=getattr(head, "weight_scale", None))[1].cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, m, dtype=torch.long)


# ----------------------------------------------------------------------------- checkpoints
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


# ----------------------------------------------------------------------------- distributed
class Dist:
    """The process group of a ``torchrun`` launch (``WORLD_SIZE`` > 1), or a single process."""

    def __init__(self, args):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.on = self.world > 1
        self.timeout = args.dist_timeout
        self.device = torch.device(args.device)
        if self.on:
            import datetime

            import torch.distributed as dist

            if args.device == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=args.dist_timeout))

    @property
    def main(self):
        return self.rank == 0

    def all_reduce_(self, t):
        if self.on:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def gather_object(self, obj):
        """``[obj of rank 0, obj of rank 1, ...]`` (every rank gets the list)."""
        if not self.on:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self, ok=True):
        """Leave the group; after a clean run, first wait for every rank (so that no rank tears down its
        connections while a peer is still finishing the last collective: gloo aborts on that)."""
        if self.on:
            import gc

            import torch.distributed as dist

            # free what still holds the group (DDP's reducer sits in reference cycles) while it is alive:
            # torn down later, at interpreter exit, a gloo rank could abort ("terminate called without an
            # active exception": 4 of 15 runs of the 2-rank CLI tests before this, 0 of 16 after)
            gc.collect()
            if ok:
                dist.barrier()
            dist.destroy_process_group()


class _GatherRows(torch.autograd.Function):
    """All-gather the rows of every rank ``[b_r, D] -> [sum b_r, D]``.

    The backward keeps this rank's rows of the (already all-reduced) gradient,
    times the world size, so that DDP's gradient average over the ranks gives
    the gradient of the global loss.
    """

    @staticmethod
    def forward(ctx, h, sizes, rank, world):
        import torch.distributed as dist

        big = h.new_zeros(max(sizes), h.shape[1])
        big[: h.shape[0]] = h
        parts = [torch.empty_like(big) for _ in range(world)]
        dist.all_gather(parts, big.contiguous())
        ctx.lo, ctx.hi, ctx.world = sum(sizes[:rank]), sum(sizes[: rank + 1]), world
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, g):
        return g[ctx.lo : ctx.hi] * ctx.world, None, None, None


def gather_batch(h, target, dd):
    """The global batch of a label-sharded step: every rank's hidden rows and targets (O(b·D + nnz))."""
    import torch.distributed as dist

    from .targets import Positives

    sizes = [None] * dd.world
    dist.all_gather_object(sizes, (h.shape[0], target.indices.cpu(), target.counts().cpu()))
    hh = _GatherRows.apply(h, [n for n, _, _ in sizes], dd.rank, dd.world)
    idx = torch.cat([i for _, i, _ in sizes])
    counts = torch.cat([c for _, _, c in sizes])
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts, 0)
    return hh, Positives(idx, offsets, target.num_classes).to(h.device)


def shard_head(model, dd, k):
    """Keep this rank's contiguous rows of the (identically initialised) classifier."""
    from .distributed import shard_range

    lo, hi = shard_range(k, dd.rank, dd.world)
    head = model.head
    head.weight = nn.Parameter(head.weight.detach()[lo:hi].clone())
    head.bias = nn.Parameter(head.bias.detach()[lo:hi].clone())
    return lo, hi


def full_model(model, dd, k, args, d):
    """A single-process copy of a label-sharded model (its head all-gathered) for evaluation and checkpoints."""
    import torch.distributed as dist

    from .distributed import shard_range

    full = build_model(args.model, d, k, args.hidden, args.dropout).to(model.head.weight.device)
    state = {kk: v for kk, v in model.state_dict().items() if not kk.startswith("head.")}
    rows = max(hi - lo for lo, hi in (shard_range(k, r, dd.world) for r in range(dd.world)))
    for name in ("weight", "bias"):
        local = getattr(model.head, name).detach()
        pad = local.new_zeros((rows,) + local.shape[1:])
        pad[: local.shape[0]] = local
        parts = [torch.empty_like(pad) for _ in range(dd.world)]
        dist.all_gather(parts, pad)
        sizes = [hi - lo for lo, hi in (shard_range(k, r, dd.world) for r in range(dd.world))]
        state[f"head.{name}"] = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    full.load_state_dict(state)
    return full


# ----------------------------------------------------------------------------- training
def train_run(args, *, quiet=False):
    """Train one model; returns ``(test_metrics, history, model, decoder, config)``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs this: DDP over a
    ``DistributedSampler`` (or, with ``--shard-labels``, the classifier split
    by rows and the sharded fused loss on the gathered global batch). Rank 0
    logs and writes; the test metrics are all-reduced.
    """
    from tqdm.auto import tqdm

    from .data import collate
    from .decode import fit_decoder
    from .metrics import MultilabelEvaluator, average_precision

    dd = Dist(args)
    ok = False
    try:
        out = _train(args, dd, quiet or not dd.main, tqdm, collate, fit_decoder, MultilabelEvaluator,
                     average_precision)
        ok = True
        return out
    except RuntimeError as e:
        if not (dd.on and _collective_failure(e)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"rank {dd.rank}: a collective failed: a peer rank died or did not answer within "
                       f"--dist-timeout={dd.timeout}s ({first[:200]})") from e
    finally:
        dd.close(ok)


def _collective_failure(e: RuntimeError) -> bool:
    """A backend error of a collective (peer gone, timeout), as opposed to a bug in the step."""
    import torch.distributed as dist

    msg = str(e)
    return isinstance(e, dist.DistError) or any(
        s in msg for s in ("gloo", "Connection closed", "Connection reset", "imed out", "NCCL", "Broken pipe"))


def _rng_state(device) -> dict:
    """This rank's random state for an exact resume: the CPU generator's, and on CUDA the device's (dropout there)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state, device) -> None:
    """Restore :func:`_rng_state` (or a bare CPU state, as older checkpoints hold); ``torch.load`` may have mapped
    the states to the device, and generators take CPU byte tensors."""
    state = state if isinstance(state, dict) else {"cpu": state, "cuda": None}
    torch.set_rng_state(state["cpu"].cpu())
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _train(args, dd, quiet, tqdm, collate, fit_decoder, MultilabelEvaluator, average_precision):
    from torch.utils.data import DataLoader, DistributedSampler

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = dd.device
    fit, val, test = load_data(args)
    k, d = fit.num_classes, fit.num_features
    # extreme label spaces: evaluate from each row's top labels (XC metrics), never from [N, K] scores
    top_eval = args.eval == "top-k" or (args.eval == "auto" and k >= FUSED_MIN_CLASSES)
    sel = "ndcg_at_5" if top_eval else "average_precision"  # the validation metric that picks the epoch
    fused = args.fused or (args.model == "linear" and args.loss == "softmax" and k >= FUSED_MIN_CLASSES)
    if (fused or args.shard_labels) and args.loss != "softmax":
        raise CLIError(f"--fused and --shard-labels need --loss softmax, got --loss {args.loss}")
    if args.shard_labels and args.amp == "fp16":  # each rank would skip its overflowing steps alone
        raise CLIError("--amp fp16 with --shard-labels: the GradScaler's overflow check would not span the ranks, "
                       "whose classifier gradients differ; use --amp bf16")
    if args.shard_labels and not dd.on:
        raise CLIError("--shard-labels needs a torchrun launch of 2 or more processes (WORLD_SIZE > 1)")
    if args.shard_labels and k < dd.world:
        raise CLIError(f"--shard-labels needs at least one label per rank: {k} labels, {dd.world} ranks")
    mean, std = fit.feature_moments()
    std = std.clamp_min(1e-6)
    model = build_model(args.model, d, k, args.hidden, args.dropout, mean, std, fused=fused,
                        criterion=loss_fn(args.loss)).to(device)
    if args.shard_labels:
        shard_head(model, dd, k)
    torch.manual_seed(args.seed + dd.rank)  # dropout differs across ranks; the init above does not
    net = model.body if args.shard_labels else model
    if dd.on and any(p.requires_grad for p in net.parameters()):
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sampler = DistributedSampler(fit, num_replicas=dd.world, rank=dd.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(fit, batch_size=args.batch_size, sampler=sampler, collate_fn=lambda b: collate(b, k))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(1, args.epochs * len(loader)))
    # mixed precision: autocast's dtype; fp16 also scales the loss (a GradScaler: fp16's gradients would underflow)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    history = {"epoch": [], "train_loss": [], f"val_{sel}": []}
    best, start = (-math.inf, None, 0), 1
    # Resume state after every epoch: rank 0 writes last.pt (with every rank's RNG state); with the
    # classifier sharded, each rank writes its own rows and optimiser state to last.rank{r}.pt.
    per_rank = args.shard_labels and dd.on
    name = f"last.rank{dd.rank}.pt" if per_rank else "last.pt"
    last = os.path.join(args.out, name) if args.out and (per_rank or dd.main) else None
    if args.resume:
        path = os.path.join(args.resume, name)
        if not os.path.exists(path):
            raise CLIError(f"--resume {args.resume}: no {name} (was it written by {dd.world} ranks"
                           f"{', --shard-labels' if per_rank else ''}?)")
        ck = torch.load(path, map_location=device, weights_only=False)
        if ck["world"] != dd.world:
            raise CLIError(f"--resume {args.resume}: written by {ck['world']} ranks, now {dd.world}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        if ck.get("scaler"):  # empty (or absent, from an older version) unless that run scaled an fp16 loss
            scaler.load_state_dict(ck["scaler"])
        history, best, start = ck["history"], ck["best"], ck["epoch"] + 1
        if f"val_{sel}" not in history:
            raise CLIError(f"--resume {args.resume}: its epochs were picked by another validation metric "
                           f"({', '.join(k_ for k_ in history if k_.startswith('val_'))}); run with the same --eval")
        _set_rng_state(ck["rng"][dd.rank], device)

    def evaluator_model():
        return full_model(model, dd, k, args, d) if args.shard_labels else model

    def validate(net_):
        if not top_eval:
            return average_precision(predict_scores(net_, val, device), val.labels)
        ev = MultilabelEvaluator(ks=(5,), annotation_k=1)
        ev.update_top_k(top_labels(net_, val, device, 5), val.labels)
        return ev.compute()[sel]

    def step_loss(xb, tb):
        if not args.shard_labels:
            return net(xb, tb)
        from .distributed import sharded_linear_multilabel_softmax_loss

        hh, tt = gather_batch(net(xb), tb, dd)
        return sharded_linear_multilabel_softmax_loss(hh, model.head.weight, tt, bias=model.head.bias,
                                                      validate=False)

    bar = tqdm(range(start, args.epochs + 1), desc=f"train {args.loss}", disable=quiet, leave=False)
    for epoch in bar:
        model.train()
        sampler.set_epoch(epoch)
        # [sum of loss * rows, rows], on the model's device: no host sync a step, and NCCL all-reduces CUDA tensors only
        tot = torch.zeros(2, dtype=torch.float64, device=device)
        for xb, tb in loader:
            xb = xb.to(device)
            with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss = step_loss(xb, tb.to(device))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # without fp16: the loss itself, and step() is opt.step()
            scaler.step(opt)
            scaler.update()
            sched.step()
            tot[0] += loss.detach().double() * len(xb)
            tot[1] += len(xb)
        if not args.shard_labels:  # sharded: the loss is already the global batch's
            dd.all_reduce_(tot)
        # validation on every rank (the same scores everywhere: no communication)
        val_ap = validate(evaluator_model())
        history["epoch"].append(epoch)
        history["train_loss"].append(float(tot[0] / tot[1].clamp_min(1)))
        history[f"val_{sel}"].append(val_ap)
        bar.set_postfix({"loss": f"{history['train_loss'][-1]:.4f}", f"val_{sel}": f"{val_ap:.4f}"})
        if val_ap > best[0]:
            best = (val_ap, {kk: v.detach().clone() for kk, v in model.state_dict().items()}, epoch)
        rngs = dd.gather_object(_rng_state(device))  # every rank's dropout RNG, for an exact resume
        if last:
            os.makedirs(args.out, exist_ok=True)
            atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                         "scaler": scaler.state_dict(), "history": history, "best": best, "epoch": epoch, "rng": rngs,
                         "world": dd.world}, last)
    bar.close()
    if best[1] is not None:
        model.load_state_dict(best[1])
    final = evaluator_model()
    decoder = None if top_eval else fit_decoder(predict_scores(final, val, device), val.labels, rule=args.decode,
                                                metric="micro_f1")
    # test metrics: each rank scores its rows, the metric states are all-reduced; the extreme-classification
    # evaluation adds propensity-scored precision and nDCG, the labels' propensities from the training rows
    ips = None
    if top_eval:
        from .metrics import inverse_propensity

        ips = inverse_propensity(torch.bincount(fit.labels.indices, minlength=k), len(fit), *args.propensity)
    ev = MultilabelEvaluator(ks=(1, 3, 5), annotation_k=3, decoder=decoder, label_ap=not dd.on, inv_propensity=ips)
    mine = test.subset(np.arange(dd.rank, len(test), dd.world))
    if top_eval:  # the top-k metrics only: the full-ranking and set metrics need every score
        ev.update_top_k(top_labels(final, mine, device, 5), mine.labels)
    else:
        ev.update(predict_scores(final, mine, device), mine.labels)
    if dd.on:
        ev.sync()
    metrics = ev.compute()
    metrics["best_epoch"] = best[2]
    metrics[f"val_{sel}"] = best[0]
    config = {k_: v for k_, v in vars(args).items() if k_ not in ("func",)}
    config.update(num_features=d, num_classes=k, decoder=None if decoder is None else decoder.to_dict(),
                  n_fit=len(fit), n_val=len(val), n_test=len(test), fused=fused, world_size=dd.world,
                  eval="top-k" if top_eval else "full", selection=f"val_{sel}")
    return metrics, history, final, decoder, config


TABLE_KEYS = ("average_precision", "ranking_loss", "coverage", "one_error", "precision_at_1", "precision_at_3",
              "precision_at_5", "ndcg_at_3", "ndcg_at_5", "recall_at_5", "psp_at_1", "psp_at_3", "psp_at_5",
              "psndcg_at_3", "psndcg_at_5",
              "mean_average_precision", "micro_f1", "macro_f1", "hamming_loss")


def plot_runs(runs, path, title):
    """Training curves of ``runs`` (``(label, history)`` pairs) side by side: the training loss, and the validation
    metric that picked each run's epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    metrics = []
    for label, history in runs:
        key = next(k for k in history if k.startswith("val_"))
        metrics.append(key[4:].replace("_", " "))
        ax1.plot(history["epoch"], history["train_loss"], label=label)
        ax2.plot(history["epoch"], history[key], label=label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation " + " / ".join(dict.fromkeys(metrics)))
    if len(runs) > 1:
        ax2.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_train(args):
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    metrics, history, model, decoder, config = train_run(args)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 writes and reports
        return
    sel = config["selection"]  # val_average_precision, or val_ndcg_at_5 for the top-k evaluation
    test_metrics = {k: metrics[k] for k in metrics if k not in ("best_epoch", sel)}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"test": test_metrics, "best_epoch": metrics["best_epoch"], sel: metrics[sel],
                   "history": history}, f, indent=2)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    atomic_save({"model": model.state_dict(), "config": config}, os.path.join(args.out, "checkpoint.pt"))
    plot_runs([(args.loss, history)], os.path.join(args.out, "curve.png"),
              f"{args.loss} on {os.path.basename(str(args.data))}")
    print(f"\n{args.loss} loss, {args.model} model, data={args.data}: best epoch {metrics['best_epoch']} "
          f"({sel.replace('_', ' ')} {metrics[sel]:.4f}), {time.time() - t0:.1f}s")
    print(f"{'test metric':<28}{'value':>10}")
    for k in TABLE_KEYS + tuple(k for k in test_metrics if k.endswith("_at_3") and k.startswith(("per_", "overall", "n_plus"))):
        if k in test_metrics:
            print(f"{k:<28}{test_metrics[k]:>10.4f}")
    print(f"wrote {args.out}/metrics.json, config.json, checkpoint.pt, curve.png")


def cmd_compare(args):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError("compare runs in one process; use torchrun with `mlsoftmax train`")
    os.makedirs(args.out, exist_ok=True)
    losses = [l.strip() for l in args.losses.split(",") if l.strip()]
    for l in losses:
        loss_fn(l)  # fail fast on a bad name
    results = {}
    for l in losses:
        runs = []
        for s in range(args.seeds):
            a = argparse.Namespace(**vars(args))
            a.loss, a.seed, a.out = l, args.seed + s, None  # no per-epoch checkpoints
            m = train_run(a, quiet=True)[0]
            runs.append(m)
            shown = [(n, key) for n, key in (("AP", "average_precision"), ("RL", "ranking_loss"),
                                             ("P@1", "precision_at_1"), ("nDCG@5", "ndcg_at_5")) if key in m][:2]
            print(f"{l:<8} seed {a.seed}: " + "  ".join(f"{n} {m[key]:.4f}" for n, key in shown), flush=True)
        results[l] = runs
    keys = tuple(key for key in ("average_precision", "ranking_loss", "coverage", "one_error", "precision_at_1",
                                 "precision_at_5", "ndcg_at_5", "mean_average_precision", "micro_f1", "macro_f1")
                 if key in runs[0])[:8]
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
    for ax, key in zip(axes, keys[:2]):  # AP and ranking loss; one-error and P@1 for the top-k evaluation
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
    model = build_model(cfg["model"], d, k, cfg["hidden"], cfg["dropout"], fused=cfg.get("fused", False))
    model.load_state_dict(ck["model"])
    model.eval()
    if args.input.endswith(".npy"):
        x = torch.from_numpy(np.load(args.input).astype(np.float32))
    elif args.format or args.input.endswith((".arff", ".npz")):
        x = D.load_file(args.input, args.format, args.num_labels or k)  # a dataset: dense rows a batch at a time
    else:  # CSV of features only (a header row is skipped)
        rows = []
        with open(args.input) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = [float(t) for t in line.strip().split(",")]
                except ValueError:
                    if lineno == 1:
                        continue
                    raise CLIError(f"{args.input}:{lineno}: non-numeric value")
                if rows and len(row) != len(rows[0]):
                    raise CLIError(f"{args.input}:{lineno}: expected {len(rows[0])} values, got {len(row)}")
                rows.append(row)
        x = torch.tensor(rows, dtype=torch.float32)
    shape = tuple(x.features.shape) if isinstance(x, D.MultiLabelDataset) else tuple(x.shape)
    if len(shape) != 2 or shape[1] != d:
        raise CLIError(f"{args.input}: expected rows of {d} features, got shape {shape}")
    top = top_labels(model, x, "cpu", args.top_k)  # label chunks: no [N, K] scores
    for row in top.tolist():
        print(",".join(str(j) for j in row))


def cmd_plot(args):
    """One figure of several runs' training curves, from their ``metrics.json`` (and ``config.json`` for labels)."""
    runs = []
    for run in args.runs:
        path = os.path.join(run, "metrics.json") if os.path.isdir(run) else run
        if not os.path.exists(path):
            raise CLIError(f"no metrics.json at {path}")
        with open(path) as f:
            history = json.load(f).get("history")
        if not history or not history.get("epoch"):
            raise CLIError(f"{path}: no training history")
        cfg_path = os.path.join(os.path.dirname(path), "config.json")
        label = os.path.basename(os.path.dirname(os.path.abspath(path)))
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
            label += f" ({cfg.get('loss')}, {cfg.get('model')})"
        runs.append((label, history))
    plot_runs(runs, args.out, args.title or f"{len(runs)} run{'s' if len(runs) > 1 else ''}")
    print(f"wrote {args.out}")


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
    p.add_argument("--eval", default="auto", choices=("auto", "full", "top-k"),
                   help="full: every metric, from [N, K] scores; top-k: P@k, nDCG@k, recall@k, one-error and the "
                        "annotation scores from each row's top 5 labels (scored in label chunks), the epoch picked "
                        f"by validation nDCG@5; auto: top-k from {FUSED_MIN_CLASSES} labels")
    p.add_argument("--propensity", nargs=2, type=float, default=(0.55, 1.5), metavar=("A", "B"),
                   help="the top-k evaluation's propensity-scored metrics (PSP@k, PSnDCG@k): Jain et al.'s A and B "
                        "(0.55 1.5; 0.5 0.4 for Wikipedia data, 0.6 2.6 for Amazon), propensities from the training "
                        "labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=("bf16", "fp16"),
                   help="mixed precision: the training forward under bf16 (the default) or fp16 autocast, the "
                        "weights staying fp32; fp16 scales the loss with a GradScaler (GPUs without bf16)")
    p.add_argument("--fused", action="store_true",
                   help=f"fused linear + loss head (no [b, K] logits); automatic for --model linear "
                        f"from {FUSED_MIN_CLASSES} labels")
    p.add_argument("--shard-labels", action="store_true",
                   help="under torchrun: split the classifier's rows over the ranks (sharded fused loss)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue from DIR's last per-epoch checkpoint")
    p.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds before a collective with a dead or stuck rank fails (torchrun runs)")


def make_parser():
    p = argparse.ArgumentParser(prog="mlsoftmax", description="Multi-label softmax: train, compare, predict, plot.")
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
    g = sub.add_parser("plot", help="the training curves of several runs in one figure")
    g.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or their metrics.json files)")
    g.add_argument("--out", default="curves.png", help="the image to write")
    g.add_argument("--title", default=None)
    g.set_defaults(func=cmd_plot)
    return p


# the numeric options' ranges: (name, test, what it must be); a command without the option skips it
RANGES = (
    ("epochs", lambda v: v >= 1, ">= 1"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("hidden", lambda v: v >= 1, ">= 1"),
    ("seeds", lambda v: v >= 1, ">= 1"),
    ("top_k", lambda v: v >= 1, ">= 1"),
    ("num_labels", lambda v: v is None or v >= 1, ">= 1"),
    ("lr", lambda v: v > 0, "> 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("val_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
    ("dist_timeout", lambda v: v > 0, "> 0"),
)


def main(argv=None):
    from .data import DataFormatError

    args = make_parser().parse_args(argv)
    try:
        if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
            raise CLIError("--device cuda given but no CUDA device is available")
        for name, ok, what in RANGES:
            if hasattr(args, name) and not ok(getattr(args, name)):
                raise CLIError(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
        args.func(args)
    except (CLIError, DataFormatError, FileNotFoundError) as e:
        print(f"mlsoftmax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
