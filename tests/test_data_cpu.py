"""The CPU data pipeline: folder layouts, rank shards, the crop sampler, the loader and bad data."""

import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.data.augment import (IMAGENET_MEAN, IMAGENET_STD, normalize, random_resized_crop_flip,
                                  sample_clamped_resized_crop, sample_resized_crop)
from fastmae.data.embedded import EmbeddedPhotos, load_photos
from fastmae.data.loader import DataConfig, build_loader, preview_batch, resolve_loader
from fastmae.data.sources import list_image_files, shard_indices


def write_images(folder, count, size=(40, 48), prefix="img"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(count):
        pixels = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{prefix}{i:03d}.png")


# ---- sources ----

def test_list_image_files_reference_layout_class_folders_and_flat(tmp_path):
    write_images(tmp_path / "imagenet" / "train" / "n01", 3)
    write_images(tmp_path / "imagenet" / "train" / "n02", 2)
    write_images(tmp_path / "imagenet" / "val" / "n01", 4)  # not read: the reference reads train/
    (tmp_path / "imagenet" / "train" / "n01" / "notes.txt").write_text("not an image")
    files = list_image_files(tmp_path / "imagenet")
    assert len(files) == 5 and all("train" in f.parts for f in files)

    write_images(tmp_path / "classes" / "a", 2)
    write_images(tmp_path / "classes" / "b", 1)
    assert len(list_image_files(tmp_path / "classes")) == 3

    write_images(tmp_path / "flat", 4)
    assert [f.name for f in list_image_files(tmp_path / "flat")] == [f"img{i:03d}.png" for i in range(4)]


def test_the_clamped_crop_is_the_reference_linear_probes_single_draw():
    """util/crop.py's get_params, line by line on a twin generator: one area and aspect-ratio draw, each
    side clamped to the image, then the offsets; never torchvision's retries or central fallback."""
    import math

    for seed in range(200):
        height, width = (375, 500) if seed % 2 else (500, 333)
        box = sample_clamped_resized_crop(height, width, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(seed))
        twin = np.random.default_rng(seed)
        target_area = height * width * twin.uniform(0.08, 1.0)
        aspect_ratio = math.exp(twin.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = min(int(round(math.sqrt(target_area * aspect_ratio))), width)
        h = min(int(round(math.sqrt(target_area / aspect_ratio))), height)
        top, left = twin.integers(0, height - h + 1), twin.integers(0, width - w + 1)
        assert box == (top, left, h, w), seed
    # a draw taller than the image is cut to its height and keeps its width: torchvision's would draw again
    rng = np.random.default_rng(0)
    boxes = [sample_clamped_resized_crop(10, 1000, (1.0, 1.0), (3 / 4, 4 / 3), rng) for _ in range(20)]
    assert all(h == 10 and 86 <= w <= 116 for _, _, h, w in boxes)  # sqrt(10,000 x 3/4 .. 4/3)
    assert sample_clamped_resized_crop(1, 1, (0.08, 0.08), (1.0, 1.0), rng) == (0, 0, 1, 1)  # at least a pixel


def test_image_links_that_lead_to_nothing_are_named(tmp_path):
    (tmp_path / "pool").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "pool" / "kept.png")
    subset = tmp_path / "subset"
    subset.mkdir()
    (subset / "kept.png").symlink_to(tmp_path / "pool" / "kept.png")
    (subset / "moved.png").symlink_to(tmp_path / "pool" / "moved.png")  # its target went elsewhere
    with pytest.warns(UserWarning, match=r"1 image link\(s\) below it lead to nothing \(e.g. .*moved.png -> "
                                         r".*pool/moved.png\); they are passed over"):
        assert [f.name for f in list_image_files(subset)] == ["kept.png"]
    (subset / "kept.png").unlink()
    with pytest.raises(ValueError, match=r"holds no image files .*; 1 image link\(s\) below it lead to nothing"):
        list_image_files(subset)


def test_symlinked_class_folders_are_read_and_a_link_to_an_ancestor_is_not_followed(tmp_path):
    write_images(tmp_path / "pool", 3)
    write_images(tmp_path / "data" / "train" / "cat", 2)
    (tmp_path / "data" / "train" / "dog").symlink_to(tmp_path / "pool")  # a subset built from links
    (tmp_path / "data" / "train" / "dog2").symlink_to(tmp_path / "pool")  # the same folder twice: two classes
    (tmp_path / "data" / "train" / "cat" / "loop").symlink_to(tmp_path / "data")  # would recurse forever
    files = list_image_files(tmp_path / "data")
    assert sorted(f.parent.name for f in files) == ["cat"] * 2 + ["dog"] * 3 + ["dog2"] * 3
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "only").symlink_to(tmp_path / "pool")
    assert len(list_image_files(tmp_path / "links")) == 3


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list_image_files(tmp_path / "nowhere")
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        list_image_files(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        build_loader(DataConfig(str(tmp_path / "nowhere"), num_workers=0), 0, 1, torch.device("cpu"))


@pytest.mark.parametrize("num_items,world_size", [(10, 1), (10, 2), (11, 3), (7, 4)])
def test_shards_are_disjoint_cover_everything_and_reshuffle_per_epoch(num_items, world_size):
    shards = [shard_indices(num_items, epoch=0, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1  # equal shares, as DistributedSampler
    together = np.concatenate(shards)
    assert set(together.tolist()) == set(range(num_items))
    assert len(together) - len(set(together.tolist())) == len(together) - num_items  # only the padding repeats
    if num_items % world_size == 0:
        assert len(together) == num_items
    again = shard_indices(num_items, epoch=0, seed=5, rank=0, world_size=world_size)
    next_epoch = shard_indices(num_items, epoch=1, seed=5, rank=0, world_size=world_size)
    assert np.array_equal(again, shards[0]) and not np.array_equal(next_epoch, shards[0])
    with pytest.raises(ValueError, match="rank"):
        shard_indices(num_items, 0, 0, rank=world_size, world_size=world_size)


# ---- augmentation ----

def test_crop_boxes_follow_the_random_resized_crop_distribution():
    rng = np.random.default_rng(0)
    height, width = 300, 400
    fractions, ratios = [], []
    for _ in range(2000):
        top, left, h, w = sample_resized_crop(height, width, rng=rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        fractions.append(h * w / (height * width))
        ratios.append(w / h)
    fractions, ratios = np.array(fractions), np.array(ratios)
    # area uniform in [0.2, 1] (rounding to whole pixels aside), log-ratio uniform in [log 3/4, log 4/3];
    # draws that do not fit are retried, which thins out the large-area end
    assert fractions.min() > 0.19 and fractions.max() <= 1.0
    assert 0.74 < ratios.min() and ratios.max() < 1.35
    assert 0.45 < fractions.mean() < 0.6
    assert np.log(ratios).mean() > 0  # a landscape image fits wide crops more often than tall ones
    square = np.array([sample_resized_crop(400, 400, rng=rng) for _ in range(2000)])
    assert abs(np.log(square[:, 3] / square[:, 2]).mean()) < 0.02  # no preferred orientation


def test_crop_falls_back_to_the_central_crop_when_nothing_fits():
    rng = np.random.default_rng(0)
    # a 10 x 1000 strip: no crop of ratio in [3/4, 4/3] and area >= 20% fits, so the central crop
    # with the ratio clamped to 4/3 is returned, as torchvision
    assert sample_resized_crop(10, 1000, rng=rng) == (0, (1000 - 13) // 2, 10, 13)
    assert sample_resized_crop(1000, 10, rng=rng) == ((1000 - 13) // 2, 0, 13, 10)
    with pytest.raises(ValueError, match="positive"):
        sample_resized_crop(0, 10, rng=rng)


def test_augment_output_and_normalisation():
    image = Image.fromarray(np.full((30, 50, 3), 200, dtype=np.uint8))
    pixels = random_resized_crop_flip(image, 16, np.random.default_rng(0))
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8 and pixels.flags.writeable
    batch = normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    expected = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(batch[0, :, 3, 3], expected)
    # flips: with p = 0.5 about half of many draws of an asymmetric image are mirrored
    ramp = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3)))
    rng = np.random.default_rng(1)
    flipped = [random_resized_crop_flip(ramp, 8, rng, scale=(1, 1), ratio=(1, 1))[0, 0, 0] > 128 for _ in range(200)]
    assert 70 < sum(flipped) < 130


# ---- the loader ----

def cpu_config(data_path, **kw):
    settings = dict(input_size=16, batch_size=4, num_workers=0, pin_mem=False, seed=3, loader="cpu") | kw
    return DataConfig(data_path=str(data_path) if data_path else None, **settings)


def test_loader_batches_epoch_length_resume_position_and_workers(tmp_path):
    write_images(tmp_path / "imgs", 18)
    loader = build_loader(cpu_config(tmp_path / "imgs"), 0, 2, torch.device("cpu"))
    assert len(loader) == 2  # 9 images on this rank, full batches of 4 only
    loader.set_epoch(0)
    epoch0 = list(loader)
    assert len(epoch0) == 2 and epoch0[0].shape == (4, 3, 16, 16) and epoch0[0].dtype == torch.float32
    loader.set_epoch(0, start_batch=1)  # a resumed run: the same second batch, the first not decoded
    assert [b.shape for b in loader] == [(4, 3, 16, 16)] and torch.equal(list(loader)[0], epoch0[1])
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader)), epoch0[0])
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=3)
    # worker processes do not change what is loaded
    with_workers = build_loader(DataConfig(str(tmp_path / "imgs"), 16, 4, 1, False, 3, "cpu"), 0, 2, torch.device("cpu"))
    with_workers.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(list(with_workers), epoch0))


