#!/usr/bin/env python
"""
Reproducible comparison of the field's baselines and RINCE, with classes held out.

For each method of the study (rcdet.study: main, its drop_annotations variant, exposure) and
seed: train, run the OOD benchmark and the embedding analysis, each a real command (--dry-run)
that is skipped when its output exists, so that an interrupted study resumes where it stopped.
A cut-off training starts again from scratch; an OOD report of an older protocol is evaluated
again from its checkpoint. --report writes the tables of the runs finished so far. Outputs in
--output: results.md / results.csv, roc.png, tsne_panel.png, configs/ and meta.json; in
--records (default OUTPUT/runs) each finished run's record, everything the tables read from it
but its weights, from which --report writes them again when the run folders are gone.
Methods, options and outputs: docs/usage.md#tools.

    make compare                                  # built-in dataset, 3 seeds, CPU demo schedule
    python tools/compare_methods.py --quick       # 1 seed, short schedule (smoke check)
    python tools/compare_methods.py --voc --num-gpus 8 --dry-run   # VOC2007 R50-FPN, GPUs
    python tools/compare_methods.py --hold-out-mode drop_annotations   # the variant study
    python tools/compare_methods.py --study exposure                   # the exposure study
"""

import argparse
import glob
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

from rcdet import cli, study
from rcdet.data.held_out import HOLD_OUT_MODES
from rcdet.engine import exit_on_user_error, report_user_errors
from rcdet.evaluation.report import PROTOCOL_VERSION, report_version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Run:
    method: study.Method
    seed: int
    run_dir: str
    extra: List[str]
    train_args: List[str] = field(default_factory=list)
    ood_args: List[str] = field(default_factory=list)

    @property
    def weights(self):
        return os.path.join(self.run_dir, "model_final.pth")

    @property
    def ranking_file(self):
        if not self.method.shuffled_ranking:
            return None
        return os.path.join(self.run_dir, "shuffled_ranking.yaml")

    def _opts(self, *opts):
        out = list(self.method.opts) + list(opts) + self.extra
        return out + (["MODEL.RCDET.RANKING_FILE", self.ranking_file] if self.ranking_file else [])

    def train_opts(self):
        return self._opts("SEED", str(self.seed), "OUTPUT_DIR", self.run_dir)

    def stages(self, voc: bool):
        """(name, output that marks it done, argv)."""
        py, cfg = sys.executable, self.method.config
        eval_opts = self._opts("OUTPUT_DIR", self.run_dir, "MODEL.WEIGHTS", self.weights)
        # Evaluation always reads the true ranking, also for the shuffled control: its families
        # (placement, ranking-aware scores) and the analysis's ranking levels are the dataset's.
        if self.ranking_file:
            eval_opts[eval_opts.index(self.ranking_file)] = study.true_ranking_file(voc)
        ood, analysis = os.path.join(self.run_dir, "ood"), os.path.join(self.run_dir, "analysis")
        train = [py, "tools/train_net.py", "--config-file", cfg] + self.train_args
        evaluate = [py, "tools/benchmark_ood.py", "--name", self.method.name, "--output", ood]
        analyze = [py, "tools/analyze_embeddings.py", "--output", analysis, "--config-file", cfg]
        return [
            ("train", self.weights, train + self.train_opts()),
            (
                "ood",
                os.path.join(ood, "ood_report.json"),
                evaluate + self.ood_args + ["--config-file", cfg] + eval_opts,
            ),
            ("analysis", os.path.join(analysis, "analysis.json"), analyze + eval_opts),
        ]


def selected_study(args) -> study.Study:
    """The study of --study and --hold-out-mode, with --methods (a subset of its methods)."""
    try:
        return study.study_for(args.study, args.voc, args.hold_out_mode, args.methods or ())
    except ValueError as e:
        raise cli.UsageError(f"--methods {e}") from None


