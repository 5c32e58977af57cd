#!/usr/bin/env python
"""
Reproducible comparison: softmax vs SupCon vs RINCE, with two classes held out.

Methods: softmax (branch off), supcon_out, rince_in and rince_out_in with the family ranking,
and rince_out_in with a deliberately wrong (shuffled) ranking as a control. For each method and
seed: train, then the OOD benchmark (AP, AP50, AP75 and every OOD score) and the embedding
analysis. Every stage is a real command (see --dry-run) and is skipped when its output exists,
so an interrupted study resumes where it stopped.

    make compare                                    # built-in dataset, 3 seeds, CPU demo schedule
    python tools/compare_methods.py --quick         # 1 seed, short schedule (smoke check)
    python tools/compare_methods.py --voc --dry-run # the VOC2007 R50-FPN study, for GPU machines

Outputs in --output (default results/builtin_comparison or results/voc_comparison):
results.md / results.csv (mean +- std over seeds), roc.png, tsne_panel.png, configs/ and
meta.json (commit, machine, wall time).
"""

import argparse
import csv
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDING_SCORES = ("cosine", "knn", "gaussian")


@dataclass
class Method:
    name: str
    config: str
    opts: List[str] = field(default_factory=list)
    shuffled_ranking: bool = False


def methods_for(voc: bool) -> List[Method]:
    p = "voc" if voc else "shapes"
    return [
        Method("softmax", f"configs/{p}_softmax_ood.yaml"),
        Method("supcon_out", f"configs/{p}_supcon_ood.yaml"),
        Method("rince_in", f"configs/{p}_rince_ood.yaml", ["MODEL.RCDET.LOSS", "rince_in"]),
        Method("rince_out_in", f"configs/{p}_rince_ood.yaml"),
        Method("rince_out_in_shuffled", f"configs/{p}_rince_ood.yaml", shuffled_ranking=True),
    ]


def true_ranking_file(voc: bool) -> str:
    return "configs/rankings/voc_human.yaml" if voc else "configs/rankings/shapes_families.yaml"


@dataclass
class Run:
    method: Method
    seed: int
    run_dir: str
    extra: List[str]

    @property
    def weights(self):
        return os.path.join(self.run_dir, "model_final.pth")

    @property
    def ranking_file(self):
        return os.path.join(self.run_dir, "shuffled_ranking.yaml") if self.method.shuffled_ranking else None

    def train_opts(self):
        opts = list(self.method.opts) + ["SEED", str(self.seed), "OUTPUT_DIR", self.run_dir] + self.extra
        if self.ranking_file:
            opts += ["MODEL.RCDET.RANKING_FILE", self.ranking_file]
        return opts

    def stages(self, voc: bool):
        """(name, output that marks it done, argv)."""
        py = sys.executable
        cfg = self.method.config
        eval_opts = list(self.method.opts) + ["OUTPUT_DIR", self.run_dir, "MODEL.WEIGHTS", self.weights] + self.extra
        if self.ranking_file:
            eval_opts += ["MODEL.RCDET.RANKING_FILE", self.ranking_file]
        # The analysis always measures against the true ranking, also for the shuffled control.
        analysis_opts = list(eval_opts)
        if self.ranking_file:
            analysis_opts[analysis_opts.index(self.ranking_file)] = true_ranking_file(voc)
        return [
            ("train", self.weights, [py, "tools/train_net.py", "--config-file", cfg] + self.train_opts()),
            ("ood", os.path.join(self.run_dir, "ood", "ood_report.json"),
             [py, "tools/benchmark_ood.py", "--name", self.method.name, "--output", os.path.join(self.run_dir, "ood"),
              "--config-file", cfg] + eval_opts),
            ("analysis", os.path.join(self.run_dir, "analysis", "analysis.json"),
             [py, "tools/analyze_embeddings.py", "--output", os.path.join(self.run_dir, "analysis"), "--config-file", cfg]
             + analysis_opts),
        ]