def test_worker_loader_runs_on_across_epochs_and_gives_each_epoch_its_own_batches(tmp_path):
    """With workers, one stream of batches runs from epoch to epoch: every epoch, a resumed epoch and an
    epoch read twice (no set_epoch between) hold the batches a loader without workers makes for them."""
    write_images(tmp_path / "imgs", 12)
    alone = build_loader(cpu_config(tmp_path / "imgs"), 0, 1, torch.device("cpu"))

    def epoch(loader, number, start=0):
        loader.set_epoch(number, start)
        return list(loader)

    expected = {e: epoch(alone, e) for e in range(4)}
    streamed = build_loader(cpu_config(tmp_path / "imgs", num_workers=2), 0, 1, torch.device("cpu"))
    got = [epoch(streamed, 0), epoch(streamed, 1), list(streamed), epoch(streamed, 3, 1), epoch(streamed, 2)]
    want = [expected[0], expected[1], expected[1], expected[3][1:], expected[2]]
    for batches, wanted in zip(got, want, strict=True):
        assert len(batches) == len(wanted) and all(torch.equal(a, b) for a, b in zip(batches, wanted))
    half = iter(streamed)  # an epoch left part-way: the next one is still its own
    streamed.set_epoch(1)
    next(half)
    assert all(torch.equal(a, b) for a, b in zip(epoch(streamed, 2), expected[2], strict=True))


