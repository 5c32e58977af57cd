"""
RINCE: ranking InfoNCE over explicit anchors and keys, in plain PyTorch, and the builder that
turns ``MODEL.RCDET`` and the dataset's classes into it.

For anchor i with embedding z_i and label y_i, and keys k_j with labels y_j:
``s_ij = z_i . k_j`` and ``rho_ij = rank[y_i][y_j]`` (background or negative keys: infinity).

- positives of rank k:  ``P_k(i) = {j != self(i) : rho_ij == k}``
- denominator set:      ``D_k(i) = {j != self(i) : rho_ij >= k}``
- negatives of rank k:  ``N_k(i) = D_k(i) minus P_k(i)``

Variants (``ell_k``, per anchor):

- ``in``:  ``-log( sum_{P_k} e^{s/tau_k} / sum_{D_k} e^{s/tau_k} )``
- ``out``: ``-(1/|P_k|) sum_{p in P_k} log( e^{s_p/tau_k} /
  (e^{s_p/tau_k} + sum_{N_k} e^{s_n/tau_k}) )``
- ``out_in``: ``out`` for k = 1, ``in`` for k > 1.
- ``supcon``: ``-(1/|P_k|) sum_{p in P_k} log( e^{s_p/tau_k} / sum_{D_k} e^{s/tau_k} )``: with
  r = 1, D_1 is every key but the anchor's own, and this is the supervised contrastive loss
  ``L^sup_out`` of Khosla et al. (NeurIPS 2020), the one FSCE and pytorch-metric-learning use.
  RINCE's ``out`` with r = 1 differs: its denominator leaves the other positives out.

``ell_k`` is averaged over the anchors that have at least one rank-k positive (optionally
weighted per anchor) and ``L = sum_k mean_i ell_k(i)``.

Key labels: ``[0, K)`` are classes, ``>= K`` background (a negative of every anchor), and
``< 0`` "no key": padding and empty queue slots, excluded from every set.

:class:`_RankedInfoNCEFunction` evaluates the sets per (anchor, key class) with a written-out
backward. It makes no device-to-host synchronisation and launches a number of operators that
depends on r only, never on the number of classes, so it runs at full speed on a GPU.

:func:`build_contrastive_loss` parses the loss name once; the ranking
(:class:`rcdet.ranking.ClassRanking`) gives the rank matrix and the temperatures, the one-rank
identity included.
"""

import warnings
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from ..cli import find_input_file
from ..config import ConfigError
from ..ranking import ClassRanking, RankingError, load_ranking, validate_temperatures

__all__ = [
    "VARIANTS",
    "RankedInfoNCEOutput",
    "ranked_info_nce",
    "rank_code_table",
    "key_classes",
    "parse_loss_name",
    "build_contrastive_loss",
    "iou_reweight",
    "RankedInfoNCELoss",
    "positive_anchor_counts",
]

# Public loss names -> (per-rank form, rank limit). ``supcon`` is Khosla et al.'s L^sup_out;
# ``rince_*_r1`` are RINCE with one rank (the official RINCE code's one-rank baseline).
VARIANTS = {
    "rince_in": ("in", None),
    "rince_out": ("out", None),
    "rince_out_in": ("out_in", None),
    "rince_in_r1": ("in", 1),
    "rince_out_r1": ("out", 1),
    "supcon": ("supcon", 1),
}
# Earlier names of the one-rank RINCE losses, still accepted in saved configs.
DEPRECATED_NAMES = {"supcon_in": "rince_in_r1", "supcon_out": "rince_out_r1"}
_FORMS = ("in", "out", "out_in", "supcon")
_INF = float("inf")


def parse_loss_name(name: str) -> Tuple[str, Optional[int]]:
    """``"rince_out_in"`` -> ``("out_in", None)``; ``"supcon"`` -> ``("supcon", 1)``."""
    if name in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[name]
        warnings.warn(
            f"MODEL.RCDET.LOSS '{name}' is RINCE with one rank, not SupCon; it is now named"
            f" '{new}' ('supcon' is Khosla et al.'s loss).",
            FutureWarning,
            stacklevel=2,
        )
        name = new
    if name not in VARIANTS:
        raise ValueError(
            f"Unknown contrastive loss '{name}'; choose one of {sorted(VARIANTS)} or 'none'."
        )
    return VARIANTS[name]


