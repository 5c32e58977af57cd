"""rcdet.study: the comparison study's methods, provenance, table, statistics, paired tests, results
and figures."""

import json
import os
import shutil

import matplotlib.colors as mcolors
import numpy as np
import pytest
import torch

from rcdet import study
from rcdet.evaluation.bootstrap import paired_bootstrap_family_accuracy
from rcdet.evaluation.metrics import ood_metrics
from rcdet.evaluation.report import PROTOCOL_VERSION, OODReport, ReportError
from rcdet.file_io import save_npz_atomic


def test_table_builder_mean_and_sample_std():
    def res(ap, msp, cos, knn, out_c, rho):
        return {
            "AP": ap,
            "AP50": ap + 10,
            "AP75": ap - 10,
            "msp_auroc": msp,
            "msp_fpr95": 1 - msp,
            "cosine_auroc": cos,
            "cosine_fpr95": 0.5,
            "knn_auroc": knn,
            "knn_fpr95": 0.4,
            "gaussian_auroc": None,
            "gaussian_fpr95": None,
            "outliers_class": out_c,
            "outliers_group": out_c / 2,
            "spearman": rho,
            "space": "projection",
        }

    rows = study.build_table(
        {
            "rince": [
                res(50, 0.6, 0.70, 0.72, 0.10, 0.5),
                res(52, 0.7, 0.74, 0.70, 0.20, 0.7),
                res(54, 0.8, 0.78, 0.68, 0.30, 0.9),
            ],
            "softmax": [res(40, 0.5, None, None, 0.4, None)],
        }
    )
    r = {row["method"]: row for row in rows}
    assert r["rince"]["AP"] == (52.0, 2.0)
    assert r["rince"]["msp_auroc"][0] == pytest.approx(0.7)
    assert r["rince"]["msp_auroc"][1] == pytest.approx(0.1)
    # cosine has the higher mean AUROC (0.74 vs 0.70) -> it is the best embedding score.
    assert r["rince"]["best_emb_score"] == "cosine"
    assert r["rince"]["best_emb_auroc"][0] == pytest.approx(0.74)
    assert r["rince"]["best_emb_auroc"][1] == pytest.approx(0.04)
    assert r["rince"]["outliers_class"][0] == pytest.approx(20.0)
    assert r["rince"]["outliers_class"][1] == pytest.approx(10.0)
    assert r["softmax"]["best_emb_score"] == "n/a"
    assert r["softmax"]["best_emb_auroc"] == (None, None)
    assert r["softmax"]["AP"] == (40.0, None)  # one seed: no std
    md = study.table_markdown(rows)
    assert "| rince | 3 | 52.0 ± 2.0 |" in md and "| softmax | 1 | 40.0 |" in md
    csv_text = study.table_csv(rows)
    assert csv_text.splitlines()[1].startswith("rince,3,52,2,")


def _fake_run(folder, rng, quality, image_ids, scores=("msp", "knn")):
    """An ood_scores.npz: 3 detections per image, ``quality`` separates ID from OOD."""
    n = len(image_ids)
    image_index = np.repeat(np.arange(n), 3)
    is_id = rng.random(3 * n) < 0.7
    status = np.where(is_id, 1, 0)
    status[::7] = -2  # duplicates: left out of the ROC set
    values = {s: rng.normal(size=3 * n) + quality.get(s, 0.0) * is_id for s in scores}
    os.makedirs(os.path.join(folder, "ood"), exist_ok=True)
    np.savez(
        os.path.join(folder, "ood", "ood_scores.npz"),
        status=status,
        image_index=image_index,
        image_ids=np.array(image_ids),
        **values,
    )
    m = status >= 0
    return {s: v[m] for s, v in values.items()}, status[m] == 1


def _tables(md):
    """{title: {method: row line}} of study.table_markdown's output."""
    tables, title = {}, None
    for line in md.splitlines():
        if line.startswith("**"):
            title = line.strip("*")
            tables[title] = {}
        elif line.startswith("| ") and not line.startswith("| method |"):
            tables[title][line.split(" | ")[0][2:]] = line
    return tables


PAIRED_TITLE = "Paired bootstrap tests over the test images (difference [95% interval], p)"


