"""
Class rankings: turn "aeroplane looks like bird, then ship" into a K x K rank matrix.

``matrix[a][b]`` is the rank of class ``b`` for an anchor of class ``a``: 1 on the diagonal,
2..r for classes judged similar (smaller is more similar) and :data:`NEGATIVE_RANK` for every
other class. Background is not a class here; the loss treats it as negative.

Three YAML forms are accepted, exactly one per file:

``ranks`` (ordered lists; nested lists are ties)::

    ranks:
      aeroplane: [bird, ship]            # bird -> 2, ship -> 3
      bird: [[aeroplane], [cat, dog]]    # aeroplane -> 2, cat and dog -> 3
      sofa: []                           # covered, but nothing similar

``levels`` (a hierarchy, finest level first)::

    levels:
      - {vehicles: [aeroplane, car], animals: [bird, cat]}   # same group here -> 2
      - {things: [aeroplane, car, bird, cat]}                # same group only here -> 3

``similarities`` (scores and strictly decreasing thresholds t_2 > t_3 > ...)::

    thresholds: [0.5, 0.35]
    similarities:
      classes: [aeroplane, bird, car]
      matrix: [[1, 0.6, 0.4], [0.6, 1, 0.2], [0.4, 0.2, 1]]
    # or: similarities: {pairs: [[aeroplane, bird, 0.6], ...]}

Optional keys in every form: ``max_rank`` (truncate to r), ``symmetric`` (copy rank[a][b] to
rank[b][a] where only one of them is given) and ``groups`` (a one-level ``{group: [classes]}``
used by the embedding analysis when the file has no ``levels``).
"""

import difflib
import math
import os
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import yaml

__all__ = [
    "NEGATIVE_RANK",
    "RankingError",
    "ClassRanking",
    "load_ranking",
    "ranking_from_dict",
    "ranks_from_similarity",
    "temperatures_from_similarity",
    "validate_temperatures",
]

NEGATIVE_RANK = -1
_FORMS = ("ranks", "levels", "similarities")
_OPTION_KEYS = ("max_rank", "symmetric", "groups", "thresholds", "allow_uncovered")


