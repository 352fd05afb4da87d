"""Building, caching, validating and choosing the native kernels: kernels/native_build.py and the
native-or-planner decision of kernels/band_calibration.py."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from attnkit import SlidingWindow, attention
from attnkit.backends import Problem
from attnkit.backends.sparse import native_bands
from attnkit.kernels import band_calibration, native_build, sparse
from attnkit.kernels.band_native import band_native_attention
from attnkit.kernels.reference import reference_kernel

has_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
x86_with_avx2 = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or native_build._missing_cpu_features("avx2"),
    reason="needs an x86-64 CPU with AVX2 and FMA",
)


@pytest.fixture
def fresh_builds(monkeypatch, tmp_path):
    """A private cache and temporary directory, and no remembered libraries or decisions, for one test."""
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for name in ("ATTNKIT_NATIVE", "ATTNKIT_NATIVE_ISA", "CC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(band_calibration, "_decisions", {})
    native_build.clear_cache()
    yield tmp_path
    native_build.clear_cache()


def _window_runs_natively() -> bool:
    """The sparse backend's decision for a float32 window of head width 16 (2 heads, N=40)."""
    return native_bands(Problem(SlidingWindow(7), 40, 40, 2, 16, 16))


@has_compiler
def test_the_library_builds_with_its_checksum_beside_it(fresh_builds):
    status = native_build.load_native("band_attention")
    assert status.library is not None, status.message
    files = sorted(p.name for p in (fresh_builds / "cache").iterdir())  # no temporary files left
    assert files == [status.path.name, status.path.name + ".sum"]
    size, digest = (fresh_builds / "cache" / files[1]).read_text().split()
    assert int(size) == status.path.stat().st_size and len(digest) == 64
    assert native_build.native_status()["band_attention"] == status.message


def test_disabled_or_missing_compiler_falls_back_to_the_plan(fresh_builds, monkeypatch):
    for value in ("0", "off"):
        monkeypatch.setenv("ATTNKIT_NATIVE", value)
        native_build.clear_cache()
        assert native_build.load_native("band_attention") == native_build.NativeLibrary(None, f"disabled by ATTNKIT_NATIVE={value}")
        assert not _window_runs_natively()
    monkeypatch.setenv("ATTNKIT_NATIVE", "1")
    monkeypatch.setenv("CC", str(fresh_builds / "no-such-compiler"))
    native_build.clear_cache()
    status = native_build.load_native("band_attention")
    assert status.library is None and "no-such-compiler" in status.message
    with pytest.raises(RuntimeError, match="native library is unavailable"):
        band_native_attention(*(torch.randn(1, 1, 4, 16) for _ in range(3)), (0, 2), 1.0)
    q, k, v = (torch.randn(1, 2, 50, 16) for _ in range(3))  # the plan still runs
    expected = reference_kernel(q.double(), k.double(), v.double(), SlidingWindow(5), 0.25)[0]
    actual = attention(q, k, v, SlidingWindow(5), scale=0.25, backend="sparse")
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


@has_compiler
def test_an_unwritable_cache_directory_falls_back_to_a_private_temporary_one(fresh_builds, monkeypatch):
    blocker = fresh_builds / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(blocker / "cache"))
    status = native_build.load_native("band_attention")
    assert status.library is not None, status.message
    private = fresh_builds / "tmp" / f"attnkit-{os.getuid()}"
    assert str(private) in status.message and private.stat().st_mode & 0o777 == 0o700


@has_compiler
def test_a_temporary_directory_others_may_write_is_refused(fresh_builds, monkeypatch):
    blocker = fresh_builds / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(blocker / "cache"))
    shared = fresh_builds / "tmp" / f"attnkit-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    status = native_build.load_native("band_attention")
    assert status.library is None and "not a private directory" in status.message


@has_compiler
def test_a_failed_build_is_remembered_until_the_compiler_or_flags_change(fresh_builds, monkeypatch):
    monkeypatch.setenv("CC", "false")  # runs, and fails every compilation
    first = native_build.load_native("band_attention")
    assert first.library is None and "failed" in first.message
    native_build.clear_cache()
    second = native_build.load_native("band_attention")
    assert second.library is None and "an earlier build" in second.message
    assert len(list((fresh_builds / "cache").glob("*.error"))) == 1
    monkeypatch.setenv("ATTNKIT_NATIVE_ISA", "generic")  # other flags: tried again, not refused
    other_flags = native_build.load_native("band_attention")
    assert other_flags.library is None and "an earlier build" not in other_flags.message
    assert len(list((fresh_builds / "cache").glob("*.error"))) == 2
    monkeypatch.delenv("CC")  # another compiler (the real one): built
    native_build.clear_cache()
    assert native_build.load_native("band_attention").library is not None


