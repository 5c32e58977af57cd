"""
rcdet.modeling.rince: the ranked InfoNCE loss against closed forms and a brute-force reference,
its gradients, and what a GPU training run needs, checked on the CPU: no device-to-host syncs,
an operator count independent of the number of classes, mixed precision, clear label errors.
The configs' losses are built from their rankings.
"""

import math
import os

import pytest
import torch
from conftest import REPO
from torch.nn import functional as F

from rcdet.modeling.rince import RankedInfoNCELoss, iou_reweight, parse_loss_name, ranked_info_nce
from rcdet.ranking import temperatures_from_similarity, validate_temperatures
from rcdet.testing import SyncCounter, random_loss_inputs, reference_rince, ring_rank_matrix

RANK = torch.tensor([[1, 2, 3, -1], [2, 1, -1, 3], [3, -1, 1, 2], [-1, -1, 2, 1]])
BG = 4
# Every per-rank form; "supcon" is Khosla et al.'s loss (MODEL.RCDET.LOSS supcon with r = 1).
VARIANTS = ["in", "out", "out_in", "supcon"]


def _closed_form_inputs():
    # One anchor of class 0 at (1, 0); keys: two rank-1 positives (s = 1 and 0.6), one rank-2
    # positive (s = 0), one negative (s = -1).
    z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    ky = torch.tensor([0, 0, 1, 3])
    return z, y, k, ky


E = math.exp


def test_closed_form_in():
    out = ranked_info_nce(*_closed_form_inputs(), RANK, [0.5, 1.0], "in")
    l1 = -math.log((E(2) + E(1.2)) / (E(2) + E(1.2) + E(0) + E(-2)))
    l2 = -math.log(E(0) / (E(0) + E(-1)))
    assert out.per_rank.tolist() == pytest.approx([l1, l2], abs=1e-12)
    assert out.loss.item() == pytest.approx(l1 + l2, abs=1e-12)
    assert out.anchor_counts.tolist() == [1, 1]
    assert out.mean_similarity.tolist() == pytest.approx([0.8, 0.0, -1.0])


def test_closed_form_out():
    out = ranked_info_nce(*_closed_form_inputs(), RANK, [0.5, 1.0], "out")
    # N_1 = {rank-2 key, negative}: the other rank-1 positive is not a negative of rank 1.
    l1 = -0.5 * (
        math.log(E(2) / (E(2) + E(0) + E(-2))) + math.log(E(1.2) / (E(1.2) + E(0) + E(-2)))
    )
    l2 = -math.log(E(0) / (E(0) + E(-1)))
    assert out.per_rank.tolist() == pytest.approx([l1, l2], abs=1e-12)


def test_closed_form_out_in_and_rince_in_r1():
    inputs = _closed_form_inputs()
    out = ranked_info_nce(*inputs, RANK, [0.5, 1.0], "out_in")
    l1 = -0.5 * (
        math.log(E(2) / (E(2) + E(0) + E(-2))) + math.log(E(1.2) / (E(1.2) + E(0) + E(-2)))
    )
    l2 = -math.log(E(0) / (E(0) + E(-1)))
    assert out.loss.item() == pytest.approx(l1 + l2, abs=1e-12)
    form, max_rank = parse_loss_name("rince_in_r1")
    one_rank = RankedInfoNCELoss(RANK, [0.5, 1.0][:max_rank], form)(*inputs)
    # r = 1: the rank-2 key becomes a plain negative.
    assert one_rank.loss.item() == pytest.approx(
        -math.log((E(2) + E(1.2)) / (E(2) + E(1.2) + E(0) + E(-2))), abs=1e-12
    )


def _three_anchor_case():
    # Anchors z0, z1 (class 0) and z2 (class 1) are also keys 0-2; key 3 is class 1, key 4
    # class 0 (not anchors), key 5 background.
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    extra = torch.tensor([[-0.6, 0.8], [0.8, 0.6], [-1.0, 0.0]], dtype=torch.float64)
    return z, torch.tensor([0, 0, 1]), torch.cat([z, extra]), torch.tensor([0, 0, 1, 1, 0, BG])