def test_paired_bootstrap_tests_in_the_table(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"{i:06d}" for i in range(60)]
    dirs, raw = {}, {}
    for method, quality, seeds, scores in (
        ("softmax", {"msp": 0.5}, 1, ("msp",)),
        ("supcon", {"msp": 0.5, "knn": 1.0}, 2, ("msp", "knn")),
        ("rince_in", {"msp": 0.5, "knn": 2.0}, 2, ("msp", "knn")),
        ("vos", {"msp": 0.5, "energy": 1.5}, 2, ("msp", "energy")),
        ("rince_out_in_shuffled", {"msp": 0.5, "knn": 0.7}, 2, ("msp", "knn")),
    ):
        for seed in range(seeds):
            folder = str(tmp_path / method / f"seed{seed}")
            raw.setdefault(method, []).append(_fake_run(folder, rng, quality, ids, scores))
            dirs.setdefault(method, {})[seed] = folder

    def result(values, is_id):
        auc = {s: ood_metrics(v, is_id)["auroc"] for s, v in values.items()}
        return {"AP": 50.0, **{f"{s}_auroc": a for s, a in auc.items()}}

    rows = study.build_table({m: [result(*r) for r in runs] for m, runs in raw.items()})
    study.attach_paired_tests(rows, study.PairedRuns(rows, dirs, replicates=200))
    r = {row["method"]: row for row in rows}
    assert r["softmax"]["vs_msp"] is None and r["softmax"]["vs_supcon"] is None
    assert r["supcon"]["vs_supcon"] == "self" and r["vos"]["vs_vos"] == "self"

    # The observed difference is the mean over seeds of each side's AUROC.
    def auc(m, s):
        return np.mean([ood_metrics(v[s], y)["auroc"] for v, y in raw[m]])

    assert r["rince_in"]["vs_msp"]["difference"] == pytest.approx(
        auc("rince_in", "knn") - auc("rince_in", "msp")
    )
    assert r["rince_in"]["vs_supcon"]["difference"] == pytest.approx(
        auc("rince_in", "knn") - auc("supcon", "knn")
    )
    # Against VOS: VOS's own score, energy.
    assert r["rince_in"]["vs_vos"]["difference"] == pytest.approx(
        auc("rince_in", "knn") - auc("vos", "energy")
    )
    assert r["rince_in"]["vs_vos"]["seeds"] == [0, 1]
    # Against the shuffled-ranking control: its best embedding score.
    assert r["rince_in"]["vs_control"]["difference"] == pytest.approx(
        auc("rince_in", "knn") - auc("rince_out_in_shuffled", "knn")
    )
    assert r["rince_out_in_shuffled"]["vs_control"] == "self"
    assert r["softmax"]["vs_control"] is None and r["vos"]["vs_control"] is None
    t = r["rince_in"]["vs_supcon"]
    assert t["ci"][0] <= t["difference"] <= t["ci"][1] and 0 <= t["p_value"] <= 1
    # Each seed's own difference, run against the partner's run of the same seed.
    per_seed = [
        ood_metrics(a["knn"], ya)["auroc"] - ood_metrics(b["knn"], yb)["auroc"]
        for (a, ya), (b, yb) in zip(raw["rince_in"], raw["supcon"])
    ]
    assert t["per_run"] == pytest.approx(per_seed) and len(per_seed) == 2
    assert np.mean(per_seed) == pytest.approx(t["difference"])
    md = study.table_markdown(rows)
    assert PAIRED_TITLE in md.splitlines()[-9]
    assert md.splitlines()[-7].startswith("| method | seeds | best emb. − SupCon best emb. AUROC |")
    paired = _tables(md)[PAIRED_TITLE]
    p = f"p {t['p_value']:.3f}" if t["p_value"] else f"p < {2 / t['replicates']:.3f}"
    cell = f"{t['difference']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}], {p}"
    cell += f"; seeds {per_seed[0]:+.3f} {per_seed[1]:+.3f}"
    assert cell in paired["rince_in"] and "| — |" in paired["supcon"]
    assert paired["softmax"] == "| softmax | 1 | n/a | n/a | n/a | n/a | n/a | — | argmax |"
    assert (
        study.table_csv(rows)
        .splitlines()[0]
        .endswith(
            "family_vs_softmax_difference,family_vs_softmax_ci_lo,family_vs_softmax_ci_hi,"
            "family_vs_softmax_p_value,family_vs_softmax_per_seed"
        )
    )
    # Each seed's difference, in seed order, in the CSV as in the markdown cell.
    table = study.table_csv(rows).splitlines()
    header, rince_in = table[0].split(","), next(x for x in table if x.startswith("rince_in,"))
    column = header.index("vs_supcon_per_seed")
    assert rince_in.split(",")[column] == f"{per_seed[0]:.6g} {per_seed[1]:.6g}"
    assert rince_in.split(",")[column - 4] == f"{t['difference']:.6g}"
    # The study's contrasts: A − B on the named score, each side's best embedding score for
    # best_emb; None where a side did not run or lacks the score.
    contrasts = study.contrast_tests(
        study.PairedRuns(rows, dirs, replicates=200),
        [
            study.Contrast("rince_in", "supcon", "best_emb", "q1"),
            study.Contrast("rince_in", "vos", "msp", "q2"),
            study.Contrast("vos", "rince_in", "energy", "q3"),
            study.Contrast("rince_in", "rince_out_in_vos", "msp", "q4"),
        ],
    )
    best, msp, energy, absent = contrasts
    assert best["test"] == r["rince_in"]["vs_supcon"]  # the same test, the same replicates
    assert (best["a_score"], best["b_score"]) == ("knn", "knn")
    assert msp["test"]["difference"] == pytest.approx(auc("rince_in", "msp") - auc("vos", "msp"))
    assert msp["test"]["seeds"] == [0, 1]
    assert energy["test"] is None and absent["test"] is None
    md = study.table_markdown(rows, contrasts)
    lines = md.split(f"**{study.CONTRASTS_TITLE}**")[1].strip().splitlines()
    assert lines[0] == "| question | A − B | measure | seeds | difference [95% interval], p |"
    lines = lines[2:]
    assert lines[0].startswith("| q1 | rince_in − supcon | knn AUROC | 0, 1 | ")
    assert lines[0].endswith(f" | {cell} |")
    assert lines[3] == "| q4 | rince_in − rince_out_in_vos | msp AUROC | n/a | n/a |"
    assert study.CONTRASTS_TITLE not in study.table_markdown(rows)
    csv_lines = study.contrasts_csv(contrasts).splitlines()
    assert csv_lines[0] == (
        "question,a,b,measure,a_score,b_score,seeds,difference,ci_lo,ci_hi,p_value,per_seed"
    )
    assert csv_lines[1].startswith("q1,rince_in,supcon,best_emb,knn,knn,0 1,")
    assert csv_lines[1].endswith(f",{per_seed[0]:.6g} {per_seed[1]:.6g}")
    d = msp["test"]["difference"]
    assert csv_lines[2].startswith(f"q2,rince_in,vos,msp,msp,msp,0 1,{d:.6g},")
    assert csv_lines[4] == "q4,rince_in,rince_out_in_vos,msp,msp,msp,,,,,,"
    # Runs evaluated on different test images cannot be paired.
    _fake_run(dirs["rince_in"][0], rng, {"knn": 2.0}, ids[:-1])
    paired = study.PairedRuns(rows, dirs, replicates=20)
    study.attach_paired_tests(rows, paired)
    assert all(row["vs_msp"] is None for row in rows)
    assert (
        study.contrast_tests(paired, [study.Contrast("rince_in", "vos", "msp", "q")])[0]["test"]
        is None
    )