def test_workers_read_the_next_epoch_before_the_current_one_is_done(tmp_path):
    """At an epoch's end the workers are already making the next epoch's first batches: with a
    sampler of one epoch they wait for the next iterator, and a run of short epochs waits at each start."""
    from fastmae.data import loader as loader_module

    log = tmp_path / "keys.log"

    class LoggedItems(loader_module._AugmentedItems):
        def __getitem__(self, key):
            with open(log, "a") as f:
                f.write(f"{key[1]}\n")
            return super().__getitem__(key)

    class LoggedLoader(loader_module.CPULoader):
        items = LoggedItems

    write_images(tmp_path / "imgs", 8)
    loader = LoggedLoader(cpu_config(tmp_path / "imgs", num_workers=2), 0, 1, torch.device("cpu"))
    loader.set_epoch(0)
    assert len(list(loader)) == 2
    deadline = time.monotonic() + 20
    while "1" not in log.read_text().split() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "1" in log.read_text().split(), "no item of epoch 1 was read before its iterator started"
    loader.set_epoch(1)
    assert len(list(loader)) == 2


def test_too_few_images_for_a_batch_is_an_error(tmp_path):
    write_images(tmp_path / "few", 3)
    with pytest.raises(ValueError, match="no full batch"):
        build_loader(cpu_config(tmp_path / "few"), 0, 1, torch.device("cpu"))


