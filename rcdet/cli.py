"""
The input checks every tool shares, made at the boundary, before any work starts:

- argparse types that state what they accept, which ``--help`` shows next to each option
  (``int_in_range``, ``float_in_range``, ``size_pair``, ``choice``, ``existing_file``,
  ``at_file_or``, ``device``, ``registered_dataset``, ``text_template``), and an
  ``ArgumentParser`` whose errors are one line with exit code 2 and that adds the ``KEY VALUE``
  config overrides (``add_config_overrides``);
- output folders and files that cannot be created or written (``check_output_dir``,
  ``check_output_file``), checked without creating anything;
- devices and GPU counts (``check_device``, ``check_gpu_count``), naming the key or option to
  change;
- config files and ``KEY VALUE`` overrides (``load_config_file``, ``merge_overrides``): a YAML
  syntax error, a ``_BASE_`` that is not found, an unknown key or a value of the wrong type is
  named by file, line and key;
- config keys that name an input file (``resolve_input_files``, ``find_input_file``): a relative
  path is read from the working directory, then from the folder of the config file that sets
  the key; a file found nowhere is named with every path tried.

A check that fails raises ``UsageError`` (a ``ConfigError``, so every handler of config errors
reports it), which ``rcdet.engine.exit_on_user_error`` prints as one ``error: ...`` line.
"""

import argparse
import difflib
import os
import re
import string
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from .config import ConfigError

__all__ = [
    "UsageError",
    "ArgumentParser",
    "HelpFormatter",
    "int_in_range",
    "float_in_range",
    "size_pair",
    "choice",
    "existing_file",
    "at_file_or",
    "device",
    "registered_dataset",
    "text_template",
    "check_output_dir",
    "check_output_file",
    "check_device",
    "check_gpu_count",
    "load_config_file",
    "merge_overrides",
    "INPUT_FILE_KEYS",
    "find_input_file",
    "resolve_input_files",
    "config_keys",
]

# The configs that ship with rcdet, for suggestions when a config file or a _BASE_ is not found.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_CONFIGS = os.path.join(CHECKOUT, "configs")


class UsageError(ConfigError):
    """A tool option, path or device that cannot work; the message names the option and the fix."""


# ---------------------------------------------------------------- argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the tool's docstring as written and adds, after the help of each option that has one,
    what its type accepts and its default: ``--steps STEPS  timed train steps (an integer >= 1;
    default: 30)``."""

    def _get_help_string(self, action):
        text = action.help or ""
        if text == argparse.SUPPRESS:
            return text
        notes = []
        allowed = getattr(action.type, "allowed", None)
        if allowed:
            notes.append(allowed)
        default = action.default
        shows_default = (
            action.option_strings
            and action.nargs != 0  # store_true / store_false
            and default not in (None, "", [], argparse.SUPPRESS)
            and "default" not in text
        )
        if shows_default:
            show = getattr(action.type, "show", str)
            values = default if isinstance(default, list) else [default]
            notes.append("default: " + " ".join(show(v) for v in values))
        if not notes:
            return text
        extra = "; ".join(notes).replace("%", "%%")
        return f"{text} ({extra})" if text else extra


class ArgumentParser(argparse.ArgumentParser):
    """The parser of rcdet's tools: the help of ``HelpFormatter``, and a bad option or value is one
    ``error: ...`` line on stderr with exit code 2, like every other input error of the tools."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def add_config_overrides(self):
        """The ``opts`` positional: the ``KEY VALUE`` config overrides, after the tool's options
        (``merge_overrides`` names an option given after them)."""
        self.add_argument(
            "opts",
            nargs=argparse.REMAINDER,
            help="config overrides, KEY VALUE pairs (after the options)",
        )


def _arg_type(parse: Callable, allowed: str, name: str, show: Callable = str) -> Callable:
    parse.allowed = allowed  # shown by HelpFormatter, with the default as ``show`` writes it
    parse.show = show
    parse.__name__ = name  # argparse names the type in its own messages
    return parse


