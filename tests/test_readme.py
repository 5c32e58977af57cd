"""The README is the front door: its snippet runs, its results match the committed studies, and
every relative link in it and in the docs points to a file that exists. The usage examples in the
docs and in the tools' --help put the tool's options before the config overrides."""

import ast
import json
import os
import re
import shlex
import sys

from conftest import REPO, TINY_SCHEDULE
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image

SNIPPET_HEADING = "## Using rcdet in your own detectron2 project"
# README name -> the name in the committed results.md tables, which keep the name of their day.
RENAMED_METHODS = {"rince_out_r1": "supcon_out"}


def _read(*path):
    with open(os.path.join(REPO, *path)) as f:
        return f.read()


def _studies():
    """The committed studies: results/<study>/ folders with a results.md."""
    root = os.path.join(REPO, "results")
    return [
        s for s in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, s, "results.md"))
    ]


def _commits(study):
    meta = json.loads(_read("results", study, "meta.json"))
    return meta.get("commits", [meta["commit"]])


def _snippet():
    """The first python code block under the README's 'own detectron2 project' heading."""
    readme = _read("README.md")
    assert SNIPPET_HEADING in readme, f"README.md has no '{SNIPPET_HEADING}' section"
    section = readme.split(SNIPPET_HEADING, 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python code block under '{SNIPPET_HEADING}'"
    return match.group(1)


def test_readme_snippet_trains_a_model_in_your_own_project(tiny_shapes, tmp_path, monkeypatch):
    """Runs the README's snippet text unchanged on the tiny built-in dataset. The one substitution
    is the command line: the snippet merges ``sys.argv[1:]`` as KEY VALUE overrides, and the test
    passes a tiny schedule and OUTPUT_DIR there, as a user would pass them to their script."""
    code = _snippet()
    assert len(code.strip().splitlines()) <= 20, "the README snippet should stay about 20 lines"
    assert (
        "sys.argv[1:]" in code
    ), "the snippet no longer takes KEY VALUE overrides from the command line"
    out = tmp_path / "mine"
    # A 2-iteration model barely localises: a loose IoU gives ID matches to calibrate on.
    ood = [
        "TEST.OOD.MATCH_IOU",
        "0.1",
        "TEST.OOD.SCORE_THRESHOLD",
        "0.0",
        "TEST.OOD.BOOTSTRAP",
        "0",
    ]
    ood += ["TEST.OOD.OOD_DATASET", "none"]
    argv = ["train_mine.py", *TINY_SCHEDULE, *ood, "OUTPUT_DIR", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(REPO)  # the snippet's config and ranking paths are relative to the checkout
    namespace = {"__name__": "__main__"}
    exec(compile(code, "README.md (snippet)", "exec"), namespace)

    assert (out / "model_final.pth").is_file()
    with open(out / "metrics.json") as f:
        logged = [json.loads(line) for line in f if line.strip()]
    assert any(
        "loss_contrast" in entry for entry in logged
    ), "the snippet's training logged no loss_contrast"
    assert any(
        key.startswith("rcdet/") for entry in logged for key in entry
    ), "no rcdet/* scalars logged"
    trainer = namespace["trainer"]
    assert trainer.iter == 2
    results = trainer._last_eval_results
    assert "bbox" in results, "the snippet's training did not evaluate on DATASETS.TEST"
    assert "msp_auroc" in results.get("ood", {}), "the snippet's evaluator reported no OOD"
    image = read_image(DatasetCatalog.get(trainer.cfg.DATASETS.TEST[0])[0]["file_name"], "BGR")
    found = namespace["predictor"](image)["instances"]
    assert len(found) and found.has("ood_scores") and found.has("is_unknown")


def test_readme_results_table_matches_the_committed_results():
    """Each study's README quotes its results.md verbatim and names every commit of its
    meta.json; README.md links each study and names every commit too."""
    readme = _read("README.md")
    studies = _studies()
    assert studies, "no committed comparison results to check the READMEs against"
    for study in studies:
        table = _read("results", study, "results.md")
        study_readme_path = os.path.join("results", study, "README.md")
        assert os.path.isfile(
            os.path.join(REPO, study_readme_path)
        ), f"{study_readme_path} is missing"
        study_readme = _read(study_readme_path)
        assert (
            table.strip() in study_readme
        ), f"{study_readme_path} does not quote results/{study}/results.md verbatim"
        assert f"]({study_readme_path})" in readme, f"README.md does not link {study_readme_path}"
        for commit in _commits(study):
            assert (
                commit[:7] in study_readme
            ), f"{study_readme_path} does not name commit {commit[:7]}"
            assert commit[:7] in readme, f"README.md does not name commit {commit[:7]} of {study}"


def _table_rows(text):
    """(header, rows) of every markdown table in ``text``; cells stripped."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append((current[0], [r for r in current[2:]]))
            current = []
    return tables


def test_readme_summary_table_copies_the_committed_figures_exactly():
    readme = _read("README.md")
    results = readme.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    summary = [t for t in _table_rows(results) if "method" in t[0]]
    assert len(summary) == 1, "README.md's Results section should hold one summary table"
    header, rows = summary[0]
    checked = 0
    for row in rows:
        study = re.search(r"\(results/([^/]+)/README\.md\)", row[0]).group(1)
        name = row[header.index("method")]
        # A study's results.md may hold several tables, one row per method in each (and the
        # contrasts, one row per question).
        for study_header, study_rows in _table_rows(_read("results", study, "results.md")):
            if study_header[0] != "method":
                continue
            names = [r[0] for r in study_rows]
            # Study v2's results.md tables predate the rename of the one-rank RINCE-out loss.
            method = name if name in names else RENAMED_METHODS.get(name, name)
            (study_row,) = [r for r in study_rows if r[0] == method]
            for column, value in zip(header, row):
                if column in study_header and column != "method":
                    assert value == study_row[study_header.index(column)], (
                        f"README.md: {study} {method} {column} is {value}, results.md says "
                        f"{study_row[study_header.index(column)]}"
                    )
                    checked += 1
    assert checked >= 20


def _markdown_files():
    names = ["README.md", "datasets/README.md"]
    names += [
        f"docs/{n}" for n in sorted(os.listdir(os.path.join(REPO, "docs"))) if n.endswith(".md")
    ]
    names += [
        f"results/{s}/README.md"
        for s in sorted(os.listdir(os.path.join(REPO, "results")))
        if os.path.isfile(os.path.join(REPO, "results", s, "README.md"))
    ]
    return names


def _slug(heading):
    """GitHub's anchor for a heading."""
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def _anchors(path):
    text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.M)}


