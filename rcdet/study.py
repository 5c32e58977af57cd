"""
The comparison study: its methods, its provenance, and its results (per-run numbers, mean ± sample
std over seeds, paired bootstrap tests over test images, the table in markdown and CSV, and the
figures).

tools/compare_methods.py plans the runs of each method and seed and runs their stages; every run
folder then holds the OOD benchmark's report in ood/ (tools/benchmark_ood.py) and the embedding
analysis in analysis/ (tools/analyze_embeddings.py). This module turns the finished runs into the
study's results.md, results.csv, roc.png and tsne_panel.png, and records which commits and how
much time made them.
"""

import io
import json
import logging
import os
import platform
import subprocess
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .evaluation.bootstrap import paired_bootstrap, paired_bootstrap_family_accuracy
from .evaluation.plots import roc_figure as roc_panel
from .evaluation.plots import save_figure, tsne_panel_figure
from .evaluation.report import (
    ALL_SCORES,
    ReportError,
    csv_table,
    load_report,
    load_roc_set,
    markdown_table,
    protocol_of,
    report_metrics,
)
from .evaluation.scores import EMBEDDING_SCORES
from .file_io import atomic_write, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "Method",
    "Contrast",
    "Study",
    "MAIN_CONTRASTS",
    "EXPOSURE_CONTRASTS",
    "STUDIES",
    "VARIANT_METHODS",
    "VOC_EXPOSURE_OPTS",
    "methods_for",
    "exposure_methods_for",
    "study_for",
    "STUDY_VERSION",
    "all_method_names",
    "true_ranking_file",
    "class_names",
    "write_shuffled_ranking",
    "git_state",
    "record_stage",
    "run_provenance",
    "study_provenance",
    "copy_configs",
    "machine_description",
    "study_meta",
    "TABLES",
    "COLUMNS",
    "PAIRED",
    "family_means",
    "load_family_set",
    "run_metrics",
    "mean_std",
    "build_table",
    "PairedRuns",
    "attach_paired_tests",
    "contrast_tests",
    "table_markdown",
    "table_csv",
    "contrasts_csv",
    "roc_figure",
    "tsne_panel",
    "write_results",
    "StudyRun",
    "write_study",
    "load_meta",
    "check_method_configs",
]

# ---------------------------------------------------------------- the methods


@dataclass
class Method:
    """
    One method of the study: its config (relative to the repository), its overrides, and whether
    it trains on a shuffled copy of the true ranking (the control).
    """

    name: str
    config: str
    opts: List[str] = field(default_factory=list)
    shuffled_ranking: bool = False


# The paired tests' partner rows of a study whose methods carry the roles' own names; the
# control, RINCE out-in with a shuffled ranking, is what tells the ranking's effect apart.
DEFAULT_PARTNERS = {
    "supcon": "supcon",
    "softmax": "softmax",
    "vos": "vos",
    "control": "rince_out_in_shuffled",
}


@dataclass(frozen=True)
class Contrast:
    """
    A study's own question that the tests against its partner rows do not ask: method ``a``
    minus method ``b``, paired by test image and seed, on ``measure``: an OOD score's AUROC
    ("msp", "energy", or "best_emb", each side's best embedding score) or "family", the family
    accuracy of each side's placement.
    """

    a: str
    b: str
    measure: str
    question: str


@dataclass
class Study:
    """
    One study: its methods, its hold-out mode, the partner methods of its paired tests (the
    names of its SupCon, softmax, VOS and shuffled-control rows; None where it has no such row)
    and its contrasts.
    """

    name: str
    methods: List[Method]
    hold_out_mode: str = "drop_images"
    partners: Dict[str, Optional[str]] = field(default_factory=lambda: dict(DEFAULT_PARTNERS))
    contrasts: List[Contrast] = field(default_factory=list)


# What VOS adds on top of RINCE out-in, RINCE's two variants against each other, and what the
# true ranking adds to family accuracy over the shuffled one (the paired tests' control column
# holds the OOD score only).
MAIN_CONTRASTS = [
    Contrast("rince_out_in_vos", "rince_out_in", "best_emb", "what VOS adds to RINCE out-in"),
    Contrast("rince_out_in_vos", "rince_out_in", "msp", "what VOS adds to RINCE out-in"),
    Contrast("rince_out_in_vos", "rince_out_in", "energy", "what VOS adds to RINCE out-in"),
    Contrast("rince_in", "rince_out_in", "best_emb", "RINCE-in against RINCE out-in"),
    Contrast(
        "rince_in", "rince_out_in_shuffled", "family", "the true ranking against the shuffled"
    ),
    Contrast(
        "rince_out_in", "rince_out_in_shuffled", "family", "the true ranking against the shuffled"
    ),
]
# What exposure adds: the f runs against RINCE on the same images with the exposed objects as
# background (rince_out_in_oe), and that one against RINCE that never saw them.
EXPOSURE_CONTRASTS = [
    Contrast(a, b, measure, question)
    for a, b, question in (
        ("rince_out_in_f_fixed", "rince_out_in_oe", "what a fixed f adds on the same images"),
        ("rince_out_in_f_learned", "rince_out_in_oe", "what a learned f adds on the same images"),
        ("rince_out_in_oe", "rince_out_in_no_exposure", "what the exposed images add without f"),
    )
    for measure in ("best_emb", "msp", "family")
]


STUDIES = ("main", "exposure")
# The tables' version: the studies write to results/<kind>_comparison_v3[_<study>]; version 2's
# tables (with the one-rank RINCE-out as its "SupCon") stay in results/<kind>_comparison[_...].
STUDY_VERSION = 3
# The drop_annotations variant of the main study compares these methods.
VARIANT_METHODS = ("softmax", "supcon", "vos", "rince_out_in")
# The exposure split on VOC (the built-in one is in its configs, docs/unknown_objects.md): chair
# and motorbike stay the test unknowns, and cow and bus are exposed, so that every family keeps
# a known member (chair: sofa; motorbike: bicycle; cow: sheep and horse; bus: train and car).
VOC_EXPOSURE_OPTS = [
    "MODEL.ROI_HEADS.NUM_CLASSES",
    "16",
    "MODEL.RCDET.OOD.EXPOSED_CLASSES",
    "['cow', 'bus']",
]


