"""pycocoevalcap's Java tools, the I/O side of the caption metrics: the PTB tokenizer every caption goes
through first (as in the COCO caption evaluation: lower-cased, punctuation dropped), METEOR 1.5's jar
(one long-lived JVM a process) and SPICE's, with the Stanford CoreNLP jars SPICE needs; and
`caption_scores`, a corpus's caption metrics in one process. The maths is jobs.metrics.captions.

SPICE needs the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap does not ship. They are looked up in
the `spice_lib` argument, then $NOTA_SPICE_LIB, then pycocoevalcap's own spice/lib, and last fetched
by pycocoevalcap's download, bounded in time. spice-1.0.jar is run here rather than through
pycocoevalcap's Spice class: without `-cache`, whose LMDB store breaks on Java 17, and with Rhino on
the class path, since the jar writes its JSON results through a JavaScript engine and Java 15+ has
none. A metric that cannot run is None with its reason in `unavailable`, never 0.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np
import pycocoevalcap.spice
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from jobs.metrics.captions import (CaptionScores, Captions, bleu_from_statistics, bleu_statistics, cider_d_items, combine,
                                   document_frequency, meteor_line, meteor_sums, rouge_l_items)

SPICE_JAR = Path(pycocoevalcap.spice.__file__).parent / "spice-1.0.jar"
PACKAGE_SPICE_LIB = SPICE_JAR.parent / "lib"
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
RHINO_JAR = Path("/usr/share/java/rhino.jar")  # from Debian's librhino-java
DOWNLOAD_TIMEOUT_S = 60
SPICE_HEAP = "-Xmx4G"
METEOR_LINES_AT_ONCE = 64  # their answers, some 60 bytes each, stay well inside a pipe's buffer
NO_JAVA = "caption metrics need Java, starting with the PTB tokenizer behind CIDEr-D: install Java 17"

T = TypeVar("T")


def caption_scores(
    references: Sequence[Sequence[str]], hypotheses: Sequence[str], spice_lib: str | None = None
) -> CaptionScores:
    """Corpus-level caption metrics of `hypotheses[i]` against all of `references[i]`, in one process,
    through the same steps the distributed scorer runs block by block."""
    _check(references, hypotheses)
    gts, res = tokenize(references, hypotheses)
    frequencies = document_frequency(gts)
    cider_d = float(np.mean(cider_d_items(gts, res, lambda _: frequencies, len(gts))))
    statistics, meteor_reason = meteor_statistics(gts, res)
    meteor, meteor_reason = meteor_from_statistics(meteor_sums(statistics)) if statistics is not None else (None, meteor_reason)
    f_scores, spice_reason = spice_f_scores(gts, res, spice_lib)
    return combine(len(hypotheses), cider_d, (meteor, meteor_reason),
                   (None if f_scores is None else float(np.mean(f_scores)), spice_reason),
                   bleu_from_statistics(bleu_statistics(gts, res)), float(np.mean(rouge_l_items(gts, res))))


def _check(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> None:
    if not hypotheses:
        raise ValueError("no captions to score")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference lists but {len(hypotheses)} hypotheses")
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise ValueError(f"item {i}: references must be a list of captions, not one string")
        if not refs:
            raise ValueError(f"item {i} has no reference")


def tokenize(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> tuple[Captions, Captions]:
    """PTB-tokenized references and hypotheses (item index -> captions), in one run of the tokenizer.
    It answers one line per caption, so a line break inside a caption would shift every caption after
    it: each whitespace run becomes one space first."""
    if shutil.which("java") is None:
        raise RuntimeError(NO_JAVA)
    count = len(hypotheses)
    captions = {i: list(refs) for i, refs in enumerate(references)} | {count + i: [h] for i, h in enumerate(hypotheses)}
    flat = {k: [{"caption": " ".join(c.split())} for c in v] for k, v in captions.items()}
    tokens = PTBTokenizer().tokenize(flat)
    if {k: len(v) for k, v in tokens.items()} != {k: len(v) for k, v in captions.items()}:
        raise RuntimeError("the PTB tokenizer (Java) did not return every caption; its error is above")
    return {i: tokens[i] for i in range(count)}, {i: tokens[count + i] for i in range(count)}


def meteor_statistics(gts: Captions, res: Captions) -> tuple[list[str] | None, str | None]:
    """METEOR 1.5's alignment statistics of each item (pycocoevalcap's bundled jar), the costly part;
    or None and why its JVM failed."""
    return _with_meteor(lambda meteor: _pipelined_statistics(meteor, [(res[i][0], gts[i]) for i in res]))


def _pipelined_statistics(meteor: Meteor, items: list[tuple[str, list[str]]]) -> list[str]:
    """pycocoevalcap's `Meteor._stat` of each (hypothesis, references), METEOR_LINES_AT_ONCE lines written
    before their answers are read: one round trip to the JVM a few dozen items instead of one an item."""
    statistics = []
    for start in range(0, len(items), METEOR_LINES_AT_ONCE):
        chunk = items[start:start + METEOR_LINES_AT_ONCE]
        meteor.meteor_p.stdin.write("".join(_score_line(*item) for item in chunk).encode())
        meteor.meteor_p.stdin.flush()
        statistics += [meteor.meteor_p.stdout.readline().decode().strip() for _ in chunk]
    return statistics


def _score_line(hypothesis: str, references: list[str]) -> str:
    """The line `Meteor._stat` writes (a caption holds no line break: tokenize joins its whitespace)."""
    return " ||| ".join(("SCORE", " ||| ".join(references), hypothesis.replace("|||", "").replace("  ", " "))) + "\n"


def meteor_item_scores(statistics: Sequence[str]) -> tuple[list[float] | None, str | None]:
    """Each item's METEOR from its statistics, as pycocoevalcap's compute_score asks the jar for them (one
    EVAL line), or None and why its JVM failed."""
    return _with_meteor(lambda meteor: _evaluate(meteor, statistics)[:-1])


def meteor_from_statistics(sums: np.ndarray) -> tuple[float | None, str | None]:
    """Corpus METEOR from the items' summed statistics (jobs.metrics.captions.meteor_sums): the jar's
    score of the sums, which is its EVAL's corpus score of the items' own lines; or None and why its JVM
    failed."""
    return _with_meteor(lambda meteor: _evaluate(meteor, [meteor_line(sums)])[-1])


def _evaluate(meteor: Meteor, statistics: Sequence[str]) -> list[float]:
    """The jar's EVAL of statistics lines: each line's score, then their corpus score."""
    meteor.meteor_p.stdin.write(("EVAL ||| " + " ||| ".join(statistics) + "\n").encode())
    meteor.meteor_p.stdin.flush()
    return [float(meteor.meteor_p.stdout.readline().strip()) for _ in range(len(statistics) + 1)]


def start_meteor() -> None:
    """Start this process's METEOR JVM now, so that it loads its paraphrase table while other work runs."""
    _meteor_scorer()