def plan(args) -> List[Run]:
    seeds = [0] if args.quick else args.seeds
    extra = []
    if args.quick:
        # VOS starts half-way, so that the smoke check runs its outlier loss too.
        extra = ["SOLVER.MAX_ITER", str(args.quick_iters), "SOLVER.STEPS", "()"]
        extra += ["MODEL.RCDET.VOS.STARTING_ITER", str(args.quick_iters // 2)]
    if args.hold_out_mode != "drop_images":
        extra += ["MODEL.RCDET.OOD.HOLD_OUT_MODE", args.hold_out_mode]
    extra += list(args.opts)
    train_args = ["--num-gpus", str(args.num_gpus)] if args.num_gpus else []
    ood_args = ["--ood-dataset", args.ood_dataset] if args.ood_dataset else []
    # Seed by seed: an interrupted study has whole seeds of every method to report.
    return [
        Run(m, s, os.path.join(args.runs_dir, m.name, f"seed{s}"), extra, train_args, ood_args)
        for s in seeds
        for m in selected_study(args).methods
    ]


def stage_done(run_dir: str, name: str, marker: str, reevaluate: bool = False) -> bool:
    """
    A stage is done when its output exists and the run's provenance.json records it (execute
    writes that when the stage exits; a training started again removes the file, so recorded
    evaluations are of the current weights); an OOD report also needs the current protocol.
    detectron2 writes model_final.pth at the last iteration, before the OOD statistics hook and
    the final evaluation, so a training cut off then has its output already.
    """
    if not os.path.isfile(marker):
        return False
    if name not in study.run_provenance(run_dir).get("stage_seconds", {}):
        return False
    if name != "ood":
        return True
    if reevaluate:
        return False
    return report_version(marker) == PROTOCOL_VERSION  # unreadable: evaluate again


def stage_env() -> Dict[str, str]:
    """This checkout first on PYTHONPATH: Python puts a script's own folder (tools/) first, so a
    stage would import whichever rcdet is installed and its provenance's commit would lie."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def stages_done(run: Run, voc: bool, reevaluate: bool = False) -> List[bool]:
    """stage_done of each of the run's stages (Run.stages: the training first); none is done
    after a training that is not (the evaluations read its weights)."""
    stages = run.stages(voc)
    done = [stage_done(run.run_dir, name, marker, reevaluate) for name, marker, _ in stages]
    return [finished and done[0] for finished in done]


def redo_note(name: str, marker: str, trained: bool) -> str:
    """Why a stage not done whose output exists runs again; '' when it has none."""
    if not os.path.isfile(marker):
        return ""
    if name == "train":
        return "cut off: trained again"
    return "re-evaluate" if trained else "new weights"


# What a training writes into OUTPUT_DIR (detectron2's writers append), and the run's
# provenance.json, whose stages were of the earlier weights.
_TRAINING_OUTPUTS = (
    "metrics.json log.txt last_checkpoint events.out.tfevents.* model_*.pth ood_stats_*.npz"
    " provenance.json"
).split()


def clear_cut_off_training(run_dir: str) -> List[str]:
    """Remove what a cut-off training left, so that the next one starts from scratch, its
    metrics.json and log.txt hold only its own lines, and its provenance only its own stages."""
    removed = []
    for pattern in _TRAINING_OUTPUTS:
        for path in sorted(glob.glob(os.path.join(run_dir, pattern))):
            os.remove(path)
            removed.append(os.path.basename(path))
    return removed


def execute(
    runs: List[Run],
    voc: bool,
    log=print,
    commit: Optional[tuple] = None,
    reevaluate: bool = False,
    records: Optional[str] = None,
) -> Dict[str, int]:
    """
    Run every stage not done (stages_done); ``commit``: (sha, dirty) for the provenance. Each
    run, once evaluated, saves its record (study.save_record) into ``records`` as
    ``<method>/seed<k>``, so that the tables survive the run folders.
    """
    commit = commit or ("unknown", False)
    done = {"skipped": 0, "ran": 0, "seeds_run": []}
    for run in runs:
        execute_run(run, voc, log, commit, reevaluate, done)
        if records and evaluated(run, voc):
            study.save_record(run.run_dir, record_dir(records, run))
    return done


def record_dir(records: str, run: Run) -> str:
    """The folder of the run's record in ``records``: the run folder's layout."""
    return os.path.join(records, run.method.name, f"seed{run.seed}")


def execute_run(run: Run, voc: bool, log, commit: tuple, reevaluate: bool, done: Dict):
    """Run the stages of ``run`` that are not done, counting them in ``done``."""
    done_before = stages_done(run, voc, reevaluate)
    for (name, marker, argv), finished in zip(run.stages(voc), done_before):
        what = f"[compare] {run.method.name} seed {run.seed}: {name}"
        if finished:
            log(f"{what} already done ({marker})")
            done["skipped"] += 1
            continue
        if name == "train":
            for leftover in clear_cut_off_training(run.run_dir):
                log(f"{what}: removed {leftover} of a cut-off training")
            if run.ranking_file and not os.path.isfile(run.ranking_file):
                true_file = os.path.join(REPO, study.true_ranking_file(voc))
                classes, seed = study.class_names(voc), 1000 + run.seed
                study.write_shuffled_ranking(run.ranking_file, true_file, classes, seed)
        note = redo_note(name, marker, done_before[0])
        log(f"{what}{f' ({note})' if note else ''}: {shlex.join(argv)}")
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=REPO, check=True, env=stage_env())
        done["ran"] += 1
        if run.seed not in done["seeds_run"]:
            done["seeds_run"].append(run.seed)
        study.record_stage(run.run_dir, name, time.perf_counter() - t0, *commit)


def aggregate(
    runs: List[Run],
    output: str,
    args,
    invocation: Optional[dict] = None,
    previous_meta: Optional[dict] = None,
    current: Optional[tuple] = None,
) -> str:
    """The results, configs and meta.json of ``runs`` (rcdet.study.write_study). ``invocation``:
    this call's commit, seeds and wall time if it ran stages; ``previous_meta``: meta.json of the
    invocations it resumed; ``current``: (commit, uncommitted changes), for --report."""
    selected = selected_study(args)
    return study.write_study(
        [study.StudyRun(r.method.name, r.seed, r.run_dir, r.ranking_file) for r in runs],
        output,
        selected.partners,
        selected.contrasts,
        study.study_provenance(previous_meta, invocation, current),
        quick=args.quick,
        hold_out_mode=args.hold_out_mode,
        command=shlex.join(["python", "tools/compare_methods.py"] + (args.argv or [])),
    )


def evaluated(run: Run, voc: bool) -> bool:
    """
    A run the tables can show: its training and both evaluations are done (stage_done), the
    weights not needed, so that a run's record counts.
    """
    trained = "train" in study.run_provenance(run.run_dir).get("stage_seconds", {})
    evaluations = run.stages(voc)[1:]
    return trained and all(stage_done(run.run_dir, n, marker) for n, marker, _ in evaluations)


def finished_runs(runs: List[Run], records: str, voc: bool) -> List[Run]:
    """
    The runs --report tables: each run that is evaluated in the runs folder (its record saved
    again: refresh_record), else its record if that is.
    """
    finished = []
    for run in runs:
        recorded = replace(run, run_dir=record_dir(records, run))
        if evaluated(run, voc):
            refresh_record(run, recorded.run_dir)
            finished.append(run)
        elif evaluated(recorded, voc):
            finished.append(recorded)
    return finished


def refresh_record(run: Run, record: str):
    """
    Save the run's record where there is none or an incomplete one, or again (in this checkout's
    format) where it is of the same stages and the run still has each of its files. A record of
    another training or evaluation is not replaced by --report: a clear error.
    """
    if not os.path.isfile(os.path.join(record, "provenance.json")):
        study.save_record(run.run_dir, record)
        return
    if study.run_provenance(record) != study.run_provenance(run.run_dir):
        raise cli.UsageError(
            f"{record}: the record of {run.method.name} seed {run.seed} is of another training"
            f" or evaluation than {run.run_dir} (their provenance.json differ). Delete the record"
            " to save the run's, or move the run folder away to table the record."
        )
    names = [n for n in study.RECORD_FILES if os.path.isfile(os.path.join(record, n))]
    if all(os.path.isfile(os.path.join(run.run_dir, n)) for n in names):
        study.save_record(run.run_dir, record)


def from_records(runs: List[Run], records: str, voc: bool, log=print) -> Dict[int, Run]:
    """
    ``{index in runs: its record}`` for each run whose folder is gone and whose record is
    evaluated: a study continued on another machine tables those runs from their records
    instead of training them again.
    """
    out = {}
    for i, run in enumerate(runs):
        recorded = replace(run, run_dir=record_dir(records, run))
        if not os.path.isdir(run.run_dir) and evaluated(recorded, voc):
            log(
                f"[compare] {run.method.name} seed {run.seed}: from its record ({recorded.run_dir})"
            )
            out[i] = recorded
    return out


def check_options(args):
    """The study's overrides and output folders, checked before a command is listed or run."""
    study.check_method_configs(selected_study(args).methods, args.opts, REPO)
    if args.voc and args.ood_dataset == "builtin":
        raise cli.UsageError(
            "--ood-dataset builtin: the built-in OOD images go with the built-in dataset; for"
            " --voc name a registered dataset (e.g. a COCO subset) or none."
        )
    cli.check_output_dir(args.runs_dir, "--runs-dir")
    cli.check_output_dir(args.output, "--output")
    cli.check_output_dir(args.records, "--records")
    # The same folder is allowed: each run is then its own record (--report over records).
    folders = (("--runs-dir", args.runs_dir), ("--records", args.records))
    for (inner, path), (outer, around) in (folders, folders[::-1]):
        if os.path.realpath(path).startswith(os.path.realpath(around) + os.sep):
            raise cli.UsageError(
                f"{inner} {path} is inside {outer} {around}: keep the run folders and their"
                " records apart (default --records: OUTPUT/runs)."
            )


def main(argv=None):
    names, variant = study.all_method_names(), ", ".join(study.VARIANT_METHODS)
    parser = cli.ArgumentParser(description=__doc__)
    add = parser.add_argument
    add("--voc", action="store_true", help="the VOC2007 R50-FPN study (GPUs)")
    add("--quick", action="store_true", help="one seed, short schedule")
    add("--quick-iters", type=cli.int_in_range(1), default=150, help="iterations with --quick")
    # SEED -1 is detectron2's "random": a study's seeds are reproducible ones.
    seed = cli.int_in_range(0, 2**31 - 1)
    add("--seeds", type=seed, nargs="+", default=[0, 1, 2], help="one run per method and seed")
    add("--study", choices=study.STUDIES, default="main", help="exposure: docs/unknown_objects.md")
    add("--methods", nargs="+", choices=names, metavar="METHOD", help=", ".join(names))
    add(
        "--hold-out-mode",
        choices=HOLD_OUT_MODES,
        default="drop_images",
        help=f"drop_annotations: the variant study ({variant} unless --methods)",
    )
    add("--num-gpus", type=cli.int_in_range(1), help="passed to tools/train_net.py")
    datasets = cli.registered_dataset(("auto", "builtin", "none"))
    add("--ood-dataset", type=datasets, metavar="NAME", help="benchmark_ood.py's OOD images")
    add("--reevaluate", action="store_true", help="re-run every OOD stage from the checkpoints")
    add("--dry-run", action="store_true", help="list the runs and commands only")
    add(
        "--report",
        action="store_true",
        help="the tables (and records) of the finished runs; run nothing",
    )
    add("--runs-dir", default="")
    add("--output", default="")
    add("--records", default="", help="each finished run's record (default: OUTPUT/runs)")
    add("opts", nargs=argparse.REMAINDER, help="config overrides for every run")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    kind = "voc" if args.voc else "builtin"
    suffix = "_quick" if args.quick else ""
    suffix += "" if args.study == "main" else f"_{args.study}"
    suffix += "" if args.hold_out_mode == "drop_images" else f"_{args.hold_out_mode}"
    args.runs_dir = args.runs_dir or os.path.join("output", f"compare_{kind}{suffix}")
    results = f"{kind}_comparison_v{study.STUDY_VERSION}{suffix}"
    args.output = args.output or os.path.join("results", results)
    args.records = args.records or os.path.join(args.output, "runs")
    return report_user_errors(run_study, args)


def run_study(args):
    check_options(args)
    runs = plan(args)
    if args.dry_run:
        for run in runs:
            stages = run.stages(args.voc)
            done = stages_done(run, args.voc, args.reevaluate)
            state = "done" if all(done) else "todo"
            print(f"run {run.method.name} seed {run.seed} [{state}] -> {run.run_dir}")
            for (name, marker, argv_), finished in zip(stages, done):
                note = "done" if finished else redo_note(name, marker, done[0])
                print(f"  {name}{f' ({note})' if note else ''}: {shlex.join(argv_)}")
        return 0
    if args.report:
        finished = finished_runs(runs, args.records, args.voc)
        if not finished:
            raise cli.UsageError(
                f"--report: no run in {args.runs_dir} or {args.records} has finished every stage"
                " yet; run the study first (the same options without --report)."
            )
        current = study.git_state(repo=REPO, exclude=args.output)
        md = aggregate(finished, args.output, args, None, study.load_meta(args.output), current)
        print(md)
        print(f"[compare] {len(finished)} of {len(runs)} runs finished; results in {args.output}/")
        return 0
    commit, dirty = study.git_state(repo=REPO, exclude=args.output)
    recorded = from_records(runs, args.records, args.voc)
    start = time.perf_counter()
    to_run = [run for i, run in enumerate(runs) if i not in recorded]
    counts = execute(
        to_run, args.voc, commit=(commit, dirty), reevaluate=args.reevaluate, records=args.records
    )
    wall = time.perf_counter() - start
    counts["skipped"] += sum(len(run.stages(args.voc)) for run in recorded.values())
    runs = [recorded.get(i, run) for i, run in enumerate(runs)]
    # Only a resumed study inherits the earlier invocations: a fresh one re-ran all they made.
    previous = study.load_meta(args.output) if counts["skipped"] else None
    invocation = None
    if counts["ran"]:
        invocation = {
            "commit": commit,
            "uncommitted_changes": dirty,
            "seeds_run": sorted(counts["seeds_run"]),
            "stages_run": counts["ran"],
            "wall_seconds": round(wall, 1),
        }
    md = aggregate(runs, args.output, args, invocation, previous)
    print(md)
    print(
        f"[compare] {counts['ran']} stages run, {counts['skipped']} skipped; "
        f"results in {args.output}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