def test_each_study_asks_its_own_contrasts_of_the_methods_it_runs():
    exposure = study.study_for("exposure", voc=False)
    assert exposure.contrasts == study.EXPOSURE_CONTRASTS
    assert ("rince_out_in_f_fixed", "rince_out_in_oe", "best_emb") in {
        (c.a, c.b, c.measure) for c in exposure.contrasts
    }
    assert study.study_for("main", voc=True).contrasts == study.MAIN_CONTRASTS
    # The drop_annotations variant runs neither rince_in nor rince_out_in_vos.
    assert study.study_for("main", False, "drop_annotations").contrasts == []
    only = study.study_for("main", False, only=("rince_in", "rince_out_in", "supcon"))
    assert [(c.a, c.b) for c in only.contrasts] == [("rince_in", "rince_out_in")]
    # The ranking's own family-accuracy test: each RINCE row against its shuffled control.
    assert {(c.a, c.b) for c in study.MAIN_CONTRASTS if c.measure == "family"} == {
        ("rince_in", "rince_out_in_shuffled"),
        ("rince_out_in", "rince_out_in_shuffled"),
    }
    names = {m.name for m in study.methods_for(False) + study.exposure_methods_for(False)}
    for c in study.MAIN_CONTRASTS + study.EXPOSURE_CONTRASTS:
        assert {c.a, c.b} <= names and c.measure in ("best_emb", "msp", "energy", "family")


def test_paired_tests_pair_each_run_with_the_partners_run_of_the_same_seed(tmp_path):
    """A method with seeds 1 and 2 is compared with the partner's seeds 1 and 2, not 0."""
    rng = np.random.default_rng(1)
    ids = [f"{i:06d}" for i in range(50)]
    dirs, raw = {}, {}
    # The partner's seed 0 is far better than its seeds 1 and 2: pairing it in would show.
    for method, seed, quality in (
        ("supcon_f_fixed", 0, 4.0),
        ("supcon_f_fixed", 1, 0.5),
        ("supcon_f_fixed", 2, 0.7),
        ("rince_out_in_f_fixed", 1, 1.0),
        ("rince_out_in_f_fixed", 2, 1.2),
    ):
        folder = str(tmp_path / method / f"seed{seed}")
        values, is_id = _fake_run(folder, rng, {"msp": 0.2, "knn": quality}, ids)
        raw[(method, seed)] = ood_metrics(values["knn"], is_id)["auroc"]
        dirs.setdefault(method, {})[seed] = folder
    per_method = {
        m: [{"knn_auroc": raw[(m, s)], "msp_auroc": 0.5} for s in sorted(seeds)]
        for m, seeds in dirs.items()
    }
    rows = study.build_table(per_method)
    partners = study.study_for("exposure", voc=False).partners
    study.attach_paired_tests(rows, study.PairedRuns(rows, dirs, replicates=50), partners)
    r = {row["method"]: row for row in rows}
    test = r["rince_out_in_f_fixed"]["vs_supcon"]
    assert test["seeds"] == [1, 2]
    expected = np.mean(
        [raw[("rince_out_in_f_fixed", s)] - raw[("supcon_f_fixed", s)] for s in (1, 2)]
    )
    assert test["difference"] == pytest.approx(expected)
    assert r["supcon_f_fixed"]["vs_supcon"] == "self"
    # The exposure study has no VOS row, and no softmax run here.
    assert r["rince_out_in_f_fixed"]["vs_vos"] is None
    assert r["rince_out_in_f_fixed"]["vs_control"] is None
    assert r["rince_out_in_f_fixed"]["family_vs_softmax"] is None


def _placement(ring, triangle, chance=(0.4, 0.2)):
    """A report's placement section: family accuracy {method: value} per held-out class."""
    return {
        "classes": {
            "ring": {"family": ["disc", "bullseye"], "chance": chance[0], "family_accuracy": ring},
            "triangle": {"family": ["tri_frame"], "chance": chance[1], "family_accuracy": triangle},
        }
    }


