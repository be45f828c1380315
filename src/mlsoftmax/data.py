"""Multi-label data: the yeast benchmark, file readers, and synthetic data.

Every reader returns a :class:`MultiLabelDataset`: dense float32 features
``[N, D]`` and CSR labels (a :class:`~mlsoftmax.Positives`), never a dense
``[N, K]`` label matrix. :func:`collate` batches rows into
``(features [b, D], Positives)``.

Bad files raise :class:`DataFormatError` naming the file, the line and the problem.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import warnings
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .targets import Positives, csr_gather

__all__ = [
    "DataFormatError",
    "MultiLabelDataset",
    "collate",
    "load_yeast",
    "read_xc",
    "read_arff",
    "read_csv",
    "read_npz",
    "load_file",
    "guess_format",
    "dataset_from_dense",
    "synthetic",
]

YEAST_TRAIN_ROWS = 1500  # MULAN yeast-train.arff; the packaged file is train then test
YEAST_TEST_ROWS = 917


class DataFormatError(ValueError):
    """A data file could not be read; the message names the file, line and problem."""

    def __init__(self, path, line: Optional[int], problem: str):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")


class MultiLabelDataset(Dataset):
    """Features ``[N, D]`` and per-row positive label lists (CSR).

    The features are a dense tensor, or a sparse CSR one (``torch.sparse_csr``,
    as :func:`read_xc` gives: extreme-classification data has bag-of-words
    features with D in the 10^5-10^6 range, too large to hold dense). Either
    way :meth:`rows` and indexing give dense float32 rows, one batch at a time.

    Args:
        features: ``[N, D]`` float tensor, dense or sparse CSR.
        labels: :class:`~mlsoftmax.Positives` with ``N`` rows and ``num_classes`` set.
    """

    def __init__(self, features: Tensor, labels: Positives):
        if labels.num_classes is None:
            raise ValueError("Expected `labels.num_classes` to be set, but got None")
        if features.layout not in (torch.strided, torch.sparse_csr) or features.dim() != 2:
            raise ValueError(f"Expected `features` to be a 2-D dense or sparse CSR tensor, but got a "
                             f"{features.dim()}-D {features.layout} tensor")
        if features.shape[0] != labels.batch_size:
            raise ValueError(f"Expected {features.shape[0]} label rows, but got {labels.batch_size}")
        self.features = features.float() if features.layout == torch.strided else _csr_float(features)
        self.labels = labels

    @property
    def sparse(self) -> bool:
        """Whether the features are stored as sparse CSR."""
        return self.features.layout == torch.sparse_csr

    def rows(self, index) -> Tensor:
        """Dense float32 features ``[n, D]`` of the rows ``index`` (a slice, or a sequence or tensor of row ids)."""
        if not self.sparse and isinstance(index, slice) and (index.step or 1) > 0:
            return self.features[index]  # a view
        ids = torch.as_tensor(range(len(self))[index] if isinstance(index, slice) else index, dtype=torch.long)
        if not self.sparse:
            return self.features[ids]
        pos, counts = csr_gather(self.features.crow_indices(), ids)
        local = torch.repeat_interleave(torch.arange(ids.numel()), counts, output_size=pos.numel())
        out = torch.zeros(ids.numel(), self.num_features)
        out[local, self.features.col_indices()[pos]] = self.features.values()[pos]
        return out

    def feature_moments(self) -> tuple[Tensor, Tensor]:
        """Per-feature mean and standard deviation ``([D], [D])`` over the rows (unbiased, as ``Tensor.std``),
        computed from the stored entries when the features are sparse."""
        if not self.sparse:
            return self.features.mean(0), self.features.std(0)
        n, col, val = len(self), self.features.col_indices(), self.features.values().double()
        total = torch.zeros(self.num_features, dtype=torch.float64).index_add_(0, col, val)
        sq = torch.zeros(self.num_features, dtype=torch.float64).index_add_(0, col, val * val)
        mean = total / max(n, 1)
        var = (sq - n * mean * mean).clamp_min(0) / (n - 1) if n > 1 else torch.full_like(mean, float("nan"))
        return mean.float(), var.sqrt().float()

    @property
    def num_classes(self) -> int:
        return int(self.labels.num_classes)

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __getitem__(self, i: int):
        x = self.rows([i])[0] if self.sparse else self.features[i]
        return x, self.labels[i]

    def subset(self, rows) -> "MultiLabelDataset":
        """The rows ``rows`` (an index sequence) as a new dataset (sparse features stay sparse)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if self.sparse:
            pos, counts = csr_gather(self.features.crow_indices(), rows)
            new_crow = torch.zeros(rows.numel() + 1, dtype=torch.long)
            new_crow[1:] = torch.cumsum(counts, 0)
            x = _csr(new_crow, self.features.col_indices()[pos], self.features.values()[pos],
                     (rows.numel(), self.num_features))
        else:
            x = self.features[rows]
        return MultiLabelDataset(x, self.labels[rows])

    def dense_labels(self) -> Tensor:
        """``[N, K]`` float multi-hot (for small K: metrics, sklearn)."""
        return self.labels.to_dense()