def methods_for(voc: bool) -> List[Method]:
    """
    The main study's methods on VOC or the built-in dataset: softmax (branch off), supcon
    (Khosla et al.), rince_out_r1 (RINCE-out with one rank), rince_in and rince_out_in with the
    true ranking, rince_out_in with a shuffled one (the control), vos (VOS on the softmax head)
    and rince_out_in_vos (both).
    """
    p = "voc" if voc else "shapes"
    return [
        Method("softmax", f"configs/{p}_softmax_ood.yaml"),
        Method("supcon", f"configs/{p}_supcon_ood.yaml"),
        Method(
            "rince_out_r1", f"configs/{p}_supcon_ood.yaml", ["MODEL.RCDET.LOSS", "rince_out_r1"]
        ),
        Method("rince_in", f"configs/{p}_rince_ood.yaml", ["MODEL.RCDET.LOSS", "rince_in"]),
        Method("rince_out_in", f"configs/{p}_rince_ood.yaml"),
        Method("rince_out_in_shuffled", f"configs/{p}_rince_ood.yaml", shuffled_ranking=True),
        Method("vos", f"configs/{p}_vos_ood.yaml"),
        Method("rince_out_in_vos", f"configs/{p}_rince_vos_ood.yaml"),
    ]


def exposure_methods_for(voc: bool) -> List[Method]:
    """
    The exposure study's methods (the reference report's experiment, docs/unknown_objects.md):
    RINCE out-in with f fixed and learned, RINCE out-in with the exposed classes removed, SupCon
    with a fixed f, softmax with the exposed objects as background (outlier exposure), and RINCE
    out-in with them as background: it trains on the same images as the f runs, so it tells
    what f adds beyond the images that the removed baseline lacks.
    """
    if not voc:
        c = "configs/shapes_{}.yaml".format
        return [
            Method("softmax_oe", c("softmax_exposure_ood")),
            Method("supcon_f_fixed", c("supcon_exposure_ood")),
            Method("rince_out_in_no_exposure", c("rince_expsplit_ood")),
            Method("rince_out_in_f_fixed", c("rince_exposure_ood")),
            Method("rince_out_in_f_learned", c("rince_exposure_learned_ood")),
            Method(
                "rince_out_in_oe",
                c("rince_exposure_ood"),
                ["MODEL.RCDET.OOD.REFERENCE", "background"],
            ),
        ]

    def reference(kind):
        return VOC_EXPOSURE_OPTS + ["MODEL.RCDET.OOD.REFERENCE", kind]

    return [
        Method("softmax_oe", "configs/voc_softmax_ood.yaml", reference("background")),
        Method("supcon_f_fixed", "configs/voc_supcon_ood.yaml", reference("fixed")),
        Method("rince_out_in_no_exposure", "configs/voc_rince_ood.yaml", reference("removed")),
        Method("rince_out_in_f_fixed", "configs/voc_rince_ood.yaml", reference("fixed")),
        Method("rince_out_in_f_learned", "configs/voc_rince_ood.yaml", reference("learned")),
        Method("rince_out_in_oe", "configs/voc_rince_ood.yaml", reference("background")),
    ]


def study_for(
    name: str, voc: bool, hold_out_mode: str = "drop_images", only: Sequence[str] = ()
) -> Study:
    """
    The study ``name`` (one of STUDIES) on VOC or the built-in dataset. The main study in
    ``drop_annotations`` mode is its variant, with the VARIANT_METHODS only. ``only``: a subset
    of its method names (ValueError names one that is not its).
    """
    if name == "exposure":
        partners = {
            "supcon": "supcon_f_fixed",
            "softmax": "softmax_oe",
            "vos": None,
            "control": None,
        }
        selected = Study(
            name, exposure_methods_for(voc), hold_out_mode, partners, list(EXPOSURE_CONTRASTS)
        )
    elif name == "main":
        methods = methods_for(voc)
        if hold_out_mode != "drop_images":
            methods = [m for m in methods if m.name in VARIANT_METHODS]
        selected = Study(name, methods, hold_out_mode, contrasts=list(MAIN_CONTRASTS))
    else:
        raise ValueError(f"Unknown study {name!r}: one of {', '.join(STUDIES)}.")
    names = [m.name for m in selected.methods]
    unknown = [m for m in only if m not in names]
    if unknown:
        raise ValueError(
            f"{' '.join(unknown)}: not a method of the {name} study (hold-out mode"
            f" {hold_out_mode}); its methods are {', '.join(names)}."
        )
    if only:
        selected.methods = [m for m in selected.methods if m.name in only]
    names = {m.name for m in selected.methods}
    selected.contrasts = [c for c in selected.contrasts if {c.a, c.b} <= names]
    return selected


def all_method_names() -> List[str]:
    """Every study's method names, each once, in study order."""
    names = [m.name for m in methods_for(False) + exposure_methods_for(False)]
    return list(dict.fromkeys(names))


def true_ranking_file(voc: bool) -> str:
    """The ranking the study's RINCE methods train with (relative to the repository)."""
    return "configs/rankings/voc_human.yaml" if voc else "configs/rankings/shapes_families.yaml"


def class_names(voc: bool) -> List[str]:
    """The study's classes: VOC's 20 or the built-in dataset's."""
    if voc:
        from detectron2.data.datasets.pascal_voc import CLASS_NAMES
    else:
        from .data.shapes import CLASS_NAMES
    return list(CLASS_NAMES)


def write_shuffled_ranking(path: str, true_file: str, classes: Sequence[str], seed: int):
    """
    The control ranking, written atomically to ``path``: the true one (``true_file``) with its
    structure moved onto the classes permuted with ``seed``.
    """
    from .ranking import load_ranking, ranking_to_yaml

    true = load_ranking(true_file, list(classes))
    text = ranking_to_yaml(
        true.permuted(seed=seed),
        f"Shuffled control for {true.source} (seed {seed}): deliberately wrong.",
    )
    atomic_write(path, text.encode())