def test_unreadable_file_is_skipped_counted_and_reported(tmp_path):
    write_images(tmp_path / "bad", 8)
    (tmp_path / "bad" / "img003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    loader = build_loader(cpu_config(tmp_path / "bad"), 0, 1, torch.device("cpu"))
    loader.set_epoch(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    assert len(batches) == 2 and all(torch.isfinite(b).all() for b in batches)
    assert loader.skipped == 1
    assert any("img003.png" in str(w.message) for w in caught)


def test_embedded_photographs_are_real_colour_images():
    photos = load_photos()
    assert len(photos) >= 12 and {"astronaut", "coffee", "chelsea", "rocket"} <= set(photos)
    for name, pixels in photos.items():
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3 and min(pixels.shape[:2]) >= 150, name
        assert pixels.std() > 10, name  # not blank
    source = EmbeddedPhotos(samples_per_epoch=40)
    assert len(source) == 40 and source.name(1) == f"skimage.data.{source.names[1]}"
    loader = build_loader(cpu_config(None, samples_per_epoch=40), 0, 1, torch.device("cpu"))
    assert len(loader) == 10
    loader.set_epoch(0)
    batch = next(iter(loader))
    assert batch.shape == (4, 3, 16, 16) and -2.5 < batch.mean() < 2.5 and batch.std() > 0.1
    preview = preview_batch(cpu_config(None), count=5)
    assert preview.shape == (5, 3, 16, 16)


def test_auto_loader_choice(monkeypatch):
    from fastmae.data import loader as loader_module

    assert resolve_loader(DataConfig(None, loader="auto"), torch.device("cpu")) == "cpu"
    assert resolve_loader(DataConfig("/data", loader="auto"), torch.device("cpu")) == "cpu"
    assert resolve_loader(DataConfig(None, loader="auto"), torch.device("cuda")) == "cpu"  # embedded photographs
    monkeypatch.setattr(loader_module, "_importable", lambda module: True)
    assert resolve_loader(DataConfig("/data", loader="auto"), torch.device("cuda")) == "dali"
    monkeypatch.setattr(loader_module, "_importable", lambda module: not module.startswith("nvidia"))
    assert resolve_loader(DataConfig("/data", loader="auto"), torch.device("cuda")) == "hybrid"  # torchvision or not
    with pytest.raises(ValueError, match="embedded"):
        resolve_loader(DataConfig(None, loader="dali"), torch.device("cpu"))
    # asked for by name without its package: said up front, not an ImportError at the first batch
    assert resolve_loader(DataConfig("/data", loader="torchvision"), torch.device("cuda")) == "torchvision"
    monkeypatch.setattr(loader_module, "_importable", lambda module: False)
    for loader, package in (("torchvision", "torchvision"), ("dali", "nvidia.dali")):
        with pytest.raises(ValueError, match=f"--data_loader {loader} needs the {package} package, which is not "
                                             "installed"):
            resolve_loader(DataConfig("/data", loader=loader), torch.device("cuda"))
    assert resolve_loader(DataConfig("/data", loader="hybrid"), torch.device("cuda")) == "hybrid"
    with pytest.raises(ValueError, match="loader"):
        DataConfig(None, loader="pil")


# ---- found by mutation testing: behaviour the tests above let change unnoticed ----

def test_normalisation_uses_the_reference_imagenet_constants_in_rgb_order(tmp_path):
    # main_pretrain.py: Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), channels in RGB order
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    pixels = torch.tensor([255, 0, 128], dtype=torch.uint8).view(1, 3, 1, 1)
    expected = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225])
    torch.testing.assert_close(normalize(pixels).flatten(), expected)
    # what the loader hands the model: a flat orange picture, whatever the crop and flip
    folder = tmp_path / "orange"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 48, 3), (255, 0, 128), dtype=np.uint8)).save(folder / f"{i}.png")
    loader = build_loader(cpu_config(folder), 0, 1, torch.device("cpu"))
    loader.set_epoch(0)
    batch = next(iter(loader))
    torch.testing.assert_close(batch, expected.view(1, 3, 1, 1).expand(4, 3, 16, 16), atol=1e-5, rtol=0)


