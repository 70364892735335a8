"""The distributed scorer (Ray Data) against the in-process one and against pycocoevalcap itself: the
same groups from the same rows, however they are split into blocks."""

import shutil
from datetime import timedelta

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from matplotlib import cbook
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs
from pycocoevalcap.rouge.rouge import Rouge

from jobs.scoring import coco_tools
from jobs.metrics.captions import (bleu_from_statistics, bleu_statistics, cider_d_items, document_frequency, meteor_sums,
                                   rouge_l_items)
from jobs.scoring.coco_tools import meteor_from_statistics, meteor_item_scores, meteor_statistics
from jobs.predictions import OutputStore, prediction_files
from jobs.scoring.frequencies import RANGE_KEYS, CountedFrequencies, DocumentFrequencies, frequency_parts, merge_parts
from jobs.scoring.item_table import GROUP_KEYS
from jobs.scoring.pipeline import score_blocks
from jobs.scoring.report import latency_box
from jobs.scoring.scorer import long_rows, score
from jobs.scoring.sizing import Work, estimated_work, on_ray_data
from jobs.scoring.totals import split
from tests.scoring.test_score import SPEECH, score_rows, speech_rows, write_without_signals

java = pytest.mark.skipif(shutil.which("java") is None, reason="the caption metrics run on Java")
GTS = {0: ["a dog barks loudly outside", "the dog is barking"], 1: ["rain falls on the roof"],
       2: ["birds are singing in the trees", "a bird sings"], 3: ["a man speaks while cars pass by"]}
RES = {0: ["a dog is howling"], 1: ["rain falls on roofs"], 2: ["a bird sings"], 3: ["people talking and a car passing"]}


def blocks(captions_by_item: dict, *parts: range) -> list[dict]:
    return [{i: captions_by_item[i] for i in part} for part in parts]


@java
def test_cider_d_in_blocks_with_corpus_frequencies_is_pycocoevalcaps_per_item():
    expected_mean, expected = Cider().compute_score(GTS, RES)
    frequencies = document_frequency(blocks(GTS, range(2))[0])
    for ngram, count in document_frequency(blocks(GTS, range(2, 4))[0]).items():
        frequencies[ngram] += count
    scores = [s for gts, res in zip(blocks(GTS, range(2), range(2, 4)), blocks(RES, range(2), range(2, 4)))
              for s in cider_d_items(gts, res, lambda _: frequencies, corpus_items=4)]
    assert scores == pytest.approx(list(expected), abs=1e-12) and np.mean(scores) == pytest.approx(expected_mean, abs=1e-12)


def test_document_frequencies_are_pycocoevalcaps():
    rng = np.random.default_rng(37)
    words = ["a", "dog", "barks", "the", "dog barks", "", "  "]  # n-grams repeated in a caption and across references
    gts = {i: [" ".join(rng.choice(words, rng.integers(0, 9))) for _ in range(rng.integers(1, 5))] for i in range(300)}
    scorer = CiderScorer()
    scorer.crefs = [cook_refs(refs) for refs in gts.values()]
    scorer.compute_doc_freq()
    assert document_frequency(gts) == scorer.document_frequency and max(scorer.document_frequency.values()) > 1


# hypotheses shorter and longer than their closest reference (BLEU's brevity penalty, its closest length)
LONG_GTS = GTS | {4: ["a door creaks open slowly", "someone opens a creaking door"], 5: ["water drips"],
                  6: ["thunder rumbles in the distance while rain falls", "a storm with thunder"]}
LONG_RES = RES | {4: ["a door creaks open slowly and then closes again"], 5: ["water"], 6: ["thunder rumbles far away"]}


@pytest.mark.parametrize("parts", [(range(7),), (range(3), range(3, 7)), tuple(range(i, i + 1) for i in range(7))])
def test_bleu_from_summed_block_statistics_is_pycocoevalcaps_whole_set_score(parts):
    expected, _ = Bleu(4).compute_score(LONG_GTS, LONG_RES, verbose=0)
    statistics = sum(bleu_statistics(gts, res) for gts, res in zip(blocks(LONG_GTS, *parts), blocks(LONG_RES, *parts)))
    assert bleu_from_statistics(statistics) == pytest.approx(expected, abs=1e-9)
    assert expected[3] < expected[0] < 1  # not a degenerate case: partial matches at every order


def test_rouge_l_mean_over_blocks_is_pycocoevalcaps_whole_set_score():
    expected, per_item = Rouge().compute_score(LONG_GTS, LONG_RES)
    scores = [s for gts, res in zip(blocks(LONG_GTS, range(3), range(3, 7)), blocks(LONG_RES, range(3), range(3, 7)))
              for s in rouge_l_items(gts, res)]
    assert scores == pytest.approx(list(per_item), abs=1e-12) and np.mean(scores) == pytest.approx(expected, abs=1e-12)


# items matched whole: in one chunk (whose chunk the jar's corpus sum leaves out) and in several
WHOLE_GTS = GTS | {4: ["the dog is barking"], 5: ["the dog is barking", "a dog barks"]}
WHOLE_RES = RES | {4: ["the dog is barking"], 5: ["barking is the dog"]}


