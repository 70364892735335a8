"""What the scoring tests share: SPICE unavailable without touching the network, and captioned predictions scored
once by each scorer (scoring captions on Ray Data starts an actor with a METEOR JVM of its own, for seconds)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.predictions import OutputStore
from jobs.scoring import coco_tools
from jobs.scoring.scorer import score
from tests.scoring.test_score import row
from tests.scoring.test_stages import GTS, RES


def without_spice(patch: pytest.MonkeyPatch, lib: Path) -> None:
    """SPICE as on a machine without CoreNLP: none in `lib` (NOTA_SPICE_LIB) or the package's lib, and
    pycocoevalcap's download failing at once."""
    patch.setenv("NOTA_SPICE_LIB", str(lib))
    patch.setattr(coco_tools, "PACKAGE_SPICE_LIB", lib / "none")
    patch.setattr(coco_tools, "_download_corenlp", lambda: "no network in tests")


@pytest.fixture
def no_spice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    without_spice(monkeypatch, tmp_path)


@dataclass(frozen=True)
class ScoredCaptions:
    """The captioned items GTS and RES (one part file) and what `score` made of them: its output folder in this
    process and on Ray Data, and the groups it returned on Ray Data."""

    rows: list[dict]
    in_process: Path
    on_ray: Path
    on_ray_groups: list[dict]


@pytest.fixture(scope="package")
def scored_captions(local_ray, tmp_path_factory: pytest.TempPathFactory) -> ScoredCaptions:
    root = tmp_path_factory.mktemp("captions")
    rows = [row(f"c{i}", i, corpus="sounds", task="aac", reference=GTS[i], text=RES[i][0]) for i in GTS]
    OutputStore(str(root / "predictions"), "sounds").write_shard(0, rows)
    with pytest.MonkeyPatch.context() as patch:
        without_spice(patch, root)
        score(str(root / "predictions"), str(root / "in-process"), distributed=False)
        on_ray_groups = score(str(root / "predictions"), str(root / "ray-data"), distributed=True)
    return ScoredCaptions(rows, root / "in-process", root / "ray-data", on_ray_groups)
