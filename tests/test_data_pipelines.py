"""The GPU data pipelines (DALI, torchvision) against the CPU loader: same crops, flips and
normalisation, same rank shards, bad data skipped and counted, tar shards.

DALI runs here in its CPU mode (device_id None; the `dali` extra). The torchvision loader is
CUDA-only: its augmentation (``resized_crops``) is checked on the CPU, the loader itself in the
gpu-marked tests.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import math
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.data.augment import IMAGENET_MEAN, IMAGENET_STD, crop_table, resized_crops, sample_resized_crop
from fastmae.data.encoded_batches import EncodedBatchReader
from fastmae.data.gpu_decode import decode_on_cpu
from fastmae.data.hybrid import HybridLoader
from fastmae.data.image_header import BadImageError, read_header
from fastmae.data.loader import CPULoader, DataConfig, UnreadableData, build_loader
from fastmae.data.sources import open_source
from fastmae.data.synthetic import (
    bad_image_bytes, crop_window_of, encode_jpeg, position_coded_image, write_bad_images, write_jpeg_folder,
)
from fastmae.data.tar_shards import TarShards, scan_tar_members, write_tar_shards

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia-dali is not installed (pip install nvidia-dali-cuda120)")
SIZE = 32  # output side: small keeps every test fast
ONE_GREY_LEVEL = 1 / (255 * min(IMAGENET_STD)) * 1.001  # in normalised units, the largest channel's


def config(path, **overrides) -> DataConfig:
    return DataConfig(**{"data_path": str(path), "input_size": SIZE, "batch_size": 8, "num_workers": 0,
                         "seed": 3, **overrides})


def epoch_of(loader, epoch: int, start_batch: int = 0) -> list[torch.Tensor]:
    loader.set_epoch(epoch, start_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [images.cpu() for images in loader]


def dali_loader(cfg, rank=0, world_size=1):
    from fastmae.data.dali import build_dali_loader

    return build_dali_loader(cfg, rank, world_size, torch.device("cpu"))


class ResizedCropsOnCPU:
    """The torchvision loader's host plan and augmentation (``resized_crops``) with PIL decoding:
    everything but nvJPEG and the CUDA streams, so its statistics run without a GPU."""

    def __init__(self, cfg, rank=0, world_size=1):
        self.reader = EncodedBatchReader(open_source(cfg.data_path), cfg, rank, world_size)
        self.size = cfg.input_size

    def set_epoch(self, epoch, start_batch=0):
        self.reader.set_epoch(epoch, start_batch)

    def __iter__(self):
        for batch in self.reader:
            bad = []
            for row, file in enumerate(batch.files):
                try:
                    decode_on_cpu(file)
                except OSError:
                    bad.append(row)
            if bad:
                batch = self.reader.replan(batch, bad)
            images = [decode_on_cpu(file) for file in batch.files]
            table = crop_table([image.shape[1:] for image in images], batch.boxes, batch.flips, self.size)
            yield resized_crops(torch.cat([image.reshape(-1) for image in images]), table, self.size)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_jpeg_folder(root, 24, size=(96, 72), num_classes=3)
    return root


# --- headers -------------------------------------------------------------------------------------
def test_read_header_sizes_and_rejects_bad_files():
    files = bad_image_bytes()
    for name, data in files.items():
        if name.startswith("bad_") and name != "bad_corrupt_scan.jpg":  # damage inside the scan passes
            with pytest.raises(BadImageError):
                read_header(data)
    assert read_header(files["grayscale.jpg"]).channels == 1
    assert read_header(files["cmyk.jpg"]).channels == 4
    assert (read_header(files["tiny_3x5.jpg"]).width, read_header(files["tiny_3x5.jpg"]).height) == (3, 5)
    assert read_header(files["png_named.jpg"]).format == "png"
    header = read_header(encode_jpeg(np.zeros((37, 53, 3), np.uint8)))
    assert (header.format, header.width, header.height, header.channels) == ("jpeg", 53, 37, 3)


def test_read_header_refuses_what_pil_refuses_as_a_decompression_bomb(monkeypatch):
    """PIL raises DecompressionBombError (not an OSError) above twice Image.MAX_IMAGE_PIXELS: the GPU
    loaders' header check passes over the same files as the CPU loaders, and never lets it escape."""
    bmp = io.BytesIO()
    Image.new("RGB", (8, 8)).save(bmp, format="BMP")
    huge = bytearray(bmp.getvalue())
    huge[18:26] = (100_000).to_bytes(4, "little") * 2  # a damaged BMP header: 100000 x 100000
    with pytest.raises(BadImageError, match="decompression bomb"):
        read_header(bytes(huge))
    jpeg = encode_jpeg(np.zeros((40, 30, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1200 pixels: more than twice 500
    with pytest.raises(BadImageError, match="jpeg of 30x40 = 1200 pixels, more than twice PIL's decompression-bomb"):
        read_header(jpeg)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(jpeg)).load()  # what the CPU loaders meet
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    assert read_header(jpeg).width == 30


# --- same pixels as the CPU loader ---------------------------------------------------------------
@needs_dali
def test_dali_cpu_mode_matches_cpu_loader_over_epochs_and_resume(photos):
    cfg = config(photos)
    cpu, dali = CPULoader(cfg, 0, 1, torch.device("cpu")), dali_loader(cfg)
    assert len(dali) == len(cpu) == 3
    for epoch in (0, 1):
        expected, got = epoch_of(cpu, epoch), epoch_of(dali, epoch)
        assert len(got) == len(expected)
        for a, b in zip(expected, got):
            assert b.dtype == torch.float32 and b.shape == (8, 3, SIZE, SIZE)
            # same crop box and flip; resampling filters and JPEG decoders differ by a few levels
            assert (a - b).abs().mean() < 0.01 and (a - b).abs().max() < 0.15
    assert not torch.allclose(epoch_of(dali, 0)[0], epoch_of(dali, 1)[0])  # reshuffled per epoch
    resumed = epoch_of(dali, 1, start_batch=2)
    assert len(resumed) == 1 and torch.allclose(resumed[0], got[2], atol=1e-6)
    dali.set_epoch(1)
    assert torch.allclose(next(iter(dali)), got[0], atol=1e-6)  # left after one batch...
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(epoch_of(dali, 1), got))  # ...then a whole epoch


def test_hybrid_loader_matches_cpu_loader_over_epochs_workers_and_resume(photos):
    cfg = config(photos)
    cpu = CPULoader(cfg, 0, 1, torch.device("cpu"))
    hybrid = build_loader(config(photos, loader="hybrid", num_workers=2), 0, 1, torch.device("cpu"))
    assert isinstance(hybrid, HybridLoader) and len(hybrid) == len(cpu) == 3
    for epoch in (0, 1):
        got = epoch_of(hybrid, epoch)
        for a, b in zip(epoch_of(cpu, epoch), got, strict=True):
            assert b.dtype == torch.float32 and b.shape == (8, 3, SIZE, SIZE)
            # same crop box and flip; PIL's resize, but for its fixed-point weights (a grey level, rarely)
            assert (a - b).abs().mean() < 0.001 and (a - b).abs().max() <= ONE_GREY_LEVEL
            assert (a.flip(-1) - b).abs().mean() > 0.2  # a flip that disagrees would show
    assert torch.equal(epoch_of(hybrid, 1, start_batch=2)[0], got[2])


def test_resized_crops_match_cpu_loader(photos):
    cfg = config(photos)
    for a, b in zip(epoch_of(CPULoader(cfg, 0, 1, torch.device("cpu")), 0), epoch_of(ResizedCropsOnCPU(cfg), 0)):
        assert (a - b).abs().mean() < 0.001 and (a - b).abs().max() <= ONE_GREY_LEVEL


class FakeNvjpeg:
    """Stands in for torchvision.io on the CPU: decode_jpeg as nvJPEG behaves (a list in, a list out;
    one bad file fails the batched call; CMYK is not converted), decoding with PIL."""

    class ImageReadMode:
        RGB = "RGB"

    def __init__(self):
        self.batched_calls, self.single_calls = 0, 0

    def decode_jpeg(self, data, mode=None, device=None):
        if isinstance(data, list):
            self.batched_calls += 1
            return [self._decode(d) for d in data]
        self.single_calls += 1
        return self._decode(data)

    @staticmethod
    def _decode(data: torch.Tensor) -> torch.Tensor:
        header = read_header(data.numpy().tobytes())
        assert header.format == "jpeg" and header.channels in (1, 3), "the loader routes CMYK and PNG to PIL"
        try:
            return decode_on_cpu(data.numpy())
        except OSError as error:
            raise RuntimeError(f"nvjpegDecode failed: {error}") from None


def test_torchvision_loader_routing_with_a_stand_in_decoder(tmp_path, monkeypatch):
    """The GPU loader's decode routing and bad-file replacement, driven on the CPU."""
    import sys
    import types

    from fastmae.data.gpu_decode import TorchvisionGPULoader

    fake = FakeNvjpeg()
    module = types.ModuleType("torchvision.io")
    module.decode_jpeg, module.ImageReadMode = fake.decode_jpeg, FakeNvjpeg.ImageReadMode
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.io", module)
    cfg = config(bad_folder(tmp_path))
    loader = TorchvisionGPULoader.__new__(TorchvisionGPULoader)  # __init__ insists on CUDA
    loader.cfg, loader.device, loader.decode_only = cfg, torch.device("cpu"), False
    loader.reader = EncodedBatchReader(open_source(tmp_path), cfg, 0, 1)
    outputs = []
    for batch in loader.reader:
        images, batch = loader._augment(batch)
        loader.reader.report(batch)
        outputs.append(images)
    assert fake.batched_calls >= 3 and fake.single_calls > 0  # the damaged scan failed a batched call
    assert loader.reader.skipped == 5  # the 5 bad files, each drawn once and replaced
    for a, b in zip(epoch_of(CPULoader(cfg, 0, 1, torch.device("cpu")), 0), outputs):
        assert ((a - b).abs().mean(dim=(1, 2, 3)) < 0.02).all()


# --- augmentation statistics ---------------------------------------------------------------------
def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    return float(np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                        - np.searchsorted(np.sort(b), grid, "right") / len(b)).max())


