import itertools
import json
import logging
import os
import random
import threading
import time

import pytest
import torch

from editflow.data.batches import ImageBatch
from editflow.data.samples import SampleError, decode_sample
from editflow.data.shards import shard_urls, write_shard
from editflow.data.stream import BucketStream, ResumableLoader, ShardSet
from editflow.data.threads import ordered_map
from editflow.data.toy_shards import toy_sample, write_toy_shards
from editflow.errors import DataError


@pytest.fixture(scope="module")
def toy_urls(tmp_path_factory):
    out = write_toy_shards(tmp_path_factory.mktemp("toy") / "s", num=120, seed=0, samples_per_shard=10,
                           progress=False)
    return shard_urls(out)


def keys_of(loader, n):
    return [k for batch in itertools.islice(loader, n) for k in batch.keys]


def with_skips(loader, n):
    """The loader's next `n` batches, each with the skip counts the loader reports right after it."""
    return [(batch, dict(loader.skips)) for batch in itertools.islice(loader, n)]


def make(urls, rank=0, world=1, batch=4, seed=0, workers=0, buffer=16, threads=0, **kw):
    stream = BucketStream([ShardSet("toy", urls)], batch, rank=rank, world_size=world, seed=seed,
                          shuffle_buffer=buffer, bucket_base=64, decode_threads=threads, **kw)
    return ResumableLoader(stream, num_workers=workers)


# decoding in the loop's own thread and in 2 decode threads must give the same stream
THREADS = pytest.mark.parametrize("threads", [0, 2], ids=["serial", "2-threads"])


def test_ranks_read_disjoint_samples_covering_the_data(toy_urls):
    # without a shuffle buffer the first 40 samples of a rank are exactly its share of epoch 0
    per_rank = [set(keys_of(make(toy_urls, rank=r, world=3, buffer=1), 10)) for r in range(3)]
    assert all(len(k) == 40 for k in per_rank)  # 120 samples / 3 ranks: one epoch each, no repeats
    assert not (per_rank[0] & per_rank[1]) and not (per_rank[1] & per_rank[2]) and not (per_rank[0] & per_rank[2])
    assert len(set.union(*per_rank)) == 120


def test_workers_split_a_rank_without_overlap(toy_urls):
    keys = keys_of(make(toy_urls, workers=2, buffer=1), 30)
    assert len(set(keys)) == 120  # first epoch: every sample exactly once


