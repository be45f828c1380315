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


def test_compare_two_losses(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--losses", "softmax,bce", "--seeds", "2", "--epochs", "2", "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "| softmax |" in md and "| bce |" in md and "±" in md
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    res = json.loads((out / "compare.json").read_text())
    assert len(res["softmax"]) == 2


def test_train_on_a_user_file(tmp_path):
    from mlsoftmax.data import synthetic

    ds = synthetic(n=200, num_features=6, num_classes=9, seed=0)
    lines = ["200 6 9"]
    for i in range(200):
        labs = ",".join(str(j) for j in ds[i][1].tolist())
        feats = " ".join(f"{j}:{v:.4f}" for j, v in enumerate(ds.features[i].tolist()))
        lines.append(f"{labs} {feats}")
    p = tmp_path / "syn.txt"
    p.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--data", str(p), "--format", "xc", "--model", "linear", "--epochs", "2",
                 "--loss", "warp", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text())["n_test"] == 40 and "average_precision" in m["test"]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["train", "--data", "/nonexistent/file.txt"], "no such file"),
        (["train", "--epochs", "0"], "--epochs must be >= 1"),
        (["predict", "--checkpoint", "/nonexistent", "--input", "x.csv"], "no checkpoint"),
        (["compare", "--losses", "softmax,foo"], "unknown loss 'foo'"),
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