@java
@pytest.mark.parametrize("lines_at_once", [1, 3, 64])
def test_meteor_from_summed_statistics_of_blocks_is_pycocoevalcaps_corpus_score(monkeypatch, lines_at_once):
    monkeypatch.setattr(coco_tools, "METEOR_LINES_AT_ONCE", lines_at_once)
    meteor = coco_tools._meteor_scorer()
    assert meteor_statistics(WHOLE_GTS, WHOLE_RES)[0] == [meteor._stat(WHOLE_RES[i][0], WHOLE_GTS[i]) for i in WHOLE_RES]
    expected, per_item = meteor.compute_score(WHOLE_GTS, WHOLE_RES)  # pycocoevalcap's own, on the same JVM
    parts = (range(1), range(1, 5), range(5, 6))
    statistics = [meteor_statistics(gts, res)[0] for gts, res in zip(blocks(WHOLE_GTS, *parts), blocks(WHOLE_RES, *parts))]
    assert meteor_from_statistics(sum(meteor_sums(lines) for lines in statistics)) == (expected, None)
    assert [score for lines in statistics for score in meteor_item_scores(lines)[0]] == per_item
    plain_sums = np.array([line.split() for lines in statistics for line in lines], dtype=float).sum(axis=0)
    assert meteor_from_statistics(plain_sums)[0] != expected  # the whole match's chunk counts


def write_shards(root, rows_by_shard: list[list[dict]]) -> str:
    store = OutputStore(str(root), "speech")
    for shard, rows in enumerate(rows_by_shard):
        store.write_shard(shard, [r | {"shard": shard} for r in rows])
    return str(root)


def three_shards() -> list[list[dict]]:
    """The speech rows of test_score twice over three part files; one model batch (w1, T0+100 s) has items
    in two files, and the second job's rows run an hour later on worker w3."""
    first = speech_rows([hyp for _, hyp in SPEECH])
    later = [r | {"id": f"{r['id']}-b", "job_id": "job-2", "worker": "w3", "text": r["reference"][0] if r["text"] else None,
                  "ttft_s": r["ttft_s"] and r["ttft_s"] * 3, "created_at": r["created_at"] and r["created_at"] + timedelta(hours=1)}
             for r in speech_rows(["a", "b", "c"])]
    return [first[:1], first[1:] + later[:2], later[2:]]


def test_distributed_scoring_gives_the_in_process_groups_and_latency_statistics(local_ray, tmp_path):
    shards = three_shards()
    shards[1:] = [[r if r["error"] else r | {"flags": ["low_confidence"] if r["text"] else [], "mean_logprob": -1.5} for r in shard]
                  for shard in shards[1:]]
    predictions = write_shards(tmp_path / "predictions", shards)
    write_without_signals(tmp_path / "predictions/speech/part-00000.parquet", shards[0])  # read with null signals
    (distributed,) = score(predictions, str(tmp_path / "scores"), distributed=True)
    (in_process,) = score_rows([r for shard in shards for r in shard])
    assert (distributed["signalled_items"], distributed["flags"]["low_confidence"]) == (5, 5)
    assert distributed["quality"] == in_process["quality"]  # WER and CER exactly
    assert (in_process["quality"]["reference_words"], in_process["errors"], in_process["items"]) == (18, 2, 8)
    assert distributed["workers"].keys() == {"w1", "w2", "w3"}
    assert metrics(distributed) == pytest.approx(metrics(in_process), rel=1e-12)
    assert in_process["workers"]["w1"]["wall_s"] == 4.0  # its batch is counted once, though split over two files
    ttft = [r["ttft_s"] for shard in shards for r in shard if r["ttft_s"] is not None]
    (expected,) = cbook.boxplot_stats(np.array(ttft))
    box = latency_box(score_blocks([pa_table(shards)]).latency[("speech", "asr", "m1")]["ttft_s"])
    assert {k: v for k, v in box.items() if k != "fliers"} == pytest.approx({k: v for k, v in expected.items() if k != "fliers"})
    assert (tmp_path / "scores/charts/latency.png").read_bytes().startswith(b"\x89PNG")


def metrics(group: dict) -> dict:
    """Every figure of a group, as jobs.score writes them to metrics.parquet."""
    return {(r["worker"], r["metric"]): r["value"] for r in long_rows([group])}


def pa_table(shards):
    from jobs.predictions import OUTPUT_SCHEMA

    return pa.Table.from_pylist([r for shard in shards for r in shard], schema=OUTPUT_SCHEMA)