def _range_text(what: str, lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"{what} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{what} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{what} {'<' if hi_open else '<='} {hi}"
    return what


def int_in_range(lo: Optional[int] = None, hi: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer with ``lo <= value <= hi`` (either bound may be None)."""
    allowed = _range_text("an integer", lo, hi)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {value}")
        return value

    return _arg_type(parse, allowed, "int")


def float_in_range(
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Callable[[str], float]:
    """An argparse type: a finite number between ``lo`` and ``hi``, each bound included unless
    ``lo_open`` / ``hi_open``."""
    allowed = _range_text("a number", lo, hi, lo_open, hi_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if value != value or value in (float("inf"), float("-inf")) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text}")
        return value

    return _arg_type(parse, allowed, "float")


def size_pair(lo: int = 1, ordered: bool = False) -> Callable[[str], Tuple[int, int]]:
    """An argparse type: ``NxM`` as the pair (N, M), integers >= ``lo``; ``ordered``: N <= M."""
    allowed = f"NxM, two integers >= {lo}" + (" with N <= M" if ordered else "")

    def parse(text: str) -> Tuple[int, int]:
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
        if not m:
            raise argparse.ArgumentTypeError(f"expected {allowed} (e.g. 512x4096), got {text!r}")
        n, k = int(m.group(1)), int(m.group(2))
        if n < lo or k < lo or (ordered and n > k):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return n, k

    return _arg_type(parse, allowed, "NxM", show=lambda pair: f"{pair[0]}x{pair[1]}")


def choice(options: Sequence[str]) -> Callable[[str], str]:
    """An argparse type: one of ``options`` (a misspelling gets the closest one)."""
    options = tuple(options)
    allowed = "one of " + ", ".join(options)

    def parse(text: str) -> str:
        if text in options:
            return text
        match = difflib.get_close_matches(text, options, n=1)
        raise argparse.ArgumentTypeError(
            f"expected {allowed}, got {text!r}" + (f"; did you mean {match[0]!r}?" if match else "")
        )

    return _arg_type(parse, allowed, "choice")


def _file_problem(path: str) -> Optional[str]:
    if not os.path.exists(path):
        return f"no such file: {path}"
    if os.path.isdir(path):
        return f"{path} is a folder, not a file"
    if not os.access(path, os.R_OK):
        return f"no permission to read {path}"
    return None


def existing_file() -> Callable[[str], str]:
    """An argparse type: the path of a readable file."""

    def parse(text: str) -> str:
        problem = _file_problem(os.path.expanduser(text))
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return text

    return _arg_type(parse, "a readable file", "file")


def at_file_or(convert: Callable[[str], object] = str, what: str = "") -> Callable:
    """An argparse type: ``@FILE`` gives the file's non-blank lines (stripped, ``#`` comments
    left out); any other text goes through ``convert``. ``what`` describes the other forms."""
    allowed = "@FILE (one entry per line)" + (f" or {what}" if what else "")

    def parse(text: str):
        if text.startswith("@"):
            path = os.path.expanduser(text[1:])
            problem = _file_problem(path) if path else "no file name after '@'"
            if problem:
                raise argparse.ArgumentTypeError(f"{text}: {problem}")
            with open(path, encoding="utf-8") as f:
                lines = [line.split("#", 1)[0].strip() for line in f]
            entries = [line for line in lines if line]
            if not entries:
                raise argparse.ArgumentTypeError(f"{text}: the file lists nothing")
            return entries
        return convert(text)

    return _arg_type(parse, allowed, "@FILE")


def _device_problem(name: str) -> Optional[str]:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        return "not a device name (cpu, cuda or cuda:N)"
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "no GPU is visible (torch.cuda.is_available() is False)"
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            return (
                f"only {count} GPU{'s' if count != 1 else ''} visible (cuda:0 to cuda:{count - 1})"
            )
        return None
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        return f"no {dev.type} device is available"
    return None


def check_device(name: str, option: str) -> str:
    """Fail with one line naming ``option`` (a config key or a tool option) if ``name`` is not a
    device this machine has; returns ``name``."""
    problem = _device_problem(str(name))
    if problem:
        raise UsageError(f"{option} {name}: {problem}; set {option} cpu.")
    return name


def device(option: str = "--device") -> Callable[[str], str]:
    """An argparse type: a device this machine has (``check_device``)."""

    def parse(text: str) -> str:
        problem = _device_problem(text)
        if problem:
            raise argparse.ArgumentTypeError(f"{text}: {problem}; use {option} cpu")
        return text

    return _arg_type(parse, "cpu, cuda or cuda:N, one this machine has", "device")


def check_gpu_count(num_gpus: int, option: str = "--num-gpus", model_device: str = ""):
    """Fail with one line before launching ``num_gpus`` worker processes that cannot start:
    without a GPU, with fewer GPUs visible, or with ``model_device`` (MODEL.DEVICE) not CUDA."""
    if num_gpus <= 1:
        return
    if not torch.cuda.is_available():
        raise UsageError(
            f"{option} {num_gpus}: no GPU is visible (torch.cuda.is_available() is False), and"
            f" detectron2 starts one training process per GPU; on the CPU use {option} 1 with"
            " MODEL.DEVICE cpu."
        )
    count = torch.cuda.device_count()
    if num_gpus > count:
        raise UsageError(
            f"{option} {num_gpus}: only {count} GPU{'s' if count != 1 else ''} visible; set"
            f" {option} {count} or fewer."
        )
    if model_device and torch.device(model_device).type != "cuda":
        raise UsageError(
            f"{option} {num_gpus} trains one process per GPU, but MODEL.DEVICE is {model_device}:"
            " set MODEL.DEVICE cuda."
        )


def registered_dataset(special: Sequence[str] = ()) -> Callable[[str], str]:
    """An argparse type: the name of a registered detectron2 dataset, or one of ``special``."""
    allowed = "a registered dataset" + (f", or {', '.join(special)}" if special else "")

    def parse(text: str) -> str:
        if text in special:
            return text
        from detectron2.data import DatasetCatalog

        from . import data  # noqa: F401  (registers rcdet's datasets)

        registered = DatasetCatalog.list()
        if text in registered:
            return text
        match = difflib.get_close_matches(text, registered, n=1)
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a registered dataset"
            + (f"; did you mean {match[0]!r}?" if match else "")
            + (f" (or use {', '.join(special)})" if special else "")
        )

    return _arg_type(parse, allowed, "dataset")


def text_template(placeholder_meaning: str = "the name") -> Callable[[str], str]:
    """An argparse type: a ``str.format`` template with exactly one ``{}``, the place of
    ``placeholder_meaning``; literal braces are written ``{{`` and ``}}``."""
    allowed = f"text with one {{}} for {placeholder_meaning}"

    def parse(text: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {e}; write literal braces as {{{{ and }}}}"
            ) from None
        if fields not in ([""], ["0"]):
            if not fields:
                found = "no {}"
            elif len(fields) == 1:
                found = f"the field {{{fields[0]}}}, not {{}}"
            else:
                found = f"{len(fields)} fields"
            raise argparse.ArgumentTypeError(
                f"{text!r} has {found}: it needs exactly one {{}} for {placeholder_meaning},"
                " e.g. 'a photo of a {}.'"
            )
        return text

    return _arg_type(parse, allowed, "template")


# ---------------------------------------------------------------- output paths


def _write_problem(path: str, folder: bool) -> Optional[str]:
    """Why ``path`` (a folder to create or reuse, else a file) cannot be written, or None."""
    target = os.path.abspath(os.path.expanduser(path))
    existing = target
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if os.path.islink(existing) and not os.path.exists(existing):
        return f"{existing} is a broken symbolic link"
    if existing == target:
        if folder and not os.path.isdir(target):
            return f"{target} is a file, not a folder"
        if not folder and os.path.isdir(target):
            return f"{target} is a folder, not a file"
        if not folder and not os.access(target, os.W_OK):
            return f"no permission to write {target}"
        # A file is replaced atomically, through a temporary file in its folder.
        existing = target if folder else os.path.dirname(target)
    elif not os.path.isdir(existing):
        return f"{existing} is a file, so no folder can be created under it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    return None


def _check_output(path: str, option: str, folder: bool) -> str:
    what = "folder" if folder else "file"
    if not path:
        raise UsageError(f"{option} is empty: name an output {what}.")
    problem = _write_problem(path, folder=folder)
    if problem:
        raise UsageError(f"{option} {path}: {problem}; set {option} to a {what} you can write.")
    return path


def check_output_dir(path: str, option: str) -> str:
    """Fail with one line naming ``option`` if folder ``path`` can be neither created nor written
    (a regular file on its way, a broken link, no write permission). Creates nothing."""
    return _check_output(path, option, folder=True)


def check_output_file(path: str, option: str) -> str:
    """``check_output_dir`` for a file that a tool writes (its folder is created if missing)."""
    return _check_output(path, option, folder=False)


# ---------------------------------------------------------------- config files and overrides


def config_keys(cfg, prefix: str = "") -> List[str]:
    """Every leaf key of ``cfg`` as a dotted name."""
    keys = []
    for name, value in cfg.items():
        full = f"{prefix}{name}"
        keys += config_keys(value, full + ".") if isinstance(value, dict) else [full]
    return keys


def _get_node(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _did_you_mean(key: str, cfg) -> str:
    match = difflib.get_close_matches(key, config_keys(cfg), n=1, cutoff=0.75)
    return f"; did you mean {match[0]}?" if match else ""


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "True or False",
    "list": "a list",
    "tuple": "a list",
    "CfgNode": "a group of keys",
}


def _merge_problem(e: BaseException, cfg) -> Tuple[Optional[str], str]:
    """(key, what is wrong with it) from detectron2's / yacs's message for a merge that failed."""
    msg = str(e.args[0]) if e.args else str(e)
    unknown = re.search(r"Non-existent (?:config )?key: (\S+)", msg)
    if unknown:
        key = unknown.group(1)
        return key, f"{key} is not a config key{_did_you_mean(key, cfg)}"
    mismatch = re.search(
        r"Type mismatch \((.+?) vs\. (.+?)\) with values \((.*) vs\. (.*)\) for config key: (\S+)",
        msg,
        re.S,
    )
    if mismatch:
        want, given, default, got, key = mismatch.groups()
        name = re.sub(r"^<class '(?:[\w.]*\.)?(\w+)'>$", r"\1", want)
        if name == "CfgNode":
            some = next(iter(_get_node(cfg, key)), "KEY")
            return key, f"{key} is a group of keys, not a value: set one of them, e.g. {key}.{some}"
        given = re.sub(r"^<class '(?:[\w.]*\.)?(\w+)'>$", r"\1", given)
        if name == "float" and given == "int":
            # yacs keeps a float key a float: 1 is refused where 1.0 is accepted.
            return key, (
                f"{key} takes a number with a decimal point (as in {default}), got '{got}':"
                f" write {got}.0"
            )
        kind = _TYPE_WORDS.get(name, name)
        return key, f"{key} takes {kind} (as in {default}), got '{got}'"
    return None, msg


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?")) else text + "."


def _yaml_error(path: str, e: yaml.YAMLError) -> ConfigError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is None:
        return ConfigError(f"{path}: not valid YAML: {e}")
    problem = getattr(e, "problem", None) or "syntax error"
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    where = ""
    if context and context_mark is not None:
        where = f" ({context} that starts at line {context_mark.line + 1})"
    return ConfigError(f"{path}:{mark.line + 1}: YAML syntax error: {problem}{where}.")


def _key_lines(node, path: str, prefix: str, out: Dict[str, str]):
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        full = f"{prefix}{key_node.value}"
        out[full] = f"{path}:{key_node.start_mark.line + 1}"
        if isinstance(value_node, yaml.MappingNode):
            _key_lines(value_node, path, full + ".", out)


def _config_chain(path: str, option: str, seen: Tuple[str, ...] = ()) -> Dict[str, str]:
    """Check the YAML of ``path`` and of its _BASE_ chain; returns where each key is set (the file
    and line whose value wins: a file overrides its base)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; {option} takes a YAML config.") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror}).") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from None
    if node is None:
        raise ConfigError(
            f"{path}: the config is empty; a config file is a mapping of KEY: value lines."
        )
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(
            f"{path}:{node.start_mark.line + 1}: a config file is a mapping of KEY: value lines."
        )
    lines: Dict[str, str] = {}
    for key_node, value_node in node.value:
        if getattr(key_node, "value", None) != "_BASE_":
            continue
        line = key_node.start_mark.line + 1
        if not isinstance(value_node, yaml.ScalarNode):
            raise ConfigError(f"{path}:{line}: _BASE_ takes the path of one config file.")
        base = _resolve_base(path, value_node.value)
        if base.startswith(("http://", "https://")):
            break
        if not os.path.isfile(base):
            raise ConfigError(_base_not_found(path, line, value_node.value, base))
        if os.path.abspath(base) in seen + (os.path.abspath(path),):
            raise ConfigError(f"{path}:{line}: _BASE_ {value_node.value} includes {path} again.")
        lines.update(_config_chain(base, option, seen + (os.path.abspath(path),)))
    _key_lines(node, path, "", lines)
    return lines


