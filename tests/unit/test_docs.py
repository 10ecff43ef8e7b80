"""The docs stand alone and cover what a new user needs (install, env vars, launch lines)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEXT = {".py", ".md", ".toml", ".sh", ".cpp", ".h", ".txt", ".cfg"}


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / f for f in out if Path(f).suffix in TEXT and (ROOT / f).is_file()]


def test_no_file_cites_a_design_document_that_is_not_in_the_repo():
    name = "DESIGN" + ".md"
    assert not (ROOT / name).exists()
    cites = re.compile(r"DESIGN(\.md)?\s*(§|section)|" + re.escape(name))
    found = [str(p.relative_to(ROOT)) for p in _tracked_text_files() if cites.search(p.read_text())]
    assert found == []


def test_readme_documents_every_environment_variable_nmfx_reads():
    used = set()
    for path in (ROOT / "nmfx").rglob("*.py"):
        used |= set(re.findall(r"\bNMFX_[A-Z_]+\b", path.read_text()))
    readme = (ROOT / "README.md").read_text()
    assert {"NMFX_ISA", "NMFX_DISPATCH", "NMFX_CACHE_DIR", "NMFX_CALIBRATE"} <= used
    assert [v for v in sorted(used) if f"`{v}`" not in readme] == []


def test_readme_install_lines_cover_every_extra():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e .  " in readme
    assert [e for e in extras if f'pip install -e ".[{e}]"' not in readme] == []


def test_distributed_doc_shows_how_to_launch():
    doc = (ROOT / "docs" / "distributed.md").read_text()
    assert "torchrun --nproc_per_node" in doc and "dist.init_process_group(" in doc
