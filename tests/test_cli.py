"""The CLI end to end on yeast with a small epoch budget."""

import json
import subprocess
import sys

import numpy as np
import pytest

from mlsoftmax import metrics as M
from mlsoftmax.cli import main
from mlsoftmax.data import load_yeast

METRIC_KEYS = [
    "average_precision", "ranking_loss", "coverage", "one_error", "precision_at_1", "precision_at_3", "ndcg_at_3",
    "per_class_precision_at_3", "per_class_recall_at_3", "overall_precision_at_3", "overall_recall_at_3",
    "n_plus_at_3", "mean_average_precision", "micro_f1", "macro_f1", "hamming_loss",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--epochs", "3", "--out", str(out)]) == 0
    return out


def test_train_writes_everything(trained, capsys):
    m = json.loads((trained / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(m["test"])
    assert 0.5 < m["test"]["average_precision"] <= 1.0
    assert len(m["history"]["train_loss"]) == 3
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["loss"] == "softmax" and cfg["num_classes"] == 14 and cfg["n_test"] == 917
    assert (trained / "checkpoint.pt").stat().st_size > 0
    assert (trained / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(trained.glob(".tmp-*"))  # the atomic write left no temporary


def test_predict_matches_checkpoint_scores(trained, tmp_path, capsys):
    import torch

    from mlsoftmax.cli import build_model

    x, _ = load_yeast("test")
    f = tmp_path / "x.csv"
    np.savetxt(f, x[:5].numpy(), delimiter=",")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(trained), "--input", str(f), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(len(l.split(",")) == 2 for l in lines)
    ck = torch.load(trained / "checkpoint.pt", weights_only=False)
    cfg = ck["config"]
    model = build_model(cfg["model"], 103, 14, cfg["hidden"], cfg["dropout"])
    model.load_state_dict(ck["model"])
    model.eval()
    with torch.no_grad():
        top = torch.topk(model(torch.from_numpy(np.loadtxt(f, delimiter=",")).float()), 2).indices
    assert [",".join(map(str, r)) for r in top.tolist()] == lines

    f.write_text("1,2,3\n4,5\n")  # a ragged CSV: one line, naming the row
    assert main(["predict", "--checkpoint", str(trained), "--input", str(f)]) == 2
    assert capsys.readouterr().err.strip() == f"mlsoftmax: error: {f}:2: expected 3 values, got 2"


def test_metrics_json_agrees_with_functional_metrics(trained):
    """Recompute test AP from the checkpoint, independently of the evaluator."""
    import torch

    from mlsoftmax.cli import build_model

    ck = torch.load(trained / "checkpoint.pt", weights_only=False)
    cfg = ck["config"]
    model = build_model(cfg["model"], 103, 14, cfg["hidden"], cfg["dropout"])
    model.load_state_dict(ck["model"])
    model.eval()
    x, y = load_yeast("test")
    with torch.no_grad():
        s = model(x)
    from sklearn.metrics import label_ranking_average_precision_score

    m = json.loads((trained / "metrics.json").read_text())["test"]
    assert m["average_precision"] == pytest.approx(label_ranking_average_precision_score(y.numpy(), s.numpy()), abs=1e-5)
    assert m["ranking_loss"] == pytest.approx(M.ranking_loss(s, y), abs=1e-6)


def test_plot_overlays_runs(trained, tmp_path, monkeypatch, capsys):
    """plot draws each run's training loss and validation metric from its metrics.json, one line a run."""
    import matplotlib.pyplot as plt

    other = tmp_path / "bce"
    assert main(["train", "--loss", "bce", "--epochs", "2", "--out", str(other)]) == 0
    drawn = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, path, **kw):
        drawn["lines"] = [[(ln.get_label(), list(ln.get_ydata())) for ln in ax.get_lines()] for ax in fig.axes]
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    out = tmp_path / "curves.png"
    assert main(["plot", str(trained), str(other / "metrics.json"), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and f"wrote {out}" in capsys.readouterr().out
    hist = [json.loads((d / "metrics.json").read_text())["history"] for d in (trained, other)]
    loss_lines, val_lines = drawn["lines"]
    assert [ln[0] for ln in loss_lines] == [f"{trained.name} (softmax, mlp)", "bce (bce, mlp)"]
    assert [ln[1] for ln in loss_lines] == [h["train_loss"] for h in hist]
    assert [ln[1] for ln in val_lines] == [h["val_average_precision"] for h in hist]
    assert main(["plot", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_compare_two_losses(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--losses", "softmax,bce", "--seeds", "2", "--epochs", "2", "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "| softmax |" in md and "| bce |" in md and "±" in md
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    res = json.loads((out / "compare.json").read_text())
    assert len(res["softmax"]) == 2


def _write_xc(path, n, num_features, num_classes):
    """A synthetic data set as an XC-format text file (header, then ``labels feat:value ...`` lines)."""
    from mlsoftmax.data import synthetic

    ds = synthetic(n=n, num_features=num_features, num_classes=num_classes, seed=0)
    lines = [f"{n} {num_features} {num_classes}"]
    for i in range(n):
        labs = ",".join(str(j) for j in ds[i][1].tolist())
        feats = " ".join(f"{j}:{v:.4f}" for j, v in enumerate(ds.features[i].tolist()))
        lines.append(f"{labs} {feats}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_on_a_user_file(tmp_path):
    p = _write_xc(tmp_path / "syn.txt", 200, 6, 9)
    out = tmp_path / "run"
    assert main(["train", "--data", str(p), "--format", "xc", "--model", "linear", "--epochs", "2",
                 "--loss", "warp", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text())["n_test"] == 40 and "average_precision" in m["test"]


def test_predict_reads_a_sparse_xc_file(tmp_path, capsys):
    """predict on an XC file (sparse features, dense rows a batch at a time) prints the top labels of the
    checkpoint's scores on the dense features."""
    import torch

    from mlsoftmax.cli import build_model
    from mlsoftmax.data import read_xc

    p = _write_xc(tmp_path / "syn.txt", 120, 6, 9)
    out = tmp_path / "run"
    assert main(["train", "--data", str(p), "--model", "linear", "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out), "--input", str(p), "--format", "xc", "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    model = build_model("linear", 6, 9, ck["config"]["hidden"], ck["config"]["dropout"])
    model.load_state_dict(ck["model"])
    model.eval()
    with torch.no_grad():
        top = torch.topk(model(read_xc(p).features.to_dense()), 3).indices
    assert lines == [",".join(map(str, r)) for r in top.tolist()]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["train", "--data", "/nonexistent/file.txt"], "no such file"),
        (["train", "--epochs", "0"], "--epochs must be >= 1"),
        (["predict", "--checkpoint", "/nonexistent", "--input", "x.csv"], "no checkpoint"),
        (["compare", "--losses", "softmax,foo"], "unknown loss 'foo'"),
        (["train", "--data", "data.csv"], "data.csv: the csv format needs the number of labels (num_labels, --num"),
        (["train", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["train", "--lr", "-1"], "--lr must be > 0, got -1.0"),
        (["train", "--val-fraction", "1.5"], "--val-fraction must be in (0, 1), got 1.5"),
        (["train", "--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
        (["train", "--hidden", "0"], "--hidden must be >= 1, got 0"),
        (["train", "--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
        (["train", "--num-labels", "0"], "--num-labels must be >= 1, got 0"),
        (["compare", "--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["predict", "--checkpoint", "x", "--input", "x.csv", "--top-k", "0"], "--top-k must be >= 1, got 0"),
        (["train", "--shard-labels", "--epochs", "1"], "--shard-labels needs a torchrun launch"),
        (["train", "--shard-labels", "--amp", "fp16"], "--amp fp16 with --shard-labels: the GradScaler's"),
        (["train", "--data", "d.txt", "--format", "arff"], "d.txt: the arff format needs the number of labels"),
    ],
)
def test_bad_arguments_give_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err and err.startswith("mlsoftmax: error:")


def test_bad_file_gives_one_line(tmp_path, capsys):
    p = tmp_path / "bad.txt"
    p.write_text("3 4\n")
    assert main(["train", "--data", str(p), "--format", "xc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mlsoftmax: error: {p}:1: expected a header 'N D K', got '3 4'"


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "mlsoftmax", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "compare" in r.stdout


# ----------------------------------------------------------------------------- fused, resume, distributed
def _weights(path):
    import torch

    return torch.load(path, weights_only=False)["model"]


def _assert_same_weights(a, b, atol):
    import torch

    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_fused_head_trains_like_plain_linear(tmp_path):
    """--fused (no [b, K] logits) starts from the same init and follows the same training path."""
    common = ["train", "--model", "linear", "--epochs", "2"]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert main(common + ["--fused", "--out", str(tmp_path / "fused")]) == 0
    _assert_same_weights(_weights(tmp_path / "plain" / "last.pt"), _weights(tmp_path / "fused" / "last.pt"), atol=1e-4)
    cfg = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert cfg["fused"] is True
    f = tmp_path / "x.csv"
    np.savetxt(f, load_yeast("test")[0][:3].numpy(), delimiter=",")
    assert main(["predict", "--checkpoint", str(tmp_path / "fused"), "--input", str(f), "--top-k", "2"]) == 0


def test_amp_trains_in_bf16_and_the_fused_head_follows_the_plain_one(tmp_path):
    """--amp: the forward runs under bf16 autocast (the run departs from the fp32 one), the weights stay fp32, and
    the fused head follows the plain linear head under autocast (PyTorch's own F.linear in bf16, then the loss)."""
    import torch

    common = ["train", "--model", "linear", "--epochs", "2"]
    for name, extra in (("fp32", []), ("plain", ["--amp"]), ("fused", ["--amp", "--fused"])):
        assert main(common + extra + ["--out", str(tmp_path / name)]) == 0
    fp32, plain, fused = (_weights(tmp_path / n / "last.pt") for n in ("fp32", "plain", "fused"))
    assert all(v.dtype == torch.float32 for m in (plain, fused) for v in m.values())
    assert not torch.equal(plain["head.weight"], fp32["head.weight"])
    _assert_same_weights(plain, fused, atol=1e-4)
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["amp"] == "bf16"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_amp_fp16_scales_the_loss_and_resumes_exactly(device, tmp_path, monkeypatch):
    """--amp fp16: fp16 autocast with a GradScaler (the run departs from the fp32 one; the weights stay fp32; the
    scaler counts its steps). Its state goes into last.pt: resuming from the first epoch's checkpoint reaches the
    uninterrupted run's weights and scaler state exactly (a fresh scaler would restart its growth count). The fused
    head follows the plain one. (On CUDA the weights agree to 1e-5: cuBLAS need not repeat its rounding.)"""
    import shutil

    import torch

    import mlsoftmax.cli as C

    save = C.atomic_save

    def keep_first(obj, path):  # keep a copy of the first epoch's last.pt, as if the run had been killed there
        save(obj, path)
        if str(path).endswith("last.pt") and obj.get("epoch") == 1:
            (tmp_path / "part").mkdir()
            shutil.copy(path, tmp_path / "part" / "last.pt")

    data = _write_xc(tmp_path / "data.txt", 600, 16, 14)  # the test's own file (a GPU machine may lack river)
    common = ["train", "--data", str(data), "--format", "xc", "--model", "linear", "--epochs", "3", "--device", device]
    assert main(common + ["--out", str(tmp_path / "fp32")]) == 0
    monkeypatch.setattr(C, "atomic_save", keep_first)
    assert main(common + ["--amp", "fp16", "--out", str(tmp_path / "full")]) == 0
    monkeypatch.setattr(C, "atomic_save", save)
    assert main(common + ["--amp", "fp16", "--out", str(tmp_path / "part"), "--resume", str(tmp_path / "part")]) == 0
    full, part = (torch.load(tmp_path / n / "last.pt", weights_only=False) for n in ("full", "part"))
    assert all(v.dtype == torch.float32 for v in full["model"].values())
    assert not torch.equal(full["model"]["head.weight"], _weights(tmp_path / "fp32" / "last.pt")["head.weight"])
    assert full["scaler"]["_growth_tracker"] > 0 and full["scaler"] == part["scaler"]
    _assert_same_weights(full["model"], part["model"], atol=0 if device == "cpu" else 1e-5)
    assert json.loads((tmp_path / "full" / "config.json").read_text())["amp"] == "fp16"
    # the fused head follows the plain one under fp16 autocast and the scaler too
    assert main(common + ["--amp", "fp16", "--fused", "--out", str(tmp_path / "fused")]) == 0
    _assert_same_weights(full["model"], _weights(tmp_path / "fused" / "last.pt"), atol=1e-4)


def test_top_k_evaluation_for_extreme_label_spaces(tmp_path, monkeypatch, capsys):
    """From FUSED_MIN_CLASSES labels (here lowered to yeast's 14) --model linear trains the fused head and
    evaluates from each row's top labels, scored in label chunks: its test metrics equal the functional ones (and
    scikit-learn's nDCG) on the checkpoint's full scores; the epoch is picked by validation nDCG@5."""
    import torch
    from sklearn.metrics import ndcg_score

    import mlsoftmax.cli as C

    monkeypatch.setattr(C, "FUSED_MIN_CLASSES", 10)
    out = tmp_path / "xc"
    assert main(["train", "--model", "linear", "--epochs", "2", "--out", str(out)]) == 0
    assert "ndcg at 5" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fused"] is True and cfg["eval"] == "top-k" and cfg["decoder"] is None
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["history"]["val_ndcg_at_5"]) == 2 and m["val_ndcg_at_5"] == max(m["history"]["val_ndcg_at_5"])
    test = m["test"]
    assert "average_precision" not in test and "micro_f1" not in test
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    model = C.build_model("linear", 103, 14, cfg["hidden"], cfg["dropout"], fused=True)
    model.load_state_dict(ck["model"])
    model.eval()
    x, y = load_yeast("test")
    with torch.no_grad():
        s = model(x)  # [N, K] full scores
    for k in (1, 3, 5):
        assert test[f"precision_at_{k}"] == pytest.approx(M.precision_at_k(s, y, k), abs=1e-12)
        assert test[f"recall_at_{k}"] == pytest.approx(M.recall_at_k(s, y, k), abs=1e-12)
        keep = y.sum(1) > 0
        assert test[f"ndcg_at_{k}"] == pytest.approx(ndcg_score(y[keep].numpy(), s[keep].numpy(), k=k), abs=1e-9)
    assert test["one_error"] == pytest.approx(M.one_error(s, y), abs=1e-12)
    ann = M.annotation_scores(s, y, 3)
    assert all(test[f"{key}_at_3"] == pytest.approx(v, abs=1e-12) for key, v in ann.items())
    # propensity-scored precision, the propensities from the fit split's labels (A, B = 0.55, 1.5)
    _, y_fit = load_yeast("fit")
    ips = M.inverse_propensity(y_fit.sum(0).long(), len(y_fit))
    for k in (1, 3, 5):
        assert test[f"psp_at_{k}"] == pytest.approx(M.psp_at_k(s, y, ips, k), abs=1e-12)
        assert test[f"psndcg_at_{k}"] == pytest.approx(M.psndcg_at_k(s, y, ips, k), abs=1e-12)
    # --eval full on the same run: every metric again
    assert main(["train", "--model", "linear", "--epochs", "1", "--eval", "full", "--out", str(tmp_path / "f")]) == 0
    assert "average_precision" in json.loads((tmp_path / "f" / "metrics.json").read_text())["test"]
    # a resume under the other evaluation is refused: its epochs were picked by another metric
    capsys.readouterr()
    assert main(["train", "--model", "linear", "--epochs", "3", "--eval", "full", "--resume", str(out),
                 "--out", str(out)]) == 2
    assert "picked by another validation metric (val_ndcg_at_5); run with the same --eval" in capsys.readouterr().err


def test_fused_needs_softmax_loss(tmp_path, capsys):
    assert main(["train", "--fused", "--loss", "bce", "--epochs", "1", "--out", str(tmp_path)]) == 2
    assert "--fused and --shard-labels need --loss softmax" in capsys.readouterr().err


def _cli(*args):
    return [sys.executable, "-m", "mlsoftmax", *args]


def _run_ok(cmd):
    """Run ``cmd``; on a non-zero exit, fail with what it printed."""
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resume_after_kill_matches_uninterrupted_run(device, tmp_path):
    """Kill a run (SIGKILL) after its first epoch; --resume reaches the uninterrupted run's weights. (On CUDA the
    dropout masks come from the device's generator, which the checkpoint carries too.)"""
    import time

    import torch

    # a data file of the test's own (the default data set, yeast, comes from river, which a GPU machine may lack)
    data = _write_xc(tmp_path / "data.txt", 2400, 64, 14)
    args = ["train", "--data", str(data), "--format", "xc", "--epochs", "12", "--hidden", "512", "--seed", "3",
            "--device", device]
    _run_ok(_cli(*args, "--out", str(tmp_path / "full")))
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, deadline = out / "last.pt", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=False)["epoch"] >= 1:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.kill()
    proc.wait()
    done = torch.load(last, weights_only=False)["epoch"]
    assert 1 <= done < 12
    _run_ok(_cli(*args, "--out", str(out), "--resume", str(out)))
    exact = device == "cpu"  # cuBLAS need not repeat its rounding bit for bit; other dropout masks would be far off
    _assert_same_weights(_weights(tmp_path / "full" / "checkpoint.pt"), _weights(out / "checkpoint.pt"),
                         atol=0 if exact else 1e-5)
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((out / "metrics.json").read_text())
    if exact:
        assert resumed["history"] == full["history"] and resumed["test"] == full["test"]
    else:
        assert resumed["history"]["train_loss"] == pytest.approx(full["history"]["train_loss"], rel=1e-5)


def _child_failure(stderr: str) -> str:
    """What a failed torchrun says: the ranks' own error lines (a C++ abort prints ``terminate called``
    and ``what():`` far above torchrun's summary), then the summary's tail."""
    keys = ("Error", "error", "terminate called", "what():", "Traceback", "Signal", "Killed")
    lines = [ln for ln in stderr.splitlines() if any(k in ln for k in keys)]
    return "\n".join(lines[:60]) + "\n...\n" + stderr[-1500:]


def _torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "mlsoftmax",
            *args]


@pytest.mark.parametrize("shard", [False, True])
def test_two_process_gloo_training_matches_single_process(tmp_path, shard):
    """2 ranks x batch 32 (DDP; or an MLP whose classifier is sharded by rows) == 1 process x batch 64. The
    sharded run evaluates as an extreme label space would (--eval top-k): the ranks' top-k states all-reduce to the
    single process's metrics."""
    import torch

    model = ["--model", "mlp", "--hidden", "32", "--dropout", "0", "--eval", "top-k"] if shard else ["--model",
                                                                                                     "linear"]
    common = ["train", *model, "--epochs", "2", "--lr", "1e-2"]
    assert main(common + ["--batch-size", "64", "--out", str(tmp_path / "one")]) == 0
    extra = ["--shard-labels"] if shard else []
    r = subprocess.run(_torchrun(2, *common, "--batch-size", "32", *extra, "--out", str(tmp_path / "two")),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, _child_failure(r.stderr)
    one = _weights(tmp_path / "one" / "last.pt")
    if shard:  # each rank's file holds its rows of the classifier: concatenate them
        parts = [_weights(tmp_path / "two" / f"last.rank{i}.pt") for i in range(2)]
        two = dict(parts[0])
        for k in ("head.weight", "head.bias"):
            two[k] = torch.cat([p[k] for p in parts])
            assert parts[0][k].shape[0] == 7 and parts[1][k].shape[0] == 7
    else:
        two = _weights(tmp_path / "two" / "last.pt")  # DDP: rank 0 writes the one resume file
        assert not (tmp_path / "two" / "last.rank1.pt").exists()
    _assert_same_weights(one, two, atol=1e-5)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    keys = (["precision_at_1", "ndcg_at_5", "recall_at_3", "one_error", "per_class_recall_at_3", "psp_at_5"] if shard
            else ["average_precision", "ranking_loss"])
    assert set(keys) <= set(m2["test"])
    for key in keys:
        assert m2["test"][key] == pytest.approx(m1["test"][key], abs=1e-4), key
    assert "mean_average_precision" not in m2["test"]  # label AP needs every score: not all-reducible


def test_dead_rank_fails_the_others_with_a_clear_error(tmp_path):
    """SIGKILL rank 1 mid-training: rank 0 exits with a one-line error, not a hang."""
    import os
    import socket
    import time

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            _cli("train", "--epochs", "200", "--dist-timeout", "30", "--out", str(tmp_path)),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    last, deadline = tmp_path / "last.pt", time.time() + 120
    while time.time() < deadline and not last.exists():
        time.sleep(0.05)
    assert last.exists()
    procs[1].kill()
    t0 = time.time()
    err = procs[0].communicate(timeout=120)[1]
    assert procs[0].returncode == 2
    assert time.time() - t0 < 60
    assert "mlsoftmax: error: rank 0: a collective failed" in err
    procs[1].wait()
    ck = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ck["epoch"] >= 1 and len(ck["rng"]) == 2  # every rank's RNG state, saved by rank 0


def test_two_process_resume_restores_every_rank(tmp_path):
    """DDP with dropout (per-rank RNG): resuming from an intermediate last.pt reaches the uninterrupted weights."""
    import shutil
    import time

    import torch

    args = ["train", "--model", "mlp", "--hidden", "256", "--dropout", "0.5", "--epochs", "8", "--seed", "5"]
    full, part = tmp_path / "full", tmp_path / "part"
    proc = subprocess.Popen(_torchrun(2, *args, "--out", str(full)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    last, deadline, copied = full / "last.pt", time.time() + 240, None
    while time.time() < deadline and proc.poll() is None and copied is None:
        if last.exists():
            ck = torch.load(last, weights_only=False)  # written atomically: always a whole file
            if 1 <= ck["epoch"] < 8:
                part.mkdir()
                torch.save(ck, part / "last.pt")
                copied = ck["epoch"]
        time.sleep(0.005)
    err = proc.communicate(timeout=240)[1]
    assert proc.returncode == 0, _child_failure(err)
    assert copied is not None, "no intermediate checkpoint was seen"
    r = subprocess.run(_torchrun(2, *args, "--out", str(part), "--resume", str(part)), capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, _child_failure(r.stderr)
    _assert_same_weights(_weights(full / "last.pt"), _weights(part / "last.pt"), atol=0)
    assert json.loads((part / "metrics.json").read_text())["history"] == \
        json.loads((full / "metrics.json").read_text())["history"]
    shutil.rmtree(tmp_path)
