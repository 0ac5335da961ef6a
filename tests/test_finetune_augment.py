"""The reference fine-tuning's extra augmentations, RandAugment (--aa) and random erasing (--reprob),
against the numbers in timm's auto_augment.py / random_erasing.py; against timm itself where it imports."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.cli import main as fastmae_main
from fastmae.downstream import rand_augment as ra
from fastmae.downstream.labeled_data import ClassificationTransform
from fastmae.downstream.rand_augment import RandAugment, level_arguments, parse_rand_augment
from fastmae.downstream.random_erasing import RandomErasing
from test_downstream import mae_checkpoint, tiny_folder  # noqa: F401  (fixtures)


def test_the_reference_config_parses_as_timm_does():
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == RandAugment(
        magnitude=9.0, num_ops=2, magnitude_std=0.5, magnitude_max=10.0, increasing=True, prob=0.5)
    assert parse_rand_augment("rand-m7-n3-mstd101-mmax8-p0.3") == RandAugment(
        magnitude=7.0, num_ops=3, magnitude_std=math.inf, magnitude_max=8.0, increasing=False, prob=0.3)
    assert parse_rand_augment("none") is None and parse_rand_augment("") is None
    assert len(parse_rand_augment("rand-m9-inc1").ops) == len(parse_rand_augment("rand-m9").ops) == 15


@pytest.mark.parametrize("config, complaint", [
    ("autoaug", "only RandAugment"), ("v0", "only RandAugment"), ("rand-m9-w0", "unknown section 'w0'"),
    ("rand-mX", "needs a number after 'm'"), ("rand-n0", "n must be >= 1"), ("rand-p2", "p in"),
])
def test_a_config_that_is_not_supported_is_named(config, complaint):
    with pytest.raises(ValueError, match=complaint):
        parse_rand_augment(config)


class Sign:
    """A stand-in Generator whose random() decides the sign: > 0.5 negates, as timm's _randomly_negate."""

    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


@pytest.mark.parametrize("name, magnitude, positive, negative", [
    ("Rotate", 10, 30.0, -30.0), ("Rotate", 9, 27.0, -27.0),
    ("ShearX", 9, 0.27, -0.27), ("TranslateYRel", 9, 0.405, -0.405),
    ("ColorIncreasing", 9, 1.81, 0.19), ("SharpnessIncreasing", 10, 1.9, 0.1),
    ("Posterize", 9, 3, 3), ("PosterizeIncreasing", 9, 1, 1), ("PosterizeIncreasing", 10, 0, 0),
    ("Solarize", 9, 230, 230), ("SolarizeIncreasing", 9, 26, 26), ("SolarizeAdd", 9, 99, 99),
    ("Contrast", 9, 1.72, 1.72),
])
def test_level_arguments_are_timms(name, magnitude, positive, negative):
    assert level_arguments(name, magnitude, Sign(0.2))[0] == pytest.approx(positive)
    assert level_arguments(name, magnitude, Sign(0.8))[0] == pytest.approx(negative)
    assert level_arguments("Invert", magnitude, Sign(0.2)) == ()


def gradient_image(size=8):
    x = np.arange(size * size * 3, dtype=np.int64).reshape(size, size, 3) * 4 % 256
    return Image.fromarray(x.astype(np.uint8))


def test_operations_on_pixels():
    img = gradient_image()
    pixels = np.asarray(img).astype(int)
    assert np.array_equal(np.asarray(ra.OPERATIONS["Invert"](img)), 255 - pixels)
    added = np.asarray(ra.OPERATIONS["SolarizeAdd"](img, 20)).astype(int)
    assert np.array_equal(added, np.where(pixels < 128, np.minimum(pixels + 20, 255), pixels))
    # a positive relative translation moves the content left; the uncovered columns get the ImageNet mean
    moved = np.asarray(ra.OPERATIONS["TranslateXRel"](img, 0.25))
    assert np.array_equal(moved[:, :6], np.asarray(img)[:, 2:])
    assert (moved[:, 6:] == np.array(ra.IMAGENET_MEAN_UINT8)).all()
    assert np.array_equal(np.asarray(ra.OPERATIONS["PosterizeIncreasing"](img, 0)), np.zeros_like(pixels))


