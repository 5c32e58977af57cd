"""rcdet.ranking: rank matrices from ordered lists, levels and similarities, their errors, and the
shipped ranking files."""

import numpy as np
import pytest
import yaml
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC

from rcdet.data.shapes import CLASS_NAMES as SHAPES
from rcdet.ranking import (
    NEGATIVE_RANK,
    RankingError,
    load_ranking,
    ranking_from_dict,
    ranks_from_similarity,
    similarity_ranking_yaml,
)

N = NEGATIVE_RANK
ABC = ("a", "b", "c", "d")


def write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def test_ordered_lists_and_ties():
    r = ranking_from_dict(
        {"ranks": {"a": [["b"], ["c", "d"]], "b": ["a"], "c": [], "d": ["c", "a"]}}, ABC
    )
    assert r.matrix.tolist() == [[1, 2, 3, 3], [2, 1, N, N], [N, N, 1, N], [3, N, 2, 1]]
    assert r.num_ranks == 3


def test_symmetric_fills_only_missing_direction():
    data = {"symmetric": True, "ranks": {"a": ["b", "c"], "b": ["d"], "c": ["a", "b"], "d": []}}
    r = ranking_from_dict(data, ABC)
    # a->b given (2), b->a not given -> copied; a->c = 3 and c->a = 2 both given -> kept.
    assert r.matrix[1, 0] == 2 and r.matrix[0, 2] == 3 and r.matrix[2, 0] == 2
    assert r.matrix[3, 1] == 2  # b->d copied to d->b


def test_max_rank_truncates_to_negative():
    r = ranking_from_dict(
        {"ranks": {"a": ["b", "c", "d"], "b": [], "c": [], "d": []}}, ABC, max_rank=2
    )
    assert r.matrix[0].tolist() == [1, 2, N, N]
    r1 = ranking_from_dict({"max_rank": 1, "ranks": {"a": ["b"], "b": [], "c": [], "d": []}}, ABC)
    assert (r1.matrix == np.where(np.eye(4, dtype=bool), 1, N)).all()


def test_hierarchy_levels():
    data = {
        "levels": [
            {"g1": ["a", "b"], "g2": ["c"], "g3": ["d"]},
            {"top": ["a", "b", "c"], "other": ["d"]},
        ]
    }
    r = ranking_from_dict(data, ABC)
    assert r.matrix.tolist() == [[1, 2, 3, N], [2, 1, 3, N], [3, 3, 1, N], [N, N, N, 1]]
    assert r.group_labels(0) == ["g1", "g1", "g2", "g3"]
    assert r.group_labels(1) == ["top", "top", "top", "other"]


def test_similarity_matrix_and_pairs():
    sims = [[1, 0.6, 0.4, 0.1], [0.6, 1, 0.2, 0.5], [0.4, 0.2, 1, 0.36], [0.1, 0.5, 0.36, 1]]
    r = ranking_from_dict(
        {"thresholds": [0.5, 0.35], "similarities": {"classes": list(ABC), "matrix": sims}}, ABC
    )
    assert r.matrix.tolist() == [[1, 2, 3, N], [2, 1, N, 2], [3, N, 1, 3], [N, 2, 3, 1]]
    assert r.rank_similarities == (0.5, 0.35)
    pairs = {
        "thresholds": [0.5, 0.35],
        "symmetric": True,
        "similarities": {"pairs": [["a", "b", 0.6], ["c", "d", 0.4]]},
        "allow_uncovered": True,
    }
    r2 = ranking_from_dict(pairs, ABC)
    assert r2.matrix[0, 1] == r2.matrix[1, 0] == 2 and r2.matrix[2, 3] == r2.matrix[3, 2] == 3


def test_ranks_from_similarity_hand_made():
    s = np.array(
        [[1.0, 0.7, 0.45, 0.2], [0.7, 1.0, 0.5, 0.35], [0.45, 0.5, 1.0, 0.0], [0.2, 0.35, 0.0, 1.0]]
    )
    assert ranks_from_similarity(s, [0.5, 0.35]).tolist() == [
        [1, 2, 3, N],
        [2, 1, 2, 3],
        [3, 2, 1, N],
        [N, 3, N, 1],
    ]


def test_ranking_builder_turns_similarities_into_ranks():
    names = ["cat", "dog", "car", "bus"]
    sim = np.array(
        [[1, 0.62, 0.2, 0.1], [0.62, 1, 0.25, 0.36], [0.2, 0.25, 1, 0.55], [0.1, 0.36, 0.55, 1]]
    )
    text = similarity_ranking_yaml(names, sim, [0.5, 0.35], source="hand-made")
    assert "#   dog: rank 2: cat; rank 3: bus" in text
    r = ranking_from_dict(yaml.safe_load(text), names)
    assert r.matrix.tolist() == [[1, 2, N, N], [2, 1, N, 3], [N, N, 1, 2], [N, 3, 2, 1]]


