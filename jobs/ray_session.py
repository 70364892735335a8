"""Joining Ray the same way in every command: the cluster `RAY_ADDRESS` names (as under `ray job submit`), else
a local one, with the caller's SIGTERM handler kept (`ray.init` puts in its own, which exits 15 without a word,
so a `kill` or a pod's end would no longer end a command as Ctrl-C does)."""

from __future__ import annotations

import os
import signal
import threading


def join_ray() -> None:
    """Start or join Ray unless this process already has, keeping the SIGTERM handler it had."""
    import ray

    if ray.is_initialized():
        return
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    ray.init(address=os.environ.get("RAY_ADDRESS"))
    if previous is not None:  # None: a handler set outside Python, or not the main thread, which cannot set one
        signal.signal(signal.SIGTERM, previous)
