"""fastmae's model against the re-derived reference (tests/reference_mae.py), in float64."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastmae import MaskedAutoencoderViT, create_model, mae_vit_base_patch16
from fastmae.patches import patchify, unpatchify
from fastmae.pos_embed import sincos_2d
from reference_mae import ReferenceMAE, get_2d_sincos_pos_embed

SMALL = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=2, num_heads=4,
             decoder_embed_dim=48, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0)


def twin_models(norm_pix_loss=False, **fast_kwargs):
    """A fastmae model and a reference model holding the same float64 weights."""
    fast = MaskedAutoencoderViT(**SMALL, norm_pix_loss=norm_pix_loss, kernels="torch", **fast_kwargs).double()
    ref = ReferenceMAE(**SMALL, norm_pix_loss=norm_pix_loss).double()
    ref.load_state_dict(fast.state_dict(), strict=True)
    return fast, ref


def batch(n=3, size=32):
    return torch.randn(n, 3, size, size, dtype=torch.float64), torch.rand(n, (size // 4) ** 2, dtype=torch.float64)


@pytest.mark.parametrize("dim,grid", [(64, 8), (768, 14), (48, 5)])
def test_pos_embed_matches_reference_numpy(dim, grid):
    ours = sincos_2d(dim, grid, cls_token=True)
    theirs = torch.from_numpy(get_2d_sincos_pos_embed(dim, grid, cls_token=True))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    assert torch.all(ours[0] == 0)
    # The first half encodes the column: patches in the same column share it.
    assert torch.equal(ours[1 + 0 * grid + 1, : dim // 2], ours[1 + 3 % grid * grid + 1, : dim // 2])


@pytest.mark.parametrize("name,embed,depth,heads,patch",
                         [("mae_vit_base_patch16", 768, 12, 12, 16), ("mae_vit_large_patch16", 1024, 24, 16, 16),
                          ("mae_vit_huge_patch14", 1280, 32, 16, 14)])
def test_named_configs_state_dict_equals_reference(name, embed, depth, heads, patch):
    with torch.device("meta"):
        fast = create_model(name)
        ref = ReferenceMAE(patch_size=patch, embed_dim=embed, depth=depth, num_heads=heads)
    ours = {k: tuple(v.shape) for k, v in fast.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert fast.blocks[0].norm1.eps == 1e-6 and fast.decoder_blocks[0].attn.num_heads == 16
    assert fast.blocks[0].attn.num_heads == heads


def test_base_parameter_count_matches_reference():
    with torch.device("meta"):
        model = mae_vit_base_patch16()
    assert sum(p.numel() for p in model.parameters()) == 111_907_840  # 111.91M, as the reference


def test_init_follows_reference():
    model = MaskedAutoencoderViT(**SMALL)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert "pos_embed" in model.state_dict() and "decoder_pos_embed" in model.state_dict()
    w = model.patch_embed.proj.weight
    fan_in, fan_out = w[0].numel(), w.shape[0]
    bound = (6 / (fan_in + fan_out)) ** 0.5  # xavier-uniform on the [D, 3*p*p] view
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.abs().max() <= (6 / sum(qkv.weight.shape)) ** 0.5
    assert torch.all(qkv.bias == 0) and torch.all(model.decoder_pred.bias == 0)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    for token in (model.cls_token, model.mask_token):
        assert 0.005 < token.std().item() < 0.05


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.9])
def test_forward_matches_reference_float64(norm_pix_loss, mask_ratio):
    fast, ref = twin_models(norm_pix_loss)
    imgs, noise = batch()
    loss, pred, mask = fast(imgs, mask_ratio=mask_ratio, noise=noise)
    ref_loss, ref_pred, ref_mask = ref(imgs, mask_ratio, noise)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_gradients_match_reference_float64(norm_pix_loss):
    fast, ref = twin_models(norm_pix_loss)
    imgs, noise = batch()
    fast(imgs, noise=noise)[0].backward()
    ref(imgs, 0.75, noise)[0].backward()
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert (p.grad is None) == (ref_params[name].grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-10, atol=1e-12, msg=name)


def test_head_on_removed_patches_only_gives_the_same_loss_and_grads():
    fast, _ = twin_models(norm_pix_loss=True)
    imgs, noise = batch()
    trainable = [p for p in fast.parameters() if p.requires_grad]
    loss_full, pred_full, mask = fast(imgs, noise=noise)
    grads_full = torch.autograd.grad(loss_full, trainable)
    loss_part, pred_part, _ = fast(imgs, noise=noise, full_pred=False)
    grads_part = torch.autograd.grad(loss_part, trainable)
    torch.testing.assert_close(loss_part, loss_full, rtol=1e-12, atol=1e-12)
    ids_masked = torch.argsort(noise, dim=1)[:, 16:]
    torch.testing.assert_close(pred_part, torch.gather(pred_full, 1, ids_masked[..., None].expand(-1, -1, 48)))
    for g_full, g_part in zip(grads_full, grads_part):
        torch.testing.assert_close(g_part, g_full, rtol=1e-10, atol=1e-12)


def test_reference_api_methods_match():
    fast, ref = twin_models()
    imgs, noise = batch()
    latent, mask, ids_restore = fast.forward_encoder(imgs, 0.75, noise)
    ref_latent, ref_mask, ref_ids = ref.forward_encoder(imgs, 0.75, noise)
    torch.testing.assert_close(latent, ref_latent, rtol=1e-12, atol=1e-12)
    assert torch.equal(ids_restore, ref_ids) and torch.equal(mask, ref_mask)
    pred = fast.forward_decoder(latent, ids_restore)
    torch.testing.assert_close(pred, ref.forward_decoder(ref_latent, ref_ids), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.forward_loss(imgs, pred, mask), ref.forward_loss(imgs, pred, mask))


def test_masking_semantics():
    model = MaskedAutoencoderViT(**SMALL)
    imgs, noise = batch()
    masking = model.random_masking_ids(imgs, 0.75, noise)
    L, K = 64, 16
    assert masking.ids_keep.shape == (3, K) and masking.ids_masked.shape == (3, L - K)
    # smallest noise is kept; mask is 0 for kept, 1 for removed, in the original order
    kept_by_noise = torch.topk(noise, K, dim=1, largest=False).indices.sort(dim=1).values
    assert torch.equal(masking.ids_keep.sort(dim=1).values, kept_by_noise)
    assert torch.all(masking.mask.gather(1, masking.ids_keep) == 0)
    assert torch.all(masking.mask.sum(1) == L - K)
    arange = torch.arange(L).expand(3, L)
    assert torch.equal(torch.cat([masking.ids_keep, masking.ids_masked], 1).gather(1, masking.ids_restore), arange)


def test_patchify_order_and_inverse():
    p, C = 4, 3
    imgs = torch.randn(2, C, 8, 12)
    x = patchify(imgs, p)
    n, i, j, c, ph, pw = 1, 2, 3, 2, 1, 2  # patch row 1, column 2 of a 2x3 grid
    assert x[n, ph * 3 + pw, (i * p + j) * C + c] == imgs[n, c, ph * p + i, pw * p + j]
    sq = torch.randn(2, C, 8, 8)
    assert torch.equal(unpatchify(patchify(sq, p), p, C), sq)


def test_norm_pix_loss_uses_unbiased_variance():
    model = MaskedAutoencoderViT(**SMALL, norm_pix_loss=True, kernels="torch").double()
    imgs, noise = batch(1)
    pred = torch.zeros(1, 64, 48, dtype=torch.float64)
    mask = torch.zeros(1, 64, dtype=torch.float64)
    mask[0, 5] = 1
    loss = model.forward_loss(imgs, pred, mask)
    t = patchify(imgs, 4)[0, 5]
    n = t.numel()
    var_unbiased = ((t - t.mean()) ** 2).sum() / (n - 1)
    expected = (((t - t.mean()) / torch.sqrt(var_unbiased + 1e-6)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_naive_baseline_agrees_with_mae_when_nothing_is_masked():
    mae = MaskedAutoencoderViT(**SMALL, kernels="torch").double()
    naive = MaskedAutoencoderViT(**SMALL, kernels="torch", encoder_mask_tokens=True).double()
    report = naive.load_state_dict(mae.state_dict(), strict=False)
    assert report.missing_keys == ["encoder_mask_token"] and not report.unexpected_keys
    imgs, noise = batch()
    _, pred_mae, mask_mae = mae(imgs, mask_ratio=0.0, noise=noise)
    _, pred_naive, mask_naive = naive(imgs, mask_ratio=0.0, noise=noise)
    assert torch.equal(mask_mae, mask_naive)
    torch.testing.assert_close(pred_naive, pred_mae, rtol=1e-12, atol=1e-12)


def test_naive_baseline_encoder_sees_every_patch_and_masks_the_same():
    mae = MaskedAutoencoderViT(**SMALL, kernels="torch")
    naive = MaskedAutoencoderViT(**SMALL, kernels="torch", encoder_mask_tokens=True)
    imgs, noise = batch()
    imgs, noise = imgs.float(), noise.float()
    assert mae.forward_encoder(imgs, 0.75, noise)[0].shape == (3, 1 + 16, 64)
    latent, mask, _ = naive.forward_encoder(imgs, 0.75, noise)
    assert latent.shape == (3, 1 + 64, 64)
    loss, pred, naive_mask = naive(imgs, 0.75, noise)
    assert torch.equal(naive_mask, mae(imgs, 0.75, noise)[2]) and pred.shape == (3, 64, 48)
    # the removed patches' pixels must not reach the naive encoder either
    poked = imgs.clone()
    removed = naive_mask[0].nonzero()[0].item()
    row, col = divmod(removed, 8)
    poked[0, :, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4] += 10.0
    torch.testing.assert_close(naive.forward_encoder(poked, 0.75, noise)[0], latent)
    loss.backward()
    assert naive.encoder_mask_token.grad is not None and naive.encoder_mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("attn", ["math", "sdpa"])
def test_attention_backends_agree(attn):
    fast, ref = twin_models(attn=attn)
    imgs, noise = batch()
    torch.testing.assert_close(fast(imgs, noise=noise)[1], ref(imgs, 0.75, noise)[1], rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_backend_without_xformers_is_a_clear_error():
    with pytest.raises(ValueError, match="xformers is not installed"):
        MaskedAutoencoderViT(**SMALL, attn="xformers")


def test_kernel_switch_choices(monkeypatch):
    with pytest.raises(ValueError, match="kernels must be one of"):
        MaskedAutoencoderViT(**SMALL, kernels="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = MaskedAutoencoderViT(**SMALL, kernels="triton")
    imgs, _ = batch()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        model(imgs.float())
    import fastmae.kernels as kernels

    assert kernels.resolve_kernels("auto", torch.device("cpu")) == "torch"
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="Triton is not installed"):
        MaskedAutoencoderViT(**SMALL, kernels="triton")
    assert kernels.resolve_kernels("auto", torch.device("cuda")) == "torch"


def test_an_interpreter_that_cannot_run_beside_this_numpy_is_named(monkeypatch):
    import fastmae.kernels as kernels

    assert kernels.interpreter_incompatibility("3.6.0", "2.3.5") is None
    assert kernels.interpreter_incompatibility("3.7.0", "2.4.0") is None
    assert kernels.interpreter_incompatibility("3.10.0", "2.4.6") is None  # numbers, not strings, compared
    problem = kernels.interpreter_incompatibility("3.6.0", "2.4.0rc1")
    assert "triton 3.6.0" in problem and "numpy 2.4.0rc1" in problem and "numpy<2.4" in problem
    # as in an environment with Triton 3.6 and NumPy 2.4: refused where the path is picked and at a launch
    kernels.check_interpreter_versions.cache_clear()
    monkeypatch.setattr(kernels.importlib.metadata, "version", lambda name: "3.6.0")
    monkeypatch.setattr(np, "__version__", "2.4.6")
    try:
        with pytest.raises(ValueError, match="triton 3.6.0 fails with numpy 2.4.6"):
            kernels.resolve_kernels("triton", torch.device("cpu"))
        from fastmae.kernels.layer_norm import add_layer_norm_triton

        x = torch.randn(2, 8)
        with pytest.raises(ValueError, match="triton 3.6.0 fails with numpy 2.4.6"):
            add_layer_norm_triton(x, None, torch.ones(8), torch.zeros(8), 1e-6)
    finally:
        kernels.check_interpreter_versions.cache_clear()


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = sys.modules["triton.language"] = None  # as if not installed: import fails, find_spec is None
import torch
from fastmae import create_model
from fastmae.data.augment import crop_table, resized_crops
model = create_model("mae_vit_micro_patch4")
loss = model(torch.randn(2, 3, 32, 32))[0]
loss.backward()
pixels = torch.randint(0, 256, (3 * 20 * 30,), dtype=torch.uint8)
out = resized_crops(pixels, crop_table([(20, 30)], [(1, 2, 15, 20)], [True], 8), 8)
assert torch.isfinite(loss) and out.shape == (1, 3, 8, 8)
print("ran without triton")
"""


