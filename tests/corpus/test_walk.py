"""jobs.corpus.walk: a tar shard or an item-list slice to its checked work items, with their audio when asked;
read failures are the items' errors, ids are checked by the checks the caller passes."""

from __future__ import annotations

from jobs.corpus.fetch import read_item_bytes
from jobs.corpus.items import WorkItemChecks
from jobs.corpus.manifest_schema import Manifest, load_manifest
from jobs.corpus.walk import ListSlice, TarShard, walk, whole
from tests.corpus.test_manifest import write_audio, write_jsonl
from tests.corpus.test_tars import shard_with_three_items


def item_list(tmp_path) -> Manifest:
    """Five items in shards of three: u0, u1 (its audio missing), u0 again, u3, u4."""
    for name in ("u0", "u3", "u4"):
        write_audio(tmp_path / f"{name}.wav", frequency=300 + len(name))
    ids = ["u0", "u1", "u0", "u3", "u4"]
    write_jsonl(tmp_path / "items.jsonl", [{"id": item_id, "audio": f"{item_id}.wav"} for item_id in ids])
    return Manifest(name="c", task="asr", items=str(tmp_path / "items.jsonl"), items_per_shard=3)


def test_an_item_list_slice_gives_its_items_with_their_audio_and_read_failures_as_errors(tmp_path):
    manifest = item_list(tmp_path)
    first = manifest.input_shards()[0]

    got = list(walk(ListSlice(first, 1, 3), manifest, WorkItemChecks(manifest)))

    assert [(item["id"], item["shard"], item["index"], item["error"]) for item, _ in got] == [
        ("u1", 0, 1, "missing_audio"), ("u0", 0, 2, None)]
    assert got[0][1] is None and got[1][1] == (tmp_path / "u0.wav").read_bytes()


def test_ids_are_checked_across_what_the_checks_have_seen_and_no_audio_is_read_when_not_asked(tmp_path):
    manifest = item_list(tmp_path)
    first = manifest.input_shards()[0]

    alone = [item for item, _ in walk(ListSlice(first, 2, 3), manifest, WorkItemChecks(manifest))]
    whole_shard = list(walk(whole(first), manifest, WorkItemChecks(manifest), with_audio=False))

    assert [item["error"] for item in alone] == [None]
    assert [item["error"] for item, _ in whole_shard] == [None, None, "duplicate_id"]  # u1's audio never read
    assert all(data is None for _, data in whole_shard)


def test_a_tar_shard_gives_its_items_with_the_bytes_of_their_members(tmp_path):
    shard, _ = shard_with_three_items(tmp_path)
    manifest = load_manifest(str(tmp_path / "abc.yaml"))

    got = list(walk(TarShard(4, str(shard), shard.stat().st_size), manifest, WorkItemChecks(manifest)))

    assert [(item["id"], item["shard"], item["index"]) for item, _ in got] == [("a", 4, 0), ("b", 4, 1), ("c", 4, 2)]
    assert all(data == read_item_bytes(item, {}) for item, data in got)
    assert manifest.input_shards() == [TarShard(0, str(shard), shard.stat().st_size)]
