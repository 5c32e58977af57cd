"""
rcdet.modeling.ood_head: the in-model OOD scores equal rcdet.evaluation.scores' numpy ones, the
state dict holds what the configured score needs once fitted (and nothing before), the buffers
survive a checkpoint round trip into a fresh model, detections carry ood_scores and is_unknown
only when the scorer can compute them, the config keys are checked, and DefaultPredictor's
ood_scores equal the OOD benchmark's for the same detections.
"""

import logging
import os

import numpy as np
import pytest
import torch
from conftest import benchmark_scores_by_image, compare_with_benchmark, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from rcdet.checkpoint import load_trained_weights
from rcdet.config import ConfigError
from rcdet.evaluation.calibration import MODEL_WITH_SCORER
from rcdet.evaluation.evaluator import fit_ood_statistics
from rcdet.evaluation.scores import EMBEDDING_SCORES, EmbeddingStatistics, logit_scores
from rcdet.modeling.ood_head import MODEL_SCORES, OODScorer

K, D = 4, 8


def _stats(per_class_covariance=False, dim=D, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, dim))
    y = rng.integers(0, K - 1, size=300)  # the last class has no box: its row is NaN
    return EmbeddingStatistics.fit(x, y, K, knn_k=5, per_class_covariance=per_class_covariance)


def _scorer(score, stats=None, temperature=1.0, dim=D):
    scorer = OODScorer(score, K, dim, temperature)
    if score in EMBEDDING_SCORES:
        scorer.fill(stats if stats is not None else _stats(dim=dim))
    return scorer


@pytest.mark.parametrize("per_class_covariance", [False, True])
def test_scores_equal_the_numpy_scores(per_class_covariance):
    stats = _stats(per_class_covariance)
    rng = np.random.default_rng(1)
    emb, logits = rng.normal(size=(40, D)), rng.normal(size=(40, K + 1)) * 3
    expected = dict(stats.scores(emb), **logit_scores(logits, K, energy_temperature=2.0))
    for score in MODEL_SCORES:
        scorer = _scorer(score, stats, temperature=2.0)
        got = scorer(torch.tensor(logits).float(), torch.tensor(emb).float())
        assert got.dtype == torch.float32 and got.shape == (40,)
        np.testing.assert_allclose(got.double().numpy(), expected[score], rtol=1e-5, atol=1e-5)


def test_knn_with_a_bank_smaller_than_2k_and_no_detections():
    stats = _stats()
    stats.bank, stats.knn_k = stats.bank[:7], 5  # 2k = 10 candidates, 7 entries
    scorer = _scorer("knn", stats)
    e = np.random.default_rng(2).normal(size=(6, D))
    np.testing.assert_allclose(
        scorer(torch.zeros(6, K + 1), torch.tensor(e).float()).numpy(),
        stats.scores(e)["knn"],
        rtol=1e-5,
    )
    assert scorer(torch.zeros(0, K + 1), torch.zeros(0, D)).shape == (0,)


def test_state_dict_holds_only_what_the_fitted_score_needs():
    for score in MODEL_SCORES:
        assert OODScorer(score, K, D).state_dict() == {}  # unfitted: nothing
    needs = {
        "cosine": {"prototypes"},
        "knn": {"bank", "knn_k"},
        "gaussian": {"means", "precisions", "log_dets"},
    }
    for score, names in needs.items():
        assert set(_scorer(score).state_dict()) == {"score_index", "num_known", "threshold"} | names
    logit = OODScorer("energy", K, D)
    logit.fill(None)
    assert set(logit.state_dict()) == {"score_index", "num_known", "threshold"}
    # The absent class has no prototype and no mean.
    assert _scorer("cosine").prototypes.shape == (K - 1, D)
    assert _scorer("gaussian", _stats(True)).precisions.shape == (K - 1, D, D)


def test_threshold_kept_for_the_same_statistics_and_cleared_for_others():
    scorer = _scorer("cosine")
    assert scorer.ready and not scorer.has_threshold
    scorer.set_threshold(0.25)
    assert scorer.has_threshold and float(scorer.threshold) == 0.25
    scorer.fill(_stats())  # the same statistics again (a cached fit)
    assert scorer.has_threshold and float(scorer.threshold) == 0.25
    scorer.fill(_stats(seed=3))
    assert not scorer.has_threshold
    with pytest.raises(ConfigError, match="MODEL.RCDET.OOD.SCORE 'cosine'"):
        OODScorer("cosine", K, D).fill(None)
    with pytest.raises(RuntimeError, match="fill the scorer"):
        OODScorer("msp", K, D).set_threshold(0.5)