def _csr(crow: Tensor, col: Tensor, val: Tensor, size) -> Tensor:
    """A sparse CSR tensor with int64 indices and float32 values, its invariants checked (without PyTorch's
    beta-feature warning; the context, not ``check_invariants=True``, because torch 2.11 warns that the checks are
    "implicitly disabled" on the latter)."""
    with warnings.catch_warnings(), torch.sparse.check_sparse_tensor_invariants(True):
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow.long(), col.long(), val.float(), size=tuple(size))


def _csr_float(x: Tensor) -> Tensor:
    return _csr(x.crow_indices(), x.col_indices(), x.values(), x.shape)


def collate(batch, num_classes: Optional[int] = None):
    """Collate ``(x, label_indices)`` pairs into ``(features [b, D], Positives)``."""
    xs, labs = zip(*batch)
    offsets = torch.zeros(len(labs) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor([len(l) for l in labs]), 0)
    idx = torch.cat(labs) if labs else torch.zeros(0, dtype=torch.long)
    return torch.stack(xs), Positives(idx, offsets, num_classes)


# --------------------------------------------------------------------------- yeast
def _river_yeast_path() -> str:
    spec = importlib.util.find_spec("river")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The yeast data ships with the `river` package: pip install river")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "yeast.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Expected river's yeast data at {path}, but it is missing")
    return path


def _yeast_arrays():
    path = _river_yeast_path()
    with gzip.open(path, "rt") as f:
        header = f.readline().strip().split(",")
        data = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if data.shape != (YEAST_TRAIN_ROWS + YEAST_TEST_ROWS, 117) or header[103] != "Class1":
        raise DataFormatError(path, None, f"expected 2417 rows of 103 features + 14 labels, got {data.shape}")
    return data[:, :103].astype(np.float32), data[:, 103:] > 0.5


def load_yeast(split: str = "train", *, val_fraction: float = 0.2, seed: int = 0):
    """The yeast gene-function dataset (Elisseeff & Weston 2002): 2417 genes, 103 features, 14 labels.

    Read from the ``river`` package's installed ``yeast.csv.gz`` (the MULAN
    ``yeast.arff``, OpenML 40597) without network and without importing river.
    MULAN's full file is its ``yeast-train.arff`` (1500 rows) followed by
    ``yeast-test.arff`` (917 rows), so the standard split takes the first 1500
    rows as train and the last 917 as test. (Checked here by the row counts, the
    label cardinalities of both parts, and an ML-kNN run on the split; the two
    MULAN files themselves were not available offline to compare row by row.)

    Args:
        split: ``"train"`` (1500), ``"test"`` (917), ``"all"`` (2417), or
            ``"fit"`` / ``"val"``: a seeded random partition of the train split
            only (``val_fraction`` of it for validation), for tuning without
            touching the test rows.
        val_fraction: fraction of train held out as ``"val"``.
        seed: seed of the fit/val partition.

    Returns:
        ``(X, Y)``: float32 ``[N, 103]`` features as published, float32 ``[N, 14]`` multi-hot.

    Example:
        >>> X, Y = load_yeast("test")
        >>> tuple(X.shape), tuple(Y.shape)
        ((917, 103), (917, 14))
    """
    if split not in ("train", "test", "all", "fit", "val"):
        raise ValueError(f"Expected `split` to be one of ('train', 'test', 'all', 'fit', 'val'), but got {split!r}")
    x, y = _yeast_arrays()
    if split == "test":
        x, y = x[YEAST_TRAIN_ROWS:], y[YEAST_TRAIN_ROWS:]
    elif split != "all":
        x, y = x[:YEAST_TRAIN_ROWS], y[:YEAST_TRAIN_ROWS]
        if split in ("fit", "val"):
            perm = np.random.default_rng(seed).permutation(YEAST_TRAIN_ROWS)
            n_val = int(round(val_fraction * YEAST_TRAIN_ROWS))
            rows = np.sort(perm[:n_val] if split == "val" else perm[n_val:])
            x, y = x[rows], y[rows]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.float32))


