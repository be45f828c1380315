"""Yeast loading and split, the file readers (on files the tests write), and synthetic data."""

import gzip

import numpy as np
import pytest
import torch

from mlsoftmax import Positives
from mlsoftmax import data as D


def test_yeast_shapes_and_standard_split():
    x_tr, y_tr = D.load_yeast("train")
    x_te, y_te = D.load_yeast("test")
    x_all, y_all = D.load_yeast("all")
    assert x_tr.shape == (1500, 103) and y_tr.shape == (1500, 14)
    assert x_te.shape == (917, 103) and y_te.shape == (917, 14)
    assert x_tr.dtype == torch.float32 and set(y_tr.unique().tolist()) == {0.0, 1.0}
    # train is the first 1500 rows of the packaged file, test the last 917
    assert torch.equal(torch.cat([x_tr, x_te]), x_all) and torch.equal(torch.cat([y_tr, y_te]), y_all)
    # the published values, as written in the file (first row of MULAN's yeast-train)
    with gzip.open(D._river_yeast_path(), "rt") as f:
        f.readline()
        first = np.array(f.readline().split(","), dtype=np.float64)
    np.testing.assert_allclose(x_tr[0].numpy(), first[:103].astype(np.float32))
    assert y_all.sum(1).mean().item() == pytest.approx(4.237, abs=1e-3)  # yeast's label cardinality
    assert (y_all.sum(1) > 0).all()


def test_yeast_validation_is_carved_from_train_only():
    x_tr, _ = D.load_yeast("train")
    x_fit, _ = D.load_yeast("fit", val_fraction=0.2, seed=3)
    x_val, _ = D.load_yeast("val", val_fraction=0.2, seed=3)
    x_te, _ = D.load_yeast("test")
    assert len(x_fit) == 1200 and len(x_val) == 300
    rows = lambda x: {tuple(r) for r in x.numpy().round(6).tolist()}
    assert rows(x_fit) | rows(x_val) == rows(x_tr)
    assert not rows(x_fit) & rows(x_val)
    assert not (rows(x_fit) | rows(x_val)) & rows(x_te)
    with pytest.raises(ValueError, match="Expected `split`"):
        D.load_yeast("dev")


