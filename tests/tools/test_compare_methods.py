"""
tools/compare_methods.py: the study's plan (quick, VOC, the drop_annotations variant, --num-gpus),
resuming finished stages and re-evaluating reports of an older protocol, each stage's provenance,
which invocations a resumed study inherits, and the configs and meta.json next to the results.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from rcdet.evaluation.ood_benchmark import PROTOCOL_VERSION
from tools import compare_methods as cm

METHODS = [
    "softmax",
    "supcon",
    "rince_out_r1",
    "rince_in",
    "rince_out_in",
    "rince_out_in_shuffled",
    "vos",
    "rince_out_in_vos",
]
EXPOSURE_METHODS = [
    "softmax_oe",
    "supcon_f_fixed",
    "rince_out_in_no_exposure",
    "rince_out_in_f_fixed",
    "rince_out_in_f_learned",
    "rince_out_in_oe",
]


def _args(tmp_path, methods=None, **kw):
    """The arguments plan() reads, for a quick one-seed study in ``tmp_path``."""
    options = dict(
        quick=True,
        quick_iters=10,
        seeds=[0],
        voc=False,
        opts=[],
        study="main",
        hold_out_mode="drop_images",
        num_gpus=None,
        ood_dataset=None,
    )
    return cm.argparse.Namespace(methods=methods, runs_dir=str(tmp_path), **{**options, **kw})


def test_quick_dry_run_lists_the_expected_runs(capsys, tmp_path):
    assert cm.main(["--quick", "--dry-run", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    runs = [line for line in out.splitlines() if line.startswith("run ")]
    assert [line.split()[1] for line in runs] == METHODS
    assert all(" seed 0 [todo]" in line for line in runs)
    assert out.count("tools/train_net.py") == 8 and out.count("tools/benchmark_ood.py") == 8
    assert out.count("tools/analyze_embeddings.py") == 8 and "SOLVER.MAX_ITER 150" in out
    assert "MODEL.RCDET.LOSS rince_in" in out and "shuffled_ranking.yaml" in out
    assert "configs/shapes_supcon_ood.yaml MODEL.RCDET.LOSS rince_out_r1" in out
    assert "configs/shapes_vos_ood.yaml" in out and "configs/shapes_rince_vos_ood.yaml" in out


def test_voc_dry_run_lists_the_same_methods_with_the_r50_fpn_configs(capsys, tmp_path):
    assert cm.main(["--voc", "--dry-run", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    runs = [line.split()[1] for line in out.splitlines() if line.startswith("run ")]
    assert runs == METHODS * 3  # 8 methods x 3 seeds, seed by seed
    assert "configs/voc_rince_ood.yaml" in out and "configs/voc_softmax_ood.yaml" in out
    assert "configs/voc_vos_ood.yaml" in out and "configs/voc_rince_vos_ood.yaml" in out
    assert "configs/shapes_" not in out


@pytest.mark.parametrize(
    "argv, output",
    [
        ([], "results/builtin_comparison_v3"),
        (["--study", "exposure"], "results/builtin_comparison_v3_exposure"),
        (["--hold-out-mode", "drop_annotations"], "results/builtin_comparison_v3_drop_annotations"),
        (["--voc", "--quick"], "results/voc_comparison_v3_quick"),
    ],
)
def test_default_output_is_the_current_studys_results_folder(monkeypatch, argv, output):
    """Study v2's committed tables (results/builtin_comparison*) are never the default output."""
    seen = {}
    monkeypatch.setattr(cm, "run_study", lambda args: seen.setdefault("output", args.output))
    cm.main(argv)
    assert seen["output"] == output


def test_exposure_study_lists_the_reference_vector_methods(capsys, tmp_path):
    argv = ["--study", "exposure", "--seeds", "0", "--dry-run", "--runs-dir", str(tmp_path)]
    assert cm.main(argv) == 0
    out = capsys.readouterr().out
    runs = [line.split()[1] for line in out.splitlines() if line.startswith("run ")]
    assert runs == EXPOSURE_METHODS
    for config in ("softmax_exposure", "supcon_exposure", "rince_expsplit", "rince_exposure"):
        assert f"configs/shapes_{config}_ood.yaml" in out
    assert "configs/shapes_rince_exposure_learned_ood.yaml" in out
    assert cm.main(["--study", "exposure", "--dry-run"]) == 0
    assert "output/compare_builtin_exposure/softmax_oe/seed0" in capsys.readouterr().out
    # On VOC, the same five methods on the VOC configs with the VOC exposure split.
    assert cm.main(["--voc"] + argv) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("run ")] == runs
    assert out.count("MODEL.RCDET.OOD.EXPOSED_CLASSES") == 18  # 6 runs x 3 stages
    assert "MODEL.RCDET.OOD.REFERENCE learned" in out and "configs/shapes_" not in out
    assert "configs/voc_rince_ood.yaml MODEL.ROI_HEADS.NUM_CLASSES 16" in out