def iou_reweight(ious: torch.Tensor, mode: str) -> Optional[torch.Tensor]:
    """Per-anchor weights from IoU as in FSCE: ``none``, ``linear`` (u) or ``exp`` (e^u - 1)."""
    if mode == "none":
        return None
    if mode == "linear":
        return ious
    if mode == "exp":
        return torch.exp(ious) - 1
    raise ValueError(f"Unknown IoU reweighting '{mode}'; choose none, linear or exp.")


@dataclass
class RankedInfoNCEOutput:
    loss: torch.Tensor  # scalar, L = sum_k mean_i ell_k(i)
    per_rank: torch.Tensor  # (r,) mean ell_k; 0 where no anchor has a rank-k positive
    anchor_counts: torch.Tensor  # (r,) this call's anchors with at least one rank-k positive
    normalizer: torch.Tensor  # (r,) the anchor counts each rank's mean runs over
    mean_similarity: (
        torch.Tensor
    )  # (r + 1,) mean s of rank-1..r positives, then negatives (nan if none)
    num_keys: torch.Tensor  # () keys that take part (labels >= 0), on the device
    num_anchors: torch.Tensor  # () valid anchors of this call, on the device


def rank_code_table(rank_matrix: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """
    (K, K + 2) code of every key class for every anchor class: 1..r = rank, r + 1 = negative
    (ranks above r, negative ranks, and column K = background), 0 = no key (column K + 1).
    """
    table = rank_matrix.to(torch.int64)
    negative = torch.full_like(table[:, :1], num_ranks + 1)
    # Built from existing tensors, never torch.tensor(...): on a GPU copying host values is a sync.
    table = torch.where((table >= 1) & (table <= num_ranks), table, negative)
    return torch.cat([table, negative, torch.zeros_like(negative)], dim=1)


def key_classes(key_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Column of each key in the code table: its class, K for background, K + 1 for no key."""
    cls = torch.where(
        key_labels >= num_classes, torch.full_like(key_labels, num_classes), key_labels
    )
    return torch.where(key_labels < 0, torch.full_like(key_labels, num_classes + 1), cls)


def _one_hot(index: torch.Tensor, num: int, dtype: torch.dtype) -> torch.Tensor:
    # F.one_hot reads min and max back to the host to validate them (on the CPU): two syncs.
    return (index[..., None] == torch.arange(num, device=index.device)).to(dtype)


def _class_sums(values: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """(N, M) @ (M, C) one-hot: per-(row, class) sums. With TF32 matmuls allowed by the user this
    rounds like the similarity matmul itself does; rcdet never changes that global setting."""
    return values @ onehot


def _set_logsumexp(class_lse: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    return class_lse.masked_fill(~member, -_INF).logsumexp(dim=1)


class _Saved(NamedTuple):
    """What the forward keeps for the backward, in ``ctx.save_for_backward``'s order."""

    anchors: torch.Tensor  # (N, d)
    keys: torch.Tensor  # (M, d)
    key_cls: torch.Tensor  # (M,) column of each key in the code table
    class_codes: torch.Tensor  # (N, C) code of each key class for each anchor
    shifted: torch.Tensor  # (N, M) similarities minus their (anchor, class) block max
    block_max: torch.Tensor  # (N, C)
    weights: torch.Tensor  # (N,) anchor weights, 0 for padding
    has_pos: torch.Tensor  # (N, r) whether the anchor has a positive at each rank
    n_pos: torch.Tensor  # (N, r) its positives per rank, at least 1
    self_col: torch.Tensor  # (N, 1) column of the anchor's own key (0 without one)
    has_self: torch.Tensor  # (N,) whether it has one
    avail: torch.Tensor  # (N, C) keys of each class, its own excluded


class _RankedInfoNCEFunction(torch.autograd.Function):
    """
    (anchors, keys) -> per-rank *sums* of ``w_i * ell_k(i)``, anchor counts and mean similarities.

    A rank only decides which key *classes* are positives, denominators or negatives of an
    anchor. So per rank one exp pass over the N x M similarities, shifted by the max of each
    (anchor, class) block, and one matmul with the keys' one-hot classes give a log-sum-exp per
    (anchor, class); every set sum of the definition is then a log-sum-exp over at most K + 2
    classes, each set shifted by its own maximum (exact at tau = 0.01). Only the ``out`` form
    needs per-positive terms; ``supcon`` reads the positives' similarity sums from per-class
    sums of the keys. Everything is dense and masked: no host syncs, no Python loop
    over classes. The backward is written out and rebuilds the N x M gradient once, rank by
    rank, for the two final matmuls.
    """

    @staticmethod
    def forward(
        ctx, anchors, keys, key_cls, class_codes, self_index, anchor_valid, weights, taus, forms
    ):
        with torch.autocast(device_type=anchors.device.type, enabled=False):
            n, num_cls = class_codes.shape
            r = len(taus)
            dtype = anchors.dtype
            onehot = _one_hot(key_cls, num_cls, dtype)  # (M, C)
            sim = anchors @ keys.t()

            # The anchor's own key takes part in nothing: -inf makes every exp below exactly 0.
            has_self = self_index >= 0
            self_col = self_index.clamp(min=0)[:, None]
            self_sim = sim.gather(1, self_col).squeeze(1)
            self_onehot = (
                _one_hot(key_cls.index_select(0, self_col.squeeze(1)), num_cls, dtype)
                * has_self[:, None]
            )
            sim.scatter_(
                1,
                self_col,
                torch.where(has_self, torch.full_like(self_sim, -_INF), self_sim)[:, None],
            )
            avail = (
                onehot.sum(dim=0)[None, :] - self_onehot
            )  # (N, C) keys of each class, self excluded

            # Per-code key counts and similarity sums (logging, |P|), from (K+2) x d class sums
            # of the keys rather than another pass over N x M.
            block_sum = (
                anchors @ (onehot.t() @ keys).t()
                - self_onehot * torch.where(has_self, self_sim, torch.zeros_like(self_sim))[:, None]
            )
            codes_1h = _one_hot(class_codes, r + 2, dtype) * anchor_valid[:, None, None].to(
                dtype
            )  # (N, C, r + 2)
            per_code_count = (codes_1h * avail[:, :, None]).sum(dim=1)  # (N, r + 2)
            mean_sim = (codes_1h * block_sum[:, :, None]).sum(dim=(0, 1))[1:] / per_code_count.sum(
                dim=0
            )[1:]
            has_pos = per_code_count[:, 1 : r + 1] > 0  # (N, r); invalid anchors count nothing
            anchor_counts = has_pos.sum(dim=0).to(dtype)
            n_pos = per_code_count[:, 1 : r + 1].clamp(min=1)

            block_max = torch.full((n, num_cls), -_INF, dtype=dtype, device=sim.device)
            block_max.scatter_reduce_(1, key_cls.expand(n, -1), sim, "amax")
            block_max = torch.where(
                torch.isfinite(block_max), block_max, torch.zeros_like(block_max)
            )
            shifted = sim.sub_(_per_key(block_max, key_cls))  # <= 0, -inf at self
            del sim

            per_rank_sum, saved = [], []
            for k in range(1, r + 1):
                t = 1.0 / taus[k - 1]
                class_lse = _class_sums((shifted * t).exp_(), onehot).log_() + t * block_max
                valid_k = has_pos[:, k - 1]
                lse_pos = _set_logsumexp(class_lse, class_codes == k)
                if forms[k - 1] == "in":
                    lse_other = _set_logsumexp(class_lse, class_codes >= k)
                    ell = lse_other - lse_pos
                elif forms[k - 1] == "supcon":
                    # -mean_p log softmax_D(p) = lse_D - t mean_p s_p, the positives' similarity
                    # sum read from the per-class sums above: no per-positive pass.
                    lse_other = _set_logsumexp(class_lse, class_codes >= k)
                    pos_sim = (block_sum * (class_codes == k)).sum(dim=1)
                    ell = lse_other - t * pos_sim / n_pos[:, k - 1]
                else:
                    lse_other = _set_logsumexp(class_lse, class_codes > k)
                    # -inf outside P_k makes softplus (and the backward's sigmoid) exactly 0 there.
                    gap = _positive_gaps(
                        shifted, block_max, key_cls, lse_other, t, class_codes == k
                    )
                    ell = (
                        _drop_self(F.softplus(gap), self_col, has_self).sum(dim=1) / n_pos[:, k - 1]
                    )
                    del gap
                ell = torch.where(valid_k, ell, torch.zeros_like(ell))
                per_rank_sum.append((weights * ell).sum())
                saved.append((lse_pos, lse_other))
            per_rank_sum = torch.stack(per_rank_sum)

        saved_tensors = _Saved(
            anchors,
            keys,
            key_cls,
            class_codes,
            shifted,
            block_max,
            weights,
            has_pos,
            n_pos,
            self_col,
            has_self,
            avail,
        )
        ctx.save_for_backward(*saved_tensors)
        ctx.meta = (taus, forms, saved)
        ctx.mark_non_differentiable(anchor_counts, mean_sim)
        return per_rank_sum, anchor_counts, mean_sim

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sum, _grad_counts, _grad_mean_sim):
        fwd = _Saved(*ctx.saved_tensors)  # the forward's tensors
        taus, forms, saved = ctx.meta
        present = fwd.avail > 0
        with torch.autocast(device_type=fwd.anchors.device.type, enabled=False):
            grad = None

            def add(part, row_scale):
                nonlocal grad
                if grad is None:
                    grad = part.mul_(row_scale[:, None])
                else:
                    grad.addcmul_(part, row_scale[:, None])

            def add_softmax_part(t, log_factor, row_scale):
                # exp(t s_ij + log_factor_ic - t block_max_ic): the per-class factor goes into the
                # exponent, so each part is one gather, one exp and one multiply-add.
                add(_per_key(log_factor, fwd.key_cls).add_(fwd.shifted, alpha=t).exp_(), row_scale)

            for k in range(1, len(taus) + 1):
                t = 1.0 / taus[k - 1]
                lse_pos, lse_other = saved[k - 1]
                valid_k = fwd.has_pos[:, k - 1]
                coef = torch.where(
                    valid_k, fwd.weights * grad_sum[k - 1] * t, torch.zeros_like(fwd.weights)
                )
                live = present & valid_k[:, None]
                if forms[k - 1] == "in":
                    # d ell / d(t s_ij) = 1[j in D] softmax_D(j) - 1[j in P] softmax_P(j)
                    add_softmax_part(
                        t,
                        _log_softmax_factor(
                            live & (fwd.class_codes >= k), fwd.block_max, lse_other, t
                        ),
                        coef,
                    )
                    add_softmax_part(
                        t,
                        _log_softmax_factor(
                            live & (fwd.class_codes == k), fwd.block_max, lse_pos, t
                        ),
                        -coef,
                    )
                elif forms[k - 1] == "supcon":
                    # d ell / d(t s_ij) = 1[j in D] softmax_D(j) - 1[j in P] / |P|
                    add_softmax_part(
                        t,
                        _log_softmax_factor(
                            live & (fwd.class_codes >= k), fwd.block_max, lse_other, t
                        ),
                        coef,
                    )
                    positive = _per_key(
                        (live & (fwd.class_codes == k)).to(fwd.shifted.dtype), fwd.key_cls
                    )
                    add(
                        _drop_self(positive, fwd.self_col, fwd.has_self),
                        -coef / fwd.n_pos[:, k - 1],
                    )
                    del positive
                else:
                    # positives: -sigmoid(N - t s_p) / |P|; negatives: mean_p sigmoid(N - t s_p)
                    # softmax_N(j)
                    sig = torch.sigmoid_(
                        _positive_gaps(
                            fwd.shifted,
                            fwd.block_max,
                            fwd.key_cls,
                            lse_other,
                            t,
                            fwd.class_codes == k,
                        )
                    )
                    sig = _drop_self(sig, fwd.self_col, fwd.has_self)
                    sig_mean = sig.sum(dim=1) / fwd.n_pos[:, k - 1]
                    add(sig, -coef / fwd.n_pos[:, k - 1])
                    del sig
                    add_softmax_part(
                        t,
                        _log_softmax_factor(
                            live & (fwd.class_codes > k), fwd.block_max, lse_other, t
                        ),
                        coef * sig_mean,
                    )
            grad_anchors = grad @ fwd.keys
            grad_keys = grad.t() @ fwd.anchors
        return grad_anchors, grad_keys, None, None, None, None, None, None, None


def _per_key(table, key_cls):
    """
    (N, C) per-(anchor, class) table -> (N, M) per-(anchor, key) (a gather: faster than index_select
    on dim 1).
    """
    return table.gather(1, key_cls.expand(table.shape[0], -1))


def _log_softmax_factor(member, block_max, lse, t):
    """
    log(softmax over the set at j) - t (s_ij - block_max_ic) per (anchor, class); -inf outside the
    set.
    """
    inside = t * block_max - torch.where(member, lse[:, None], torch.zeros_like(block_max))
    return torch.where(member, inside, torch.full_like(block_max, -_INF))


def _drop_self(x, self_col, has_self):
    """Zero each row's entry at its own key (the anchor's self pair), in place."""
    own = x.gather(1, self_col)
    return x.scatter_(1, self_col, torch.where(has_self[:, None], torch.zeros_like(own), own))


def _positive_gaps(shifted, block_max, key_cls, lse_neg, t, positive):
    """
    ``lse_N(i) - t s_ij`` where key j is a positive of anchor i, -inf elsewhere (NaN or +inf at
    self).
    """
    base = torch.where(
        positive, lse_neg[:, None] - t * block_max, torch.full_like(block_max, -_INF)
    )
    return _per_key(base, key_cls).sub_(shifted, alpha=t)


def ranked_info_nce(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    keys: torch.Tensor,
    key_labels: torch.Tensor,
    rank_matrix: torch.Tensor,
    temperatures: List[float],
    variant: str = "out_in",
    self_index: Optional[torch.Tensor] = None,
    anchor_weights: Optional[torch.Tensor] = None,
    anchor_valid: Optional[torch.Tensor] = None,
    normalizer: Optional[torch.Tensor] = None,
    anchor_keys: Optional[torch.Tensor] = None,
    world_size: int = 1,
    check_inputs: bool = True,
) -> RankedInfoNCEOutput:
    """
    Args:
        anchors: (N, d) L2-normalised anchor embeddings.
        anchor_labels: (N,) class indices in ``[0, K)``.
        keys: (M, d) L2-normalised key embeddings.
        key_labels: (M,) labels; ``>= K`` is background (a negative), ``< 0`` no key at all.
        rank_matrix: (K, K) integer ranks: 1 on the diagonal, 2..r similar, others negative.
        temperatures: tau_1 < ... < tau_r, one per rank; r = len(temperatures), and ranks
            above r in ``rank_matrix`` count as negatives.
        variant: ``in``, ``out``, ``out_in`` or ``supcon``.
        self_index: (N,) index of each anchor's own key in ``keys``, or -1; excluded by index.
        anchor_weights: (N,) optional per-anchor weights (e.g. IoU reweighting).
        anchor_valid: (N,) bool; rows that are False are padding and count nowhere.
        normalizer: (r,) anchor counts to average each rank over; default: this call's counts.
        anchor_keys: (M,) bool, instead of ``normalizer``: the keys that are anchors of the
            whole batch, of which this call's anchors are a share (each anchor's own key among
            them). Each rank's mean then runs over all of those anchors, counted from the key
            labels alone, so every worker of a data-parallel step gets the same normaliser
            from the gathered keys without another collective.
        world_size: the number of shares the batch's anchors are split into. ``loss`` and
            ``per_rank`` are this share's sum times ``world_size`` over the normaliser, so their
            mean over the shares (what DDP's gradient averaging computes) is the batch's mean.
        check_inputs: also check the values, in one read back to the host: anchors and keys
            finite (every row, padding included), valid anchors and keys with labels >= 0 of
            unit norm (within a few roundings of their dtype), valid anchor labels in
            ``[0, K)``, ``self_index`` in ``[-1, M)``, ``anchor_weights`` and ``normalizer``
            finite and >= 0, 1 on the rank matrix's diagonal. Training passes False because
            its inputs are correct by construction, so the loss makes no sync at all. Shapes,
            dtypes and devices are checked either way: that reads no value.

    Each failed check is a ValueError naming the argument. Integer labels of any width are
    accepted; the rank matrix may live on another device (it is copied to the anchors').

    Half-precision inputs, and calls under autocast, are computed in float32: e^(s / 0.01)
    overflows float16.
    """
    if variant not in _FORMS:
        raise ValueError(f"variant must be one of {_FORMS}, got '{variant}'.")
    if normalizer is not None and anchor_keys is not None:
        raise ValueError("Give normalizer or anchor_keys, not both.")
    taus = validate_temperatures(temperatures)
    r = len(taus)
    optional = dict(
        self_index=self_index,
        anchor_weights=anchor_weights,
        anchor_valid=anchor_valid,
        normalizer=normalizer,
        anchor_keys=anchor_keys,
    )
    _check_structure(anchors, anchor_labels, keys, key_labels, rank_matrix, r, world_size, optional)
    anchor_labels, key_labels = anchor_labels.long(), key_labels.long()
    self_index = self_index.long() if self_index is not None else None
    forms = tuple(
        ("out" if k == 1 else "in") if variant == "out_in" else variant for k in range(1, r + 1)
    )
    num_classes = rank_matrix.shape[0]
    n, m = anchors.shape[0], keys.shape[0]
    device = anchors.device
    if anchor_valid is None:
        anchor_valid = torch.ones(n, dtype=torch.bool, device=device)
    if check_inputs:
        _check_values(
            anchors,
            anchor_labels,
            keys,
            key_labels,
            rank_matrix,
            anchor_valid,
            self_index,
            anchor_weights,
            normalizer,
        )

    dtype = torch.promote_types(anchors.dtype, torch.float32)
    with torch.autocast(device_type=device.type, enabled=False):
        z, k_all = anchors.to(dtype), keys.to(dtype)
        num_keys = (key_labels >= 0).sum()
        num_anchors = anchor_valid.sum()
        if anchor_keys is not None:
            normalizer = positive_anchor_counts(
                key_labels, anchor_keys, key_labels, rank_matrix.to(device), r
            )
        if n == 0 or m == 0:
            zero = z.sum() * 0.0 + k_all.sum() * 0.0
            counts = z.new_zeros(r)
            return RankedInfoNCEOutput(
                loss=zero,
                per_rank=z.new_zeros(r),
                anchor_counts=counts,
                normalizer=counts if normalizer is None else normalizer.to(dtype),
                mean_similarity=z.new_full((r + 1,), float("nan")),
                num_keys=num_keys,
                num_anchors=num_anchors,
            )
        with torch.no_grad():
            table = rank_code_table(rank_matrix.to(device), r)
            safe_labels = torch.where(anchor_valid, anchor_labels, torch.zeros_like(anchor_labels))
            class_codes = table.index_select(0, safe_labels)
            key_cls = key_classes(key_labels, num_classes)
            if self_index is None:
                self_index = torch.full((n,), -1, dtype=torch.int64, device=device)
            self_index = torch.where(anchor_valid, self_index, torch.full_like(self_index, -1))
            weights = anchor_weights.to(dtype) if anchor_weights is not None else z.new_ones(n)
            weights = weights * anchor_valid.to(dtype)

        sums, counts, mean_sim = _RankedInfoNCEFunction.apply(
            z, k_all, key_cls, class_codes, self_index, anchor_valid, weights, taus, forms
        )
        normalizer = counts if normalizer is None else normalizer.to(dtype)
        per_rank = sums * world_size / normalizer.clamp(min=1)
        # Connected to the graph even when no anchor has a positive, so DDP sees every parameter.
        loss = per_rank.sum() + z.sum() * 0.0 + k_all.sum() * 0.0
    return RankedInfoNCEOutput(
        loss=loss,
        per_rank=per_rank,
        anchor_counts=counts,
        normalizer=normalizer,
        mean_similarity=mean_sim,
        num_keys=num_keys,
        num_anchors=num_anchors,
    )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"a {type(x).__name__}"


_KINDS = {
    "floating-point": lambda t: t.is_floating_point(),
    "integer": lambda t: not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
    "bool": lambda t: t.dtype == torch.bool,
    "numeric": lambda t: not t.is_complex() and t.dtype != torch.bool,
}


def _check_structure(
    anchors, anchor_labels, keys, key_labels, rank_matrix, r, world_size, optional
):
    """Shapes, dtypes and devices: tensor metadata only, never a read from the device."""
    for name, x, rows in (("anchors", anchors, "N"), ("keys", keys, "M")):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError(
                f"{name} must be a floating-point ({rows}, d) tensor; got {_describe(x)}."
            )
    if anchors.shape[1] != keys.shape[1]:
        raise ValueError(
            f"anchors (N, d) and keys (M, d) must share d; got {tuple(anchors.shape)},"
            f" {tuple(keys.shape)}."
        )
    if (
        not isinstance(rank_matrix, torch.Tensor)
        or rank_matrix.dim() != 2
        or rank_matrix.shape[0] != rank_matrix.shape[1]
        or not _KINDS["integer"](rank_matrix)
    ):
        raise ValueError(
            f"rank_matrix must be a square (K, K) integer tensor; got {_describe(rank_matrix)}."
        )
    n, m = anchors.shape[0], keys.shape[0]
    expected = [
        ("anchor_labels", anchor_labels, "integer", "N", n),
        ("key_labels", key_labels, "integer", "M", m),
        ("self_index", optional["self_index"], "integer", "N", n),
        ("anchor_weights", optional["anchor_weights"], "floating-point", "N", n),
        ("anchor_valid", optional["anchor_valid"], "bool", "N", n),
        ("normalizer", optional["normalizer"], "numeric", "r", r),
        ("anchor_keys", optional["anchor_keys"], "bool", "M", m),
    ]
    for name, x, kind, dim, size in expected:
        if x is None and name not in ("anchor_labels", "key_labels"):
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (size,) or not _KINDS[kind](x):
            raise ValueError(
                f"{name} must be a 1-D {kind} tensor of length {dim} = {size}; got {_describe(x)}."
            )
    # The rank matrix is small and copied to the anchors' device; everything else must be there.
    for name, x in [("keys", keys)] + [(e[0], e[1]) for e in expected]:
        if x is not None and x.device != anchors.device:
            raise ValueError(
                f"{name} is on {x.device} but anchors on {anchors.device}; put every tensor"
                " argument on one device."
            )
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}.")