def loaders_on_cpu(cfg):
    loaders = {"cpu": CPULoader(cfg, 0, 1, torch.device("cpu")), "torchvision-resize": ResizedCropsOnCPU(cfg),
               "hybrid": HybridLoader(cfg, 0, 1, torch.device("cpu"))}
    if HAS_DALI:
        loaders["dali-cpu"] = dali_loader(cfg)
    return loaders


def test_augmentation_statistics_agree_across_loaders(tmp_path):
    """Position-coded images read back each output's crop area, aspect ratio and flip."""
    width, height = 160, 120
    coded = encode_jpeg(position_coded_image(width, height), quality=98, subsampling=0)
    for index in range(64):
        (tmp_path / f"coded_{index:03d}.jpg").write_bytes(coded)
    cfg = config(tmp_path, input_size=48, batch_size=32, seed=11)
    rng = np.random.default_rng(0)
    reference = []
    for _ in range(4000):
        _, _, h, w = sample_resized_crop(height, width, rng=rng)
        reference.append((h * w / (height * width), w / h))
    reference = np.array(reference)
    planned = EncodedBatchReader(open_source(tmp_path), cfg, 0, 1)
    planned_boxes = np.concatenate([b.boxes for e in range(4) for b in (planned.set_epoch(e) or planned)])
    planned_area = planned_boxes[:, 2] * planned_boxes[:, 3] / (width * height)
    blue = (128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]
    for name, loader in loaders_on_cpu(cfg).items():
        images = torch.cat([x for e in range(4) for x in epoch_of(loader, e)])  # 256 samples
        rgb = images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255 + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        windows = [crop_window_of(sample.numpy(), width, height) for sample in rgb]
        area = np.array([w["area_fraction"] for w in windows])
        aspect = np.array([w["aspect_ratio"] for w in windows])
        flips = np.array([w["flipped"] for w in windows])
        # each output shows the crop box the shared plan drew for it
        np.testing.assert_allclose(area, planned_area, rtol=0.12, err_msg=name)
        # distributions: scale in (0.2, 1), aspect in (3/4, 4/3), flips at 1/2, against sample_resized_crop
        assert ks_distance(area, reference[:, 0]) < 0.12, name
        assert ks_distance(aspect, reference[:, 1]) < 0.15, name
        assert 0.18 < area.min() and area.max() < 1.05 and 0.7 < aspect.min() and aspect.max() < 1.42, name
        assert abs(flips.mean() - 0.5) < 4 * math.sqrt(0.25 / len(flips)), name
        assert abs(images[:, 2].mean().item() - blue) < 0.03, name  # normalisation: the constant blue plane


