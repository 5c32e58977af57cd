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
    python tools/compare_methods.py --voc --num-gpus 8 --dry-run   # the VOC2007 R50-FPN study, for GPU machines
    python tools/compare_methods.py --hold-out-mode drop_annotations   # softmax, supcon_out, rince_out_in

An OOD stage whose report was written under an older benchmark protocol counts as not done: a
resumed study re-evaluates the finished runs' checkpoints (no retraining) under the current
protocol. --reevaluate re-runs every OOD stage regardless.

Outputs in --output (default results/builtin_comparison, results/voc_comparison, with a
_drop_annotations suffix in that mode): results.md / results.csv (mean +- std over seeds, and
paired bootstrap tests over test images), roc.png, tsne_panel.png, configs/ and meta.json
(commit, machine, wall time).
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
# The OOD benchmark protocol whose reports count as done (rcdet.evaluation.ood_benchmark.PROTOCOL_VERSION;
# kept here as a number so that --dry-run needs no detectron2 import).
OOD_PROTOCOL_VERSION = 2
HOLD_OUT_MODES = ("drop_images", "drop_annotations")
# The hold-out variant study compares these methods (issue 13).
VARIANT_METHODS = ("softmax", "supcon_out", "rince_out_in")
# Paired bootstrap replicates over the test images for the table's tests.
PAIRED_REPLICATES = 1000


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
    train_args: List[str] = field(default_factory=list)
    ood_args: List[str] = field(default_factory=list)

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
            ("train", self.weights, [py, "tools/train_net.py", "--config-file", cfg] + self.train_args + self.train_opts()),
            ("ood", os.path.join(self.run_dir, "ood", "ood_report.json"),
             [py, "tools/benchmark_ood.py", "--name", self.method.name, "--output", os.path.join(self.run_dir, "ood")]
             + self.ood_args + ["--config-file", cfg] + eval_opts),
            ("analysis", os.path.join(self.run_dir, "analysis", "analysis.json"),
             [py, "tools/analyze_embeddings.py", "--output", os.path.join(self.run_dir, "analysis"), "--config-file", cfg]
             + analysis_opts),
        ]


def plan(args) -> List[Run]:
    seeds = [0] if args.quick else args.seeds
    extra = []
    if args.quick:
        extra = ["SOLVER.MAX_ITER", str(args.quick_iters), "SOLVER.STEPS", "()"]
    mode = getattr(args, "hold_out_mode", "drop_images")
    if mode != "drop_images":
        extra += ["MODEL.RCDET.OOD.HOLD_OUT_MODE", mode]
    extra += list(args.opts)
    methods = args.methods or (list(VARIANT_METHODS) if mode != "drop_images" else None)
    train_args = ["--num-gpus", str(args.num_gpus)] if getattr(args, "num_gpus", None) else []
    ood_args = ["--ood-dataset", args.ood_dataset] if getattr(args, "ood_dataset", None) else []
    runs = []
    for m in methods_for(args.voc):
        if methods and m.name not in methods:
            continue
        for s in seeds:
            runs.append(Run(m, s, os.path.join(args.runs_dir, m.name, f"seed{s}"), extra, train_args, ood_args))
    return runs


def stage_done(name: str, marker: str, reevaluate: bool = False) -> bool:
    """A stage is done when its output exists; an OOD report also needs the current protocol."""
    if not os.path.isfile(marker):
        return False
    if name != "ood":
        return True
    if reevaluate:
        return False
    try:
        with open(marker) as f:
            version = (json.load(f).get("protocol") or {}).get("version", 1)
    except (OSError, ValueError):
        return False  # unreadable: evaluate again
    return version == OOD_PROTOCOL_VERSION


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


def git_state(exclude: Optional[str] = None, repo: str = REPO):
    """
    (commit, whether tracked files have uncommitted changes) of the checkout the study runs from.
    ``exclude``: the study's own output folder, left out of the check, since a resumed study has
    rewritten its committed results there by the time it runs again.
    """
    cmd = ["git", "status", "--porcelain", "--untracked-files=no"]
    if exclude:
        rel = os.path.relpath(os.path.abspath(exclude), repo)
        # Only a folder inside the checkout, and never the checkout itself, which would hide every change.
        if rel != os.curdir and rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            cmd += ["--", ".", f":(exclude){rel}"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(cmd, cwd=repo, capture_output=True, text=True).stdout
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


def execute(runs: List[Run], voc: bool, log=print, commit: Optional[tuple] = None, reevaluate: bool = False) -> Dict[str, int]:
    """Run every stage that is not done (stage_done). ``commit``: (sha, dirty) to record in each run's provenance."""
    done = {"skipped": 0, "ran": 0, "seeds_run": []}
    for run in runs:
        for name, marker, argv in run.stages(voc):
            if stage_done(name, marker, reevaluate):
                log(f"[compare] {run.method.name} seed {run.seed}: {name} already done ({marker})")
                done["skipped"] += 1
                continue
            if name == "train" and run.ranking_file and not os.path.isfile(run.ranking_file):
                write_shuffled_ranking(run, voc)
            if os.path.isfile(marker):
                log(f"[compare] {run.method.name} seed {run.seed}: {name}: re-evaluating under protocol {OOD_PROTOCOL_VERSION}")
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
    open_set = ood.get("open_set") or {}
    out["a_ose"] = open_set.get("a_ose")
    out["wi"] = open_set.get("wilderness_impact")
    image_scores = (ood.get("image_level") or {}).get("scores") or {}
    for s in ("msp",) + EMBEDDING_SCORES:
        e = image_scores.get(s)
        out[f"img_{s}_auroc"] = e["auroc"] if e and e["available"] else None
    out["protocol_version"] = (ood.get("protocol") or {}).get("version", 1)
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
    ("a_ose", "A-OSE", 0), ("wi", "WI", 4),
    ("img_msp_auroc", "image-level MSP AUROC", 3), ("img_best_emb_auroc", "image-level best emb. AUROC", 3),
]
# Paired bootstrap tests of each method's best embedding score (AUROC, object level): against
# SupCon's best embedding score, and against MSP of the same models.
PAIRED = [("vs_supcon", "best emb. − SupCon AUROC"), ("vs_msp", "best emb. − MSP AUROC")]
SUPCON = "supcon_out"


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
            if "best_emb" in key:
                src = key.replace("best_emb", best) if best else None
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