def _resolve_base(path: str, base: str) -> str:
    # As detectron2's CfgNode.load_yaml_with_base resolves it.
    if base.startswith("~"):
        base = os.path.expanduser(base)
    if not base.startswith(("/", "https://", "http://")):
        base = os.path.join(os.path.dirname(path), base)
    return base


def _base_not_found(path: str, line: int, value: str, resolved: str) -> str:
    msg = (
        f"{path}:{line}: _BASE_ {value} not found at {os.path.abspath(resolved)}: a relative"
        " _BASE_ is read from the folder of the config that names it. Copy the base config next"
        " to it, or set _BASE_ to an absolute path"
    )
    shipped = os.path.join(SHIPPED_CONFIGS, os.path.basename(value))
    if os.path.isfile(shipped):
        msg += f", such as rcdet's {shipped}"
    return msg + "."


def _missing_config_message(path: str, option: str) -> str:
    msg = f"{option} {path}: file not found."
    if os.path.isdir(SHIPPED_CONFIGS):
        names = sorted(n for n in os.listdir(SHIPPED_CONFIGS) if n.endswith(".yaml"))
        match = difflib.get_close_matches(os.path.basename(path), names, n=1, cutoff=0.8)
        if match:
            msg += f" Did you mean configs/{match[0]}?"
    return msg


