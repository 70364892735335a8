"""What every command shares, under `nota-batch COMMAND` and `python -m jobs.COMMAND` alike: the exit codes,
running a command's `main` (its errors as one line, Ctrl-C and SIGTERM as `interrupted`), `--debug`, and the
arguments several commands take (`--storage-options`).

Kept light (no torch, no Ray): `nota-batch --help` and a usage error answer before anything heavy loads.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from nota_model.errors import NotaError

DONE = 0  # 1: items failed under `infer --strict`, which infer returns itself
USAGE_ERROR = 2  # a usage, config, manifest or output-mismatch error
INTERRUPTED = 130  # Ctrl-C or SIGTERM: 128 + SIGINT, as shells report it
DEBUG_FLAG = "--debug"
STORAGE_OPTIONS_EXAMPLE = '{"client_kwargs": {"endpoint_url": "..."}}'

Main = Callable[[list[str] | None], int | None]


class UsageError(NotaError):
    """A command's arguments are wrong in a way argparse cannot see (a malformed JSON option, an unknown key)."""


def run_command(main: Main, argv: list[str] | None = None, name: str | None = None, debug: bool = False) -> int:
    """Run a command's `main` and turn what it raises on purpose (a NotaError: bad usage, config, manifest, a
    mismatched output) into one line on stderr and exit 2, and Ctrl-C or SIGTERM into `interrupted` and exit
    130 (a command that says more re-raises KeyboardInterrupt with its own line: "interrupted: 780 items kept; ...");
    the traceback only with `debug`."""
    prefix = f"nota-batch {name}" if name else os.path.basename(sys.argv[0])
    try:
        with _sigterm_as_interrupt():
            return main(argv) or DONE
    except NotaError as err:
        return _fail(prefix, f"error: {err}", USAGE_ERROR, debug)
    except KeyboardInterrupt as interrupt:
        return _fail(prefix, str(interrupt) or "interrupted", INTERRUPTED, debug)


def module_entry(main: Main) -> int:
    """What `python -m jobs.X` runs: `main` with the command line's arguments and the exit codes above;
    `--debug` anywhere on the line or `NOTA_DEBUG=1` adds the traceback."""
    argv, debug = without_debug_flag(sys.argv[1:])
    return run_command(main, argv, debug=debug or os.environ.get("NOTA_DEBUG", "") not in ("", "0"))


def without_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` less every `--debug` (accepted anywhere on the line, before the command or among its arguments),
    and whether there was one."""
    kept = [arg for arg in argv if arg != DEBUG_FLAG]
    return kept, len(kept) != len(argv)


def _fail(prefix: str, message: str, code: int, debug: bool) -> int:
    logging.getLogger("nota").debug("%s: %s", prefix, message, exc_info=True)
    if debug:
        traceback.print_exc()
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    return code


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, `ray job stop`, a pod's end) as Ctrl-C while the command runs (jobs.ray_session keeps
    it past `ray.init`); the handler before it put back after (None: one set outside Python, which cannot be put
    back). Only the main thread can set a handler: elsewhere this does nothing."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if main_thread:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        if previous is not None and main_thread:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# ---------------------------------------------------------------- --storage-options

# The keys fsspec's AbstractFileSystem itself reads: its listings cache (DirCache), its instance cache, its
# event loop.
GENERIC_STORAGE_KEYS = ("use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache",
                        "asynchronous", "loop")
# Filesystem classes whose `**kwargs` we have read and know where they go: to fsspec's base class (whose keys
# are GENERIC_STORAGE_KEYS) and, for s3fs, to aiobotocore's session (`profile`, ...). Any other class taking
# `**kwargs` may hand them anywhere (fsspec's HTTPFileSystem: to every aiohttp request), so keys it does not name
# cannot be checked and pass.
KWARGS_GO_TO = {
    "fsspec.asyn.AsyncFileSystem": (),
    "fsspec.implementations.memory.MemoryFileSystem": (),
    "s3fs.core.S3FileSystem": ("aiobotocore.session.AioSession",),
}


def add_storage_options_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-options", default="{}", metavar="JSON",
                        help=f"fsspec options for the URLs, e.g. an S3 endpoint: {STORAGE_OPTIONS_EXAMPLE}; keep "
                        "credentials in the AWS_* variables")


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """`--storage-options`' JSON object; anything else is a UsageError."""
    try:
        value = json.loads(text) if text else {}
    except ValueError as err:
        raise UsageError(f"--storage-options is not JSON ({err}): give an object, e.g. {STORAGE_OPTIONS_EXAMPLE}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--storage-options must be a JSON object, not {type(value).__name__}: "
                         f"e.g. {STORAGE_OPTIONS_EXAMPLE}")
    return value


def storage_options(text: str | None, urls: Iterable[str | None]) -> dict[str, Any]:
    """`--storage-options` parsed and checked, up front, against the filesystem of each URL the command is given
    (`check_storage_options`)."""
    options = parse_storage_options(text)
    check_storage_options(options, urls)
    return options


def check_storage_options(options: dict[str, Any], urls: Iterable[str | None]) -> None:
    """Refuse a key no filesystem of `urls` takes (a UsageError naming it), before the filesystem's own
    constructor fails deep inside (s3fs's aiobotocore: a long TypeError). Local paths are not checked: fsspec
    ignores their options, which may be meant for URLs a manifest holds."""
    if not options:
        return
    for protocol in sorted({_protocol(url) for url in urls if url}):
        accepted = _accepted_keys(protocol)
        unknown = sorted(set(options) - accepted) if accepted is not None else []
        if unknown:
            raise UsageError(f"--storage-options: {protocol}:// takes no option {_listing(unknown, accepted)}")


def _protocol(url: str) -> str:
    import fsspec.core

    return "" if "::" in url else fsspec.core.split_protocol(url)[0] or "file"


def _accepted_keys(protocol: str) -> set[str] | None:
    """The keys the filesystem class of `protocol` takes; None where they cannot be known (local files, a chained
    or unknown protocol, a class not installed, `**kwargs` going who knows where)."""
    import fsspec

    if protocol in ("", "file", "local"):
        return None
    try:
        filesystem = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return None  # the command's own use of the URL says what is missing
    accepted = set(GENERIC_STORAGE_KEYS)
    for klass in filesystem.__mro__:
        if klass is fsspec.AbstractFileSystem:
            return accepted
        if "__init__" not in vars(klass):
            continue
        name = f"{klass.__module__}.{klass.__qualname__}"
        if _add_named_parameters(klass.__init__, accepted) and name not in KWARGS_GO_TO:
            return None
        for destination in KWARGS_GO_TO.get(name, ()):
            _add_named_parameters(_attribute(destination).__init__, accepted)
    return accepted


def _add_named_parameters(function: Callable[..., Any], names: set[str]) -> bool:
    """Add `function`'s keyword parameters to `names`; whether it also takes `**kwargs`."""
    parameters = inspect.signature(function).parameters.values()
    names.update(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self")
    return any(p.kind is p.VAR_KEYWORD for p in parameters)


def _attribute(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _listing(unknown: list[str], accepted: set[str]) -> str:
    """The unknown keys, a close match for each, and what is accepted."""
    guesses = [f"{key!r} (did you mean {match[0]!r}?)" if (match := difflib.get_close_matches(key, accepted, 1))
               else repr(key) for key in unknown]
    return f"{', '.join(guesses)}; it takes {', '.join(sorted(accepted))}"
