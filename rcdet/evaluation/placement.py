"""
Where unknown objects land: the nearest known class of each claimed held-out object, and the
scores that read the ranking's families.

A held-out class's *family* is the set of known classes the full ranking puts at rank 2 for it
(read before the held-out classes are removed: ``configs/rankings/shapes_families.yaml`` puts
ring with disc and bullseye). Its *family accuracy* is the fraction of its claimed objects whose
nearest known class lies in that family; the chance rate beside it is the family's share of the
known classes. A held-out class whose family has no known member has no family accuracy (None,
not 0).

Nearest known class, three ways: cosine to the class prototypes and the majority of the k
nearest training embeddings (heads with a projection), and the argmax known-class logit (every
head, softmax and VOS included).

Ranking-aware OOD scores (higher means more in-distribution), defined from the ranking and the
training prototypes only:

- ``sibling_margin``: the cosine to the nearest prototype minus the cosine to the nearest of
  that class's rank-2 siblings. A known object sits near its own class; an unknown object of a
  known family sits between the siblings, so its margin is small.
- ``family_energy``: ``T log sum_{c in F} exp(cos(z, mu_c) / T)`` over the nearest prototype's
  family F (the class and its rank-2 siblings). An object far from every member of its nearest
  family, which a class-level maximum can miss when one sibling happens to be close, scores low.
"""

import logging
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..ranking import ClassRanking
from .scores import RANKING_SCORES

__all__ = [
    "RANKING_SCORES",
    "PLACEMENT_METHODS",
    "FAMILY_ENERGY_TEMPERATURE",
    "sibling_indices",
    "held_out_families",
    "nearest_by_prototype",
    "nearest_by_knn",
    "nearest_by_logits",
    "sibling_margin",
    "family_energy",
    "ranking_scores",
    "placement",
    "nearest_known_classes",
    "placement_section",
]

logger = logging.getLogger(__name__)

# The ways of finding an object's nearest known class, in the report's order.
PLACEMENT_METHODS = ("prototype", "knn", "argmax")
# The RINCE rank-1 temperature of the shipped configs (MODEL.RCDET.TAU_MIN): the scale on which
# the training pulled a region towards its class.
FAMILY_ENERGY_TEMPERATURE = 0.1


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)


def sibling_indices(ranking: ClassRanking) -> List[np.ndarray]:
    """For each class of ``ranking``, the indices of its rank-2 classes."""
    return [np.flatnonzero(row == 2) for row in ranking.matrix]


def held_out_families(
    ranking: ClassRanking,
    held_out: Sequence[str],
    known: Sequence[str],
    warnings: Optional[List[str]] = None,
) -> Dict[str, Optional[List[str]]]:
    """
    Each held-out class's rank-2 known classes, from the full ``ranking`` (which must cover the
    held-out classes). None, with a warning (appended to ``warnings`` when given, else logged),
    for a class without a rank-2 known class: its family accuracy is left out.
    """
    names = list(ranking.class_names)
    families: Dict[str, Optional[List[str]]] = {}
    for h in held_out:
        if h not in names:
            raise ValueError(f"{ranking.source}: held-out class '{h}' is not in the ranking.")
        row = ranking.matrix[names.index(h)]
        family = [c for c in known if row[names.index(c)] == 2]
        if not family:
            message = (
                f"{ranking.source}: held-out class '{h}' has no rank-2 known class; its family "
                "accuracy is left out."
            )
            if warnings is None:
                logger.warning(message)
            else:
                warnings.append(message)
        families[h] = family or None
    return families


def nearest_by_prototype(embeddings, prototypes) -> np.ndarray:
    """(N,) index of the most cosine-similar prototype (NaN prototypes, absent classes, never)."""
    protos = np.asarray(prototypes, dtype=np.float64)
    sims = _unit(embeddings) @ _unit(np.nan_to_num(protos)).T
    sims[:, np.isnan(protos).any(axis=1)] = -np.inf
    return sims.argmax(axis=1) if len(sims) else np.zeros(0, dtype=np.int64)


