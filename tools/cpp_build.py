"""CMake build of the C++ runner (runtime/cpp), shared by the tests (tests/test_et_cpp.py) and the benchmark
(bench/bench_et.py), so both run the same binary.

    python -m tools.cpp_build [--asan]      # configure + build, print the build folder

The build folder (runtime/cpp/build, or build-asan) is kept between runs, so rebuilds are incremental.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def executorch_dir() -> str:
    """The installed executorch package folder (its CMake config; executorch.__file__ is None)."""
    return importlib.util.find_spec("executorch").submodule_search_locations[0]


def cmake_exe() -> str:
    """The venv's cmake (pip's cmake >= 3.28) if present, else the one on PATH."""
    exe = Path(sys.executable).parent / "cmake"
    return str(exe) if exe.exists() else (shutil.which("cmake") or "cmake")


@functools.lru_cache(maxsize=None)
def cpp_build(asan: bool = False) -> Path:
    """Configure + build runtime/cpp into runtime/cpp/build (kept between runs: incremental)."""
    b = ROOT / "runtime" / "cpp" / ("build-asan" if asan else "build")
    cm = cmake_exe()
    args = [cm, "-S", str(ROOT / "runtime" / "cpp"), "-B", str(b), f"-DCMAKE_PREFIX_PATH={executorch_dir()}",
            f"-DFIRST_EDGE_ASAN={'ON' if asan else 'OFF'}"]
    subprocess.run(args, check=True, capture_output=True, text=True)
    r = subprocess.run([cm, "--build", str(b), "-j", str(min(2, os.cpu_count() or 1))], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError("C++ build failed:\n" + r.stdout[-3000:] + r.stderr[-3000:])
    return b


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--asan", action="store_true", help="AddressSanitizer build (runtime/cpp/build-asan)")
    print(cpp_build(asan=ap.parse_args().asan))


if __name__ == "__main__":
    main()