def test_family_columns_are_the_mean_over_held_out_classes():
    both = _placement(
        {"prototype": 0.9, "knn": 0.8, "argmax": 0.7}, {"prototype": 0.5, "knn": 0.4, "argmax": 0.3}
    )
    assert study.family_means(both) == pytest.approx(
        {"family_emb": 0.7, "family_argmax": 0.5, "family_chance": 0.3}
    )
    # A head without a projection: argmax only. A class without a defined accuracy is left out,
    # of the chance rate too.
    argmax_only = _placement(
        {"prototype": None, "knn": None, "argmax": 0.6},
        {"prototype": None, "knn": None, "argmax": None},
    )
    assert study.family_means(argmax_only) == {
        "family_emb": None,
        "family_argmax": 0.6,
        "family_chance": 0.4,
    }
    assert study.family_means(None) == {
        "family_emb": None,
        "family_argmax": None,
        "family_chance": None,
    }
    rows = study.build_table(
        {
            "rince": [
                {**study.family_means(both), "space": "projection"},
                {
                    "family_emb": 0.5,
                    "family_argmax": 0.3,
                    "family_chance": 0.3,
                    "space": "projection",
                },
            ],
            "softmax": [{**study.family_means(argmax_only), "space": "box_features"}],
        }
    )
    r = {row["method"]: row for row in rows}
    assert r["rince"]["family_emb"] == pytest.approx((0.6, np.std([0.7, 0.5], ddof=1)))
    assert r["rince"]["placement"] == "prototype" and r["softmax"]["placement"] == "argmax"
    table = _tables(study.table_markdown(rows))["Where the unknown objects land, and the embedding"]
    assert table["rince"].startswith(
        "| rince | 2 | 0.600 ± 0.141 | 0.400 ± 0.141 | 0.300 ± 0.000 |"
    )
    assert table["softmax"].startswith("| softmax | 1 | n/a | 0.600 | 0.400 |")


def _placement_run(folder, ids, placed, ood_class, image_index, known, held_out, families):
    """A run folder whose ood/ holds a report with a placement section and ood_scores.npz."""
    n = len(placed["argmax"])
    classes = {
        h: {
            "objects": 0,
            "family": families[h],
            "chance": None,
            "family_accuracy": {},
            "confusion": {},
        }
        for h in held_out
    }
    report = OODReport(
        name="run",
        weights="",
        test_dataset="rcdet_shapes_test",
        known_classes=list(known),
        held_out_classes=list(held_out),
        hold_out_mode="drop_images",
        protocol={"version": PROTOCOL_VERSION},
        data={},
        counts={},
        open_set={},
        defined=True,
        warnings=[],
        scores={},
        placement={"methods": list(placed), "classes": classes},
    )
    arrays = dict(
        status=np.full(n, 2),
        image_index=np.asarray(image_index),
        image_ids=np.array(ids),
        ood_class=np.asarray(ood_class),
        **{f"placed_{m}": np.asarray(v) for m, v in placed.items()},
    )
    os.makedirs(os.path.join(folder, "ood"), exist_ok=True)
    with open(os.path.join(folder, "ood", "ood_report.json"), "w") as f:
        json.dump(report.to_dict(), f)
    save_npz_atomic(os.path.join(folder, "ood", "ood_scores.npz"), **arrays)
    return folder


def test_family_accuracy_paired_test_reads_each_objects_placement(tmp_path):
    known, held_out = ["disc", "bullseye", "tri_frame"], ["ring", "triangle"]
    families = {"ring": ["disc", "bullseye"], "triangle": ["tri_frame"]}
    ids = [f"{i:06d}" for i in range(4)]
    # Detections: -1 is not a claimed held-out object. Ring objects on images 0, 1; triangles on
    # images 2, 3.
    ood_class = [0, 0, 0, 1, 1, -1]
    image_index = [0, 0, 1, 2, 3, 3]
    # Method a: rings 2 of 3 in the family (disc, bullseye), triangles 1 of 2 -> mean 7/12.
    a = _placement_run(
        str(tmp_path / "a"), ids, {"prototype": [0, 1, 2, 2, 0, -1], "argmax": [2, 2, 2, 2, 2, -1]},
        ood_class, image_index, known, held_out, families,
    )  # fmt: skip
    # Method b (no projection): argmax only; rings 1 of 3, triangles 2 of 2 -> mean 4/6.
    b = _placement_run(
        str(tmp_path / "b"), ids, {"argmax": [1, 2, 2, 2, 2, -1]},
        ood_class, image_index, known, held_out, families,
    )  # fmt: skip
    labels, hits, groups = study.load_family_set(a, "prototype")[0]
    assert labels.tolist() == [0, 0, 0, 1, 1] and hits.tolist() == [True, True, False, True, False]
    assert groups.tolist() == [0, 0, 1, 2, 3]
    assert study.load_family_set(b, "prototype") is None  # not computed for this head
    test = paired_bootstrap_family_accuracy(
        [study.load_family_set(a, "prototype")[0]],
        [study.load_family_set(b, "argmax")[0]],
        num_images=4,
        replicates=200,
    )
    assert test["difference"] == pytest.approx(7 / 12 - 4 / 6)