@java
def test_distributed_captioning_gives_the_in_process_cider_d_and_meteor(scored_captions, no_spice):
    (distributed,) = scored_captions.on_ray_groups
    (in_process,) = score_rows(scored_captions.rows)
    assert in_process["quality"]["cider_d"] == pytest.approx(Cider().compute_score(GTS, RES)[0], abs=1e-9)
    assert in_process["quality"]["meteor"] == pytest.approx(coco_tools._meteor_scorer().compute_score(GTS, RES)[0], abs=1e-9)
    assert distributed["quality"] == pytest.approx(in_process["quality"], abs=1e-9)
    bleu, _ = Bleu(4).compute_score(GTS, RES, verbose=0)
    assert [distributed["quality"][f"bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-9)
    assert distributed["quality"]["rouge_l"] == pytest.approx(Rouge().compute_score(GTS, RES)[0], abs=1e-9)
    assert distributed["unavailable"].keys() == {"spice", "spider"}


def caption_items(group: str, gts: dict, res: dict) -> pa.Table:
    """Stage 1's captioning columns for already tokenized captions."""
    return pa.table({"corpus": [group] * len(res), "task": ["aac"] * len(res), "model": ["m"] * len(res),
                     "caption_refs": list(gts.values()), "caption_hyp": [hyp for (hyp,) in res.values()]})


def test_document_frequencies_merged_by_hash_range_are_the_frequency_dicts_added_up():
    first, second = blocks(GTS, range(2), range(2, 4))
    parts = pa.concat_tables([caption_items("a", first, blocks(RES, range(2))[0]),
                              caption_items("a", second, blocks(RES, range(2, 4))[0]),
                              caption_items("b", second, blocks(RES, range(2, 4))[0])])
    parts = pa.concat_tables([frequency_parts(parts.slice(0, 2)), frequency_parts(parts.slice(2))])
    merged = [merge_parts(rows) for rows in split(parts, RANGE_KEYS).values()]
    assert len({row["range"] for row in parts.to_pylist()}) > 1 and all(table.num_rows == 1 for table in merged)
    frequencies = DocumentFrequencies(merged)
    first, second = document_frequency(first), document_frequency(second)
    expected = {ngram: first.get(ngram, 0.0) + second.get(ngram, 0.0) for ngram in first | second}
    assert frequencies.lookup(("a", "aac", "m"), [*expected, ("no", "such", "ngram")]) == expected
    assert frequencies.lookup(("b", "aac", "m"), expected) == second
    assert len(frequencies) == len(expected) + len(second)
    key, number = tuple(merged[0][name][0].as_py() for name in GROUP_KEYS), merged[0]["range"][0].as_py()
    data = merged[0]["hashes"].chunk(0).buffers()[2]
    assert data.address <= DocumentFrequencies(merged).ranges[key][number].hashes.ctypes.data < data.address + data.size  # in place


def test_counted_frequencies_of_blocks_are_the_merged_parts():
    first, second = blocks(GTS, range(2), range(2, 4))
    items = [caption_items("a", first, blocks(RES, range(2))[0]), caption_items("a", second, blocks(RES, range(2, 4))[0]),
             caption_items("b", second, blocks(RES, range(2, 4))[0])]
    counted = CountedFrequencies()
    for block in items:
        counted.add(block)
    parts = pa.concat_tables([frequency_parts(block) for block in items])
    merged = DocumentFrequencies([merge_parts(rows) for rows in split(parts, RANGE_KEYS).values()])
    ngrams = [*document_frequency(GTS), ("no", "such", "ngram")]
    for key in (("a", "aac", "m"), ("b", "aac", "m")):
        assert counted.lookup(key, ngrams) == merged.lookup(key, ngrams)
    assert counted.lookup(("a", "aac", "m"), ngrams) == document_frequency(GTS)


def test_the_work_estimate_reads_rows_and_tasks_from_sampled_footers(tmp_path):
    store = OutputStore(str(tmp_path), "speech")
    speech = speech_rows([hyp for _, hyp in SPEECH])
    for shard in range(40):
        store.write_shard(shard, [r | {"id": f"{shard}-{r['id']}", "shard": shard} for r in speech])
    fs, root = fsspec.core.url_to_fs(str(tmp_path))
    work = estimated_work(fs, prediction_files(fs, root))
    assert work.asr_rows == pytest.approx(40 * len(speech), rel=0.05) and work.caption_rows == 0
    store.write_shard(0, [r | {"shard": 0, "task": "aac"} for r in speech])  # a file of captions, sampled, scaled by the bytes
    work = estimated_work(fs, prediction_files(fs, root))
    assert work.caption_rows >= len(speech) and work.asr_rows + work.caption_rows == pytest.approx(40 * len(speech), rel=0.05)


def test_ray_data_takes_what_it_would_score_sooner_on_the_clusters_cpus_or_what_would_not_fit_in_memory():
    plenty = 1e15
    assert not any(on_ray_data(Work(asr_rows=rows), cpus=2, memory_bytes=plenty) for rows in (1e3, 1e6, 1e9))
    assert not on_ray_data(Work(asr_rows=1e5), cpus=64, memory_bytes=plenty)  # Ray's start-up is most of it
    assert on_ray_data(Work(asr_rows=1e7), cpus=64, memory_bytes=plenty)
    assert not on_ray_data(Work(caption_rows=2e4), cpus=2, memory_bytes=plenty)
    assert on_ray_data(Work(caption_rows=2e4), cpus=1, memory_bytes=Work(caption_rows=1e4).in_process_bytes())
    assert not on_ray_data(Work(asr_rows=1e9), cpus=1, memory_bytes=0)  # ASR rows are not kept