def test_supcon_three_anchors_by_hand():
    z, y, k, ky = _three_anchor_case()
    # t = 1 / tau = 2. Similarities times t, each anchor's own key left out:
    # anchor 0: z1 1.2, z2 0, key3 -1.2, key4 1.6, bg -2; positives z1, key4
    # anchor 1: z0 1.2, z2 1.6, key3 0.56, key4 1.92, bg -1.2; positives z0, key4
    # anchor 2: z0 0, z1 1.6, key3 1.6, key4 1.2, bg 0; positive key3
    den0 = math.log(E(1.2) + E(0) + E(-1.2) + E(1.6) + E(-2))
    den1 = math.log(E(1.2) + E(1.6) + E(0.56) + E(1.92) + E(-1.2))
    den2 = math.log(E(0) + E(1.6) + E(1.6) + E(1.2) + E(0))
    ell = [den0 - (1.2 + 1.6) / 2, den1 - (1.2 + 1.92) / 2, den2 - 1.6]
    w = torch.tensor([0.9, 0.8, 1.0], dtype=torch.float64)  # FSCE's linear IoU reweighting
    eye = torch.eye(4, dtype=torch.long)
    out = ranked_info_nce(z, y, k, ky, eye, [0.5], "supcon", torch.arange(3), w)
    expected = sum(wi * li for wi, li in zip(w.tolist(), ell)) / 3
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.anchor_counts.tolist() == [3]
    # RINCE-out with one rank leaves the other positives out of each denominator: another loss.
    out_r1 = ranked_info_nce(z, y, k, ky, eye, [0.5], "out", torch.arange(3), w)

    def out_term(positives, negatives):
        sn = sum(E(v) for v in negatives)
        return sum(math.log1p(sn / E(p)) for p in positives) / len(positives)

    rince = [
        out_term([1.2, 1.6], [0, -1.2, -2]),
        out_term([1.2, 1.92], [1.6, 0.56, -1.2]),
        out_term([1.6], [0, 1.6, 1.2, 0]),
    ]
    expected_r1 = sum(wi * li for wi, li in zip(w.tolist(), rince)) / 3
    assert out_r1.loss.item() == pytest.approx(expected_r1, abs=1e-12)
    assert abs(expected_r1 - expected) > 0.1


def _pml_supcon(z, y, tau, ref=None, ref_labels=None):
    from pytorch_metric_learning.losses import SupConLoss

    if ref is None:
        return SupConLoss(temperature=tau)(z, y)
    return SupConLoss(temperature=tau)(z, y, ref_emb=ref, ref_labels=ref_labels)


@pytest.mark.parametrize("tau", [0.1, 0.07, 0.01])
@pytest.mark.parametrize("seed", range(3))
def test_supcon_equals_pytorch_metric_learning(seed, tau):
    # In-batch (every embedding an anchor and a key, self excluded by index) and against a
    # separate key set with background keys (a label no anchor has), value and gradient with
    # respect to the raw vectors before normalisation, which both losses see normalised.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (64,), generator=g)
    keys = torch.randn(40, 16, generator=g, dtype=torch.float64)
    key_labels = torch.randint(0, 6, (40,), generator=g)  # 5 = background
    eye = torch.eye(5, dtype=torch.long)

    def grads(fn):
        a = x.clone().requires_grad_(True)
        b = keys.clone().requires_grad_(True)
        loss = fn(F.normalize(a, dim=1), F.normalize(b, dim=1))
        loss.backward()
        return loss.item(), a.grad, b.grad

    ref, ref_ga, _ = grads(lambda a, b: _pml_supcon(a, y, tau))
    got, got_ga, _ = grads(
        lambda a, b: ranked_info_nce(a, y, a, y, eye, [tau], "supcon", torch.arange(64)).loss
    )
    assert got == pytest.approx(ref, abs=1e-6)
    torch.testing.assert_close(got_ga, ref_ga, atol=1e-6, rtol=0)

    ref, ref_ga, ref_gb = grads(lambda a, b: _pml_supcon(a, y, tau, b, key_labels))
    got, got_ga, got_gb = grads(
        lambda a, b: ranked_info_nce(a, y, b, key_labels, eye, [tau], "supcon").loss
    )
    assert got == pytest.approx(ref, abs=1e-6)
    torch.testing.assert_close(got_ga, ref_ga, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_gb, ref_gb, atol=1e-6, rtol=0)


