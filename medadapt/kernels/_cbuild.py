"""Building and loading the small C kernels (the CPU selective scan) on first use.

The source is compiled once per machine with the system C compiler (``$CC``, split into words, else
``cc``/``gcc``/``clang``) into ``$MEDADAPT_CACHE_DIR`` (default ``~/.cache/medadapt/kernels``), under a
name hashed from the source, the flags, the compiler and the CPU (``-march=native`` code is only valid
where it was built).
The library is written to a temporary file and renamed into place, so concurrent first uses (pytest
workers, DDP ranks) never load a half-written file. No compiler, or a failed build, is not an error:
``load_library`` returns ``None`` and records why (``build_error``); callers fall back to torch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path

from .._atomic import atomic_output

__all__ = ["cache_dir", "find_compiler", "load_library", "build_error"]

# the second set where -march=native is refused
_FLAG_SETS = (["-O3", "-march=native", "-ffp-contract=fast", "-Wno-psabi"], ["-O3", "-ffp-contract=fast", "-Wno-psabi"])
_errors: dict[str, str] = {}


def cache_dir() -> Path:
    """Where compiled kernels live: ``$MEDADAPT_CACHE_DIR`` or ``~/.cache/medadapt/kernels``."""
    root = os.environ.get("MEDADAPT_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medadapt" / "kernels"


def find_compiler() -> list[str] | None:
    """The compiler command: ``$CC`` if set, else the first of ``cc``, ``gcc``, ``clang`` on ``PATH``.

    ``$CC`` is split like a shell word list (make does the same), so ``CC="ccache gcc"`` or
    ``CC="gcc -m64"`` work; its first word is resolved on ``PATH``. A ``$CC`` that does not split (an
    unbalanced quote) is used as one word: its build then fails and the caller falls back, as for any compiler
    that does not work.
    """
    value = os.environ.get("CC", "")
    try:
        words = shlex.split(value)
    except ValueError:
        words = [value]
    if words:
        return [shutil.which(words[0]) or words[0], *words[1:]]
    for name in ("cc", "gcc", "clang"):
        if (path := shutil.which(name)) is not None:
            return [path]
    return None


def _cpu_signature() -> str:
    """Model and feature flags of this CPU (what ``-march=native`` depends on)."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return text


def build_error(name: str) -> str | None:
    """Why ``load_library(name, ...)`` returned ``None`` (``None`` if it did not)."""
    return _errors.get(name)


def _compile(compiler: list[str], args: list[str], src: Path, target: Path) -> None:
    """Compile into a temporary file beside ``target``, then rename it into place (atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target, mode=0o755) as tmp:
        run = subprocess.run([*compiler, *args, "-o", str(tmp), str(src), "-lm"], capture_output=True, text=True,
                             timeout=300)
        if run.returncode != 0:
            raise OSError(f"{shlex.join(compiler)} {' '.join(args)} failed: {run.stderr.strip()[-400:]}")


@functools.cache
def load_library(name: str, source: str) -> ctypes.CDLL | None:
    """Compile ``source`` (a C file; headers beside it) into a shared library, cached, and load it.

    Returns ``None`` when there is no compiler or the build fails; ``build_error(name)`` says why.
    """
    src = Path(source)
    compiler = find_compiler()
    if compiler is None:
        _errors[name] = "no C compiler found (set CC, or install gcc/clang)"
        return None
    code = b"".join(p.read_bytes() for p in sorted(src.parent.glob("*.[ch]")))
    last_error = ""
    for flags in _FLAG_SETS:
        args = [*flags, "-std=c99", "-fPIC", "-shared"]
        command = repr((shlex.join(compiler), args))  # a one-word compiler keys as before the split
        key = hashlib.sha256(code + command.encode() + _cpu_signature().encode()).hexdigest()[:16]
        target = cache_dir() / f"{name}-{key}.so"
        try:
            if not target.exists():
                _compile(compiler, args, src, target)
            return ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as err:
            last_error = f"could not build or load {name} ({target}): {err}"
    _errors[name] = last_error
    return None
