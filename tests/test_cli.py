"""
rcdet.cli, the input checks every tool shares, and each family of bad input through the tools
that use them: a non-zero exit (2), one 'error: ...' line, no traceback, and the option, key, file
or value named. The families: an evaluation with nothing to evaluate, values out of range,
output paths that cannot be written, no GPU, broken config files, and tool options placed after
the config overrides.
"""

import argparse
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from detectron2.config import get_cfg

from rcdet import cli
from rcdet.config import ConfigError, add_rcdet_config
from rcdet.data import shapes
from rcdet.engine import report_user_errors, setup_cfg
from rcdet.evaluation.report import ReportError
from tools import (
    analyze_embeddings,
    benchmark_loss,
    benchmark_ood,
    benchmark_ood_evaluator,
    benchmark_overhead,
    compare_methods,
    demo,
    export_model,
    make_ranking,
    train_net,
    visualize_ood,
)

SHAPES = os.path.join(REPO, "configs", "shapes_rince.yaml")
SHAPES_OOD = os.path.join(REPO, "configs", "shapes_rince_ood.yaml")


def run_main(main, argv, capsys):
    """(exit code, stderr) of a tool's command line, run in this process."""
    # detectron2's setup_logger is cached: its handlers keep the capture stream of the test that
    # first called it, closed by now. The errors under test are printed, not logged.
    logging.disable(logging.CRITICAL)
    try:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    finally:
        logging.disable(logging.NOTSET)
    return code, capsys.readouterr().err


def error_line(code, err, *needles):
    """The one error line of a failed command; each of ``needles`` must be in it."""
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def run_process(script, *argv, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, script), *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, **(env or {})),
    )


def process_error_line(proc, *needles):
    assert "Traceback" not in proc.stdout
    return error_line(proc.returncode, proc.stderr, *needles)


def fresh_cfg():
    cfg = get_cfg()
    add_rcdet_config(cfg)
    return cfg