class RankingError(ValueError):
    """A ranking file or option is invalid; the message names the file, the entry and the fix."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader, except that a key given twice in one mapping is an error: plain YAML
    keeps the last one, so a second entry for a class would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *anchor" merges are allowed to be overridden
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # SafeLoader reports unhashable keys itself
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise RankingError(
                        f"{key_node.start_mark.name}: line {line}: key '{key}' appears twice in"
                        f" one mapping (first at line {first_line[key]}). Merge the two entries."
                    )
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


@dataclass(frozen=True)
class ClassRanking:
    class_names: Tuple[str, ...]
    matrix: np.ndarray
    # Hierarchy levels, finest first: one ``{group: (classes...)}`` mapping per level.
    groups: Tuple[Dict[str, Tuple[str, ...]], ...] = ()
    # Similarity s_k of ranks 2..r when the file defines them (similarity form: its
    # thresholds); used to derive per-rank temperatures.
    rank_similarities: Optional[Tuple[float, ...]] = None
    source: str = "<ranking>"
    uncovered: Tuple[str, ...] = field(default=())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_ranks(self) -> int:
        """r: the largest rank in use (1 when every other class is negative)."""
        return int(self.matrix.max()) if self.matrix.size else 1

    @classmethod
    def identity(cls, class_names: Sequence[str], source: str = "<one rank>") -> "ClassRanking":
        """Rank 1 for the anchor's own class, every other class a negative: r = 1, as in SupCon."""
        matrix = np.full((len(class_names), len(class_names)), NEGATIVE_RANK, dtype=np.int64)
        np.fill_diagonal(matrix, 1)
        return cls(class_names=tuple(class_names), matrix=matrix, source=source)

    def temperatures(
        self, tau_min: float, tau_max: float, explicit: Sequence[float] = ()
    ) -> Tuple[float, ...]:
        """
        One temperature per rank, tau_1 < ... < tau_r. ``explicit`` values are used as given
        (the first r of them). Otherwise ``tau_k = tau_min + (1 - s_k)(tau_max - tau_min)`` with
        s_1 = 1 and s_k the file's similarity of rank k when it defines one, else s_k evenly
        spaced from 1 down to 0 at rank r. Raises ValueError on impossible values.
        """
        r = self.num_ranks
        if explicit:
            if len(explicit) < r:
                raise ValueError(f"{len(explicit)} values given, but the ranking has {r} ranks.")
            return validate_temperatures(list(explicit)[:r])
        sims = self.rank_similarities
        if sims is not None and len(sims) >= r - 1:
            similarities = [1.0] + list(sims[: r - 1])
        else:
            similarities = list(np.linspace(1.0, 0.0, r)) if r > 1 else [1.0]
        return temperatures_from_similarity(similarities, tau_min, tau_max)

    def truncate(self, max_rank: int) -> "ClassRanking":
        """Ranks above ``max_rank`` become negatives; ``max_rank=1`` gives SupCon."""
        if int(max_rank) < 1:
            raise RankingError(f"{self.source}: max_rank must be >= 1, got {max_rank}.")
        matrix = self.matrix.copy()
        matrix[matrix > max_rank] = NEGATIVE_RANK
        sims = self.rank_similarities
        if sims is not None:
            sims = sims[: max(int(max_rank) - 1, 0)]
        return replace(self, matrix=matrix, rank_similarities=sims)

    def subset(self, class_names: Sequence[str]) -> "ClassRanking":
        """The ranking restricted to (and ordered as) ``class_names``, e.g. the known classes."""
        missing = [c for c in class_names if c not in self.class_names]
        if missing:
            raise RankingError(f"{self.source}: classes {missing} are not in this ranking.")
        idx = [self.class_names.index(c) for c in class_names]
        keep = set(class_names)
        groups = tuple(
            {g: tuple(c for c in members if c in keep) for g, members in level.items()}
            for level in self.groups
        )
        groups = tuple({g: m for g, m in level.items() if m} for level in groups)
        return replace(
            self,
            class_names=tuple(class_names),
            matrix=self.matrix[np.ix_(idx, idx)].copy(),
            groups=groups,
            uncovered=tuple(c for c in self.uncovered if c in keep),
        )

    def group_labels(self, level: int = 0) -> List[str]:
        """The group name of every class at ``level``; a class in no group is its own group."""
        if level >= len(self.groups):
            return list(self.class_names)
        lookup = {c: g for g, members in self.groups[level].items() for c in members}
        return [lookup.get(c, c) for c in self.class_names]

    def permuted(self, seed: int) -> "ClassRanking":
        """
        A deliberately wrong ranking with the same rank statistics: the similar-class structure
        is moved onto a random permutation of the classes (a control for the comparison study).
        """
        rng = np.random.default_rng(seed)
        k = self.num_classes
        perm = rng.permutation(k)
        # Avoid the identity, which would not be a control at all.
        while k > 1 and np.all(perm == np.arange(k)):
            perm = rng.permutation(k)
        matrix = self.matrix[np.ix_(perm, perm)].copy()
        names = [self.class_names[i] for i in perm]
        # matrix[a][b] now describes names[a] vs names[b]; relabel back to our class order.
        rename = {old: new for old, new in zip(names, self.class_names)}
        groups = tuple(
            {g: tuple(rename[c] for c in members) for g, members in level.items()}
            for level in self.groups
        )
        return replace(
            self, matrix=matrix, groups=groups, source=f"{self.source} (permuted {seed})"
        )

    def describe(self) -> str:
        """A human-readable list of each class's similar classes by rank."""
        lines = []
        for a, name in enumerate(self.class_names):
            parts = []
            for r in range(2, self.num_ranks + 1):
                similar = [self.class_names[b] for b in np.flatnonzero(self.matrix[a] == r)]
                if similar:
                    parts.append(f"rank {r}: {', '.join(similar)}")
            lines.append(f"{name}: {'; '.join(parts) if parts else '(no similar classes)'}")
        return "\n".join(lines)