def _unit_norm_tolerance(x: torch.Tensor) -> float:
    # A few roundings of the input dtype: bfloat16 rows normalised in bfloat16 pass.
    return max(1e-3, 4 * torch.finfo(x.dtype).eps)


def _check_values(
    anchors,
    anchor_labels,
    keys,
    key_labels,
    rank_matrix,
    anchor_valid,
    self_index,
    anchor_weights,
    normalizer,
):
    """
    Everything the loss needs of the values, in one read back to the host (more only to describe
    a failure). Every row of anchors and keys must be finite, even padding, because it enters the
    similarity matmuls; the unit norm is asked of valid anchors and of real keys (labels >= 0).
    """
    num_classes, m = rank_matrix.shape[0], keys.shape[0]

    def off_unit(x, rows):
        return rows & ((x.float().norm(dim=1) - 1).abs() > _unit_norm_tolerance(x))

    checks = [
        ("anchors", ~torch.isfinite(anchors).all(dim=1)),
        ("keys", ~torch.isfinite(keys).all(dim=1)),
        ("anchors", off_unit(anchors, anchor_valid)),
        ("keys", off_unit(keys, key_labels >= 0)),
        ("anchor_labels", anchor_valid & ((anchor_labels < 0) | (anchor_labels >= num_classes))),
        ("rank_matrix", (rank_matrix.diagonal() != 1).to(anchors.device)),
    ]
    if self_index is not None:
        checks.append(("self_index", anchor_valid & ((self_index < -1) | (self_index >= m))))
    for name, x in (("anchor_weights", anchor_weights), ("normalizer", normalizer)):
        if x is not None:
            checks.append((name, ~torch.isfinite(x) | (x < 0)))
    failed = torch.stack([bad.any() for _, bad in checks]).tolist()
    if not any(failed):
        return
    index = failed.index(True)
    name, bad = checks[index]
    rows = bad.nonzero().flatten()[:5].tolist()
    if index < 2:
        raise ValueError(
            f"{name} contain NaN or Inf (rows {rows}); the embeddings diverged or the inputs"
            " are broken."
        )
    if index < 4:
        x = anchors if name == "anchors" else keys
        norms = [round(v, 4) for v in x[rows].float().norm(dim=1).tolist()]
        which = "valid anchors" if name == "anchors" else "keys with labels >= 0"
        raise ValueError(
            f"{name} must be L2-normalised (norm 1 within {_unit_norm_tolerance(x):g} for"
            f" {which}); rows {rows} have norms {norms}. Apply F.normalize(x, dim=1)."
        )
    if name == "anchor_labels":
        raise ValueError(
            f"anchor_labels must lie in [0, {num_classes}) (the rank matrix is {num_classes} x"
            f" {num_classes}); got {sorted(set(anchor_labels[bad].tolist()))}. Background or"
            " ignored regions are keys, never anchors."
        )
    if name == "rank_matrix":
        raise ValueError(
            "rank_matrix must have 1 on its diagonal (each class is rank 1 for itself); got"
            f" diagonal {rank_matrix.diagonal().tolist()}."
        )
    if name == "self_index":
        raise ValueError(
            f"self_index must be -1 or a key index in [0, {m}) for valid anchors; got"
            f" {sorted(set(self_index[bad].tolist()))[:5]}."
        )
    values = anchor_weights if name == "anchor_weights" else normalizer
    raise ValueError(f"{name} must be finite and >= 0; got {values[bad][:5].tolist()}.")