def plan(args) -> List[Run]:
    seeds = [0] if args.quick else args.seeds
    extra = []
    if args.quick:
        extra = ["SOLVER.MAX_ITER", str(args.quick_iters), "SOLVER.STEPS", "()"]
    extra += list(args.opts)
    runs = []
    for m in methods_for(args.voc):
        if args.methods and m.name not in args.methods:
            continue
        for s in seeds:
            runs.append(Run(m, s, os.path.join(args.runs_dir, m.name, f"seed{s}"), extra))
    return runs


def write_shuffled_ranking(run: Run, voc: bool):
    """The control ranking: the true one with its structure moved onto permuted classes."""
    from rcdet.data.shapes import CLASS_NAMES
    from rcdet.ranking import load_ranking, ranking_to_yaml

    if voc:
        from detectron2.data.datasets.pascal_voc import CLASS_NAMES as classes
    else:
        classes = CLASS_NAMES
    true = load_ranking(os.path.join(REPO, true_ranking_file(voc)), list(classes))
    os.makedirs(run.run_dir, exist_ok=True)
    with open(run.ranking_file, "w") as f:
        f.write(ranking_to_yaml(true.permuted(seed=1000 + run.seed),
                                f"Shuffled control for {true.source} (seed {1000 + run.seed}): deliberately wrong."))


def git_state():
    """(commit, whether tracked files have uncommitted changes) of the checkout the study runs from."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout
    except OSError:
        return "unknown", False
    return commit or "unknown", bool(dirty.strip())


def record_stage(run_dir: str, stage: str, seconds: float, commit: str, dirty: bool):
    """Each run keeps the commit and time of its own stages, since a resumed study mixes invocations."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "provenance.json")
    info = {"stages": {}}
    if os.path.isfile(path):
        with open(path) as f:
            info = json.load(f)
    info["stages"][stage] = {"seconds": round(seconds, 1), "commit": commit, "uncommitted_changes": dirty}
    with open(path, "w") as f:
        json.dump(info, f, indent=2)


def execute(runs: List[Run], voc: bool, log=print, commit: Optional[tuple] = None) -> Dict[str, int]:
    """Run every stage whose output is missing. ``commit``: (sha, dirty) to record in each run's provenance."""
    done = {"skipped": 0, "ran": 0, "seeds_run": []}
    for run in runs:
        for name, marker, argv in run.stages(voc):
            if os.path.isfile(marker):
                log(f"[compare] {run.method.name} seed {run.seed}: {name} already done ({marker})")
                done["skipped"] += 1
                continue
            if name == "train" and run.ranking_file and not os.path.isfile(run.ranking_file):
                write_shuffled_ranking(run, voc)
            log(f"[compare] {run.method.name} seed {run.seed}: {name}: {shlex.join(argv)}")
            t0 = time.perf_counter()
            subprocess.run(argv, cwd=REPO, check=True)
            done["ran"] += 1
            if run.seed not in done["seeds_run"]:
                done["seeds_run"].append(run.seed)
            if commit is not None:
                record_stage(run.run_dir, name, time.perf_counter() - t0, *commit)
    return done


# ------------------------------------------------------------------------- aggregation


def run_metrics(run_dir: str) -> Dict[str, Optional[float]]:
    """The numbers one run contributes to the table."""
    with open(os.path.join(run_dir, "ood", "ood_report.json")) as f:
        ood = json.load(f)
    with open(os.path.join(run_dir, "analysis", "analysis.json")) as f:
        ana = json.load(f)
    out = {k: ood["detection"].get(k) for k in ("AP", "AP50", "AP75")}
    out["msp_auroc"] = ood["scores"]["msp"]["auroc"]
    out["msp_fpr95"] = ood["scores"]["msp"]["fpr95"]
    for s in EMBEDDING_SCORES:
        e = ood["scores"][s]
        out[f"{s}_auroc"] = e["auroc"] if e["available"] else None
        out[f"{s}_fpr95"] = e["fpr95"] if e["available"] else None
    space = ana["spaces"].get("projection") or ana["spaces"].get("box_features")
    out["space"] = "projection" if "projection" in ana["spaces"] else "box_features"
    out["outliers_class"] = space["outliers"]["class"]["fraction"]
    out["outliers_group"] = space["outliers"].get("group_level1", {}).get("fraction")
    fid = space.get("ranking_fidelity")
    out["spearman"] = fid["spearman"] if fid else None
    return out


