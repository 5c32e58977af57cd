"""
RINCE: ranking InfoNCE over explicit anchors and keys (plain PyTorch, no detectron2).

For anchor i with embedding z_i and label y_i, and keys k_j with labels y_j:
``s_ij = z_i . k_j`` and ``rho_ij = rank[y_i][y_j]`` (background or negative keys: infinity).

- positives of rank k:  ``P_k(i) = {j != self(i) : rho_ij == k}``
- denominator set:      ``D_k(i) = {j != self(i) : rho_ij >= k}``
- negatives of rank k:  ``N_k(i) = D_k(i) minus P_k(i)``

Variants (``ell_k``, per anchor):

- ``in``:  ``-log( sum_{P_k} e^{s/tau_k} / sum_{D_k} e^{s/tau_k} )``
- ``out``: ``-(1/|P_k|) sum_{p in P_k} log( e^{s_p/tau_k} / (e^{s_p/tau_k} + sum_{N_k} e^{s_n/tau_k}) )``
- ``out_in``: ``out`` for k = 1, ``in`` for k > 1.

``ell_k`` is averaged over the anchors that have at least one rank-k positive (optionally
weighted per anchor) and ``L = sum_k mean_i ell_k(i)``. SupCon is r = 1.

The terms are evaluated by :class:`_RankedInfoNCEFunction` on keys grouped by class, with a
written-out backward, so that time and memory stay close to one SupCon pass for any r.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "VARIANTS",
    "RankedInfoNCEOutput",
    "ranked_info_nce",
    "parse_variant",
    "temperatures_from_similarity",
    "validate_temperatures",
    "iou_reweight",
    "RankedInfoNCELoss",
]

# Public loss names -> (per-rank form, forced max rank). SupCon is RINCE with r = 1.
VARIANTS = {
    "rince_in": ("in", None),
    "rince_out": ("out", None),
    "rince_out_in": ("out_in", None),
    "supcon_in": ("in", 1),
    "supcon_out": ("out", 1),
}
_FORMS = ("in", "out", "out_in")


def _finite_or_inf(lse: torch.Tensor) -> torch.Tensor:
    """A row whose set is empty (lse = -inf) contributes nothing: +inf makes its exp factor 0, not inf * 0."""
    return torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))[:, None]


def parse_variant(name: str):
    """``"rince_out_in"`` -> ``("out_in", None)``; ``"supcon_out"`` -> ``("out", 1)``."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown contrastive loss '{name}'; choose one of {sorted(VARIANTS)} or 'none'.")
    return VARIANTS[name]


def validate_temperatures(temperatures: Sequence[float]) -> tuple:
    taus = tuple(float(t) for t in temperatures)
    if not taus:
        raise ValueError("At least one temperature is needed (tau_1 for rank 1).")
    if any(not math.isfinite(t) or t <= 0 for t in taus):
        raise ValueError(f"Temperatures must be finite and positive, got {list(taus)}.")
    if any(b <= a for a, b in zip(taus, taus[1:])):
        raise ValueError(f"Temperatures must increase with rank (tau_1 < tau_2 < ...), got {list(taus)}.")
    return taus


def temperatures_from_similarity(similarities: Sequence[float], tau_min: float, tau_max: float) -> tuple:
    """``tau_k = tau_min + (1 - s_k)(tau_max - tau_min)`` with ``s_1 = 1`` (the first entry)."""
    if not (tau_min > 0 and tau_max > tau_min):
        raise ValueError(f"Need 0 < tau_min < tau_max, got tau_min={tau_min}, tau_max={tau_max}.")
    return validate_temperatures([tau_min + (1.0 - float(s)) * (tau_max - tau_min) for s in similarities])


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
    anchor_counts: torch.Tensor  # (r,) anchors with at least one rank-k positive
    mean_similarity: torch.Tensor  # (r + 1,) mean s of rank-1..r positives, then negatives (nan if none)
    num_keys: int = 0  # set by RankedInfoNCEWithMemory: batch keys of every worker + queue


