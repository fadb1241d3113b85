"""A regular (wheel) install maps the folders into one `gradlane` namespace, like the
editable install the test suite runs from."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("compressors", "optimizers", "layers", "recipes", "recipes.lm", "recipes.vision",
               "recipes.equivariant")  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    return next(out.glob("gradlane-*.whl"))


def test_wheel_holds_one_namespace_and_the_recipe_yaml(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("gradlane-")}
    assert tops == {"gradlane"}  # no generic top-level `plugin`, `layers`, ...
    for recipe in ("lm", "vision", "equivariant"):
        assert f"gradlane/recipes/{recipe}/config.yaml" in names, recipe
    assert "gradlane/cli.py" in names
    for sub in SUBPACKAGES:
        assert f"gradlane/{sub.replace('.', '/')}/__init__.py" in names, sub


def test_installed_wheel_imports_outside_the_source_tree(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    code = (
        "import gradlane, gradlane.recipes.lm as lm; "
        + "".join(f"import gradlane.{s}; " for s in SUBPACKAGES)
        + "print(gradlane.__file__); print(lm.RECIPE.config.is_file())"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    location, yaml_found = out.stdout.split()
    assert Path(location).is_relative_to(target)
    assert yaml_found == "True"
