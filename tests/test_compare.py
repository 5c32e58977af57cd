import json
import os

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
    for _, marker, _ in finished.stages(False):
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        open(marker, "w").close()
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
    monkeypatch.setattr(cm, "git_state", lambda: ("b" * 40, False))
    monkeypatch.setattr(cm, "execute", lambda runs, voc, commit=None: {"skipped": skipped, "ran": 3, "seeds_run": [0]})
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
    for kind in ("builtin_comparison", "builtin_comparison_quick"):
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