def test_supcon_float32_matches_float64():
    g = torch.Generator().manual_seed(4)
    z = F.normalize(torch.randn(64, 16, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, 5, (64,), generator=g)
    eye = torch.eye(5, dtype=torch.long)
    ref = _pml_supcon(z, y, 0.1).item()
    z32 = z.float()
    got = ranked_info_nce(z32, y, z32, y, eye, [0.1], "supcon", torch.arange(64)).loss.item()
    assert got == pytest.approx(ref, abs=1e-5)


def test_one_rank_rince_out_is_not_supcon():
    # The case of the report that renamed the losses: 64 unit vectors of 5 classes, tau 0.1.
    torch.manual_seed(0)
    z = F.normalize(torch.randn(64, 16, dtype=torch.float64), dim=1)
    y = torch.randint(0, 5, (64,))
    eye = torch.eye(5, dtype=torch.long)
    assert _pml_supcon(z, y, 0.1).item() == pytest.approx(6.5746, abs=1e-4)
    out = ranked_info_nce(z, y, z, y, eye, [0.1], "out", torch.arange(64))
    assert out.loss.item() == pytest.approx(6.3105, abs=1e-4)
    assert parse_loss_name("supcon") == ("supcon", 1)
    assert parse_loss_name("rince_out_r1") == ("out", 1)


@pytest.mark.parametrize(
    "old, new, parsed",
    [("supcon_out", "rince_out_r1", ("out", 1)), ("supcon_in", "rince_in_r1", ("in", 1))],
)
def test_old_one_rank_names_still_work_with_a_warning(old, new, parsed):
    with pytest.warns(FutureWarning, match=f"'{old}'.*now named '{new}'") as record:
        assert parse_loss_name(old) == parsed
    assert len(record) == 1 and "\n" not in str(record[0].message)


def _random_case(seed, n=7, m=13, d=5, self_exclude=True, bg=True, weights=True):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, 4, (n,), generator=g)
    k = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    ky = torch.randint(0, 5 if bg else 4, (m,), generator=g)
    self_index = None
    if self_exclude:
        k[:n], ky[:n] = z, y
        self_index = torch.arange(n)
        self_index[1] = -1
    w = torch.rand(n, generator=g, dtype=torch.float64) if weights else None
    return z, y, k, ky, self_index, w


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", range(6))
def test_matches_bruteforce_reference(variant, seed):
    z, y, k, ky, si, w = _random_case(
        seed, self_exclude=seed % 2 == 0, bg=seed % 3 != 0, weights=seed < 3
    )
    taus = [0.07, 0.2, 0.5]
    out = ranked_info_nce(z, y, k, ky, RANK, taus, variant, si, w)
    total, per_rank, counts = reference_rince(
        z.tolist(),
        y.tolist(),
        k.tolist(),
        ky.tolist(),
        RANK.tolist(),
        taus,
        variant,
        None if si is None else si.tolist(),
        None if w is None else w.tolist(),
    )
    assert out.loss.item() == pytest.approx(total, abs=1e-6)
    assert out.per_rank.tolist() == pytest.approx(per_rank, abs=1e-6)
    assert out.anchor_counts.tolist() == counts


