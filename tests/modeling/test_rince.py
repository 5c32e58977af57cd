import math

import pytest
import torch
from torch.nn import functional as F

from rcdet.modeling.rince import RankedInfoNCELoss, iou_reweight, parse_loss_name, ranked_info_nce
from rcdet.ranking import temperatures_from_similarity, validate_temperatures
from rcdet.testing import reference_rince

RANK = torch.tensor([[1, 2, 3, -1], [2, 1, -1, 3], [3, -1, 1, 2], [-1, -1, 2, 1]])
BG = 4


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
    l1 = -0.5 * (math.log(E(2) / (E(2) + E(0) + E(-2))) + math.log(E(1.2) / (E(1.2) + E(0) + E(-2))))
    l2 = -math.log(E(0) / (E(0) + E(-1)))
    assert out.per_rank.tolist() == pytest.approx([l1, l2], abs=1e-12)


def test_closed_form_out_in_and_supcon():
    inputs = _closed_form_inputs()
    out = ranked_info_nce(*inputs, RANK, [0.5, 1.0], "out_in")
    l1 = -0.5 * (math.log(E(2) / (E(2) + E(0) + E(-2))) + math.log(E(1.2) / (E(1.2) + E(0) + E(-2))))
    l2 = -math.log(E(0) / (E(0) + E(-1)))
    assert out.loss.item() == pytest.approx(l1 + l2, abs=1e-12)
    form, max_rank = parse_loss_name("supcon_in")
    supcon = RankedInfoNCELoss(RANK, [0.5, 1.0][:max_rank], form)(*inputs)
    # r = 1: the rank-2 key becomes a plain negative.
    assert supcon.loss.item() == pytest.approx(-math.log((E(2) + E(1.2)) / (E(2) + E(1.2) + E(0) + E(-2))), abs=1e-12)


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


@pytest.mark.parametrize("variant", ["in", "out", "out_in"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_bruteforce_reference(variant, seed):
    z, y, k, ky, si, w = _random_case(seed, self_exclude=seed % 2 == 0, bg=seed % 3 != 0, weights=seed < 3)
    taus = [0.07, 0.2, 0.5]
    out = ranked_info_nce(z, y, k, ky, RANK, taus, variant, si, w)
    total, per_rank, counts = reference_rince(
        z.tolist(), y.tolist(), k.tolist(), ky.tolist(), RANK.tolist(), taus, variant,
        None if si is None else si.tolist(), None if w is None else w.tolist(),
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
    for variant in ("in", "out", "out_in"):
        out = ranked_info_nce(z, y, k, ky, RANK, taus, variant)
        total, per_rank, counts = reference_rince(z.tolist(), y.tolist(), k.tolist(), ky.tolist(), RANK.tolist(), taus, variant)
        assert counts[2] == 0 and out.per_rank[2].item() == 0.0
        assert out.loss.item() == pytest.approx(total, abs=1e-6)


@pytest.mark.parametrize("variant", ["in", "out", "out_in"])
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
    total, per_rank, counts = reference_rince(z.tolist(), y.tolist(), k.tolist(), ky.tolist(), RANK.tolist(), taus, variant, si.tolist())
    assert out.loss.item() == pytest.approx(total, abs=1e-9) and out.anchor_counts.tolist() == counts
    zz, kk = z.clone().requires_grad_(True), k.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ranked_info_nce(a, y, b, ky, RANK, taus, variant, si).loss, (zz, kk))


def test_self_exclusion_is_by_index_not_value():
    # A genuine key that scores exactly 0 must stay; only the anchor's own index is removed.
    z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    y, ky = torch.tensor([0]), torch.tensor([0, 0, 3, 0])
    out = ranked_info_nce(z, y, k, ky, RANK, [0.5], "in", self_index=torch.tensor([0]))
    expected = -math.log((E(0) + E(2)) / (E(0) + E(2) + E(-2)))
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("variant", ["in", "out", "out_in"])
def test_gradcheck(variant):
    z, y, k, ky, si, w = _random_case(3, n=4, m=7, d=3)
    z.requires_grad_(True)
    k.requires_grad_(True)
    fn = lambda a, b: ranked_info_nce(a, y, b, ky, RANK, [0.1, 0.3, 0.6], variant, si, w).loss
    assert torch.autograd.gradcheck(fn, (z, k))


def test_no_positive_gives_connected_zero():
    z = F.normalize(torch.randn(3, 4), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(5, 4), dim=1)
    out = ranked_info_nce(z, torch.tensor([0, 1, 2]), k, torch.full((5,), BG), RANK, [0.1, 0.2], "out_in")
    assert out.loss.item() == 0.0 and out.anchor_counts.tolist() == [0, 0]
    out.loss.backward()
    assert z.grad is not None and torch.all(z.grad == 0)
    empty = ranked_info_nce(z[:0], torch.tensor([], dtype=torch.long), k, torch.full((5,), BG), RANK, [0.1], "in")
    assert empty.loss.item() == 0.0


@pytest.mark.parametrize("variant", ["in", "out", "out_in"])
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


@pytest.mark.parametrize("variant", ["in", "out", "out_in"])
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
    out = ranked_info_nce(z, y_padded, k, ky, RANK, taus, variant, si, w, anchor_valid=valid, normalizer=norm)
    keep = valid.nonzero().squeeze(1)
    _, per_rank, counts = reference_rince(
        z[keep].tolist(), y[keep].tolist(), k.tolist(), ky.tolist(), RANK.tolist(), taus, variant, si[keep].tolist(), w[keep].tolist()
    )
    expected = [p * c / nm for p, c, nm in zip(per_rank, counts, norm.tolist())]
    assert out.per_rank.tolist() == pytest.approx(expected, abs=1e-9)
    assert out.anchor_counts.tolist() == counts
    zz, kk = z.clone().requires_grad_(True), k.clone().requires_grad_(True)
    fn = lambda a, b: ranked_info_nce(a, y_padded, b, ky, RANK, taus, variant, si, w, anchor_valid=valid, normalizer=norm).loss
    if seed % 2 == 0:
        assert torch.autograd.gradcheck(fn, (zz, kk))


def test_second_order_gradients_are_refused_not_wrong():
    z, y, k, ky, si, _ = _random_case(2, n=4, m=7, d=3)
    z.requires_grad_(True)
    (g,) = torch.autograd.grad(ranked_info_nce(z, y, k, ky, RANK, [0.1, 0.3], "out_in", si).loss, z, create_graph=True)
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
        assert positive_anchor_counts(y, valid, ky, RANK, 3).tolist() == out.anchor_counts.long().tolist()