_DAMAGE_AND_LOAD = """
import os, sys
from pathlib import Path
from attnkit.kernels import native_build
path = Path(sys.argv[1])
intact = path.read_bytes()
for damage in ("truncate", "garbage", "no checksum"):
    if damage == "no checksum":  # a library from before checksums, or a lost .sum: not trusted
        os.remove(str(path) + ".sum")
    else:  # a new file, as a copy leaves it: `head -c 14000 good.so > cached.so`
        Path(str(path) + ".new").write_bytes(intact[:len(intact) // 2] if damage == "truncate" else b"not a library")
        os.replace(str(path) + ".new", path)
    native_build.clear_cache()
    built = native_build.load_native("band_attention")
    assert built.library is not None and built.path == path, (damage, built.message)
    assert path.stat().st_size == len(intact), damage
print("ok")
"""


@has_compiler
def test_a_damaged_library_is_built_again_before_it_is_loaded(fresh_builds):
    """A truncated library used to kill every process that loaded it (SIGBUS inside the loader), so
    the damage is loaded in another process."""
    path = native_build.load_native("band_attention").path
    run = subprocess.run([sys.executable, "-c", _DAMAGE_AND_LOAD, str(path)], capture_output=True, text=True,
                         env=os.environ.copy(), timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", f"exit status {run.returncode}: {run.stderr[-800:]}"


def test_an_unknown_isa_is_refused_by_name(fresh_builds, monkeypatch):
    monkeypatch.setenv("ATTNKIT_NATIVE_ISA", "avx1024")
    status = native_build.load_native("band_attention")
    assert status.library is None
    assert "ATTNKIT_NATIVE_ISA must be one of auto, avx512, avx2, generic, got 'avx1024'" in status.message
    assert not _window_runs_natively()


def test_an_isa_the_cpu_lacks_is_refused_not_run(fresh_builds, monkeypatch):
    monkeypatch.setattr(native_build, "cpu_identity", lambda: "x86_64\nflags\t\t: fpu sse sse2 avx")
    for isa, missing in (("avx2", "avx2, fma"), ("avx512", "avx512f")):
        status = native_build.load_native("band_attention", isa)
        assert status.library is None and f"needs CPU features this CPU does not show: {missing}" in status.message


@has_compiler
@x86_with_avx2
def test_each_isa_build_takes_its_own_vector_path_and_library(fresh_builds):
    builds = {isa: native_build.load_native("band_attention", isa) for isa in ("auto", "avx2", "generic")}
    assert builds["avx2"].isa.startswith("avx2 (") and builds["generic"].isa.startswith("generic (")
    expected_auto = "avx512 (" if not native_build._missing_cpu_features("avx512") else "avx2 ("
    assert builds["auto"].isa.startswith(expected_auto)
    assert len({build.path for build in builds.values()}) == 3
    assert "avx2 (8-float vectors, 6x16 register blocks); built with" in builds["avx2"].message


# ---------------------------------------------------------------------------------------------
# Native kernel or planner.


def _fake_timings(monkeypatch, native_ms: float, planner_ms: float) -> list:
    """Calibration measures these instead of timing anything; returns the list of paths measured."""
    measured = []

    def fake(runs, repeats):
        measured.extend(runs)
        return {"native": native_ms, "planner": planner_ms}

    monkeypatch.setattr(band_calibration, "_best_ms", fake)
    return measured


@has_compiler
def test_a_known_fast_path_is_used_without_calibrating(fresh_builds, monkeypatch):
    measured = _fake_timings(monkeypatch, 5.0, 1.0)
    monkeypatch.setattr(band_calibration, "KNOWN_FAST", ("generic",))
    monkeypatch.setenv("ATTNKIT_NATIVE_ISA", "generic")
    decision = band_calibration.band_decision()
    assert decision.native and "known fast" in decision.reason and not measured


@has_compiler
@pytest.mark.parametrize("native_ms, planner_ms, expected", [(1.0, 2.0, True), (2.0, 1.0, False)])
def test_other_paths_take_the_faster_of_a_cached_calibration(fresh_builds, monkeypatch, native_ms, planner_ms,
                                                             expected):
    monkeypatch.setattr(band_calibration, "KNOWN_FAST", ())
    measured = _fake_timings(monkeypatch, native_ms, planner_ms)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    assert _window_runs_natively() is expected
    assert sorted(measured) == ["native", "native", "planner", "planner"]  # a window and Strided
    library = native_build.load_native("band_attention").path
    record = json.loads((library.parent / (library.name + f".choice-{torch.get_num_threads()}.json")).read_text())
    assert record["native"] is expected and native_build.cpu_identity() in record["key"]
    assert record["key"].endswith(f"threads {torch.get_num_threads()}")
    usage = native_build.native_status()["band_attention use"]
    assert usage.startswith("native kernel" if expected else "the planner") and "calibrated" in usage
    monkeypatch.setattr(band_calibration, "_decisions", {})  # another process: reads the record
    assert _window_runs_natively() is expected and len(measured) == 4
    if not expected:  # the planner runs the window
        monkeypatch.setattr(sparse, "band_native_attention", lambda *args: pytest.fail("the kernel ran"))
    expected_out = reference_kernel(q.double(), k.double(), v.double(), SlidingWindow(7), 0.3)[0]
    for backend in ("auto", "sparse"):  # exact either way
        out = attention(q, k, v, SlidingWindow(7), scale=0.3, backend=backend)
        torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-6)