def test_write_results_reads_current_protocol_reports(tmp_path):
    """results.md from finished runs: open-set, image-level and paired-test columns."""
    methods = ("softmax", "supcon", "rince_in")
    runs = [(m, 0, str(tmp_path / "runs" / m / "seed0")) for m in methods]
    rng = np.random.default_rng(0)
    ids = [f"{i:06d}" for i in range(30)]
    for (method, _, run_dir), quality in zip(runs, (0.0, 1.0, 2.0)):
        values, is_id = _fake_run(run_dir, rng, {"msp": 0.5, "knn": quality}, ids)
        undefined = {"auroc": None, "fpr95": None}
        scores = {
            s: {
                "available": s in values,
                **(ood_metrics(values[s], is_id) if s in values else undefined),
            }
            for s in ("msp", "max_logit", "energy", "cosine", "knn", "gaussian")
        }
        if method == "softmax":
            scores["knn"] = {"available": False, "auroc": None, "fpr95": None}
        report = {
            "name": method,
            "test_dataset": "rcdet_shapes_test",
            "known_classes": [],
            "held_out_classes": [],
            "data": {"test": "digest"},
            "counts": {},
            "detection": {"AP": 50.0, "AP50": 70.0, "AP75": 40.0},
            "scores": scores,
            "open_set": {"a_ose": 12, "wilderness_impact": 0.05},
            "image_level": {
                "scores": {"msp": {"available": True, "auroc": 0.6}, "knn": scores["knn"]}
            },
            "protocol": {"version": PROTOCOL_VERSION},
        }
        with open(os.path.join(run_dir, "ood", "ood_report.json"), "w") as f:
            json.dump(report, f)
        os.makedirs(os.path.join(run_dir, "analysis"), exist_ok=True)
        with open(os.path.join(run_dir, "analysis", "analysis.json"), "w") as f:
            space = {"outliers": {"class": {"fraction": 0.1}}, "ranking_fidelity": None}
            json.dump(
                {
                    "spaces": {"projection": space},
                    "class_names": [],
                    "held_out_classes": [],
                    "group_levels": [],
                },
                f,
            )
    md, per_method = study.write_results(runs, str(tmp_path / "out"))
    tables = _tables(md)
    rows = tables["Detection and OOD detection (object level unless marked image-level)"]
    assert "| 12 | 0.0500 | 0.600 |" in rows["rince_in"]
    paired = tables[PAIRED_TITLE]
    assert paired["softmax"].endswith("| n/a | n/a | n/a | n/a | — | prototype |")
    assert paired["supcon"].split(" | ")[2] == "—"
    versions = {m["protocol_version"] for results in per_method.values() for m in results}
    assert sorted(versions) == [PROTOCOL_VERSION]
    assert (tmp_path / "out" / "results.md").read_text() == md
    assert (tmp_path / "out" / "results.csv").is_file() and (tmp_path / "out" / "roc.png").is_file()
    # No run has t-SNE points: no panel, and no temporary file left behind.
    assert sorted(os.listdir(tmp_path / "out")) == ["results.csv", "results.md", "roc.png"]
    # The same tables from the runs' records once the run folders are gone: the records hold
    # everything the tables read.
    records = [(m, s, str(tmp_path / "records" / m)) for m, s, _ in runs]
    for (_, _, run_dir), (_, _, record) in zip(runs, records):
        study.save_record(run_dir, record)
    shutil.rmtree(tmp_path / "runs")
    assert study.write_results(records, str(tmp_path / "again"))[0] == md


def test_a_runs_record_holds_what_the_tables_read_and_not_the_weights(tmp_path, monkeypatch):
    run_dir, record = tmp_path / "run", tmp_path / "record"
    kept = [n for n in study.RECORD_FILES if n != "shuffled_ranking.yaml"]
    for name in kept + ["model_final.pth", "log.txt", "ood/ood_stats_1.npz"]:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(f"new {name}")
    detections = {
        "status": np.array([1, 0, -2]),
        "image_index": np.array([0, 0, 1]),
        "image_ids": np.array(["000001", "000002"]),
        "ood_class": np.array([-1, 1, -1]),
        "msp": np.array([0.9, 0.2, 0.5]),
        "placed_prototype": np.array([-1, 3, -1]),
        "boxes": np.zeros((3, 4), dtype=np.float32),  # not read by the tables
        "classes": np.array([0, 2, 1]),
    }
    np.savez(run_dir / "ood" / "ood_scores.npz", **detections)
    tsne = {"points": np.arange(6.0).reshape(3, 2), "labels": np.array([0, 1, 2])}
    for name in ("tsne_points.npz", "box_features_tsne_points.npz"):
        np.savez(run_dir / "analysis" / name, **tsne)
    # An earlier training's record of the same run: replaced, and its extra file removed.
    for name in ("provenance.json", "shuffled_ranking.yaml", "config.yaml"):
        (record / name).parent.mkdir(parents=True, exist_ok=True)
        (record / name).write_text(f"old {name}")
    order = []
    write = study.atomic_write
    monkeypatch.setattr(
        study, "atomic_write", lambda path, data: (order.append(path), write(path, data))
    )
    assert study.save_record(str(run_dir), str(record)) == kept
    files = sorted(str(p.relative_to(record)) for p in record.rglob("*") if p.is_file())
    assert files == sorted(kept)
    assert all((record / n).read_text() == f"new {n}" for n in kept if not n.endswith(".npz"))
    with np.load(record / "ood" / "ood_scores.npz") as z:
        assert sorted(z.files) == sorted(set(detections) - {"boxes", "classes"})
        assert all(np.array_equal(z[k], detections[k]) for k in z.files)
    for name in ("tsne_points.npz", "box_features_tsne_points.npz"):
        with np.load(record / "analysis" / name) as z:
            assert sorted(z.files) == ["labels", "points"]
            assert all(np.array_equal(z[k], tsne[k]) for k in z.files)
    assert (record / "ood" / "ood_scores.npz").stat().st_size < (
        run_dir / "ood" / "ood_scores.npz"
    ).stat().st_size
    assert order[-1] == str(record / "provenance.json")  # a record with it is complete
    assert study.save_record(str(run_dir), str(run_dir)) == []  # the run is its own record
    (tmp_path / "link").symlink_to(run_dir)
    assert study.save_record(str(run_dir), str(tmp_path / "link")) == []
    assert (run_dir / "provenance.json").read_text() == "new provenance.json"
    # An unreadable file of the run: one clear error, and the record is left as it was.
    before = {p: p.read_bytes() for p in record.rglob("*") if p.is_file()}
    (run_dir / "ood" / "ood_scores.npz").write_bytes(b"not an npz")
    with pytest.raises(ReportError, match=r"ood_scores.npz: cannot be read for the run's record"):
        study.save_record(str(run_dir), str(record))
    assert {p: p.read_bytes() for p in record.rglob("*") if p.is_file()} == before