def nearest_by_knn(embeddings, bank, bank_labels, k: int) -> np.ndarray:
    """
    (N,) majority class of the ``k`` nearest (Euclidean) bank embeddings. A tie between classes
    goes to the one with the nearest member among the k.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    e = np.asarray(embeddings, dtype=np.float64)
    b = np.asarray(bank, dtype=np.float64)
    y = np.asarray(bank_labels, dtype=np.int64)
    if len(e) == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(k, len(b))
    d2 = (e**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * e @ b.T
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    out = np.empty(len(e), dtype=np.int64)
    for i, neighbours in enumerate(order):
        labels = y[neighbours]
        counts = np.bincount(labels)
        tied = np.flatnonzero(counts == counts.max())
        # labels are in order of distance: the first tied class met is the nearest one.
        out[i] = next(lab for lab in labels if lab in tied)
    return out


def nearest_by_logits(logits, num_known: int) -> np.ndarray:
    """(N,) argmax over the known-class columns of (N, K + 1) logits."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits[:, :num_known].argmax(axis=1) if len(logits) else np.zeros(0, dtype=np.int64)


def _similarities(embeddings, prototypes):
    """(N, K) cosines to the prototypes, -inf for a NaN prototype (a class absent from training)."""
    protos = np.asarray(prototypes, dtype=np.float64)
    absent = np.isnan(protos).any(axis=1)
    sims = _unit(embeddings) @ _unit(np.nan_to_num(protos)).T
    sims[:, absent] = -np.inf
    return sims, absent


def _sibling_matrix(siblings: Sequence[np.ndarray], absent: np.ndarray) -> np.ndarray:
    """(K, K) whether column b is a rank-2 sibling of row a, absent classes never."""
    k = len(absent)
    out = np.zeros((k, k), dtype=bool)
    for c, s in enumerate(siblings):
        out[c, np.asarray(s, dtype=np.int64)] = True
    out[:, absent] = False
    return out


def sibling_margin(embeddings, prototypes, siblings: Sequence[np.ndarray]) -> np.ndarray:
    """
    ``cos(z, mu_c*) - max_{s in siblings(c*)} cos(z, mu_s)`` with c* the nearest prototype. A
    class without siblings compares with the nearest other class instead (and a lone class with
    -1, the lowest cosine). Classes absent from training (NaN prototypes) take no part.
    """
    sims, absent = _similarities(embeddings, prototypes)
    if len(sims) == 0:
        return np.zeros(0)
    sib = _sibling_matrix(siblings, absent)
    others = ~np.eye(len(absent), dtype=bool)
    others[:, absent] = False
    compare = np.where(sib.any(axis=1, keepdims=True), sib, others)
    best = sims.argmax(axis=1)
    top = sims[np.arange(len(sims)), best]
    rows = compare[best]
    rival = np.where(rows, sims, -np.inf).max(axis=1)
    return np.where(rows.any(axis=1), top - rival, top + 1.0)


def family_energy(
    embeddings, prototypes, siblings: Sequence[np.ndarray], temperature=FAMILY_ENERGY_TEMPERATURE
) -> np.ndarray:
    """
    ``T log sum_{c in F} exp(cos(z, mu_c) / T)``, F = the nearest prototype and its siblings
    (classes absent from training left out).
    """
    sims, absent = _similarities(embeddings, prototypes)
    if len(sims) == 0:
        return np.zeros(0)
    members = _sibling_matrix(siblings, absent) | np.eye(len(absent), dtype=bool)
    rows = members[sims.argmax(axis=1)]
    v = np.where(rows, sims / temperature, -np.inf)
    top = v.max(axis=1, keepdims=True)
    return temperature * (top[:, 0] + np.log(np.exp(v - top).sum(axis=1)))


