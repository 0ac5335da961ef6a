"""Gaps found by a mutation audit of the model code: each test here pins a behaviour of the reference
(tests/reference_mae.py, the official models_mae.py / util/pos_embed.py / util/misc.py) that the other
model tests let a plausible bug through on."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastmae import MaskedAutoencoderViT
from fastmae.checkpoint import load_weights, save_checkpoint
from fastmae.patches import patchify
from fastmae.pos_embed import interpolate_pos_embed
from fastmae.reconstruction import denormalize_patch_prediction
from fastmae.vit import Block, DropPath
from reference_mae import ReferenceMAE
from test_model import SMALL, batch


def twin_models(norm_pix_loss=False, **overrides):
    """Like test_model.twin_models, for a config other than SMALL (same float64 weights in both)."""
    config = {**SMALL, **overrides}
    fast = MaskedAutoencoderViT(**config, norm_pix_loss=norm_pix_loss, kernels="torch").double()
    ref = ReferenceMAE(**config, norm_pix_loss=norm_pix_loss).double()
    ref.load_state_dict(fast.state_dict(), strict=True)
    return fast, ref


def assert_same_outputs(fast, ref, imgs, noise, mask_ratio=0.75):
    loss, pred, mask = fast(imgs, mask_ratio=mask_ratio, noise=noise)
    ref_loss, ref_pred, ref_mask = ref(imgs, mask_ratio, noise)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    return pred


# ---- the forward pass beyond the init's zeros and ones ----
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_forward_matches_reference_with_arbitrary_weights(norm_pix_loss):
    """Init leaves the cls rows of both pos-embed tables, every bias and the LayerNorm affine at 0/1,
    which hides a term dropped from the forward pass; a loaded checkpoint need not. Randomise all."""
    fast, ref = twin_models(norm_pix_loss)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in fast.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    ref.load_state_dict(fast.state_dict(), strict=True)
    assert fast.pos_embed[0, 0].abs().sum() > 0 and fast.decoder_pos_embed[0, 0].abs().sum() > 0
    imgs, noise = batch()
    assert_same_outputs(fast, ref, imgs, noise)


@pytest.mark.parametrize("overrides", [dict(in_chans=1), dict(mlp_ratio=2.0), dict(num_heads=2, decoder_num_heads=8)],
                         ids=["in_chans1", "mlp_ratio2", "heads"])
def test_constructor_arguments_are_honoured_like_the_reference(overrides):
    fast, ref = twin_models(**overrides)
    C = overrides.get("in_chans", 3)
    imgs = torch.randn(2, C, 32, 32, dtype=torch.float64)
    noise = torch.rand(2, 64, dtype=torch.float64)
    pred = assert_same_outputs(fast, ref, imgs, noise)
    assert pred.shape == (2, 64, 4 * 4 * C)
    assert fast.decoder_pred.out_features == 4 * 4 * C
    assert fast.unpatchify(pred).shape == (2, C, 32, 32)
    hidden = int(SMALL["embed_dim"] * overrides.get("mlp_ratio", 4.0))
    assert fast.blocks[0].mlp.fc1.out_features == hidden


@pytest.mark.parametrize("mask_ratio,len_keep", [(0.85, 9), (0.7, 19), (0.6, 25)])
def test_len_keep_truncates_like_the_reference(mask_ratio, len_keep):
    """len_keep = int(L * (1 - r)): truncation, not rounding (64 * 0.15 = 9.6 keeps 9)."""
    fast, ref = twin_models()
    imgs, noise = batch(2)
    assert_same_outputs(fast, ref, imgs, noise, mask_ratio)
    masking = fast.random_masking_ids(imgs, mask_ratio, noise)
    assert masking.num_visible == len_keep and torch.all(masking.mask.sum(1) == 64 - len_keep)


# ---- initialisation ----
def test_every_linear_is_xavier_uniform():
    model = MaskedAutoencoderViT(**SMALL)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 2 * 4 + 4 * 2 + 2  # qkv, proj, fc1, fc2 per block; decoder_embed, decoder_pred
    for name, m in linears.items():
        bound = math.sqrt(6 / (m.in_features + m.out_features))
        w = m.weight.detach()
        assert w.abs().max() <= bound, name
        # PyTorch's default (kaiming-uniform, bound 1/sqrt(fan_in)) stays well below this
        assert w.abs().max() > 0.95 * bound, name
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3), name


def test_cls_and_mask_tokens_are_normal_with_std_002():
    model = MaskedAutoencoderViT(**SMALL)
    cls, mask = [], []
    for _ in range(40):  # 40 x 64 (48) draws: the sample std is within ~2% of the true one
        model.initialize_weights()
        cls.append(model.cls_token.detach().flatten().clone())
        mask.append(model.mask_token.detach().flatten().clone())
    for name, draws in (("cls_token", torch.cat(cls)), ("mask_token", torch.cat(mask))):
        assert 0.0185 < draws.std().item() < 0.0215, name
        assert abs(draws.mean().item()) < 0.002, name
        assert draws.abs().max() > 0.05, name  # a normal's tails, not a narrow uniform


# ---- stochastic depth (fine-tuning blocks) ----
def test_drop_path_rescales_the_kept_samples():
    drop = DropPath(0.25).train()
    x = torch.randn(4000, 3, 5)
    out = drop(x)
    kept = out.flatten(1).abs().sum(1) > 0
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert torch.all(out[~kept] == 0)
    assert 0.70 < kept.float().mean().item() < 0.80
    assert torch.equal(drop.eval()(x), x)
    block, plain = Block(16, 2, drop_path=0.5).eval(), Block(16, 2).eval()
    plain.load_state_dict(block.state_dict())
    y = torch.randn(2, 3, 16)
    torch.testing.assert_close(block(y), plain(y))


# ---- position embeddings for another image size ----
def reference_interpolate(pos_embed, new_size, num_extra_tokens=1):
    """util/pos_embed.py interpolate_pos_embed of the reference, on a bare table."""
    embedding_size = pos_embed.shape[-1]
    orig_size = int((pos_embed.shape[-2] - num_extra_tokens) ** 0.5)
    extra_tokens = pos_embed[:, :num_extra_tokens]
    pos_tokens = pos_embed[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=(new_size, new_size), mode="bicubic", align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


def test_interpolate_pos_embed_is_the_reference_bicubic_resize():
    table = torch.randn(1, 1 + 8 * 8, 16)
    ours = interpolate_pos_embed(table, 12 * 12)
    torch.testing.assert_close(ours, reference_interpolate(table, 12), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[:, :1], table[:, :1], rtol=0, atol=0)
    # a table that varies along the columns only keeps doing so (the grid is not transposed)
    cols = torch.arange(8.0).repeat(8).reshape(1, 64, 1).expand(1, 64, 4)
    resized = interpolate_pos_embed(torch.cat([torch.zeros(1, 1, 4), cols], 1), 144)[0, 1:, 0].reshape(12, 12)
    assert torch.allclose(resized, resized[:1].expand(12, 12)) and not torch.allclose(resized, resized[:, :1])


# ---- checkpoints ----
def test_strict_load_fails_on_missing_keys_alone_and_on_unexpected_keys_alone():
    ref = ReferenceMAE(**SMALL)
    state = ref.state_dict()
    encoder_only = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    with pytest.raises(ValueError, match="strict load failed"):
        load_weights(MaskedAutoencoderViT(**SMALL), {"model": encoder_only}, strict=True)
    with pytest.raises(ValueError, match="strict load failed"):
        load_weights(MaskedAutoencoderViT(**SMALL), {"model": {**state, "head.weight": torch.zeros(10, 64)}},
                     strict=True)
    report = load_weights(MaskedAutoencoderViT(**SMALL), {"model": state}, strict=True)
    assert not report.missing and not report.unexpected


class FakeScaler:
    """The part of a loss scaler that the reference's checkpointing uses (a scaler in use: fp16)."""

    def is_enabled(self):
        return True

    def state_dict(self):
        return {"scale": 1024.0, "_growth_tracker": 3}


