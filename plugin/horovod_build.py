"""Build Horovod 0.28.1 against the installed PyTorch, once, and reuse the wheel.

    python -m gradlane.horovod_build          # or: make horovod

Horovod's last release asks CMake for C++14, while PyTorch 2.13's headers need C++20,
so the published source does not build. This script downloads that source
distribution from the package registry, sets `CMAKE_CXX_STANDARD` to 20 in its
top-level and its `horovod/torch` CMakeLists, and builds a wheel with a system
CMake 3.x (CMake 4 rejects Gloo's old `cmake_minimum_required`), without build
isolation (the build compiles against the torch already installed), with
PyTorch and Gloo only. The wheel is cached under
`~/.cache/gradlane/horovod/<horovod>-torch<version>-py<version>/` (or
`$GRADLANE_CACHE/horovod/...`), so the next install takes seconds. A failed
build leaves its log there as `build-failed.log`, which the tests report.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

HOROVOD_VERSION = "0.28.1"
CXX_STANDARD = 20
PATCHED_FILES = ("CMakeLists.txt", "horovod/torch/CMakeLists.txt")
BUILD_ENV = {
    "HOROVOD_WITH_PYTORCH": "1",
    "HOROVOD_WITH_GLOO": "1",
    "HOROVOD_WITHOUT_MPI": "1",
    "HOROVOD_WITHOUT_TENSORFLOW": "1",
    "HOROVOD_WITHOUT_MXNET": "1",
}
FAILED_LOG = "build-failed.log"


class HorovodBuildError(RuntimeError):
    """The Horovod build failed; the message ends with the tail of its log."""


def cache_dir() -> Path:
    """Where the wheel for this torch and Python is kept."""
    import torch

    root = Path(os.environ.get("GRADLANE_CACHE", Path.home() / ".cache" / "gradlane"))
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    return root / "horovod" / f"{HOROVOD_VERSION}-torch{torch.__version__}-py{py}"


def works() -> bool:
    """Horovod of our version is installed and `horovod.torch` imports (in a fresh process)."""
    try:
        if metadata.version("horovod") != HOROVOD_VERSION:
            return False
    except metadata.PackageNotFoundError:
        return False
    probe = subprocess.run(
        [sys.executable, "-c", "import horovod.torch"], capture_output=True, text=True
    )
    return probe.returncode == 0


def system_cmake() -> str:
    """A CMake 3.13 <= version < 4 on PATH (the registry's cmake 4.x does not build Gloo)."""
    seen = []
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        path = Path(folder) / "cmake"
        if not path.is_file() or not os.access(path, os.X_OK):
            continue
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True).stdout
        found = re.search(r"(\d+)\.(\d+)", out)
        version = (int(found[1]), int(found[2])) if found else (0, 0)
        if (3, 13) <= version < (4, 0):
            return str(path)
        seen.append(f"{path} {version[0]}.{version[1]}")
    raise HorovodBuildError(
        "Horovod needs CMake 3.13-3.x (Debian/Ubuntu: apt-get install cmake); found "
        + (", ".join(seen) or "none on PATH")
    )


def patch_cxx_standard(source: Path) -> None:
    """Set CMAKE_CXX_STANDARD to 20 where Horovod sets it to 14."""
    for name in PATCHED_FILES:
        path = source / name
        text, count = re.subn(
            r"set\(CMAKE_CXX_STANDARD 14\)", f"set(CMAKE_CXX_STANDARD {CXX_STANDARD})",
            path.read_text(),
        )  # fmt: skip
        if count == 0:
            raise HorovodBuildError(f"{path}: no 'set(CMAKE_CXX_STANDARD 14)' to patch")
        path.write_text(text)


def _run(cmd: list[str], log, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)


def build_wheel(out: Path, log) -> Path:
    """Download, patch and build the Horovod wheel into `out`; returns its path."""
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory(prefix="horovod-build-") as tmp:
        work = Path(tmp)
        _run(pip + ["download", "--no-deps", "--no-binary", ":all:",
                    f"horovod=={HOROVOD_VERSION}", "-d", str(work)], log)  # fmt: skip
        sdist = next(work.glob("horovod-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        source = work / f"horovod-{HOROVOD_VERSION}"
        patch_cxx_standard(source)
        env = os.environ | BUILD_ENV | {"HOROVOD_CMAKE": system_cmake()}
        env.setdefault("MAKEFLAGS", f"-j{os.cpu_count() or 1}")
        _run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"),
                    str(source)], log, env)  # fmt: skip
        wheel = next((work / "dist").glob("horovod-*.whl"))
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheel, out / wheel.name))


def ensure(force: bool = False, quiet: bool = False) -> Path:
    """Install Horovod into this Python: from the cached wheel, else build it first.

    Returns the wheel used. Raises HorovodBuildError with the log's tail on failure."""
    say = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    cache = cache_dir()
    wheel = next(cache.glob("horovod-*.whl"), None)
    if not force and wheel is not None and works():
        say(f"horovod {HOROVOD_VERSION} is installed ({wheel})")
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    failed = cache / FAILED_LOG
    with tempfile.NamedTemporaryFile("w+", prefix="horovod-", suffix=".log", delete=False) as log:
        try:
            if force or wheel is None:
                say(f"building horovod {HOROVOD_VERSION} (minutes); log: {log.name}")
                wheel = build_wheel(cache, log)
            _run([sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps",
                  str(wheel)], log)  # fmt: skip
            # Horovod's own runtime dependencies (already met in a gradlane environment)
            _run([sys.executable, "-m", "pip", "install", "cloudpickle", "psutil", "pyyaml",
                  "packaging", "cffi>=1.4.0"], log)  # fmt: skip
        except (subprocess.CalledProcessError, HorovodBuildError, StopIteration) as exc:
            log.flush()
            shutil.copy(log.name, failed)
            tail = "\n".join(Path(log.name).read_text(errors="replace").splitlines()[-40:])
            raise HorovodBuildError(
                f"horovod {HOROVOD_VERSION} build failed ({exc}); full log: {failed}\n{tail}"
            ) from exc
    failed.unlink(missing_ok=True)
    Path(log.name).unlink(missing_ok=True)
    if not works():
        raise HorovodBuildError(f"horovod installed from {wheel} but `import horovod.torch` fails")
    say(f"horovod {HOROVOD_VERSION} installed from {wheel}")
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradlane.horovod_build", description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even when a wheel is cached")
    args = parser.parse_args(argv)
    try:
        ensure(force=args.force)
    except HorovodBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
