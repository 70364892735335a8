"""jobs.scoring.coco_tools (and jobs.metrics.captions behind it) on the real pycocoevalcap jars and Java: CIDEr-D against values derived by hand,
METEOR, and how SPICE reports itself unavailable. No test downloads anything."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from jobs.scoring import coco_tools
from jobs.scoring.coco_tools import caption_scores

DOG = "a dog barks loudly outside"
RAIN = "rain falls on the roof"

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="the caption metrics run on Java")


@pytest.fixture(autouse=True)
def no_corenlp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No CoreNLP jars anywhere, and pycocoevalcap's download fails without touching the network."""
    empty = tmp_path / "spice-lib"
    empty.mkdir()
    monkeypatch.setenv("NOTA_SPICE_LIB", str(empty))
    monkeypatch.setattr(coco_tools, "PACKAGE_SPICE_LIB", tmp_path / "no-package-lib")
    monkeypatch.setattr(coco_tools, "_download_corenlp", lambda: "download disabled in tests")
    return empty


def test_cider_d_is_10_when_each_hypothesis_is_its_only_reference():
    # Two items with disjoint vocabularies: every reference n-gram occurs in one item of N = 2, so its
    # weight is tf * idf = 1 * log(2 / 1), the same for all. A hypothesis equal to its reference has
    # the same tf-idf vector, so the cosine is 1 for each n = 1..4 (both captions have 5 words, so even
    # 4-grams exist); equal lengths mean no length penalty (exp(0) = 1). Mean over n and over the one
    # reference is 1, and pycocoevalcap multiplies by 10.
    scores = caption_scores([[DOG], [RAIN]], [DOG, RAIN])
    assert scores.items == 2
    assert scores.cider_d == pytest.approx(10.0, abs=1e-9)


def test_cider_d_partial_overlap_matches_the_hand_derivation():
    # N = 2 items; weight of an n-gram = tf * (log N - log max(1, df)), df counted over references:
    #   "the" is in both items' references -> df 2, weight 0;
    #   every other reference n-gram -> df 1, weight w = log 2;
    #   "howling" and the n-grams around it are in no reference -> df 0 -> max(1, 0) = 1, weight w.
    # Item A, hypothesis "the dog is howling" against "the dog is barking loudly" (all tf are 1, so the
    # clipping min(h, r) * r is the plain product h * r):
    #   n=1: hyp {the:0, dog, is, howling}, norm sqrt(3) w; ref {the:0, dog, is, barking, loudly},
    #        norm 2w; shared dog, is -> 2w^2 / (sqrt(3) w * 2w) = 1/sqrt(3)
    #   n=2: hyp {the dog, dog is, is howling} (sqrt(3) w); ref 4 bigrams (2w); shared 2 -> 1/sqrt(3)
    #   n=3: hyp {the dog is, dog is howling} (sqrt(2) w); ref 3 trigrams (sqrt(3) w); shared 1 -> 1/sqrt(6)
    #   n=4: "the dog is howling" is no reference 4-gram -> 0
    #   length penalty exp(-(4 - 5)^2 / (2 * 6^2)) = exp(-1/72)
    #   CIDEr-D(A) = 10 * exp(-1/72) * (1/sqrt(3) + 1/sqrt(3) + 1/sqrt(6) + 0) / 4 = 3.85348
    #   (weighting "the" like the other words would give n=1 a cosine of 3/(2 sqrt(5)) instead)
    # Item B, hypothesis = its reference "the rain falls on roofs": 10, as in the test above ("the"
    # weighs 0 on both sides, so the unigram cosine is still 1).
    # Corpus CIDEr-D = (3.85348 + 10) / 2 = 6.92674
    item_a = 10 * math.exp(-1 / 72) * (2 / math.sqrt(3) + 1 / math.sqrt(6)) / 4
    scores = caption_scores(
        [["the dog is barking loudly"], ["the rain falls on roofs"]],
        ["the dog is howling", "the rain falls on roofs"],
    )
    assert scores.cider_d == pytest.approx((item_a + 10) / 2, rel=1e-9)
    assert scores.cider_d == pytest.approx(6.92674, abs=1e-5)