class Wrapped(torch.nn.Module):
    """DistributedDataParallel's shape: the model as ``.module``, its keys prefixed 'module.'."""

    def __init__(self, module):
        super().__init__()
        self.module = module


WRAPPERS = {
    "ddp": Wrapped,
    "compile": torch.compile,  # keys prefixed '_orig_mod.'; nothing is compiled until a forward
    "ddp_of_compile": lambda m: Wrapped(torch.compile(m)),
    "compile_of_ddp": lambda m: torch.compile(Wrapped(m)),
}


@pytest.mark.parametrize("wrap", WRAPPERS.values(), ids=WRAPPERS.keys())
def test_save_checkpoint_writes_the_whole_reference_container_from_a_wrapped_model(tmp_path, wrap):
    fast = MaskedAutoencoderViT(**SMALL, kernels="torch")
    opt = torch.optim.AdamW(fast.parameters())
    save_checkpoint(tmp_path / "checkpoint-4.pth", wrap(fast), opt, epoch=4, scaler=FakeScaler(),
                    args={"blr": 1.5e-4})
    container = torch.load(tmp_path / "checkpoint-4.pth", weights_only=True)
    # what the reference's misc.load_model reads to resume
    assert set(container) == {"model", "optimizer", "epoch", "scaler", "args"}
    assert container["scaler"] == FakeScaler().state_dict() and container["epoch"] == 4
    ref = ReferenceMAE(**SMALL)
    ref.load_state_dict(container["model"], strict=True)  # no 'module.' or '_orig_mod.' prefix
    torch.optim.AdamW(ref.parameters()).load_state_dict(container["optimizer"])


# ---- reconstructions of norm-pix models ----
def test_denormalisation_uses_the_loss_eps_on_nearly_flat_patches():
    """eps only shows where a patch's variance is near 1e-6: there it must be the loss's 1e-6."""
    g = torch.Generator().manual_seed(3)
    target = 0.5 + 1e-3 * torch.randn(2, 5, 48, generator=g, dtype=torch.float64)
    pred = torch.randn(2, 5, 48, generator=g, dtype=torch.float64)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    expected = pred * torch.sqrt(var + 1e-6) + mean
    torch.testing.assert_close(denormalize_patch_prediction(pred, target), expected, rtol=1e-12, atol=1e-12)
    # and it inverts the loss's normalisation: the normalised target scores a zero norm-pix loss
    model = MaskedAutoencoderViT(**SMALL, norm_pix_loss=True, kernels="torch").double()
    imgs = 0.5 + 1e-3 * torch.randn(1, 3, 32, 32, generator=g, dtype=torch.float64)
    t = patchify(imgs, 4)
    normalised = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(denormalize_patch_prediction(normalised, t), t, rtol=1e-12, atol=1e-12)
    assert model.forward_loss(imgs, normalised, torch.ones(1, 64, dtype=torch.float64)) < 1e-20