def test_roc_figure_draws_msp_dotted_and_the_best_embedding_score_solid(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"{i:06d}" for i in range(40)]
    runs, raw = {}, {}
    for method, scores in (("softmax", ("msp",)), ("rince_in", ("msp", "knn"))):
        runs[method] = str(tmp_path / method)
        raw[method] = _fake_run(runs[method], rng, {"msp": 0.5, "knn": 1.5}, ids, scores)
    seeds = {"softmax": 0, "rince_in": 2}
    fig = study.roc_figure(runs, {"softmax": "n/a", "rince_in": "knn"}, seeds)
    ax = fig.axes[0]
    curves = {lab.get_label(): lab for lab in ax.get_lines() if not lab.get_label().startswith("_")}
    auc = {(m, s): ood_metrics(v[s], y)["auroc"] for m, (v, y) in raw.items() for s in v}
    assert list(curves) == [
        f"{m} (seed {seeds[m]}) {s} (AUROC {auc[m, s]:.3f})"
        for m, s in (("softmax", "msp"), ("rince_in", "msp"), ("rince_in", "knn"))
    ]
    styles = [lab.get_linestyle() for lab in curves.values()]
    assert styles == [":", ":", "-"]
    colours = [mcolors.to_hex(lab.get_color()) for lab in curves.values()]
    assert colours[1] == colours[2] != colours[0]  # one colour per method
    assert ax.get_title().startswith("OOD ROC, one seed of each method")


def test_tsne_panel_has_a_class_legend(tmp_path):
    runs = {}
    names = ["disc", "bullseye", "ring"]
    for method in ("softmax", "rince_in"):
        runs[method] = str(tmp_path / method / "seed0")
        folder = os.path.join(runs[method], "analysis")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "analysis.json"), "w") as f:
            json.dump(
                {
                    "class_names": names,
                    "held_out_classes": ["ring"],
                    "group_levels": [["round"] * 3],
                },
                f,
            )
        points, labels = np.random.default_rng(0).normal(size=(9, 2)), np.repeat([0, 1, 2], 3)
        np.savez(os.path.join(folder, "tsne_points.npz"), points=points, labels=labels)
    tsne = study.tsne_panel(runs)
    assert tsne._suptitle is not None and tsne._suptitle.get_text().startswith("t-SNE")
    labels = [t.get_text() for t in tsne.legends[0].get_texts()]
    assert labels == ["disc [round]", "bullseye [round]", "ring (held out)"]
    assert [a.get_title() for a in tsne.axes] == ["softmax", "rince_in"]
    assert study.tsne_panel({"softmax": str(tmp_path / "none")}) is None


# ---------------------------------------------------------------- methods and provenance


def test_the_shuffled_control_moves_the_true_structure_onto_other_classes(tmp_path, repo_path):
    from rcdet.ranking import load_ranking

    classes = study.class_names(False)
    true_file = repo_path(study.true_ranking_file(False))
    true = load_ranking(true_file, classes)
    path = str(tmp_path / "shuffled.yaml")
    study.write_shuffled_ranking(path, true_file, classes, seed=1000)
    shuffled = load_ranking(path, classes)
    expected = true.permuted(seed=1000)
    assert np.array_equal(shuffled.matrix, expected.matrix)
    assert not np.array_equal(shuffled.matrix, true.matrix)
    # The same rank statistics: only which classes are similar changes.
    assert sorted(shuffled.matrix.ravel().tolist()) == sorted(true.matrix.ravel().tolist())
    assert "(seed 1000): deliberately wrong" in open(path).read()
    assert len(study.class_names(True)) == 20 and study.class_names(True)[-1] == "tvmonitor"


def test_each_run_keeps_the_commits_and_seconds_of_its_stages(tmp_path):
    assert study.run_provenance(str(tmp_path)) == {}
    study.record_stage(str(tmp_path), "train", 12.34, "b" * 40, True)
    study.record_stage(str(tmp_path), "ood", 5.0, "a" * 40, False)
    study.record_stage(str(tmp_path), "train", 7.06, "c" * 40, False)  # a re-run replaces it
    with open(tmp_path / "provenance.json") as f:
        stages = json.load(f)["stages"]
    machine = study.machine_description()
    here = {"uncommitted_changes": False, "machine": machine}
    assert stages == {
        "train": {"seconds": 7.1, "commit": "c" * 40, **here},
        "ood": {"seconds": 5.0, "commit": "a" * 40, **here},
    }
    assert study.run_provenance(str(tmp_path)) == {
        "commits": ["a" * 40, "c" * 40],
        "stage_seconds": {"train": 7.1, "ood": 5.0},
        "machines": [machine],
    }
    # A stage recorded before machines were: no machine named for it.
    del stages["ood"]["machine"], stages["train"]["machine"]
    (tmp_path / "provenance.json").write_text(json.dumps({"stages": stages}))
    assert study.run_provenance(str(tmp_path))["machines"] == []
    for corrupt in ("", "[]", '{"stages": 3}', '{"stages": {"train": {"seconds": 1.0}}}'):
        (tmp_path / "provenance.json").write_text(corrupt)
        with pytest.raises(ReportError, match="provenance.json: not a run's provenance.json"):
            study.run_provenance(str(tmp_path))