@has_compiler
def test_a_calibration_for_another_library_or_cpu_is_not_reused(fresh_builds, monkeypatch):
    monkeypatch.setattr(band_calibration, "KNOWN_FAST", ())
    measured = _fake_timings(monkeypatch, 2.0, 1.0)
    assert not band_calibration.band_decision().native
    library = native_build.load_native("band_attention").path
    record_path = library.parent / (library.name + f".choice-{torch.get_num_threads()}.json")
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "key": record["key"].replace("x", "y", 1) + "0"}))
    monkeypatch.setattr(band_calibration, "_decisions", {})
    monkeypatch.setattr(band_calibration, "_best_ms", lambda runs, repeats: {"native": 1.0, "planner": 2.0})
    assert band_calibration.band_decision().native and len(measured) == 4  # measured again, and decided again


@has_compiler
def test_a_real_calibration_times_both_paths_and_keeps_the_faster(fresh_builds, monkeypatch):
    monkeypatch.setattr(band_calibration, "KNOWN_FAST", ())
    monkeypatch.setattr(band_calibration, "_CALIBRATION_SEQ", 300)
    monkeypatch.setattr(band_calibration, "_CALIBRATION_REPEATS", 1)
    decision = band_calibration.band_decision()
    ratios = [native_ms / planner_ms for native_ms, planner_ms in (decision.window_ms, decision.strided_ms)]
    assert all(ratio > 0 for ratio in ratios)
    assert decision.native == (ratios[0] * ratios[1] <= 1.0) and "calibrated here" in decision.reason


@has_compiler
def test_a_failed_calibration_keeps_the_planner(fresh_builds, monkeypatch):
    monkeypatch.setattr(band_calibration, "KNOWN_FAST", ())

    def broken():
        raise RuntimeError("native band attention: could not allocate scratch memory")

    monkeypatch.setattr(band_calibration, "_calibrate", broken)
    decision = band_calibration.band_decision()
    assert not decision.native and "calibration failed: native band attention" in decision.reason


@has_compiler
@pytest.mark.parametrize("content", ["[]", '"x"', "null", '{"native": "false"}', "{broken"])
def test_a_damaged_calibration_record_is_measured_again_not_trusted(fresh_builds, monkeypatch, content):
    monkeypatch.setattr(band_calibration, "KNOWN_FAST", ())
    measured = _fake_timings(monkeypatch, 2.0, 1.0)
    assert not band_calibration.band_decision().native
    library = native_build.load_native("band_attention").path
    record_path = library.parent / (library.name + f".choice-{torch.get_num_threads()}.json")
    if content.startswith("{\"native\""):  # the right key, a string where a boolean belongs
        record = json.loads(record_path.read_text())
        content = json.dumps({**record, "native": "false"})
    record_path.write_text(content)
    monkeypatch.setattr(band_calibration, "_decisions", {})
    decision = band_calibration.band_decision()
    assert decision.native is False and len(measured) == 8  # calibrated again (4 timings each), not an error
    assert _window_runs_natively() is False


@has_compiler
def test_concurrent_first_decisions_calibrate_once_and_force_nothing_afterwards(fresh_builds, monkeypatch):
    import threading

    monkeypatch.setattr(band_calibration, "KNOWN_FAST", ())
    calls = []

    def slow_best(runs, repeats):
        calls.append(1)
        for run in runs.values():  # each run tells the kernel its path: nothing is left set
            run()
        return {"native": 2.0, "planner": 1.0}

    monkeypatch.setattr(band_calibration, "_best_ms", slow_best)
    decisions = []
    threads = [threading.Thread(target=lambda: decisions.append(band_calibration.band_decision())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 2  # one calibration (a window and Strided), not one per thread
    assert all(decision.native is False for decision in decisions)
    assert _window_runs_natively() is False  # nothing left forcing the kernel


@pytest.mark.parametrize("flags", [(), ("-march=haswell",), ("-march=haswell", "-mno-fma"), ("-mavx512f", "-mfma")],
                         ids=["baseline", "avx2-fma", "avx2-without-fma", "avx512f"])
def test_every_kernel_source_compiles_for_each_vector_path(flags):
    """Syntax and types of every path the macros can select, including ones this CPU would not
    run (AVX2 without FMA takes the 4-float vectors: a mismatched helper once broke that build)."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler")
    sources = sorted(native_build.SOURCE_DIR.glob("*.c"))
    assert sources
    for source in sources:
        result = subprocess.run([compiler, "-std=gnu11", "-fsyntax-only", "-pthread", *flags, str(source)],
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{source.name} {flags}: {result.stderr[:500]}"