def dataset_from_dense(x: Tensor, y: Tensor) -> MultiLabelDataset:
    """A :class:`MultiLabelDataset` from dense features and a dense multi-hot matrix."""
    return MultiLabelDataset(x, Positives.from_dense(y, soft=False))


# --------------------------------------------------------------------------- readers
def _open(path):
    return gzip.open(path, "rt") if str(path).endswith(".gz") else open(path, "r")


def read_xc(path) -> MultiLabelDataset:
    """The Extreme Classification Repository sparse text format.

    First line ``N D K``; then one row per line: ``l1,l2,... f1:v1 f2:v2 ...``
    (a line starting with a space has no labels). Features are 0-based; a
    feature given twice in a row keeps its last value. The features come back
    as a sparse CSR tensor (:class:`MultiLabelDataset` gives dense rows per
    batch): XC data sets have up to millions of features.
    """
    with _open(path) as f:
        head = f.readline()
        parts = head.split()
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise DataFormatError(path, 1, f"expected a header 'N D K', got {head.strip()[:60]!r}")
        n, d, k = map(int, parts)
        cols, vals, crow = [], [], [0]
        lists = []
        for lineno, line in enumerate(f, start=2):
            if not line.strip():
                continue
            r = len(lists)
            if r >= n:
                raise DataFormatError(path, lineno, f"more rows than the header's N={n}")
            line = line.rstrip("\n")
            tokens = line.split(" ")
            lab_tok = "" if line.startswith(" ") or ":" in tokens[0] else tokens[0]
            feat_toks = tokens[1:] if lab_tok else [t for t in tokens if t]
            try:
                labs = [int(t) for t in lab_tok.split(",") if t]
            except ValueError:
                raise DataFormatError(path, lineno, f"labels must be comma-separated integers, got {lab_tok[:40]!r}")
            if any(l < 0 or l >= k for l in labs):
                raise DataFormatError(path, lineno, f"label out of range [0, {k})")
            row: dict[int, float] = {}
            for t in feat_toks:
                if not t:
                    continue
                try:
                    fi, fv = t.split(":")
                    fi = int(fi)
                    if not 0 <= fi < d:
                        raise IndexError(fi)
                    row[fi] = float(fv)
                except (ValueError, IndexError):
                    raise DataFormatError(path, lineno, f"bad feature {t[:40]!r} (expected index:value, index < {d})")
            order = sorted(row)
            cols.extend(order)
            vals.extend(row[c] for c in order)
            crow.append(len(cols))
            lists.append(labs)
    if len(lists) != n:
        raise DataFormatError(path, None, f"header says N={n} rows, found {len(lists)}")
    x = _csr(torch.tensor(crow), torch.tensor(cols, dtype=torch.long), torch.tensor(vals), (n, d))
    return MultiLabelDataset(x, Positives.from_lists(lists, k))


_ATTR = re.compile(r"@attribute\s+('[^']*'|\"[^\"]*\"|\S+)\s+(.+)", re.IGNORECASE)


