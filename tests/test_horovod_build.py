"""The pieces of the Horovod build that need no build: the C++ standard patch and the
choice of CMake."""

from __future__ import annotations

import os
import stat

import pytest

from gradlane.horovod_build import HorovodBuildError, patch_cxx_standard, system_cmake


def test_patch_sets_cxx20_in_both_cmakelists(tmp_path):
    (tmp_path / "horovod" / "torch").mkdir(parents=True)
    top = "project(horovod)\nset(CMAKE_CXX_STANDARD 14)\nset(CMAKE_CXX_STANDARD_REQUIRED ON)\n"
    torch_part = "if(X)\n    set(CMAKE_CXX_STANDARD 14)\nendif()\n"
    (tmp_path / "CMakeLists.txt").write_text(top)
    (tmp_path / "horovod" / "torch" / "CMakeLists.txt").write_text(torch_part)
    patch_cxx_standard(tmp_path)
    assert (tmp_path / "CMakeLists.txt").read_text() == top.replace("STANDARD 14", "STANDARD 20")
    assert "set(CMAKE_CXX_STANDARD 20)" in (tmp_path / "horovod/torch/CMakeLists.txt").read_text()
    with pytest.raises(HorovodBuildError, match="no 'set\\(CMAKE_CXX_STANDARD 14\\)' to patch"):
        patch_cxx_standard(tmp_path)  # a source that changed under us is an error, not a no-op


def _fake_cmake(folder, version: str) -> None:
    folder.mkdir()
    exe = folder / "cmake"
    exe.write_text(f"#!/bin/sh\necho 'cmake version {version}'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_cmake_4_is_passed_over_for_a_3x(tmp_path, monkeypatch):
    _fake_cmake(tmp_path / "new", "4.1.2")
    _fake_cmake(tmp_path / "old", "3.25.1")
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "new"), str(tmp_path / "old")]))
    assert system_cmake() == str(tmp_path / "old" / "cmake")
    monkeypatch.setenv("PATH", str(tmp_path / "new"))  # only 4.x on PATH: the system's 3.x
    assert system_cmake() in ("/usr/bin/cmake", "/usr/local/bin/cmake")