def _suggest(name: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


class _Builder:
    """Accumulates explicit ranks with validation; messages say where the problem is."""

    def __init__(self, class_names: Sequence[str], source: str):
        self.class_names = tuple(class_names)
        self.index = {c: i for i, c in enumerate(self.class_names)}
        self.source = source
        k = len(self.class_names)
        self.matrix = np.full((k, k), NEGATIVE_RANK, dtype=np.int64)
        np.fill_diagonal(self.matrix, 1)
        self.given = np.zeros((k, k), dtype=bool)
        self.covered = set()

    def error(self, entry: str, problem: str, fix: str = "") -> RankingError:
        msg = f"{self.source}: entry '{entry}': {problem}"
        return RankingError(msg + (f" {fix}" if fix else ""))

    def cls(self, name, entry: str) -> int:
        if not isinstance(name, str) or name not in self.index:
            raise self.error(
                entry,
                f"unknown class name '{name}'{_suggest(name, self.class_names)}.",
                f"Known classes: {', '.join(self.class_names)}.",
            )
        return self.index[name]

    def set(self, a: int, b: int, rank: int):
        self.matrix[a, b] = rank
        self.given[a, b] = True

    def symmetrize(self):
        # Where only (b, a) is given, rank[a][b] takes rank[b][a].
        only_ba = self.given.T & ~self.given
        self.matrix = np.where(only_ba, self.matrix.T, self.matrix)


def _is_finite_number(value) -> bool:
    # YAML's own numbers only: a quoted "0.5" or a boolean is a mistake, .nan and .inf too.
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
    )


def _check_class_names(class_names, source: str):
    if isinstance(class_names, str):
        names = [c.strip() for c in class_names.split(",")]
        raise RankingError(
            f"{source}: class_names must be a list of class names, got the string"
            f" {class_names!r}; pass a list such as {names!r}."
        )
    if not all(isinstance(c, str) and c for c in class_names):
        raise RankingError(
            f"{source}: class_names must be non-empty strings, got {list(class_names)!r}."
        )
    if len(set(class_names)) != len(class_names):
        raise RankingError(
            f"{source}: the dataset class names contain duplicates: {list(class_names)}."
        )


def _check_mapping(value, entry: str, source: str, what: str):
    if not isinstance(value, Mapping):
        raise RankingError(f"{source}: entry '{entry}' must be {what}, got {type(value).__name__}.")


def _build_ranks(b: _Builder, ranks):
    _check_mapping(ranks, "ranks", b.source, "a mapping {class: [similar classes...]}")
    for anchor, similar in ranks.items():
        entry = f"ranks.{anchor}"
        a = b.cls(anchor, entry)
        b.covered.add(anchor)
        if similar is None:
            similar = []
        if not isinstance(similar, list):
            raise b.error(entry, f"must be a list of classes, got {similar!r}.")
        seen = set()
        for position, item in enumerate(similar):
            tied = item if isinstance(item, list) else [item]
            if not tied:
                raise b.error(entry, f"position {position + 1} is an empty list.")
            for name in tied:
                other = b.cls(name, entry)
                if other == a:
                    raise b.error(
                        entry, f"class '{anchor}' lists itself.", "Remove it: rank 1 is implied."
                    )
                if name in seen:
                    raise b.error(
                        entry, f"class '{name}' appears more than once.", "List each class once."
                    )
                seen.add(name)
                b.set(a, other, position + 2)


def _build_levels(b: _Builder, levels) -> Tuple[Dict[str, Tuple[str, ...]], ...]:
    if not isinstance(levels, list) or not levels:
        raise RankingError(
            f"{b.source}: entry 'levels' must be a non-empty list of {{group: [classes]}}."
        )
    parsed = []
    for depth, level in enumerate(levels):
        entry = f"levels[{depth}]"
        _check_mapping(level, entry, b.source, "a mapping {group: [classes...]}")
        group_of: Dict[str, str] = {}
        groups: Dict[str, Tuple[str, ...]] = {}
        for group, members in level.items():
            if not isinstance(members, list):
                raise b.error(f"{entry}.{group}", f"must be a list of classes, got {members!r}.")
            for name in members:
                b.cls(name, f"{entry}.{group}")
                if name in group_of:
                    raise b.error(
                        f"{entry}.{group}",
                        f"class '{name}' appears more than once in this level (also in"
                        f" '{group_of[name]}').",
                        "Put each class in one group per level.",
                    )
                group_of[name] = group
            groups[str(group)] = tuple(members)
        parsed.append(groups)
        if depth == 0:
            b.covered.update(group_of)
        for g, members in groups.items():
            for x in members:
                for y in members:
                    ix, iy = b.index[x], b.index[y]
                    if ix != iy and not b.given[ix, iy]:
                        b.set(ix, iy, depth + 2)
    return tuple(parsed)