@pytest.fixture
def no_gpu(monkeypatch):
    """This process sees no GPU, whatever the machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# ---------------------------------------------------------------- argparse types


def test_int_in_range():
    steps = cli.int_in_range(1)
    assert steps("3") == 3 and steps.allowed == "an integer >= 1"
    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected an integer >= 1, got 0$"):
        steps("0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"got '2.5'"):
        steps("2.5")
    rank = cli.int_in_range(0, 7)
    assert rank("7") == 7 and rank.allowed == "an integer in [0, 7]"
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \[0, 7\], got 8"):
        rank("8")


def test_float_in_range():
    lr = cli.float_in_range(0.0, 1.0, lo_open=True)
    assert lr("1") == 1.0 and lr.allowed == "a number in (0.0, 1.0]"
    for bad in ("0", "1.5", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected a number in \(0.0, 1.0\]"):
            lr(bad)
    assert cli.float_in_range(0).allowed == "a number >= 0"


def test_size_pair():
    sizes = cli.size_pair(ordered=True)
    assert sizes("512x4096") == (512, 4096) and sizes(" 8X8 ") == (8, 8)
    for bad in ("1024", "4096x512", "0x8", "axb", "8x8x8"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"NxM, two integers >= 1 with N <= M"):
            sizes(bad)


def test_choice():
    matching = cli.choice(("one_per_object", "all"))
    assert matching("all") == "all" and matching.allowed == "one of one_per_object, all"
    with pytest.raises(
        argparse.ArgumentTypeError,
        match=r"^expected one of one_per_object, all, got 'alll'; did you mean 'all'\?$",
    ):
        matching("alll")
    with pytest.raises(argparse.ArgumentTypeError, match=r"got 'x'$"):
        matching("x")


def test_existing_file_and_at_file(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("cat\n\n  dog  # a comment\n# only a comment\n")
    read = cli.at_file_or(lambda s: s.split(","))
    assert read(f"@{names}") == ["cat", "dog"]
    assert read("a,b") == ["a", "b"]
    with pytest.raises(argparse.ArgumentTypeError, match=r"@.*missing.txt: no such file: .*"):
        read(f"@{tmp_path / 'missing.txt'}")
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder, not a file"):
        read(f"@{tmp_path}")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(argparse.ArgumentTypeError, match="the file lists nothing"):
        read(f"@{tmp_path / 'empty.txt'}")
    assert cli.existing_file()(str(names)) == str(names)
    with pytest.raises(argparse.ArgumentTypeError, match="no such file"):
        cli.existing_file()(str(tmp_path / "nope.yaml"))


def test_text_template():
    template = cli.text_template("the class name")
    assert template("a photo of a {}.") == "a photo of a {}."
    assert template("{{literal}} {}") == "{{literal}} {}" and template("a {0}") == "a {0}"
    with pytest.raises(argparse.ArgumentTypeError, match="has no {}"):
        template("a photo")
    with pytest.raises(argparse.ArgumentTypeError, match=r"has 2 fields: it needs exactly one {}"):
        template("{} and {}")
    with pytest.raises(argparse.ArgumentTypeError, match=r"has the field {name}, not {}"):
        template("a {name}")
    with pytest.raises(argparse.ArgumentTypeError, match="literal braces"):
        template("a {")


def test_registered_dataset():
    ood = cli.registered_dataset(("auto", "none"))
    assert ood("none") == "none" and ood("rcdet_shapes_test") == "rcdet_shapes_test"
    with pytest.raises(argparse.ArgumentTypeError, match="did you mean 'rcdet_shapes_test'"):
        ood("rcdet_shapes_tset")


def test_device_names(no_gpu):
    assert cli.check_device("cpu", "MODEL.DEVICE") == "cpu"
    with pytest.raises(ConfigError, match=r"^MODEL.DEVICE gpu: not a device name"):
        cli.check_device("gpu", "MODEL.DEVICE")
    with pytest.raises(
        cli.UsageError,
        match=r"^MODEL.DEVICE cuda:1: no GPU is visible .*; set MODEL.DEVICE cpu.$",
    ):
        cli.check_device("cuda:1", "MODEL.DEVICE")
    with pytest.raises(argparse.ArgumentTypeError, match="no GPU is visible.*use --device cpu"):
        cli.device("--device")("cuda")
    cli.check_gpu_count(1)  # one process needs no GPU


def test_help_shows_each_range_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark_overhead.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "timed train steps per model (an integer >= 1; default: 30)" in text
    assert "(a number >= 0; default: 0.0)" in text
    with pytest.raises(SystemExit):
        benchmark_loss.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(NxM, two integers >= 1 with N <= M; default: 512x4096 1024x8192)" in text
    with pytest.raises(SystemExit):
        train_net.command_line(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "number of gpus *per machine* (an integer >= 0; default: 1)" in text


# ---------------------------------------------------------------- output paths


def test_output_dir_checks_create_nothing(tmp_path):
    nested = tmp_path / "a" / "b"
    assert cli.check_output_dir(str(nested), "--output") == str(nested)
    assert not (tmp_path / "a").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(
        cli.UsageError,
        match=rf"^--output {afile}/out: {afile} is a file, so no folder can be created under it;"
        " set --output to a folder you can write.$",
    ):
        cli.check_output_dir(str(afile / "out"), "--output")
    with pytest.raises(cli.UsageError, match=f"{afile} is a file, not a folder"):
        cli.check_output_dir(str(afile), "OUTPUT_DIR")
    with pytest.raises(cli.UsageError, match=f"^--json {tmp_path}: {tmp_path} is a folder"):
        cli.check_output_file(str(tmp_path), "--json")
    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(cli.UsageError, match="link is a broken symbolic link"):
        cli.check_output_dir(str(tmp_path / "link" / "out"), "--out")
    with pytest.raises(cli.UsageError, match="--out is empty"):
        cli.check_output_dir("", "--out")


def test_output_dir_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        # The check agrees with the system: root may write here anyway, other users may not.
        try:
            os.mkdir(locked / "probe")
            os.rmdir(locked / "probe")
            writable = True
        except PermissionError:
            writable = False
        if writable:
            cli.check_output_dir(str(locked / "out"), "--output")
        else:
            with pytest.raises(cli.UsageError, match=f"no permission to write in {locked}"):
                cli.check_output_dir(str(locked / "out"), "--output")
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------- config files and overrides


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('_BASE_: "%s"\nMODEL:\n  RCDET:\n    LOSS: [1, 2\n' % SHAPES)
    with pytest.raises(
        ConfigError,
        match=rf"^{bad}:5: YAML syntax error: expected ',' or ']'.*"
        r"flow sequence that starts at line 4",
    ):
        cli.load_config_file(fresh_cfg(), str(bad))
    # In a base config: that file is named.
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: bad.yaml\n")
    with pytest.raises(ConfigError, match=rf"^{bad}:5: YAML syntax error"):
        cli.load_config_file(fresh_cfg(), str(child))
    tabs = tmp_path / "tabs.yaml"
    tabs.write_text("MODEL:\n\tDEVICE: cpu\n")
    with pytest.raises(ConfigError, match=rf"^{tabs}:2: YAML syntax error"):
        cli.load_config_file(fresh_cfg(), str(tabs))
    listing = tmp_path / "list.yaml"
    listing.write_text("- MODEL\n")
    with pytest.raises(ConfigError, match=rf"^{listing}:1: a config file is a mapping"):
        cli.load_config_file(fresh_cfg(), str(listing))


def test_copied_config_with_a_relative_base(tmp_path):
    copy = tmp_path / "mine.yaml"
    copy.write_text(open(SHAPES_OOD).read())
    with pytest.raises(ConfigError) as e:
        cli.load_config_file(fresh_cfg(), str(copy))
    msg = str(e.value)
    assert msg.startswith(f"{copy}:3: _BASE_ shapes_rince.yaml not found at {tmp_path}/")
    assert "read from the folder of the config that names it" in msg
    assert f"rcdet's {os.path.join(REPO, 'configs', 'shapes_rince.yaml')}" in msg
    # Following the message works.
    copy.write_text(open(SHAPES_OOD).read().replace('"shapes_rince.yaml"', f'"{SHAPES}"'))
    assert cli.load_config_file(fresh_cfg(), str(copy)).MODEL.ROI_HEADS.NUM_CLASSES == 7
    loop = tmp_path / "loop.yaml"
    loop.write_text("_BASE_: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes .*loop.yaml again"):
        cli.load_config_file(fresh_cfg(), str(loop))


def test_config_key_mistakes_name_file_line_and_key(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f'_BASE_: "{SHAPES}"\nMODEL:\n  RCDET:\n    LOSSS: "rince_in"\n')
    with pytest.raises(
        ConfigError,
        match=rf"^{cfg_file}:4: MODEL.RCDET.LOSSS is not a config key; did you mean"
        r" MODEL.RCDET.LOSS\?$",
    ):
        cli.load_config_file(fresh_cfg(), str(cfg_file))
    cfg_file.write_text(f'_BASE_: "{SHAPES}"\nSOLVER:\n\n  MAX_ITER: "many"\n')
    with pytest.raises(
        ConfigError,
        match=rf"^{cfg_file}:4: SOLVER.MAX_ITER takes an integer \(as in 40000\), got 'many'.$",
    ):
        cli.load_config_file(fresh_cfg(), str(cfg_file))
    with pytest.raises(
        ConfigError,
        match=r"configs/shapes_rince_od.yaml: file not found. Did you"
        r" mean configs/shapes_rince_ood.yaml\?",
    ):
        cli.load_config_file(fresh_cfg(), "configs/shapes_rince_od.yaml")
    with pytest.raises(ConfigError, match="--config-file is required"):
        cli.load_config_file(fresh_cfg(), "")


def test_override_mistakes():
    cfg = fresh_cfg()
    with pytest.raises(
        ConfigError, match=r"^config override SOLVER.BASE_LRR 0.1: SOLVER.BASE_LRR is not a"
    ):
        cli.merge_overrides(cfg, ["SOLVER.BASE_LRR", "0.1"])
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITER takes an integer"):
        cli.merge_overrides(cfg, ["SOLVER.MAX_ITER", "1.5"])
    with pytest.raises(cli.UsageError, match=r"got 3 words \(A 1 B\): one key lacks its value"):
        cli.merge_overrides(cfg, ["A", "1", "B"])
    # yacs keeps a float key a float: the message says what to write, not "takes a number".
    with pytest.raises(
        ConfigError,
        match=r"^config override MODEL.RCDET.LOSS_WEIGHT -1: MODEL.RCDET.LOSS_WEIGHT takes a"
        r" number with a decimal point \(as in 0.5\), got '-1': write -1.0.$",
    ):
        cli.merge_overrides(cfg, ["MODEL.RCDET.LOSS_WEIGHT", "-1"])
    # The example of the fix is the user's own command, with no option the tool may lack.
    with pytest.raises(cli.UsageError, match=r"e.g. ... --dry-run SOLVER.BASE_LR 0.01.$"):
        cli.merge_overrides(cfg, ["SOLVER.BASE_LR", "0.01", "--dry-run"])
    # Negative numbers are values, not options.
    cli.merge_overrides(cfg, ["SEED", "-1", "SOLVER.BASE_LR", "-0.5"])
    assert cfg.SEED == -1 and cfg.SOLVER.BASE_LR == -0.5


# ---------------------------------------------------------------- the families, through the tools


def test_eval_only_without_a_test_set(tiny_shapes, tmp_path, capsys):
    code, err = run_main(
        train_net.command_line,
        [
            "--config-file",
            SHAPES,
            "--eval-only",
            "DATASETS.TEST",
            "()",
            "MODEL.WEIGHTS",
            str(tmp_path / "model.pth"),
            "OUTPUT_DIR",
            str(tmp_path),
        ],
        capsys,
    )
    error_line(
        code,
        err,
        "--eval-only evaluates DATASETS.TEST, which is empty",
        "DATASETS.TEST \"('rcdet_shapes_test',)\"",
    )


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--methods", "rince_oot"], ["argument --methods", "'rince_oot'", "rince_out_in"]),
        (["--quick", "--quick-iters", "0"], ["--quick-iters", "an integer >= 1, got 0"]),
        (["--seeds", "0", "-1"], ["--seeds", "got -1"]),
        (["--num-gpus", "0"], ["--num-gpus", "an integer >= 1, got 0"]),
        (["MODEL.RCDET.LOS", "rince_in"], ["MODEL.RCDET.LOS is not", "MODEL.RCDET.LOSS?"]),
        (["SOLVER.MAX_ITER", "ten"], ["config override SOLVER.MAX_ITER ten", "an integer"]),
        (["--ood-dataset", "coco_2017_vall"], ["--ood-dataset", "'coco_2017_val'?"]),
        (["--voc", "--ood-dataset", "builtin"], ["--ood-dataset builtin", "--voc"]),
        # The values every run would refuse, refused before the study lists or starts a run.
        (["SOLVER.MAX_ITER", "0"], ["SOLVER.MAX_ITER = 0: training runs that many iterations"]),
        (["MODEL.RCDET.LOSS_WEIGHT", "-1.0"], ["MODEL.RCDET.LOSS_WEIGHT = -1.0; allowed"]),
        (["TEST.OOD.MATCH_IOU", "1.5"], ["TEST.OOD.MATCH_IOU = 1.5: must be in (0, 1]"]),
        (["SOLVER.CHECKPOINT_PERIOD", "0"], ["SOLVER.CHECKPOINT_PERIOD = 0"]),
    ],
)
def test_compare_methods_dry_run_refuses_nonsense(tmp_path, capsys, argv, needles):
    code, err = run_main(
        compare_methods.main, ["--dry-run", "--runs-dir", str(tmp_path)] + argv, capsys
    )
    error_line(code, err, *needles)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--template", "a photo of a"], ["argument --template", "has no {}"]),
        (["--thresholds", "0.35", "0.5"], ["--thresholds 0.35 0.5: must decrease"]),
        (["--thresholds", "1.5"], ["--thresholds", "a number in [-1.0, 1.0], got 1.5"]),
        (["--classes", "cat"], ["--classes names 1 class"]),
        (["--classes", "cat,dog,cat"], ["--classes names cat more than once"]),
        (["--classes", "@missing.txt"], ["argument --classes", "no such file: missing.txt"]),
    ],
)
def test_make_ranking_refuses_nonsense_before_loading_the_model(tmp_path, capsys, argv, needles):
    base = ["--classes", "voc", "--thresholds", "0.5", "--out", str(tmp_path / "r.yaml")]
    code, err = run_main(make_ranking.main, base + argv, capsys)
    error_line(code, err, *needles)
    assert not os.listdir(tmp_path)


def _under_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    return str(afile / "out")


# (tool, argv before the output path's option, the option, after it).
OUTPUT_CASES = {
    "train_net": (train_net.command_line, ["--config-file", SHAPES], "OUTPUT_DIR", []),
    "demo": (demo.main, [], "--output", []),
    "analyze_embeddings": (analyze_embeddings.main, ["--config-file", SHAPES_OOD], "--output", []),
    "analyze_embeddings_default": (
        analyze_embeddings.main,
        ["--config-file", SHAPES_OOD],
        "OUTPUT_DIR",
        [],
    ),
    "export_model": (export_model.main, ["--config-file", SHAPES_OOD], "--output", []),
    "benchmark_loss": (benchmark_loss.main, ["--sizes", "8x16"], "--json", []),
    "benchmark_overhead": (benchmark_overhead.main, ["--synthetic"], "--json", []),
    "compare_methods": (compare_methods.main, ["--dry-run"], "--output", []),
    "compare_methods_runs": (compare_methods.main, ["--dry-run"], "--runs-dir", []),
    "make_ranking": (
        make_ranking.main,
        ["--classes", "voc", "--thresholds", "0.5"],
        "--out",
        [],
    ),
    "benchmark_ood": (
        benchmark_ood.main,
        ["--config-file", SHAPES_OOD],
        "--output",
        ["MODEL.WEIGHTS", "unused.pth"],
    ),
    "benchmark_ood_default": (
        benchmark_ood.main,
        ["--config-file", SHAPES_OOD, "MODEL.WEIGHTS", "unused.pth"],
        "OUTPUT_DIR",
        [],
    ),
    "benchmark_ood_compare": (benchmark_ood.main, ["--compare", "a", "b"], "--output", []),
    "visualize_ood": (visualize_ood.main, ["report"], "--output", []),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_output_path_under_a_regular_file(tiny_shapes, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("RCDET_SHAPES_ROOT", tiny_shapes)
    main, before, option, after = OUTPUT_CASES[case]
    out = _under_a_file(tmp_path)
    if option == "OUTPUT_DIR":
        argv = before + after + ["OUTPUT_DIR", out]
    else:
        argv = before + [option, out] + after
    code, err = run_main(main, argv, capsys)
    what = "a file" if option in ("--json", "--out") or case == "visualize_ood" else "a folder"
    error_line(
        code, err, f"{option} {out}", f"{tmp_path}/afile is a file", f"to {what} you can write"
    )
    assert os.listdir(tmp_path) == ["afile"]


def test_generate_shapes_output_under_a_file(tmp_path):
    out = _under_a_file(tmp_path)
    proc = run_process("datasets/generate_shapes.py", "--out", out, "--train", "1")
    process_error_line(proc, f"--out {out}: {tmp_path}/afile is a file")


@pytest.mark.parametrize("tool", ["demo", "compare_methods", "benchmark_loss"])
def test_output_without_write_permission(tmp_path, capsys, monkeypatch, tool):
    # What a user without write permission meets (the tests may run as root, who has it).
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    out = tmp_path / "out"
    main, argv, option = {
        "demo": (demo.main, ["--output", str(out)], "--output"),
        "compare_methods": (
            compare_methods.main,
            ["--dry-run", "--runs-dir", str(out)],
            "--runs-dir",
        ),
        "benchmark_loss": (benchmark_loss.main, ["--json", str(out / "b.json")], "--json"),
    }[tool]
    code, err = run_main(main, argv, capsys)
    error_line(code, err, f"{option} {out}", f"no permission to write in {tmp_path}")


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["MODEL.DEVICE", "cuda"], ["MODEL.DEVICE cuda: no GPU is visible", "MODEL.DEVICE cpu"]),
        (["--num-gpus", "2"], ["--num-gpus 2: no GPU is visible", "--num-gpus 1"]),
        (
            ["SOLVER.AMP.ENABLED", "True"],
            ["SOLVER.AMP.ENABLED True with MODEL.DEVICE cpu", "SOLVER.AMP.ENABLED False"],
        ),
    ],
)
def test_train_net_without_a_gpu(tiny_shapes, tmp_path, capsys, no_gpu, argv, needles):
    argv = ["--config-file", SHAPES] + argv + ["OUTPUT_DIR", str(tmp_path)]
    code, err = run_main(train_net.command_line, argv, capsys)
    error_line(code, err, *needles)


def test_num_gpus_without_a_gpu_starts_no_worker(tiny_shapes, tmp_path):
    proc = run_process(
        "tools/train_net.py",
        "--num-gpus",
        "2",
        "--config-file",
        "configs/shapes_rince.yaml",
        "OUTPUT_DIR",
        str(tmp_path),
        env={"CUDA_VISIBLE_DEVICES": "", "RCDET_SHAPES_ROOT": tiny_shapes},
    )
    process_error_line(proc, "--num-gpus 2: no GPU is visible")


@pytest.mark.parametrize(
    "main, argv",
    [
        (benchmark_loss.main, ["--device", "cuda"]),
        (benchmark_overhead.main, ["--device", "cuda:0"]),
    ],
)
def test_benchmarks_without_a_gpu(capsys, no_gpu, main, argv):
    code, err = run_main(main, argv, capsys)
    error_line(code, err, "argument --device", "no GPU is visible", "use --device cpu")


def test_yaml_syntax_error_through_train_net(tiny_shapes, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('_BASE_: "%s"\nSOLVER:\n  STEPS: [10, 20\n' % SHAPES)
    proc = run_process("tools/train_net.py", "--config-file", str(bad))
    process_error_line(proc, f"{bad}:4: YAML syntax error")


def test_copied_config_through_analyze_embeddings(tiny_shapes, tmp_path, capsys):
    copy = tmp_path / "config.yaml"
    copy.write_text(open(SHAPES_OOD).read())
    code, err = run_main(analyze_embeddings.main, ["--config-file", str(copy)], capsys)
    error_line(code, err, f"{copy}:3: _BASE_ shapes_rince.yaml not found")


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["MODEL.TINYNET.CHANNELS", "[32, 64, 128]"], ["MODEL.TINYNET.CHANNELS = [32, 64, 128]"]),
        (["MODEL.TINYNET.CHANNELS", "[48, 64, 128, 192]"], ["multiple of 32", "NORM GN"]),
        (["MODEL.TINYNET.DEPTH", "[1, 1, -1, 1]"], ["MODEL.TINYNET.DEPTH = [1, 1, -1, 1]"]),
        (["MODEL.FPN.IN_FEATURES", "['s3', 's5']"], ["MODEL.FPN.IN_FEATURES", "consecutive"]),
        (["MODEL.FPN.OUT_CHANNELS", "48"], ["MODEL.FPN.OUT_CHANNELS = 48"]),
        (["MODEL.ROI_HEADS.IN_FEATURES", "['p2']"], ["MODEL.ROI_HEADS.IN_FEATURES = ['p2']"]),
        (["MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64]]"], ["MODEL.ANCHOR_GENERATOR.SIZES"]),
    ],
)
def test_model_shape_keys_that_do_not_fit(tiny_shapes, tmp_path, capsys, argv, needles):
    code, err = run_main(
        train_net.command_line,
        ["--config-file", SHAPES, "OUTPUT_DIR", str(tmp_path), "DATALOADER.NUM_WORKERS", "0"]
        + argv,
        capsys,
    )
    error_line(code, err, *needles)


@pytest.mark.parametrize(
    "main, argv, needles",
    [
        (analyze_embeddings.main, ["--config-file", SHAPES, "--max-tsne", "1"], ["--max-tsne"]),
        (benchmark_loss.main, ["--sizes", "1024"], ["--sizes", "NxM", "'1024'"]),
        (benchmark_loss.main, ["--ranks", "0"], ["--ranks", "an integer >= 1, got 0"]),
        (benchmark_loss.main, ["--repeats", "0"], ["--repeats", "got 0"]),
        (benchmark_overhead.main, ["--steps", "0"], ["--steps", "an integer >= 1, got 0"]),
        (benchmark_overhead.main, ["--lr", "-1"], ["--lr", "a number >= 0, got -1"]),
        (train_net.command_line, ["--machine-rank", "-1"], ["--machine-rank", "got -1"]),
        (benchmark_ood.main, ["--bootstrap", "-5"], ["--bootstrap", "an integer >= 0, got -5"]),
        (benchmark_ood.main, ["--match-iou", "1.5"], ["--match-iou", "in (0.0, 1.0], got 1.5"]),
        (benchmark_ood.main, ["--knn-k", "0"], ["--knn-k", "an integer >= 1, got 0"]),
        (benchmark_ood.main, ["--matching", "alll"], ["--matching", "did you mean 'all'?"]),
        (benchmark_ood.main, ["--seed", "-1"], ["--seed", "got -1"]),
        (benchmark_ood.main, ["--energy-temperature", "0"], ["--energy-temperature", "> 0.0"]),
        (benchmark_ood.main, ["--image-threshold", "f1"], ["--image-threshold", "f1_optimal"]),
        (visualize_ood.main, ["report", "--num-images", "0"], ["--num-images", "got 0"]),
        (visualize_ood.main, ["report", "--score", "maha"], ["--score", "one of msp"]),
        (benchmark_ood_evaluator.main, ["--images", "0"], ["--images", "got 0"]),
        (benchmark_ood_evaluator.main, ["--search-queries", "0"], ["--search-queries", "got 0"]),
        (shapes.main, ["--workers", "0"], ["--workers", "an integer >= 1, got 0"]),
    ],
)
def test_tool_options_out_of_range(capsys, main, argv, needles):
    code, err = run_main(main, argv, capsys)
    error_line(code, err, "argument", *needles)


def test_generate_shapes_split_size_zero(tmp_path):
    proc = run_process("datasets/generate_shapes.py", "--out", str(tmp_path / "d"), "--train", "0")
    process_error_line(proc, "argument --train: expected an integer >= 1, got 0")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["OUTPUT_DIR", "x", "--eval-only"],  # an odd count
        ["OUTPUT_DIR", "x", "--eval-only", "--resume"],  # an even count
        ["SEED", "1", "--num-gpus=2"],
    ],
)
def test_option_after_the_overrides(tiny_shapes, capsys, overrides):
    code, err = run_main(train_net.command_line, ["--config-file", SHAPES] + overrides, capsys)
    flag = next(o for o in overrides if o.startswith("--"))
    error_line(code, err, f"{flag} comes after the KEY VALUE config overrides", "options first")


# ---------------------------------------------------------------- inputs a newcomer tries


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER = 0: training runs that many iterations"),
        (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD = 0: iterations between"),
        (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH = 0: images per batch"),
        (["SOLVER.BASE_LR", "-0.1"], "SOLVER.BASE_LR = -0.1: the learning rate, must be >= 0"),
        (["DATALOADER.NUM_WORKERS", "-1"], "DATALOADER.NUM_WORKERS = -1"),
        (["TEST.EVAL_PERIOD", "-1"], "TEST.EVAL_PERIOD = -1"),
        (["INPUT.MIN_SIZE_TEST", "-5"], "INPUT.MIN_SIZE_TEST = -5"),
        (["INPUT.MIN_SIZE_TRAIN", "(160, 0)"], "INPUT.MIN_SIZE_TRAIN = (160, 0): shorter image"),
        (["OUTPUT_DIR", ""], "OUTPUT_DIR is empty"),
        (["DATASETS.TRAIN", "()"], "DATASETS.TRAIN is empty: set DATASETS.TRAIN"),
        (["MODEL.DEVICE", "gpu"], "MODEL.DEVICE gpu: not a device name"),
        (["MODEL.RCDET", "3"], "MODEL.RCDET is a group of keys, not a value"),
        (["MODEL.RCDET.LOSS_WEIGHT", "-1.0"], "MODEL.RCDET.LOSS_WEIGHT = -1.0; allowed: a finite"),
        (["TEST.OOD.MATCH_IOU", "0.0"], "TEST.OOD.MATCH_IOU = 0.0: must be in (0, 1]"),
        (["TEST.OOD.SEED", "-1"], "TEST.OOD.SEED = -1: the seed of the bootstrap resampling"),
    ],
)
def test_train_net_values_that_cannot_work(tiny_shapes, tmp_path, capsys, overrides, needle):
    argv = ["--config-file", SHAPES, "OUTPUT_DIR", str(tmp_path / "out")] + overrides
    code, err = run_main(train_net.command_line, argv, capsys)
    error_line(code, err, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "write, needle",
    [
        (None, "a folder; name a YAML config file"),
        ("# notes\nSee: the docs: here\n", ":2: YAML syntax error: mapping values"),
        ("", ": the config is empty"),
        ("# only a comment\n", ": the config is empty"),
    ],
)
def test_config_files_that_are_not_configs(tiny_shapes, tmp_path, capsys, write, needle):
    path = tmp_path
    if write is not None:
        path = tmp_path / "c.yaml"
        path.write_text(write)
    code, err = run_main(train_net.command_line, ["--config-file", str(path)], capsys)
    error_line(code, err, f"{path}", needle)


def test_launch_options_that_do_not_fit(capsys):
    argv = ["--config-file", SHAPES, "--num-machines", "2", "--machine-rank", "2"]
    code, err = run_main(train_net.command_line, argv, capsys)
    error_line(code, err, "--machine-rank 2: machines are numbered 0 to 1")


@pytest.mark.parametrize(
    "main, argv, needles",
    [
        (benchmark_loss.main, ["--json", "{tmp}"], ["--json {tmp}: {tmp} is a folder"]),
        (benchmark_loss.main, ["--dim", "0"], ["argument --dim", "got 0"]),
        (benchmark_loss.main, ["--num-classes", "1"], ["argument --num-classes", "got 1"]),
        (benchmark_loss.main, ["--sizes", "4096x512"], ["argument --sizes", "N <= M"]),
        (benchmark_overhead.main, ["--batches", "0"], ["argument --batches", "got 0"]),
        (
            benchmark_overhead.main,
            ["--config-file", "configs/nope.yaml"],
            ["--config-file configs/nope.yaml: file not found."],
        ),
        (
            benchmark_overhead.main,
            ["--synthetic", "SOLVER.IMS_PER_BATCHH", "2"],
            ["SOLVER.IMS_PER_BATCHH is not a config key; did you mean SOLVER.IMS_PER_BATCH?"],
        ),
        (
            make_ranking.main,
            ["--classes", "voc", "--thresholds", "0.5", "--out", "{tmp}"],
            ["--out {tmp}: {tmp} is a folder, not a file"],
        ),
        (
            make_ranking.main,
            ["--classes", ",", "--thresholds", "0.5", "--out", "{tmp}/r.yaml"],
            ["--classes names 0 classes"],
        ),
        (
            compare_methods.main,
            ["--quick", "SOLVER.BASE_LR", "0.01", "--dry-run"],
            ["--dry-run comes after the KEY VALUE config overrides"],
        ),
        (
            analyze_embeddings.main,
            ["--config-file", SHAPES, "--max-tsne", "abc"],
            ["argument --max-tsne: expected an integer >= 3, got 'abc'"],
        ),
    ],
)
def test_tool_inputs_that_cannot_work(tmp_path, capsys, main, argv, needles):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = run_main(main, argv, capsys)
    error_line(code, err, *[n.replace("{tmp}", str(tmp_path)) for n in needles])
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--seed", "-1"]])
def test_generate_shapes_options(tmp_path, argv):
    proc = run_process("datasets/generate_shapes.py", "--out", str(tmp_path / "d"), *argv)
    process_error_line(proc, f"argument {argv[0]}: expected an integer >= ")
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------- input files that keys name

RANKINGS = os.path.join(REPO, "configs", "rankings")


def _config_in(folder, ranking_file):
    folder.mkdir(exist_ok=True)
    path = folder / "mine.yaml"
    path.write_text(f'_BASE_: "{SHAPES}"\nMODEL:\n  RCDET:\n    RANKING_FILE: "{ranking_file}"\n')
    return str(path)


def _resolved(config_file, opts=()):
    cfg = cli.load_config_file(fresh_cfg(), config_file)
    cli.merge_overrides(cfg, opts)
    return cli.resolve_input_files(cfg, config_file, opts).MODEL.RCDET.RANKING_FILE


def test_relative_ranking_file_is_read_from_the_working_directory_then_the_configs_folder(
    tmp_path, monkeypatch
):
    shutil.copytree(RANKINGS, tmp_path / "cfgs" / "rankings")
    config = _config_in(tmp_path / "cfgs", "rankings/shapes_families.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # Not in the working directory: the config's folder has it, and the config names it so.
    assert _resolved(config) == str(tmp_path / "cfgs" / "rankings" / "shapes_families.yaml")
    # The working directory comes first, and a file found there keeps its name as written.
    shutil.copytree(RANKINGS, elsewhere / "rankings")
    (elsewhere / "rankings" / "shapes_families.yaml").write_text("# the working directory's\n")
    assert _resolved(config) == "rankings/shapes_families.yaml"
    # An override is the command line's: read from the working directory only.
    opts = ["MODEL.RCDET.RANKING_FILE", "rankings/voc_human.yaml"]
    assert _resolved(config, opts) == "rankings/voc_human.yaml"
    shutil.rmtree(elsewhere / "rankings")
    with pytest.raises(ConfigError) as e:
        _resolved(config, opts)
    assert str(e.value) == (
        "MODEL.RCDET.RANKING_FILE rankings/voc_human.yaml: file not found (looked for"
        f" {elsewhere}/rankings/voc_human.yaml). A relative MODEL.RCDET.RANKING_FILE is read from"
        " the working directory: set MODEL.RCDET.RANKING_FILE to the file's path."
    )


def test_ranking_file_found_nowhere_names_the_key_each_path_tried_and_the_fix(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    config = _config_in(tmp_path / "cfgs", "rankings/mine.yaml")
    with pytest.raises(ConfigError) as e:
        _resolved(config)
    assert str(e.value) == (
        f"MODEL.RCDET.RANKING_FILE rankings/mine.yaml: file not found (looked for"
        f" {tmp_path}/rankings/mine.yaml or {tmp_path}/cfgs/rankings/mine.yaml). A relative"
        " MODEL.RCDET.RANKING_FILE is read from the working directory, then from the folder of"
        f" {config}, which sets it: set MODEL.RCDET.RANKING_FILE to the file's path."
    )
    with pytest.raises(ConfigError, match=r"^MODEL.RCDET.RANKING_FILE /nowhere/r.yaml: file not"):
        _resolved(config, ["MODEL.RCDET.RANKING_FILE", "/nowhere/r.yaml"])
    with pytest.raises(ConfigError, match=rf"RANKING_FILE {tmp_path}: {tmp_path} is a folder"):
        _resolved(config, ["MODEL.RCDET.RANKING_FILE", str(tmp_path)])


def test_shipped_configs_find_their_rankings_from_any_working_directory(
    tiny_shapes, tmp_path, monkeypatch, capsys
):
    # The shipped configs name configs/rankings/..., relative to the checkout they ship in.
    monkeypatch.chdir(tmp_path)
    cfg = setup_cfg(SHAPES_OOD, freeze=False)
    assert cfg.MODEL.RCDET.RANKING_FILE == os.path.join(RANKINGS, "shapes_families.yaml")
    # A missing file fails before OUTPUT_DIR is written, naming the key.
    argv = ["--config-file", SHAPES, "OUTPUT_DIR", str(tmp_path / "out")]
    argv += ["MODEL.RCDET.RANKING_FILE", "configs/rankings/shapes_familys.yaml"]
    code, err = run_main(train_net.command_line, argv, capsys)
    error_line(code, err, "MODEL.RCDET.RANKING_FILE configs/rankings/shapes_familys.yaml: file")
    assert not (tmp_path / "out").exists()


def test_a_config_built_in_code_reads_its_ranking_from_the_working_directory(tmp_path, monkeypatch):
    from rcdet.modeling.rince import build_contrastive_loss

    monkeypatch.chdir(tmp_path)
    cfg = fresh_cfg()
    cfg.MODEL.RCDET.LOSS = "rince_out_in"
    cfg.MODEL.RCDET.RANKING_FILE = "configs/rankings/shapes_families.yaml"
    with pytest.raises(
        ConfigError,
        match=r"^MODEL.RCDET.RANKING_FILE configs/rankings/shapes_families.yaml: file not found"
        rf" \(looked for {tmp_path}/configs/rankings/shapes_families.yaml\)",
    ):
        build_contrastive_loss(cfg, list(shapes.CLASS_NAMES))
    monkeypatch.chdir(REPO)
    assert build_contrastive_loss(cfg, list(shapes.CLASS_NAMES)).rank_matrix.shape == (9, 9)


# ---------------------------------------------------------------- reports


def test_report_errors_are_user_errors(tmp_path, capsys):
    def broken():
        raise ReportError("r/ood_report.json: not valid JSON")

    assert report_user_errors(broken) == 2
    assert capsys.readouterr().err == "error: r/ood_report.json: not valid JSON\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    for main, argv in [
        (visualize_ood.main, [str(empty)]),
        (
            benchmark_ood.main,
            ["--compare", str(empty), str(empty), "--output", str(tmp_path / "o")],
        ),
    ]:
        code, err = run_main(main, argv, capsys)
        error_line(code, err, f"{empty}/ood_report.json: no OOD report here")


def test_report_without_its_scores_file(tmp_path, capsys):
    from conftest import fake_ood_report

    fake_ood_report(str(tmp_path / "run"))
    code, err = run_main(visualize_ood.main, [str(tmp_path / "run")], capsys)
    error_line(code, err, f"{tmp_path}/run/ood_scores.npz: missing; re-run tools/benchmark_ood.py")
    (tmp_path / "run" / "ood_scores.npz").write_bytes(b"not a zip")
    code, err = run_main(visualize_ood.main, [str(tmp_path / "run")], capsys)
    error_line(code, err, "ood_scores.npz: not readable")
    assert sorted(os.listdir(tmp_path / "run")) == ["ood_report.json", "ood_scores.npz"]


@pytest.mark.parametrize(
    "main, argv, needle",
    [
        (visualize_ood.main, ["report", "MODEL.DEVICE", "cpu"], "need the run's --config-file"),
        (
            benchmark_ood.main,
            ["--compare", "a", "b", "--output", "o", "TEST.OOD.MATCH_IOU", "0.3"],
            "--compare merges finished reports; it takes no config overrides",
        ),
        (benchmark_ood.main, [], "--config-file is required unless --compare is given"),
    ],
)
def test_report_tools_refuse_options_they_would_ignore(capsys, main, argv, needle):
    code, err = run_main(main, argv, capsys)
    error_line(code, err, needle)


def test_shapes_module_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rcdet.data.shapes", "--out", str(tmp_path / "d"), "--train", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    process_error_line(proc, "argument --train: expected an integer >= 1, got 0")
    assert not (tmp_path / "d").exists()