def test_study_meta_names_the_runs_protocols_and_provenance(tmp_path):
    (tmp_path / "a").mkdir()
    study.record_stage(str(tmp_path / "a"), "train", 3.0, "a" * 40, False)
    runs = [("softmax", 1, str(tmp_path / "a")), ("softmax", 0, str(tmp_path / "b"))]
    per_method = {"softmax": [{"protocol_version": 3}, {"protocol_version": 2}]}
    invocation = {"commit": "a" * 40, "uncommitted_changes": True, "wall_seconds": 4.0}
    prov = study.study_provenance(None, invocation)
    meta = study.study_meta(runs, per_method, prov, True, "drop_images", "python x.py --quick")
    assert list(meta) == [
        "commit",
        "uncommitted_changes",
        "commits",
        "quick",
        "seeds",
        "hold_out_mode",
        "ood_protocol_versions",
        "methods",
        "command",
        "machine",
        "wall_seconds",
        "stage_seconds_total",
        "invocations",
        "runs",
    ]
    assert meta["commit"] == "a" * 40 and meta["uncommitted_changes"] is True
    assert meta["seeds"] == [0, 1] and meta["ood_protocol_versions"] == [2, 3]
    assert meta["methods"] == ["softmax"] and meta["wall_seconds"] == 4.0
    assert meta["stage_seconds_total"] == 3.0
    assert meta["command"] == "python x.py --quick" and " cores, torch " in meta["machine"]
    capability = torch.backends.cpu.get_cpu_capability()
    assert meta["machine"].endswith(f" threads, {capability} kernels")
    assert study.cpu_model() in meta["machine"]
    assert meta["runs"] == [
        {
            "method": "softmax",
            "seed": 1,
            "commits": ["a" * 40],
            "stage_seconds": {"train": 3.0},
            "machines": [study.machine_description()],
        },
        {"method": "softmax", "seed": 0},
    ]


def test_resumed_study_names_every_commit_and_sums_wall_time():
    # meta.json written before invocations were recorded: it stands for one invocation.
    legacy = {"commit": "a" * 40, "uncommitted_changes": True, "seeds": [0], "wall_seconds": 100.0}
    now = {
        "commit": "b" * 40,
        "uncommitted_changes": False,
        "seeds_run": [1, 2],
        "stages_run": 30,
        "wall_seconds": 200.04,
    }
    prov = study.study_provenance(legacy, now)
    assert prov["commit"] == "b" * 40 and prov["uncommitted_changes"] is False
    assert prov["commits"] == ["a" * 40, "b" * 40]
    assert prov["wall_seconds"] == 300.0
    assert [i["wall_seconds"] for i in prov["invocations"]] == [100.0, 200.04]
    # Re-aggregating without running anything keeps the study as it was.
    again = study.study_provenance({**prov, "wall_seconds": 300.0}, None)
    assert (
        again["commits"] == prov["commits"]
        and again["wall_seconds"] == 300.0
        and again["commit"] == "b" * 40
    )
    assert study.study_provenance(None, None)["wall_seconds"] is None
    # --report over runs whose invocations were all cut off: the tables' own checkout.
    cut_off = study.study_provenance(None, None, ("c" * 40, False))
    assert cut_off["commit"] == "c" * 40 and cut_off["commits"] == []
    # A second --report over it records no invocation either: its commit is the new checkout's.
    again = study.study_provenance(cut_off, None, ("d" * 40, False))
    assert again["commit"] == "d" * 40 and again["commits"] == [] and again["invocations"] == []


