"""Every metric against scikit-learn or a hand-computed case (ties, empty rows, K=1)."""

import numpy as np
import pytest
import sklearn.metrics as skm
import torch

from mlsoftmax import Positives
from mlsoftmax import metrics as M

from conftest import exit_rank


def _data(rng, n=40, k=9, ties=False, empty=False):
    s = rng.normal(size=(n, k))
    if ties:
        s = np.round(s * 2) / 2  # many ties
    y = (rng.random((n, k)) < 0.3).astype(int)
    y[np.arange(n), rng.integers(0, k, n)] = 1
    if empty:
        y[:3] = 0
    return s, y


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("empty", [False, True])
def test_example_based_match_sklearn(rng, ties, empty):
    s, y = _data(rng, ties=ties, empty=empty)
    assert M.average_precision(s, y) == pytest.approx(skm.label_ranking_average_precision_score(y, s), abs=1e-12)
    assert M.ranking_loss(s, y) == pytest.approx(skm.label_ranking_loss(y, s), abs=1e-12)
    if not empty:  # sklearn's coverage_error counts empty rows as 0 before the "- 1"
        assert M.coverage(s, y) == pytest.approx(skm.coverage_error(y, s) - 1, abs=1e-12)


def test_torch_numpy_and_positives_inputs_agree(rng):
    s, y = _data(rng)
    pos = Positives.from_lists([np.flatnonzero(r).tolist() for r in y], y.shape[1])
    a = M.average_precision(s, y)
    assert M.average_precision(torch.from_numpy(s).float(), torch.from_numpy(y)) == pytest.approx(a, abs=1e-6)
    assert M.average_precision(s, pos) == pytest.approx(a, abs=1e-12)


