"""Building the native CPU kernels: C sources shipped with attnkit, compiled on first use by the machine's compiler.

Each ``kernels/csrc/NAME.c`` is built into a shared library the first time it is needed. Which
instruction set it targets is ``$ATTNKIT_NATIVE_ISA``:

- ``auto`` (the default): ``-march=native`` (without it when the compiler refuses it), so the
  vector code fits the CPU it runs on;
- ``avx512``: ``-march=native`` on a CPU that has AVX-512F;
- ``avx2``: ``-march=haswell`` (AVX2 and FMA, no AVX-512) on a CPU that has both, which is how an
  AVX-512 machine runs the code an AVX2-only CPU would get;
- ``generic``: no ``-march`` at all, the compiler's baseline (SSE2 on x86-64, NEON on AArch64).

A kernel source picks its vector width and register blocks from the compiler's predefined macros and
says which it took through an exported ``<NAME>_isa()`` string, shown by :func:`native_status`.

A source may include headers of ``kernels/csrc`` (``*.h``), which count as part of every source.

Libraries are cached in ``$ATTNKIT_CACHE_DIR`` (default ``~/.cache/attnkit``; a private temporary
directory when that one cannot be written) under a name that hashes the source, the compiler, the
flags and the CPU, so a rebuild happens only when one of them changes, and each instruction set has
its own library. Next to each library a ``.sum`` file holds its size and SHA-256, written at build
time; a library that does not match it (a truncated copy, which would crash the process inside the
loader) is built again before anything loads it. Concurrent builds (several processes of one job)
each write their own file and rename it into place.

Without a C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH), when the build
fails (remembered in ``<library>.error`` until the compiler or the flags change), or with
``ATTNKIT_NATIVE=0``, a kernel is unavailable and attnkit runs the same computation with torch
operations; :func:`native_status` says which and why (``attnkit info`` prints it).
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
from typing import Callable, Optional

SOURCE_DIR = Path(__file__).with_name("csrc")
_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread")
_BUILD_TIMEOUT_S = 300
ISA_CHOICES: dict[str, tuple[tuple[str, ...], ...]] = {
    "auto": (("-march=native",), ()),  # tried in this order
    "avx512": (("-march=native",),),
    "avx2": (("-march=haswell",),),
    "generic": ((),),
}
"""``$ATTNKIT_NATIVE_ISA`` values and the tuning flags each builds with (alternatives in order)."""
_ISA_NEEDS = {"avx512": ("avx512f",), "avx2": ("avx2", "fma")}  # CPU flags, else the code would fault
_STATUS_NOTES: dict[str, Callable[[], str]] = {}


@dataclass(frozen=True)
class NativeLibrary:
    """A loaded kernel library (``library`` None when unavailable) and a one-line account of it."""

    library: Optional[ctypes.CDLL]
    message: str
    isa: str = ""
    """The vector path the library was compiled for, as its ``<name>_isa()`` says (``"avx2 (8-float
    vectors, 6x16 register blocks)"``), "" if it has none."""
    path: Optional[Path] = None