class _RankedInfoNCEFunction(torch.autograd.Function):
    """
    (anchors, keys grouped by class) -> per-rank mean losses, with a hand-written backward.

    Keys arrive grouped by class, so each class is a contiguous column block of the N x M
    similarity matrix. A rank only decides which *classes* are positives, denominators or
    negatives of an anchor, so one exp pass over the blocks per rank gives a log-sum-exp per
    (anchor, class), each shifted by its own block max (exact even at tau = 0.01), and every set
    sum of the definition becomes a small log-sum-exp over classes. Only the ``out`` form needs
    per-positive terms, evaluated on the positive blocks alone. The backward rebuilds the
    gradient block by block straight into the two matmuls, so no N x M gradient is ever held.
    """

    @staticmethod
    def forward(ctx, anchors, keys, class_codes, offsets, self_index, self_class, taus, forms, weights):
        # class_codes: (N, C) rank code of each key class for each anchor: 1..r = rank,
        # r + 1 = negative. The keys of class c are keys[offsets[c]:offsets[c + 1]].
        n, num_cls = class_codes.shape
        r = len(taus)
        sim = anchors @ keys.t()
        blocks = [(c, offsets[c], offsets[c + 1]) for c in range(num_cls) if offsets[c + 1] > offsets[c]]
        has_self = self_index >= 0
        rows, cols = torch.nonzero(has_self).squeeze(1), self_index[has_self]

        # Per-(anchor, class) key counts and similarity sums without the self pair (logging, |P|).
        counts = sim.new_zeros(n, num_cls)
        block_sum = sim.new_zeros(n, num_cls)
        for c, a, b in blocks:
            counts[:, c] = b - a
            block_sum[:, c] = sim[:, a:b].sum(dim=1)
        counts[rows, self_class[has_self]] -= 1
        block_sum[rows, self_class[has_self]] -= sim[rows, cols]
        codes = [class_codes == code for code in range(1, r + 2)]
        mean_sim = torch.stack([(block_sum * m).sum() / (counts * m).sum() for m in codes])

        # Self pairs take part in nothing: at -inf every exp below is exactly 0 there.
        sim[rows, cols] = float("-inf")
        block_max = sim.new_zeros(n, num_cls)
        for c, a, b in blocks:
            block_max[:, c] = sim[:, a:b].amax(dim=1)
        block_max = torch.where(torch.isfinite(block_max), block_max, torch.zeros_like(block_max))

        per_rank, anchor_counts, saved = sim.new_zeros(r), sim.new_zeros(r), []
        for k in range(1, r + 1):
            t = 1.0 / taus[k - 1]
            class_lse = sim.new_full((n, num_cls), float("-inf"))
            for c, a, b in blocks:
                total = sim[:, a:b].sub(block_max[:, c : c + 1]).mul_(t).exp_().sum(dim=1)
                class_lse[:, c] = total.log() + t * block_max[:, c]
            pos_cls = codes[k - 1]
            lse_pos = class_lse.masked_fill(~pos_cls, float("-inf")).logsumexp(dim=1)
            valid = torch.isfinite(lse_pos)
            n_valid = int(valid.sum())
            anchor_counts[k - 1] = n_valid
            if n_valid == 0:
                saved.append(None)
                continue
            if forms[k - 1] == "in":
                lse_den = class_lse.masked_fill(class_codes < k, float("-inf")).logsumexp(dim=1)
                ell = lse_den - lse_pos
                saved.append(("in", valid, lse_den, lse_pos, None))
            else:
                n_pos = (counts * pos_cls).sum(dim=1).clamp(min=1)
                lse_neg = class_lse.masked_fill(class_codes <= k, float("-inf")).logsumexp(dim=1)
                # ell = mean_p softplus(N - t s_p); the backward also needs mean_p sigmoid(N - t s_p).
                ell, sig_mean = sim.new_zeros(n), sim.new_zeros(n)
                for c, a, b in blocks:
                    members = torch.nonzero(pos_cls[:, c] & valid).squeeze(1)
                    if members.numel() == 0:
                        continue
                    gap = lse_neg[members, None] - t * sim[members, a:b]
                    finite = torch.isfinite(gap)  # drops the self pair
                    ell[members] += F.softplus(gap).masked_fill_(~finite, 0.0).sum(dim=1)
                    sig_mean[members] += torch.sigmoid(gap).masked_fill_(~finite, 0.0).sum(dim=1)
                saved.append(("out", valid, lse_neg, sig_mean / n_pos, n_pos))
                ell = ell / n_pos
            ell = torch.where(valid, ell, torch.zeros_like(ell))
            per_rank[k - 1] = (weights * ell).sum() / n_valid

        ctx.save_for_backward(anchors, keys, sim, block_max, class_codes, weights, anchor_counts)
        ctx.meta = (blocks, taus, saved)
        ctx.mark_non_differentiable(anchor_counts, mean_sim)
        return per_rank, anchor_counts, mean_sim

    @staticmethod
    def backward(ctx, grad_per_rank, _grad_counts, _grad_mean_sim):
        anchors, keys, sim, block_max, class_codes, weights, anchor_counts = ctx.saved_tensors
        blocks, taus, saved = ctx.meta
        zeros = torch.zeros_like(block_max)
        # Per rank: a (N, C) scale of exp(t (s - block_max)) per class block, and for the out
        # form the per-positive sigmoid terms. coef_i = d(per_rank_k)/d(ell_k(i)) * t.
        terms = []
        for k, entry in enumerate(saved, start=1):
            if entry is None:
                continue
            form, valid, lse_a, b_vec, n_pos = entry
            t = 1.0 / taus[k - 1]
            coef = torch.where(valid, weights, torch.zeros_like(weights)) * (grad_per_rank[k - 1] * t / anchor_counts[k - 1])
            lse_safe = _finite_or_inf(lse_a)
            if form == "in":
                # d ell / d logit_j = 1[j in D] softmax_D(j) - 1[j in P] softmax_P(j)
                lse_pos = _finite_or_inf(b_vec)
                den = torch.where(class_codes >= k, torch.exp(t * block_max - lse_safe), zeros)
                pos = torch.where(class_codes == k, torch.exp(t * block_max - lse_pos), zeros)
                terms.append((t, coef[:, None] * (den - pos), None))
            else:
                # negatives: mean_p sigmoid(N - logit_p) * softmax_N(j); positives: -sigmoid(N - logit_p) / |P|
                neg = torch.where(class_codes > k, torch.exp(t * block_max - lse_safe), zeros)
                terms.append((t, (coef * b_vec)[:, None] * neg, (k, coef / n_pos, lse_a, valid)))
        grad_anchors, grad_keys = torch.zeros_like(anchors), torch.zeros_like(keys)
        for c, a, b in blocks:
            blk = sim[:, a:b]
            grad = None
            for t, row_scale, positives in terms:
                scale = row_scale[:, c : c + 1]
                if bool(torch.any(scale != 0)):
                    part = blk.sub(block_max[:, c : c + 1]).mul_(t).exp_().mul_(scale)
                    grad = part if grad is None else grad.add_(part)
                if positives is not None:
                    k, pos_coef, lse_neg, valid = positives
                    members = torch.nonzero((class_codes[:, c] == k) & valid).squeeze(1)
                    if members.numel():
                        gap = lse_neg[members, None] - t * blk[members]
                        sig = torch.sigmoid(gap).masked_fill_(~torch.isfinite(gap), 0.0)
                        if grad is None:
                            grad = torch.zeros_like(blk)
                        grad[members] -= sig * pos_coef[members, None]
            if grad is not None:
                grad_anchors += grad @ keys[a:b]
                grad_keys[a:b] += grad.t() @ anchors
        return grad_anchors, grad_keys, None, None, None, None, None, None, None