# ---------------------------------------------------------------- provenance


def git_state(repo: str, exclude: Optional[str] = None) -> Tuple[str, bool]:
    """
    (commit, whether tracked files have uncommitted changes) of the checkout ``repo``; ("unknown",
    False) without git. ``exclude``: the study's own output folder, left out of the check, since a
    resumed study has rewritten its committed results there by the time it runs again.
    """
    cmd = ["git", "status", "--porcelain", "--untracked-files=no"]
    if exclude:
        rel = os.path.relpath(os.path.abspath(exclude), repo)
        # Only a folder inside the checkout, never the checkout itself: that hides every change.
        if rel != os.curdir and rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            cmd += ["--", ".", f":(exclude){rel}"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(cmd, cwd=repo, capture_output=True, text=True).stdout
    except OSError:
        return "unknown", False
    return commit or "unknown", bool(dirty.strip())


def record_stage(run_dir: str, stage: str, seconds: float, commit: str, dirty: bool):
    """
    Add one finished stage (its seconds, commit, uncommitted changes and machine) to the run's
    provenance.json: each run keeps its own, since a resumed study mixes invocations (and
    machines: a seed fixes a training on one kind of CPU only).
    """
    info = _read_provenance(run_dir)
    info["stages"][stage] = {
        "seconds": round(seconds, 1),
        "commit": commit,
        "uncommitted_changes": dirty,
        "machine": machine_description(),
    }
    write_json_atomic(os.path.join(run_dir, "provenance.json"), info)


def _read_provenance(run_dir: str) -> Dict:
    path = os.path.join(run_dir, "provenance.json")
    if not os.path.isfile(path):
        return {"stages": {}}
    try:
        with open(path) as f:
            info = json.load(f)
        stages = info.get("stages")
        if not isinstance(stages, dict) or not all(
            isinstance(st, dict) and {"commit", "seconds"} <= set(st) for st in stages.values()
        ):
            raise ValueError("no 'stages' object of {commit, seconds} per stage")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise ReportError(
            f"{path}: not a run's provenance.json ({e}); delete it, and that run is trained and"
            " evaluated again."
        ) from None
    return info


def run_provenance(run_dir: str) -> Dict:
    """
    The commits, stage seconds and machines of one run (record_stage; a stage recorded before
    machines were has none); {} for a run without them.
    """
    stages = _read_provenance(run_dir)["stages"]
    if not stages:
        return {}
    return {
        "commits": sorted({st["commit"] for st in stages.values()}),
        "stage_seconds": {k: st["seconds"] for k, st in stages.items()},
        "machines": sorted({st["machine"] for st in stages.values() if st.get("machine")}),
    }


def study_provenance(
    previous_meta: Optional[dict],
    invocation: Optional[dict],
    current: Optional[Tuple[str, bool]] = None,
) -> dict:
    """
    Commits and wall time of the study: the invocations it resumed (``previous_meta``, the
    meta.json they wrote) and this one (``invocation``) if it ran stages. ``current``: (commit,
    uncommitted changes) of the checkout that writes the tables, the study's commit when no
    invocation is recorded (--report over runs whose invocations were cut off).
    """
    invocations = []
    if previous_meta:
        # meta.json from before invocations were recorded stands for one invocation; one
        # written by --report alone records none.
        invocations = previous_meta.get("invocations")
        if invocations is None:
            invocations = [
                {
                    "commit": previous_meta.get("commit", "unknown"),
                    "uncommitted_changes": previous_meta.get("uncommitted_changes", False),
                    "seeds_run": previous_meta.get("seeds"),
                    "wall_seconds": previous_meta.get("wall_seconds"),
                }
            ]
    invocations = invocations + ([invocation] if invocation else [])
    commit, dirty = current or ("unknown", False)
    latest = invocations[-1] if invocations else {"commit": commit, "uncommitted_changes": dirty}
    # Summed over the invocations that contributed runs. One interrupted before it wrote meta.json
    # is not counted; the stage times of its runs are still in their provenance.json.
    walls = [i.get("wall_seconds") for i in invocations]
    return {
        "commit": latest["commit"],
        "uncommitted_changes": latest["uncommitted_changes"],
        "commits": sorted({i["commit"] for i in invocations}),
        "invocations": invocations,
        "wall_seconds": round(sum(walls), 1) if walls and None not in walls else None,
    }


def copy_configs(folder: str, runs: Dict[str, Tuple[str, Optional[str]]]):
    """
    Each method's config.yaml (and its ranking file, for the shuffled control) into ``folder``
    as ``<method>.yaml`` and ``<method>_ranking.yaml``; ``runs``: ``{method: (run folder, ranking
    file or None)}`` of one seed. Runs not trained yet are left out.
    """
    os.makedirs(folder, exist_ok=True)
    for method, (run_dir, ranking_file) in runs.items():
        config = os.path.join(run_dir, "config.yaml")
        if os.path.isfile(config):
            atomic_write(os.path.join(folder, method + ".yaml"), _read_bytes(config))
            if ranking_file and os.path.isfile(ranking_file):
                atomic_write(
                    os.path.join(folder, method + "_ranking.yaml"), _read_bytes(ranking_file)
                )


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# A finished run's record: everything the tables, figures and meta.json read from the run, without
# its weights, small enough to keep next to the tables (about 0.2 MB). --report over a folder of
# records writes the tables again on a machine that no longer has the checkpoints.
# provenance.json comes last: a record with it is complete.
RECORD_FILES = (
    "config.yaml",
    "shuffled_ranking.yaml",
    os.path.join("ood", "ood_report.json"),
    os.path.join("ood", "ood_scores.npz"),
    os.path.join("analysis", "analysis.json"),
    os.path.join("analysis", "tsne_points.npz"),
    os.path.join("analysis", "box_features_tsne_points.npz"),
    "provenance.json",
)


# The per-detection arrays of ood_scores.npz that the tables read (load_roc_set,
# load_family_set); the boxes, matches and class columns are left out of a record.
RECORD_DETECTION_ARRAYS = ("status", "image_index", "image_ids", "ood_class") + ALL_SCORES


def _record_npz(path: str) -> bytes:
    """An .npz of a record, compressed: for ood_scores.npz only RECORD_DETECTION_ARRAYS and the
    ``placed_*`` placements, for the t-SNE points every array."""
    with np.load(path) as z:
        names = z.files
        if os.path.basename(path) == "ood_scores.npz":
            names = [n for n in names if n in RECORD_DETECTION_ARRAYS or n.startswith("placed_")]
        arrays = {n: z[n] for n in names}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def save_record(run_dir: str, record_dir: str) -> List[str]:
    """
    Copy the RECORD_FILES the run has into ``record_dir`` (same layout, each atomically; the .npz
    files compressed, per-detection arrays only those the tables read: _record_npz), and remove
    the record files it no longer has (of an earlier training of the same run). Every file is
    read before anything in the record changes, so an unreadable one (ReportError) leaves the
    record as it was. Returns the copied files, relative to the folders.
    """
    if os.path.isdir(record_dir) and os.path.samefile(run_dir, record_dir):
        return []
    contents = {}
    for name in RECORD_FILES:
        source = os.path.join(run_dir, name)
        if not os.path.isfile(source):
            continue
        try:
            contents[name] = _record_npz(source) if name.endswith(".npz") else _read_bytes(source)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ReportError(
                f"{source}: cannot be read for the run's record ({e}); evaluate the run again"
                " (compare_methods.py --reevaluate) or delete the run folder."
            ) from None
    stale = os.path.join(record_dir, "provenance.json")
    if os.path.isfile(stale):
        os.remove(stale)  # until the new record is complete
    for name in RECORD_FILES:
        target = os.path.join(record_dir, name)
        if name in contents:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            atomic_write(target, contents[name])
        elif os.path.isfile(target):
            os.remove(target)
    return list(contents)


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else platform.processor(); '' if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_description() -> str:
    """
    The machine the study runs on: architecture, CPU model, cores, torch version, threads and the
    CPU kernels torch picked. A training's seed fixes its result on one kind of CPU, not
    across them (results/builtin_comparison_v3/README.md), so a reader needs to know which it was.
    """
    import torch

    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    cpu = cpu_model()
    return (
        f"{platform.machine()}{f' {cpu}' if cpu else ''}, {os.cpu_count()} cores, torch"
        f" {torch.__version__}, {torch.get_num_threads()} threads, {capability} kernels"
    )


def study_meta(
    runs: Sequence[Tuple[str, int, str]],
    per_method: Dict[str, List[Dict]],
    provenance: dict,
    quick: bool,
    hold_out_mode: str,
    command: str,
) -> dict:
    """
    The study's meta.json: its ``provenance`` (study_provenance), how it was run, the seeds,
    methods and OOD protocol versions of its ``(method, seed, run folder)`` runs and their
    ``per_method`` numbers (write_results), the machine, and each run's own provenance.
    ``commits`` are the invocations' and the runs' commits ("unknown", without git, only when
    there is no other).
    """
    runs_provenance = [
        {"method": method, "seed": seed, **run_provenance(run_dir)}
        for method, seed, run_dir in runs
    ]
    # An invocation cut off before it wrote meta.json still named its commits in its runs.
    commits = set(provenance["commits"]) | {
        c for r in runs_provenance for c in r.get("commits", ())
    }
    return {
        "commit": provenance["commit"],
        "uncommitted_changes": provenance["uncommitted_changes"],
        "commits": sorted(commits - {"unknown"}) or sorted(commits),
        "quick": quick,
        "seeds": sorted({seed for _, seed, _ in runs}),
        "hold_out_mode": hold_out_mode,
        "ood_protocol_versions": sorted(
            {m["protocol_version"] for results in per_method.values() for m in results}
        ),
        "methods": list(per_method),
        "command": command,
        "machine": machine_description(),
        "wall_seconds": provenance["wall_seconds"],
        # Every run's last time of each of its stages, whichever invocation ran it (a stage run
        # again, e.g. re-evaluated, counts once; a cut-off one not at all).
        "stage_seconds_total": round(
            sum(sum(r.get("stage_seconds", {}).values()) for r in runs_provenance), 1
        ),
        "invocations": provenance["invocations"],
        "runs": runs_provenance,
    }


# ---------------------------------------------------------------- results

# Paired bootstrap replicates over the test images for the table's tests.
PAIRED_REPLICATES = 1000
# The study's tables: (title, [(key, label, digits)]) of mean ± std columns. "best_emb" stands
# for the method's best embedding score; outlier fractions are shown in percent; family_* are
# the mean over held-out classes of the family accuracy (rcdet.evaluation.placement) by
# prototype ("emb.") and by argmax class, and its chance rate.
TABLES = [
    (
        "Detection and OOD detection (object level unless marked image-level)",
        [
            ("AP", "AP", 1),
            ("AP50", "AP50", 1),
            ("AP75", "AP75", 1),
            ("msp_auroc", "MSP AUROC", 3),
            ("msp_fpr95", "MSP FPR95", 3),
            ("energy_auroc", "energy AUROC", 3),
            ("best_emb_auroc", "best emb. AUROC", 3),
            ("best_emb_fpr95", "best emb. FPR95", 3),
            ("sibling_margin_auroc", "sibling margin AUROC", 3),
            ("family_energy_auroc", "family energy AUROC", 3),
            ("reference_auroc", "reference AUROC", 3),
            ("a_ose", "A-OSE", 0),
            ("wi", "WI", 4),
            ("img_msp_auroc", "image-level MSP AUROC", 3),
            ("img_best_emb_auroc", "image-level best emb. AUROC", 3),
        ],
    ),
    (
        "Where the unknown objects land, and the embedding",
        [
            ("family_emb", "family acc. emb.", 3),
            ("family_argmax", "family acc. argmax", 3),
            ("family_chance", "family chance", 3),
            ("outliers_class", "outliers class %", 1),
            ("outliers_group", "outliers group %", 1),
            ("spearman", "Spearman", 3),
        ],
    ),
]
COLUMNS = [column for _, columns in TABLES for column in columns]
# Paired bootstrap tests over the test images, seed by seed (key, label, partner role): the best
# embedding score's AUROC against the study's SupCon row's best embedding score, VOS's energy
# score, and MSP of the same models; the family accuracy (by embedding where the method has a
# projection, else by argmax) against SupCon's and softmax's.
PAIRED = [
    ("vs_supcon", "best emb. − SupCon best emb. AUROC", "supcon"),
    ("vs_vos", "best emb. − VOS energy AUROC", "vos"),
    ("vs_msp", "best emb. − MSP AUROC", None),
    ("vs_control", "best emb. − shuffled control best emb. AUROC", "control"),
    ("family_vs_supcon", "family acc. − SupCon", "supcon"),
    ("family_vs_softmax", "family acc. − softmax", "softmax"),
]
# The partner's score of the AUROC tests: its best embedding score, or VOS's own score.
PARTNER_SCORE = {"supcon": "best_emb", "vos": "energy", "control": "best_emb"}


def family_means(placement: Optional[Dict]) -> Dict[str, Optional[float]]:
    """
    The mean over held-out classes of the report's family accuracy by prototype (``family_emb``)
    and by argmax (``family_argmax``), each over the classes where it is defined, and the mean
    chance rate over the classes with a defined argmax accuracy (``family_chance``).
    """
    out = {"family_emb": None, "family_argmax": None, "family_chance": None}
    classes = (placement or {}).get("classes") or {}
    for key, method in (("family_emb", "prototype"), ("family_argmax", "argmax")):
        values = [c["family_accuracy"][method] for c in classes.values()]
        values = [v for v in values if v is not None]
        out[key] = float(np.mean(values)) if values else None
    chance = [c["chance"] for c in classes.values() if c["family_accuracy"]["argmax"] is not None]
    out["family_chance"] = float(np.mean(chance)) if chance else None
    return out


def run_metrics(run_dir: str) -> Dict[str, Optional[float]]:
    """The numbers one run contributes to the table: its OOD report's and its analysis's."""
    report = load_report(os.path.join(run_dir, "ood"))
    with open(os.path.join(run_dir, "analysis", "analysis.json")) as f:
        spaces = json.load(f)["spaces"]
    out = report_metrics(report)
    out.update(family_means(report.placement))
    out["protocol_version"] = protocol_of(report)["version"]
    space = spaces.get("projection") or spaces.get("box_features")
    out["space"] = "projection" if "projection" in spaces else "box_features"
    out["outliers_class"] = space["outliers"]["class"]["fraction"]
    out["outliers_group"] = space["outliers"].get("group_level1", {}).get("fraction")
    fidelity = space.get("ranking_fidelity")
    out["spearman"] = fidelity["spearman"] if fidelity else None
    return out


def mean_std(values: List[Optional[float]]):
    """Mean and sample standard deviation (ddof = 1) of the defined values; std None for one."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def build_table(per_method: Dict[str, List[Dict]]) -> List[Dict]:
    """
    Rows of (mean, std) per COLUMNS key, one per method (``{method: run_metrics of its seeds}``).
    The best embedding score is the one with the highest mean AUROC. ``placement`` is the
    placement the family tests compare: prototype where the method has a projection, else argmax.
    """
    rows = []
    for method, results in per_method.items():
        space = results[0].get("space", "")
        row = {"method": method, "seeds": len(results), "space": space}
        row["placement"] = "prototype" if space == "projection" else "argmax"
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


def load_family_set(run_dir: str, placement: str) -> Optional[Tuple[tuple, Tuple[str, ...]]]:
    """
    ``((held_out_labels, in_family, image_index), image_ids)`` of a run's claimed held-out objects
    whose family is defined, placed by ``placement`` (ood/ood_scores.npz's ``placed_<placement>``,
    the families from ood/ood_report.json); None for a run without them.
    """
    path = os.path.join(run_dir, "ood", "ood_scores.npz")
    if not os.path.isfile(path):
        return None
    with np.load(path) as z:
        if f"placed_{placement}" not in z.files:
            if "placed_argmax" not in z.files:
                logger.warning(
                    f"{path} holds no placed_* arrays (evaluated by an older rcdet): the family"
                    " accuracy tests of this run are left out; run the study again with"
                    " --reevaluate to fill them."
                )
            return None
        placed, labels = z[f"placed_{placement}"], z["ood_class"]
        groups, ids = z["image_index"], tuple(z["image_ids"].tolist())
    report = load_report(os.path.join(run_dir, "ood"))
    classes = (report.placement or {}).get("classes")
    if not classes:
        return None
    known = report.known_classes
    family = [set(classes[h]["family"] or ()) for h in report.held_out_classes]
    keep = np.flatnonzero(placed >= 0)
    keep = keep[[bool(family[labels[i]]) for i in keep]]
    hits = np.array([known[placed[i]] in family[labels[i]] for i in keep], dtype=bool)
    return (labels[keep], hits, groups[keep]), ids


def _only_classes(family_set: tuple, classes) -> tuple:
    keep = np.isin(family_set[0], classes)
    return tuple(a[keep] for a in family_set)


class PairedRuns:
    """
    The finished runs' ROC sets and family sets, for paired bootstraps over the test images
    (rcdet.evaluation.bootstrap), each side the mean over the seeds both methods ran, run paired
    with run of the same seed. ``rows``: build_table's (each method's best embedding score and
    placement); ``run_dirs``: ``{method: {seed: run folder}}``. Every replicate resamples the
    test images once for all runs, so each comparison is paired by image. It measures the test
    set's sampling, not the seeds' spread (the ± columns). ``usable`` is False when some run has
    no per-detection scores or the runs were evaluated on other images: then nothing is paired.
    """

    def __init__(
        self,
        rows: List[Dict],
        run_dirs: Dict[str, Dict[int, str]],
        replicates: int = PAIRED_REPLICATES,
        seed: int = 0,
    ):
        self.by_method = {r["method"]: r for r in rows}
        self.replicates, self.seed = replicates, seed
        self.rocs = {
            m: {s: load_roc_set(os.path.join(d, "ood")) for s, d in seeds.items()}
            for m, seeds in run_dirs.items()
        }
        self.families = {
            m: {s: load_family_set(d, self.by_method[m]["placement"]) for s, d in seeds.items()}
            for m, seeds in run_dirs.items()
            if m in self.by_method
        }
        every = [rs for seeds in self.rocs.values() for rs in seeds.values()]
        indexed = [rs for rs in every if rs is not None]
        self.usable = len(indexed) == len(every) and len({rs.image_ids for rs in indexed}) == 1
        self.num_images = len(indexed[0].image_ids) if self.usable else 0
        self.image_ids = indexed[0].image_ids if self.usable else None

    def score_of(self, method: str, what: str) -> str:
        """The method's best embedding score for "best_emb", else ``what`` itself."""
        return self.by_method[method]["best_emb_score"] if what == "best_emb" else what

    def auroc(self, a: str, a_score: str, b: str, b_score: str) -> Optional[Dict]:
        """AUROC of a's ``a_score`` minus b's ``b_score``; None where a side lacks the score."""
        seeds = sorted(set(self.rocs.get(a, ())) & set(self.rocs.get(b, ())))
        if not self.usable or not seeds or "n/a" in (a_score, b_score):
            return None
        ra, rb = self.rocs[a], self.rocs[b]
        if any(a_score not in ra[s].scores or b_score not in rb[s].scores for s in seeds):
            return None
        runs_a = [(ra[s].scores[a_score], ra[s].is_id, ra[s].image_index) for s in seeds]
        runs_b = [(rb[s].scores[b_score], rb[s].is_id, rb[s].image_index) for s in seeds]
        test = paired_bootstrap(
            runs_a, runs_b, self.num_images, "auroc", self.replicates, self.seed
        )
        return {**test, "seeds": seeds}

    def family(self, a: str, b: str) -> Optional[Dict]:
        """
        Family accuracy of a's placement minus b's, each seed over the held-out classes both of
        its runs claimed objects of; None where a side has no placements.
        """
        seeds = sorted(set(self.families.get(a, ())) & set(self.families.get(b, ())))
        pairs = [(self.families[a][s], self.families[b][s]) for s in seeds]
        if not self.usable or not seeds or any(x is None or y is None for x, y in pairs):
            return None
        if any(x[1] != self.image_ids or y[1] != self.image_ids for x, y in pairs):
            return None
        runs_a, runs_b = [], []
        for (x, _), (y, _) in pairs:
            shared = sorted(set(x[0].tolist()) & set(y[0].tolist()))
            runs_a.append(_only_classes(x, shared))
            runs_b.append(_only_classes(y, shared))
        result = paired_bootstrap_family_accuracy(
            runs_a, runs_b, self.num_images, replicates=self.replicates, seed=self.seed
        )
        return {**result, "seeds": seeds}