def ranking_scores(embeddings, prototypes, siblings: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
    """Every score of :data:`RANKING_SCORES` for ``embeddings``."""
    return {
        "sibling_margin": sibling_margin(embeddings, prototypes, siblings),
        "family_energy": family_energy(embeddings, prototypes, siblings),
    }


def placement(
    held_out_labels,
    nearest,
    held_out: Sequence[str],
    known: Sequence[str],
    families: Dict[str, Optional[List[str]]],
) -> Dict[str, Dict]:
    """
    Per held-out class: ``objects`` (claimed objects), ``confusion`` (known class -> count of
    objects placed there), ``family`` (its rank-2 known classes or None), ``family_accuracy``
    (None when undefined: no family, or no claimed object) and ``chance`` (the family's share of
    the known classes).

    Args:
        held_out_labels: (N,) index into ``held_out`` of each claimed held-out object.
        nearest: (N,) index into ``known`` of its nearest known class.
    """
    held_out_labels = np.asarray(held_out_labels, dtype=np.int64)
    nearest = np.asarray(nearest, dtype=np.int64)
    if held_out_labels.shape != nearest.shape:
        raise ValueError(f"{held_out_labels.shape} labels but {nearest.shape} placements.")
    out = {}
    for h, name in enumerate(held_out):
        placed = nearest[held_out_labels == h]
        counts = np.bincount(placed, minlength=len(known))
        family = families.get(name)
        in_family = [known.index(c) for c in family] if family else []
        defined = bool(in_family) and len(placed) > 0
        out[name] = {
            "objects": int(len(placed)),
            "confusion": {c: int(n) for c, n in zip(known, counts)},
            "family": list(family) if family else None,
            "family_accuracy": float(counts[in_family].sum() / len(placed)) if defined else None,
            "chance": len(in_family) / len(known) if in_family else None,
        }
    return out


def nearest_known_classes(
    logits, num_known: int, embeddings=None, statistics=None
) -> Dict[str, np.ndarray]:
    """
    The nearest known class of each object, every way the model allows: ``argmax`` from the
    (N, K + 1) ``logits`` (``num_known`` = K); with ``embeddings`` and ``statistics`` (an
    EmbeddingStatistics fitted on the training split) also ``prototype`` and ``knn`` (k =
    ``statistics.knn_k``; kNN needs the bank's labels). Each is an (N,) index into the known
    classes.
    """
    nearest = {"argmax": nearest_by_logits(logits, num_known)}
    if embeddings is not None and statistics is not None:
        nearest["prototype"] = nearest_by_prototype(embeddings, statistics.prototypes)
        if statistics.bank_labels is not None:
            nearest["knn"] = nearest_by_knn(
                embeddings, statistics.bank, statistics.bank_labels, statistics.knn_k
            )
    return nearest


def placement_section(
    held_out_labels,
    held_out: Sequence[str],
    known: Sequence[str],
    families: Dict[str, Optional[List[str]]],
    nearest: Dict[str, np.ndarray],
    knn_k: Optional[int] = None,
) -> Dict:
    """
    The report's placement of claimed held-out objects: ``nearest`` maps each placement method
    computed (nearest_known_classes; argmax always) to the (N,) nearest known class of each
    object. ``methods`` lists those computed; per held-out class, ``objects``, ``family`` and
    ``chance`` as :func:`placement` gives them, and ``family_accuracy`` and ``confusion`` per
    method (None for a method not computed). ``knn_k``: the k of the kNN placement, if computed.

    Args:
        held_out_labels: (N,) index into ``held_out`` of each claimed held-out object.
    """
    methods = [m for m in PLACEMENT_METHODS if m in nearest]
    per_method = {
        m: placement(held_out_labels, nearest[m], held_out, known, families) for m in methods
    }
    classes = {}
    for name in held_out:
        first = per_method["argmax"][name]
        classes[name] = {
            "objects": first["objects"],
            "family": first["family"],
            "chance": first["chance"],
            "family_accuracy": {
                m: per_method[m][name]["family_accuracy"] if m in per_method else None
                for m in PLACEMENT_METHODS
            },
            "confusion": {
                m: per_method[m][name]["confusion"] if m in per_method else None
                for m in PLACEMENT_METHODS
            },
        }
    return {"methods": methods, "knn_k": knn_k if "knn" in nearest else None, "classes": classes}
