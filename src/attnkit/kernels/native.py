"""Native CPU kernels: C sources shipped with attnkit, compiled on first use by the machine's compiler.

Each ``kernels/csrc/NAME.c`` is built into a shared library the first time it is needed, with
``-O3 -march=native`` so that its vector code fits the CPU it runs on (without ``-march=native``
when the compiler refuses it). Libraries are cached in ``$ATTNKIT_CACHE_DIR`` (default
``~/.cache/attnkit``; a private temporary directory when that one cannot be written) under a name
that hashes the source, the compiler, the flags and the CPU, so a rebuild happens only when one of
them changes; concurrent builds (several processes of one job) each write their own file and
rename it into place.

Without a C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH), when the build
fails (remembered in ``<library>.error``), or with ``ATTNKIT_NATIVE=0``, a kernel is unavailable
and attnkit runs the same computation with torch operations; :func:`native_status` says which and
why (``attnkit info`` prints it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
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


def _compiler() -> Optional[list[str]]:
    """The compiler command: ``$CC`` (which may hold a launcher, ``ccache gcc``), else the first of
    ``cc``, ``gcc``, ``clang`` on the PATH."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _private_temp_dir() -> Path:
    """A per-user directory in the system's temporary directory, created with mode 0700. One that
    exists but belongs to another user, or that others may write, is refused (OSError): a library
    planted there would run as this user."""
    if not hasattr(os, "getuid"):
        raise OSError("no per-user temporary directory on this system")
    path = Path(tempfile.gettempdir()) / f"attnkit-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise OSError(f"{path} is not a private directory of this user")
    return path


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


def _build(compiler: list[str], source: Path, target: Path) -> Optional[str]:
    """Compile ``source`` to ``target``; None on success, else the compiler's first error line."""
    target.parent.mkdir(parents=True, exist_ok=True)
    error = "no output"
    for tuning in _TUNING_FLAGS:
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
        os.close(handle)
        try:
            result = subprocess.run(
                [*compiler, *_FLAGS, *tuning, str(source), "-o", temporary, "-lm"],
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


def _build_once(compiler: list[str], source: Path, target: Path) -> Optional[str]:
    """None when ``target`` exists or was just built, else the error. A failure is remembered in
    ``<target>.error``, so other processes do not repeat a failing build (delete it to retry)."""
    failed = target.with_suffix(".error")
    if target.exists():
        return None
    if failed.exists():
        return f"{failed.read_text().strip()} (an earlier build; delete {failed} to retry)"
    error = _build(compiler, source, target)
    if error is not None:
        failed.write_text(error + "\n")
    return error


def _disabled() -> bool:
    return os.environ.get("ATTNKIT_NATIVE", "1").strip().lower() in {"0", "false", "no", "off"}


@functools.lru_cache(maxsize=None)
def load_native(name: str) -> NativeLibrary:
    """Build (once per source, compiler and CPU) and load ``kernels/csrc/<name>.c``."""
    if _disabled():
        return NativeLibrary(None, f"disabled by ATTNKIT_NATIVE={os.environ['ATTNKIT_NATIVE']}")
    source = SOURCE_DIR / f"{name}.c"
    compiler = _compiler()
    if not compiler:
        return NativeLibrary(None, "no C compiler found (set CC)")
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as failure:
        return NativeLibrary(None, f"compiler {' '.join(compiler)} does not run: {failure}")
    key = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(compiler).encode(), version.encode(), " ".join(_FLAGS).encode(),
                 _cpu_identity().encode()):
        key.update(part)
        key.update(b"\0")
    file_name = f"{name}-{key.hexdigest()[:16]}.so"
    try:
        target = cache_dir() / file_name
        error = _build_once(compiler, source, target)
    except OSError:  # the cache directory cannot be written: a private temporary one
        try:
            target = _private_temp_dir() / file_name
            error = _build_once(compiler, source, target)
        except OSError as failure:
            error = str(failure)
    if error is not None:
        return NativeLibrary(None, f"build with {' '.join(compiler)} failed: {error}")
    try:
        library = ctypes.CDLL(str(target))
    except OSError:  # a damaged file (an interrupted copy, say): build it again, once
        try:
            target.unlink()
            error = _build(compiler, source, target)
            library = None if error else ctypes.CDLL(str(target))
        except OSError as failure:
            error, library = str(failure), None
        if library is None:
            return NativeLibrary(None, f"cannot load {target}: {error}")
    return NativeLibrary(library, f"built with {Path(compiler[-1]).name}, cached in {target.parent}")


def native_status() -> dict[str, str]:
    """``{kernel name: one-line status}`` for every native source (building them if needed)."""
    return {path.stem: load_native(path.stem).message for path in sorted(SOURCE_DIR.glob("*.c"))}


__all__ = ["NativeLibrary", "cache_dir", "load_native", "native_status"]