def attach_paired_tests(
    rows: List[Dict], paired: PairedRuns, partners: Optional[Dict[str, Optional[str]]] = None
) -> List[Dict]:
    """
    Add the PAIRED tests (of ``paired``, the runs of ``rows``) to each row. ``partners`` names
    the study's ``supcon``, ``softmax``, ``vos`` and ``control`` rows (default:
    DEFAULT_PARTNERS). The family accuracy tests compare each row's ``placement`` (build_table)
    with the partner's. A test is "self" for a partner against itself, and None where a side
    has no such score or the runs cannot be paired.
    """
    partners = partners or DEFAULT_PARTNERS
    for r in rows:
        m = r["method"]
        for key, _, role in PAIRED:
            partner = partners.get(role) if role else m
            if not paired.usable or (role and partner not in paired.by_method):
                r[key] = None
            elif role and partner == m:
                r[key] = "self"
            elif key.startswith("family"):
                r[key] = paired.family(m, partner)
            else:
                partner_score = paired.score_of(partner, PARTNER_SCORE.get(role, "msp"))
                r[key] = paired.auroc(m, paired.score_of(m, "best_emb"), partner, partner_score)
    return rows


def contrast_tests(paired: PairedRuns, contrasts: Sequence[Contrast]) -> List[Dict]:
    """
    The study's contrasts (Contrast), each a paired test of ``paired``: its ``question``, ``a``,
    ``b`` and ``measure``, the scores compared (``a_score``, ``b_score``: the best embedding
    scores for "best_emb", "family" for family accuracy) and the test (None where a side did not
    run or lacks the score).
    """
    out = []
    for c in contrasts:
        if c.measure == "family":
            scores = ("family", "family")
            test = paired.family(c.a, c.b)
        elif c.a in paired.by_method and c.b in paired.by_method:
            scores = (paired.score_of(c.a, c.measure), paired.score_of(c.b, c.measure))
            test = paired.auroc(c.a, scores[0], c.b, scores[1])
        else:
            scores, test = (c.measure, c.measure), None
        out.append(
            {
                "measure": c.measure,
                "a": c.a,
                "b": c.b,
                "question": c.question,
                "a_score": scores[0],
                "b_score": scores[1],
                "test": test,
            }
        )
    return out