def validate_temperatures(temperatures: Sequence[float]) -> Tuple[float, ...]:
    """The temperatures as a tuple; ValueError unless finite, positive and increasing with rank."""
    # Anything float() takes as a number (numpy and 0-d torch scalars too), but no strings
    # or booleans: float("0.1") would hide a quoting mistake, and a string is iterable.
    if isinstance(temperatures, (str, bytes)) or not all(
        hasattr(type(t), "__float__") and not isinstance(t, (str, bool, np.bool_))
        for t in temperatures
    ):
        raise ValueError(f"Temperatures must be a list of numbers, got {temperatures!r}.")
    taus = tuple(float(t) for t in temperatures)
    if not taus:
        raise ValueError("At least one temperature is needed (tau_1 for rank 1).")
    if any(not math.isfinite(t) or t <= 0 for t in taus):
        raise ValueError(f"Temperatures must be finite and positive, got {list(taus)}.")
    if any(b <= a for a, b in zip(taus, taus[1:])):
        raise ValueError(
            f"Temperatures must increase with rank (tau_1 < tau_2 < ...), got {list(taus)}."
        )
    return taus


def temperatures_from_similarity(
    similarities: Sequence[float], tau_min: float, tau_max: float
) -> Tuple[float, ...]:
    """``tau_k = tau_min + (1 - s_k)(tau_max - tau_min)`` with ``s_1 = 1`` (the first entry)."""
    if not (tau_min > 0 and tau_max > tau_min):
        raise ValueError(f"Need 0 < tau_min < tau_max, got tau_min={tau_min}, tau_max={tau_max}.")
    return validate_temperatures(
        [tau_min + (1.0 - float(s)) * (tau_max - tau_min) for s in similarities]
    )