def test_hand_computed_ranking_case():
    s = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.8, 0.1]])
    y = np.array([[0, 0, 1, 1], [1, 0, 1, 0]])
    # row 0: positives ranked 2 and 3 -> AP (1/2 + 2/3)/2; row 1: label 2 ties label 1 at rank 2 (tie = worst rank)
    assert M.average_precision(s, y) == pytest.approx(((1 / 2 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    assert M.one_error(s, y) == 1.0  # both top-1 labels (0 and the first of the tie, 1) are negatives
    assert M.coverage(s, y) == pytest.approx((2 + 2) / 2)  # lowest positive at rank 3 in both rows
    assert M.precision_at_k(s, y, 2) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert M.recall_at_k(s, y, 2) == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_one_error_and_empty_rows():
    s = np.array([[0.1, 0.9], [0.9, 0.1], [0.5, 0.4]])
    y = np.array([[0, 1], [0, 1], [0, 0]])
    assert M.one_error(s, y) == 0.5  # the empty row is left out


@pytest.mark.parametrize("k", [1, 3, 5])
def test_ndcg_matches_sklearn(rng, k):
    s, y = _data(rng, n=50, k=12)
    assert M.ndcg_at_k(s, y, k) == pytest.approx(skm.ndcg_score(y, s, k=k), abs=1e-12)


def test_precision_recall_at_k_hand(rng):
    s, y = _data(rng, n=30, k=10)
    top = np.argsort(-s, axis=1)[:, :3]
    hits = np.take_along_axis(y, top, 1).sum(1)
    assert M.precision_at_k(s, y, 3) == pytest.approx((hits / 3).mean())
    assert M.recall_at_k(s, y, 3) == pytest.approx((hits / y.sum(1)).mean())


def test_k_equals_one_class():
    s = np.array([[0.3], [0.1]])
    y = np.array([[1], [1]])
    assert M.average_precision(s, y) == 1.0
    assert M.ranking_loss(s, y) == 0.0
    assert M.coverage(s, y) == 0.0
    assert M.precision_at_k(s, y, 3) == pytest.approx(1 / 3)  # P@k divides by k
    assert M.ndcg_at_k(s, y, 3) == 1.0
    assert M.mean_average_precision(s, y) == 1.0


@pytest.mark.parametrize("ties", [False, True])
def test_mean_average_precision_matches_sklearn(rng, ties):
    s, y = _data(rng, n=60, k=8, ties=ties)
    y[:, 5] = 0  # a label with no positive is left out of the mean
    present = y.any(0)
    expected = np.mean([skm.average_precision_score(y[:, j], s[:, j]) for j in np.flatnonzero(present)])
    assert M.mean_average_precision(s, y) == pytest.approx(expected, abs=1e-12)


def test_set_metrics_match_sklearn(rng):
    s, y = _data(rng, n=50, k=7)
    pred = (rng.random(y.shape) < 0.35).astype(int)
    pred[0] = 0
    y2 = y.copy()
    y2[0] = 0  # a row with neither predicted nor true labels: 0/0 -> 0
    assert M.hamming_loss(pred, y2) == pytest.approx(skm.hamming_loss(y2, pred))
    assert M.f1_score(pred, y2, "micro") == pytest.approx(skm.f1_score(y2, pred, average="micro"))
    assert M.f1_score(pred, y2, "macro") == pytest.approx(skm.f1_score(y2, pred, average="macro", zero_division=0))
    assert M.f1_score(pred, y2, "example") == pytest.approx(
        skm.f1_score(y2, pred, average="samples", zero_division=0)
    )
    with pytest.raises(ValueError, match="Expected `average`"):
        M.f1_score(pred, y2, "weighted")
    probs = rng.random(y.shape)  # scores are not sets: a silent "> 0" would predict every label
    for f in (M.f1_score, M.hamming_loss):
        with pytest.raises(ValueError, match="Expected `pred` to be predicted label sets"):
            f(probs, y2)
    assert M.f1_score(pred.astype(bool), y2) == M.f1_score(pred.astype(np.float32), y2)
    ev = M.MultilabelEvaluator(decoder=lambda sc: torch.softmax(sc, 1))  # a decoder that returns probabilities
    with pytest.raises(ValueError, match="Expected `decoded` to be predicted label sets"):
        ev.update(s, y)


def test_annotation_scores_hand_computed():
    # 3 rows, 4 labels, k = 1: the top label of each row is 0, 0, 2
    s = np.array([[0.9, 0.1, 0.0, 0.0], [0.8, 0.0, 0.1, 0.0], [0.0, 0.1, 0.9, 0.2]])
    y = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]])
    out = M.annotation_scores(s, y, k=1)
    # label 0: predicted 2, correct 1, true 1; label 1: predicted 0, true 1; label 2: predicted 1, correct 1, true 2
    # label 3 never appears in the target and is left out of the per-class means
    assert out["per_class_precision"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert out["per_class_recall"] == pytest.approx((1 + 0 + 1 / 2) / 3)
    assert out["overall_precision"] == pytest.approx(2 / 3)
    assert out["overall_recall"] == pytest.approx(2 / 4)
    assert out["n_plus"] == 2


def test_evaluator_batches_equal_functional(rng):
    from mlsoftmax.decode import Decoder

    s, y = _data(rng, n=57, k=11, ties=True, empty=True)
    dec = Decoder("top_k", 2)
    ev = M.MultilabelEvaluator(ks=(1, 3), annotation_k=3, decoder=dec)
    for i in range(0, 57, 10):
        ev.update(torch.from_numpy(s[i : i + 10]), torch.from_numpy(y[i : i + 10]))
    out = ev.compute()
    assert out["average_precision"] == pytest.approx(M.average_precision(s, y), abs=1e-12)
    assert out["ranking_loss"] == pytest.approx(M.ranking_loss(s, y), abs=1e-12)
    assert out["coverage"] == pytest.approx(M.coverage(s, y), abs=1e-12)
    assert out["one_error"] == pytest.approx(M.one_error(s, y), abs=1e-12)
    assert out["ndcg_at_3"] == pytest.approx(M.ndcg_at_k(s, y, 3), abs=1e-12)
    assert out["precision_at_1"] == pytest.approx(M.precision_at_k(s, y, 1), abs=1e-12)
    assert out["mean_average_precision"] == pytest.approx(M.mean_average_precision(s, y), abs=1e-12)
    assert out["micro_f1"] == pytest.approx(M.f1_score(dec(torch.from_numpy(s)), y, "micro"))
    assert out["per_class_recall_at_3"] == pytest.approx(M.annotation_scores(s, y, 3)["per_class_recall"])
    with pytest.raises(ValueError, match="Expected at least one `update`"):
        M.MultilabelEvaluator().compute()


@pytest.mark.parametrize("form", ["dense", "positives"])
def test_evaluator_top_k_updates_match_sklearn_and_the_score_updates(rng, form):
    """``update_top_k`` from ranked indices alone (no scores, no dense target): nDCG@k against scikit-learn,
    P@k against a NumPy count, and every top-k and annotation metric equal to ``update`` on the scores."""
    s, y = _data(rng, n=57, k=23, empty=True)  # continuous scores: no ties, so the ranking is unique
    top = np.argsort(-s, axis=1)[:, :5]
    ev_top = M.MultilabelEvaluator(ks=(1, 3, 5), annotation_k=3)
    ev_all = M.MultilabelEvaluator(ks=(1, 3, 5), annotation_k=3, label_ap=False)
    for i in range(0, 57, 10):
        yb = y[i:i + 10]
        tgt = Positives.from_lists([np.flatnonzero(r).tolist() for r in yb], 23) if form == "positives" else yb
        ev_top.update_top_k(torch.from_numpy(top[i:i + 10]), tgt)
        ev_all.update(s[i:i + 10], yb)
    got, ref = ev_top.compute(), ev_all.compute()
    nonempty = y.any(1)
    for k in (1, 3, 5):
        assert got[f"ndcg_at_{k}"] == pytest.approx(skm.ndcg_score(y[nonempty], s[nonempty], k=k), abs=1e-12)
        hits = np.take_along_axis(y, top[:, :k], 1).sum(1)
        assert got[f"precision_at_{k}"] == pytest.approx((hits / k).mean(), abs=1e-12)
    assert set(got) == {key for key in ref if not key.startswith(("average_precision", "ranking_loss", "coverage"))}
    for key in got:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


def _psp_oracle(s, y, ips, k):
    """(PSP@k, PSnDCG@k) by loops, as the Extreme Classification Repository's tools compute them: the rows'
    inverse-propensity gains of their top-k hits (PSnDCG: discounted by rank and divided by the row's binary ideal
    DCG), over the same for each row's positives in decreasing gain."""
    p_got = p_best = n_got = n_best = 0.0
    for si, yi in zip(s, y):
        top = np.argsort(-si, kind="stable")[:k]
        gains = [ips[j] if yi[j] else 0.0 for j in top]
        ideal = sorted((ips[j] for j in np.flatnonzero(yi)), reverse=True)[:k]
        p_got, p_best = p_got + sum(gains), p_best + sum(ideal)
        if yi.any():
            z = sum(1 / np.log2(r + 2) for r in range(min(k, int(yi.sum()))))
            n_got += sum(g / np.log2(r + 2) for r, g in enumerate(gains)) / z
            n_best += sum(g / np.log2(r + 2) for r, g in enumerate(ideal)) / z
    return p_got / p_best if p_best else 0.0, n_got / n_best if n_best else 0.0


def test_inverse_propensity_follows_jain_et_al():
    """1 + C (N_l + B)^-A with C = (ln N - 1)(B + 1)^A: a hand-computed value, and rarer labels weigh more."""
    ips = M.inverse_propensity(np.array([0, 10, 1000]), 100, a=0.5, b=0.4).numpy()
    c = (np.log(100) - 1) * 1.4**0.5
    np.testing.assert_allclose(ips, 1 + c * np.array([0.4, 10.4, 1000.4]) ** -0.5, rtol=1e-12)
    assert ips[1] == pytest.approx(1 + 3.60517 * 1.18322 / 3.22490, abs=1e-4)
    assert ips[0] > ips[1] > ips[2] > 1
    with pytest.raises(ValueError, match="non-negative counts"):
        M.inverse_propensity(np.array([-1, 2]), 10)
    with pytest.raises(ValueError, match="num_rows"):
        M.inverse_propensity(np.array([1, 2]), 0)


@pytest.mark.parametrize("form", ["dense", "positives"])
def test_psp_matches_a_loop_oracle_in_every_api(rng, form):
    """PSP@k against the loop oracle (empty rows, k above some rows' positives and above K) from the functional
    API, the evaluator's score updates in batches, and its top-k updates from ranked indices alone."""
    s, y = _data(rng, n=57, k=6, empty=True)  # continuous scores: one ranking
    counts = rng.integers(0, 50, size=6)
    ips = M.inverse_propensity(counts, 200)
    tgt = (lambda yb: Positives.from_lists([np.flatnonzero(r).tolist() for r in yb], 6)) if form == "positives" \
        else (lambda yb: yb)
    ev_all = M.MultilabelEvaluator(ks=(1, 3, 8), annotation_k=3, label_ap=False, inv_propensity=ips)
    ev_top = M.MultilabelEvaluator(ks=(1, 3, 8), annotation_k=3, inv_propensity=ips)
    for i in range(0, 57, 10):
        ev_all.update(s[i:i + 10], tgt(y[i:i + 10]))
        ev_top.update_top_k(torch.from_numpy(np.argsort(-s[i:i + 10], axis=1)), tgt(y[i:i + 10]))
    for k in (1, 3, 8):
        psp, psndcg = _psp_oracle(s, y, ips.numpy(), k)
        assert M.psp_at_k(s, tgt(y), ips, k=k) == pytest.approx(psp, abs=1e-12)
        assert M.psndcg_at_k(s, tgt(y), ips, k=k) == pytest.approx(psndcg, abs=1e-12)
        for ev in (ev_all, ev_top):
            assert ev.compute()[f"psp_at_{k}"] == pytest.approx(psp, abs=1e-12)
            assert ev.compute()[f"psndcg_at_{k}"] == pytest.approx(psndcg, abs=1e-12)
        assert 0 < psp <= 1 and 0 < psndcg <= 1
    plain = M.MultilabelEvaluator(ks=(1,), label_ap=False)  # without propensities: no PSP
    plain.update(s, y)
    assert "psp_at_1" not in plain.compute() and "psndcg_at_1" not in plain.compute()
    with pytest.raises(ValueError, match=r"`inv_propensity` to have shape \(6,\)"):
        M.psp_at_k(s, y, ips[:5])


def test_psp_hand_computed():
    """One row, positives 0 and 2 of gains 1 and 3: the top label (0) earns 1 of a perfect top-1's 3; its top 2
    earn all 4; a row with no positive adds nothing to either sum."""
    s, ips = torch.tensor([[0.9, 0.1, 0.5], [0.3, 0.2, 0.1]]), torch.tensor([1.0, 1.0, 3.0])
    y = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert M.psp_at_k(s, y, ips, k=1) == pytest.approx(1 / 3)
    assert M.psp_at_k(s, y, ips, k=2) == pytest.approx(1.0)
    assert M.psp_at_k(s[1:], y[1:], ips, k=1) == 0.0
    # PSnDCG@2: ranked gains 1 then 3 against a perfect ranking's 3 then 1
    assert M.psndcg_at_k(s, y, ips, k=2) == pytest.approx((1 + 3 / np.log2(3)) / (3 + 1 / np.log2(3)))


def test_evaluator_top_k_bad_input():
    y = np.eye(3, 6)
    ev = M.MultilabelEvaluator(ks=(1, 3), annotation_k=2)
    with pytest.raises(ValueError, match="top 3 labels, but got 2"):
        ev.update_top_k(torch.zeros(3, 2, dtype=torch.long), y)
    with pytest.raises(ValueError, match=r"Expected `indices` in \[0, 6\), but got \[0, 6\]"):
        ev.update_top_k(torch.tensor([[0, 1, 6]] * 3), y)
    with pytest.raises(ValueError, match="integer tensor"):
        ev.update_top_k(torch.zeros(3, 3), y)
    with pytest.raises(ValueError, match="num_classes"):
        ev.update_top_k(torch.zeros(3, 3, dtype=torch.long), Positives.from_lists([[0], [1], [2]]))
    dup = Positives(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 2, 3, 4]), 6)  # row 0 lists class 0 twice
    with pytest.raises(ValueError, match="unique class indices within each row"):
        ev.update_top_k(torch.tensor([[0, 1, 2]] * 3), dup)
    ev.update_top_k(torch.tensor([[0, 1, 2]] * 3), y)
    with pytest.raises(ValueError, match="every one `update_top_k`, but got both"):
        ev.update(np.zeros((3, 6)), y)
    small = M.MultilabelEvaluator(ks=(1, 5), annotation_k=3)  # K = 2 < 5: its 2 labels are the whole ranking
    small.update_top_k(torch.tensor([[1, 0]]), np.array([[1, 0]]))
    assert small.compute()["precision_at_1"] == 0.0 and small.compute()["recall_at_5"] == 1.0