def test_readme_and_docs_relative_links_point_to_existing_files():
    dangling = []
    for name in _markdown_files():
        path = os.path.join(REPO, name)
        text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            resolved = (
                os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                if file_part
                else path
            )
            if not os.path.exists(resolved):
                dangling.append(f"{name}: {target}")
            elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
                dangling.append(f"{name}: {target} (no such heading)")
    assert not dangling, "links to missing files:\n" + "\n".join(dangling)


# A config key as detectron2's KEY VALUE overrides spell it, e.g. MODEL.WEIGHTS.
_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def _examples(text):
    """The `python tools/...` command lines in ``text``, continuation lines joined."""
    text = text.replace("\\\n", " ")
    for match in re.finditer(r"python (tools/\w+\.py[^\n`]*)", text):
        yield match.group(1).split("#")[0].strip()


def _example_sources():
    for name in sorted(os.listdir(os.path.join(REPO, "tools"))):
        if name.endswith(".py") and name != "__init__.py":
            with open(os.path.join(REPO, "tools", name)) as f:
                yield f"tools/{name} --help", ast.get_docstring(ast.parse(f.read())) or ""
    for doc in _markdown_files():
        yield doc, _read(doc)


def test_usage_examples_put_tool_options_before_config_overrides():
    checked = 0
    for source, text in _example_sources():
        for example in _examples(text):
            tokens = shlex.split(example)
            first_key = next((i for i, t in enumerate(tokens) if _KEY.match(t)), len(tokens))
            late = [t for t in tokens[first_key:] if t.startswith("--")]
            assert not late, (
                f"{source}: `{example}` puts {late} after the config overrides, which the parser"
                " rejects"
            )
            checked += 1
    assert checked >= 10


def test_readme_links_every_tool_and_every_rcdet_module():
    """One link from the README to any tool and any module of the package."""
    readme = _read("README.md")
    tools = [
        n
        for n in sorted(os.listdir(os.path.join(REPO, "tools")))
        if n.endswith((".py", ".sh")) and n != "__init__.py"
    ]
    missing = [f"tools/{n}" for n in tools if f"](tools/{n})" not in readme]
    modules = []
    for folder, _, files in os.walk(os.path.join(REPO, "rcdet")):
        rel = os.path.relpath(folder, REPO).replace(os.sep, "/")
        modules += [f"{rel}/{n}" for n in files if n.endswith(".py") and n != "__init__.py"]
    assert "rcdet/modeling/rince.py" in modules and "rcdet/data/shapes.py" in modules
    missing += [m for m in sorted(modules) if f"]({m})" not in readme]
    assert not missing, f"README.md does not link {missing}"


def test_readme_is_a_front_door():
    readme = _read("README.md")
    lines = readme.splitlines()
    assert (
        len(lines) <= 150
    ), f"README.md has {len(lines)} lines; details belong in docs/ and results/<study>/"
    first_screen = "\n".join(lines[:30])
    assert "make demo" in first_screen and "make test" in first_screen
    for section in (
        "## Installation",
        "## Configs",
        "## Tools",
        "## Layout",
        "## Results",
        "## Citation",
    ):
        assert f"\n{section}" in readme, f"README.md lost its '{section}' section"
    assert "Ranking Info Noise Contrastive Estimation" in readme and "Detectron2" in readme