def test_empty_rank_and_uneven_positive_counts():
    # Classes 0 and 1 only: rank 3 has no positives anywhere, rank 2 only for some anchors.
    z, _, k, _, _, _ = _random_case(11, n=5, m=9, self_exclude=False)
    y = torch.tensor([0, 0, 1, 1, 0])
    ky = torch.tensor([0, 0, 0, 0, 1, 4, 4, 4, 4])
    taus = [0.1, 0.2, 0.3]
    for variant in VARIANTS:
        out = ranked_info_nce(z, y, k, ky, RANK, taus, variant)
        total, per_rank, counts = reference_rince(
            z.tolist(), y.tolist(), k.tolist(), ky.tolist(), RANK.tolist(), taus, variant
        )
        assert counts[2] == 0 and out.per_rank[2].item() == 0.0
        assert out.loss.item() == pytest.approx(total, abs=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ranked_class_without_any_key(variant):
    # Class 1 is rank 2 for class-0 anchors, but no key has class 1; class 2 (rank 3) has only
    # the anchors' own keys. Those ranks are empty: finite loss, finite and exact gradients.
    z, _, k, _, _, _ = _random_case(13, n=3, m=8, self_exclude=False)
    y = torch.tensor([0, 0, 2])
    k[:3] = z
    ky = torch.tensor([0, 0, 2, 3, 3, 4, 4, 0])
    si = torch.tensor([0, 1, 2])
    taus = [0.1, 0.2, 0.3]
    out = ranked_info_nce(z, y, k, ky, RANK, taus, variant, si)
    total, per_rank, counts = reference_rince(
        z.tolist(), y.tolist(), k.tolist(), ky.tolist(), RANK.tolist(), taus, variant, si.tolist()
    )
    assert (
        out.loss.item() == pytest.approx(total, abs=1e-9) and out.anchor_counts.tolist() == counts
    )
    zz, kk = z.clone().requires_grad_(True), k.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: ranked_info_nce(a, y, b, ky, RANK, taus, variant, si).loss, (zz, kk)
    )


def test_self_exclusion_is_by_index_not_value():
    # A genuine key that scores exactly 0 must stay; only the anchor's own index is removed.
    z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    y, ky = torch.tensor([0]), torch.tensor([0, 0, 3, 0])
    out = ranked_info_nce(z, y, k, ky, RANK, [0.5], "in", self_index=torch.tensor([0]))
    expected = -math.log((E(0) + E(2)) / (E(0) + E(2) + E(-2)))
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck(variant):
    z, y, k, ky, si, w = _random_case(3, n=4, m=7, d=3)
    z.requires_grad_(True)
    k.requires_grad_(True)

    def fn(a, b):
        return ranked_info_nce(a, y, b, ky, RANK, [0.1, 0.3, 0.6], variant, si, w).loss

    assert torch.autograd.gradcheck(fn, (z, k))


def test_no_positive_gives_connected_zero():
    z = F.normalize(torch.randn(3, 4), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(5, 4), dim=1)
    out = ranked_info_nce(
        z, torch.tensor([0, 1, 2]), k, torch.full((5,), BG), RANK, [0.1, 0.2], "out_in"
    )
    assert out.loss.item() == 0.0 and out.anchor_counts.tolist() == [0, 0]
    out.loss.backward()
    assert z.grad is not None and torch.all(z.grad == 0)
    empty = ranked_info_nce(
        z[:0], torch.tensor([], dtype=torch.long), k, torch.full((5,), BG), RANK, [0.1], "in"
    )
    assert empty.loss.item() == 0.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_finite_at_low_temperature_half_precision_and_identical_keys(variant):
    z, y, k, ky, si, _ = _random_case(5, n=16, m=40, d=8)
    for zz, kk, taus in [
        (z.float(), k.float(), [0.01, 0.02, 0.03]),
        (z.half(), k.half(), [0.01, 0.05, 0.1]),
        (z.float(), k[:1].float().expand(40, -1).contiguous(), [0.01, 0.02, 0.03]),
    ]:
        zz = zz.clone().requires_grad_(True)
        kk = kk.clone().requires_grad_(True)
        out = ranked_info_nce(zz, y, kk, ky, RANK, taus, variant, si)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert torch.isfinite(zz.grad).all() and torch.isfinite(kk.grad).all()


def test_far_positive_at_tiny_temperature_is_large_not_inf():
    # The positive is far below the denominator's max: a shared max would underflow to log(0).
    z = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    out = ranked_info_nce(z, torch.tensor([0]), k, torch.tensor([0, 3]), RANK, [0.01], "in")
    assert out.loss.item() == pytest.approx(200.0, rel=1e-4)


def test_temperature_validation_and_derivation():
    assert temperatures_from_similarity([1.0, 0.5, 0.0], 0.1, 0.3) == pytest.approx((0.1, 0.2, 0.3))
    for bad in ([0.2, 0.1], [0.1, 0.1], [0.0, 0.1], [-0.1], []):
        with pytest.raises(ValueError):
            validate_temperatures(bad)
    with pytest.raises(ValueError):
        temperatures_from_similarity([1.0, 0.5], 0.3, 0.1)
    with pytest.raises(ValueError):
        RankedInfoNCELoss(RANK, [0.3, 0.2], "in")
    with pytest.raises(ValueError, match="Unknown contrastive loss"):
        parse_loss_name("rince_sideways")
    with pytest.raises(ValueError, match="form must be one of"):
        RankedInfoNCELoss(RANK, [0.1], "sideways")


