"""tools/analyze_embeddings.py: the analysis files of a trained model, and --dataset: a misspelt
split lists this dataset's splits, a held-out split's name is derived on demand."""

import json
import logging

from conftest import tiny_cfg
from detectron2.data import DatasetCatalog

from tools import analyze_embeddings


def test_analyze_embeddings_tool_writes_its_files(tiny_models, tmp_path):
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml", "MODEL.WEIGHTS", tiny_models["rince"])
    cfg.freeze()
    analyze_embeddings.run(cfg, str(tmp_path), pre_projection=True, max_tsne=200)
    for f in (
        "analysis.json",
        "tsne_class.png",
        "tsne_group.png",
        "centroid_similarity.png",
        "box_features_tsne_class.png",
        "box_features_centroid_similarity.png",
    ):
        assert (tmp_path / f).is_file(), f
    with open(tmp_path / "analysis.json") as f:
        data = json.load(f)
    assert data["held_out_classes"] == ["ring", "triangle"]
    assert set(data["spaces"]) == {"projection", "box_features"}
    proj = data["spaces"]["projection"]
    assert set(proj["outliers"]) == {"class", "group_level1", "group_level2"}
    assert set(proj["retrieval_r1"]) == {"class", "group_level1", "group_level2"}
    assert set(proj["ranking_fidelity"]["mean_similarity"]) == {
        "rank1",
        "rank2",
        "rank3",
        "negative",
    }
    # Held-out boxes are embedded too (for the t-SNE), but the metrics use known classes only.
    assert data["num_boxes_per_class"]["ring"] + data["num_boxes_per_class"]["triangle"] > 0
    assert proj["num_embeddings"] == sum(
        v for k, v in data["num_boxes_per_class"].items() if k not in ("ring", "triangle")
    )


def test_analyze_embeddings_unregistered_dataset_lists_the_registered_splits(
    tiny_shapes, tmp_path, capsys
):
    logging.disable(
        logging.CRITICAL
    )  # detectron2's cached log handlers hold a closed capture stream
    try:
        code = analyze_embeddings.main(
            [
                "--config-file",
                "configs/shapes_rince_ood.yaml",
                "--dataset",
                "rcdet_shapes_tset",
                "--output",
                str(tmp_path),
                "MODEL.WEIGHTS",
                str(tmp_path / "unused.pth"),
            ]
        )
    finally:
        logging.disable(logging.NOTSET)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "--dataset 'rcdet_shapes_tset' is not a registered dataset" in line
    assert "Did you mean 'rcdet_shapes_test'?" in line
    for split in (
        "rcdet_shapes_train",
        "rcdet_shapes_val",
        "rcdet_shapes_trainval",
        "rcdet_shapes_test",
    ):
        assert split in line
    assert "coco_2017_train" not in line  # only the splits of this dataset


def test_analyze_embeddings_derives_a_named_held_out_split(tiny_shapes):
    cfg = tiny_cfg("configs/shapes_rince_ood.yaml")
    name = "rcdet_shapes_val__minus_ring+triangle_ood_test"
    assert analyze_embeddings.resolve_dataset(cfg, name) == name
    assert all("ood_annotations" in d for d in DatasetCatalog.get(name))
