"""Sparse multi-label targets: the positive class indices of each row, in CSR form."""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Positives"]


def scatter_dense(shape, indices: Tensor, row_ids: Tensor, values: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """A dense ``[B, K]`` target of ``dtype`` from CSR positives (``[nnz]`` class ids and rows): their ``values``,
    or 1 each; repeated pairs add up."""
    out = torch.zeros(shape, dtype=dtype, device=indices.device)
    vals = torch.ones_like(indices, dtype=dtype) if values is None else values.to(dtype)
    return out.index_put_((row_ids, indices), vals, accumulate=True)


def csr_gather(offsets: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(positions [m], entries of each row [n])``: where the stored entries of the CSR rows ``ids`` ``[n]`` lie
    in the entry arrays, row after row. (It syncs once, for ``m``.)"""
    starts, counts = offsets[ids], offsets[ids + 1] - offsets[ids]
    total = int(counts.sum())
    first = torch.cumsum(counts, 0) - counts  # each row's first entry in the output
    step = torch.arange(total, device=offsets.device)
    return torch.repeat_interleave(starts - first, counts, output_size=total) + step, counts


class Positives:
    """The positive classes of each row, stored as CSR (never expanded to ``[B, K]``).

    Row ``i`` owns ``indices[offsets[i]:offsets[i + 1]]``. An optional ``values``
    gives each positive a non-negative soft weight; rows are normalised by their
    total weight, so plain positives give the note's ``Y / |Y|``.

    ``num_classes`` may be left ``None``: K is then taken from the logits when the
    loss is called (it is never inferred from the largest index).

    Indices must be unique within a row. ``from_lists`` and ``from_padded`` merge
    duplicates (summing their values); the raw constructor checks for them when
    the loss validates its input.

    Args:
        indices: ``[nnz]`` integer class ids.
        offsets: ``[B + 1]`` integer row pointers, ``offsets[0] == 0`` and
            ``offsets[-1] == nnz``.
        num_classes: the number of classes K, or ``None``.
        values: optional ``[nnz]`` non-negative weights.

    Example:
        >>> import torch
        >>> from mlsoftmax import Positives
        >>> t = Positives.from_lists([[0, 2], [1]], num_classes=3)
        >>> t.to_dense()
        tensor([[1., 0., 1.],
                [0., 1., 0.]])
    """

    __slots__ = ("indices", "offsets", "values", "num_classes")

    def __init__(
        self,
        indices: Tensor,
        offsets: Tensor,
        num_classes: Optional[int] = None,
        *,
        values: Optional[Tensor] = None,
    ) -> None:
        if not isinstance(indices, Tensor) or not isinstance(offsets, Tensor):
            raise TypeError(
                "Expected `indices` and `offsets` to be torch tensors, but got "
                f"{type(indices).__name__} and {type(offsets).__name__}"
            )
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"Expected `indices` to be an integer tensor, but got dtype {indices.dtype}")
        if offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool:
            raise TypeError(f"Expected `offsets` to be an integer tensor, but got dtype {offsets.dtype}")
        if indices.dim() != 1 or offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError(
                "Expected `indices` to be 1-D and `offsets` to be 1-D with B + 1 entries, but got "
                f"shapes {tuple(indices.shape)} and {tuple(offsets.shape)}"
            )
        if values is not None:
            if not isinstance(values, Tensor) or not values.is_floating_point():
                raise TypeError(f"Expected `values` to be a floating-point tensor, but got {values!r:.60}")
            if values.shape != indices.shape:
                raise ValueError(
                    f"Expected `values` to have the shape of `indices` {tuple(indices.shape)}, "
                    f"but got {tuple(values.shape)}"
                )
        if offsets.device != indices.device or (values is not None and values.device != indices.device):
            where = f"{offsets.device}" + ("" if values is None else f" and {values.device}")
            raise ValueError(f"Expected `offsets`{'' if values is None else ' and `values`'} on {indices.device} "
                             f"like `indices`, but got {where}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
                                        or num_classes < 1):
            raise ValueError(f"Expected `num_classes` to be a positive int or None, but got {num_classes!r}")
        self.indices = indices.long().contiguous()
        self.offsets = offsets.long().contiguous()
        self.values = None if values is None else values.contiguous()
        self.num_classes = None if num_classes is None else int(num_classes)  # a NumPy int too

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_lists(
        cls,
        lists: Sequence[Sequence[int]],
        num_classes: Optional[int] = None,
        *,
        values: Optional[Sequence[Sequence[float]]] = None,
        device=None,
    ) -> "Positives":
        """Build from a list of per-row index lists (duplicates are merged).

        Args:
            lists: ``B`` sequences of class ids.
            num_classes: K, or ``None`` to take it from the logits.
            values: optional per-positive soft weights, shaped like ``lists``.
            device: where to put the tensors.
        """
        if values is not None and len(values) != len(lists):
            raise ValueError(f"Expected `values` to have {len(lists)} rows, but got {len(values)}")
        idx_out, val_out, offsets = [], [], [0]
        valid_k = isinstance(num_classes, numbers.Integral) and not isinstance(num_classes, bool) and num_classes >= 1
        k = int(num_classes) if valid_k else None  # an invalid one is refused by the constructor
        for r, row in enumerate(lists):
            merged: dict[int, float] = {}
            vals = values[r] if values is not None else [1.0] * len(row)
            if len(vals) != len(row):
                raise ValueError(f"Expected `values[{r}]` to have {len(row)} entries, but got {len(vals)}")
            for c, v in zip(row, vals):
                if isinstance(c, bool) or not isinstance(c, (int,)) and not hasattr(c, "__index__"):
                    raise TypeError(f"Expected class ids to be integers, but got {c!r} in row {r}")
                if int(c) < 0 or k is not None and int(c) >= k:  # host data: checked here, without a sync
                    span = "[0, K)" if k is None else f"[0, {k})"
                    raise ValueError(f"Expected class ids in {span}, but got {int(c)} in row {r}")
                merged[int(c)] = merged.get(int(c), 0.0) + float(v)
            idx_out.extend(merged.keys())
            val_out.extend(merged.values())
            offsets.append(len(idx_out))
        indices = torch.tensor(idx_out, dtype=torch.long, device=device)
        offs = torch.tensor(offsets, dtype=torch.long, device=device)
        vals_t = torch.tensor(val_out, dtype=torch.float32, device=device) if values is not None else None
        return cls(indices, offs, num_classes, values=vals_t)

    @classmethod
    def from_padded(
        cls, idx: Tensor, num_classes: Optional[int] = None, *, values: Optional[Tensor] = None
    ) -> "Positives":
        """Build from a padded index matrix ``[B, P]`` where ``-1`` marks padding.

        Duplicates within a row are merged (their values summed). Runs on the
        tensor's device; it syncs for the largest index and the output size.
        """
        if not isinstance(idx, Tensor) or idx.dim() != 2:
            raise ValueError(f"Expected `idx` to be a 2-D tensor [B, P], but got {getattr(idx, 'shape', idx)!r}")
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError(f"Expected `idx` to be an integer tensor, but got dtype {idx.dtype}")
        b, p = idx.shape
        idx = idx.long()
        if values is None:
            vals = torch.ones(b, p, dtype=torch.float32, device=idx.device)
        else:
            if values.shape != idx.shape:
                raise ValueError(f"Expected `values` to have shape {tuple(idx.shape)}, but got {tuple(values.shape)}")
            vals = values
        valid = idx >= 0
        rows = torch.arange(b, device=idx.device).unsqueeze(1).expand(b, p)
        # Sort (row, class) keys so duplicates become adjacent, then merge them.
        big = int(idx.max().clamp_min(0)) + 2 if idx.numel() else 2  # past every index given, valid or not
        key = torch.where(valid, rows * big + idx, torch.full_like(idx, -1))[valid]
        v = vals[valid]
        uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
        merged = torch.zeros(uniq.numel(), dtype=v.dtype, device=idx.device).index_add_(0, inverse, v)
        r_of = torch.div(uniq, big, rounding_mode="floor")
        counts = torch.bincount(r_of, minlength=b)
        offsets = torch.zeros(b + 1, dtype=torch.long, device=idx.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return cls(uniq - r_of * big, offsets, num_classes, values=merged if values is not None else None)

    @classmethod
    def from_dense(cls, target: Tensor, *, soft: Optional[bool] = None) -> "Positives":
        """Build from a dense ``[B, K]`` target: its nonzero entries are the positives, ``K`` its width.

        ``soft`` keeps the entries as ``values``; by default they are kept only
        when some differ from 1 (a multi-hot target gives plain positives). Runs
        on the tensor's device; it syncs for the number of positives.

        Example:
            >>> t = Positives.from_dense(torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, 0.0]]))
            >>> t.indices.tolist(), t.offsets.tolist(), t.values.tolist(), t.num_classes
            ([1, 2], [0, 2, 2], [2.0, 1.0], 3)
        """
        if not isinstance(target, Tensor) or target.dim() != 2 or target.is_complex():
            raise ValueError("Expected `target` to be a real 2-D tensor [B, K], but got "
                             f"{getattr(target, 'shape', type(target).__name__)!r}")
        if target.shape[1] < 1:
            raise ValueError(f"Expected `target` to have K >= 1 columns, but got shape {tuple(target.shape)}")
        if target.is_floating_point() and not bool(torch.isfinite(target).all()):
            raise ValueError("Expected `target` to be finite, but got a NaN or infinite entry")
        if target.dtype != torch.bool and bool((target < 0).any()):
            raise ValueError("Expected `target` to be non-negative, but got a negative entry")
        rows, cols = target.nonzero(as_tuple=True)  # row-major: CSR order
        offsets = torch.zeros(target.shape[0] + 1, dtype=torch.long, device=target.device)
        offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=target.shape[0]), 0)
        vals = target[rows, cols]
        if soft is None:
            soft = target.is_floating_point() and bool((vals != 1).any())
        if soft:
            vals = vals if vals.is_floating_point() else vals.float()
        return cls(cols, offsets, target.shape[1], values=vals if soft else None)

    # ------------------------------------------------------------------ views
    @property
    def batch_size(self) -> int:
        """The number of rows B."""
        return self.offsets.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def counts(self) -> Tensor:
        """``[B]`` number of stored positives per row."""
        return self.offsets[1:] - self.offsets[:-1]

    def row_ids(self) -> Tensor:
        """``[nnz]`` the row of each stored positive (no host sync)."""
        return torch.repeat_interleave(self.counts(), output_size=self.indices.numel())

    def to(self, device) -> "Positives":
        """Move to ``device`` (a new object; ``self`` is unchanged)."""
        vals = None if self.values is None else self.values.to(device)
        return Positives(self.indices.to(device), self.offsets.to(device), self.num_classes, values=vals)

    def to_dense(self, num_classes: Optional[int] = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Expand to a dense ``[B, K]`` tensor (values, or 1 per positive)."""
        k = num_classes if num_classes is not None else self.num_classes
        if k is None:
            raise ValueError("Expected `num_classes` to be known to build a dense target, but got None")
        return scatter_dense((self.batch_size, k), self.indices, self.row_ids(), self.values, dtype)

    def __len__(self) -> int:
        return self.batch_size

    def __getitem__(self, index) -> Union[Tensor, "Positives"]:
        """Row ``i``'s class ids ``[n_i]`` for an int (as a tensor's batch dimension drops), else the rows
        ``index`` (a slice, or a sequence or 1-D tensor of row ids) as a new ``Positives``.

        Example:
            >>> t = Positives.from_lists([[0, 2], [1], [3]], num_classes=4)
            >>> t[0].tolist(), t[1:].to_dense().tolist()
            ([0, 2], [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
        """
        if isinstance(index, numbers.Integral) and not isinstance(index, bool):
            i = range(self.batch_size)[index]  # negative ids, and an IndexError past the end
            return self.indices[self.offsets[i] : self.offsets[i + 1]]
        ids = torch.as_tensor(range(self.batch_size)[index] if isinstance(index, slice) else index,  # any step
                              dtype=torch.long, device=self.device)
        if ids.dim() != 1:
            raise IndexError(f"Expected an int, a slice or a 1-D sequence of row ids, but got {index!r:.60}")
        pos, counts = csr_gather(self.offsets, ids)
        offsets = torch.zeros(ids.numel() + 1, dtype=torch.long, device=self.device)
        offsets[1:] = torch.cumsum(counts, 0)
        vals = None if self.values is None else self.values[pos]
        return Positives(self.indices[pos], offsets, self.num_classes, values=vals)

    def __repr__(self) -> str:
        return (
            f"Positives(batch_size={self.batch_size}, nnz={self.indices.numel()}, "
            f"num_classes={self.num_classes}, soft={self.values is not None}, device={self.device})"
        )
