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

The per-rank terms are evaluated by :class:`_RankedInfoNCEFunction`, whose backward is written
out and recomputes the N x M work rank by rank, so that memory stays at a few N x M matrices
whatever r is, instead of autograd keeping every rank's intermediates alive.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

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


def _masked_logsumexp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp over ``mask``; ``-inf`` for rows with an empty mask."""
    masked = logits.masked_fill(~mask, float("-inf"))
    row_max = masked.amax(dim=1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    total = masked.sub_(row_max).exp_().sum(dim=1)
    return total.log() + row_max.squeeze(1)


def _masked_softmax(logits: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``exp(logits - lse)`` on ``mask`` and exactly 0 elsewhere (also for empty rows)."""
    return (logits - lse.unsqueeze(1)).masked_fill_(~mask, float("-inf")).exp_()


class _RankedInfoNCEFunction(torch.autograd.Function):
    """similarities (N, M) -> per-rank mean losses (r,), with a hand-written backward."""

    @staticmethod
    def forward(ctx, sim, rho, taus, forms, weights):
        # rho: (N, M) int8; 0 = excluded (self), 1..r = rank, r + 1 = negative.
        r = len(taus)
        per_rank = sim.new_zeros(r)
        counts = sim.new_zeros(r)
        # Sums and counts of s per rank code, for logging: [rank 1..r, negatives].
        sim_sums, sim_counts = sim.new_zeros(r + 1), sim.new_zeros(r + 1)
        saved = []
        for k in range(1, r + 1):
            pos = rho == k
            n_pos = pos.sum(dim=1)
            valid = n_pos > 0
            n_valid = int(valid.sum())
            counts[k - 1] = n_valid
            sim_sums[k - 1] = sim.masked_select(pos).sum()
            sim_counts[k - 1] = n_pos.sum()
            if n_valid == 0:
                saved.append(None)
                continue
            logits = sim / taus[k - 1]
            if forms[k - 1] == "in":
                lse_den = _masked_logsumexp(logits, rho >= k)
                lse_pos = _masked_logsumexp(logits, pos)
                ell = lse_den - lse_pos
                saved.append((lse_den, lse_pos))
            else:
                lse_neg = _masked_logsumexp(logits, rho > k)
                # log(e^p + e^N) - p = softplus(N - p); exactly 0 when N_k is empty.
                gap = (lse_neg.unsqueeze(1) - logits).masked_fill_(~pos, float("-inf"))
                ell = nn.functional.softplus(gap).sum(dim=1) / n_pos.clamp(min=1)
                saved.append((lse_neg, None))
            # Anchors without a rank-k positive are left out (their ell_k is inf, not 0).
            ell = torch.where(valid, ell, torch.zeros_like(ell))
            per_rank[k - 1] = (weights * ell).sum() / n_valid
        excluded = (rho == 0).sum()
        sim_counts[r] = rho.numel() - sim_counts[:r].sum() - excluded
        sim_sums[r] = sim.sum() - sim_sums[:r].sum() - sim.masked_select(rho == 0).sum()
        ctx.save_for_backward(sim, rho, weights, counts)
        ctx.taus, ctx.forms, ctx.saved_lse = taus, forms, saved
        mean_sim = sim_sums / sim_counts
        ctx.mark_non_differentiable(counts, mean_sim)
        return per_rank, counts, mean_sim

    @staticmethod
    def backward(ctx, grad_per_rank, _grad_counts, _grad_mean_sim):
        sim, rho, weights, counts = ctx.saved_tensors
        grad_sim = torch.zeros_like(sim)
        for k, saved in enumerate(ctx.saved_lse, start=1):
            if saved is None:
                continue
            lse_a, lse_b = saved
            tau = ctx.taus[k - 1]
            logits = sim / tau
            pos = rho == k
            n_pos = pos.sum(dim=1, keepdim=True)
            # d(per_rank_k)/d(ell_k(i)) = w_i / n_k (0 for anchors without positives);
            # d(logits)/d(sim) = 1 / tau.
            coef = torch.where(n_pos.squeeze(1) > 0, weights, torch.zeros_like(weights))
            coef = (coef * (grad_per_rank[k - 1] / (counts[k - 1] * tau))).unsqueeze(1)
            if ctx.forms[k - 1] == "in":
                grad = _masked_softmax(logits, lse_a, rho >= k)
                grad -= _masked_softmax(logits, lse_b, pos)
            else:
                # d ell/d s_p = -sigmoid(N - p)/|P|;  d ell/d s_n = softmax_N(n) * sum_p sigmoid(N - p)/|P|
                sig = torch.sigmoid(lse_a.unsqueeze(1) - logits).masked_fill_(~pos, 0.0)
                sig /= n_pos.clamp(min=1)
                grad = _masked_softmax(logits, lse_a, rho > k)
                grad *= sig.sum(dim=1, keepdim=True)
                grad -= sig
            grad *= coef
            grad_sim += grad
        return grad_sim, None, None, None, None


def _rank_codes(anchor_labels, key_labels, rank_matrix, num_ranks, self_index):
    """(N, M) int8 codes: 0 = excluded, 1..r = rank, r + 1 = negative or background."""
    num_classes = rank_matrix.shape[0]
    neg = num_ranks + 1
    table = rank_matrix.to(torch.int64)
    table = torch.where((table >= 1) & (table <= num_ranks), table, torch.full_like(table, neg))
    # One extra column for every non-class key label (background, ignore, ...).
    table = torch.cat([table, table.new_full((num_classes, 1), neg)], dim=1)
    key_col = torch.where(
        (key_labels >= 0) & (key_labels < num_classes), key_labels, torch.full_like(key_labels, num_classes)
    )
    rho = table[anchor_labels][:, key_col].to(torch.int8)
    if self_index is not None:
        has_self = self_index >= 0
        rows = torch.nonzero(has_self).squeeze(1)
        rho[rows, self_index[has_self]] = 0
    return rho


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
    if r > 126:
        raise ValueError(f"At most 126 ranks are supported, got {r}.")
    if anchors.dim() != 2 or keys.dim() != 2 or anchors.shape[1] != keys.shape[1]:
        raise ValueError(f"anchors (N, d) and keys (M, d) must share d; got {tuple(anchors.shape)}, {tuple(keys.shape)}.")
    forms = tuple(("out" if k == 1 else "in") if variant == "out_in" else variant for k in range(1, r + 1))

    # Half-precision inputs are scored in float32: exp(s / 0.01) overflows float16.
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    sim = anchors.to(dtype) @ keys.to(dtype).t()
    n = anchors.shape[0]
    with torch.no_grad():
        rho = _rank_codes(anchor_labels, key_labels, rank_matrix.to(anchor_labels.device), r, self_index)
        weights = anchor_weights.to(dtype) if anchor_weights is not None else sim.new_ones(n)

    if n == 0 or keys.shape[0] == 0:
        per_rank, counts = sim.new_zeros(r), sim.new_zeros(r)
        mean_sim = sim.new_full((r + 1,), float("nan"))
    else:
        per_rank, counts, mean_sim = _RankedInfoNCEFunction.apply(sim, rho, taus, forms, weights)
    # Connected to the graph even when no anchor has a positive, so DDP sees every parameter.
    loss = per_rank.sum() + anchors.sum() * 0.0 + keys.sum() * 0.0
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