def test_subset_and_permuted():
    r = ranking_from_dict({"ranks": {"a": ["b", "c"], "b": ["a"], "c": ["d"], "d": []}}, ABC)
    s = r.subset(["c", "a"])
    assert s.matrix.tolist() == [[1, N], [3, 1]]
    p = r.permuted(seed=3)
    assert sorted(p.matrix.flatten().tolist()) == sorted(r.matrix.flatten().tolist())
    assert not np.array_equal(p.matrix, r.matrix)


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"ranks": {"a": ["bb"], "b": [], "c": [], "d": []}}, "unknown class name 'bb'"),
        ({"ranks": {"aa": ["b"], "b": [], "c": [], "d": []}}, "did you mean 'a'?"),
        ({"ranks": {"a": ["a"], "b": [], "c": [], "d": []}}, "lists itself"),
        ({"ranks": {"a": ["b", ["c", "b"]], "b": [], "c": [], "d": []}}, "appears more than once"),
        (
            {"levels": [{"x": ["a", "b"], "y": ["b", "c", "d"]}]},
            "appears more than once in this level",
        ),
        (
            {"thresholds": [0.3, 0.5], "similarities": {"pairs": [["a", "b", 0.6]]}},
            "strictly decreasing",
        ),
        ({"ranks": {"a": ["b"], "b": []}}, "does not cover the dataset classes ['c', 'd']"),
        ({"ranks": {}, "levels": []}, "exactly one of"),
        (
            {"thresholds": [0.5], "similarities": {"classes": ["a", "b"], "matrix": [[1, 0.5]]}},
            "must be 2x2",
        ),
    ],
)
def test_errors_name_file_and_entry(tmp_path, content, expected):
    path = write(tmp_path, content)
    with pytest.raises(RankingError) as e:
        load_ranking(path, ABC)
    assert expected in str(e.value)
    assert path in str(e.value)


def test_error_messages_name_the_entry(tmp_path):
    path = write(tmp_path, {"ranks": {"a": ["b"], "b": ["brid"], "c": [], "d": []}})
    with pytest.raises(RankingError, match=r"entry 'ranks.b': unknown class name 'brid'"):
        load_ranking(path, ABC)