def positive_anchor_counts(
    anchor_labels, anchor_valid, key_labels, rank_matrix, num_ranks
) -> torch.Tensor:
    """
    (r,) number of valid anchors with at least one rank-k positive among ``key_labels``, each
    anchor's own key (which must be among them) excluded. Depends on labels only, so every
    worker can count the anchors of the global batch from gathered labels, without the loss.
    """
    num_classes = rank_matrix.shape[0]
    num_cls = num_classes + 2
    table = rank_code_table(rank_matrix.to(anchor_labels.device), num_ranks)  # (K, K + 2)
    key_count = _one_hot(key_classes(key_labels, num_classes), num_cls, torch.int64).sum(dim=0)
    # Keys of each class an anchor of class y can see: all of them, minus its own key in class y.
    avail = key_count[None, :] - _one_hot(
        torch.arange(num_classes, device=table.device), num_cls, torch.int64
    )
    has_pos = (_one_hot(table, num_ranks + 2, torch.int64) * avail[:, :, None]).sum(dim=1)[
        :, 1 : num_ranks + 1
    ] > 0  # (K, r)
    safe = torch.where(anchor_valid, anchor_labels, torch.zeros_like(anchor_labels)).clamp(
        0, num_classes - 1
    )
    return (has_pos.index_select(0, safe) & anchor_valid[:, None]).sum(dim=0)