def test_resume_continues_with_the_next_unseen_batch(toy_urls):
    reference = make(toy_urls, seed=3)
    expected = [b.keys for b in itertools.islice(reference, 12)]
    first = make(toy_urls, seed=3)
    seen = [b.keys for b in itertools.islice(first, 5)]
    state = first.state_dict()
    resumed = make(toy_urls, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint round trip
    seen += [b.keys for b in itertools.islice(resumed, 7)]
    assert seen == expected


def test_resume_with_workers(toy_urls):
    expected = [b.keys for b in itertools.islice(make(toy_urls, workers=2), 9)]
    first = make(toy_urls, workers=2)
    seen = [b.keys for b in itertools.islice(first, 4)]
    resumed = make(toy_urls, workers=2)
    resumed.load_state_dict(first.state_dict())
    seen += [b.keys for b in itertools.islice(resumed, 5)]
    assert seen == expected


def test_changed_world_size_is_reported(toy_urls):
    state = make(toy_urls, world=2).state_dict()
    with pytest.raises(ValueError, match="world size 2"):
        make(toy_urls, world=4).load_state_dict(state)


def test_batches_share_one_bucket(tmp_path):
    samples = [toy_sample(i, seed=0, size=64) for i in range(8)] + [toy_sample(i, seed=1, size=128) for i in range(8)]
    for i, s in enumerate(samples):
        s["__key__"] = f"k{i:03d}"
    write_shard(tmp_path / "mixed.tar", samples)
    loader = make([str(tmp_path / "mixed.tar")], batch=4)
    for batch in itertools.islice(loader, 6):
        assert batch.target.shape[-2:] == batch.source.shape[-2:]
        assert len({tuple(t.shape) for t in batch.target}) == 1


def test_weighted_mixing_follows_the_weights(tmp_path):
    sets = []
    for name, seed in (("a", 0), ("b", 1)):
        out = write_toy_shards(tmp_path / name, num=40, seed=seed, samples_per_shard=10, progress=False)
        sets.append(ShardSet(name, shard_urls(out), weight=3.0 if name == "a" else 1.0))
    loader = ResumableLoader(BucketStream(sets, 8, shuffle_buffer=4, bucket_base=64))
    keys = keys_of(loader, 25)
    share_a = sum(k.startswith("toy0000") for k in keys) / len(keys)
    assert 0.65 < share_a < 0.85


def test_an_image_field_that_is_not_an_image_says_what_it_is():
    raw = {**toy_sample(0, seed=0, size=64), "__url__": "s.tar", "__key__": "k0"}
    raw["src.png"] = b"version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 1234\n"
    with pytest.raises(SampleError, match=r"shard s\.tar, key k0, field src\.png: not an image file: a Git LFS pointer"):
        decode_sample(raw)
    raw["src.png"] = b"\x00\x01garbage"
    with pytest.raises(SampleError, match=r"field src\.png: not an image file PIL can read \(9 bytes, starting"):
        decode_sample(raw)


@THREADS
def test_bad_samples_are_counted_and_too_many_stop_the_run(threads, tmp_path):
    samples = [toy_sample(i, seed=0, size=64) for i in range(40)]
    for s in samples[::2]:
        s["src.png"] = b"not a png"
    write_shard(tmp_path / "bad.tar", samples)
    lenient = make([str(tmp_path / "bad.tar")], batch=4, buffer=1, max_skip_rate=0.9, min_seen_for_skip_rate=1000,
                   threads=threads)
    batch = next(lenient)
    assert len(batch) == 2 and lenient.skips == {"undecodable_image": 2}
    strict = make([str(tmp_path / "bad.tar")], batch=4, max_skip_rate=0.1, min_seen_for_skip_rate=10, threads=threads)
    with pytest.raises(RuntimeError, match="max_skip_rate"):
        list(itertools.islice(strict, 20))


def test_the_loader_reports_the_skips_of_all_its_workers(tmp_path):
    urls = []
    for shard in range(2):  # one shard per worker, each with two undecodable samples among its first five
        samples = [toy_sample(i, seed=shard, size=64) for i in range(10)]
        for s in (samples[0], samples[4]):
            s["src.png"] = b"not a png"
        write_shard(tmp_path / f"{shard}.tar", samples)
        urls.append(str(tmp_path / f"{shard}.tar"))
    loader = make(urls, workers=2, batch=4, buffer=1, max_skip_rate=0.9)
    assert loader.skips == {}
    batches = list(itertools.islice(loader, 2))  # one batch from each worker: 4 samples read, 1 skipped
    assert all(isinstance(b, ImageBatch) for b in batches) and [len(b) for b in batches] == [3, 3]
    assert loader.skips == {"undecodable_image": 2}
    next(loader)
    assert loader.skips == {"undecodable_image": 3}


def truncate(path, fraction):
    os.truncate(path, int(os.path.getsize(path) * fraction))


@THREADS
def test_truncated_shard_is_counted_as_a_skip_naming_it(threads, tmp_path, caplog):
    good = [toy_sample(i, seed=0, size=64) for i in range(10)]
    write_shard(tmp_path / "good.tar", good)
    write_shard(tmp_path / "cut.tar", [toy_sample(i, seed=1, size=64) for i in range(10)])
    truncate(tmp_path / "cut.tar", 0.55)
    loader = make([str(tmp_path / "good.tar"), str(tmp_path / "cut.tar")], batch=2, buffer=1, max_skip_rate=0.5,
                  threads=threads)
    batches = list(itertools.islice(loader, 12))
    assert loader.skips["unreadable_shard"] >= 1
    assert any("cut.tar cannot be read to the end" in r.message for r in caplog.records)
    keys = {k for b in batches for k in b.keys}
    assert {s["__key__"] for s in good} <= keys  # the intact shard, and what precedes the damage, still train
    strict = make([str(tmp_path / "cut.tar")], batch=2, buffer=1, max_skip_rate=0.01, min_seen_for_skip_rate=5,
                  threads=threads)
    with pytest.raises(DataError, match=r"cut\.tar.*max_skip_rate|max_skip_rate.*cut\.tar"):
        list(itertools.islice(strict, 50))


@THREADS
def test_a_set_with_no_samples_fails_instead_of_waiting_forever(threads, tmp_path):
    write_shard(tmp_path / "empty.tar", [])
    with pytest.raises(DataError, match="shard set 'toy'.*yielded no sample"):
        next(make([str(tmp_path / "empty.tar")], threads=threads))
    (tmp_path / "zero.tar").write_bytes(b"")  # not even a tar: counted, then the same verdict
    with pytest.raises(DataError, match="yielded no sample"):
        next(make([str(tmp_path / "zero.tar")], max_skip_rate=0.99, threads=threads))


@THREADS
def test_every_sample_undecodable_stops_with_the_reason(threads, tmp_path):
    samples = [toy_sample(i, seed=0, size=64) for i in range(3)]
    for s in samples:
        s["tgt.png"] = b"broken"
    write_shard(tmp_path / "bad.tar", samples)
    with pytest.raises(DataError, match="undecodable_image.*max_skip_rate"):
        next(make([str(tmp_path / "bad.tar")], batch=2, max_skip_rate=0.5, min_seen_for_skip_rate=20, threads=threads))


@THREADS
def test_fewer_samples_than_readers_is_an_error_not_a_hang(threads, tmp_path):
    write_shard(tmp_path / "one.tar", [toy_sample(0, seed=0, size=64)])
    with pytest.raises(DataError, match="1 samples, fewer than the 2 readers"):
        next(make([str(tmp_path / "one.tar")], rank=1, world=2, batch=1, threads=threads))


@THREADS
def test_two_records_under_one_key_are_skipped_as_duplicates(threads, tmp_path):
    samples = [toy_sample(i, seed=0, size=64) for i in range(4)]
    samples[1]["__key__"] = samples[0]["__key__"]  # written one after the other: one key, fields twice
    write_shard(tmp_path / "dup.tar", samples)
    loader = make([str(tmp_path / "dup.tar")], batch=1, buffer=1, max_skip_rate=0.9, threads=threads)
    batches = list(itertools.islice(loader, 2))
    assert loader.skips == {"duplicate_key": 1}
    assert samples[0]["__key__"] not in {k for b in batches for k in b.keys}


def test_worker_errors_reach_the_trainer_as_one_paragraph(tmp_path):
    write_shard(tmp_path / "empty.tar", [])
    with pytest.raises(DataError) as info:
        next(make([str(tmp_path / "empty.tar")], workers=1))
    assert "Traceback" not in str(info.value) and "yielded no sample" in str(info.value)


def test_a_shard_cut_between_two_members_is_detected(tmp_path):
    """tarfile ends silently when the cut falls on a member boundary: the missing end blocks give it away."""
    import tarfile

    from editflow.data.shards import iter_tar

    write_shard(tmp_path / "s.tar", [toy_sample(i, seed=0, size=64) for i in range(4)])
    with tarfile.open(tmp_path / "s.tar") as tar:
        members = tar.getmembers()
    boundary = members[6].offset  # the header of the 2nd sample's 3rd member: its src/tgt are gone
    os.truncate(tmp_path / "s.tar", boundary)
    with pytest.raises(tarfile.ReadError, match=f"no end-of-archive blocks at byte {boundary}"):
        list(iter_tar(str(tmp_path / "s.tar")))
    write_shard(tmp_path / "whole.tar", [toy_sample(i, seed=0, size=64) for i in range(4)])
    assert len(list(iter_tar(str(tmp_path / "whole.tar")))) == 4


# ---------------------------------------------------------------- decode threads


def damaged_shards(directory):
    """Two shards with undecodable samples and a duplicate key, and one cut short: every kind of skip."""
    samples = [toy_sample(i, seed=0, size=64) for i in range(24)]
    for s in samples[3::7]:
        s["tgt.png"] = b"broken"
    samples[10]["__key__"] = samples[9]["__key__"]
    write_shard(directory / "a.tar", samples[:12])
    write_shard(directory / "b.tar", samples[12:])
    write_shard(directory / "cut.tar", [toy_sample(i, seed=1, size=64) for i in range(10)])
    truncate(directory / "cut.tar", 0.55)
    return [str(directory / n) for n in ("a.tar", "b.tar", "cut.tar")]


def test_decode_threads_change_the_speed_not_the_stream(tmp_path, monkeypatch):
    urls = damaged_shards(tmp_path)
    made_in, make_batch = set(), BucketStream._make

    def jittered(self, group):  # batches finish out of order in the threads
        made_in.add(threading.current_thread().name.rsplit("_", 1)[0])
        time.sleep(random.random() * 0.01)
        return make_batch(self, group)

    monkeypatch.setattr(BucketStream, "_make", jittered)
    options = dict(batch=3, buffer=4, max_skip_rate=0.9)
    serial = with_skips(make(urls, **options), 25)
    assert made_in == {"MainThread"}
    threaded = with_skips(make(urls, threads=2, **options), 25)
    assert "editflow-decode" in made_in
    assert {"undecodable_image", "duplicate_key", "unreadable_shard"} <= serial[-1][1].keys()
    for (mine, my_skips), (theirs, their_skips) in zip(serial, threaded, strict=True):
        assert mine.keys == theirs.keys and my_skips == their_skips
        assert torch.equal(mine.target, theirs.target) and torch.equal(mine.source, theirs.source)


def test_resume_with_decode_threads_continues_exactly(toy_urls):
    reference = [b for b in itertools.islice(make(toy_urls, seed=5, threads=2), 9)]
    first = make(toy_urls, seed=5, threads=2)
    seen = list(itertools.islice(first, 4))
    resumed = make(toy_urls, seed=5)  # the thread count is no part of the position
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    seen += list(itertools.islice(resumed, 5))
    assert [b.keys for b in seen] == [b.keys for b in reference]
    assert all(torch.equal(a.target, b.target) for a, b in zip(seen, reference, strict=True))


def test_workers_leave_decode_threads_unused_and_say_so(toy_urls, caplog):
    with caplog.at_level(logging.WARNING):
        loader = make(toy_urls, workers=1, threads=2, buffer=1)
    assert "data.num_workers=1" in caplog.text and "data.decode_threads=2 is not used" in caplog.text
    assert keys_of(loader, 3) == keys_of(make(toy_urls, workers=1, buffer=1), 3)


def test_a_changed_worker_count_names_the_setting_that_continues_the_order(toy_urls):
    state = make(toy_urls, workers=2).state_dict()
    with pytest.raises(ValueError, match=r"num_workers: saved 2, now 0; set data\.num_workers=2 to continue"):
        make(toy_urls).load_state_dict(state)


@pytest.mark.parametrize("key, value, message", [("decode_threads", -1, "must be a non-negative integer, got -1"),
                                                 ("num_workers", 1.5, "Value '1.5' of type 'float' could not be "
                                                                      "converted to Integer")])
def test_bad_loader_settings_name_the_key(key, value, message):
    from editflow.config import compose, validate
    from editflow.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"data\.{key}: {message}"):
        validate(compose(["data=shards", "data.train=/data/x", f"data.{key}={value}"]))