def test_git_state_ignores_the_studys_own_results(tmp_path):
    """
    A resumed study rewrites its committed results; that alone must not flag the code as changed.
    """
    import subprocess

    repo = tmp_path / "repo"
    (repo / "results" / "study").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    (repo / "results" / "study" / "results.md").write_text("old\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "."], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "init"], cwd=repo, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    (repo / "results" / "study" / "results.md").write_text("new\n")
    assert study.git_state(str(repo), exclude=str(repo / "results" / "study")) == (head, False)
    assert study.git_state(str(repo)) == (head, True)
    # The checkout itself is not excluded.
    assert study.git_state(str(repo), exclude=str(repo)) == (head, True)
    (repo / "code.py").write_text("x = 2\n")
    assert study.git_state(str(repo), exclude=str(repo / "results" / "study")) == (head, True)


def _family_by_brute_force(objects, draws):
    """Mean over classes of each class's in-family share, objects repeated as often as their
    image was drawn; classes without a drawn object left out."""
    per_class = {}
    for label, hit, image in objects:
        for _ in range(draws[image]):
            per_class.setdefault(label, []).append(hit)
    return np.mean([np.mean(v) for v in per_class.values()]) if per_class else np.nan


def test_family_tests_through_the_table_pair_seeds_and_placements(tmp_path):
    """family_vs_supcon and family_vs_softmax: each row's placement (prototype with a projection,
    argmax without) against the partner's, seed by seed, over the classes both claimed."""
    from rcdet.evaluation.bootstrap import resample_counts

    known, held_out = ["disc", "bullseye", "tri_frame"], ["ring", "triangle"]
    families = {"ring": ["disc", "bullseye"], "triangle": ["tri_frame"]}
    ids = [f"{i:06d}" for i in range(6)]
    ood_class = [0, 0, 0, 1, 1, 1]
    image_index = [0, 1, 2, 3, 4, 5]
    # Nearest known class per object (prototype, argmax): 0/1 are ring's family, 2 triangle's.
    placements = {
        ("rince", 0): {"prototype": [0, 1, 2, 2, 2, 0], "argmax": [2, 2, 2, 2, 2, 2]},
        ("rince", 1): {"prototype": [0, 0, 0, 2, 0, 0], "argmax": [2, 2, 2, 2, 2, 2]},
        ("supcon", 0): {"prototype": [2, 2, 0, 2, 2, 2], "argmax": [0, 0, 0, 0, 0, 0]},
        ("supcon", 1): {"prototype": [0, 2, 2, 0, 0, 2], "argmax": [0, 0, 0, 0, 0, 0]},
        # softmax claims no ring in seed 0: that seed's comparison is over triangle only.
        ("softmax", 0): {"argmax": [-1, -1, -1, 2, 0, 0]},
        ("softmax", 1): {"argmax": [1, 2, 2, 2, 2, 0]},
    }
    dirs = {}
    for (method, seed), placed in placements.items():
        folder = str(tmp_path / method / f"seed{seed}")
        labels = [c if p >= 0 else -1 for c, p in zip(ood_class, placed["argmax"])]
        _placement_run(folder, ids, placed, labels, image_index, known, held_out, families)
        dirs.setdefault(method, {})[seed] = folder
    space = {"rince": "projection", "supcon": "projection", "softmax": "box_features"}
    rows = study.build_table({m: [{"space": space[m]}] * 2 for m in dirs})
    replicates = 200
    study.attach_paired_tests(rows, study.PairedRuns(rows, dirs, replicates=replicates))
    r = {row["method"]: row for row in rows}

    def objects(method, seed, placement, classes=(0, 1)):
        placed = placements[(method, seed)][placement]
        fam = [set(families[h]) for h in held_out]
        return [
            (c, known[p] in fam[c], i)
            for c, p, i in zip(ood_class, placed, image_index)
            if p >= 0 and c in classes
        ]

    # rince (prototype) vs supcon (prototype), seeds 0 and 1.
    # rince: seed 0 ring 2/3, triangle 2/3 -> 2/3; seed 1 ring 1, triangle 1/3 -> 2/3.
    # supcon: seed 0 ring 1/3, triangle 1 -> 2/3; seed 1 ring 1/3, triangle 1/3 -> 1/3.
    test = r["rince"]["family_vs_supcon"]
    assert test["seeds"] == [0, 1]
    assert test["difference"] == pytest.approx((2 / 3 + 2 / 3) / 2 - (2 / 3 + 1 / 3) / 2)
    counts = resample_counts(len(ids), replicates, 0)
    d = [
        np.mean([_family_by_brute_force(objects("rince", s, "prototype"), c) for s in (0, 1)])
        - np.mean([_family_by_brute_force(objects("supcon", s, "prototype"), c) for s in (0, 1)])
        for c in counts
    ]
    d = np.array(d)[~np.isnan(d)]
    assert test["ci"] == pytest.approx(list(np.percentile(d, [2.5, 97.5])))
    assert test["p_value"] == pytest.approx(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))
    # rince vs softmax's argmax: seed 0 over triangle only (softmax claimed no ring there):
    # rince 2/3, softmax 1/3. Seed 1: rince 2/3; softmax ring 1/3, triangle 2/3 -> 1/2.
    test = r["rince"]["family_vs_softmax"]
    assert test["difference"] == pytest.approx((2 / 3 + 2 / 3) / 2 - (1 / 3 + 1 / 2) / 2)
    assert r["softmax"]["family_vs_softmax"] == "self" and r["supcon"]["family_vs_supcon"] == "self"
    assert r["softmax"]["placement"] == "argmax" and r["rince"]["placement"] == "prototype"
    # A family contrast is the same test: rince's placement against softmax's.
    paired = study.PairedRuns(rows, dirs, replicates=replicates)
    (contrast,) = study.contrast_tests(paired, [study.Contrast("rince", "softmax", "family", "q")])
    assert contrast["test"] == r["rince"]["family_vs_softmax"]
    assert study._measure(contrast) == "family acc."
    # The runs' records give the same family tests.
    records = {m: {s: f"{d}_record" for s, d in seeds.items()} for m, seeds in dirs.items()}
    for m, seeds in dirs.items():
        for s, d in seeds.items():
            study.save_record(d, records[m][s])
    again = study.build_table({m: [{"space": space[m]}] * 2 for m in dirs})
    study.attach_paired_tests(again, study.PairedRuns(again, records, replicates=replicates))
    assert again == rows


def test_a_corrupt_meta_json_is_one_clear_error(tmp_path):
    from rcdet.evaluation.report import ReportError

    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ReportError, match="meta.json: not a study's meta.json .*delete it"):
        study.load_meta(str(tmp_path))
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(ReportError, match="no JSON object"):
        study.load_meta(str(tmp_path))
    assert study.load_meta(str(tmp_path / "none")) is None


def test_a_paired_cell_shows_p_below_the_replicates_resolution():
    test = {"difference": 0.1234, "ci": [0.05, 0.2], "p_value": 0.0, "replicates": 1000}
    assert study._paired_cell(test) == "+0.123 [+0.050, +0.200], p < 0.002"
    test.update(p_value=0.046, replicates=500)
    assert study._paired_cell(test) == "+0.123 [+0.050, +0.200], p 0.046"
    assert study._paired_cell("self") == "—" and study._paired_cell(None) == "n/a"