def test_rand_augment_draws_ops_with_replacement_applies_each_with_p_at_a_noisy_magnitude(monkeypatch):
    applied = []
    for name in ra.INCREASING_OPS:
        monkeypatch.setitem(ra.OPERATIONS, name, lambda img, *args, name=name: applied.append((name, args)) or img)
    magnitudes = []
    monkeypatch.setattr(ra, "level_arguments", lambda name, m, rng: magnitudes.append(m) or ())
    augment = parse_rand_augment("rand-m9-mstd0.5-inc1")
    rng = np.random.default_rng(0)
    img = gradient_image()
    for _ in range(3000):
        assert augment(img, rng) is img
    assert len(applied) == pytest.approx(3000 * 2 * 0.5, rel=0.05)  # two draws, each kept with p 0.5
    counts = {name: sum(1 for n, _ in applied if n == name) for name in ra.INCREASING_OPS}
    assert min(counts.values()) > 0.7 * len(applied) / 15  # uniform choice over the 15 increasing ops
    m = np.array(magnitudes)
    assert m.max() <= 10.0 and abs(m.mean() - 9.0) < 0.05 and 0.4 < m[m < 10].std() < 0.55


def test_random_erasing_erases_one_rectangle_of_the_reference_size():
    rng = np.random.default_rng(0)
    erase = RandomErasing(prob=1.0, mode="pixel", max_count=1)
    for _ in range(200):
        image = erase(torch.zeros(3, 32, 32), rng)
        rows, cols = torch.nonzero(image[0], as_tuple=True)
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert len(rows) == h * w  # one full rectangle of noise, the same box in every channel
        assert torch.equal(image[0] != 0, image[1] != 0)
        assert 0.02 * 1024 - 2 * 32 <= h * w <= 1024 / 3 + 2 * 32 and h < 32 and w < 32
    assert torch.equal(RandomErasing(prob=0.0)(torch.ones(3, 8, 8), rng), torch.ones(3, 8, 8))
    const = RandomErasing(prob=1.0, mode="const")(torch.ones(3, 32, 32), rng)
    assert 0 < int((const == 0).sum()) < const.numel() and set(const.unique().tolist()) == {0.0, 1.0}
    erased = [(RandomErasing(prob=0.25)(torch.zeros(3, 16, 16), rng) != 0).any().item() for _ in range(2000)]
    assert np.mean(erased) == pytest.approx(0.25, abs=0.03)
    for bad in (dict(prob=1.5), dict(mode="noise"), dict(max_count=0)):
        with pytest.raises(ValueError, match="--re"):
            RandomErasing(**bad)


def test_the_train_view_gets_both_the_eval_view_neither():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 36, 3), dtype=np.uint8))

    def views(**kwargs):
        torch.manual_seed(5)
        transform = ClassificationTransform(32, train=kwargs.pop("train", True), **kwargs)
        return torch.stack([transform(img) for _ in range(8)])

    plain = views()
    augmented = views(rand_augment=parse_rand_augment("rand-m9-mstd0.5-inc1"), random_erasing=RandomErasing(1.0))
    assert not torch.equal(plain, augmented) and torch.equal(augmented, views(
        rand_augment=parse_rand_augment("rand-m9-mstd0.5-inc1"), random_erasing=RandomErasing(1.0)))  # seeded
    assert torch.equal(views(train=False), views(train=False, rand_augment=parse_rand_augment("rand-m9"),
                                                 random_erasing=RandomErasing(1.0)))


