"""Baseline losses against hand-computed cases and PyTorch's own losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from mlsoftmax import Positives, multilabel_softmax_loss
from mlsoftmax import baselines as B

S = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]], dtype=torch.float64)
Y = torch.tensor([[1, 0, 1], [0, 1, 0]])


def sig(v):
    return 1 / (1 + math.exp(-v))


def test_bce_hand():
    rows = [
        -(math.log(sig(2.0)) + math.log(1 - sig(-1.0)) + math.log(sig(0.5))),
        -(math.log(1 - sig(0.0)) + math.log(sig(1.0)) + math.log(1 - sig(-2.0))),
    ]
    torch.testing.assert_close(B.bce_loss(S, Y, reduction="none"), torch.tensor(rows, dtype=torch.float64))
    torch.testing.assert_close(B.bce_loss(S, Y), F.binary_cross_entropy_with_logits(S, Y.double()) * 3)


def test_pairwise_ranking_hand():
    # row 0: pos {0, 2}, neg {1}: max(0, 1-2-1) + max(0, 1-0.5-1) = 0; row 1: pos {1}, neg {0, 2}: (1-1+0) + 0 = 0
    # shift row 1 so that a pair violates: s = [0.5, 1, -2] -> 1 - 1 + 0.5 = 0.5
    s = torch.tensor([[2.0, -1.0, 0.5], [0.5, 1.0, -2.0]])
    assert B.pairwise_ranking_loss(s, Y, reduction="none").tolist() == [0.0, 0.5]


def test_warp_weights_when_the_first_draw_violates():
    # every negative violates every positive: the first draw always violates (N = 1),
    # so rank = floor(|neg| / 1) and the weight is L(|neg|) = 1 + 1/2 + ... + 1/|neg|
    s = torch.tensor([[0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([[1, 0, 0, 0]])
    out = B.warp_loss(s, y, generator=torch.Generator().manual_seed(0))
    assert out.item() == pytest.approx(1 + 1 / 2 + 1 / 3)  # hinge 1 for the chosen negative
    out.backward()
    assert s.grad[0, 0].item() == pytest.approx(-(1 + 1 / 2 + 1 / 3))


def test_warp_single_violator_and_no_violation():
    # one negative violates: it is drawn at position N in a random order, rank = floor(2/N)
    s = torch.tensor([[1.0, 0.5, -5.0]])
    y = torch.tensor([[1, 0, 0]])
    vals = {round(B.warp_loss(s, y, generator=torch.Generator().manual_seed(i)).item(), 6) for i in range(20)}
    # N = 1 -> rank 2 -> L = 1.5; N = 2 -> rank 1 -> L = 1; hinge = 1 - 1 + 0.5 = 0.5
    assert vals == {0.75, 0.5}
    assert B.warp_loss(torch.tensor([[5.0, 0.0, 0.0]]), y).item() == 0.0


def test_asl_reduces_to_bce_without_focusing():
    torch.testing.assert_close(
        B.asymmetric_loss(S, Y, gamma_pos=0, gamma_neg=0, clip=0, eps=0), B.bce_loss(S, Y)
    )


def test_asl_hand():
    s = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1, 0]])
    p0, p1 = sig(1.0), sig(0.0)
    pm = p1 - 0.05
    expected = -(math.log(p0) * (1 - p0) ** 1 + math.log(1 - pm) * pm**4)
    assert B.asymmetric_loss(s, y, gamma_pos=1.0).item() == pytest.approx(expected)


def test_zlpr_hand():
    rows = [
        math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-2.0) + math.exp(-0.5)),
        math.log(1 + math.exp(0.0) + math.exp(-2.0)) + math.log(1 + math.exp(-1.0)),
    ]
    torch.testing.assert_close(B.zlpr_loss(S, Y, reduction="none"), torch.tensor(rows, dtype=torch.float64))


def test_pick_all_labels_is_count_times_softmax_loss():
    pal = B.pick_all_labels_loss(S, Y, reduction="none")
    ours = multilabel_softmax_loss(S, Y, reduction="none")
    torch.testing.assert_close(pal, ours * Y.sum(1))


@pytest.mark.parametrize("name", sorted(B.LOSSES))
def test_positives_and_dense_agree(name):
    pos = Positives.from_lists([[0, 2], [1]], 3)
    g = lambda: torch.Generator().manual_seed(1)
    kw = {"generator": g()} if name == "warp" else {}
    a = B.LOSSES[name](S, Y, **kw)
    kw = {"generator": g()} if name == "warp" else {}
    torch.testing.assert_close(B.LOSSES[name](S, pos, **kw), a)
    with pytest.raises(ValueError, match="Expected `reduction`"):
        B.LOSSES[name](S, Y, reduction="avg")
