"""Positives: constructors, round trips, and errors."""

import pytest
import torch

from mlsoftmax import Positives


def test_constructors_agree_and_round_trip():
    dense = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.float32)
    a = Positives.from_lists([[1, 3], [], [0, 1, 2]], num_classes=4)
    b = Positives.from_padded(torch.tensor([[3, 1, -1], [-1, -1, -1], [2, 0, 1]]), num_classes=4)
    c = Positives(torch.tensor([1, 3, 0, 1, 2]), torch.tensor([0, 2, 2, 5]), 4)
    for p in (a, b, c):
        assert torch.equal(p.to_dense(), dense)
        assert p.batch_size == 3 and p.counts().tolist() == [2, 0, 3]
        assert p.row_ids().tolist() == [0, 0, 2, 2, 2]
    moved = a.to("cpu")
    assert moved is not a and torch.equal(moved.to_dense(), dense)
    assert "nnz=5" in repr(a)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float32, torch.float64])
def test_from_dense_matches_numpy_nonzero(dtype, rng):
    """The positives are NumPy's nonzero entries, row by row; values only for soft (non-binary) targets."""
    import numpy as np

    y = (rng.random((6, 11)) < 0.3) * (rng.integers(1, 4, size=(6, 11)) if dtype != torch.bool else 1)
    y[2] = 0  # an empty row
    if dtype in (torch.bool, torch.int64):
        y = y > 0
    t = Positives.from_dense(torch.from_numpy(y).to(dtype))
    rows, cols = np.nonzero(y)
    assert t.num_classes == 11 and t.indices.tolist() == cols.tolist()
    assert t.offsets.tolist() == np.concatenate([[0], np.cumsum((y != 0).sum(1))]).tolist()
    soft = dtype.is_floating_point and (y[rows, cols] != 1).any()
    assert (t.values is not None) == soft
    if soft:
        assert t.values.dtype == dtype and t.values.tolist() == y[rows, cols].tolist()
    assert Positives.from_dense(torch.from_numpy(y).to(dtype), soft=True).to_dense().tolist() == (y * 1.0).tolist()


def test_from_dense_bad_input():
    with pytest.raises(ValueError, match="Expected `target` to be a real 2-D tensor"):
        Positives.from_dense(torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        Positives.from_dense(torch.tensor([[1.0, -1.0]]))
    with pytest.raises(ValueError, match="finite"):
        Positives.from_dense(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="K >= 1"):
        Positives.from_dense(torch.ones(2, 0))


def test_duplicates_are_merged_and_values_kept():
    p = Positives.from_lists([[2, 2, 0]], values=[[0.5, 0.25, 1.0]])
    assert p.to_dense(3).tolist() == [[1.0, 0.0, 0.75]]
    q = Positives.from_padded(torch.tensor([[1, 1, -1]]), values=torch.tensor([[2.0, 3.0, 9.0]]))
    assert q.to_dense(3).tolist() == [[0.0, 5.0, 0.0]]


def test_k_comes_from_the_caller_not_the_largest_index():
    p = Positives.from_lists([[0], [1]])
    assert p.num_classes is None
    assert p.to_dense(5).shape == (2, 5)
    with pytest.raises(ValueError, match="Expected `num_classes` to be known"):
        p.to_dense()


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.tensor([0.5]), torch.tensor([0, 1])), {}, TypeError, "integer tensor"),
        ((torch.tensor([0]), torch.tensor([[0, 1]])), {}, ValueError, "1-D"),
        ((torch.tensor([0]), torch.tensor([0, 1])), {"values": torch.tensor([1, 2])}, TypeError, "floating-point"),
        ((torch.tensor([0]), torch.tensor([0, 1])), {"values": torch.ones(2)}, ValueError, "shape of `indices`"),
        ((torch.tensor([0]), torch.tensor([0, 1]), 0), {}, ValueError, "positive int"),
        ((torch.tensor([0]), torch.tensor([0, 1]), 2.0), {}, ValueError, "positive int"),
        ((torch.tensor([0]), torch.tensor([0, 1]), True), {}, ValueError, "positive int"),
        (([0], torch.tensor([0, 1])), {}, TypeError, "torch tensors"),
        ((torch.tensor([0]), torch.tensor([0, 1], device="meta")), {}, ValueError,
         "Expected `offsets` on cpu like `indices`, but got meta"),
        ((torch.tensor([0]), torch.tensor([0, 1])), {"values": torch.ones(1, device="meta")}, ValueError,
         "Expected `offsets` and `values` on cpu like `indices`, but got cpu and meta"),
    ],
)
def test_bad_construction(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Positives(*args, **kwargs)


@pytest.mark.parametrize("lists,k,match", [([[0, 3]], 3, r"in \[0, 3\), but got 3 in row 0"),
                                           ([[1], [-1]], None, r"in \[0, K\), but got -1 in row 1")])
def test_from_lists_rejects_class_ids_out_of_range(lists, k, match):
    """Host lists are checked as they are read (the raw CSR constructor leaves it to the loss's validation)."""
    with pytest.raises(ValueError, match=match):
        Positives.from_lists(lists, k)
    with pytest.raises(ValueError, match="Expected `num_classes` to be a positive int"):
        Positives.from_lists([[0]], "3")


def test_from_lists_rejects_non_integers():
    with pytest.raises(TypeError, match="integers"):
        Positives.from_lists([[0.5]])


def test_num_classes_may_be_a_numpy_int():
    import numpy as np

    t = Positives.from_lists([[0, 2]], num_classes=np.int64(3))
    assert t.num_classes == 3 and type(t.num_classes) is int
    assert t.to_dense().tolist() == [[1.0, 0.0, 1.0]]


def test_row_indexing_and_slicing():
    """pos[i] is row i's class ids; pos[slice / ids] a Positives of those rows (values kept), as the lists say."""
    lists = [[0, 2], [], [3, 1, 4], [5]]
    vals = [[0.5, 1.5], [], [1.0, 2.0, 3.0], [4.0]]
    t = Positives.from_lists(lists, 6, values=vals)
    assert t[2].tolist() == [3, 1, 4] and t[-1].tolist() == [5] and t[1].numel() == 0
    for index, rows in ((slice(1, 4), [1, 2, 3]), (slice(None, None, 2), [0, 2]), ([3, 0, 0], [3, 0, 0]),
                        (torch.tensor([2]), [2]), (slice(2, 2), []), (slice(None, None, -1), [3, 2, 1, 0])):
        sub = t[index]
        assert isinstance(sub, Positives) and sub.num_classes == 6 and len(sub) == len(rows)
        assert sub.to_dense().tolist() == Positives.from_lists([lists[r] for r in rows], 6,
                                                               values=[vals[r] for r in rows]).to_dense().tolist()
    with pytest.raises(IndexError):
        t[4]
    with pytest.raises(IndexError, match="1-D sequence of row ids"):
        t[torch.zeros(2, 2, dtype=torch.long)]