# --- rank shards ---------------------------------------------------------------------------------
def test_rank_shards_disjoint_and_reshuffled(tmp_path):
    write_jpeg_folder(tmp_path, 30, size=(40, 30))
    cfg = config(tmp_path, batch_size=5)
    orders = {}
    for epoch in (0, 1):
        per_rank = []
        for rank in range(3):
            reader = EncodedBatchReader(open_source(tmp_path), cfg, rank, 3)
            reader.set_epoch(epoch)
            per_rank.append([item for batch in reader for item in batch.items])
        assert all(len(items) == 10 for items in per_rank)
        assert sorted(sum(per_rank, [])) == list(range(30))  # disjoint and complete
        orders[epoch] = per_rank
    assert orders[0] != orders[1]


@needs_dali
def test_dali_rank_shards_equal_cpu_loader_shards(photos):
    cfg = config(photos, batch_size=4)
    for rank in range(2):
        for a, b in zip(epoch_of(CPULoader(cfg, rank, 2, torch.device("cpu")), 1), epoch_of(dali_loader(cfg, rank, 2), 1)):
            assert (a - b).abs().mean() < 0.01


# --- bad data ------------------------------------------------------------------------------------
def bad_folder(root, num_good=11):
    write_jpeg_folder(root, num_good, size=(64, 48))
    write_bad_images(root)
    return root


def loaders_for_bad_data(cfg):
    loaders = {"cpu": CPULoader(cfg, 0, 1, torch.device("cpu")), "torchvision-resize": ResizedCropsOnCPU(cfg),
               "hybrid": HybridLoader(cfg, 0, 1, torch.device("cpu"))}
    if HAS_DALI:
        loaders["dali-cpu"] = dali_loader(cfg)
    return loaders