def test_iou_reweight():
    u = torch.tensor([0.5, 1.0])
    assert iou_reweight(u, "none") is None
    assert iou_reweight(u, "linear").tolist() == [0.5, 1.0]
    assert iou_reweight(u, "exp").tolist() == pytest.approx([math.exp(0.5) - 1, math.e - 1])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", range(4))
def test_void_keys_padded_anchors_and_normalizer_match_the_reference(variant, seed):
    # Keys labelled -1 are no keys (padding, empty queue slots); anchors with anchor_valid False
    # are padding rows (their labels may be anything); normalizer replaces the anchor counts.
    z, y, k, ky, si, w = _random_case(20 + seed, n=8, m=16, self_exclude=True, weights=True)
    ky[-5:] = -1
    valid = torch.ones(8, dtype=torch.bool)
    valid[[2, 5]] = False
    y_padded = y.clone()
    y_padded[2] = 99  # out of range, but a padding row
    taus = [0.01, 0.2, 0.5] if seed % 2 else [0.07, 0.2, 0.5]
    norm = torch.tensor([7.0, 3.0, 2.0], dtype=torch.float64)
    out = ranked_info_nce(
        z, y_padded, k, ky, RANK, taus, variant, si, w, anchor_valid=valid, normalizer=norm
    )
    keep = valid.nonzero().squeeze(1)
    _, per_rank, counts = reference_rince(
        z[keep].tolist(),
        y[keep].tolist(),
        k.tolist(),
        ky.tolist(),
        RANK.tolist(),
        taus,
        variant,
        si[keep].tolist(),
        w[keep].tolist(),
    )
    expected = [p * c / nm for p, c, nm in zip(per_rank, counts, norm.tolist())]
    assert out.per_rank.tolist() == pytest.approx(expected, abs=1e-9)
    assert out.anchor_counts.tolist() == counts
    zz, kk = z.clone().requires_grad_(True), k.clone().requires_grad_(True)

    def fn(a, b):
        return ranked_info_nce(
            a, y_padded, b, ky, RANK, taus, variant, si, w, anchor_valid=valid, normalizer=norm
        ).loss

    if seed % 2 == 0:
        assert torch.autograd.gradcheck(fn, (zz, kk))


def test_second_order_gradients_are_refused_not_wrong():
    z, y, k, ky, si, _ = _random_case(2, n=4, m=7, d=3)
    z.requires_grad_(True)
    (g,) = torch.autograd.grad(
        ranked_info_nce(z, y, k, ky, RANK, [0.1, 0.3], "out_in", si).loss, z, create_graph=True
    )
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|twice"):
        g.sum().backward()


def test_positive_anchor_counts_from_labels_equal_the_loss_counts():
    from rcdet.modeling.rince import positive_anchor_counts

    for seed in range(5):
        z, y, k, ky, si, _ = _random_case(40 + seed, n=9, m=14, self_exclude=True, weights=False)
        si[1] = 1  # every anchor is a key (the counts assume it)
        k[1] = z[1]
        ky[1] = y[1]
        ky[-3:] = torch.tensor([-1, 4, -1])
        valid = torch.rand(9, generator=torch.Generator().manual_seed(seed)) > 0.3
        out = ranked_info_nce(z, y, k, ky, RANK, [0.1, 0.2, 0.3], "in", si, anchor_valid=valid)
        assert (
            positive_anchor_counts(y, valid, ky, RANK, 3).tolist()
            == out.anchor_counts.long().tolist()
        )


# ---------------------------------------------------------------- syncs, operators, precision


def _loss_inputs(num_classes, n=96, m=512, d=32, dtype=torch.float32):
    z, y, k, ky, self_idx = random_loss_inputs(n, m, d, num_classes, torch.device("cpu"))
    return z.to(dtype).requires_grad_(True), y, k.to(dtype).requires_grad_(True), ky, self_idx


