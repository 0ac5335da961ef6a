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
