"""
VOS, virtual outlier synthesis (Du et al., ICLR 2022), as an option of the ROI heads
(``MODEL.RCDET.VOS``; docs/vos.md lists every deviation from the original code).

A per-class queue holds the last ``SAMPLE_NUMBER`` box-head features of foreground proposals.
From ``STARTING_ITER`` on, once every class's queue is full, each step fits class-conditional
Gaussians with one shared covariance (plus ``COVARIANCE_EPS`` times the identity), draws
``SAMPLE_FROM`` samples per class and keeps the ``SELECT`` least likely ones as virtual
outliers. A logistic regression on the energy ``log sum_c relu(w_c) e^{f_c}`` (learnable
per-class weights w, known-class logits f) separates the foreground proposals (label 1) from
the outliers (label 0); ``loss_vos = LOSS_WEIGHT * cross-entropy``, averaged over both.

The step makes no host sync and has static shapes. The queue lives in registered buffers (a
resumed run continues with it) and is the same on every worker: the foreground features of all
workers enter it, gathered in one all-gather that also carries rank 0's random draw, so every
worker trains on the same outliers and the gradient after DDP's averaging is that of one
process holding the whole batch.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ConfigError
from ..distributed import all_gather_padded, get_world_size, pad_rows
from .contrastive_memory import compact_indices
from .memory_queue import EmbeddingQueue

__all__ = [
    "VOSOutput",
    "VirtualOutlierSynthesis",
    "build_vos",
    "weighted_energy",
    "class_gaussians",
    "draw_outlier_noise",
    "virtual_outliers",
]


def weighted_energy(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """
    VOS's energy of (N, K) known-class logits: ``log sum_c relu(w_c) e^{f_c}``, shifted by the
    row maximum. The sum is floored at the smallest normal float, so that weights all driven to
    zero give a large negative energy instead of -inf (the original's log(0)).
    """
    top = logits.max(dim=1, keepdim=True).values
    total = (F.relu(weights) * torch.exp(logits - top)).sum(dim=1)
    return top.squeeze(1) + torch.log(total.clamp(min=torch.finfo(total.dtype).tiny))


def class_gaussians(
    features: torch.Tensor, filled: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    (K, S, D) queue features and their (K, S) filled mask -> per-class means (K, D) and the shared
    covariance (D, D) of the class-centred features, plus ``eps`` times the identity. Empty slots
    count nowhere, so a queue that is not yet full still gives finite values.
    """
    weight = filled.to(features.dtype)[..., None]
    count = weight.sum(dim=1)
    mean = (features * weight).sum(dim=1) / count.clamp(min=1)
    centred = ((features - mean[:, None]) * weight).reshape(-1, features.shape[-1])
    cov = centred.t() @ centred / count.sum().clamp(min=1)
    return mean, cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)


def draw_outlier_noise(
    num_classes: int, select: int, sample_from: int, dim: int, device
) -> torch.Tensor:
    """
    (K * select, D) standard-normal draws, for each class the ``select`` of ``sample_from`` with
    the largest norm. Under a Gaussian ``N(mu, Sigma)`` the sample ``mu + L eps`` (``L L^T =
    Sigma``) has log-likelihood ``-|eps|^2 / 2 + const``, so these are exactly the least likely of
    ``sample_from`` samples, as VOS selects them. A norm and a direction of a standard normal are
    independent (chi-square with D degrees of freedom, uniform on the sphere), so only the norms
    of all ``sample_from`` draws are drawn, and a direction for the kept ones: K x sample_from
    numbers instead of K x sample_from x D.
    """
    # chi-square(D) = Gamma(D / 2, rate 1 / 2), both given as tensors: a Python number there
    # would be copied to the device (a sync).
    shape = torch.full((num_classes, sample_from), dim / 2.0, device=device)
    rate = torch.full_like(shape, 0.5)
    squared = torch.distributions.Gamma(shape, rate, validate_args=False).sample()
    radius = squared.topk(select, dim=1).values.sqrt()  # (K, select)
    direction = F.normalize(torch.randn(num_classes, select, dim, device=device), dim=2)
    return (radius[..., None] * direction).reshape(-1, dim)