class RankedInfoNCELoss(nn.Module):
    """:func:`ranked_info_nce` with a fixed rank matrix, temperatures and form."""

    def __init__(self, rank_matrix: torch.Tensor, temperatures: List[float], form: str = "out_in"):
        super().__init__()
        if form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS}, got '{form}'.")
        self.form = form
        self.temperatures = validate_temperatures(temperatures)
        rank = torch.as_tensor(rank_matrix)
        if rank.dim() != 2 or rank.shape[0] != rank.shape[1] or not _KINDS["integer"](rank):
            raise ValueError(
                f"rank_matrix must be a square (K, K) integer matrix; got {_describe(rank)}."
            )
        # A buffer so it follows the module's device; not persistent: it comes from the config.
        self.register_buffer("rank_matrix", rank.to(torch.int64), persistent=False)

    @property
    def num_ranks(self) -> int:
        return len(self.temperatures)

    @property
    def num_classes(self) -> int:
        return self.rank_matrix.shape[0]

    @torch.jit.unused
    def forward(self, anchors, anchor_labels, keys, key_labels, self_index=None, **kwargs):
        """Arguments as in :func:`ranked_info_nce` (``anchor_weights``, ``anchor_keys``, ...)."""
        return ranked_info_nce(
            anchors,
            anchor_labels,
            keys,
            key_labels,
            self.rank_matrix,
            self.temperatures,
            variant=self.form,
            self_index=self_index,
            **kwargs,
        )

    def extra_repr(self) -> str:
        return f"form={self.form}, temperatures={list(self.temperatures)}"