def ranks_from_similarity(similarity: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Rank matrix from a K x K score matrix: score >= t_2 -> 2, else >= t_3 -> 3, ..."""
    thresholds = [float(t) for t in thresholds]
    if any(t2 <= t3 for t2, t3 in zip(thresholds, thresholds[1:])):
        raise RankingError(
            f"thresholds must be strictly decreasing (t_2 > t_3 > ...), got {thresholds}."
        )
    similarity = np.asarray(similarity, dtype=np.float64)
    matrix = np.full(similarity.shape, NEGATIVE_RANK, dtype=np.int64)
    # Assign from the loosest threshold to the strictest so the best rank wins.
    for rank, t in reversed(list(enumerate(thresholds, start=2))):
        matrix[similarity >= t] = rank
    np.fill_diagonal(matrix, 1)
    return matrix


def _build_similarities(b: _Builder, sims, thresholds) -> Tuple[float, ...]:
    if thresholds is None:
        raise RankingError(
            f"{b.source}: entry 'thresholds' is required with 'similarities': a list t_2 > t_3"
            " > ..."
        )
    if not isinstance(thresholds, list) or not thresholds:
        raise RankingError(
            f"{b.source}: entry 'thresholds' must be a non-empty list t_2 > t_3 > ..., got"
            f" {thresholds!r}."
        )
    if not all(_is_finite_number(t) for t in thresholds):
        raise RankingError(
            f"{b.source}: entry 'thresholds' must be finite numbers, got {thresholds}."
        )
    thresholds = [float(t) for t in thresholds]
    if any(t2 <= t3 for t2, t3 in zip(thresholds, thresholds[1:])):
        raise RankingError(
            f"{b.source}: entry 'thresholds' must be strictly decreasing (t_2 > t_3 > ...), "
            f"got {thresholds}."
        )
    _check_mapping(
        sims, "similarities", b.source, "a mapping with 'classes' and 'matrix', or 'pairs'"
    )

    def rank_of(score: float) -> int:
        for rank, t in enumerate(thresholds, start=2):
            if score >= t:
                return rank
        return NEGATIVE_RANK

    unknown = sorted(set(sims) - {"classes", "matrix", "pairs"}, key=str)
    if unknown or ("matrix" in sims and "pairs" in sims):
        raise b.error(
            "similarities",
            f"has keys {sorted(sims, key=str)}; give either 'classes' + 'matrix' or 'pairs'.",
        )
    if "matrix" in sims:
        classes = sims.get("classes")
        if not isinstance(classes, list):
            raise b.error("similarities.classes", "the matrix form needs a list of class names.")
        idx = [b.cls(c, "similarities.classes") for c in classes]
        if len(set(idx)) != len(idx):
            raise b.error("similarities.classes", "a class appears more than once.")
        matrix = np.asarray(sims["matrix"], dtype=object)
        if matrix.shape != (len(classes), len(classes)):
            raise b.error(
                "similarities.matrix",
                f"must be {len(classes)}x{len(classes)} to match 'classes', got shape"
                f" {matrix.shape}.",
            )
        bad = [(i, j) for (i, j), v in np.ndenumerate(matrix) if not _is_finite_number(v)]
        if bad:
            i, j = bad[0]
            raise b.error(
                "similarities.matrix",
                f"must contain only finite numbers; row {i + 1}, column {j + 1} is"
                f" {matrix[i, j]!r}.",
            )
        scores = matrix.astype(np.float64)
        ranks = ranks_from_similarity(scores, thresholds)
        for i, a in enumerate(idx):
            for j, c in enumerate(idx):
                if i != j and ranks[i, j] != NEGATIVE_RANK:
                    b.set(a, c, int(ranks[i, j]))
                elif i != j:
                    b.given[a, c] = True
        b.covered.update(classes)
    elif "pairs" in sims:
        pairs = sims["pairs"]
        if not isinstance(pairs, list):
            raise b.error("similarities.pairs", "must be a list of [class_a, class_b, score].")
        seen = set()
        for n, pair in enumerate(pairs):
            entry = f"similarities.pairs[{n}]"
            if not isinstance(pair, list) or len(pair) != 3:
                raise b.error(entry, f"must be [class_a, class_b, score], got {pair!r}.")
            a, c = b.cls(pair[0], entry), b.cls(pair[1], entry)
            if a == c:
                raise b.error(entry, f"class '{pair[0]}' is paired with itself.")
            if (a, c) in seen:
                raise b.error(entry, f"pair ({pair[0]}, {pair[1]}) appears more than once.")
            seen.add((a, c))
            if not _is_finite_number(pair[2]):
                raise b.error(entry, f"score must be a finite number, got {pair[2]!r}.")
            score = float(pair[2])
            rank = rank_of(score)
            b.given[a, c] = True
            if rank != NEGATIVE_RANK:
                b.set(a, c, rank)
            b.covered.update([pair[0], pair[1]])
    else:
        raise b.error("similarities", "needs either 'classes' + 'matrix' or 'pairs'.")
    return tuple(thresholds)


def ranking_from_dict(
    data,
    class_names: Sequence[str],
    *,
    source: str = "<ranking>",
    allow_uncovered: Optional[bool] = None,
    max_rank: Optional[int] = None,
) -> ClassRanking:
    """Build and validate a :class:`ClassRanking` from parsed YAML. See the module docstring."""
    if data is None or (isinstance(data, Mapping) and not data):
        raise RankingError(
            f"{source}: the ranking file is empty. Give one of: {', '.join(_FORMS)}."
        )
    _check_mapping(data, "<top level>", source, "a mapping")
    forms = [f for f in _FORMS if f in data]
    if len(forms) != 1:
        raise RankingError(
            f"{source}: expected exactly one of {', '.join(_FORMS)} at the top level, found "
            f"{forms or 'none'}."
        )
    unknown_keys = sorted(set(data) - set(_FORMS) - set(_OPTION_KEYS))
    if unknown_keys:
        raise RankingError(
            f"{source}: unknown top-level keys {unknown_keys}; allowed: {_FORMS + _OPTION_KEYS}."
        )
    _check_class_names(class_names, source)
    for key in ("symmetric", "allow_uncovered"):
        if key in data and not isinstance(data[key], bool):
            raise RankingError(
                f"{source}: entry '{key}' must be true or false, got {data[key]!r}"
                f" ({type(data[key]).__name__}). Write it unquoted."
            )
    if "thresholds" in data and forms[0] != "similarities":
        raise RankingError(
            f"{source}: entry 'thresholds' only applies to the 'similarities' form; this file"
            f" uses '{forms[0]}'. Remove it."
        )

    b = _Builder(class_names, source)
    groups: Tuple[Dict[str, Tuple[str, ...]], ...] = ()
    similarities = None
    if forms[0] == "ranks":
        _build_ranks(b, data["ranks"])
    elif forms[0] == "levels":
        groups = _build_levels(b, data["levels"])
    else:
        similarities = _build_similarities(b, data["similarities"], data.get("thresholds"))

    if "groups" in data:
        if groups:
            raise RankingError(f"{source}: give either 'levels' or 'groups', not both.")
        sub = _Builder(class_names, source)
        groups = (_build_levels(sub, [data["groups"]])[0],)

    if data.get("symmetric", False):
        b.symmetrize()

    if allow_uncovered is None:
        allow_uncovered = bool(data.get("allow_uncovered", False))
    uncovered = tuple(c for c in class_names if c not in b.covered)
    if uncovered and not allow_uncovered:
        raise RankingError(
            f"{source}: the ranking does not cover the dataset classes {list(uncovered)}. Add an"
            " entry for each (an empty list means 'no similar classes'), or allow it explicitly"
            " with 'allow_uncovered: true' in the file or MODEL.RCDET.RANKING_ALLOW_UNCOVERED"
            " True."
        )

    ranking = ClassRanking(
        class_names=tuple(class_names),
        matrix=b.matrix,
        groups=groups,
        rank_similarities=similarities,
        source=source,
        uncovered=uncovered,
    )
    file_max = data.get("max_rank")
    limit = max_rank if max_rank else file_max
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise RankingError(
                f"{source}: entry 'max_rank' must be an integer >= 1, got {limit!r}."
            )
        ranking = ranking.truncate(limit)
    return ranking


def load_ranking(
    path: str,
    class_names: Sequence[str],
    *,
    allow_uncovered: Optional[bool] = None,
    max_rank: Optional[int] = None,
) -> ClassRanking:
    """Load a ranking YAML for ``class_names`` (the dataset's classes, in label order)."""
    _check_class_names(class_names, path)
    if os.path.isdir(path):
        raise RankingError(f"{path}: is a folder, not a ranking file.")
    if not os.path.isfile(path):
        raise RankingError(f"{path}: ranking file not found.")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise RankingError(
            f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r});"
            " save the ranking file as UTF-8."
        ) from None
    except OSError as e:
        raise RankingError(f"{path}: cannot be read: {e.strerror}.") from None
    except yaml.YAMLError as e:
        raise RankingError(f"{path}: not valid YAML: {_one_line(e)}") from None
    return ranking_from_dict(
        data, class_names, source=path, allow_uncovered=allow_uncovered, max_rank=max_rank
    )