def _with_meteor(ask: Callable[[Meteor], T]) -> tuple[T | None, str | None]:
    meteor = _meteor_scorer()
    try:
        with meteor.lock:
            return ask(meteor), None
    except (OSError, ValueError) as error:  # the JVM is gone: a broken pipe, or no number to read
        _meteor_scorer.cache_clear()
        meteor.meteor_p.kill()
        _, stderr = meteor.meteor_p.communicate()
        return None, f"METEOR failed ({error!r}): {_tail(stderr.decode(errors='replace'))}"


@lru_cache(maxsize=1)
def _meteor_scorer() -> Meteor:
    """One METEOR JVM for the whole process: it takes seconds to load its paraphrase table."""
    return Meteor()


def spice_f_scores(gts: Captions, res: Captions, spice_lib: str | None) -> tuple[list[float] | None, str | None]:
    """Each item's SPICE F-score (NaN where it has none, as pycocoevalcap reads them; SPICE is their
    mean), or None and why not."""
    corenlp, reason = _find_corenlp(spice_lib)
    if corenlp is None:
        return None, reason
    engines = sorted(corenlp.glob("rhino*.jar")) or [jar for jar in [RHINO_JAR] if jar.is_file()]
    if not engines and _java_major() >= 15:
        return None, (
            f"Java {_java_major()} has no JavaScript engine, which spice-1.0.jar needs to write its "
            f"results: install Debian's librhino-java ({RHINO_JAR}) or put rhino*.jar in {corenlp}"
        )
    classpath, main_class = _spice_classpath(corenlp, engines)
    items = [{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in res]
    with tempfile.TemporaryDirectory(prefix="nota-spice-") as tmp:
        inputs, outputs = Path(tmp, "in.json"), Path(tmp, "out.json")
        inputs.write_text(json.dumps(items))
        command = ["java", SPICE_HEAP, "-cp", classpath, main_class, str(inputs), "-out", str(outputs)]
        done = subprocess.run([*command, "-subset", "-silent"], cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            return None, f"spice-1.0.jar exited with {done.returncode}: {_tail(done.stderr)}"
        results = json.loads(outputs.read_text())
    return [_f_score(item["scores"]["All"]["f"]) for item in results], None


def _find_corenlp(spice_lib: str | None) -> tuple[Path | None, str]:
    """The first directory holding both CoreNLP 3.6.0 jars, or None and where they were looked for."""
    places = {"spice_lib": spice_lib, "NOTA_SPICE_LIB": os.environ.get("NOTA_SPICE_LIB")}
    tried = [(label, Path(place)) for label, place in places.items() if place]
    tried.append(("pycocoevalcap", PACKAGE_SPICE_LIB))
    for _, place in tried:
        if _has_corenlp(place):
            return place, ""
    failure = _download_corenlp()
    if failure is None and _has_corenlp(PACKAGE_SPICE_LIB):
        return PACKAGE_SPICE_LIB, ""
    where = ", ".join(f"{place} ({label})" for label, place in tried)
    return None, (
        f"the Stanford CoreNLP 3.6.0 jars ({' and '.join(CORENLP_JARS)}) are not in {where}, and "
        f"pycocoevalcap's download of them failed: {failure or 'it left no jars'}. "
        "Set NOTA_SPICE_LIB to a directory holding both jars, or pass --spice-lib."
    )


def _has_corenlp(directory: Path) -> bool:
    return all((directory / jar).is_file() for jar in CORENLP_JARS)


@lru_cache(maxsize=1)
def _download_corenlp() -> str | None:
    """pycocoevalcap's own CoreNLP download, in a subprocess so that a closed network cannot hang
    the caller: None when it finished, else why not. Tried once a process."""
    code = "from pycocoevalcap.spice.get_stanford_models import get_stanford_models; get_stanford_models()"
    command = [sys.executable, "-c", code]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"no answer within {DOWNLOAD_TIMEOUT_S} s"
    return None if done.returncode == 0 else _tail(done.stderr, lines=1)


@lru_cache(maxsize=1)
def _java_major() -> int:
    """The feature version of `java`: 8 for 1.8, 17 for 17."""
    command = ["java", "-XshowSettings:properties", "-version"]
    settings = subprocess.run(command, capture_output=True, text=True).stderr
    spec = re.search(r"java\.specification\.version = (\S+)", settings)[1]
    return int(spec.removeprefix("1.").split(".")[0])


def _spice_classpath(corenlp: Path, extra: list[Path]) -> tuple[str, str]:
    """spice-1.0.jar's class path and main class, from its manifest, with the CoreNLP jars taken from
    `corenlp`, and `extra` jars."""
    manifest = _manifest(SPICE_JAR)
    jars = [
        corenlp / Path(entry).name if Path(entry).name in CORENLP_JARS else SPICE_JAR.parent / entry
        for entry in manifest["Class-Path"].split()
    ]
    # spice-1.0.jar goes last: the JVM adds the entries of its manifest right after it, behind ours.
    return os.pathsep.join(map(str, [*jars, *extra, SPICE_JAR])), manifest["Main-Class"]


def _manifest(jar: Path) -> dict[str, str]:
    with zipfile.ZipFile(jar) as archive:
        text = archive.read("META-INF/MANIFEST.MF").decode()
    text = text.replace("\r\n", "\n").replace("\n ", "")  # a line that starts with a space continues the last
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def _f_score(value: object) -> float:
    """A SPICE F-score from its JSON, NaN where it has none (pycocoevalcap's float_convert)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _tail(stderr: str, lines: int = 6) -> str:
    """The last lines of a process's error output, without Java stack frames."""
    kept = [line.strip() for line in stderr.splitlines()]
    kept = [line for line in kept if line and not line.startswith("at ")]
    return " | ".join(kept[-lines:]) or "no error output"