def load_config_file(cfg, path: str, option: str = "--config-file"):
    """
    Merge config file ``path`` into ``cfg`` as detectron2's ``merge_from_file`` does (its _BASE_
    chain first). A mistake is one ConfigError naming the file and line: a YAML syntax error, a
    _BASE_ that is not found (a relative one is read from the naming file's folder), a key that
    does not exist (with the closest one), a value of the wrong type.
    """
    if not path:
        raise ConfigError(
            f"{option} is required: name a config file, e.g. configs/shapes_rince.yaml."
        )
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise ConfigError(f"{option} {path}: a folder; name a YAML config file.")
        raise ConfigError(_missing_config_message(path, option))
    lines = _config_chain(path, option)
    try:
        cfg.merge_from_file(path)
    except (KeyError, ValueError, AssertionError, TypeError, AttributeError) as e:
        key, problem = _merge_problem(e, cfg)
        raise ConfigError(_sentence(f"{lines.get(key, path)}: {problem}")) from None
    return cfg


# A tool option among the overrides: a long option, or a one-letter short one. Values such as -1,
# -0.5 or -inf are not options.
_OPTION = re.compile(r"--[A-Za-z][\w-]*(=.*)?|-[A-Za-z]")


def merge_overrides(cfg, opts: Sequence[str]):
    """
    Merge ``KEY VALUE`` overrides into ``cfg``, one pair at a time, so that a mistake names its
    key: a tool option placed after the overrides, a key without a value, a key that does not
    exist (with the closest one), a value of the wrong type.
    """
    opts = [str(o) for o in opts]
    options = [o for o in opts if _OPTION.fullmatch(o)]
    if options:
        pair = " ".join([o for o in opts if not _OPTION.fullmatch(o)][:2]) or "KEY VALUE"
        raise UsageError(
            f"{options[0]} comes after the KEY VALUE config overrides, where it would be read as a"
            f" key or a value: put the tool's options first, the overrides last, e.g."
            f" ... {options[0]} {pair}."
        )
    if len(opts) % 2:
        raise UsageError(
            f"config overrides are KEY VALUE pairs, got {len(opts)} words ({' '.join(opts)}):"
            " one key lacks its value."
        )
    for key, value in zip(opts[0::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, ValueError, AssertionError, TypeError, AttributeError) as e:
            _, problem = _merge_problem(e, cfg)
            raise ConfigError(_sentence(f"config override {key} {value}: {problem}")) from None
    return cfg


# ---------------------------------------------------------------- input files named by config keys

# Config keys whose value is the path of a file that a run reads.
INPUT_FILE_KEYS = ("MODEL.RCDET.RANKING_FILE",)


def _set_node(cfg, key: str, value):
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value


def find_input_file(value: str, key: str, config_path: Optional[str] = None) -> str:
    """
    The file that config key ``key`` names. A relative ``value`` is looked for in the working
    directory, then in the folder of ``config_path`` (the config file that sets the key, if a
    file does). The configs that ship with rcdet name their files relative to the checkout
    (``configs/rankings/...``), which is tried last for them. Returns ``value`` when it is found
    as written, else the absolute path where it was found; a file found nowhere is a ConfigError
    naming the key and every path tried.
    """
    path = os.path.expanduser(value)
    tried = [os.path.abspath(path)]
    if not os.path.isabs(path) and config_path:
        folder = os.path.dirname(os.path.abspath(config_path))
        tried.append(os.path.join(folder, path))
        if os.path.commonpath([folder, SHIPPED_CONFIGS]) == SHIPPED_CONFIGS:
            tried.append(os.path.join(CHECKOUT, path))
    tried = list(dict.fromkeys(os.path.normpath(t) for t in tried))
    for i, candidate in enumerate(tried):
        if os.path.isfile(candidate):
            return value if i == 0 else candidate
    folders = [t for t in tried if os.path.isdir(t)]
    if folders:
        raise ConfigError(f"{key} {value}: {folders[0]} is a folder; name a file.")
    if os.path.isabs(path):
        raise ConfigError(f"{key} {value}: file not found; set {key} to the file's path.")
    where = tried[0] if len(tried) == 1 else ", ".join(tried[:-1]) + " or " + tried[-1]
    rule = "the working directory"
    if len(tried) > 1:
        rule += f", then from the folder of {config_path}, which sets it"
    raise ConfigError(
        f"{key} {value}: file not found (looked for {where}). A relative {key} is read from"
        f" {rule}: set {key} to the file's path."
    )


def resolve_input_files(cfg, config_file: str = "", opts: Sequence[str] = (), keys=None):
    """
    Resolve each of ``keys`` (default ``INPUT_FILE_KEYS``) that ``cfg`` sets, as
    ``find_input_file`` does, after ``config_file`` and the ``KEY VALUE`` overrides ``opts`` were
    merged: a key set by an override is read from the working directory, one set by the config
    file (or its _BASE_ chain) also from that file's folder. A path found elsewhere than as
    written replaces the value, so that the run's saved config names the file it read.
    """
    keys = INPUT_FILE_KEYS if keys is None else keys
    overridden = {str(k) for k in list(opts)[0::2]}
    sources = None
    for key in keys:
        value = _get_node(cfg, key)
        if not value:
            continue
        config_path = None
        if key not in overridden and config_file:
            if sources is None:
                sources = _config_chain(config_file, "--config-file")
            if key in sources:
                config_path = sources[key].rsplit(":", 1)[0]
        found = find_input_file(value, key, config_path)
        if found != value:
            _set_node(cfg, key, found)
    return cfg