def test_ordered_map_keeps_the_order_and_reads_at_most_ahead():
    pulled, out = [], []

    def items():
        for i in range(40):
            pulled.append(i)
            yield i

    def square(i):
        time.sleep(random.random() * 0.004)
        return i * i

    for result in ordered_map(square, items(), threads=4, ahead=3):
        out.append(result)
        assert len(pulled) <= len(out) - 1 + 3
    assert out == [i * i for i in range(40)]


def decode_threads_alive():
    return [t for t in threading.enumerate() if t.name.startswith("editflow-decode")]


def test_ordered_map_reports_a_read_error_after_the_results_before_it():
    def items():
        yield from range(5)
        raise DataError("shard x.tar is gone")

    got = []
    with pytest.raises(DataError, match="x.tar is gone"):
        for result in ordered_map(lambda i: i, items(), threads=2, ahead=4):
            got.append(result)
    assert got == [0, 1, 2, 3, 4] and not decode_threads_alive()


def test_ordered_map_raises_a_job_error_at_its_item_and_closing_stops_the_threads():
    def fail_at_3(i):
        if i == 3:
            raise ValueError("item 3")
        return i

    got = []
    with pytest.raises(ValueError, match="item 3"):
        for result in ordered_map(fail_at_3, range(10), threads=2, ahead=4):
            got.append(result)
    assert got == [0, 1, 2] and not decode_threads_alive()
    endless = ordered_map(lambda i: i, itertools.count(), threads=2, ahead=4)
    assert next(endless) == 0 and decode_threads_alive()
    endless.close()
    assert not decode_threads_alive()