def test_crop_positions_are_uniform_and_reach_every_edge():
    # torchvision's get_params: top uniform in [0, height - h], left in [0, width - w], both ends included
    rng = np.random.default_rng(0)
    height, width = 60, 80
    top, left, h, w = np.array([sample_resized_crop(height, width, scale=(0.2, 0.3), rng=rng) for _ in range(3000)]).T
    assert top.min() == 0 and left.min() == 0
    assert (top + h).max() == height and (left + w).max() == width  # crops touch the bottom and right edges
    assert abs((top / (height - h)).mean() - 0.5) < 0.03 and abs((left / (width - w)).mean() - 0.5) < 0.03


def test_every_sample_of_an_epoch_has_its_own_augmentation_key_on_every_rank():
    from fastmae.data.loader import EpochBatchSampler

    cfg = DataConfig("unused", batch_size=2, num_workers=0, seed=1)
    keys = []
    for rank in range(3):
        sampler = EpochBatchSampler(12, cfg, rank, 3)
        sampler.set_epoch(2)
        keys += [key for batch in sampler for key in batch]
    # (seed, epoch, position) seeds each sample's crop and flip: no two samples of an epoch share one
    assert sorted(position for _, _, position in keys) == list(range(12))
    assert sorted(item for item, _, _ in keys) == list(range(12)) and {epoch for _, epoch, _ in keys} == {2}


def test_identical_images_get_fresh_crops_per_rank_and_per_epoch(tmp_path):
    """Only the augmentation can tell copies of one image apart: it must differ between ranks,
    between epochs and between the samples of a batch."""
    folder = tmp_path / "copies"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    for i in range(16):
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")

    def first_batch(rank, epoch):
        loader = build_loader(cpu_config(folder), rank, 2, torch.device("cpu"))
        loader.set_epoch(epoch)
        return next(iter(loader))

    base = first_batch(0, 0)
    assert torch.equal(base, first_batch(0, 0))
    assert not torch.equal(base, first_batch(1, 0))
    assert not torch.equal(base, first_batch(0, 1))
    assert len({sample.numpy().tobytes() for sample in base}) == len(base)


@pytest.mark.parametrize("num_items,world_size,batch_size", [(10, 3, 4), (13, 4, 2), (9, 2, 5), (16, 2, 4)])
def test_batches_per_epoch_match_the_reference_distributed_sampler(num_items, world_size, batch_size):
    from torch.utils.data import DistributedSampler

    from fastmae.data.loader import EpochBatchSampler

    cfg = DataConfig("unused", batch_size=batch_size, num_workers=0)
    for rank in range(world_size):
        reference = DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=True)
        assert len(shard_indices(num_items, 0, 0, rank, world_size)) == len(reference)  # padded, not dropped
        # the reference DataLoader(drop_last=True): only full batches
        assert len(EpochBatchSampler(num_items, cfg, rank, world_size)) == len(reference) // batch_size


def test_an_empty_data_path_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, capsys):
    from fastmae.cli import main
    from fastmae.data.synthetic import write_jpeg_folder
    from fastmae.downstream.labeled_data import build_datasets

    monkeypatch.chdir(tmp_path)  # a folder with images below it: "" would have trained on them
    write_jpeg_folder(tmp_path / "photos", 8, size=(40, 40))
    assert main(["pretrain", "--data_path", "", "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]) == 2
    assert "--data_path is empty (''; an unset variable in a script?): give the image folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--data_path is empty"):
        build_datasets(" ", 32)
    from fastmae.downstream.visualize import image_paths

    with pytest.raises(ValueError, match=r"--images is empty \(''; an unset variable in a script\?\): give the image"):
        image_paths(["photos", ""])