def _cell(ms, digits):
    m, s = ms
    if m is None:
        return "n/a"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def _paired_cell(test) -> str:
    """
    '+0.012 [-0.010, +0.034], p 0.280' ('p < 0.002' when no replicate of 1000 crossed zero), and
    over several seeds each seed's difference: '…, p 0.280; seeds +0.030 -0.006'; '—' for a
    method against itself; n/a when not run.
    """
    if test == "self":
        return "—"
    if not test or test.get("difference") is None:
        return "n/a"
    text = f"{test['difference']:+.3f}"
    if test.get("ci"):
        p = test["p_value"]
        # No replicate on the other side of zero: p is below the resolution of the replicates.
        shown = f"p < {2 / test['replicates']:.3f}" if p == 0 else f"p {p:.3f}"
        text += f" [{test['ci'][0]:+.3f}, {test['ci'][1]:+.3f}], {shown}"
    per_seed = test.get("per_run") or []
    if len(per_seed) > 1:
        text += "; seeds " + " ".join("n/a" if d is None else f"{d:+.3f}" for d in per_seed)
    return text


def table_markdown(rows: List[Dict], contrasts: Sequence[Dict] = ()) -> str:
    """
    The study's tables in markdown, one per TABLES entry (mean ± std over seeds), then the paired
    tests and the ``contrasts`` (contrast_tests), if any, each under a bold title.
    """
    parts = []
    for title, columns in TABLES:
        header = ["method", "seeds"] + [label for _, label, _ in columns]
        cells = [
            [r["method"], str(r["seeds"])] + [_cell(r[k], d) for k, _, d in columns] for r in rows
        ]
        if columns is TABLES[0][1]:
            header.append("best emb. score")
            cells = [c + [r["best_emb_score"]] for c, r in zip(cells, rows)]
        parts.append(f"**{title}**\n\n" + markdown_table(header, cells))
    header = ["method", "seeds"] + [label for _, label, _ in PAIRED] + ["family placement"]
    cells = [
        [r["method"], str(r["seeds"])]
        + [_paired_cell(r.get(k)) for k, _, _ in PAIRED]
        + [r["placement"]]
        for r in rows
    ]
    title = "Paired bootstrap tests over the test images (difference [95% interval], p)"
    parts.append(f"**{title}**\n\n" + markdown_table(header, cells))
    if contrasts:
        header = ["question", "A − B", "measure", "seeds", "difference [95% interval], p"]
        cells = [
            [
                c["question"],
                f"{c['a']} − {c['b']}",
                _measure(c),
                ", ".join(map(str, (c["test"] or {}).get("seeds", ()))) or "n/a",
                _paired_cell(c["test"]),
            ]
            for c in contrasts
        ]
        parts.append(f"**{CONTRASTS_TITLE}**\n\n" + markdown_table(header, cells))
    return "\n".join(parts)


