"""The ``medadapt`` command: ``demo``, ``finetune``, ``segment``, ``pretrain`` and ``bench``.

Each subcommand hands its own arguments to a job's ``main(argv)``, imported only when that subcommand
runs (so ``medadapt --help`` needs no optional dependency). ``medadapt <command> --help`` shows the
job's options.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ._optional import MissingExtra

__all__ = ["DEMO_JOB", "FINETUNE_2D_JOB", "FINETUNE_3D_JOB", "PRETRAIN_JOB", "SEGMENT_JOB", "main"]

# "module:function" of each job; `demo` is the main job with its defaults
FINETUNE_2D_JOB = "medadapt.train.finetune2d:main"
FINETUNE_3D_JOB = "medadapt.train.finetune3d:main"
PRETRAIN_JOB = "medadapt.mim.pretrain:main"
SEGMENT_JOB = "medadapt.train.segment_job:main"
DEMO_JOB = FINETUNE_3D_JOB

_COMMANDS = {
    "demo": "the main job with its defaults: 3D SAM fine-tune (SD-Trans + HyP-Adpt) on the bundled MNI152 volume",
    "finetune": "fine-tune Med-SA adapters on SAM with prompts (2D slices; --3d for volumes with SD-Trans + HyP-Adpt)",
    "segment": "apply a fine-tune (its output folder) to NIfTI volumes: label maps on their own grids, Dice",
    "pretrain": "MambaMIM self-supervised pretraining (medadapt.mim.pretrain)",
    "bench": "run the benchmark scripts (benchmarks/bench_*.py of a source checkout)",
}


class CommandUnavailable(RuntimeError):
    """A job's module is not part of this installation."""


def _load(target: str, what: str) -> Callable[..., int | None]:
    module_name, _, function = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise CommandUnavailable(f"{what} is not available: module {module_name} is missing from this "
                                     "medadapt installation") from err
        raise
    return getattr(module, function)


def _call(target: str, what: str, argv: list[str], prog: str) -> int:
    job = _load(target, what)
    takes_prog = "prog" in inspect.signature(job).parameters
    code = job(argv, prog=prog) if takes_prog else job(argv)
    return code if isinstance(code, int) else 0  # some jobs return their results (a dict)


def _demo(argv: list[str]) -> int:
    return _call(DEMO_JOB, "the demo job", argv, "medadapt demo")


def _split_3d_flag(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--3d`` is given as an option, and argv without it.

    Only tokens before a ``--`` separator are options; after it ``--3d`` is an ordinary argument and stays
    (argparse never takes a bare ``--3d`` as another option's value, so this is the only other place).
    """
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [i for i in range(end) if argv[i] == "--3d"]
    return bool(flags), [a for i, a in enumerate(argv) if i not in flags]


def _finetune(argv: list[str]) -> int:
    is_3d, rest = _split_3d_flag(argv)
    if is_3d:
        return _call(FINETUNE_3D_JOB, "the 3D fine-tune", rest, "medadapt finetune --3d")
    return _call(FINETUNE_2D_JOB, "the 2D fine-tune", argv, "medadapt finetune")


def _segment(argv: list[str]) -> int:
    return _call(SEGMENT_JOB, "segmentation", argv, "medadapt segment")


def _pretrain(argv: list[str]) -> int:
    return _call(PRETRAIN_JOB, "pretraining", argv, "medadapt pretrain")


def _benchmark_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    return [d for d in (Path.cwd() / "benchmarks", here) if d.is_dir()]


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="medadapt bench", description="Run benchmark scripts (benchmarks/bench_<name>.py of a source "
                                           "checkout); options after the names (or after --) go to each script.")
    parser.add_argument("names", nargs="*", help="e.g. finetune (default: every bench_*.py)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--dir", type=Path, default=None, help="benchmarks folder (default: ./benchmarks)")
    args, extra = parser.parse_known_args(argv)
    folders = [args.dir] if args.dir is not None else _benchmark_dirs()
    if not folders or not folders[0].is_dir():
        raise CommandUnavailable("no benchmarks folder found: run from a medadapt source checkout or pass --dir")
    folder = folders[0]
    scripts = {p.stem.removeprefix("bench_"): p for p in sorted(folder.glob("bench_*.py"))}
    if args.list:
        print("\n".join(scripts) if scripts else f"no bench_*.py in {folder}")
        return 0
    unknown = [n for n in args.names if n not in scripts]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {sorted(scripts)}")
    extra = [a for a in extra if a != "--"]
    code = 0
    for name in args.names or list(scripts):
        print(f"== medadapt bench {name}: {scripts[name]}", flush=True)
        code = max(code, subprocess.call([sys.executable, str(scripts[name]), *extra]))
    return code


_RUNNERS: dict[str, Callable[[list[str]], int]] = {
    "demo": _demo, "finetune": _finetune, "segment": _segment, "pretrain": _pretrain, "bench": _bench}


def _top_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="medadapt", description="Parameter-efficient adapters for foundation segmenters.",
        epilog="`medadapt <command> --help` shows a command's options.")
    parser.add_argument("--version", action="version", version=f"medadapt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, text in _COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medadapt`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv or ["--help"])  # --help / --version exit here
        parser.error(f"unrecognised option {argv[0]!r}; expected a command")
    command, rest = argv[0], argv[1:]
    if command not in _RUNNERS:
        parser.error(f"unknown command {command!r}; choose from {', '.join(_COMMANDS)}")
    try:
        return _RUNNERS[command](rest)
    except (CommandUnavailable, MissingExtra) as err:  # a missing extra's message says what to install
        print(f"medadapt {command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