def read_arff(path, num_labels: int, *, labels_first: bool = False) -> MultiLabelDataset:
    """MULAN ARFF, dense or sparse (``{index value, ...}`` rows).

    Args:
        path: the ``.arff`` file.
        num_labels: how many attributes are labels: the last ``num_labels`` (MULAN),
            or the first ones with ``labels_first=True`` (MEKA).
    """
    attrs, rows_x, lists = [], [], []
    in_data = False
    with _open(path) as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("%"):
                continue
            low = line.lower()
            if not in_data:
                if low.startswith("@attribute"):
                    m = _ATTR.match(line)
                    if not m:
                        raise DataFormatError(path, lineno, "malformed @attribute line")
                    attrs.append(m.group(1))
                elif low.startswith("@data"):
                    in_data = True
                    n_attr = len(attrs)
                    if num_labels < 1 or num_labels >= n_attr:
                        raise DataFormatError(path, lineno, f"num_labels={num_labels} but {n_attr} attributes")
                    lab_cols = range(num_labels) if labels_first else range(n_attr - num_labels, n_attr)
                    lab_start = lab_cols[0]
                    feat_cols = [c for c in range(n_attr) if c not in lab_cols]
                    col_of = {c: i for i, c in enumerate(feat_cols)}
                continue
            vals = np.zeros(n_attr, dtype=np.float64)
            try:
                if line.startswith("{"):
                    if not line.endswith("}"):
                        raise ValueError("unterminated sparse row")
                    for item in line[1:-1].split(","):
                        if item.strip():
                            i, v = item.split()
                            if not 0 <= int(i) < n_attr:
                                raise ValueError(f"attribute index {int(i)} out of range [0, {n_attr})")
                            vals[int(i)] = float(v)
                else:
                    fields = [t.strip() for t in line.split(",")]
                    if len(fields) != n_attr:
                        raise ValueError(f"expected {n_attr} values, got {len(fields)}")
                    vals[:] = [float(t) if t != "?" else 0.0 for t in fields]
            except (ValueError, IndexError) as e:
                raise DataFormatError(path, lineno, f"bad data row ({e})")
            lab = vals[lab_start : lab_start + num_labels]
            if not np.all((lab == 0) | (lab == 1)):
                raise DataFormatError(path, lineno, "label attributes must be 0 or 1")
            lists.append(np.flatnonzero(lab).tolist())
            rows_x.append(vals[[c for c in col_of]])
    if not in_data:
        raise DataFormatError(path, None, "no @data section")
    x = torch.tensor(np.array(rows_x, dtype=np.float32).reshape(len(rows_x), -1))
    return MultiLabelDataset(x, Positives.from_lists(lists, num_labels))


def read_csv(path, num_labels: int) -> MultiLabelDataset:
    """A CSV file: feature columns, then ``num_labels`` 0/1 label columns. A header row is skipped."""
    rows_x, lists = [], []
    with _open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.strip().split(",")
            try:
                vals = [float(t) for t in fields]
            except ValueError:
                if lineno == 1:
                    continue  # header
                raise DataFormatError(path, lineno, "non-numeric value")
            if rows_x and len(vals) != len(rows_x[0]) + num_labels:
                raise DataFormatError(path, lineno, f"expected {len(rows_x[0]) + num_labels} columns, got {len(vals)}")
            if len(vals) <= num_labels:
                raise DataFormatError(path, lineno, f"expected more than num_labels={num_labels} columns")
            lab = vals[-num_labels:]
            if any(v not in (0.0, 1.0) for v in lab):
                raise DataFormatError(path, lineno, "label columns must be 0 or 1")
            rows_x.append(vals[:-num_labels])
            lists.append([i for i, v in enumerate(lab) if v == 1.0])
    if not rows_x:
        raise DataFormatError(path, None, "no data rows")
    return MultiLabelDataset(torch.tensor(rows_x, dtype=torch.float32), Positives.from_lists(lists, num_labels))


def read_npz(path) -> MultiLabelDataset:
    """A NumPy ``.npz`` with ``X`` ``[N, D]`` and either ``Y`` ``[N, K]`` (0/1) or
    ``indices``, ``offsets`` and ``num_classes`` (CSR labels: ``offsets`` ``[N + 1]``
    from 0, non-decreasing, to ``len(indices)``; class ids in ``[0, num_classes)``,
    unique within a row)."""
    try:
        z = np.load(path)
    except Exception as e:  # noqa: BLE001
        raise DataFormatError(path, None, f"not a readable .npz ({e})")
    if "X" not in z:
        raise DataFormatError(path, None, "missing array 'X'")
    x = torch.from_numpy(np.asarray(z["X"], dtype=np.float32))
    if x.dim() != 2:
        raise DataFormatError(path, None, f"'X' must be 2-D [N, D], got shape {tuple(x.shape)}")
    if "Y" in z:
        y = np.asarray(z["Y"])
        if y.ndim != 2 or y.shape[0] != x.shape[0] or y.shape[1] < 1:
            raise DataFormatError(path, None, f"'Y' must be [N, K] with N = {x.shape[0]} (X's rows) and K >= 1, "
                                              f"got shape {y.shape}")
        if not np.all((y == 0) | (y == 1)):  # a {-1, 1} encoding would otherwise make every label a positive
            raise DataFormatError(path, None, "'Y' must hold 0 or 1 only")
        return dataset_from_dense(x, torch.from_numpy(y.astype(bool)))
    if not {"indices", "offsets", "num_classes"} <= set(z.files):
        raise DataFormatError(path, None, "expected 'Y', or 'indices', 'offsets' and 'num_classes'")
    from .loss import _validate_positives

    try:
        pos = Positives(torch.from_numpy(z["indices"]), torch.from_numpy(z["offsets"]), int(z["num_classes"]))
        _validate_positives(pos, pos.num_classes)
        return MultiLabelDataset(x, pos)
    except (TypeError, ValueError) as e:
        raise DataFormatError(path, None, f"bad CSR labels ({e})")