CONTRASTS_TITLE = "Contrasts: the study's own questions (A − B, paired bootstrap as above)"


def _measure(contrast: Dict) -> str:
    if contrast["a_score"] == "family":
        return "family acc."
    if contrast["a_score"] == contrast["b_score"]:
        return f"{contrast['a_score']} AUROC"
    return f"{contrast['a_score']} − {contrast['b_score']} AUROC"


def _number(v) -> str:
    return "" if v is None else f"{v:.6g}"


TEST_FIELDS = ("difference", "ci_lo", "ci_hi", "p_value", "per_seed")


def _test_numbers(test: Dict) -> List[str]:
    """
    A paired test's TEST_FIELDS as CSV cells; per_seed is each seed's own difference, in seed
    order, space-separated ('n/a' for a seed whose difference is undefined).
    """
    ci = test.get("ci") or [None, None]
    per_seed = " ".join("n/a" if d is None else _number(d) for d in test.get("per_run") or ())
    return [_number(v) for v in (test.get("difference"), ci[0], ci[1], test.get("p_value"))] + [
        per_seed
    ]


def table_csv(rows: List[Dict]) -> str:
    """
    The tables' numbers: mean and std per column; difference, interval, p-value and each seed's
    difference per test.
    """
    header = ["method", "seeds"] + [f"{k}_{x}" for k, _, _ in COLUMNS for x in ("mean", "std")]
    header += ["best_emb_score", "placement"]
    header += [f"{k}_{x}" for k, _, _ in PAIRED for x in TEST_FIELDS]
    lines = [header]
    for r in rows:
        tests = []
        for k, _, _ in PAIRED:
            tests += _test_numbers(r[k] if isinstance(r.get(k), dict) else {})
        values = [_number(v) for k, _, _ in COLUMNS for v in r[k]]
        lines.append(
            [r["method"], r["seeds"]] + values + [r["best_emb_score"], r["placement"]] + tests
        )
    return csv_table(lines)