def test_a_method_of_another_study_is_a_usage_error(capsys, tmp_path):
    argv = ["--study", "exposure", "--methods", "vos", "--dry-run", "--runs-dir", str(tmp_path)]
    assert cm.main(argv) == 2
    err = capsys.readouterr().err
    assert "--methods vos: not a method of the exposure study" in err
    assert "softmax_oe, supcon_f_fixed" in err


def test_resume_skips_finished_stages(tmp_path, monkeypatch):
    runs = cm.plan(_args(tmp_path))
    finished = runs[0]
    for name, marker, _ in finished.stages(False):
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write(
                json.dumps({"protocol": {"version": PROTOCOL_VERSION}}) if name == "ood" else ""
            )
    partial = runs[1]  # trained, not evaluated
    os.makedirs(partial.run_dir, exist_ok=True)
    open(partial.weights, "w").close()
    for name, _, _ in finished.stages(False):
        cm.study.record_stage(finished.run_dir, name, 600.0, "abc123", False)
    cm.study.record_stage(partial.run_dir, "train", 600.0, "abc123", False)
    # Trained again and cut off before its evaluations: those of the earlier weights are left
    # (a training started again removes provenance.json, not them), and run again.
    retrained = runs[2]
    for name, marker, _ in retrained.stages(False):
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write(
                json.dumps({"protocol": {"version": PROTOCOL_VERSION}}) if name == "ood" else ""
            )
    cm.study.record_stage(retrained.run_dir, "train", 600.0, "abc123", False)
    assert cm.stages_done(retrained, False) == [True, False, False]
    calls = []
    monkeypatch.setattr(cm.subprocess, "run", lambda argv, **kw: calls.append(argv))
    monkeypatch.setattr(cm.study, "write_shuffled_ranking", lambda *a: None)
    counts = cm.execute(runs, voc=False, log=lambda *a: None)
    assert counts == {"skipped": 5, "ran": 19, "seeds_run": [0]}  # 8 methods x 3 stages - 5
    ran_dirs = {a[a.index("--output") + 1] if "--output" in a else a[-1] for a in calls}
    assert not any(finished.run_dir in d for d in ran_dirs)
    assert not any(a[1] == "tools/train_net.py" and partial.run_dir in " ".join(a) for a in calls)
    retrained_calls = [a[1] for a in calls if retrained.run_dir in " ".join(a)]
    assert retrained_calls == ["tools/benchmark_ood.py", "tools/analyze_embeddings.py"]


def test_stages_import_this_checkouts_rcdet(tmp_path, monkeypatch):
    """A stage is a script in tools/, whose own folder Python puts first on sys.path: without
    this checkout on PYTHONPATH it would import an rcdet installed from elsewhere."""
    (run,) = cm.plan(_args(tmp_path, ["softmax"]))
    envs = []
    monkeypatch.setattr(cm.subprocess, "run", lambda argv, **kw: envs.append(kw["env"]))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    cm.execute([run], voc=False, log=lambda *a: None)
    assert len(envs) == 3
    for env in envs:
        assert env["PYTHONPATH"].split(os.pathsep) == [cm.REPO, "/elsewhere"]
    monkeypatch.undo()
    probe = tmp_path / "probe.py"
    probe.write_text("import rcdet; print(rcdet.__file__)")
    out = subprocess.run(
        [sys.executable, str(probe)], env=cm.stage_env(), capture_output=True, text=True
    )
    assert out.stdout.strip() == os.path.join(cm.REPO, "rcdet", "__init__.py")