def guess_format(path) -> str:
    """The format that :func:`load_file` reads ``path`` in when none is given: from its name (``.arff``, ``.csv``,
    ``.npz``, each optionally ``.gz``), else ``xc``."""
    name = str(path).lower().removesuffix(".gz")
    return next((f for f in ("arff", "csv", "npz") if name.endswith("." + f)), "xc")


def load_file(path, fmt: Optional[str] = None, num_labels: Optional[int] = None) -> MultiLabelDataset:
    """Read ``path`` in format ``fmt`` (``xc``, ``arff``, ``csv``, ``npz``; :func:`guess_format` if None)."""
    fmt = fmt or guess_format(path)
    if fmt in ("arff", "csv") and not num_labels:  # (a DataFormatError: the CLI prints it as one line)
        raise DataFormatError(path, None, f"the {fmt} format needs the number of labels (num_labels, --num-labels)")
    if not os.path.exists(path):
        raise DataFormatError(path, None, "no such file")
    return {"xc": lambda: read_xc(path), "arff": lambda: read_arff(path, num_labels),
            "csv": lambda: read_csv(path, num_labels), "npz": lambda: read_npz(path)}[fmt]()


# --------------------------------------------------------------------------- synthetic
def synthetic(
    n: int = 1000,
    num_features: int = 32,
    num_classes: int = 100,
    *,
    labels_per_row: float = 3.0,
    power: float = 1.0,
    noise: float = 0.5,
    seed: int = 0,
) -> MultiLabelDataset:
    """Learnable synthetic multi-label data with power-law label frequencies.

    Label ``j`` is drawn with probability proportional to ``(j + 1) ** -power``
    (Zipf); each row gets ``1 + Poisson(labels_per_row - 1)`` distinct labels.
    Features are the sum of the labels' random prototype vectors plus Gaussian
    noise, so a linear model can learn them. Memory is O(n·D + K·D).

    Example:
        >>> ds = synthetic(n=10, num_classes=50, labels_per_row=2.0)
        >>> len(ds), ds.num_classes
        (10, 50)
    """
    if labels_per_row < 1:
        raise ValueError(f"Expected `labels_per_row` >= 1, but got {labels_per_row}")
    g = torch.Generator().manual_seed(seed)
    cdf = torch.cumsum(torch.arange(1, num_classes + 1, dtype=torch.float64).pow(-power), 0)
    cdf /= cdf[-1].clone()
    counts = 1 + torch.poisson(torch.full((n,), labels_per_row - 1.0, dtype=torch.float64), generator=g).long()
    counts = counts.clamp(max=num_classes).tolist()
    lists = []
    for c in counts:
        row: dict[int, None] = {}
        while len(row) < c:  # inverse-CDF draws, distinct within the row
            u = torch.rand(2 * c + 2, generator=g, dtype=torch.float64)
            for j in torch.searchsorted(cdf, u).clamp(max=num_classes - 1).tolist():
                row.setdefault(j)
                if len(row) == c:
                    break
        lists.append(list(row))
    proto = torch.randn(num_classes, num_features, generator=g) / max(labels_per_row, 1.0) ** 0.5
    pos = Positives.from_lists(lists, num_classes)
    x = torch.zeros(n, num_features).index_add_(0, pos.row_ids(), proto[pos.indices])
    x += noise * torch.randn(n, num_features, generator=g)
    return MultiLabelDataset(x, pos)
