"""Native CPU kernels: C sources shipped with attnkit, compiled on first use by the machine's compiler.

Each ``kernels/csrc/NAME.c`` is built into a shared library the first time it is needed, with
``-O3 -march=native`` so that its vector code fits the CPU it runs on (without ``-march=native``
when the compiler refuses it). Libraries are cached in ``$ATTNKIT_CACHE_DIR`` (default
``~/.cache/attnkit``) under a name that hashes the source, the compiler, the flags and the CPU, so
a rebuild happens only when one of them changes; concurrent builds (several processes of one job)
each write their own file and rename it into place.

Without a C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH), when the build fails,
or with ``ATTNKIT_NATIVE=0``, a kernel is unavailable and attnkit runs the same computation with
torch operations; :func:`native_status` says which and why (``attnkit info`` prints it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SOURCE_DIR = Path(__file__).with_name("csrc")
_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread")
_TUNING_FLAGS = (("-march=native",), ())  # tried in this order
_BUILD_TIMEOUT_S = 300


@dataclass(frozen=True)
class NativeLibrary:
    """A loaded kernel library (``library`` None when unavailable) and a one-line account of it."""

    library: Optional[ctypes.CDLL]
    message: str


def cache_dir() -> Path:
    """Where built libraries are kept: ``$ATTNKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/attnkit``, else
    ``~/.cache/attnkit``."""
    if os.environ.get("ATTNKIT_CACHE_DIR"):
        return Path(os.environ["ATTNKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnkit"


def _compiler() -> Optional[str]:
    if os.environ.get("CC"):
        return os.environ["CC"]
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_identity() -> str:
    """The machine type and, on Linux, the CPU model and feature flags (what ``-march=native`` sees)."""
    identity = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith(("model name", "flags", "Features")):
                    identity.append(line.strip())
                if len(identity) >= 3:
                    break
    except OSError:
        pass
    return "\n".join(identity)


def _build(compiler: str, source: Path, target: Path) -> Optional[str]:
    """Compile ``source`` to ``target``; None on success, else the compiler's first error line."""
    target.parent.mkdir(parents=True, exist_ok=True)
    error = "no output"
    for tuning in _TUNING_FLAGS:
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
        os.close(handle)
        try:
            result = subprocess.run(
                [compiler, *_FLAGS, *tuning, str(source), "-o", temporary, "-lm"],
                capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S,
            )
            if result.returncode == 0:
                os.replace(temporary, target)
                return None
            lines = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            error = lines[0] if lines else f"exit status {result.returncode}"
        except (OSError, subprocess.SubprocessError) as failure:
            error = str(failure)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    return error


@functools.lru_cache(maxsize=None)
def load_native(name: str) -> NativeLibrary:
    """Build (once per source, compiler and CPU) and load ``kernels/csrc/<name>.c``."""
    if os.environ.get("ATTNKIT_NATIVE", "1") == "0":
        return NativeLibrary(None, "disabled by ATTNKIT_NATIVE=0")
    source = SOURCE_DIR / f"{name}.c"
    compiler = _compiler()
    if compiler is None:
        return NativeLibrary(None, "no C compiler found (set CC)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as failure:
        return NativeLibrary(None, f"compiler {compiler} does not run: {failure}")
    key = hashlib.sha256()
    for part in (source.read_bytes(), compiler.encode(), version.encode(), " ".join(_FLAGS).encode(),
                 _cpu_identity().encode()):
        key.update(part)
        key.update(b"\0")
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            error = _build(compiler, source, target)
        except OSError as failure:  # an unwritable cache directory
            error = str(failure)
        if error is not None:
            return NativeLibrary(None, f"build with {compiler} failed: {error}")
    try:
        library = ctypes.CDLL(str(target))
    except OSError as failure:
        return NativeLibrary(None, f"cannot load {target}: {failure}")
    return NativeLibrary(library, f"built with {Path(compiler).name}, cached in {target.parent}")


def native_status() -> dict[str, str]:
    """``{kernel name: one-line status}`` for every native source (building them if needed)."""
    return {path.stem: load_native(path.stem).message for path in sorted(SOURCE_DIR.glob("*.c"))}


__all__ = ["NativeLibrary", "cache_dir", "load_native", "native_status"]