def _paired_cell(test) -> str:
    """'+0.012 [-0.010, +0.034], p 0.28'; '—' for a method compared with itself; n/a when not run."""
    if test == "self":
        return "—"
    if not test or test.get("difference") is None:
        return "n/a"
    text = f"{test['difference']:+.3f}"
    if test.get("ci"):
        text += f" [{test['ci'][0]:+.3f}, {test['ci'][1]:+.3f}], p {test['p_value']:.3f}"
    return text


def table_markdown(rows) -> str:
    head = ["method", "seeds"] + [label for _, label, _ in COLUMNS] + ["best emb. score"] + [label for _, label in PAIRED]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["seeds"])] + [_cell(r[k], d) for k, _, d in COLUMNS] + [r["best_emb_score"]]
        cells += [_paired_cell(r.get(k)) for k, _ in PAIRED]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "seeds"] + [f"{k}_{x}" for k, _, _ in COLUMNS for x in ("mean", "std")] + ["best_emb_score"]
               + [f"{k}_{x}" for k, _ in PAIRED for x in ("difference", "ci_lo", "ci_hi", "p_value")])
    for r in rows:
        vals = []
        for k, _, _ in COLUMNS:
            m, s = r[k]
            vals += ["" if m is None else f"{m:.6g}", "" if s is None else f"{s:.6g}"]
        tests = []
        for k, _ in PAIRED:
            t = r.get(k) if isinstance(r.get(k), dict) else {}
            ci = t.get("ci") or [None, None]
            tests += ["" if v is None else f"{v:.6g}" for v in (t.get("difference"), ci[0], ci[1], t.get("p_value"))]
        w.writerow([r["method"], r["seeds"]] + vals + [r["best_emb_score"]] + tests)
    return buf.getvalue()


def _roc_set(run_dir: str):
    """(image ids, {score: values}, is_id, image index) of a run's object-level ROC set; None if it predates them."""
    path = os.path.join(run_dir, "ood", "ood_scores.npz")
    if not os.path.isfile(path):
        return None
    with np.load(path) as z:
        if "image_index" not in z.files:
            return None
        st = z["status"]
        m = (st == 1) | (st == 0)
        scores = {k: z[k][m] for k in ("msp",) + EMBEDDING_SCORES if k in z.files}
        return tuple(z["image_ids"].tolist()), scores, st[m] == 1, z["image_index"][m]