def contrasts_csv(contrasts: Sequence[Dict]) -> str:
    """The contrasts' numbers (contrast_tests): sides, scores, seeds and the test (TEST_FIELDS)."""
    header = ["question", "a", "b", "measure", "a_score", "b_score", "seeds"]
    lines = [header + list(TEST_FIELDS)]
    for c in contrasts:
        t = c["test"] or {}
        seeds = " ".join(map(str, t.get("seeds", ())))
        sides = [c["question"], c["a"], c["b"], c["measure"], c["a_score"], c["b_score"]]
        lines.append(sides + [seeds] + _test_numbers(t))
    return csv_table(lines)


def roc_figure(runs: Dict[str, str], best: Dict[str, str], seeds: Dict[str, int]):
    """
    Object-level ROC of one run per method (``{method: run folder}``, trained with ``seeds``
    [method]), one colour per method: its MSP dotted, its best embedding score (``best``) solid.
    """
    curves, styles = [], []
    for i, (method, run_dir) in enumerate(runs.items()):
        roc = load_roc_set(os.path.join(run_dir, "ood"))
        if roc is None or not roc.defined:
            continue
        for score, linestyle in (("msp", ":"), (best.get(method), "-")):
            if score in roc.scores:
                label = f"{method} (seed {seeds[method]}) {score}"
                curves.append((label, roc.scores[score], roc.is_id))
                styles.append({"color": f"C{i % 10}", "linestyle": linestyle})
    title = "OOD ROC, one seed of each method\n(dotted: MSP; solid: best embedding score)"
    return roc_panel(curves, title, styles)


def _tsne_points(run_dir: str) -> Optional[str]:
    """The run's t-SNE points: of the projection, else of the box features; None without either."""
    for name in ("tsne_points.npz", "box_features_tsne_points.npz"):
        path = os.path.join(run_dir, "analysis", name)
        if os.path.isfile(path):
            return path
    return None