def virtual_outliers(
    mean: torch.Tensor, cov: torch.Tensor, noise: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    ``mean_c + L noise`` for each class's rows of ``noise`` (K * select, D), and whether the
    Cholesky factorisation succeeded (a device bool: checking it on the host would sync). It runs
    in float64; a failed factor is replaced by zeros so that the outliers stay finite.
    """
    factor, info = torch.linalg.cholesky_ex(cov.double())
    ok = info == 0
    factor = torch.where(ok, factor, torch.zeros_like(factor))
    k, d = mean.shape
    centre = mean.double()[:, None].expand(k, noise.shape[0] // k, d).reshape(-1, d)
    return (centre + noise.double() @ factor.t()).to(mean.dtype), ok


@dataclass
class VOSOutput:
    loss: torch.Tensor  # scalar loss_vos, weight included; a connected zero when inactive
    scalars: Dict[str, torch.Tensor]  # device scalars to log as rcdet/<name>


class VirtualOutlierSynthesis(nn.Module):
    """The VOS queue, outlier sampler and uncertainty loss; see the module docstring."""

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        sample_number: int = 1000,
        starting_iter: int = 12000,
        sample_from: int = 10000,
        select: int = 1,
        loss_weight: float = 0.1,
        covariance_eps: float = 1e-4,
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.starting_iter = int(starting_iter)
        self.sample_from = int(sample_from)
        self.select = int(select)
        self.loss_weight = float(loss_weight)
        self.covariance_eps = float(covariance_eps)
        self.queue = EmbeddingQueue(sample_number, feature_dim, num_classes, class_balanced=True)
        # VOS's weight_energy, Linear(K, 1) initialised uniform in [0, 1), without its bias: only
        # the weight enters the energy, and an unused parameter would stop DDP.
        self.energy_weight = nn.Parameter(torch.empty(num_classes).uniform_())
        self.logistic_regression = nn.Linear(1, 2)

    def _connected_zero(self) -> torch.Tensor:
        # Zero, but every VOS parameter is in the graph (what VOS's dummy losses are for), so DDP
        # finds a gradient for each before STARTING_ITER too.
        params = [p.sum() for p in self.parameters()]
        return torch.stack(params).sum() * 0.0

    @torch.jit.unused
    def forward(
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        classify: Callable[[torch.Tensor], torch.Tensor],
        iteration: int,
        max_foreground: Optional[int] = None,
    ) -> VOSOutput:
        """
        Args:
            features: (N, ...) box-head features of this worker's sampled proposals.
            logits: (N, K + 1) their class logits (background last).
            labels: (N,) their labels; ``[0, K)`` are foreground.
            classify: box-head features -> (n, K + 1) class logits (the box predictor).
            iteration: the training iteration (detectron2's ``storage.iter``).
            max_foreground: static bound on this worker's foreground proposals, the same on
                every worker (images x BATCH_SIZE_PER_IMAGE x POSITIVE_FRACTION).
        """
        k, d = self.num_classes, self.feature_dim
        n = labels.shape[0]
        device = logits.device
        active = iteration >= self.starting_iter
        with torch.autocast(device_type=device.type, enabled=False):
            # At least float32 whatever the autocast state (float64 stays float64).
            dtype = torch.promote_types(logits.dtype, torch.float32)
            feats = features.detach().flatten(1).to(dtype)
            foreground = (labels >= 0) & (labels < k)
            capacity = n if max_foreground is None else max_foreground
            index, valid, _ = compact_indices(foreground, capacity)
            rows = torch.cat(
                [
                    feats.index_select(0, index),
                    labels.index_select(0, index).to(feats.dtype)[:, None],
                    valid.to(feats.dtype)[:, None],
                ],
                dim=1,
            )
            # A worker with fewer regions than the bound still sends `capacity` rows.
            rows = pad_rows(rows, capacity, rows.new_zeros(1, d + 2))
            if active:
                noise = draw_outlier_noise(k, self.select, self.sample_from, d, device)
                rows = torch.cat([rows, F.pad(noise.to(dtype), (0, 2))])
            world = get_world_size()
            if world > 1:
                if max_foreground is None:
                    raise ValueError("max_foreground is needed with several workers.")
                rows = all_gather_padded(rows)
            rows = rows.view(world, -1, d + 2)
            gathered = rows[:, :capacity].reshape(-1, d + 2)
            full = self.queue.filled.all()  # before this step's features, as VOS checks it
            take = (gathered[:, d + 1] > 0.5) & torch.isfinite(gathered[:, :d]).all(dim=1)
            self.queue.enqueue(gathered[:, :d], gathered[:, d].round().long(), take, gather=False)
            scalars = {"vos_queue_fill": self.queue.filled.float().mean()}
            zero = self._connected_zero()
            if not active:
                return VOSOutput(zero, scalars)

            mean, cov = class_gaussians(
                self.queue.embeddings, self.queue.filled, self.covariance_eps
            )
            # Rank 0's draw on every worker: all train on the same outliers.
            outliers, ok = virtual_outliers(mean, cov, rows[0, capacity:, :d])
            energy_id = weighted_energy(logits[:, :k].to(dtype), self.energy_weight)
            energy_out = weighted_energy(
                classify(outliers.to(dtype))[:, :k].to(dtype), self.energy_weight
            )
            scores = self.logistic_regression(torch.cat([energy_id, energy_out])[:, None])
            target = torch.cat(
                [torch.ones_like(labels), torch.zeros_like(energy_out, dtype=labels.dtype)]
            )
            ce = F.cross_entropy(scores, target, reduction="none")
            weight = foreground.to(ce.dtype)
            # The mean over every worker's foreground proposals and the outliers: each worker's
            # share of the foreground sum times the world size, so DDP's average is that mean.
            num_rows = gathered[:, d + 1].sum() + energy_out.shape[0]
            total = world * (ce[:n] * weight).sum() + ce[n:].sum()
            apply = full & ok
            loss = torch.where(apply, self.loss_weight * total / num_rows, zero)
            scalars.update(
                vos_active=apply.float(),
                vos_energy_id=(energy_id.detach() * weight).sum() / weight.sum().clamp(min=1),
                vos_energy_outlier=energy_out.detach().mean(),
            )
        return VOSOutput(loss + zero, scalars)

    def extra_repr(self) -> str:
        return (
            f"starting_iter={self.starting_iter}, sample_from={self.sample_from},"
            f" select={self.select}, loss_weight={self.loss_weight}"
        )


def build_vos(cfg, num_classes: int, feature_dim: int) -> Optional[VirtualOutlierSynthesis]:
    """
    The VOS module that ``MODEL.RCDET.VOS`` describes for ``num_classes`` classes and box-head
    features of ``feature_dim`` numbers, or None when it is off. Impossible keys are a
    ConfigError; a STARTING_ITER at or past SOLVER.MAX_ITER is a warning (VOS never starts).
    """
    v = cfg.MODEL.RCDET.VOS
    if not v.ENABLED:
        return None
    key = "MODEL.RCDET.VOS"
    needed = math.ceil(feature_dim / num_classes) + 1
    if v.SAMPLE_NUMBER < needed:
        raise ConfigError(
            f"{key}.SAMPLE_NUMBER = {v.SAMPLE_NUMBER}: {num_classes} class queues of"
            f" {v.SAMPLE_NUMBER} features, each centred on its mean, cannot estimate a"
            f" {feature_dim}-dimensional covariance; set it to at least {needed}."
        )
    if v.SAMPLE_FROM < 1:
        raise ConfigError(f"{key}.SAMPLE_FROM = {v.SAMPLE_FROM}: sample at least 1 per class.")
    if not 1 <= v.SELECT <= v.SAMPLE_FROM:
        raise ConfigError(
            f"{key}.SELECT = {v.SELECT}: keep between 1 and SAMPLE_FROM = {v.SAMPLE_FROM}"
            " outliers per class; lower SELECT or raise SAMPLE_FROM."
        )
    if v.STARTING_ITER < 0:
        raise ConfigError(f"{key}.STARTING_ITER = {v.STARTING_ITER} must be >= 0.")
    if v.LOSS_WEIGHT < 0:
        raise ConfigError(f"{key}.LOSS_WEIGHT = {v.LOSS_WEIGHT} must be >= 0.")
    if not v.COVARIANCE_EPS > 0:
        raise ConfigError(
            f"{key}.COVARIANCE_EPS = {v.COVARIANCE_EPS} must be > 0: it keeps the shared"
            " covariance invertible (VOS uses 1e-4)."
        )
    if v.STARTING_ITER >= cfg.SOLVER.MAX_ITER:
        warnings.warn(
            f"{key}.STARTING_ITER = {v.STARTING_ITER} is not below SOLVER.MAX_ITER ="
            f" {cfg.SOLVER.MAX_ITER}: VOS never starts and trains nothing; lower STARTING_ITER.",
            UserWarning,
            stacklevel=2,
        )
    # Building a module consumes random numbers: everything built after it initialises as it
    # would without VOS.
    with torch.random.fork_rng(devices=[]):
        return VirtualOutlierSynthesis(
            num_classes,
            feature_dim,
            sample_number=v.SAMPLE_NUMBER,
            starting_iter=v.STARTING_ITER,
            sample_from=v.SAMPLE_FROM,
            select=v.SELECT,
            loss_weight=v.LOSS_WEIGHT,
            covariance_eps=v.COVARIANCE_EPS,
        )
