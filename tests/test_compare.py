import json
import os

import numpy as np
import pytest

from conftest import REPO, load_tool

cm = load_tool("compare_methods")

METHODS = ["softmax", "supcon_out", "rince_in", "rince_out_in", "rince_out_in_shuffled"]


def test_quick_dry_run_lists_the_expected_runs(capsys, tmp_path):
    assert cm.main(["--quick", "--dry-run", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    runs = [line for line in out.splitlines() if line.startswith("run ")]
    assert [line.split()[1] for line in runs] == METHODS
    assert all(" seed 0 [todo]" in line for line in runs)
    assert out.count("tools/train_net.py") == 5 and out.count("tools/benchmark_ood.py") == 5
    assert out.count("tools/analyze_embeddings.py") == 5 and "SOLVER.MAX_ITER 150" in out
    assert "MODEL.RCDET.LOSS rince_in" in out and "shuffled_ranking.yaml" in out


def test_voc_dry_run_uses_the_r50_fpn_configs(capsys, tmp_path):
    assert cm.main(["--voc", "--dry-run", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert len([l for l in out.splitlines() if l.startswith("run ")]) == 15  # 5 methods x 3 seeds
    assert "configs/voc_rince_ood.yaml" in out and "configs/voc_softmax_ood.yaml" in out


def test_resume_skips_finished_stages(tmp_path, monkeypatch):
    args = cm.argparse.Namespace(quick=True, quick_iters=10, seeds=[0], methods=None, voc=False, runs_dir=str(tmp_path), opts=[])
    runs = cm.plan(args)
    finished = runs[0]
    for name, marker, _ in finished.stages(False):
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write(json.dumps({"protocol": {"version": cm.OOD_PROTOCOL_VERSION}}) if name == "ood" else "")
    partial = runs[1]  # trained, not evaluated
    os.makedirs(partial.run_dir, exist_ok=True)
    open(partial.weights, "w").close()
    calls = []
    monkeypatch.setattr(cm.subprocess, "run", lambda argv, **kw: calls.append(argv))
    monkeypatch.setattr(cm, "write_shuffled_ranking", lambda run, voc: None)
    counts = cm.execute(runs, voc=False, log=lambda *a: None)
    assert counts == {"skipped": 4, "ran": 11, "seeds_run": [0]}
    ran_dirs = {a[a.index("--output") + 1] if "--output" in a else a[-1] for a in calls}
    assert not any(finished.run_dir in d for d in ran_dirs)
    assert not any(a[1] == "tools/train_net.py" and partial.run_dir in " ".join(a) for a in calls)


def test_old_protocol_reports_are_re_evaluated_without_retraining(tmp_path, monkeypatch, capsys):
    args = cm.argparse.Namespace(quick=True, quick_iters=10, seeds=[0], methods=["softmax", "rince_in"], voc=False,
                                 runs_dir=str(tmp_path), opts=[])
    old, current = cm.plan(args)
    for run, version in ((old, None), (current, cm.OOD_PROTOCOL_VERSION)):
        for name, marker, _ in run.stages(False):
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            report = {"scores": {}} if version is None else {"scores": {}, "protocol": {"version": version}}
            with open(marker, "w") as f:
                f.write(json.dumps(report) if name == "ood" else "")
    calls = []
    monkeypatch.setattr(cm.subprocess, "run", lambda argv, **kw: calls.append(argv))
    counts = cm.execute([old, current], voc=False, log=lambda *a: None)
    # Only the OOD stage of the run evaluated under the old protocol runs again, from its checkpoint.
    assert counts["ran"] == 1 and counts["skipped"] == 5
    assert calls[0][1] == "tools/benchmark_ood.py" and f"MODEL.WEIGHTS {old.weights}" in " ".join(calls[0])
    calls.clear()
    assert cm.execute([old, current], voc=False, log=lambda *a: None, reevaluate=True)["ran"] == 2
    assert all(a[1] == "tools/benchmark_ood.py" for a in calls)
    assert cm.main(["--quick", "--dry-run", "--methods", "softmax", "rince_in", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "run softmax seed 0 [todo]" in out and "  ood (re-evaluate):" in out and "run rince_in seed 0 [done]" in out


def test_drop_annotations_variant_and_num_gpus(capsys, tmp_path):
    assert cm.main(["--hold-out-mode", "drop_annotations", "--dry-run", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    runs = [line.split()[1] for line in out.splitlines() if line.startswith("run ")]
    assert runs == ["softmax"] * 3 + ["supcon_out"] * 3 + ["rince_out_in"] * 3
    stages = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(stages) == 27 and all("MODEL.RCDET.OOD.HOLD_OUT_MODE drop_annotations" in line for line in stages)
    assert cm.main(["--hold-out-mode", "drop_annotations", "--dry-run"]) == 0
    assert "output/compare_builtin_drop_annotations/softmax/seed0" in capsys.readouterr().out
    # --voc passes --num-gpus through to training (and only to training); --ood-dataset to the benchmark.
    assert cm.main(["--voc", "--num-gpus", "8", "--ood-dataset", "coco_ood_val", "--dry-run", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    train = [line for line in out.splitlines() if line.startswith("  train")]
    ood = [line for line in out.splitlines() if line.startswith("  ood")]
    assert len(train) == 15 and all("tools/train_net.py --config-file" in l and "--num-gpus 8" in l for l in train)
    assert all("--num-gpus" not in l and "--ood-dataset coco_ood_val" in l for l in ood)


def test_execute_records_each_stage_in_the_run_provenance(tmp_path, monkeypatch):
    args = cm.argparse.Namespace(quick=True, quick_iters=10, seeds=[0], methods=["softmax"], voc=False, runs_dir=str(tmp_path), opts=[])
    (run,) = cm.plan(args)
    monkeypatch.setattr(cm.subprocess, "run", lambda argv, **kw: None)
    cm.execute([run], voc=False, log=lambda *a: None, commit=("abc123", True))
    with open(os.path.join(run.run_dir, "provenance.json")) as f:
        stages = json.load(f)["stages"]
    assert set(stages) == {"train", "ood", "analysis"}
    assert all(s["commit"] == "abc123" and s["uncommitted_changes"] is True and s["seconds"] >= 0 for s in stages.values())


def test_resumed_study_names_every_commit_and_sums_wall_time():
    # meta.json written before invocations were recorded: it stands for one invocation.
    legacy = {"commit": "a" * 40, "uncommitted_changes": True, "seeds": [0], "wall_seconds": 100.0}
    now = {"commit": "b" * 40, "uncommitted_changes": False, "seeds_run": [1, 2], "stages_run": 30, "wall_seconds": 200.04}
    prov = cm.study_provenance(legacy, now)
    assert prov["commit"] == "b" * 40 and prov["uncommitted_changes"] is False
    assert prov["commits"] == ["a" * 40, "b" * 40]
    assert prov["wall_seconds"] == 300.0
    assert [i["wall_seconds"] for i in prov["invocations"]] == [100.0, 200.04]
    # Re-aggregating without running anything keeps the study as it was.
    again = cm.study_provenance({**prov, "wall_seconds": 300.0}, None)
    assert again["commits"] == prov["commits"] and again["wall_seconds"] == 300.0 and again["commit"] == "b" * 40
    assert cm.study_provenance(None, None)["wall_seconds"] is None


@pytest.mark.parametrize("skipped,inherits", [(0, False), (5, True)])
def test_only_a_resumed_study_inherits_the_previous_invocations(tmp_path, monkeypatch, skipped, inherits):
    out = tmp_path / "results"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"commit": "a" * 40, "uncommitted_changes": False, "wall_seconds": 7.0}))
    seen = {}
    monkeypatch.setattr(cm, "git_state", lambda **kw: ("b" * 40, False))
    monkeypatch.setattr(cm, "execute", lambda runs, voc, commit=None, **kw: {"skipped": skipped, "ran": 3, "seeds_run": [0]})
    monkeypatch.setattr(cm, "aggregate", lambda runs, output, args, invocation, previous: seen.update(inv=invocation, prev=previous) or "")
    assert cm.main(["--quick", "--runs-dir", str(tmp_path / "runs"), "--output", str(out)]) == 0
    assert seen["inv"]["commit"] == "b" * 40 and seen["inv"]["stages_run"] == 3 and seen["inv"]["seeds_run"] == [0]
    assert (seen["prev"] is not None) == inherits


def test_table_builder_mean_and_sample_std():
    def res(ap, msp, cos, knn, out_c, rho):
        return {"AP": ap, "AP50": ap + 10, "AP75": ap - 10, "msp_auroc": msp, "msp_fpr95": 1 - msp,
                "cosine_auroc": cos, "cosine_fpr95": 0.5, "knn_auroc": knn, "knn_fpr95": 0.4,
                "gaussian_auroc": None, "gaussian_fpr95": None, "outliers_class": out_c, "outliers_group": out_c / 2,
                "spearman": rho, "space": "projection"}

    rows = cm.build_table({
        "rince": [res(50, 0.6, 0.70, 0.72, 0.10, 0.5), res(52, 0.7, 0.74, 0.70, 0.20, 0.7), res(54, 0.8, 0.78, 0.68, 0.30, 0.9)],
        "softmax": [res(40, 0.5, None, None, 0.4, None)],
    })
    r = {row["method"]: row for row in rows}
    assert r["rince"]["AP"] == (52.0, 2.0)
    assert r["rince"]["msp_auroc"][0] == pytest.approx(0.7) and r["rince"]["msp_auroc"][1] == pytest.approx(0.1)
    # cosine has the higher mean AUROC (0.74 vs 0.70) -> it is the best embedding score.
    assert r["rince"]["best_emb_score"] == "cosine"
    assert r["rince"]["best_emb_auroc"][0] == pytest.approx(0.74) and r["rince"]["best_emb_auroc"][1] == pytest.approx(0.04)
    assert r["rince"]["outliers_class"][0] == pytest.approx(20.0) and r["rince"]["outliers_class"][1] == pytest.approx(10.0)
    assert r["softmax"]["best_emb_score"] == "n/a" and r["softmax"]["best_emb_auroc"] == (None, None)
    assert r["softmax"]["AP"] == (40.0, None)  # one seed: no std
    md = cm.table_markdown(rows)
    assert "| rince | 3 | 52.0 ± 2.0 |" in md and "| softmax | 1 | 40.0 |" in md
    csv_text = cm.table_csv(rows)
    assert csv_text.splitlines()[1].startswith("rince,3,52,2,")


def test_readme_results_table_matches_the_committed_results():
    found = 0
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    for kind in ("builtin_comparison", "builtin_comparison_quick", "builtin_comparison_drop_annotations"):
        path = os.path.join(REPO, "results", kind, "results.md")
        if os.path.isfile(path):
            found += 1
            with open(path) as f:
                table = f.read()
            assert table.strip() in readme, f"README.md does not quote {path} verbatim"
            with open(os.path.join(REPO, "results", kind, "meta.json")) as f:
                meta = json.load(f)
            for commit in meta.get("commits", [meta["commit"]]):
                assert commit[:7] in readme, f"README.md does not name commit {commit[:7]} of {kind}"
    assert found, "no committed comparison results to check the README against"


def _fake_run(folder, rng, quality, image_ids, scores=("msp", "knn")):
    """An ood_scores.npz: 3 detections per image, ``quality`` separates ID from OOD."""
    n = len(image_ids)
    image_index = np.repeat(np.arange(n), 3)
    is_id = rng.random(3 * n) < 0.7
    status = np.where(is_id, 1, 0)
    status[::7] = -2  # duplicates: left out of the ROC set
    values = {s: rng.normal(size=3 * n) + quality.get(s, 0.0) * is_id for s in scores}
    os.makedirs(os.path.join(folder, "ood"), exist_ok=True)
    np.savez(os.path.join(folder, "ood", "ood_scores.npz"), status=status, image_index=image_index,
             image_ids=np.array(image_ids), **values)
    m = status >= 0
    return {s: v[m] for s, v in values.items()}, status[m] == 1


def test_paired_bootstrap_tests_in_the_table(tmp_path):
    from rcdet.evaluation.ood import ood_metrics

    rng = np.random.default_rng(0)
    ids = [f"{i:06d}" for i in range(60)]
    dirs, raw = {}, {}
    for method, quality, seeds in (("softmax", {"msp": 0.5}, 1), ("supcon_out", {"msp": 0.5, "knn": 1.0}, 2),
                                   ("rince_in", {"msp": 0.5, "knn": 2.0}, 2)):
        for seed in range(seeds):
            folder = str(tmp_path / method / f"seed{seed}")
            raw.setdefault(method, []).append(_fake_run(folder, rng, quality, ids, ("msp",) if method == "softmax" else ("msp", "knn")))
            dirs.setdefault(method, []).append(folder)

    def result(method, values, is_id):
        auc = {s: ood_metrics(v, is_id)["auroc"] for s, v in values.items()}
        return {"AP": 50.0, "msp_auroc": auc["msp"], "knn_auroc": auc.get("knn"), "cosine_auroc": None, "gaussian_auroc": None}

    rows = cm.build_table({m: [result(m, *r) for r in runs] for m, runs in raw.items()})
    cm.attach_paired_tests(rows, dirs, replicates=200)
    r = {row["method"]: row for row in rows}
    assert r["softmax"]["vs_msp"] is None and r["softmax"]["vs_supcon"] is None
    assert r["supcon_out"]["vs_supcon"] == "self"
    # The observed difference is the mean over seeds of each side's AUROC.
    auc = lambda m, s: np.mean([ood_metrics(v[s], y)["auroc"] for v, y in raw[m]])
    assert r["rince_in"]["vs_msp"]["difference"] == pytest.approx(auc("rince_in", "knn") - auc("rince_in", "msp"))
    assert r["rince_in"]["vs_supcon"]["difference"] == pytest.approx(auc("rince_in", "knn") - auc("supcon_out", "knn"))
    t = r["rince_in"]["vs_supcon"]
    assert t["ci"][0] <= t["difference"] <= t["ci"][1] and 0 <= t["p_value"] <= 1
    md = cm.table_markdown(rows)
    assert md.splitlines()[0].endswith("| best emb. − SupCon AUROC | best emb. − MSP AUROC |")
    cell = f"{t['difference']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}], p {t['p_value']:.3f}"
    assert cell in md and md.splitlines()[3].startswith("| supcon_out |") and "| — |" in md.splitlines()[3]
    assert md.splitlines()[2].endswith("| n/a | n/a |")  # softmax: no embedding score
    assert cm.table_csv(rows).splitlines()[0].endswith("vs_msp_difference,vs_msp_ci_lo,vs_msp_ci_hi,vs_msp_p_value")
    # Runs evaluated on different test images cannot be paired.
    _fake_run(dirs["rince_in"][0], rng, {"knn": 2.0}, ids[:-1])
    cm.attach_paired_tests(rows, dirs, replicates=20)
    assert all(row["vs_msp"] is None for row in rows)


def test_aggregate_reads_version_2_reports(tmp_path):
    """results.md and meta.json from finished runs: open-set, image-level and paired-test columns."""
    args = cm.argparse.Namespace(quick=True, quick_iters=10, seeds=[0], methods=["softmax", "supcon_out", "rince_in"], voc=False,
                                 runs_dir=str(tmp_path / "runs"), opts=[], argv=[], hold_out_mode="drop_images")
    runs = cm.plan(args)
    rng = np.random.default_rng(0)
    ids = [f"{i:06d}" for i in range(30)]
    for run, quality in zip(runs, (0.0, 1.0, 2.0)):
        values, is_id = _fake_run(run.run_dir, rng, {"msp": 0.5, "knn": quality}, ids)
        from rcdet.evaluation.ood import ood_metrics

        scores = {s: {"available": s in values, **(ood_metrics(values[s], is_id) if s in values else {"auroc": None, "fpr95": None})}
                  for s in ("msp", "max_logit", "energy", "cosine", "knn", "gaussian")}
        if run.method.name == "softmax":
            scores["knn"] = {"available": False, "auroc": None, "fpr95": None}
        report = {"detection": {"AP": 50.0, "AP50": 70.0, "AP75": 40.0}, "scores": scores,
                  "open_set": {"a_ose": 12, "wilderness_impact": 0.05},
                  "image_level": {"scores": {"msp": {"available": True, "auroc": 0.6}, "knn": scores["knn"]}},
                  "protocol": {"version": 2}}
        with open(os.path.join(run.run_dir, "ood", "ood_report.json"), "w") as f:
            json.dump(report, f)
        os.makedirs(os.path.join(run.run_dir, "analysis"), exist_ok=True)
        with open(os.path.join(run.run_dir, "analysis", "analysis.json"), "w") as f:
            json.dump({"spaces": {"projection": {"outliers": {"class": {"fraction": 0.1}}, "ranking_fidelity": None}},
                       "class_names": [], "held_out_classes": [], "group_levels": []}, f)
    md = cm.aggregate(runs, str(tmp_path / "out"), args)
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines()[2:]}
    assert "| 12 | 0.0500 | 0.600 |" in rows["rince_in"] and rows["softmax"].endswith("| n/a | n/a |")
    assert rows["supcon_out"].split(" | ")[-2] == "—"
    with open(tmp_path / "out" / "meta.json") as f:
        meta = json.load(f)
    assert meta["hold_out_mode"] == "drop_images" and meta["ood_protocol_versions"] == [2]


def test_git_state_ignores_the_studys_own_results(tmp_path):
    """A resumed study rewrites its committed results; that alone must not flag the code as changed."""
    import subprocess

    repo = tmp_path / "repo"
    (repo / "results" / "study").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    (repo / "results" / "study" / "results.md").write_text("old\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "."], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "init"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    (repo / "results" / "study" / "results.md").write_text("new\n")
    assert cm.git_state(exclude=str(repo / "results" / "study"), repo=str(repo)) == (head, False)
    assert cm.git_state(repo=str(repo)) == (head, True)
    assert cm.git_state(exclude=str(repo), repo=str(repo)) == (head, True)  # the checkout itself: not excluded
    (repo / "code.py").write_text("x = 2\n")
    assert cm.git_state(exclude=str(repo / "results" / "study"), repo=str(repo)) == (head, True)