def test_a_cut_off_training_starts_again_from_scratch(tmp_path, monkeypatch):
    (run,) = cm.plan(_args(tmp_path, ["softmax"]))
    os.makedirs(run.run_dir)
    cut_off = ["metrics.json", "log.txt", "last_checkpoint", "model_0000199.pth"]
    cut_off.append("events.out.tfevents.1.vm.2.0")
    for name in cut_off + ["config.yaml"]:
        open(os.path.join(run.run_dir, name), "w").close()
    cm.study.record_stage(run.run_dir, "ood", 30.0, "abc123", False)  # of earlier weights
    seen, logged = [], []
    monkeypatch.setattr(
        cm.subprocess, "run", lambda argv, **kw: seen.append(sorted(os.listdir(run.run_dir)))
    )
    cm.execute([run], voc=False, log=logged.append)
    assert seen[0] == ["config.yaml"]  # when the training stage starts
    assert sum("of a cut-off training" in line for line in logged) == len(cut_off) + 1


def test_a_retraining_cut_off_is_not_taken_for_the_earlier_training(tmp_path, monkeypatch):
    """A finished run trained again (its weights deleted) and cut off after model_final.pth:
    the earlier training's record must not make the new one count as finished."""
    (run,) = cm.plan(_args(tmp_path, ["softmax"]))
    os.makedirs(run.run_dir)
    cm.study.record_stage(run.run_dir, "train", 600.0, "old", False)

    def cut_off(argv, **kw):
        open(run.weights, "w").close()
        raise KeyboardInterrupt  # the session ends during the final evaluation

    monkeypatch.setattr(cm.subprocess, "run", cut_off)
    with pytest.raises(KeyboardInterrupt):
        cm.execute([run], voc=False, log=lambda *a: None, commit=("new", False))
    assert os.path.isfile(run.weights) and cm.stages_done(run, False) == [False] * 3


def test_a_training_cut_off_after_model_final_is_retrained_and_evaluated_again(
    tmp_path, monkeypatch, capsys
):
    """detectron2 writes model_final.pth at the last iteration, before the OOD statistics hook
    and the final evaluation: a training cut off there has its weights but no record of its end
    in provenance.json. It is trained again from scratch, and its evaluations, though their
    reports exist, run again on the new weights."""
    (run,) = cm.plan(_args(tmp_path, ["rince_in"]))
    for name, marker, _ in run.stages(False):
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        report = {"scores": {}, "protocol": {"version": PROTOCOL_VERSION}}
        with open(marker, "w") as f:
            f.write(json.dumps(report) if name == "ood" else "")
    open(os.path.join(run.run_dir, "ood_stats_0123_4567_k10_shared.npz"), "w").close()
    for name in ("ood", "analysis"):
        cm.study.record_stage(run.run_dir, name, 30.0, "old", False)
    assert cm.stages_done(run, False) == [False, False, False]
    argv = ["--methods", "rince_in", "--seeds", "0", "--runs-dir", str(tmp_path), "--dry-run"]
    assert cm.main(argv) == 0
    out = capsys.readouterr().out
    assert f"run rince_in seed 0 [todo] -> {run.run_dir}" in out
    assert "  train (cut off: trained again): " in out and "  ood (new weights): " in out
    calls, logged = [], []

    def stage(argv, **kw):
        calls.append(argv[1])
        if argv[1] == "tools/train_net.py":
            assert not os.path.exists(run.weights)  # removed before the training starts
            assert not glob.glob(os.path.join(run.run_dir, "ood_stats_*.npz"))
            open(run.weights, "w").close()

    monkeypatch.setattr(cm.subprocess, "run", stage)
    counts = cm.execute([run], voc=False, log=logged.append, commit=("new", False))
    assert calls == ["tools/train_net.py", "tools/benchmark_ood.py", "tools/analyze_embeddings.py"]
    assert counts["ran"] == 3 and counts["skipped"] == 0
    assert "removed model_final.pth of a cut-off training" in " ".join(logged)
    assert cm.study.run_provenance(run.run_dir)["commits"] == ["new"]
    assert cm.stages_done(run, False) == [True, True, True]
    calls.clear()
    assert cm.execute([run], voc=False, log=logged.append)["skipped"] == 3 and not calls
    # A corrupt provenance.json: one error line naming it, before anything runs.
    with open(os.path.join(run.run_dir, "provenance.json"), "w") as f:
        f.write("{")
    assert cm.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {run.run_dir}/provenance.json: not a run's provenance.json")
    assert "\n" not in err