def _count_loss(num_classes, variant="out_in", r=3):
    z, y, k, ky, self_idx = _loss_inputs(num_classes)
    loss = RankedInfoNCELoss(
        ring_rank_matrix(num_classes, r, "cpu"), [0.1 * (i + 1) for i in range(r)], variant
    )
    with SyncCounter() as counter:
        loss(z, y, k, ky, self_idx, check_inputs=False).loss.backward()
    return counter


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_forward_and_backward_make_no_sync(variant):
    counter = _count_loss(20, variant)
    assert counter.syncs == 0, dict(counter.sync_ops)


@pytest.mark.parametrize("variant", ["out_in", "supcon"])
def test_operator_count_does_not_grow_with_the_number_of_classes(variant):
    ops20, ops80 = _count_loss(20, variant).ops, _count_loss(80, variant).ops
    assert abs(ops80 - ops20) <= 0.1 * ops20, (ops20, ops80)
    # ... but it does grow with the number of ranks (the count is real).
    assert _count_loss(20, r=4).ops > _count_loss(20, r=2).ops


def test_label_check_of_the_functional_api():
    z, y, k, ky, self_idx = _loss_inputs(5)
    bad = y.clone()
    bad[3] = 5
    with pytest.raises(ValueError, match=r"anchor_labels must lie in \[0, 5\).*\[5\]"):
        ranked_info_nce(
            z, bad, k, ky, ring_rank_matrix(5, 2, "cpu"), [0.1, 0.2], "out_in", self_idx
        )
    bad[3] = -1
    with pytest.raises(ValueError, match=r"\[-1\]"):
        ranked_info_nce(
            z, bad, k, ky, ring_rank_matrix(5, 2, "cpu"), [0.1, 0.2], "out_in", self_idx
        )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tau", [0.1, 0.01])
def test_bfloat16_autocast_close_to_float32(variant, tau):
    torch.manual_seed(0)
    proj = torch.nn.Linear(24, 16)
    feats = torch.randn(64, 24)
    labels = torch.randint(0, 6, (64,))
    ranks = ring_rank_matrix(6, 3, "cpu")
    taus = [tau, 2 * tau, 3 * tau]

    def run(autocast):
        proj.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            emb = F.normalize(proj(feats), dim=1)
            out = ranked_info_nce(emb, labels, emb, labels, ranks, taus, variant, torch.arange(64))
        out.loss.backward()
        return emb.dtype, out.loss.detach(), proj.weight.grad.clone()

    dtype16, loss16, grad16 = run(True)
    dtype32, loss32, grad32 = run(False)
    assert dtype16 == torch.bfloat16 and dtype32 == torch.float32  # autocast really was on
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert abs(loss16.item() - loss32.item()) <= 0.02 * abs(loss32.item())
    assert torch.isfinite(grad16).all()


def test_float16_inputs_at_tau_001_are_finite():
    z, y, k, ky, self_idx = _loss_inputs(8, dtype=torch.float16)
    out = ranked_info_nce(
        z, y, k, ky, ring_rank_matrix(8, 3, "cpu"), [0.01, 0.02, 0.03], "out_in", self_idx
    )
    out.loss.backward()
    assert (
        torch.isfinite(out.loss) and torch.isfinite(z.grad).all() and torch.isfinite(k.grad).all()
    )
    assert z.grad.dtype == torch.float16


# ---------------------------------------------------------------- the configs' losses


@pytest.mark.parametrize(
    "config", ["configs/voc_rince.yaml", "configs/voc_rince_text.yaml", "configs/voc_supcon.yaml"]
)
def test_voc_configs_load_their_rankings_for_voc_classes(config):
    from detectron2.config import get_cfg
    from detectron2.data.datasets.pascal_voc import CLASS_NAMES

    from rcdet.config import add_rcdet_config
    from rcdet.data.held_out import training_classes
    from rcdet.modeling.rince import build_contrastive_loss

    cfg = get_cfg()
    add_rcdet_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, config))
    # voc_2007_trainval metadata exists without the images
    loss = build_contrastive_loss(cfg, *training_classes(cfg))
    assert loss.rank_matrix.shape == (len(CLASS_NAMES), len(CLASS_NAMES))
    assert loss.num_ranks == (1 if "supcon" in config else 3)
    assert loss.form == ("supcon" if "supcon" in config else "out_in")