def test_bad_files_skipped_and_counted_odd_files_decoded(tmp_path):
    cfg = config(bad_folder(tmp_path))
    reference = None
    for name, loader in loaders_for_bad_data(cfg).items():
        if name == "torchvision-resize":
            batches = epoch_of(loader, 0)
        else:
            loader.set_epoch(0)
            with pytest.warns(UserWarning, match="skipped unreadable"):
                batches = list(loader)
            # the 5 bad files sit side by side in name order: each key on one passes over the rest, and
            # is one replacement (a run of bad neighbours is not counted again for every key before it)
            assert loader.skipped == 5, name
        assert len(batches) == 3 and all(torch.isfinite(b).all() for b in batches), name
        if reference is None:
            reference = batches
        else:  # the same replacements: odd files (gray, CMYK, PNG, tiny) decode to the same pixels
            for a, b in zip(reference, batches):
                assert (a - b).abs().mean() < 0.02, name


def test_a_replaced_image_counts_once_and_each_bad_file_is_named_once(tmp_path):
    """3 broken files side by side among 4 good ones, one epoch of one batch of 7: 3 images replaced
    (not 3 + 2 + 1, one per bad neighbour passed over), each file once in the warning."""
    write_jpeg_folder(tmp_path, 4, size=(64, 48))
    for name in ("b0.jpg", "b1.jpg", "b2.jpg"):
        (tmp_path / name).write_bytes(b"")
    cfg = config(tmp_path, batch_size=7)
    for name, loader in loaders_for_bad_data(cfg).items():
        if name == "torchvision-resize":
            continue
        loader.set_epoch(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert len(list(loader)) == 1, name
        assert loader.skipped == 3, name
        said = " ".join(str(w.message) for w in caught if "skipped unreadable" in str(w.message))
        assert [said.count(f"b{i}.jpg") for i in range(3)] == [1, 1, 1], (name, said)
    reader = EncodedBatchReader(open_source(tmp_path), cfg, 0, 1)
    reader.set_epoch(0)
    for batch in reader:
        reader.report(batch)
    assert reader.skipped == 3


def test_a_small_source_of_only_bad_files_names_each_once(tmp_path):
    for index in range(8):
        (tmp_path / f"bad_{index}.jpg").write_bytes(b"text")
    cfg = config(tmp_path, batch_size=2)
    for build in (lambda: CPULoader(cfg, 0, 1, torch.device("cpu")),
                  lambda: EncodedBatchReader(open_source(tmp_path), cfg, 0, 1)):
        with pytest.raises(ValueError, match=r"no readable image among the first items of \S+: 8 unreadable images in a row"):
            build()


def test_odd_but_valid_files_decode_to_the_same_rgb_in_every_loader(tmp_path):
    """Grayscale, CMYK, PNG (RGB, RGBA, palette, 16-bit grey, named .jpg) and 1x1 / 3x5 JPEGs: nothing
    skipped, each image in the same RGB (DALI decodes on its own, the others through PIL)."""
    for name, data in bad_image_bytes().items():
        if not name.startswith("bad_"):
            (tmp_path / name).write_bytes(data)
    cfg = config(tmp_path)
    cpu_batches = epoch_of(CPULoader(cfg, 0, 1, torch.device("cpu")), 2)
    for name, loader in loaders_on_cpu(cfg).items():
        if name == "cpu":
            continue
        for a, b in zip(cpu_batches, epoch_of(loader, 2)):
            assert ((a - b).abs().mean(dim=(1, 2, 3)) < 0.02).all(), name  # every image, CMYK included
        assert getattr(loader, "skipped", 0) == 0, name


@needs_dali
def test_build_loader_dispatches_dali_in_cpu_mode(photos):
    from fastmae.data.dali import DALILoader

    loader = build_loader(config(photos, loader="dali"), 0, 1, torch.device("cpu"))
    assert isinstance(loader, DALILoader) and loader.device_id is None
    images = next(iter(loader))
    assert images.device.type == "cpu" and images.shape == (8, 3, SIZE, SIZE)


@needs_dali
@pytest.mark.parametrize("decode_only", [False, True])
def test_a_dali_loader_nobody_uses_is_freed_at_once(photos, decode_only):
    """Not left to the cyclic garbage collector: a collection inside a forked DataLoader worker would
    run DALI's pipeline destructor there, which waits forever for threads the fork did not copy (the
    test suite hung this way in a CPU loader's worker after the DALI tests)."""
    import gc
    import weakref

    from fastmae.data.dali import build_dali_loader

    loader = build_dali_loader(config(photos), 0, 1, torch.device("cpu"), decode_only=decode_only)
    epoch_of(loader, 0)
    next(iter(loader))  # an epoch left early: the next one builds a fresh pipeline
    epoch_of(loader, 1)
    gc.collect()
    gc.disable()
    try:
        gone = [weakref.ref(loader), weakref.ref(loader._pipeline)]
        del loader
        assert [ref() for ref in gone] == [None, None]
    finally:
        gc.enable()


@needs_dali
def test_dali_recovers_from_a_file_that_fails_inside_the_decoder(tmp_path):
    files = bad_image_bytes()
    write_jpeg_folder(tmp_path, 15, size=(64, 48))
    (tmp_path / "img_000003_corrupt.jpg").write_bytes(files["bad_corrupt_scan.jpg"])  # passes the header check
    loader = dali_loader(config(tmp_path))
    loader.set_epoch(0)
    with pytest.warns(UserWarning, match="DALI could not decode 1 file"):
        batches = list(loader)
    assert len(batches) == 2 and all(torch.isfinite(b).all() for b in batches)
    batches = epoch_of(loader, 1)  # known bad now: passed over before decoding (warned once per file)
    assert len(batches) == 2 and all(torch.isfinite(b).all() for b in batches)
    assert loader.skipped == 2
    assert loader.pipeline_builds == 2  # the first build and one recovery


@needs_dali
def test_dali_replaces_more_undecodable_files_in_an_epoch_than_any_fixed_count(tmp_path, monkeypatch):
    """Every recovery replaces a file; only a run of recoveries without a batch coming out ends the epoch."""
    import fastmae.data.dali as dali

    monkeypatch.setattr(dali, "MAX_REBUILDS_IN_A_ROW", 2)
    files = bad_image_bytes()
    write_jpeg_folder(tmp_path, 24, size=(64, 48))
    for index in (2, 7, 12, 17, 22, 23):
        (tmp_path / f"img_{index:06d}_corrupt.jpg").write_bytes(files["bad_corrupt_scan.jpg"])
    loader = dali_loader(config(tmp_path, batch_size=5))
    loader.set_epoch(0)
    with pytest.warns(UserWarning, match="DALI could not decode"):
        batches = list(loader)
    assert len(batches) == 6 and all(torch.isfinite(b).all() for b in batches)
    assert loader.pipeline_builds - 1 > dali.MAX_REBUILDS_IN_A_ROW  # recoveries in the epoch, none 3 in a row


def test_only_bad_files_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no image files"):
        build_loader(config(tmp_path), 0, 1, torch.device("cpu"))
    for name, data in bad_image_bytes().items():
        if name.startswith("bad_") and name != "bad_corrupt_scan.jpg":
            (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match="no readable image"):  # when the loader is built
        EncodedBatchReader(open_source(tmp_path), config(tmp_path, batch_size=2), 0, 1)
    if HAS_DALI:
        with pytest.raises(ValueError, match="no readable image"):
            dali_loader(config(tmp_path, batch_size=2))
    # a long run of unreadable files mid-epoch: a clear error from the loader, not a hang or a crash in DALI
    write_jpeg_folder(tmp_path, 1, size=(40, 30))  # "img_..." sorts before the bad files: item 0 is readable
    for index in range(40):
        (tmp_path / f"not_an_image_{index:02d}.jpg").write_bytes(b"text")
    cfg = config(tmp_path, batch_size=44)
    loaders = [EncodedBatchReader(open_source(tmp_path), cfg, 0, 1)] + ([dali_loader(cfg)] if HAS_DALI else [])
    # the PIL loaders give up in a worker process: the error is the main process's own, with the reasons
    with_worker = dataclasses.replace(cfg, num_workers=1)
    loaders += [CPULoader(with_worker, 0, 1, torch.device("cpu")), HybridLoader(with_worker, 0, 1, torch.device("cpu"))]
    for loader in loaders:
        loader.set_epoch(0)
        with pytest.raises(UnreadableData, match=r"32 unreadable images in a row, e.g. \S*not_an_image_\d\d.jpg "
                                                 r"?\(?\S.*: check the files under --data_path$"):
            list(loader)


# --- tar shards ----------------------------------------------------------------------------------
def test_tar_shards_give_the_folder_batches(photos, tmp_path):
    from fastmae.data.sources import list_image_files

    shards = write_tar_shards(list_image_files(photos), tmp_path / "shards", images_per_shard=7)
    assert len(shards) == 4
    source = open_source(tmp_path / "shards")
    assert isinstance(source, TarShards) and len(source) == 24
    folder_cfg, tar_cfg = config(photos), config(tmp_path / "shards")
    for a, b in zip(epoch_of(CPULoader(folder_cfg, 0, 1, torch.device("cpu")), 1),
                    epoch_of(CPULoader(tar_cfg, 0, 1, torch.device("cpu")), 1)):
        assert torch.equal(a, b)
    if HAS_DALI:
        for a, b in zip(epoch_of(dali_loader(folder_cfg), 1), epoch_of(dali_loader(tar_cfg), 1)):
            assert torch.equal(a, b)
    single = open_source(shards[0])
    assert isinstance(single, TarShards) and len(single) == 7
    (tmp_path / "zipped.tar").write_bytes(b"\x1f\x8b" + b"\x00" * 600)
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        open_source(tmp_path / "zipped.tar")

    # a folder of both kinds is not read as one kind only; shards one level down are pointed at
    (tmp_path / "shards" / "extra").mkdir()
    (tmp_path / "shards" / "extra" / "loose.jpg").write_bytes(list_image_files(photos)[0].read_bytes())
    with pytest.raises(ValueError, match=r"holds both .tar shards \(4, e.g. shard-000000.tar\) and image files "
                                         r"\(e.g. extra/loose.jpg\): give a folder of one kind"):
        open_source(tmp_path / "shards")
    assert len(open_source(shards[0])) == 7  # a shard named alone is read alone
    (tmp_path / "nested" / "part1").mkdir(parents=True)
    shards[0].rename(tmp_path / "nested" / "part1" / shards[0].name)
    with pytest.raises(ValueError, match=f"holds .tar shards in a sub-folder \\(part1/{shards[0].name}\\): give"):
        open_source(tmp_path / "nested")


def test_generated_jpegs_do_not_depend_on_the_thread_count(tmp_path):
    one = write_jpeg_folder(tmp_path / "one", 6, size=(40, 30), num_classes=4, seed=5, threads=1)
    many = write_jpeg_folder(tmp_path / "many", 6, size=(40, 30), num_classes=4, seed=5, threads=3)
    assert [p.relative_to(tmp_path / "one") for p in one] == [p.relative_to(tmp_path / "many") for p in many]
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in many]
    other_seed = write_jpeg_folder(tmp_path / "other", 6, size=(40, 30), num_classes=4, seed=6)
    assert [p.read_bytes() for p in other_seed] != [p.read_bytes() for p in one]
    assert sorted(p.name for p in (tmp_path / "one" / "class_0001").iterdir()) == ["img_000001.jpg", "img_000005.jpg"]


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_header_scan_agrees_with_tarfile(tmp_path, tar_format):
    """Long names (pax records, GNU 'L' members, ustar prefixes), directories and non-image members."""
    path = tmp_path / "shard.tar"
    long_dir = "d" * 60 + "/" + "e" * 60 + "/"
    names = ["000001.jpg", "000001.cls", long_dir + "000002.jpg", "sub/000003.png"]
    with tarfile.open(path, "w", format=tar_format) as tar:
        directory = tarfile.TarInfo("sub")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for index, name in enumerate(names):
            data = bytes([index]) * (700 * index + 5)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        expected = [(m.offset_data, m.size, m.name) for m in tar if m.isfile()]
    assert scan_tar_members(path) == (expected, True) and len(expected) == 4
    shards = TarShards([path])
    assert [shards.name(i).split(":")[-1] for i in range(len(shards))] == [names[0], names[2], names[3]]
    assert shards.read_bytes(1) == bytes([2]) * 1405


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png_bytes(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (20, 16), (value, value, value)).save(out, format="PNG")
    return out.getvalue()