def test_old_protocol_reports_are_re_evaluated_without_retraining(tmp_path, monkeypatch, capsys):
    old, current = cm.plan(_args(tmp_path, ["softmax", "rince_in"]))
    for run, version in ((old, None), (current, PROTOCOL_VERSION)):
        for name, marker, _ in run.stages(False):
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            report = (
                {"scores": {}}
                if version is None
                else {"scores": {}, "protocol": {"version": version}}
            )
            with open(marker, "w") as f:
                f.write(json.dumps(report) if name == "ood" else "")
            cm.study.record_stage(run.run_dir, name, 600.0, "abc123", False)
    calls = []
    monkeypatch.setattr(cm.subprocess, "run", lambda argv, **kw: calls.append(argv))
    counts = cm.execute([old, current], voc=False, log=lambda *a: None)
    # Only the OOD stage of the run evaluated under the old protocol runs again, from its
    # checkpoint.
    assert counts["ran"] == 1 and counts["skipped"] == 5
    assert calls[0][1] == "tools/benchmark_ood.py" and f"MODEL.WEIGHTS {old.weights}" in " ".join(
        calls[0]
    )
    calls.clear()
    assert cm.execute([old, current], voc=False, log=lambda *a: None, reevaluate=True)["ran"] == 2
    assert all(a[1] == "tools/benchmark_ood.py" for a in calls)
    assert (
        cm.main(
            [
                "--quick",
                "--dry-run",
                "--methods",
                "softmax",
                "rince_in",
                "--runs-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "run softmax seed 0 [todo]" in out
        and "  ood (re-evaluate):" in out
        and "run rince_in seed 0 [done]" in out
    )


def test_drop_annotations_variant_and_num_gpus(capsys, tmp_path):
    assert (
        cm.main(["--hold-out-mode", "drop_annotations", "--dry-run", "--runs-dir", str(tmp_path)])
        == 0
    )
    out = capsys.readouterr().out
    runs = [line.split()[1] for line in out.splitlines() if line.startswith("run ")]
    assert runs == ["softmax", "supcon", "rince_out_in", "vos"] * 3
    stages = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(stages) == 36 and all(
        "MODEL.RCDET.OOD.HOLD_OUT_MODE drop_annotations" in line for line in stages
    )
    assert cm.main(["--hold-out-mode", "drop_annotations", "--dry-run"]) == 0
    assert "output/compare_builtin_drop_annotations/softmax/seed0" in capsys.readouterr().out
    # --voc passes --num-gpus through to training (and only to training); --ood-dataset to the
    # benchmark.
    assert (
        cm.main(
            [
                "--voc",
                "--num-gpus",
                "8",
                "--ood-dataset",
                "coco_2017_val",
                "--dry-run",
                "--runs-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    train = [line for line in out.splitlines() if line.startswith("  train")]
    ood = [line for line in out.splitlines() if line.startswith("  ood")]
    assert len(train) == 24 and all(
        "tools/train_net.py --config-file" in lab and "--num-gpus 8" in lab for lab in train
    )
    assert all("--num-gpus" not in lab and "--ood-dataset coco_2017_val" in lab for lab in ood)


def test_execute_records_each_stage_in_the_run_provenance(tmp_path, monkeypatch):
    (run,) = cm.plan(_args(tmp_path, ["softmax"]))
    monkeypatch.setattr(cm.subprocess, "run", lambda argv, **kw: None)
    cm.execute([run], voc=False, log=lambda *a: None, commit=("abc123", True))
    with open(os.path.join(run.run_dir, "provenance.json")) as f:
        stages = json.load(f)["stages"]
    assert set(stages) == {"train", "ood", "analysis"}
    assert all(
        s["commit"] == "abc123" and s["uncommitted_changes"] is True and s["seconds"] >= 0
        for s in stages.values()
    )


@pytest.mark.parametrize("skipped,inherits", [(0, False), (5, True)])
def test_only_a_resumed_study_inherits_the_previous_invocations(
    tmp_path, monkeypatch, skipped, inherits
):
    out = tmp_path / "results"
    out.mkdir()
    (out / "meta.json").write_text(
        json.dumps({"commit": "a" * 40, "uncommitted_changes": False, "wall_seconds": 7.0})
    )
    seen = {}
    monkeypatch.setattr(cm.study, "git_state", lambda **kw: ("b" * 40, False))
    monkeypatch.setattr(
        cm,
        "execute",
        lambda runs, voc, commit=None, **kw: {"skipped": skipped, "ran": 3, "seeds_run": [0]},
    )
    monkeypatch.setattr(
        cm,
        "aggregate",
        lambda runs, output, args, invocation, previous: seen.update(inv=invocation, prev=previous)
        or "",
    )
    assert cm.main(["--quick", "--runs-dir", str(tmp_path / "runs"), "--output", str(out)]) == 0
    assert (
        seen["inv"]["commit"] == "b" * 40
        and seen["inv"]["stages_run"] == 3
        and seen["inv"]["seeds_run"] == [0]
    )
    assert (seen["prev"] is not None) == inherits


def test_aggregate_writes_the_configs_and_meta(tmp_path, monkeypatch):
    """The results come from rcdet.study; the tool adds the first seed's configs and meta.json."""
    args = _args(tmp_path / "runs", ["softmax", "supcon"], argv=[], hold_out_mode="drop_images")
    runs = cm.plan(args)
    for run in runs:
        os.makedirs(run.run_dir)
        with open(os.path.join(run.run_dir, "config.yaml"), "w") as f:
            f.write(f"# {run.method.name}\n")
    seen = {}

    def write_results(study_runs, output, partners, contrasts):
        seen["runs"], seen["partners"], seen["contrasts"] = study_runs, partners, contrasts
        return "| table |\n", {r.method.name: [{"protocol_version": 2}] for r in runs}

    monkeypatch.setattr(cm.study, "write_results", write_results)
    out = tmp_path / "out"
    assert cm.aggregate(runs, str(out), args) == "| table |\n"
    assert seen["runs"] == [(r.method.name, 0, r.run_dir) for r in runs]
    assert seen["partners"] == cm.study.DEFAULT_PARTNERS
    assert seen["contrasts"] == []  # the main study's contrasts need methods not selected here
    assert (out / "configs" / "supcon.yaml").read_text() == "# supcon\n"
    with open(out / "meta.json") as f:
        meta = json.load(f)
    assert meta["hold_out_mode"] == "drop_images" and meta["ood_protocol_versions"] == [2]
    assert meta["methods"] == ["softmax", "supcon"] and meta["seeds"] == [0]


def test_report_writes_the_tables_of_the_finished_runs_only(tmp_path, monkeypatch, capsys):
    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    argv = ["--seeds", "0", "1", "--methods", "softmax", "supcon", "--runs-dir", str(runs_dir)]
    argv += ["--output", str(out), "--report"]
    assert cm.main(argv) == 2
    assert "--report: no run in" in capsys.readouterr().err
    runs = cm.plan(_args(runs_dir, ["softmax", "supcon"], seeds=[0, 1], quick=False))
    assert [(r.method.name, r.seed) for r in runs] == [
        ("softmax", 0), ("supcon", 0), ("softmax", 1), ("supcon", 1),
    ]  # fmt: skip
    for run in runs[:3]:  # supcon seed 1 not trained yet
        for name, marker, _ in run.stages(False):
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            with open(marker, "w") as f:
                f.write(json.dumps({"protocol": {"version": PROTOCOL_VERSION}}))
        for stage in ("train", "ood", "analysis"):
            cm.study.record_stage(run.run_dir, stage, 60.0, f"{run.seed}" * 40, False)
    # Every output there, but no record of the evaluations: not finished.
    cm.study.record_stage(runs[3].run_dir, "train", 60.0, "1" * 40, False)
    for name, marker, _ in runs[3].stages(False):
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write(json.dumps({"protocol": {"version": PROTOCOL_VERSION}}))
    seen = {}

    def aggregate(finished, output, args, invocation, previous, current):
        seen.update(runs=[(r.method.name, r.seed) for r in finished], invocation=invocation)
        seen["current"] = current
        return "| table |"

    monkeypatch.setattr(cm, "aggregate", aggregate)
    monkeypatch.setattr(cm, "execute", lambda *a, **k: pytest.fail("--report ran a stage"))
    monkeypatch.setattr(cm.study, "git_state", lambda repo, exclude: ("c" * 40, False))
    assert cm.main(argv) == 0
    current = seen.pop("current")
    assert seen == {"runs": [("softmax", 0), ("supcon", 0), ("softmax", 1)], "invocation": None}
    assert current == ("c" * 40, False)
    assert "3 of 4 runs finished" in capsys.readouterr().out


def test_study_meta_names_the_commits_of_runs_whose_invocation_was_cut_off(tmp_path):
    for name, commit in (("a", "a" * 40), ("b", "b" * 40)):
        (tmp_path / name).mkdir()
        cm.study.record_stage(str(tmp_path / name), "train", 5.0, commit, False)
    runs = [("softmax", 0, str(tmp_path / "a")), ("softmax", 1, str(tmp_path / "b"))]
    per_method = {"softmax": [{"protocol_version": 3}] * 2}
    previous = {"commit": "a" * 40, "uncommitted_changes": False, "wall_seconds": 5.0}
    prov = cm.study.study_provenance(previous, None)
    meta = cm.study.study_meta(runs, per_method, prov, False, "drop_images", "python x.py")
    assert meta["commits"] == ["a" * 40, "b" * 40] and meta["commit"] == "a" * 40


def test_the_control_trains_on_its_shuffled_ranking_and_is_evaluated_on_the_true_one(tmp_path):
    (run,) = cm.plan(_args(tmp_path, ["rince_out_in_shuffled"]))
    stages = {name: argv for name, _, argv in run.stages(False)}
    ranking = stages["train"][stages["train"].index("MODEL.RCDET.RANKING_FILE") + 1]
    assert ranking == os.path.join(run.run_dir, "shuffled_ranking.yaml")
    for name in ("ood", "analysis"):
        argv = stages[name]
        assert argv[argv.index("MODEL.RCDET.RANKING_FILE") + 1] == (
            "configs/rankings/shapes_families.yaml"
        )
        assert "shuffled_ranking.yaml" not in " ".join(argv)
    # --quick starts VOS half-way through its short schedule.
    (vos,) = cm.plan(_args(tmp_path, ["vos"], quick_iters=40))
    train = vos.stages(False)[0][2]
    assert train[train.index("MODEL.RCDET.VOS.STARTING_ITER") + 1] == "20"


def test_a_study_whose_classes_do_not_add_up_is_refused_before_any_run(capsys, tmp_path):
    argv = ["--study", "exposure", "--dry-run", "--runs-dir", str(tmp_path)]
    assert cm.main(argv + ["MODEL.ROI_HEADS.NUM_CLASSES", "7"]) == 2
    err = capsys.readouterr().err
    assert "MODEL.ROI_HEADS.NUM_CLASSES" in err and "5" in err and "\n" not in err.strip(), err


def test_report_with_a_corrupt_meta_json_is_one_clear_error(capsys, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text("{")
    (run,) = cm.plan(_args(tmp_path / "runs", ["softmax"], quick=False))
    for name, marker, _ in run.stages(False):
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write(json.dumps({"protocol": {"version": PROTOCOL_VERSION}}))
        cm.study.record_stage(run.run_dir, name, 600.0, "abc123", False)
    argv = ["--seeds", "0", "--methods", "softmax", "--runs-dir", str(tmp_path / "runs")]
    assert cm.main(argv + ["--output", str(out), "--report"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out}/meta.json: not a study's meta.json") and "\n" not in err


def _fake_stage(argv, **kw):
    """A stage's subprocess.run that only writes the outputs marking it done."""
    if argv[1] == "tools/train_net.py":
        folder = argv[argv.index("OUTPUT_DIR") + 1]
        os.makedirs(folder, exist_ok=True)
        for name in ("model_final.pth", "config.yaml", "log.txt"):
            with open(os.path.join(folder, name), "w") as f:
                f.write(name)
        return
    folder = argv[argv.index("--output") + 1]
    os.makedirs(folder, exist_ok=True)
    name = "ood_report.json" if argv[1] == "tools/benchmark_ood.py" else "analysis.json"
    with open(os.path.join(folder, name), "w") as f:
        json.dump({"protocol": {"version": PROTOCOL_VERSION}, "from": folder}, f)


def _study_with_records(tmp_path, monkeypatch):
    """A finished one-seed softmax and supcon study whose records are in OUT/runs."""
    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    argv = ["--seeds", "0", "--methods", "softmax", "supcon", "--runs-dir", str(runs_dir)]
    argv += ["--output", str(out)]
    monkeypatch.setattr(cm.subprocess, "run", _fake_stage)
    monkeypatch.setattr(cm.study, "git_state", lambda repo, exclude: ("c" * 40, False))
    monkeypatch.setattr(cm, "aggregate", lambda finished, *a: "| table |")
    assert cm.main(argv) == 0
    return runs_dir, out / "runs", argv


def test_report_writes_the_tables_from_the_records_once_the_runs_are_gone(
    tmp_path, monkeypatch, capsys
):
    runs_dir, records, argv = _study_with_records(tmp_path, monkeypatch)
    for method in ("softmax", "supcon"):
        record, run = records / method / "seed0", runs_dir / method / "seed0"
        files = sorted(str(p.relative_to(record)) for p in record.rglob("*") if p.is_file())
        assert files == [
            "analysis/analysis.json", "config.yaml", "ood/ood_report.json", "provenance.json",
        ]  # fmt: skip
        for name in files:
            assert (record / name).read_bytes() == (run / name).read_bytes()
    seen = {}

    def aggregate(finished, output, args, invocation, previous, current):
        seen["runs"] = [r.run_dir for r in finished]
        return "| table |"

    monkeypatch.setattr(cm, "aggregate", aggregate)
    monkeypatch.setattr(cm, "execute", lambda *a, **k: pytest.fail("--report ran a stage"))
    # --report over the run folders saves their records again (of this checkout's format).
    shutil.rmtree(records)
    assert cm.main(argv + ["--report"]) == 0
    assert seen["runs"] == [str(runs_dir / m / "seed0") for m in ("softmax", "supcon")]
    assert (records / "supcon" / "seed0" / "provenance.json").is_file()
    shutil.rmtree(runs_dir)
    assert cm.main(argv + ["--report"]) == 0
    assert seen["runs"] == [str(records / m / "seed0") for m in ("softmax", "supcon")]
    assert "2 of 2 runs finished" in capsys.readouterr().out


def test_a_run_that_is_not_evaluated_saves_no_record(tmp_path, monkeypatch):
    runs = cm.plan(_args(tmp_path / "runs", ["softmax"], quick=False))
    monkeypatch.setattr(cm.subprocess, "run", lambda argv, **kw: None)  # no outputs
    cm.execute(runs, voc=False, log=lambda *a: None, records=str(tmp_path / "records"))
    assert not (tmp_path / "records").exists()


def test_a_study_continued_without_the_run_folders_tables_their_records(
    tmp_path, monkeypatch, capsys
):
    runs_dir, records, argv = _study_with_records(tmp_path, monkeypatch)
    shutil.rmtree(runs_dir / "supcon")
    seen = {}

    def aggregate(finished, output, args, invocation, previous, current=None):
        seen.update(runs=[r.run_dir for r in finished], invocation=invocation)
        return "| table |"

    monkeypatch.setattr(cm, "aggregate", aggregate)
    monkeypatch.setattr(cm.subprocess, "run", lambda *a, **k: pytest.fail("a stage ran"))
    assert cm.main(argv) == 0
    assert seen == {
        "runs": [str(runs_dir / "softmax" / "seed0"), str(records / "supcon" / "seed0")],
        "invocation": None,
    }
    assert f"supcon seed 0: from its record ({records / 'supcon' / 'seed0'})" in (
        capsys.readouterr().out
    )


def test_report_never_replaces_a_record_of_another_training(tmp_path, monkeypatch, capsys):
    runs_dir, records, argv = _study_with_records(tmp_path, monkeypatch)
    record = records / "softmax" / "seed0"
    # A pruned run folder of the same training: its record keeps the file the run lost.
    (record / "ood" / "ood_scores.npz").write_bytes(b"kept")
    assert cm.main(argv + ["--report"]) == 0
    assert (record / "ood" / "ood_scores.npz").read_bytes() == b"kept"
    # The run folder trained again: --report refuses to overwrite the record with it.
    cm.study.record_stage(str(runs_dir / "softmax" / "seed0"), "train", 1.0, "d" * 40, False)
    before = (record / "provenance.json").read_text()
    assert cm.main(argv + ["--report"]) == 2
    err = capsys.readouterr().err
    assert f"error: {record}: the record of softmax seed 0 is of another training" in err
    assert (record / "provenance.json").read_text() == before


def test_records_inside_the_runs_folder_are_refused(tmp_path, capsys):
    argv = ["--quick", "--methods", "softmax", "--dry-run", "--runs-dir", str(tmp_path / "runs")]
    assert cm.main(argv + ["--records", str(tmp_path / "runs" / "records")]) == 2
    assert "is inside --runs-dir" in capsys.readouterr().err
    assert cm.main(argv + ["--records", str(tmp_path)]) == 2
    assert "is inside --records" in capsys.readouterr().err
    assert cm.main(argv + ["--records", str(tmp_path / "runs")]) == 0  # each run its own record