def build_contrastive_loss(
    cfg, class_names: Sequence[str], all_class_names: Optional[Sequence[str]] = None
) -> Optional[RankedInfoNCELoss]:
    """
    The loss that ``MODEL.RCDET`` describes for a model of ``class_names``, or None when
    ``MODEL.RCDET.LOSS`` is ``none``. The ranking file is read for ``all_class_names`` (the
    base dataset's classes, held-out ones included) and restricted to ``class_names``; it gives
    the rank matrix and the temperatures. A one-rank loss (``supcon``, ``rince_*_r1``) needs no
    file.
    """
    rc = cfg.MODEL.RCDET
    if rc.LOSS == "none":
        return None
    try:
        form, max_rank = parse_loss_name(rc.LOSS)
    except ValueError as e:
        raise ConfigError(f"MODEL.RCDET.LOSS: {e}") from None
    if max_rank == 1 and not rc.RANKING_FILE:
        ranking = ClassRanking.identity(class_names)
    else:
        if not rc.RANKING_FILE:
            raise ConfigError(
                f"MODEL.RCDET.RANKING_FILE is empty, but MODEL.RCDET.LOSS = {rc.LOSS} needs a"
                " ranking."
            )
        # A config from rcdet.engine.setup_cfg names the file as found; one built in code
        # names it relative to the working directory.
        path = find_input_file(rc.RANKING_FILE, "MODEL.RCDET.RANKING_FILE")
        try:
            ranking = load_ranking(
                path,
                list(all_class_names or class_names),
                allow_uncovered=rc.RANKING_ALLOW_UNCOVERED or None,
                max_rank=max_rank or rc.MAX_RANK or None,
            ).subset(class_names)
        except RankingError as e:
            raise ConfigError(f"MODEL.RCDET.RANKING_FILE: {e}") from None
    try:
        taus = ranking.temperatures(rc.TAU_MIN, rc.TAU_MAX, rc.TEMPERATURES)
    except ValueError as e:
        key = "MODEL.RCDET.TEMPERATURES" if rc.TEMPERATURES else "MODEL.RCDET.TAU_MIN/TAU_MAX"
        raise ConfigError(f"{key}: {e}") from None
    return RankedInfoNCELoss(torch.as_tensor(ranking.matrix), taus, form)