def test_tar_shards_pass_over_macos_copies_and_a_samples_second_images(tmp_path):
    """A tar made on macOS holds ._key.png beside each key.png, and copies to exFAT leave ._shard.tar
    beside each shard: both passed over. key.seg.png beside key.jpg is the sample's mask, not a photo;
    a plain tar of photo.2019.jpg, photo.2020.jpg keeps both."""
    write_tar(tmp_path / "shard-0.tar", {"000000.png": png_bytes(0), "._000000.png": b"\x00\x05\x16\x07 apple",
                                         "000001.png": png_bytes(1), "._000001.png": b"\x00\x05\x16\x07 apple"})
    (tmp_path / "._shard-0.tar").write_bytes(b"\x00\x05\x16\x07" + bytes(4092))
    write_tar(tmp_path / "shard-1.tar", {"000002.jpg": png_bytes(2), "000002.seg.png": png_bytes(200),
                                         "000002.cls": b"3", "000003.jpg": png_bytes(3),
                                         "000003.seg.png": png_bytes(201), "photo.2019.jpg": png_bytes(4),
                                         "photo.2020.jpg": png_bytes(5)})
    with pytest.warns(UserWarning, match=r"2 tar member\(s\) are a sample's second image \(e.g. 000002.seg.png\)"):
        shards = open_source(tmp_path)
    assert [shards.name(i).rpartition(":")[2] for i in range(len(shards))] == [
        "000000.png", "000001.png", "000002.jpg", "000003.jpg", "photo.2019.jpg", "photo.2020.jpg"]
    assert [np.asarray(shards.load(i))[0, 0, 0] for i in range(len(shards))] == [0, 1, 2, 3, 4, 5]


