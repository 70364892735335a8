"""Manifest URLs: `${VAR:-default}` expansion, resolution against the manifest's own location, globs of
tar shards, and a clear word when no filesystem serves a URL's protocol."""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from jobs.corpus.errors import ManifestError
from jobs.corpus.fetch import IO_ERRORS
from nota_model.storage import cache_dir

_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}")


def resolve_url(url: str, base: str) -> str:
    """Expand `${VAR}` / `${VAR:-default}` and `~`, then make `url` absolute against the directory URL `base`."""
    return absolute_url(os.path.expanduser(expand_variables(url)), base)


def expand_variables(text: str) -> str:
    """`${VAR}` or `${VAR:-default}`; NOTA_CACHE defaults to the project's cache (~/.cache/nota)."""

    def value(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        if name == "NOTA_CACHE":
            return str(cache_dir())
        raise ManifestError(f"{text}: environment variable {name} is not set; set it or write ${{{name}:-default}}")

    return _VARIABLE.sub(value, text)


def absolute_url(url: str, base: str) -> str:
    if "://" in url or os.path.isabs(url):
        return url
    protocol, path = fsspec.core.split_protocol(base)
    joined = posixpath.normpath(posixpath.join(path, url))
    return joined if protocol is None else f"{protocol}://{joined}"


def parent_url(url: str) -> str:
    protocol, path = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        return os.path.dirname(os.path.abspath(path))
    return f"{protocol}://{posixpath.dirname(path)}"


def glob_files(url: str, storage_options: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(URL, size) of the files matching `url`, sorted."""
    try:
        fs, pattern = fsspec.core.url_to_fs(url, **storage_options)
        found = fs.glob(pattern, detail=True)
    except IO_ERRORS as err:
        raise ManifestError(f"shards: cannot list {url}: {err}") from None
    local = isinstance(fs, LocalFileSystem)
    return [
        (path if local else fs.unstrip_protocol(path), info["size"])
        for path, info in sorted(found.items())
        if info["type"] == "file"
    ]


def protocol_problem(url: str) -> str | None:
    protocol, _ = fsspec.core.split_protocol(url)
    problem = _filesystem_problem(protocol or "file")
    return f"{url}: no filesystem for {protocol}:// ({problem})" if problem else None


@lru_cache(maxsize=None)
def _filesystem_problem(protocol: str) -> str | None:
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as err:
        return str(err)
    return None