def test_read_xc(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text("3 4 5\n0,3 0:1.5 2:-1\n 1:2.0\n4 3:0.25\n")
    ds = D.read_xc(p)
    assert len(ds) == 3 and ds.num_classes == 5 and ds.num_features == 4
    assert ds.sparse and ds.features.values().numel() == 4  # only the stored entries
    assert ds.features.to_dense().tolist() == [[1.5, 0, -1, 0], [0, 2.0, 0, 0], [0, 0, 0, 0.25]]
    assert ds.labels.to_dense().tolist() == [[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]


@pytest.mark.parametrize(
    "text,line,problem",
    [
        ("3 4\n", 1, "header 'N D K'"),
        ("1 4 5\n0,9 0:1\n", 2, "label out of range"),
        ("1 4 5\n0 0:x\n", 2, "bad feature"),
        ("1 4 5\n0 7:1\n", 2, "bad feature"),
        ("1 4 5\n0 -1:1\n", 2, "bad feature"),
        ("2 4 5\n0 0:1\n", None, "header says N=2 rows, found 1"),
    ],
)
def test_read_xc_errors_name_file_and_line(tmp_path, text, line, problem):
    p = tmp_path / "bad.txt"
    p.write_text(text)
    where = f"{p}:{line}" if line else f"{p}"
    with pytest.raises(D.DataFormatError, match=f"^{where}: .*{problem}"):
        D.read_xc(p)


ARFF_DENSE = """% a comment
@relation test
@attribute f1 numeric
@attribute 'f 2' numeric
@attribute l1 {0,1}
@attribute l2 {0,1}
@data
0.5,1.0,1,0
-1,2,1,1
3,0,0,0
"""

ARFF_SPARSE = """@relation test
@attribute f1 numeric
@attribute f2 numeric
@attribute l1 {0,1}
@attribute l2 {0,1}
@data
{0 0.5,1 1.0,2 1}
{0 -1,1 2,2 1,3 1}
{0 3}
"""


@pytest.mark.parametrize("text", [ARFF_DENSE, ARFF_SPARSE])
def test_read_arff_dense_and_sparse(tmp_path, text):
    p = tmp_path / "d.arff"
    p.write_text(text)
    ds = D.read_arff(p, num_labels=2)
    assert ds.features.tolist() == [[0.5, 1.0], [-1, 2], [3, 0]]
    assert ds.labels.to_dense().tolist() == [[1, 0], [1, 1], [0, 0]]


def test_read_arff_labels_first_and_errors(tmp_path):
    p = tmp_path / "meka.arff"
    p.write_text("@relation r\n@attribute l1 {0,1}\n@attribute f1 numeric\n@data\n1,0.5\n0,2\n")
    ds = D.read_arff(p, num_labels=1, labels_first=True)
    assert ds.features.tolist() == [[0.5], [2.0]] and ds.labels.to_dense().tolist() == [[1], [0]]
    p.write_text("@relation r\n@attribute f1 numeric\n@attribute l1 {0,1}\n@data\n1,0.5\n")
    with pytest.raises(D.DataFormatError, match=":5: label attributes must be 0 or 1"):
        D.read_arff(p, num_labels=1)
    p.write_text("@relation r\n@attribute f1 numeric\n@attribute l1 {0,1}\n@data\n1,0,7\n")
    with pytest.raises(D.DataFormatError, match=":5: bad data row"):
        D.read_arff(p, num_labels=1)
    for bad in ("-1", "2"):  # a sparse row's index out of range (NumPy would count -1 from the end)
        p.write_text(f"@relation r\n@attribute f1 numeric\n@attribute l1 {{0,1}}\n@data\n{{{bad} 1}}\n")
        with pytest.raises(D.DataFormatError, match=f":5: bad data row \\(attribute index {bad} out of range"):
            D.read_arff(p, num_labels=1)


def test_read_csv_and_npz(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b,y1,y2,y3\n1,2,0,1,1\n3,4,1,0,0\n")
    ds = D.read_csv(p, num_labels=3)
    assert ds.features.tolist() == [[1, 2], [3, 4]] and ds.labels.to_dense().tolist() == [[0, 1, 1], [1, 0, 0]]
    p.write_text("1,2,0,1,1\n3,4,1,0\n")
    with pytest.raises(D.DataFormatError, match=":2: expected 5 columns"):
        D.read_csv(p, num_labels=3)
    q = tmp_path / "d.npz"
    np.savez(q, X=np.ones((2, 3)), Y=np.array([[1, 0], [0, 1]]))
    assert D.read_npz(q).labels.to_dense().tolist() == [[1, 0], [0, 1]]
    np.savez(q, X=np.ones((2, 3)), indices=np.array([1, 0, 1]), offsets=np.array([0, 1, 3]), num_classes=2)
    assert D.load_file(q).labels.to_dense().tolist() == [[0, 1], [1, 1]]
    np.savez(q, X=np.ones((2, 3)))
    with pytest.raises(D.DataFormatError, match="expected 'Y'"):
        D.read_npz(q)
    for bad, match in (  # each a file that would otherwise read into wrong labels or fail later, in the loss
            (dict(Y=np.array([[1, -1], [-1, 1]])), "'Y' must hold 0 or 1 only"),  # a {-1, 1} encoding
            (dict(Y=np.ones((3, 2))), r"'Y' must be \[N, K\] with N = 2"),
            (dict(indices=np.array([1, 2]), offsets=np.array([0, 1, 2]), num_classes=2), r"indices in \[0, 2\)"),
            (dict(indices=np.array([1, 1]), offsets=np.array([0, 2, 2]), num_classes=2), "unique"),
            (dict(indices=np.array([1]), offsets=np.array([0, 1, 2]), num_classes=2), "end at nnz=1"),
            (dict(indices=np.array([1]), offsets=np.array([0, 1]), num_classes=2), "2 label rows, but got 1"),
            (dict(indices=np.array([0.5]), offsets=np.array([0, 1, 1]), num_classes=2), "integer tensor")):
        np.savez(q, X=np.ones((2, 3)), **bad)
        with pytest.raises(D.DataFormatError, match=match):
            D.read_npz(q)
    with pytest.raises(D.DataFormatError, match="no such file"):
        D.load_file(tmp_path / "missing.txt")


def test_sparse_features_give_the_dense_rows(rng):
    """A dataset with sparse CSR features (as read_xc gives) serves the same dense rows, subsets, batches and
    feature moments as one holding the dense matrix (NumPy's mean and unbiased std the oracle)."""
    x = rng.normal(size=(9, 7)) * (rng.random((9, 7)) < 0.3)
    x[4] = 0.0  # an empty row
    lab = Positives.from_lists([[i % 3] for i in range(9)], 3)
    sp = D.MultiLabelDataset(torch.from_numpy(x).to_sparse_csr(), lab)
    dn = D.MultiLabelDataset(torch.from_numpy(x), lab)
    assert sp.sparse and not dn.sparse
    for index in (slice(2, 6), slice(0, 9), [8, 4, 0, 4], torch.tensor([3]), slice(7, 1, -2)):
        np.testing.assert_array_equal(sp.rows(index).numpy(), x[index if not isinstance(index, torch.Tensor)
                                                                else index.numpy()].astype(np.float32))
        np.testing.assert_array_equal(dn.rows(index).numpy(), sp.rows(index).numpy())
    assert torch.equal(sp[4][0], torch.zeros(7)) and torch.equal(sp[1][1], dn[1][1])
    sub = sp.subset([7, 4, 1])
    assert sub.sparse and sub.labels.to_dense().tolist() == dn.subset([7, 4, 1]).labels.to_dense().tolist()
    np.testing.assert_array_equal(sub.features.to_dense().numpy(), x[[7, 4, 1]].astype(np.float32))
    mean, std = sp.feature_moments()
    np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(std.numpy(), x.std(0, ddof=1), rtol=1e-5, atol=1e-7)
    xb, _ = D.collate([sp[i] for i in range(3)], 3)
    np.testing.assert_array_equal(xb.numpy(), x[:3].astype(np.float32))
    with pytest.raises(ValueError, match="2-D dense or sparse CSR"):
        D.MultiLabelDataset(torch.from_numpy(x).to_sparse(), lab)


def test_dataset_collate_yields_positives():
    x = torch.arange(6.0).reshape(3, 2)
    ds = D.MultiLabelDataset(x, Positives.from_lists([[1], [], [0, 2]], 3))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=lambda b: D.collate(b, 3))
    xb, tb = next(iter(loader))
    assert isinstance(tb, Positives) and tb.num_classes == 3
    assert torch.equal(xb, x) and tb.to_dense().tolist() == [[0, 1, 0], [0, 0, 0], [1, 0, 1]]
    sub = ds.subset([2, 0])
    assert sub.labels.to_dense().tolist() == [[1, 0, 1], [0, 1, 0]]


def test_synthetic_power_law_and_label_count():
    ds = D.synthetic(n=4000, num_features=8, num_classes=200, labels_per_row=3.0, power=1.0, seed=1)
    counts = ds.labels.counts().double()
    assert counts.mean().item() == pytest.approx(3.0, abs=0.1)
    freq = torch.bincount(ds.labels.indices, minlength=200).double()
    # Zipf: label 0 about twice as frequent as label 1 and ten times label 9 (sampling without replacement flattens it a little)
    assert freq[0] > 1.5 * freq[1] > 0 and freq[0] > 5 * freq[9]
    rows = ds.labels.row_ids() * 200 + ds.labels.indices
    assert torch.unique(rows).numel() == rows.numel()  # distinct labels within a row
    assert D.synthetic(n=5, seed=2).features.shape == (5, 32)