def test_statistics_for_another_class_count_load_unfitted(caplog):
    other = OODScorer("cosine", K + 1, D)
    with caplog.at_level(logging.WARNING, logger="rcdet.modeling.ood_head"):
        other.load_state_dict(_scorer("cosine").state_dict())
    assert not other.ready and f"for {K} known classes, the model has {K + 1}" in caplog.text
    same = OODScorer("cosine", K, D)
    same.load_state_dict(_scorer("cosine").state_dict())
    assert same.ready and torch.equal(same.prototypes, _scorer("cosine").prototypes)


def _model(*opts):
    cfg = tiny_cfg(
        "configs/shapes_rince_ood.yaml",
        "MODEL.RCDET.EMBED_AT_TEST",
        "True",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "0.0",
        *opts,
    )
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


def _batch(seed=0, sizes=((160, 192), (176, 160))):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)}
        for h, w in sizes
    ]


def _fill(model, score, seed=0):
    head = model.roi_heads
    scorer = head.ood_scorer
    if score in EMBEDDING_SCORES:
        scorer.fill(_stats(dim=head.projection[-1].out_features, seed=seed))
    else:
        scorer.fill(None)
    return scorer


@pytest.mark.parametrize("score", ["cosine", "knn", "gaussian", "msp"])
def test_buffers_survive_a_checkpoint_round_trip(tiny_shapes, tmp_path, score):
    model, cfg = _model("MODEL.RCDET.OOD.SCORE", score)
    _fill(model, score).set_threshold(0.125)
    saved = {k: v.clone() for k, v in model.roi_heads.ood_scorer.state_dict().items()}
    DetectionCheckpointer(model, str(tmp_path)).save("fitted")

    fresh, _ = _model("MODEL.RCDET.OOD.SCORE", score)
    assert not fresh.roi_heads.ood_scorer.has_threshold
    DetectionCheckpointer(fresh).load(str(tmp_path / "fitted.pth"))
    loaded = fresh.roi_heads.ood_scorer
    assert loaded.ready and loaded.has_threshold and float(loaded.threshold) == 0.125
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    with torch.no_grad():
        a, b = model(_batch()), fresh(_batch())
    for x, y in zip(a, b):
        assert torch.equal(x["instances"].ood_scores, y["instances"].ood_scores)
        assert torch.equal(x["instances"].is_unknown, y["instances"].is_unknown)

    # rcdet's checker loads it too (every parameter present, the buffers taken).
    cfg.MODEL.WEIGHTS = str(tmp_path / "fitted.pth")
    again, _ = _model("MODEL.RCDET.OOD.SCORE", score)
    load_trained_weights(again, cfg)
    assert float(again.roi_heads.ood_scorer.threshold) == 0.125


def test_checkpoints_without_statistics_or_for_another_score_load_unfitted(
    tiny_shapes, tmp_path, caplog
):
    plain, _ = _model()
    DetectionCheckpointer(plain, str(tmp_path)).save("plain")
    state = torch.load(tmp_path / "plain.pth", weights_only=True)["model"]
    assert not any("ood_scorer" in k for k in state)

    fitted, _ = _model()
    _fill(fitted, "cosine")
    fitted.roi_heads.ood_scorer.set_threshold(0.5)
    DetectionCheckpointer(fitted).load(str(tmp_path / "plain.pth"))  # loading replaces the state
    assert not fitted.roi_heads.ood_scorer.ready

    _fill(fitted, "cosine")
    DetectionCheckpointer(fitted, str(tmp_path)).save("cosine")
    knn, _ = _model("MODEL.RCDET.OOD.SCORE", "knn")
    with caplog.at_level(logging.WARNING, logger="rcdet.modeling.ood_head"):
        DetectionCheckpointer(knn).load(str(tmp_path / "cosine.pth"))
    assert not knn.roi_heads.ood_scorer.ready
    assert "for the score 'cosine', not MODEL.RCDET.OOD.SCORE 'knn'" in caplog.text