def test_empty_file_and_missing_file(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(RankingError, match="the ranking file is empty"):
        load_ranking(path, ABC)
    with pytest.raises(RankingError, match="ranking file not found"):
        load_ranking(str(tmp_path / "nope.yaml"), ABC)


def test_uncovered_allowed_explicitly():
    r = ranking_from_dict({"ranks": {"a": ["b"], "b": []}}, ABC, allow_uncovered=True)
    assert r.uncovered == ("c", "d")
    assert r.matrix[2].tolist() == [N, N, 1, N]


@pytest.mark.parametrize(
    "name, classes",
    [("voc_human.yaml", VOC), ("voc_groups.yaml", VOC), ("shapes_families.yaml", SHAPES)],
)
def test_shipped_rankings_load(repo_path, name, classes):
    r = load_ranking(repo_path("configs", "rankings", name), classes)
    assert r.num_ranks >= 2
    assert (np.diag(r.matrix) == 1).all()


def test_voc_human_ranks_bird_before_ship(repo_path):
    r = load_ranking(repo_path("configs", "rankings", "voc_human.yaml"), VOC)
    a = VOC.index("aeroplane")
    assert r.matrix[a, VOC.index("bird")] == 2
    assert r.matrix[a, VOC.index("boat")] == 3


def test_shapes_ranking_matches_families(repo_path):
    from rcdet.data.shapes import FAMILIES

    r = load_ranking(repo_path("configs", "rankings", "shapes_families.yaml"), SHAPES)
    for members in FAMILIES.values():
        for x in members:
            for y in members:
                if x != y:
                    assert r.matrix[SHAPES.index(x), SHAPES.index(y)] == 2


@pytest.mark.parametrize(
    "text, key, line, first",
    [
        ("ranks:\n  a: [b]\n  b: []\n  a: [c]\n  c: []\n  d: []\n", "a", 4, 2),
        ("ranks: {a: [b], b: [], c: [], d: []}\nmax_rank: 2\nmax_rank: 3\n", "max_rank", 3, 2),
        ("levels:\n  - {g1: [a, b], g2: [c, d], g1: [c]}\n", "g1", 2, 2),
    ],
)
def test_duplicate_yaml_keys_name_file_line_and_key(tmp_path, text, key, line, first):
    path = write(tmp_path, text)
    with pytest.raises(RankingError) as e:
        load_ranking(path, ABC)
    assert str(e.value) == (
        f"{path}: line {line}: key '{key}' appears twice in one mapping (first at line {first})."
        " Merge the two entries."
    )


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = write(tmp_path, "ranks:\n  <<: {a: [c], b: []}\n  a: [b]\n  c: []\n  d: []\n")
    assert load_ranking(path, ABC).matrix[0].tolist() == [1, 2, N, N]


@pytest.mark.parametrize("key", ["symmetric", "allow_uncovered"])
def test_options_must_be_real_booleans(tmp_path, key):
    path = write(tmp_path, f"{key}: 'false'\nranks: {{a: [b], b: [], c: [], d: []}}\n")
    with pytest.raises(RankingError) as e:
        load_ranking(path, ABC)
    assert str(e.value) == (
        f"{path}: entry '{key}' must be true or false, got 'false' (str). Write it unquoted."
    )
    # An unquoted false really is false: b -> a is not copied.
    r = load_ranking(
        write(tmp_path, "symmetric: false\nranks: {a: [b], b: [], c: [], d: []}\n"), ABC
    )
    assert r.matrix[1, 0] == N


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            {
                "thresholds": [0.5],
                "similarities": {
                    "classes": list(ABC),
                    "matrix": [[1, 0.6, 0, 0], [0.6, 1, 0, 0], [0, 0, 1, float("nan")], [0] * 4],
                },
            },
            "entry 'similarities.matrix': must contain only finite numbers; row 3, column 4 is"
            " nan.",
        ),
        (
            {
                "thresholds": [0.5],
                "allow_uncovered": True,
                "similarities": {"pairs": [["a", "b", float("inf")]]},
            },
            "entry 'similarities.pairs[0]': score must be a finite number, got inf.",
        ),
        (
            {
                "thresholds": [0.5],
                "allow_uncovered": True,
                "similarities": {"pairs": [["a", "b", "0.6"]]},
            },
            "entry 'similarities.pairs[0]': score must be a finite number, got '0.6'.",
        ),
        (
            {
                "thresholds": [0.5],
                "allow_uncovered": True,
                "similarities": {"pairs": [["a", "b", 0.6], ["a", "c", True]]},
            },
            "entry 'similarities.pairs[1]': score must be a finite number, got True.",
        ),
        (
            {
                "thresholds": [float("nan")],
                "allow_uncovered": True,
                "similarities": {"pairs": [["a", "b", 0.6]]},
            },
            "entry 'thresholds' must be finite numbers, got [nan].",
        ),
        (
            {"thresholds": 0.5, "allow_uncovered": True, "similarities": {"pairs": []}},
            "entry 'thresholds' must be a non-empty list t_2 > t_3 > ..., got 0.5.",
        ),
        (
            {"thresholds": [0.5], "ranks": {"a": ["b"], "b": [], "c": [], "d": []}},
            "entry 'thresholds' only applies to the 'similarities' form; this file uses 'ranks'.",
        ),
        (
            {
                "thresholds": [0.5],
                "similarities": {"classes": list(ABC), "matrix": np.eye(4).tolist(), "pairs": []},
            },
            "entry 'similarities': has keys ['classes', 'matrix', 'pairs']; give either",
        ),
    ],
)
def test_similarity_values_must_be_finite_numbers(tmp_path, content, expected):
    path = write(tmp_path, content)
    with pytest.raises(RankingError) as e:
        load_ranking(path, ABC)
    assert str(e.value).startswith(f"{path}: {expected}")


def test_file_that_is_not_utf8_or_not_yaml_or_a_folder(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# café\nranks: {a: [b], b: [], c: [], d: []}\n".encode("latin-1"))
    with pytest.raises(RankingError) as e:
        load_ranking(str(path), ABC)
    assert str(e.value) == (
        f"{path}: not UTF-8 text (byte 5 is b'\\xe9'); save the ranking file as UTF-8."
    )
    bad = write(tmp_path, "ranks:\n  a: [b\n  b: []\n")
    with pytest.raises(RankingError) as e:
        load_ranking(bad, ABC)
    assert str(e.value) == (
        f"{bad}: not valid YAML: line 3, column 4: expected ',' or ']', but got ':'."
    )
    with pytest.raises(RankingError, match="is a folder, not a ranking file"):
        load_ranking(str(tmp_path), ABC)


def test_class_names_as_a_string_get_a_clear_error(tmp_path):
    path = write(tmp_path, {"ranks": {"a": ["b"], "b": [], "c": [], "d": []}})
    with pytest.raises(RankingError) as e:
        load_ranking(path, "a, b,c,d")
    assert str(e.value) == (
        f"{path}: class_names must be a list of class names, got the string 'a, b,c,d'; pass a"
        " list such as ['a', 'b', 'c', 'd']."
    )
    with pytest.raises(RankingError, match=r"class_names must be non-empty strings, got \['a', 2"):
        ranking_from_dict({"ranks": {"a": []}}, ["a", 2])
