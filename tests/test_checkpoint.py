"""Checkpoints load both ways between fastmae and the (re-derived) reference code."""

import argparse
import errno
import os

import pytest
import torch
from safetensors.torch import save_file

from fastmae import MaskedAutoencoderViT
from fastmae.checkpoint import atomic_save, load_weights, read_checkpoint, save_checkpoint
from fastmae.pos_embed import interpolate_pos_embed
from full_disk import refuse_writes
from reference_mae import ReferenceMAE

SMALL = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=2, num_heads=4,
             decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=4)


def outputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    imgs, noise = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 64, generator=g)
    with torch.no_grad():
        return model(imgs, 0.75, noise)


def reference_training_checkpoint(ref: ReferenceMAE, path):
    """What main_pretrain.py writes: model, optimizer, epoch, scaler and an argparse.Namespace."""
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.9, 0.95))
    ref(torch.randn(2, 3, 32, 32), 0.75, torch.rand(2, 64))[0].backward()
    opt.step()
    args = argparse.Namespace(model="mae_vit_micro_patch4", blr=1.5e-4, mask_ratio=0.75, norm_pix_loss=False)
    torch.save({"model": ref.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                "scaler": {"scale": 65536.0}, "args": args}, path)


def test_fastmae_checkpoint_loads_into_reference(tmp_path):
    fast = MaskedAutoencoderViT(**SMALL, kernels="torch")
    opt = torch.optim.AdamW(fast.parameters())
    save_checkpoint(tmp_path / "checkpoint-0.pth", fast, opt, epoch=0, args=argparse.Namespace(blr=1.5e-4))
    # the reference loads with torch.load (weights_only=True by default since torch 2.6)
    container = torch.load(tmp_path / "checkpoint-0.pth", weights_only=True)
    assert set(container) == {"model", "optimizer", "epoch", "args"}
    ref = ReferenceMAE(**SMALL)
    ref.load_state_dict(container["model"], strict=True)
    for ours, theirs in zip(outputs(fast), outputs(ref)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_reference_training_checkpoint_loads_into_fastmae(tmp_path):
    ref = ReferenceMAE(**SMALL)
    reference_training_checkpoint(ref, tmp_path / "ref.pth")
    fast = MaskedAutoencoderViT(**SMALL, kernels="torch")
    report = load_weights(fast, tmp_path / "ref.pth", strict=True)
    assert not report.missing and not report.unexpected and len(report.loaded) == len(ref.state_dict())
    for ours, theirs in zip(outputs(fast), outputs(ref)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_bare_state_dict_and_safetensors(tmp_path):
    ref = ReferenceMAE(**SMALL)
    torch.save(ref.state_dict(), tmp_path / "bare.pth")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for name in ("bare.pth", "w.safetensors"):
        fast = MaskedAutoencoderViT(**SMALL, kernels="torch")
        load_weights(fast, tmp_path / name, strict=True)
        torch.testing.assert_close(outputs(fast)[1], outputs(ref)[1], rtol=1e-5, atol=1e-6)


def test_encoder_only_file_loads_with_a_report(tmp_path):
    ref = ReferenceMAE(**SMALL)
    encoder = {k: v for k, v in ref.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    encoder["head.weight"] = torch.zeros(10, 64)  # a fine-tuned file carries a classifier head
    torch.save({"model": encoder}, tmp_path / "encoder.pth")
    fast = MaskedAutoencoderViT(**SMALL)
    report = load_weights(fast, tmp_path / "encoder.pth")
    assert "decoder_embed.weight" in report.missing and "mask_token" in report.missing
    assert report.unexpected == ["head.weight"]
    text = str(report)
    assert "decoder_blocks.* (" in text and "not in the checkpoint" in text and "head.weight" in text
    torch.testing.assert_close(fast.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)
    with pytest.raises(ValueError, match="strict load failed"):
        load_weights(MaskedAutoencoderViT(**SMALL), tmp_path / "encoder.pth", strict=True)


def test_different_architecture_is_a_clear_error(tmp_path):
    deeper = ReferenceMAE(**{**SMALL, "depth": 3})
    with pytest.raises(ValueError, match="different architecture: it has 3 blocks, the model 2"):
        load_weights(MaskedAutoencoderViT(**SMALL), {"model": deeper.state_dict()})
    wider = ReferenceMAE(**{**SMALL, "embed_dim": 32})
    with pytest.raises(ValueError, match=r"different architecture: cls_token has shape \[1, 1, 32\] in the file, \[1, 1, 64\] in the model"):
        load_weights(MaskedAutoencoderViT(**SMALL), {"model": wider.state_dict()})
    with pytest.raises(ValueError, match="no tensor of the checkpoint matches"):
        load_weights(MaskedAutoencoderViT(**SMALL), {"model": {"fc.weight": torch.zeros(3)}})


def test_another_image_size_keeps_the_maes_sin_cos_tables_and_interpolates_a_classifiers(tmp_path):
    """The MAE's position embeddings are fixed sin-cos tables of the grid: the model's own are exact for
    its grid, and the checkpoint's interpolated would differ from them. A classifier's are learned, and
    interpolated as the reference's interpolate_pos_embed does."""
    from fastmae.downstream.vit_classifier import create_classifier
    from fastmae.models import create_model
    from fastmae.pos_embed import sincos_2d

    ref = ReferenceMAE(**SMALL)  # 8x8 grid
    bigger = MaskedAutoencoderViT(**{**SMALL, "img_size": 48})  # 12x12 grid
    report = load_weights(bigger, {"model": ref.state_dict()})
    assert sorted(report.kept) == ["decoder_pos_embed", "pos_embed"] and not report.interpolated
    assert "pos_embed" not in report.missing and "the model's own sin-cos table kept" in str(report)
    torch.testing.assert_close(bigger.pos_embed[0], sincos_2d(64, 12).float())
    assert (bigger.pos_embed - interpolate_pos_embed(ref.pos_embed.data, 144)).abs().max() > 0.1
    torch.testing.assert_close(bigger.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="strict load failed"):  # strict: a tensor of the file not loaded
        load_weights(MaskedAutoencoderViT(**{**SMALL, "img_size": 48}), {"model": ref.state_dict()}, strict=True)

    classifier = create_classifier("vit_micro_patch4", 10, img_size=48)
    learned = create_model("mae_vit_micro_patch4").state_dict()
    learned["pos_embed"] = torch.randn_like(learned["pos_embed"])  # as fine-tuning leaves it
    report = load_weights(classifier, learned)
    assert report.interpolated == ["pos_embed"] and not report.kept
    torch.testing.assert_close(classifier.pos_embed, interpolate_pos_embed(learned["pos_embed"], 144))


class NotAWeight:
    def __reduce__(self):
        return (os.getcwd, ())  # arbitrary code on unpickling


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    torch.save({"model": ReferenceMAE(**SMALL).state_dict(), "payload": NotAWeight()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil.pth holds Python objects other than tensors .*getcwd"):
        load_weights(MaskedAutoencoderViT(**SMALL), tmp_path / "evil.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pth")


def test_broken_checkpoint_files_are_named_as_broken(tmp_path):
    atomic_save({"model": ReferenceMAE(**SMALL).state_dict()}, tmp_path / "whole.pth")
    whole = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    (tmp_path / "noise.pth").write_bytes(bytes(range(200, 256)) * 4)
    (tmp_path / "empty.pth").write_bytes(b"")
    for name in ("truncated.pth", "noise.pth"):
        with pytest.raises(ValueError, match=f"{name} is not a readable PyTorch or safetensors file") as caught:
            read_checkpoint(tmp_path / name)
        assert "weights_only` set to `False`" not in str(caught.value)  # not torch's advice to unpickle anything
    with pytest.raises(ValueError, match="empty.pth is empty"):
        read_checkpoint(tmp_path / "empty.pth")
    save_file(ReferenceMAE(**SMALL).state_dict(), tmp_path / "whole.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "whole.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file"):
        read_checkpoint(tmp_path / "cut.safetensors")
    assert "model" in read_checkpoint(tmp_path / "whole.pth")
    assert "model" in read_checkpoint(tmp_path / "whole.safetensors")


def test_a_folder_given_as_checkpoint_names_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ValueError, match="run is a folder, not a checkpoint file, and holds no .pth"):
        read_checkpoint(run)
    for step, mtime in ((8, 1e9), (16, 1e9 + 100)):  # step 16 is the newer file
        path = run / f"checkpoint-step{step:08d}.pth"
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    with pytest.raises(ValueError, match="newest first: checkpoint-step00000016.pth, checkpoint-step00000008.pth$"):
        read_checkpoint(run)


def test_atomic_save_keeps_the_previous_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"step": 1}, path)

    def killed_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # what a SIGINT during the write looks like

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left behind


def test_atomic_save_on_a_disk_that_fills_up_raises_the_disks_error_and_keeps_the_previous_file(tmp_path,
                                                                                                monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"step": 1}, path)
    refuse_writes(monkeypatch, [path.name], room=1000)
    with pytest.raises(OSError) as raised:  # torch.save itself raises "RuntimeError: ... unexpected pos"
        atomic_save({"step": 2, "weights": torch.zeros(10_000)}, path)
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_a_folder_where_no_file_can_be_made_is_named_and_is_not_taken_for_a_missing_input(tmp_path, capsys):
    """/proc takes no new file, even from root: the error names the folder, not the temporary file, and is
    not a FileNotFoundError, which the commands read as a missing input (exit 2, no "could not write")."""
    from fastmae.cli import main
    from fastmae.models import create_model

    with pytest.raises(OSError, match=r"^no file can be made in /proc: No such file or directory$") as raised:
        atomic_save({"step": 1}, "/proc/checkpoint.pth")
    assert not isinstance(raised.value, FileNotFoundError)
    checkpoint = tmp_path / "mae.pth"
    save_checkpoint(checkpoint, create_model("mae_vit_micro_patch4"), args={"model": "mae_vit_micro_patch4"})
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "timm", "--output", "/proc/x.safetensors"]) == 1
    assert ("fastmae export: error: could not write /proc/x.safetensors: no file can be made in /proc: "
            "No such file or directory") in capsys.readouterr().err


def test_saved_checkpoints_are_readable_by_other_users(tmp_path):
    import stat

    path = tmp_path / "checkpoint.pth"
    atomic_save({"step": 1}, path)  # through mkstemp, which creates files only their owner may read
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