# ---------------------------------------------------------------- argument checks


def _checked_inputs():
    z, y, k, ky, self_idx = random_loss_inputs(12, 20, 8, 5, torch.device("cpu"))
    return dict(
        anchors=z,
        anchor_labels=y,
        keys=k,
        key_labels=ky,
        rank_matrix=ring_rank_matrix(5, 2, "cpu"),
        temperatures=[0.1, 0.2],
        self_index=self_idx,
    )


def test_non_finite_embeddings_are_refused_naming_the_argument():
    base = _checked_inputs()
    assert torch.isfinite(ranked_info_nce(**base).loss)
    for name, row, value in [("anchors", 3, math.nan), ("keys", 7, math.inf)]:
        args = dict(base, **{name: base[name].clone()})
        args[name][row, 0] = value
        with pytest.raises(ValueError, match=rf"^{name} contain NaN or Inf \(rows \[{row}\]\)"):
            ranked_info_nce(**args)
    # A NaN in a "no key" row would still reach every sum through the matmuls.
    args = dict(base, keys=base["keys"].clone(), key_labels=base["key_labels"].clone())
    args["key_labels"][5] = -1
    args["keys"][5] = math.nan
    with pytest.raises(ValueError, match=r"^keys contain NaN or Inf \(rows \[5\]\)"):
        ranked_info_nce(**args)


def test_unnormalised_embeddings_are_refused_padding_rows_are_not():
    base = _checked_inputs()
    with pytest.raises(ValueError) as e:
        ranked_info_nce(**dict(base, anchors=base["anchors"] * 9))
    assert str(e.value).startswith(
        "anchors must be L2-normalised (norm 1 within 0.001 for valid anchors); rows [0, 1, 2, 3,"
        " 4] have norms [9.0, 9.0, 9.0, 9.0, 9.0]."
    )
    keys = base["keys"].clone()
    keys[2] *= 0.5
    with pytest.raises(ValueError, match=r"^keys must be L2-normalised .* rows \[2\] have norms"):
        ranked_info_nce(**dict(base, keys=keys))
    # Zero rows are fine where they take part in nothing: keys labelled -1, padding anchors.
    labels, valid, anchors = base["key_labels"].clone(), torch.ones(12, dtype=torch.bool), None
    keys[2], labels[2] = 0.0, -1
    anchors = base["anchors"].clone()
    anchors[4], valid[4] = 0.0, False
    out = ranked_info_nce(
        **dict(base, keys=keys, key_labels=labels, anchors=anchors), anchor_valid=valid
    )
    assert torch.isfinite(out.loss)
    # Half precision passes within a few of its own roundings.
    half = ranked_info_nce(**dict(base, anchors=base["anchors"].half(), keys=base["keys"].half()))
    assert half.loss.item() == pytest.approx(ranked_info_nce(**base).loss.item(), rel=1e-2)


@pytest.mark.parametrize("check_inputs", [True, False])
def test_tensors_on_another_device_are_refused_before_any_computation(check_inputs):
    # The meta device stands in for a second accelerator: any computation on it would fail.
    base = _checked_inputs()
    for name in ("keys", "key_labels", "anchor_labels", "self_index"):
        args = dict(base, **{name: base[name].to("meta")})
        with pytest.raises(ValueError) as e:
            ranked_info_nce(**args, check_inputs=check_inputs)
        assert str(e.value) == (
            f"{name} is on meta but anchors on cpu; put every tensor argument on one device."
        )