def cache_dir() -> Path:
    """Where built libraries are kept: ``$ATTNKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/attnkit``, else
    ``~/.cache/attnkit``."""
    if os.environ.get("ATTNKIT_CACHE_DIR"):
        return Path(os.environ["ATTNKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnkit"


def requested_isa() -> str:
    """``$ATTNKIT_NATIVE_ISA`` lower-cased, ``auto`` when unset or empty."""
    return os.environ.get("ATTNKIT_NATIVE_ISA", "").strip().lower() or "auto"


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


def cpu_identity() -> str:
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


def _missing_cpu_features(isa: str) -> list[str]:
    """The CPU flags ``isa`` needs that this CPU does not show (all of them when it cannot tell)."""
    needed = _ISA_NEEDS.get(isa, ())
    flags = next((line.split(":", 1)[-1].split() for line in cpu_identity().splitlines()
                  if line.startswith("flags")), [])
    return [flag for flag in needed if flag not in flags]


def _checksum(path: Path) -> str:
    """``"<size> <sha256>"`` of the file."""
    data = path.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _sum_file(target: Path) -> Path:
    return target.with_name(target.name + ".sum")


def _intact(target: Path) -> bool:
    """Whether ``target`` has exactly the size and checksum recorded when it was built. Checked
    before loading: the loader maps the file, and a truncated one kills the process (SIGBUS)."""
    try:
        return _sum_file(target).read_text().strip() == _checksum(target)
    except OSError:
        return False


def _build(compiler: list[str], tunings: tuple[tuple[str, ...], ...], source: Path, target: Path) -> Optional[str]:
    """Compile ``source`` to ``target`` with the first tuning that works, recording the library's
    checksum next to it; None on success, else the compiler's first error line."""
    target.parent.mkdir(parents=True, exist_ok=True)
    error = "no output"
    for tuning in tunings:
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
        os.close(handle)
        try:
            result = subprocess.run(
                [*compiler, *_FLAGS, *tuning, str(source), "-o", temporary, "-lm"],
                capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S,
            )
            if result.returncode == 0:
                # The sum first: a reader that finds the new library finds its sum too (a reader
                # between the two renames sees a mismatch and builds again, which is only slower).
                with tempfile.NamedTemporaryFile("w", dir=target.parent, suffix=".tmp", delete=False) as record:
                    record.write(_checksum(Path(temporary)) + "\n")
                os.replace(record.name, _sum_file(target))
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


def _build_once(compiler: list[str], tunings, source: Path, target: Path) -> Optional[str]:
    """None when ``target`` is intact or was just built, else the error. A failure is remembered in
    ``<target>.error``, so other processes do not repeat a failing build; the name hashes the
    compiler, its version and the flags, so changing any of them tries again (or delete the file)."""
    failed = target.with_suffix(".error")
    if _intact(target):
        return None
    if failed.exists():
        return f"{failed.read_text().strip()} (an earlier build; delete {failed} to retry)"
    error = _build(compiler, tunings, source, target)
    if error is not None:
        failed.write_text(error + "\n")
    return error


def _disabled() -> bool:
    return os.environ.get("ATTNKIT_NATIVE", "1").strip().lower() in {"0", "false", "no", "off"}


def load_native(name: str, isa: Optional[str] = None) -> NativeLibrary:
    """Build (once per source, compiler, flags and CPU) and load ``kernels/csrc/<name>.c`` for the
    instruction set ``isa`` (one of :data:`ISA_CHOICES`; default ``$ATTNKIT_NATIVE_ISA``)."""
    return _load(name, requested_isa() if isa is None else isa)


@functools.lru_cache(maxsize=None)
def _load(name: str, isa: str) -> NativeLibrary:
    if _disabled():
        return NativeLibrary(None, f"disabled by ATTNKIT_NATIVE={os.environ['ATTNKIT_NATIVE']}")
    if isa not in ISA_CHOICES:
        return NativeLibrary(None, f"ATTNKIT_NATIVE_ISA must be one of {', '.join(ISA_CHOICES)}, got {isa!r}")
    missing = _missing_cpu_features(isa)
    if missing:
        return NativeLibrary(None, f"ATTNKIT_NATIVE_ISA={isa} needs CPU features this CPU does not show: "
                                   f"{', '.join(missing)}")
    source = SOURCE_DIR / f"{name}.c"
    compiler = _compiler()
    if not compiler:
        return NativeLibrary(None, "no C compiler found (set CC)")
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as failure:
        return NativeLibrary(None, f"compiler {' '.join(compiler)} does not run: {failure}")
    tunings = ISA_CHOICES[isa]
    key = hashlib.sha256()
    # Every header of csrc counts too: a source may include them (``#include "gguf_pool.h"``).
    headers = b"".join(header.read_bytes() for header in sorted(SOURCE_DIR.glob("*.h")))
    for part in (source.read_bytes(), headers, " ".join(compiler).encode(), version.encode(), " ".join(_FLAGS).encode(),
                 repr(tunings).encode(), cpu_identity().encode()):
        key.update(part)
        key.update(b"\0")
    file_name = f"{name}-{key.hexdigest()[:16]}.so"
    try:
        target = cache_dir() / file_name
        error = _build_once(compiler, tunings, source, target)
    except OSError:  # the cache directory cannot be written: a private temporary one
        try:
            target = _private_temp_dir() / file_name
            error = _build_once(compiler, tunings, source, target)
        except OSError as failure:
            error = str(failure)
    if error is not None:
        return NativeLibrary(None, f"build with {' '.join(compiler)} failed: {error}")
    try:
        library = ctypes.CDLL(str(target))
    except OSError as failure:  # intact but not loadable (a library for another machine, say)
        return NativeLibrary(None, f"cannot load {target}: {failure}")
    path_name = _isa_path(library, name)
    where = f"built with {Path(compiler[-1]).name} (ATTNKIT_NATIVE_ISA={isa}), cached in {target.parent}"
    return NativeLibrary(library, f"{path_name}; {where}" if path_name else where, path_name, target)


def _isa_path(library: ctypes.CDLL, name: str) -> str:
    """The library's own account of the vector path it was compiled for, "" when it has none."""
    describe = getattr(library, f"{name}_isa", None)
    if describe is None:
        return ""
    describe.restype = ctypes.c_char_p
    return describe().decode()


def add_status_note(name: str, note: Callable[[], str]) -> None:
    """Register a line :func:`native_status` adds under the kernel ``name`` (how a module uses it)."""
    _STATUS_NOTES[name] = note


def native_status() -> dict[str, str]:
    """``{kernel name: one-line status}`` for every native source (building them if needed), plus
    ``{"<name> use": ...}`` rows from the modules that use them (see :func:`add_status_note`)."""
    status = {}
    for path in sorted(SOURCE_DIR.glob("*.c")):
        status[path.stem] = load_native(path.stem).message
        if path.stem in _STATUS_NOTES:
            status[f"{path.stem} use"] = _STATUS_NOTES[path.stem]()
    return status


def clear_cache() -> None:
    """Forget loaded libraries, so that the next call reads the environment and the cache again."""
    _load.cache_clear()


__all__ = ["ISA_CHOICES", "NativeLibrary", "add_status_note", "cache_dir", "clear_cache", "cpu_identity",
           "load_native", "native_status", "requested_isa"]