def attach_paired_tests(rows, run_dirs: Dict[str, List[str]], replicates: int = PAIRED_REPLICATES, seed: int = 0):
    """
    Add ``vs_supcon`` and ``vs_msp`` to each row: paired bootstraps (rcdet.evaluation.bootstrap.
    paired_bootstrap) of the object-level AUROC of the method's best embedding score, mean over its
    seeds, minus SupCon's best embedding score (mean over SupCon's seeds), and minus MSP of the same
    models. Every replicate resamples the test images once for all runs, so the comparison is
    paired by image. It measures the test set's sampling, not the seeds' spread (the ± columns).
    """
    from rcdet.evaluation.bootstrap import paired_bootstrap

    sets = {m: [_roc_set(d) for d in dirs] for m, dirs in run_dirs.items()}
    image_lists = {rs[0] for runs in sets.values() for rs in runs if rs is not None}
    usable = len(image_lists) == 1 and all(rs is not None for runs in sets.values() for rs in runs)
    best = {r["method"]: r["best_emb_score"] for r in rows}

    def side(method, score):
        return [(rs[1][score], rs[2], rs[3]) for rs in sets[method]]

    num_images = len(next(iter(image_lists))) if usable else 0
    for r in rows:
        m, b = r["method"], best[r["method"]]
        if not usable or b == "n/a":
            r["vs_supcon"] = r["vs_msp"] = None
            continue
        r["vs_msp"] = paired_bootstrap(side(m, b), side(m, "msp"), num_images, "auroc", replicates, seed)
        if m == SUPCON:
            r["vs_supcon"] = "self"
        elif best.get(SUPCON, "n/a") != "n/a":
            r["vs_supcon"] = paired_bootstrap(side(m, b), side(SUPCON, best[SUPCON]), num_images, "auroc", replicates, seed)
        else:
            r["vs_supcon"] = None
    return rows


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
    cmap = plt.get_cmap("tab10")
    for i, (name, run) in enumerate(first.items()):
        raw = os.path.join(run.run_dir, "ood", "ood_scores.npz")
        if not os.path.isfile(raw):
            continue
        with np.load(raw) as z:
            st = z["status"]
            m = (st == 1) | (st == 0)  # the object-level ROC set (claimed ID and OOD objects)
            is_id = st[m] == 1
            if not (is_id.any() and (~is_id).any()):
                continue
            # One colour per method; its MSP dotted, its best embedding score solid.
            for score, style in (("msp", ":"), (best.get(name), "-")):
                if score in z.files:
                    fpr, tpr, _ = roc_curve(is_id, z[score][m])
                    ax.plot(fpr, tpr, style, color=cmap(i % 10), label=f"{name} {score} ({roc_auc_score(is_id, z[score][m]):.3f})")
    ax.plot([0, 1], [0, 1], color="0.8", linewidth=0.8)
    ax.set_xlabel("FPR (held-out objects accepted)")
    ax.set_ylabel("TPR (known objects accepted)")
    ax.set_title(f"OOD ROC, seed {runs[0].seed} of each method (dotted: MSP; solid: best embedding score)", fontsize=8)
    if ax.get_legend_handles_labels()[0]:
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
                    ax.scatter(pts[sel, 0], pts[sel, 1], s=4, color=cmap(c % 10), marker=_MARKERS[gnames.index(groups[c]) % len(_MARKERS)],
                               label=f"{cname} [{groups[c]}]")
            ax.set_title(name + ("" if "tsne_points.npz" == os.path.basename(path) else " (box features)"), fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        # One class legend for all panels (every panel draws the same classes in the same styles).
        legend = {}
        for ax in axes[0]:
            for h, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, h)
        if legend:
            fig.legend(list(legend.values()), list(legend.keys()), fontsize=6, markerscale=2, loc="lower center",
                       ncol=min(len(legend), 9), frameon=False, title="class [family]", title_fontsize=6)
        fig.suptitle("t-SNE of GT-box embeddings of the test split (colour: class, marker: family, black: held out)", fontsize=8)
        fig.tight_layout(rect=(0, 0.14 if legend else 0, 1, 1))
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
    dirs: Dict[str, List[str]] = {}
    for run in runs:
        dirs.setdefault(run.method.name, []).append(run.run_dir)
    attach_paired_tests(rows, dirs)
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
        "hold_out_mode": getattr(args, "hold_out_mode", "drop_images"),
        "ood_protocol_versions": sorted({m["protocol_version"] for results in per_method.values() for m in results}),
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
    parser.add_argument("--hold-out-mode", choices=HOLD_OUT_MODES, default="drop_images",
                        help="drop_annotations: the variant study (softmax, supcon_out, rince_out_in unless --methods)")
    parser.add_argument("--num-gpus", type=int, default=None, help="passed to tools/train_net.py (e.g. with --voc)")
    parser.add_argument("--ood-dataset", default=None,
                        help="passed to tools/benchmark_ood.py: the image-level protocol's OOD images (e.g. a COCO subset for --voc)")
    parser.add_argument("--reevaluate", action="store_true", help="re-run every OOD stage from the finished checkpoints")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and commands, run nothing")
    parser.add_argument("--runs-dir", default="")
    parser.add_argument("--output", default="")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides for every run")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    kind = "voc" if args.voc else "builtin"
    suffix = ("_quick" if args.quick else "") + ("" if args.hold_out_mode == "drop_images" else f"_{args.hold_out_mode}")
    args.runs_dir = args.runs_dir or os.path.join("output", f"compare_{kind}{suffix}")
    args.output = args.output or os.path.join("results", f"{kind}_comparison{suffix}")
    runs = plan(args)
    if args.dry_run:
        for run in runs:
            stages = run.stages(args.voc)
            state = "done" if all(stage_done(n, m, args.reevaluate) for n, m, _ in stages) else "todo"
            print(f"run {run.method.name} seed {run.seed} [{state}] -> {run.run_dir}")
            for name, marker, argv_ in stages:
                note = " (done)" if stage_done(name, marker, args.reevaluate) else (
                    " (re-evaluate)" if os.path.isfile(marker) else "")
                print(f"  {name}{note}: {shlex.join(argv_)}")
        return 0
    commit, dirty = git_state(exclude=args.output)
    start = time.perf_counter()
    counts = execute(runs, args.voc, commit=(commit, dirty), reevaluate=args.reevaluate)
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