def ranked_info_nce(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    keys: torch.Tensor,
    key_labels: torch.Tensor,
    rank_matrix: torch.Tensor,
    temperatures: Sequence[float],
    variant: str = "out_in",
    self_index: Optional[torch.Tensor] = None,
    anchor_weights: Optional[torch.Tensor] = None,
) -> RankedInfoNCEOutput:
    """
    Args:
        anchors: (N, d) L2-normalised anchor embeddings.
        anchor_labels: (N,) class indices in ``[0, K)``.
        keys: (M, d) L2-normalised key embeddings.
        key_labels: (M,) labels; anything outside ``[0, K)`` (background) is a negative.
        rank_matrix: (K, K) integer ranks: 1 on the diagonal, 2..r similar, others negative.
        temperatures: tau_1 < ... < tau_r, one per rank; r = len(temperatures), and ranks
            above r in ``rank_matrix`` count as negatives.
        variant: ``in``, ``out`` or ``out_in``.
        self_index: (N,) index of each anchor's own key in ``keys``, or -1; excluded by index.
        anchor_weights: (N,) optional per-anchor weights (e.g. IoU reweighting).
    """
    if variant not in _FORMS:
        raise ValueError(f"variant must be one of {_FORMS}, got '{variant}'.")
    taus = validate_temperatures(temperatures)
    r = len(taus)
    if anchors.dim() != 2 or keys.dim() != 2 or anchors.shape[1] != keys.shape[1]:
        raise ValueError(f"anchors (N, d) and keys (M, d) must share d; got {tuple(anchors.shape)}, {tuple(keys.shape)}.")
    forms = tuple(("out" if k == 1 else "in") if variant == "out_in" else variant for k in range(1, r + 1))

    # Half-precision inputs are scored in float32: exp(s / 0.01) overflows float16.
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    z, k_all = anchors.to(dtype), keys.to(dtype)
    n, m = anchors.shape[0], keys.shape[0]
    if n == 0 or m == 0:
        zero = z.sum() * 0.0 + k_all.sum() * 0.0
        nan = z.new_full((r + 1,), float("nan"))
        return RankedInfoNCEOutput(loss=zero, per_rank=z.new_zeros(r), anchor_counts=z.new_zeros(r), mean_similarity=nan)

    with torch.no_grad():
        num_classes = rank_matrix.shape[0]
        device = anchor_labels.device
        table = rank_matrix.to(device=device, dtype=torch.int64)
        table = torch.where((table >= 1) & (table <= r), table, torch.full_like(table, r + 1))
        # One extra key class for every non-class label (background, ignore, ...): always negative.
        table = torch.cat([table, table.new_full((num_classes, 1), r + 1)], dim=1)
        key_cls = torch.where((key_labels >= 0) & (key_labels < num_classes), key_labels, torch.full_like(key_labels, num_classes))
        order = torch.argsort(key_cls, stable=True)
        offsets = [0] + torch.bincount(key_cls, minlength=num_classes + 1).cumsum(0).tolist()
        position = torch.empty_like(order)
        position[order] = torch.arange(m, device=order.device)
        if self_index is None:
            self_index = torch.full((n,), -1, dtype=torch.int64, device=device)
        has_self = self_index >= 0
        safe = self_index.clamp(min=0)
        self_sorted = torch.where(has_self, position[safe], self_index)
        self_class = torch.where(has_self, key_cls[safe], torch.zeros_like(self_index))
        weights = anchor_weights.to(dtype) if anchor_weights is not None else z.new_ones(n)

    per_rank, counts, mean_sim = _RankedInfoNCEFunction.apply(
        z, k_all[order], table[anchor_labels], offsets, self_sorted, self_class, taus, forms, weights
    )
    # Connected to the graph even when no anchor has a positive, so DDP sees every parameter.
    loss = per_rank.sum() + z.sum() * 0.0 + k_all.sum() * 0.0
    return RankedInfoNCEOutput(loss=loss, per_rank=per_rank, anchor_counts=counts, mean_similarity=mean_sim)


class RankedInfoNCELoss(nn.Module):
    """RINCE with a fixed rank matrix and temperatures; SupCon for the ``supcon_*`` names."""

    def __init__(self, rank_matrix: torch.Tensor, temperatures: Sequence[float], loss_name: str = "rince_out_in"):
        super().__init__()
        form, forced_r = parse_variant(loss_name)
        taus = validate_temperatures(temperatures)
        if forced_r is not None:
            taus = taus[:forced_r]
        self.form = form
        self.temperatures = taus
        # A buffer so it follows the module's device; not persistent: it comes from the config.
        self.register_buffer("rank_matrix", torch.as_tensor(rank_matrix, dtype=torch.int64), persistent=False)

    @property
    def num_ranks(self) -> int:
        return len(self.temperatures)

    def forward(self, anchors, anchor_labels, keys, key_labels, self_index=None, anchor_weights=None):
        return ranked_info_nce(
            anchors,
            anchor_labels,
            keys,
            key_labels,
            self.rank_matrix,
            self.temperatures,
            variant=self.form,
            self_index=self_index,
            anchor_weights=anchor_weights,
        )

    def extra_repr(self) -> str:
        return f"form={self.form}, temperatures={list(self.temperatures)}"