def test_every_reference_of_an_item_counts():
    # Item 0's hypothesis shares nothing with its first reference (cosine 0) and equals its second
    # (cosine 1 for each n: all its n-grams have df 1): 10 * (0 + 1) / 2 references = 5. Item 1 equals
    # its reference: 10 ("the" has df 2, weight 0, on both sides). Corpus: 7.5. Scoring against only
    # the first reference would give 5.0, only the last 10.0.
    scores = caption_scores([["birds are singing in the trees", DOG], [RAIN]], [DOG, RAIN])
    assert scores.cider_d == pytest.approx(7.5, abs=1e-9)


def test_the_ptb_tokenizer_drops_case_punctuation_and_line_breaks():
    # A line break inside a caption must not shift the tokenizer's one-line-per-caption answer.
    scores = caption_scores([[DOG], [RAIN]], ["A dog barks,\r\nloudly outside!", "Rain falls\ron the roof."])
    assert scores.cider_d == pytest.approx(10.0, abs=1e-9)


def test_meteor_runs_and_ranks_identical_above_unrelated():
    identical = caption_scores([[DOG], [RAIN]], [DOG, RAIN])
    unrelated = caption_scores([[DOG], [RAIN]], [RAIN, DOG])
    assert "meteor" not in identical.unavailable
    assert 0 < identical.meteor <= 1
    assert 0 <= unrelated.meteor < identical.meteor


def test_spice_and_spider_are_unavailable_without_corenlp(no_corenlp: Path, tmp_path: Path):
    given = tmp_path / "given"
    scores = caption_scores([[DOG], [RAIN]], [DOG, RAIN], spice_lib=str(given))
    assert scores.spice is None and scores.spider is None
    assert scores.cider_d == pytest.approx(10.0)  # the other metrics still come
    for metric in ("spice", "spider"):
        reason = scores.unavailable[metric]
        assert f"{given} (spice_lib), {no_corenlp} (NOTA_SPICE_LIB)" in reason
        assert "download disabled in tests" in reason and "--spice-lib" in reason
    assert scores.unavailable["spider"].startswith("needs SPICE")


def test_spice_asks_for_a_javascript_engine_on_java_15_and_later(no_corenlp: Path, monkeypatch):
    if coco_tools._java_major() < 15:
        pytest.skip("Java before 15 has Nashorn")
    for jar in coco_tools.CORENLP_JARS:
        (no_corenlp / jar).touch()
    monkeypatch.setattr(coco_tools, "RHINO_JAR", no_corenlp / "no-rhino.jar")
    scores = caption_scores([[DOG], [RAIN]], [DOG, RAIN])
    assert scores.spice is None
    assert "JavaScript" in scores.unavailable["spice"] and "librhino-java" in scores.unavailable["spice"]


def test_spice_failing_at_run_time_is_reported_not_raised(no_corenlp: Path):
    # Empty files under the right names: the JVM starts SPICE's main class, which then misses CoreNLP.
    for jar in (*coco_tools.CORENLP_JARS, "rhino.jar"):
        (no_corenlp / jar).touch()
    scores = caption_scores([[DOG], [RAIN]], [DOG, RAIN])
    assert scores.spice is None and scores.spider is None
    assert "exited with 1" in scores.unavailable["spice"]
    assert "edu.stanford.nlp" in scores.unavailable["spice"]


def test_spice_classpath_takes_corenlp_from_the_lib_and_the_rest_beside_the_jar(tmp_path: Path):
    classpath, main_class = coco_tools._spice_classpath(tmp_path, [tmp_path / "rhino.jar"])
    jars = classpath.split(":")
    assert main_class == "edu.anu.spice.SpiceScorer"
    assert {str(tmp_path / jar) for jar in coco_tools.CORENLP_JARS} <= set(jars)
    assert str(coco_tools.SPICE_JAR.parent / "lib" / "SceneGraphParser-1.0.jar") in jars
    assert jars[-2:] == [str(tmp_path / "rhino.jar"), str(coco_tools.SPICE_JAR)]


@pytest.mark.parametrize(
    ("references", "hypotheses", "message"),
    [
        ([[DOG]], [DOG, RAIN], "1 reference lists but 2 hypotheses"),
        ([[DOG], []], [DOG, RAIN], "item 1 has no reference"),
        ([], [], "no captions"),
        ([DOG], [DOG], "not one string"),
    ],
)
def test_bad_input_is_a_value_error(references, hypotheses, message):
    with pytest.raises(ValueError, match=message):
        caption_scores(references, hypotheses)


def test_no_java_says_to_install_java_17(monkeypatch):
    monkeypatch.setattr(coco_tools.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="install Java 17"):
        caption_scores([[DOG]], [DOG])