def tsne_panel(runs: Dict[str, str]):
    """
    One t-SNE panel per method (``{method: run folder}``) with t-SNE points, sharing one class
    legend (plots.tsne_panel_figure); None when no run has them.
    """
    panels = []
    for method, run_dir in runs.items():
        path = _tsne_points(run_dir)
        if path is None:
            continue
        with open(os.path.join(run_dir, "analysis", "analysis.json")) as f:
            analysis = json.load(f)
        names = analysis["class_names"]
        groups = analysis["group_levels"][0] if analysis["group_levels"] else names
        with np.load(path) as z:
            points, labels = z["points"], z["labels"]
        box = os.path.basename(path) != "tsne_points.npz"
        title = method + (" (box features)" if box else "")
        panels.append((title, points, labels, names, groups, analysis["held_out_classes"]))
    if not panels:
        return None
    title = (
        "t-SNE of GT-box embeddings of the test split "
        "(colour: class, marker: family, black: held out)"
    )
    return tsne_panel_figure(panels, title)


@dataclass
class StudyRun:
    """One finished run of a study: its method, seed, folder and (the control's) ranking file."""

    method: str
    seed: int
    run_dir: str
    ranking_file: Optional[str] = None


def write_study(
    runs: Sequence[StudyRun],
    output: str,
    partners: Optional[Dict[str, Optional[str]]],
    contrasts: Sequence[Contrast],
    provenance: dict,
    quick: bool,
    hold_out_mode: str,
    command: str,
) -> str:
    """
    Everything a study writes to ``output``: the results (write_results, with the study's
    ``partners`` and ``contrasts``), each method's config of its smallest seed (copy_configs)
    and meta.json (study_meta, with ``provenance``: study_provenance). Returns the markdown
    tables.
    """
    triples = [(r.method, r.seed, r.run_dir) for r in runs]
    md, per_method = write_results(triples, output, partners=partners, contrasts=contrasts)
    first = {}
    for r in sorted(runs, key=lambda r: r.seed, reverse=True):
        first[r.method] = (r.run_dir, r.ranking_file)  # each method's smallest seed
    copy_configs(os.path.join(output, "configs"), first)
    meta = study_meta(triples, per_method, provenance, quick, hold_out_mode, command)
    write_json_atomic(os.path.join(output, "meta.json"), meta)
    return md


def load_meta(output: str) -> Optional[dict]:
    """The meta.json a study wrote to ``output``; None if it has none yet."""
    path = os.path.join(output, "meta.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(
            f"{path}: not a study's meta.json ({e}); delete it (the runs keep their own"
            " provenance.json) and run the study again."
        ) from None
    if not isinstance(meta, dict):
        raise ReportError(
            f"{path}: not a study's meta.json (no JSON object); delete it and run again."
        )
    return meta


def check_method_configs(methods: Sequence[Method], opts: Sequence[str], repo: str):
    """
    Each method's config (relative to ``repo``) with its overrides and the study's ``opts``,
    checked as training checks it (values, schedule, held-out and exposed classes against
    NUM_CLASSES): a wrong key or value is one clear error before any run.
    """
    from detectron2.config import get_cfg

    from . import cli
    from .config import add_rcdet_config
    from .data.held_out import apply_held_out_config
    from .engine import check_config_values, check_training_values

    for method in methods:
        cfg = get_cfg()
        add_rcdet_config(cfg)
        cli.load_config_file(cfg, os.path.join(repo, method.config), option="the study's config")
        cli.merge_overrides(cfg, list(method.opts) + list(opts))
        check_config_values(cfg)
        check_training_values(cfg)
        if cfg.MODEL.RCDET.OOD.HELD_OUT_CLASSES:
            apply_held_out_config(cfg)


def write_results(
    runs: Sequence[Tuple[str, int, str]],
    output: str,
    replicates: int = PAIRED_REPLICATES,
    partners: Optional[Dict[str, Optional[str]]] = None,
    contrasts: Sequence[Contrast] = (),
) -> Tuple[str, Dict[str, List[Dict]]]:
    """
    results.md, results.csv, roc.png and tsne_panel.png in ``output``, each written atomically,
    from finished ``(method, seed, run folder)`` runs; the figures show each method's first run.
    ``partners``: the study's SupCon, softmax, VOS and control rows (attach_paired_tests);
    ``contrasts``: its own questions (contrast_tests), also in contrasts.csv.
    Returns the markdown tables and each method's run_metrics.
    """
    per_method: Dict[str, List[Dict]] = {}
    run_dirs: Dict[str, Dict[int, str]] = {}
    for method, seed, run_dir in runs:
        per_method.setdefault(method, []).append(run_metrics(run_dir))
        run_dirs.setdefault(method, {})[seed] = run_dir
    rows = build_table(per_method)
    paired = PairedRuns(rows, run_dirs, replicates)
    attach_paired_tests(rows, paired, partners)
    tested = contrast_tests(paired, contrasts)
    md = table_markdown(rows, tested)
    atomic_write(os.path.join(output, "results.md"), md.encode())
    atomic_write(os.path.join(output, "results.csv"), table_csv(rows).encode())
    contrasts_path = os.path.join(output, "contrasts.csv")
    if tested:
        atomic_write(contrasts_path, contrasts_csv(tested).encode())
    elif os.path.isfile(contrasts_path):
        os.remove(contrasts_path)  # an earlier study's, in the same folder
    first = {method: dirs[min(dirs)] for method, dirs in run_dirs.items()}
    best = {r["method"]: r["best_emb_score"] for r in rows}
    seeds = {method: min(dirs) for method, dirs in run_dirs.items()}
    save_figure(roc_figure(first, best, seeds), os.path.join(output, "roc.png"), dpi=110)
    panel = tsne_panel(first)
    if panel is not None:
        save_figure(panel, os.path.join(output, "tsne_panel.png"), dpi=100)
    return md, per_method