def test_tar_shards_cut_short_empty_or_linked_to_nothing_are_named(tmp_path):
    write_tar(tmp_path / "shard-0.tar", {f"{i:06d}.png": png_bytes(i) for i in range(4)})
    whole = (tmp_path / "shard-0.tar").read_bytes()
    offsets = [offset for offset, _, _ in scan_tar_members(tmp_path / "shard-0.tar").members]
    (tmp_path / "shard-1.tar").write_bytes(whole[: offsets[2] + 10])  # an interrupted copy: through the 3rd image
    (tmp_path / "shard-2.tar").write_bytes(b"")
    (tmp_path / "shard-3.tar").symlink_to(tmp_path / "moved" / "shard-3.tar")
    assert scan_tar_members(tmp_path / "shard-1.tar") == (scan_tar_members(tmp_path / "shard-0.tar").members[:2], False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shards = open_source(tmp_path)
    said = [str(w.message) for w in caught]
    assert len(shards) == 4 + 2 and len(said) == 2, said
    assert said[0].startswith(f"1 .tar shard link(s) in {tmp_path} lead to nothing (e.g. {tmp_path / 'shard-3.tar'} -> ")
    assert (f"2 tar shard(s) end without a tar's end-of-archive blocks, as a copy cut short does (images after the "
            f"cut would be missing; some writers omit the blocks): "
            f"{tmp_path / 'shard-1.tar'} (cut short: 2 image(s) read before its end); "
            f"{tmp_path / 'shard-2.tar'} (empty: 0 image(s) read before its end)") == said[1]


def test_compressed_tar_shards_are_named_as_such(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "shard-0.tar.gz").write_bytes(b"\x1f\x8b")
    for data_path in (folder, folder / "shard-0.tar.gz"):
        with pytest.raises(ValueError, match=r"shard-0.tar.gz is a compressed tar: fastmae reads tar shards by byte "
                                             r"offset, so they must be uncompressed \(.tar\); decompress them"):
            open_source(data_path)


def test_a_file_that_is_not_a_tar_is_named(tmp_path):
    page = tmp_path / "shard-000.tar"  # a download that saved the server's error page
    text = b"<html><head><title>404 Not Found</title></head><body>" + b"<p>The shard was not found.</p>" * 30
    assert text[148:156].strip(b" \x00") and not text[148:156].strip().isdigit()  # no octal checksum there
    page.write_bytes(text + b"</body></html>")
    with pytest.raises(ValueError, match=r"shard-000.tar is not an uncompressed tar file \(bad header at byte 0\)"):
        scan_tar_members(page)


# --- GPU -----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_torchvision_gpu_loader_matches_cpu_loader(photos, tmp_path):
    pytest.importorskip("torchvision")
    from fastmae.data.gpu_decode import build_torchvision_loader

    cfg = config(photos)
    gpu = build_torchvision_loader(cfg, 0, 1, torch.device("cuda"))
    for a, b in zip(epoch_of(CPULoader(cfg, 0, 1, torch.device("cpu")), 1), epoch_of(gpu, 1)):
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg's by a grey level or two (a batch's
        # mean absolute difference was 0.026 on an H100); a crop or flip that disagrees costs far more
        same, mirrored = (a - b).abs().mean(), (a.flip(-1) - b).abs().mean()
        assert b.dtype == torch.float32 and same < 0.05 and mirrored > 4 * same, (same, mirrored)
    bad = build_torchvision_loader(config(bad_folder(tmp_path)), 0, 1, torch.device("cuda"))
    batches = epoch_of(bad, 0)
    # 5 as the CPU loader if nvJPEG rejects the damaged scan; 4 if it decodes it to noise
    assert len(batches) == 3 and bad.skipped in (4, 5) and all(torch.isfinite(b).all() for b in batches)
    odd = tmp_path / "odd"
    odd.mkdir()
    for name, data in bad_image_bytes().items():
        if not name.startswith("bad_"):
            (odd / name).write_bytes(data)
    odd_cfg = config(odd)
    for a, b in zip(epoch_of(CPULoader(odd_cfg, 0, 1, torch.device("cpu")), 0),
                    epoch_of(build_torchvision_loader(odd_cfg, 0, 1, torch.device("cuda")), 0)):
        assert ((a - b).abs().mean(dim=(1, 2, 3)) < 0.03).all()  # grayscale on the GPU, CMYK and PNG via PIL


@pytest.mark.gpu
def test_cpu_loader_on_the_gpu_hands_over_each_batch_from_its_side_stream(photos):
    """The CPU loader on CUDA copies and normalises each batch on a side stream, one batch ahead:
    the batches equal the CPU device's exactly, read on the consumer's stream while the GPU is busy."""
    cfg = config(photos, num_workers=2)
    on_cpu = epoch_of(CPULoader(cfg, 0, 1, torch.device("cpu")), 1)
    loader = CPULoader(cfg, 0, 1, torch.device("cuda"))
    loader.set_epoch(1)
    for expected, images in zip(on_cpu, loader, strict=True):
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU spin queued on the consumer's stream ahead of the read
        assert images.device.type == "cuda" and torch.equal(images.cpu(), expected)


@pytest.mark.gpu
def test_hybrid_loader_on_the_gpu_matches_cpu_loader(photos):
    cfg = config(photos, loader="hybrid", num_workers=2)
    gpu = build_loader(cfg, 0, 1, torch.device("cuda"))
    on_gpu = epoch_of(gpu, 1)
    for a, b in zip(epoch_of(CPULoader(config(photos), 0, 1, torch.device("cpu")), 1), on_gpu, strict=True):
        assert b.dtype == torch.float32 and (a - b).abs().mean() < 0.001 and (a - b).abs().max() <= ONE_GREY_LEVEL
    # the batched Triton resize on a side stream against the reference on the host, crop for crop:
    # the same grey levels but for fp32 round-off at .5 (a batch read before it is ready would not be)
    for a, b in zip(epoch_of(build_loader(cfg, 0, 1, torch.device("cpu")), 1), on_gpu, strict=True):
        assert (a - b).abs().max() <= ONE_GREY_LEVEL and ((a - b) == 0).float().mean() > 0.99


@pytest.mark.gpu
@needs_dali
def test_dali_gpu_loader_matches_cpu_loader(photos):
    from fastmae.data.dali import build_dali_loader

    cfg = config(photos)
    gpu = build_dali_loader(cfg, 0, 1, torch.device("cuda"))
    for a, b in zip(epoch_of(CPULoader(cfg, 0, 1, torch.device("cpu")), 1), epoch_of(gpu, 1)):
        assert (a - b).abs().mean() < 0.02


# --- benchmark CLI -------------------------------------------------------------------------------
def test_bench_data_cli_measures_each_available_loader(photos, tmp_path, capsys):
    from fastmae.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "data", "--data_path", str(photos), "--batch_size", "4", "--input_size", "32",
                 "--num_threads", "1", "--warmup", "1", "--json", str(out), "--plot", str(tmp_path / "bench.png")]) == 0
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    import json

    report = json.loads(out.read_text())
    measured = {(row["loader"], row["mode"]) for row in report["results"]}
    expected = {("cpu", "decode"), ("cpu", "augment"), ("hybrid", "augment")}  # hybrid decodes as cpu does
    expected |= {("dali", "decode"), ("dali", "augment")} if HAS_DALI else set()
    assert measured == expected
    for row in report["results"]:
        assert row["images"] == 4 * (6 - 1 - 1) and row["timed_batches"] == 4 and row["img_per_s"] > 0
    said = capsys.readouterr().out
    assert report["num_threads"] == 1 and "img/s" in said and report["pending"] == [] and report["complete"]
    # the 24 photos hold 4 timed batches of 4, not the 50 asked: said beside the rates
    assert "note: 4 batch(es) timed per loader, not the 50 asked: the data holds 24 images" in said
    # no loader measurable here: an error, not an empty "complete" result
    assert main(["bench", "data", "--data_path", str(photos), "--loaders", "torchvision",
                 "--json", str(tmp_path / "none.json")]) == 2
    assert "no loader could be measured here ({'torchvision': 'decodes on a CUDA device only'})" in \
        capsys.readouterr().err and not (tmp_path / "none.json").exists()
    (tmp_path / "empty").mkdir()
    assert main(["bench", "data", "--data_path", str(tmp_path / "empty")]) == 2
    assert "fastmae bench data: error: --data_path" in capsys.readouterr().err


# --- found by mutation testing -------------------------------------------------------------------
def test_progressive_jpegs_are_read_not_skipped(tmp_path):
    """Progressive JPEGs (SOF2) are common in web-scraped data: the header check must size them."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, progressive=True)
    header = read_header(buffer.getvalue())
    assert (header.format, header.width, header.height, header.channels) == ("jpeg", 53, 37, 3)
    for index in range(8):
        (tmp_path / f"progressive_{index}.jpg").write_bytes(buffer.getvalue())
    reader = EncodedBatchReader(open_source(tmp_path), config(tmp_path, batch_size=4), 0, 1)
    reader.set_epoch(0)
    for batch in reader:
        reader.report(batch)
    assert reader.skipped == 0


@pytest.mark.parametrize("parallel", [1, 2])
def test_bench_data_batches_flag_times_that_many_batches(parallel):
    from fastmae.data.bench import measure

    loader = [torch.zeros(4, 3, 8, 8) for _ in range(20)]
    result = measure(loader, "list", torch.device("cpu"), warmup=2, batches=4, batch_size=4, parallel=parallel)
    assert result["timed_batches"] == 4 and result["images"] == 16