def test_finetune_refuses_a_bad_aa_or_reprob_before_reading_data(tiny_folder, mae_checkpoint, capsys):  # noqa: F811
    common = ["--checkpoint", str(mae_checkpoint), "--data_path", str(tiny_folder), "--num_workers", "0"]
    assert fastmae_main(["finetune", *common, "--aa", "augmix-m5"]) == 2
    assert "--aa 'augmix-m5': only RandAugment" in capsys.readouterr().err
    assert fastmae_main(["finetune", *common, "--reprob", "-0.1"]) == 2
    assert "--reprob must be in [0, 1]" in capsys.readouterr().err


TIMM_OPS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
            "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
            "TranslateXRel", "TranslateYRel"]


@pytest.mark.parametrize("name", TIMM_OPS)
def test_each_operation_equals_timms(name, monkeypatch):
    """Runs where timm imports (the GPU machine): timm's op at the level timm computes, with the
    reference's hparams (bicubic, ImageNet-mean fill), against ours at the same magnitude and sign."""
    auto_augment = pytest.importorskip("timm.data.auto_augment")
    import random

    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 20, 3), dtype=np.uint8))
    hparams = dict(translate_const=100, img_mean=ra.IMAGENET_MEAN_UINT8, interpolation=Image.BICUBIC)
    for magnitude, sign_draw in ((9.0, 0.2), (9.0, 0.8), (10.0, 0.2), (3.5, 0.8)):
        with monkeypatch.context() as patch:
            patch.setattr(random, "random", lambda: sign_draw)  # timm's _randomly_negate draws this
            level = auto_augment.LEVEL_TO_ARG[name]
            args = level(magnitude, hparams) if level is not None else ()
        ours = level_arguments(name, magnitude, Sign(sign_draw))
        assert ours == pytest.approx(tuple(args))
        if name == "PosterizeIncreasing" and args[0] == 0:
            continue  # recent Pillow refuses 0 bits in timm's call; ours is black, as Pillow was (test above)
        expected = auto_augment.NAME_TO_OP[name](img, *args, fillcolor=ra.IMAGENET_MEAN_UINT8, resample=Image.BICUBIC)
        assert np.array_equal(np.asarray(ra.OPERATIONS[name](img, *ours)), np.asarray(expected)), (name, magnitude)


def test_the_eval_view_above_224_px_is_not_cropped_as_at_224():
    """util/datasets.py: crop_pct 224/256 up to 224 px, 1.0 above (the 448 px fine-tuning of ViT-H)."""
    from fastmae.data.augment import normalize, resize_center_crop

    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    for size, resized in ((224, 256), (256, 256), (112, 128)):
        pixels = resize_center_crop(img, size, resize_to=resized)
        want = normalize(torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0))[0]
        assert torch.equal(ClassificationTransform(size, train=False)(img), want), size


@pytest.mark.parametrize("width, height, resized, left, top", [
    (640, 427, (383, 256), 80, 16),  # 256 x 640 / 427 = 383.7: truncated; (383 - 224) / 2 = 79.5: rounded
    (300, 451, (256, 384), 16, 80),  # 384.9 -> 384, offset 80
    (500, 281, (455, 256), 116, 16),  # 455.5 -> 455, (455 - 224) / 2 = 115.5 -> 116
    (500, 375, (341, 256), 58, 16),  # 341.3 -> 341, 58.5 -> 58 (Python rounds half to even, as torchvision does)
])
def test_the_eval_view_is_torchvisions_resize_then_center_crop(width, height, resized, left, top):
    """util/datasets.py's eval transform, Resize(256, bicubic) + CenterCrop(224): torchvision truncates
    the longer side (int(256 x long / short)) and rounds the crop's offsets."""
    from fastmae.data.augment import resize_center_crop

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    want = np.array(img.resize(resized, Image.BICUBIC).crop((left, top, left + 224, top + 224)))
    assert np.array_equal(resize_center_crop(img, 224, resize_to=256), want)
