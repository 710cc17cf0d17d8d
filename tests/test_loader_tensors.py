"""The training loader's tensors: uint8 batches normalised on the device give exactly the pixels the float
path gave, Qwen gets the same images (also from decode threads and across a DataLoader worker), batches of
both kinds cross a worker and can be pinned, and JPEG draft decoding is used only where the image is far
larger than its bucket."""

import io
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from editflow.data.batches import EncodedBatch, ImageBatch
from editflow.data.buckets import resize_to_bucket
from editflow.data.images import to_rgb
from editflow.data.pixels import PixelImages, image_tensor, pixel_batch, unit_range
from editflow.data.preencoded import encoded_sample
from editflow.data.samples import decode_sample
from editflow.data.shards import write_shard
from editflow.data.stream import BucketStream, ResumableLoader, ShardSet, collate_images, decode_in_bucket


def float_path(image: Image.Image) -> torch.Tensor:
    """The loader's tensors before uint8 batches (kept here as the reference)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def photo(size, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    w, h = size
    field = Image.fromarray(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)).resize(size)
    return Image.fromarray(np.clip(np.asarray(field, np.int16) + rng.integers(-20, 20, (h, w, 3)), 0, 255)
                           .astype(np.uint8)).convert(mode)


def encoded(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def raw_sample(key, source, target, fmt="JPEG", url="mem.tar"):
    ext = "jpg" if fmt == "JPEG" else "png"
    meta = {"instruction": "make it blue", "target_size": list(target.size), "source_size": list(source.size)}
    return {"__key__": key, "__url__": url, f"src.{ext}": encoded(source, fmt), f"tgt.{ext}": encoded(target, fmt),
            "json": json.dumps(meta).encode()}


@pytest.mark.parametrize("source_pixels", [None, 48 * 48])
def test_uint8_batches_normalised_on_the_device_equal_the_float_path(source_pixels):
    # mixed inputs of one bucket: JPEG and PNG, bigger and smaller than the bucket, a grayscale one
    samples = [decode_sample(raw_sample("a", photo((96, 80), 0), photo((96, 80), 1))),
               decode_sample(raw_sample("b", photo((50, 41), 2), photo((50, 41), 3), fmt="PNG")),
               decode_sample(raw_sample("c", photo((70, 60), 4, "L"), photo((70, 60), 5), fmt="PNG"))]
    bucket = (80, 64)
    batch = collate_images(samples, bucket, source_pixels)
    source_bucket = batch.source.shape[-1], batch.source.shape[-2]
    assert batch.target.dtype == torch.uint8 and batch.target.shape == (3, 3, 64, 80)
    old_target = torch.stack([float_path(resize_to_bucket(s.target, bucket)) for s in samples])
    old_source = torch.stack([float_path(resize_to_bucket(s.source, source_bucket)) for s in samples])
    assert torch.equal(unit_range(batch.target), old_target)  # bit-identical, not merely close
    assert torch.equal(unit_range(batch.source), old_source)
    assert unit_range(batch.target).is_contiguous()
    # Qwen gets the fitted source images themselves: same mode, size and pixels
    assert isinstance(batch.source_images, PixelImages) and len(batch.source_images) == 3
    for sample, image in zip(samples, batch.source_images):
        expected = resize_to_bucket(sample.source.convert("RGB"), source_bucket)
        assert image.mode == "RGB" and image.size == expected.size
        assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert [im.size for im in batch.source_images[1:]] == [source_bucket] * 2


def test_frozen_encoder_latents_of_uint8_equal_the_float_inputs(tiny_models):
    from editflow.frozen_encoders import FrozenEncoder

    images = [photo((64, 48), i) for i in range(2)]
    encoder = FrozenEncoder(tiny_models.codec, tiny_models.conditioner)
    latents = encoder.latents(pixel_batch(images))
    reference = tiny_models.codec.encode(torch.stack([float_path(im) for im in images]))
    assert torch.equal(latents, reference)
    assert encoder.latents(None) is None


def test_image_tensor_keeps_its_values():
    image = photo((33, 17), 7)
    assert torch.equal(image_tensor(image), float_path(image))
    assert torch.equal(image_tensor(image.convert("L")), float_path(image.convert("L")))


def test_pixel_batch_of_images_packed_in_several_pieces_equals_numpy():
    # 517 x 301 x 3 bytes: more than one piece of PIL's raw encoder, and rows of an odd length
    images = [photo((517, 301), 8), photo((517, 301), 9, "RGBA"), photo((517, 301), 10, "P")]
    batch = pixel_batch(images)
    assert batch.shape == (3, 3, 301, 517) and batch.dtype == torch.uint8
    for pixels, image in zip(batch, images):
        assert np.array_equal(pixels.permute(1, 2, 0).numpy(), np.asarray(to_rgb(image)))


def test_batches_from_decode_threads_and_a_worker_equal_those_made_in_the_loop(tmp_path):
    samples = [raw_sample(f"k{i}", photo((64, 64), 2 * i), photo((64, 64), 2 * i + 1)) for i in range(6)]
    url = str(tmp_path / "s.tar")
    write_shard(url, [{k: v for k, v in s.items() if k != "__url__"} for s in samples])

    def batches(workers, threads=0):
        stream = BucketStream([ShardSet("s", [url])], 3, shuffle_buffer=1, bucket_base=64, decode_threads=threads)
        return list(itertools.islice(ResumableLoader(stream, num_workers=workers), 2))

    for mine, threaded in zip(batches(0), batches(0, threads=2), strict=True):  # decode threads: the same
        assert mine.keys == threaded.keys and torch.equal(mine.target, threaded.target)
        assert threaded.source_images.images is not None  # the fitted images themselves, no copy
        assert all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(mine.source_images, threaded.source_images))
    for mine, theirs in zip(batches(0), batches(1), strict=True):
        assert isinstance(theirs, ImageBatch) and mine.keys == theirs.keys and theirs.region is None
        assert torch.equal(mine.target, theirs.target) and torch.equal(mine.source, theirs.source)
        # in-process, Qwen gets the fitted images themselves; a worker sends the pixels alone (shared memory)
        # and the images are made from them on this side
        assert isinstance(theirs.source_images, PixelImages) and theirs.source_images.images is None
        assert mine.source_images.images is not None
        for a, b in zip(mine.source_images, theirs.source_images):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_jpeg_far_larger_than_its_bucket_decodes_at_a_reduced_scale():
    source, target = photo((512, 384), 0), photo((512, 384), 1)
    raw = raw_sample("big", source, target)
    bucket = (128, 96, False)
    drafted = decode_in_bucket(raw, bucket)
    assert drafted.target.size == (128, 96)  # 1/4 scale by libjpeg still covers the bucket
    whole = decode_sample(raw)
    assert whole.target.size == (512, 384)
    # a Kontext source at fewer pixels than the target: its own, smaller scale
    assert decode_in_bucket(raw, bucket, source_pixels=64 * 48).source.size == (64, 48)
    # what training sees differs from decoding whole and resizing only by the filter, not in content
    fitted = [np.asarray(resize_to_bucket(s.target, bucket[:2]), np.float32) for s in (drafted, whole)]
    assert np.abs(fitted[0] - fitted[1]).mean() < 3
    assert decode_in_bucket(raw, (400, 300, False)).target.size == (512, 384)  # under 2x: decoded whole
    assert decode_in_bucket(raw, (0, 0, False)).target.size == (512, 384)  # bucket unknown: decoded whole
    png = raw_sample("png", source, target, fmt="PNG")
    assert decode_in_bucket(png, bucket).target.size == (512, 384)  # only JPEG has a reduced-scale decoder


def encoded_shard(path, count=4):
    tensors = lambda i: {"target": torch.randn(16, 8, 8), "source": torch.randn(16, 8, 8),
                         "states": torch.randn(5 + i, 32).to(torch.bfloat16),
                         "region": torch.ones(8, 8, dtype=torch.uint8)}
    write_shard(path, [encoded_sample(f"e{i}", {"instruction": "make it blue"}, (64, 64), tensors(i))
                       for i in range(count)])
    return str(path)


def test_pre_encoded_batches_cross_a_worker_unchanged(tmp_path):
    url = encoded_shard(tmp_path / "enc.tar")

    def batches(workers):
        stream = BucketStream([ShardSet("e", [url])], 2, shuffle_buffer=1, bucket_base=64, encoded=True)
        return list(itertools.islice(ResumableLoader(stream, num_workers=workers), 2))

    for mine, theirs in zip(batches(0), batches(1), strict=True):
        assert isinstance(theirs, EncodedBatch) and theirs.keys == mine.keys and theirs.drops is None
        for a, b in zip(mine.samples, theirs.samples, strict=True):
            assert a.tensors.keys() == b.tensors.keys()
            assert all(torch.equal(a.tensors[k], b.tensors[k]) and a.tensors[k].dtype == b.tensors[k].dtype
                       for k in a.tensors)


@pytest.fixture
def pinning(monkeypatch):
    """Whether a tensor is pinned. Without an accelerator (no page-locked memory to ask for), pinning is
    stood in for by a copy whose identity is recorded, so that what is checked is that torch's own
    `pin_memory` reaches every tensor of a batch."""
    if torch.accelerator.is_available():
        return torch.Tensor.is_pinned
    pinned = set()

    def pin(tensor):
        copy = tensor.clone()
        pinned.add(id(copy))
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    return lambda tensor: id(tensor) in pinned


def test_batches_can_be_pinned_as_the_dataloader_pins_them(tmp_path, pinning):
    from torch.utils.data._utils.pin_memory import pin_memory

    from editflow.data.stream import StreamItem

    samples = [decode_sample(raw_sample(f"k{i}", photo((64, 64), 2 * i), photo((64, 64), 2 * i + 1)))
               for i in range(2)]
    batch = collate_images(samples, (64, 64), regions=True)
    item = pin_memory(StreamItem(batch, 0, {"undecodable_image": 1}))  # what DataLoader(pin_memory=True) does
    pinned = item.batch
    assert isinstance(pinned, ImageBatch) and item.skips == {"undecodable_image": 1} and pinned.keys == batch.keys
    assert all(pinning(t) for t in (pinned.target, pinned.source, pinned.region))
    assert torch.equal(pinned.target, batch.target) and torch.equal(pinned.region, batch.region)
    assert isinstance(pinned.source_images, PixelImages) and pinned.source_images.pixels is pinned.source
    for a, b in zip(batch.source_images, pinned.source_images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not pinning(batch.target)  # the loader's own batch is left as it was

    stream = BucketStream([ShardSet("e", [encoded_shard(tmp_path / "enc.tar")])], 2, shuffle_buffer=1,
                          bucket_base=64, encoded=True)
    encoded = next(ResumableLoader(stream))
    pinned = pin_memory(encoded)
    assert isinstance(pinned, EncodedBatch) and pinned.keys == encoded.keys
    for a, b in zip(encoded.samples, pinned.samples, strict=True):
        assert a.tensors.keys() == b.tensors.keys() and all(pinning(t) for t in b.tensors.values())
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors) and b.key == a.key
