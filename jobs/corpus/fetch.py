"""Reading one item's audio bytes (a whole file, or a byte range of a tar shard) with retries on transient
object-store and network errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import botocore.exceptions
import fsspec

from nota_model.errors import AudioError

RETRY_DELAYS_S = (0.5, 1.0, 2.0)


IO_ERRORS = (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, aiohttp.ClientError)


_TRANSIENT_CLIENT_ERRORS = (
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ConnectionError,
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
)


_MISSING_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


_log = logging.getLogger(__name__)
T = TypeVar("T")


def read_item_bytes(row: Mapping[str, Any], storage_options: Mapping[str, Any]) -> bytes:
    """The audio bytes of a work item: the whole file, or its byte range in a tar. Transient errors are retried
    (after 0.5, 1 and 2 s); failures raise AudioError `missing_audio`, `not_audio` (a directory), `forbidden_audio`,
    `truncated_audio` (a tar shorter than its listing) or `read_failed` (retries exhausted, or another storage error)."""
    url, offset, size = row["audio"], row.get("offset"), row.get("size")
    where = url if row.get("member") is None else f"{url} member {row['member']}"
    try:
        data = _retrying(lambda: _read(url, offset, size, storage_options), where)
    except _MISSING_ERRORS as err:
        if _is_directory(url, storage_options):
            raise AudioError("not_audio", f"{where} is a directory, not an audio file") from err
        raise AudioError("missing_audio", f"{where} does not exist") from err
    except PermissionError as err:
        raise AudioError("forbidden_audio", f"{where}: access denied; check the credentials and permissions") from err
    except IO_ERRORS as err:
        raise AudioError("read_failed", f"{where}: {err}") from err
    if size is not None and len(data) != size:
        raise AudioError("truncated_audio", f"{where}: got {len(data)} of {size} bytes: the shard has changed")
    return data


def _is_directory(url: str, storage_options: Mapping[str, Any]) -> bool:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    try:
        return fs.isdir(path)
    except IO_ERRORS:
        return False


def _read(url: str, offset: int | None, size: int | None, storage_options: Mapping[str, Any]) -> bytes:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    if offset is None:
        return fs.cat_file(path)
    return fs.cat_file(path, start=offset, end=offset + size)


def _retrying(call: Callable[[], T], what: str) -> T:
    for delay in RETRY_DELAYS_S:
        try:
            return call()
        except Exception as err:
            if not is_transient(err):
                raise
            _log.warning("transient error on %s, retrying in %.1f s: %s", what, delay, err)
            time.sleep(delay)
    return call()


def is_transient(err: BaseException) -> bool:
    if isinstance(err, (*_MISSING_ERRORS, PermissionError)):
        return False
    if isinstance(err, (OSError, *_TRANSIENT_CLIENT_ERRORS)):  # OSError includes ConnectionError, TimeoutError
        return True
    status = _http_status(err)
    return status is not None and (status >= 500 or status in (408, 429))


def _http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    status = getattr(err, "status", None)  # aiohttp ClientResponseError
    return status if isinstance(status, int) else None