@pytest.mark.parametrize(
    "name, bad, expected",
    [
        (
            "anchor_labels",
            lambda t: t[:-1],
            "length N = 12; got a torch.int64 tensor of shape (11,)",
        ),
        (
            "anchor_labels",
            lambda t: t.float(),
            "integer tensor of length N = 12; got a torch.float32",
        ),
        ("anchor_labels", lambda t: t[:, None], "got a torch.int64 tensor of shape (12, 1)"),
        ("anchor_labels", lambda t: t.tolist(), "integer tensor of length N = 12; got a list"),
        ("key_labels", lambda t: t[:5], "length M = 20; got a torch.int64 tensor of shape (5,)"),
        ("key_labels", lambda t: t.bool(), "integer tensor of length M = 20; got a torch.bool"),
        (
            "self_index",
            lambda t: t.double(),
            "integer tensor of length N = 12; got a torch.float64",
        ),
        ("anchors", lambda t: t[0], "floating-point (N, d) tensor; got a torch.float32 tensor of"),
        ("keys", lambda t: t.long(), "floating-point (M, d) tensor; got a torch.int64 tensor"),
    ],
)
def test_wrong_lengths_and_dtypes_name_the_argument(name, bad, expected):
    base = _checked_inputs()
    with pytest.raises(ValueError) as e:
        ranked_info_nce(**dict(base, **{name: bad(base[name])}))
    assert str(e.value).startswith(f"{name} must be a ") and expected in str(e.value)


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("anchor_weights", torch.ones(3), "anchor_weights must be a 1-D floating-point tensor of"),
        ("anchor_weights", -torch.ones(12), "anchor_weights must be finite and >= 0; got [-1.0,"),
        ("anchor_valid", torch.ones(12, dtype=torch.long), "anchor_valid must be a 1-D bool"),
        ("normalizer", torch.ones(1), "normalizer must be a 1-D numeric tensor of length r = 2"),
        ("normalizer", torch.tensor([2.0, math.nan]), "normalizer must be finite and >= 0"),
        ("world_size", 0, "world_size must be an integer >= 1, got 0."),
        ("self_index", torch.arange(12) + 20, "self_index must be -1 or a key index in [0, 20)"),
    ],
)
def test_optional_arguments_are_checked(name, value, expected):
    with pytest.raises(ValueError) as e:
        ranked_info_nce(**dict(_checked_inputs(), **{name: value}))
    assert str(e.value).startswith(expected)


def test_rank_matrix_must_be_square_integer_with_unit_diagonal():
    base = _checked_inputs()
    rank = base["rank_matrix"]
    for bad, described in [
        (rank[:3], "torch.int64 tensor of shape (3, 5)"),
        (rank[:, :4], "torch.int64 tensor of shape (5, 4)"),
        (rank.float(), "torch.float32 tensor of shape (5, 5)"),
    ]:
        with pytest.raises(ValueError) as e:
            ranked_info_nce(**dict(base, rank_matrix=bad))
        assert str(e.value) == (
            f"rank_matrix must be a square (K, K) integer tensor; got a {described} on cpu."
        )
    with pytest.raises(ValueError, match=r"^rank_matrix must have 1 on its diagonal.*\[0, 1, 1"):
        ranked_info_nce(**dict(base, rank_matrix=rank - torch.diag(torch.tensor([1, 0, 0, 0, 0]))))
    with pytest.raises(ValueError, match=r"^rank_matrix must be a square \(K, K\) integer matrix"):
        RankedInfoNCELoss(rank.float() + 0.5, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"^Temperatures must be a list of numbers, got '0.1'"):
        ranked_info_nce(**dict(base, temperatures="0.1"))


def test_narrow_integer_labels_and_a_cpu_rank_matrix_give_the_same_loss():
    base = _checked_inputs()
    expected = ranked_info_nce(**base)
    out = ranked_info_nce(
        **dict(
            base,
            anchor_labels=base["anchor_labels"].int(),
            key_labels=base["key_labels"].to(torch.int16),
            self_index=base["self_index"].int(),
        )
    )
    assert out.per_rank.tolist() == expected.per_rank.tolist()


def test_checks_make_one_sync_and_none_without_check_inputs():
    base = _checked_inputs()
    extra = dict(
        anchor_weights=torch.rand(12),
        anchor_valid=torch.arange(12) % 5 != 0,
        normalizer=torch.tensor([12.0, 6.0]),
    )
    with SyncCounter() as off:
        ranked_info_nce(**base, **extra, check_inputs=False)
    assert off.syncs == 0, dict(off.sync_ops)
    with SyncCounter() as on:
        ranked_info_nce(**base, **extra, check_inputs=True)
    assert on.sync_ops == {"Tensor.tolist": 1}