def test_model_and_augmentation_run_without_triton():
    """Triton is an optional extra: without it the references run (the kernel files import it)."""
    run = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert run.returncode == 0 and "ran without triton" in run.stdout, run.stderr[-2000:]


@pytest.mark.parametrize(
    "imgs,kwargs,message",
    [
        (torch.randn(2, 3, 30, 30), {}, "not divisible by the patch size 4"),
        (torch.randn(2, 3, 36, 36), {}, "not the model's img_size 32x32"),
        (torch.randn(2, 1, 32, 32), {}, "1 channels, the model expects in_chans=3"),
        (torch.randn(3, 32, 32), {}, r"must be \[N, C, H, W\]"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), {}, "floating point"),
        (torch.randn(2, 3, 32, 32), {"mask_ratio": 1.0}, r"mask_ratio must be a number in \[0, 1\)"),
        (torch.randn(2, 3, 32, 32), {"mask_ratio": -0.1}, r"mask_ratio must be a number in \[0, 1\)"),
        (torch.randn(2, 3, 32, 32), {"mask_ratio": 0.99}, "leaves no visible patch"),
        (torch.randn(2, 3, 32, 32), {"noise": torch.rand(2, 63)}, r"noise must have shape \[N, L\] = \[2, 64\]"),
    ],
)
def test_bad_input_is_a_clear_error(imgs, kwargs, message):
    model = MaskedAutoencoderViT(**SMALL)
    with pytest.raises(ValueError, match=message):
        model(imgs, **kwargs)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        MaskedAutoencoderViT(**{**SMALL, "img_size": 30})
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        MaskedAutoencoderViT(**{**SMALL, "num_heads": 5})
    with pytest.raises(ValueError, match="unknown model"):
        create_model("mae_vit_gigantic")


def test_reference_style_norm_layer_argument_is_accepted():
    from functools import partial

    model = MaskedAutoencoderViT(**SMALL, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    assert model.norm.eps == 1e-6
    assert np.isclose(MaskedAutoencoderViT(**SMALL, norm_layer=torch.nn.LayerNorm).norm.eps, 1e-5)