def test_detections_carry_ood_fields_only_when_the_scorer_can_compute_them(tiny_shapes):
    model, _ = _model()
    scorer = model.roi_heads.ood_scorer
    assert scorer.score == "cosine"  # auto, with the contrastive branch
    with torch.no_grad():
        unfitted = model(_batch())
    assert all(not o["instances"].has("ood_scores") for o in unfitted)

    _fill(model, "cosine")
    with torch.no_grad():
        no_threshold = model(_batch())
    for o in no_threshold:
        inst = o["instances"]
        assert len(inst) > 0 and not inst.has("is_unknown")
        expected = scorer(inst.pred_logits, inst.pred_embeddings)
        assert torch.equal(inst.ood_scores, expected)

    median = float(torch.cat([o["instances"].ood_scores for o in no_threshold]).median())
    scorer.set_threshold(median)
    with torch.no_grad():
        flagged = model(_batch())
    for o, ref in zip(flagged, no_threshold):
        assert torch.equal(o["instances"].is_unknown, ref["instances"].ood_scores < median)
    assert any(o["instances"].is_unknown.any() for o in flagged)
    assert any((~o["instances"].is_unknown).any() for o in flagged)

    model.roi_heads.embed_at_test = False
    with torch.no_grad():
        plain = model(_batch())
    assert all(not o["instances"].has("ood_scores") for o in plain)


def test_softmax_heads_default_to_msp(tiny_shapes):
    model, _ = _model("MODEL.RCDET.LOSS", "none")
    scorer = model.roi_heads.ood_scorer
    assert scorer.score == "msp" and scorer.ready and not scorer.has_threshold
    with torch.no_grad():
        out = model(_batch())
    inst = out[0]["instances"]
    expected = torch.softmax(inst.pred_logits[:, :-1], dim=1).max(dim=1).values
    torch.testing.assert_close(inst.ood_scores, expected)


@pytest.mark.parametrize(
    "opts, message",
    [
        (
            ("MODEL.RCDET.LOSS", "none", "MODEL.RCDET.OOD.SCORE", "knn"),
            "MODEL.RCDET.OOD.SCORE = 'knn' needs the contrastive branch",
        ),
        (("MODEL.RCDET.OOD.SCORE", "mahalanobis"), "MODEL.RCDET.OOD.SCORE = 'mahalanobis'"),
        (("MODEL.RCDET.OOD.ID_RECALL", "0.0"), r"MODEL.RCDET.OOD.ID_RECALL = 0.0; allowed: a num"),
        (("MODEL.RCDET.OOD.ID_RECALL", "1.5"), r"MODEL.RCDET.OOD.ID_RECALL = 1.5"),
    ],
)
def test_config_keys_are_checked(tiny_shapes, opts, message):
    with pytest.raises(ConfigError, match=message):
        _model(*opts)


# ---------------------------------------------------------------- against the OOD benchmark


@pytest.mark.parametrize("score", MODEL_SCORES)
def test_default_predictor_ood_scores_equal_the_benchmarks(image_level_report, tiny_models, score):
    # The benchmark of the tiny RINCE model (conftest), whose scorer is cosine (auto): its
    # folder holds ood_scores.npz and model_ood.pth, the weights with the fitted scorer.
    cfg, out = image_level_report.cfg, image_level_report.folder
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(out / MODEL_WITH_SCORER)
    cfg.MODEL.RCDET.OOD.SCORE = score
    predictor = DefaultPredictor(cfg)
    scorer = predictor.model.roi_heads.ood_scorer
    if score == "cosine":  # the score model_ood.pth was fitted and calibrated for
        assert scorer.ready and scorer.has_threshold
    else:
        # Another score's statistics: fitted from the model (the benchmark's cached fit).
        assert scorer.ready == (score not in EMBEDDING_SCORES) and not scorer.has_threshold
        cache = os.path.dirname(tiny_models["rince"])  # where training cached them
        fit_ood_statistics(predictor.model, cfg, cache_dir=cache)
        assert scorer.ready
    expected = benchmark_scores_by_image(out, score)
    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    compared, sizes = 0, set()
    for i, d in enumerate(dicts):
        image = read_image(d["file_name"], format="BGR")
        sizes.add(image.shape)
        inst = predictor(image)["instances"]
        if scorer.has_threshold:
            assert inst.is_unknown.dtype == torch.bool
            assert torch.equal(inst.is_unknown, inst.ood_scores < scorer.threshold)
        if i in expected:
            found = (inst.pred_boxes.tensor.numpy(), inst.ood_scores.numpy())
            compared += compare_with_benchmark(found, expected[i])
    assert compared >= 5 and len(sizes) >= 2  # input sizes, as the traced export is checked on
