"""What ``pip install .`` packages: nmfx and the model zoo, not what a run leaves behind."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_demo_output_and_run_folders_are_not_packaged(tmp_path):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from setuptools import find_namespace_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pkg in ("nmfx", "nmfx/passes", "model_zoo", "nmfx-demo", "out/benchmarks"):
        (tmp_path / pkg).mkdir(parents=True)
    (tmp_path / "nmfx-demo" / "report.json").write_text("{}")  # what `nmfx demo` writes
    found = set(find_namespace_packages(str(tmp_path), include=find["include"],
                                        exclude=find.get("exclude", ())))  # fmt: skip
    assert found == {"nmfx", "nmfx.passes", "model_zoo"}


def test_demo_output_is_git_ignored():
    assert "nmfx-demo/" in (ROOT / ".gitignore").read_text().split()