def test_evaluator_label_ap_keeps_fp64_scores(rng):
    """Label AP from the evaluator equals the functional (and scikit-learn's) on fp64 scores that differ only below
    fp32's resolution: kept in fp32, they would all tie."""
    s = 1.0 + 1e-12 * rng.normal(size=(30, 4))
    y = (rng.random((30, 4)) < 0.4).astype(int)
    y[0] = 1
    ev = M.MultilabelEvaluator(ks=(1,))
    ev.update(s[:15], y[:15])
    ev.update(s[15:], y[15:])
    expected = np.mean([skm.average_precision_score(y[:, j], s[:, j]) for j in range(4)])
    assert ev.compute()["mean_average_precision"] == pytest.approx(expected, abs=1e-12)
    assert M.mean_average_precision(s, y) == pytest.approx(expected, abs=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="Expected `target` to have the shape"):
        M.average_precision(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(TypeError, match="Expected `scores`"):
        M.average_precision([[0.1]], np.zeros((1, 1)))
    with pytest.raises(ValueError, match=r"Expected `scores` to have shape \[N, K\]"):
        M.ranking_loss(np.zeros(3), np.zeros(3))
    nan = np.array([[0.1, np.nan, 0.3]])
    for f in (M.average_precision, M.ranking_loss, M.coverage, M.one_error, M.precision_at_k,
              M.mean_average_precision, M.MultilabelEvaluator().update):
        with pytest.raises(ValueError, match="Expected `scores` to have no NaN, but got 1 NaN entries"):
            f(nan, np.array([[1, 0, 0]]))


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_bad_k(k):
    s, y = np.zeros((2, 3)), np.eye(2, 3)
    for f in (M.precision_at_k, M.recall_at_k, M.ndcg_at_k, M.annotation_scores):
        with pytest.raises(ValueError, match="Expected `k` to be a positive int"):
            f(s, y, k)
    with pytest.raises(ValueError, match="Expected `ks` to be a positive int"):
        M.MultilabelEvaluator(ks=(1, k))
    with pytest.raises(ValueError, match="Expected `annotation_k` to be a positive int"):
        M.MultilabelEvaluator(annotation_k=k)


def _sync_worker(rank, world, store, out):
    import torch.distributed as dist

    from mlsoftmax.decode import Decoder

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    s, y = _data(np.random.default_rng(0), n=57, k=11, ties=True, empty=True)
    ev = M.MultilabelEvaluator(ks=(1, 3), annotation_k=3, decoder=Decoder("top_k", 2), label_ap=False)
    mine = np.arange(rank, 57, world)  # uneven: 19 rows each for 3 ranks, 29/28 for 2
    ev.update(torch.from_numpy(s[mine]), torch.from_numpy(y[mine]))
    ev.sync()
    torch.save(ev.compute(), f"{out}/rank{rank}.pt")
    exit_rank()  # not dist.destroy_process_group(): see there


@pytest.mark.parametrize("world", [2, 3])
def test_evaluator_sync_all_reduces_to_the_single_process_metrics(world, tmp_path):
    """Each rank scores its rows; after sync every rank holds sklearn's metrics of all the rows."""
    import torch.multiprocessing as mp

    from mlsoftmax.decode import Decoder

    mp.start_processes(_sync_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
                       start_method="spawn", join=True)
    s, y = _data(np.random.default_rng(0), n=57, k=11, ties=True, empty=True)
    for rank in range(world):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert out["average_precision"] == pytest.approx(skm.label_ranking_average_precision_score(y, s), abs=1e-12)
        assert out["ranking_loss"] == pytest.approx(skm.label_ranking_loss(y, s), abs=1e-12)
        # MULAN coverage (sklearn's - 1 on each row that has a label; an empty row counts 0 in both)
        n_pos = (y.sum(1) > 0).sum()
        assert out["coverage"] == pytest.approx((skm.coverage_error(y, s) * len(y) - n_pos) / len(y), abs=1e-12)
        top2 = Decoder("top_k", 2)(torch.from_numpy(s)).numpy()  # the decoder's sets (it breaks ties its own way)
        assert out["micro_f1"] == pytest.approx(skm.f1_score(y, top2, average="micro"), abs=1e-12)
        assert out["macro_f1"] == pytest.approx(skm.f1_score(y, top2, average="macro", zero_division=0), abs=1e-12)
        assert "mean_average_precision" not in out


@pytest.mark.gpu
def test_gpu_evaluator_sync_over_nccl(tmp_path):
    """One NCCL rank: the CPU states travel through CUDA (NCCL reduces CUDA tensors only) and come back to the CPU."""
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        s, y = _data(np.random.default_rng(0), n=57, k=11, ties=True, empty=True)
        ev = M.MultilabelEvaluator(ks=(1, 3), annotation_k=3, label_ap=False)
        ev.update(torch.from_numpy(s), torch.from_numpy(y))
        ev.sync()
        out = ev.compute()
    finally:
        dist.destroy_process_group()
    assert out["average_precision"] == pytest.approx(skm.label_ranking_average_precision_score(y, s), abs=1e-12)
    assert out["ranking_loss"] == pytest.approx(skm.label_ranking_loss(y, s), abs=1e-12)


def test_evaluator_sync_refuses_label_ap():
    with pytest.raises(ValueError, match="label_ap=False"):
        M.MultilabelEvaluator().sync()