def _one_line(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(error).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}."


def similarity_ranking_yaml(
    class_names: Sequence[str],
    similarity: np.ndarray,
    thresholds: Sequence[float],
    source: str = "",
) -> str:
    """A ranking file in the similarity-score form, headed by a readable summary of its ranks."""
    similarity = np.asarray(similarity, dtype=np.float64)
    k = len(class_names)
    if similarity.shape != (k, k):
        raise RankingError(f"similarity matrix must be {k}x{k}, got {similarity.shape}.")
    data = {
        "thresholds": [float(t) for t in thresholds],
        "similarities": {"classes": list(class_names), "matrix": np.round(similarity, 4).tolist()},
    }
    ranking = ranking_from_dict(data, class_names, source="<generated>")
    header = [
        (
            f"# Ranking generated from class-name similarities ({source})."
            if source
            else "# Generated ranking."
        ),
        f"# Score >= {thresholds[0]} -> rank 2"
        + "".join(f", >= {t} -> rank {i}" for i, t in enumerate(thresholds[1:], start=3))
        + ".",
        "# Ranks it produced (edit the scores or thresholds to change them):",
    ]
    header += [f"#   {line}" for line in ranking.describe().splitlines()]
    body = yaml.safe_dump(data, default_flow_style=None, sort_keys=False, width=200)
    return "\n".join(header) + "\n" + body


def ranking_to_yaml(ranking: ClassRanking, comment: str = "") -> str:
    """The ranking in the ordered-list form (ties as nested lists), loadable by load_ranking."""
    ranks = {}
    for a, name in enumerate(ranking.class_names):
        levels = []
        for r in range(2, ranking.num_ranks + 1):
            similar = [ranking.class_names[b] for b in np.flatnonzero(ranking.matrix[a] == r)]
            if similar:
                levels.append(similar)
            elif any((ranking.matrix[a] > r).tolist()):
                # An empty rank with higher ranks after it cannot be written as a list position.
                raise RankingError(
                    f"{ranking.source}: '{name}' has no class at rank {r} but has higher ranks."
                )
        ranks[name] = levels
    data = {"ranks": ranks}
    if ranking.groups:
        data["groups"] = {g: list(m) for g, m in ranking.groups[0].items()}
    header = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    return header + yaml.safe_dump(data, default_flow_style=None, sort_keys=False, width=200)