def mean_std(values: List[Optional[float]]):
    """Mean and sample standard deviation (ddof = 1) of the defined values; std None for one value."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


COLUMNS = [
    ("AP", "AP", 1), ("AP50", "AP50", 1), ("AP75", "AP75", 1),
    ("msp_auroc", "MSP AUROC", 3), ("msp_fpr95", "MSP FPR95", 3),
    ("best_emb_auroc", "best emb. AUROC", 3), ("best_emb_fpr95", "best emb. FPR95", 3),
    ("outliers_class", "outliers class %", 1), ("outliers_group", "outliers group %", 1), ("spearman", "Spearman", 3),
]


def build_table(per_method: Dict[str, List[Dict]]):
    """Rows of mean +- std per method. The best embedding score is the one with the highest mean AUROC."""
    rows = []
    for method, results in per_method.items():
        row = {"method": method, "seeds": len(results), "space": results[0].get("space", "")}
        best, best_auroc = None, -1.0
        for s in EMBEDDING_SCORES:
            m, _ = mean_std([r.get(f"{s}_auroc") for r in results])
            if m is not None and m > best_auroc:
                best, best_auroc = s, m
        row["best_emb_score"] = best or "n/a"
        for key, _, _ in COLUMNS:
            if key.startswith("best_emb"):
                src = f"{best}_{key.split('_')[-1]}" if best else None
                vals = [r.get(src) for r in results] if src else [None]
            else:
                vals = [r.get(key) for r in results]
            if key.startswith("outliers"):
                vals = [None if v is None else 100 * v for v in vals]
            row[key] = mean_std(vals)
        rows.append(row)
    return rows


def _cell(ms, digits):
    m, s = ms
    if m is None:
        return "n/a"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def table_markdown(rows) -> str:
    head = ["method", "seeds"] + [label for _, label, _ in COLUMNS] + ["best emb. score"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["seeds"])] + [_cell(r[k], d) for k, _, d in COLUMNS] + [r["best_emb_score"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "seeds"] + [f"{k}_{x}" for k, _, _ in COLUMNS for x in ("mean", "std")] + ["best_emb_score"])
    for r in rows:
        vals = []
        for k, _, _ in COLUMNS:
            m, s = r[k]
            vals += ["" if m is None else f"{m:.6g}", "" if s is None else f"{s:.6g}"]
        w.writerow([r["method"], r["seeds"]] + vals + [r["best_emb_score"]])
    return buf.getvalue()


def _figures(runs: List[Run], output: str, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    first = {}
    for run in runs:
        first.setdefault(run.method.name, run)
    best = {r["method"]: r["best_emb_score"] for r in rows}
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for name, run in first.items():
        raw = os.path.join(run.run_dir, "ood", "ood_scores.npz")
        if not os.path.isfile(raw):
            continue
        with np.load(raw) as z:
            st = z["status"]
            m = st >= 0
            is_id = st[m] == 1
            if not (is_id.any() and (~is_id).any()):
                continue
            for score, style in (("msp", ":"), (best.get(name), "-")):
                if score in z.files:
                    fpr, tpr, _ = roc_curve(is_id, z[score][m])
                    ax.plot(fpr, tpr, style, label=f"{name} {score} ({roc_auc_score(is_id, z[score][m]):.3f})")
    ax.plot([0, 1], [0, 1], color="0.8", linewidth=0.8)
    ax.set_xlabel("FPR (held-out objects accepted)")
    ax.set_ylabel("TPR (known objects accepted)")
    ax.set_title(f"OOD ROC, seed {runs[0].seed} of each method (dotted: MSP; solid: best embedding score)", fontsize=8)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(output, "roc.png"), dpi=110)
    plt.close(fig)

    from rcdet.analysis import _HELD_OUT_MARKERS, _MARKERS

    panels = [(n, r) for n, r in first.items() if os.path.isfile(os.path.join(r.run_dir, "analysis", "tsne_points.npz"))
              or os.path.isfile(os.path.join(r.run_dir, "analysis", "box_features_tsne_points.npz"))]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.4), squeeze=False)
        for ax, (name, run) in zip(axes[0], panels):
            folder = os.path.join(run.run_dir, "analysis")
            path = os.path.join(folder, "tsne_points.npz")
            if not os.path.isfile(path):
                path = os.path.join(folder, "box_features_tsne_points.npz")
            with open(os.path.join(folder, "analysis.json")) as f:
                ana = json.load(f)
            names, held = ana["class_names"], ana["held_out_classes"]
            groups = ana["group_levels"][0] if ana["group_levels"] else names
            gnames = sorted(set(groups))
            with np.load(path) as z:
                pts, lab = z["points"], z["labels"]
            cmap = plt.get_cmap("tab10")
            for c, cname in enumerate(names):
                sel = lab == c
                if cname in held:
                    marker = _HELD_OUT_MARKERS[held.index(cname) % len(_HELD_OUT_MARKERS)]
                    ax.scatter(pts[sel, 0], pts[sel, 1], s=12, marker=marker, c="black", linewidths=0.7, label=f"{cname} (held out)")
                else:
                    ax.scatter(pts[sel, 0], pts[sel, 1], s=4, color=cmap(c % 10), marker=_MARKERS[gnames.index(groups[c]) % len(_MARKERS)])
            ax.set_title(name + ("" if "tsne_points.npz" == os.path.basename(path) else " (box features)"), fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            axes[0][-1].legend(handles, labels, fontsize=6, loc="lower right")
        fig.suptitle("t-SNE of GT-box embeddings of the test split (colour: class, marker: family, black: held out)", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(output, "tsne_panel.png"), dpi=100)
        plt.close(fig)


def study_provenance(previous_meta: Optional[dict], invocation: Optional[dict]) -> dict:
    """Commit and wall time of the study: the earlier invocations this one resumed, plus this one if it ran stages."""
    invocations = []
    if previous_meta:
        invocations = previous_meta.get("invocations") or [{
            # meta.json from before invocations were recorded: one invocation.
            "commit": previous_meta.get("commit", "unknown"),
            "uncommitted_changes": previous_meta.get("uncommitted_changes", False),
            "seeds_run": previous_meta.get("seeds"), "wall_seconds": previous_meta.get("wall_seconds")}]
    invocations = invocations + ([invocation] if invocation else [])
    latest = invocations[-1] if invocations else {"commit": "unknown", "uncommitted_changes": False}
    # Summed over the invocations that contributed runs. One interrupted before it wrote meta.json is not
    # counted; the stage times of its runs are still in their provenance.json.
    walls = [i.get("wall_seconds") for i in invocations]
    return {
        "commit": latest["commit"], "uncommitted_changes": latest["uncommitted_changes"],
        "commits": sorted({i["commit"] for i in invocations}),
        "invocations": invocations,
        "wall_seconds": round(sum(walls), 1) if walls and None not in walls else None,
    }


def aggregate(runs: List[Run], output: str, args, invocation: Optional[dict] = None, previous_meta: Optional[dict] = None) -> str:
    """Write the tables, figures, configs and meta.json.

    ``invocation``: commit, seeds and wall time of this call when it ran stages (None when it ran none).
    ``previous_meta``: meta.json of the invocations whose finished runs this call resumed.
    """
    per_method: Dict[str, List[Dict]] = {}
    for run in runs:
        per_method.setdefault(run.method.name, []).append(run_metrics(run.run_dir))
    rows = build_table(per_method)
    os.makedirs(output, exist_ok=True)
    md = table_markdown(rows)
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(output, "results.csv"), "w") as f:
        f.write(table_csv(rows))
    _figures(runs, output, rows)
    cfg_dir = os.path.join(output, "configs")
    os.makedirs(cfg_dir, exist_ok=True)
    for run in runs:
        if run.seed == runs[0].seed and os.path.isfile(os.path.join(run.run_dir, "config.yaml")):
            shutil.copy(os.path.join(run.run_dir, "config.yaml"), os.path.join(cfg_dir, f"{run.method.name}.yaml"))
            if run.ranking_file and os.path.isfile(run.ranking_file):
                shutil.copy(run.ranking_file, os.path.join(cfg_dir, f"{run.method.name}_ranking.yaml"))
    import torch

    prov = study_provenance(previous_meta, invocation)
    meta = {
        "commit": prov["commit"], "uncommitted_changes": prov["uncommitted_changes"], "commits": prov["commits"],
        "quick": args.quick, "seeds": sorted({r.seed for r in runs}),
        "methods": list(per_method), "command": shlex.join(["python", "tools/compare_methods.py"] + (args.argv or [])),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "wall_seconds": prov["wall_seconds"], "invocations": prov["invocations"],
    }
    meta["runs"] = []
    for run in runs:
        entry = {"method": run.method.name, "seed": run.seed}
        path = os.path.join(run.run_dir, "provenance.json")
        if os.path.isfile(path):
            with open(path) as f:
                stages = json.load(f)["stages"]
            entry["commits"] = sorted({st["commit"] for st in stages.values()})
            entry["stage_seconds"] = {k: st["seconds"] for k, st in stages.items()}
        meta["runs"].append(entry)
    with open(os.path.join(output, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return md


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc", action="store_true", help="the VOC2007 R50-FPN study (GPU machines)")
    parser.add_argument("--quick", action="store_true", help="one seed, short schedule")
    parser.add_argument("--quick-iters", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", help="subset of methods")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and commands, run nothing")
    parser.add_argument("--runs-dir", default="")
    parser.add_argument("--output", default="")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides for every run")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    kind = "voc" if args.voc else "builtin"
    args.runs_dir = args.runs_dir or os.path.join("output", f"compare_{kind}" + ("_quick" if args.quick else ""))
    args.output = args.output or os.path.join("results", f"{kind}_comparison" + ("_quick" if args.quick else ""))
    runs = plan(args)
    if args.dry_run:
        for run in runs:
            state = "done" if all(os.path.isfile(m) for _, m, _ in run.stages(args.voc)) else "todo"
            print(f"run {run.method.name} seed {run.seed} [{state}] -> {run.run_dir}")
            for name, marker, argv_ in run.stages(args.voc):
                print(f"  {name}{' (done)' if os.path.isfile(marker) else ''}: {shlex.join(argv_)}")
        return 0
    commit, dirty = git_state()
    start = time.perf_counter()
    counts = execute(runs, args.voc, commit=(commit, dirty))
    wall = time.perf_counter() - start
    previous_path, previous = os.path.join(args.output, "meta.json"), None
    if os.path.isfile(previous_path) and counts["skipped"]:
        # Only a resumed study inherits the earlier invocations: a fresh one re-ran everything they made.
        with open(previous_path) as f:
            previous = json.load(f)
    invocation = None
    if counts["ran"]:
        invocation = {"commit": commit, "uncommitted_changes": dirty,
                      "seeds_run": sorted(counts["seeds_run"]), "stages_run": counts["ran"], "wall_seconds": round(wall, 1)}
    md = aggregate(runs, args.output, args, invocation, previous)
    print(md)
    print(f"[compare] {counts['ran']} stages run, {counts['skipped']} skipped; results in {args.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
