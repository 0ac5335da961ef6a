"""The model as research code uses it through the reference's Python API: subclasses that override its
methods, other number types, wrapped models, the constructor's defaults, and the Triton path fed what
the reference accepts."""

import copy

import numpy as np
import pytest
import torch

from fastmae.checkpoint import load_weights, read_checkpoint, save_checkpoint
from fastmae.kernels import resolve_kernels
from fastmae.models import MaskedAutoencoderViT, create_model
from reference_mae import ReferenceMAE

SMALL = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=2, num_heads=4,
             decoder_embed_dim=48, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0)
CPU = torch.device("cpu")


def data(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g, dtype=torch.float64), torch.rand(batch, 64, generator=g,
                                                                                     dtype=torch.float64)


def test_overridden_reference_methods_are_what_forward_runs():
    """Changing the loss or the masking by overriding forward_loss / random_masking, the reference's way."""
    class ConstantLoss(MaskedAutoencoderViT):
        def forward_loss(self, imgs, pred, mask):
            return super().forward_loss(imgs, pred, mask) * 0 + 123.0

    imgs, noise = data()
    loss, pred, mask = ConstantLoss(**SMALL, kernels="torch").double()(imgs, 0.75, noise)
    assert loss.item() == 123.0 and pred.shape == (2, 64, 48) and mask.sum() == 2 * 48

    def keep_first(x, mask_ratio):  # a deterministic masking: the first K patches stay visible
        N, L, D = x.shape
        keep = int(L * (1 - mask_ratio))
        mask = torch.ones(N, L, dtype=x.dtype)
        mask[:, :keep] = 0
        return x[:, :keep], mask, torch.arange(L).expand(N, L)

    class Ours(MaskedAutoencoderViT):
        def random_masking(self, x, mask_ratio, noise=None):
            return keep_first(x, mask_ratio)

    class Theirs(ReferenceMAE):
        def random_masking(self, x, mask_ratio, noise=None):
            return keep_first(x, mask_ratio)

    torch.manual_seed(0)
    ours = Ours(**SMALL, kernels="torch").double()
    theirs = Theirs(**SMALL).double()
    theirs.load_state_dict(ours.state_dict())
    imgs, noise = data()
    for a, b in zip(ours(imgs, 0.75), theirs(imgs, 0.75, noise)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert ours(imgs, 0.75)[2][:, :16].sum() == 0  # its masking, not the noise's
    x = torch.randn(2, 64, 8)
    x_masked, mask, ids_restore = MaskedAutoencoderViT(**SMALL, kernels="torch").random_masking(x, 0.75, torch.rand(2, 64))
    assert x_masked.shape == (2, 16, 8) and mask.sum() == 2 * 48
    assert torch.equal(torch.gather(x, 1, ids_restore.argsort(1)[:, :16, None].expand(-1, -1, 8)), x_masked)


def test_the_constructors_layer_norm_eps_is_the_references():
    """MaskedAutoencoderViT(...) without norm_layer is the reference's nn.LayerNorm, eps 1e-5; the named
    models pass eps 1e-6, as the reference's constructors do."""
    assert MaskedAutoencoderViT(**SMALL).norm.eps == 1e-5 == ReferenceMAE(**SMALL).norm.eps
    assert create_model("mae_vit_micro_patch4").blocks[0].norm1.eps == 1e-6
    assert MaskedAutoencoderViT(**SMALL, norm_eps=1e-6).decoder_norm.eps == 1e-6


def test_other_number_types_and_square_size_pairs():
    model = MaskedAutoencoderViT(**{**SMALL, "img_size": (32, 32), "patch_size": (4, 4)}, kernels="torch").double()
    imgs, noise = data()
    want = model(imgs, 0.75, noise)[0]
    for ratio in (np.float32(0.75), np.float64(0.75), torch.tensor(0.75)):
        assert torch.equal(model(imgs, ratio, noise)[0], want)
    with pytest.raises(ValueError, match="square"):
        MaskedAutoencoderViT(**{**SMALL, "img_size": (32, 48)})
    with pytest.raises(ValueError, match="mask_ratio must be a number"):
        model(imgs, "0.75")


def test_checkpoints_take_numpy_values_and_load_into_wrapped_models(tmp_path):
    model = create_model("mae_vit_micro_patch4", kernels="torch")
    path = tmp_path / "c.pth"
    save_checkpoint(path, model, epoch=np.int64(3), args={"lr": np.float64(1e-3), "blr": np.float32(1.5e-4),
                                                          "norm_pix_loss": np.bool_(False), "sizes": [np.int64(2)]})
    saved = read_checkpoint(path)  # weights-only: numpy scalars would be refused
    assert saved["epoch"] == 3 and type(saved["epoch"]) is int
    assert saved["args"]["lr"] == 1e-3 and saved["args"]["norm_pix_loss"] is False and saved["args"]["sizes"] == [2]
    assert saved["args"]["blr"] == pytest.approx(1.5e-4)
    other = create_model("mae_vit_micro_patch4", kernels="torch")
    compiled_keys = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    ddp_keys = {f"module.{k}": v for k, v in model.state_dict().items()}
    for source in (compiled_keys, ddp_keys, {"model": ddp_keys}):
        fresh = create_model("mae_vit_micro_patch4", kernels="torch")
        load_weights(fresh, source, strict=True)
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    wrapped = torch.compile(other)  # not run: only its weights are loaded
    load_weights(wrapped, path, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))


def test_a_float64_model_takes_the_pytorch_path_under_auto():
    """The kernels compute in fp32/bf16/fp16; the reference comparisons run the model in float64."""
    cuda = torch.device("cuda")  # resolve_kernels only looks at the device's type
    if resolve_kernels("auto", cuda) == "triton":
        assert resolve_kernels("auto", cuda, torch.float64) == "torch"
        assert resolve_kernels("auto", cuda, torch.bfloat16) == "triton"
        with pytest.raises(ValueError, match="kernels='triton' computes in float32, bfloat16 or float16"):
            resolve_kernels("triton", cuda, torch.float64)
    assert resolve_kernels("torch", CPU, torch.float64) == "torch"


@pytest.mark.skipif(not __import__("fastmae.kernels", fromlist=["x"]).triton_interpreter_on(),
                    reason="the Triton path on CPU needs TRITON_INTERPRET=1")
def test_the_triton_path_takes_what_the_reference_api_accepts():
    torch.manual_seed(0)
    fused = create_model("mae_vit_micro_patch4", kernels="triton")
    plain = create_model("mae_vit_micro_patch4", kernels="torch")
    plain.load_state_dict(fused.state_dict())
    imgs = torch.randn(2, 3, 32, 32)
    latent, mask, ids_restore = plain.forward_encoder(imgs, 0.75, torch.rand(2, 64))
    pred = plain.forward_decoder(latent, ids_restore)
    for model in (fused, plain):
        want = plain.forward_loss(imgs, pred, mask)
        wide = torch.cat([pred, pred], dim=-1)[..., :pred.shape[-1]]  # not contiguous
        for m in (mask.bool(), mask.long()):
            torch.testing.assert_close(model.forward_loss(imgs, wide, m), want)
        torch.testing.assert_close(model.forward_decoder(latent, ids_restore.int()), pred, rtol=1e-5, atol=1e-5)
        x = torch.randn(2, 17, 128)[..., ::2]  # a non-contiguous residual stream
        torch.testing.assert_close(model.blocks[0](x), plain.blocks[0](x.contiguous()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must hold all L = 64 patches"):
        fused.forward_loss(imgs, wide[:, :10], mask)


def test_a_subclass_patchify_and_init_weights_are_used():
    class NoTarget(MaskedAutoencoderViT):
        def patchify(self, imgs):
            return torch.zeros_like(super().patchify(imgs))

    class ZeroLinears(MaskedAutoencoderViT):
        def _init_weights(self, m):
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.zeros_(m.weight)

    imgs, noise = data()
    model = NoTarget(**SMALL, kernels="torch").double()
    loss, pred, mask = model(imgs, 0.75, noise)
    torch.testing.assert_close(loss, ((pred ** 2).mean(-1) * mask).sum() / mask.sum())
    assert all(not blk.attn.qkv.weight.any() for blk in ZeroLinears(**SMALL).blocks)


def test_a_narrow_mlp_builds_as_the_reference_and_one_without_hidden_units_is_refused():
    torch.manual_seed(0)
    narrow = {**SMALL, "mlp_ratio": 0.5}
    ours, theirs = MaskedAutoencoderViT(**narrow, kernels="torch").double(), ReferenceMAE(**narrow).double()
    theirs.load_state_dict(ours.state_dict())  # the same keys and shapes: fc1 64 -> 32
    assert ours.blocks[0].mlp.fc1.out_features == 32
    imgs, noise = data()
    for a, b in zip(ours(imgs, 0.75, noise), theirs(imgs, 0.75, noise)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for ratio in (0.01, 0.0, float("nan")):
        with pytest.raises(ValueError, match=f"mlp_ratio {ratio} leaves an MLP of width 48 no hidden unit"):
            MaskedAutoencoderViT(**{**SMALL, "mlp_ratio": ratio})


def test_a_norm_layer_setting_other_than_eps_is_refused_not_dropped():
    from functools import partial

    for norm_layer, named in ((partial(torch.nn.LayerNorm, eps=1e-6, elementwise_affine=False),
                               "elementwise_affine=False"), (partial(torch.nn.LayerNorm, bias=False), "bias=False")):
        with pytest.raises(ValueError, match=f"only eps may be set on nn.LayerNorm .*got {named}"):
            MaskedAutoencoderViT(**SMALL, norm_layer=norm_layer)
    assert MaskedAutoencoderViT(**SMALL, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).norm.eps == 1e-6
    restated = partial(torch.nn.LayerNorm, eps=1e-6, elementwise_affine=True, bias=True)  # the defaults, said
    assert MaskedAutoencoderViT(**SMALL, norm_layer=restated).norm.eps == 1e-6


def test_a_second_derivative_through_the_triton_kernels_raises_instead_of_coming_out_wrong():
    """A gradient penalty (create_graph=True) differentiates the backward; the kernels' backward is not
    differentiable, so it must say so, at the backward that would build the graph (the PyTorch path
    gives the reference's second derivative)."""
    torch.manual_seed(0)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    for kernels in ("torch", "triton"):
        model = MaskedAutoencoderViT(**SMALL, kernels=kernels, attn="math")  # CPU SDPA has no double backward
        loss, _, _ = model(imgs, 0.75, noise)
        params = [p for p in model.parameters() if p.requires_grad]
        if kernels == "torch":
            grads = torch.autograd.grad(loss, params, create_graph=True)
            sum((g ** 2).sum() for g in grads).backward()
            assert model.decoder_pred.weight.grad.norm() > 0
        else:
            with pytest.raises(RuntimeError, match="no second derivative .* build the model with kernels='torch'"):
                torch.autograd.grad(loss, params, create_graph=True)


def test_the_pytorch_decoder_refuses_more_tokens_than_patches():
    model = MaskedAutoencoderViT(**SMALL, kernels="torch")
    ids_restore = torch.rand(2, 64).argsort(1)
    assert model.forward_decoder(torch.randn(2, 65, 64), ids_restore).shape == (2, 64, 48)  # every patch kept
    with pytest.raises(ValueError, match=r"x shape \[2, 66, 48\]: expected \[N, 1\+K, D\] with 0 <= K <= L = 64"):
        model.forward_decoder(torch.randn(2, 66, 64), ids_restore)


class _ScaledLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return 2 * super().forward(x)


class _Adapter(torch.nn.Module):
    """A wrapper around a block, as adapters and torch's activation checkpointing put there."""

    def __init__(self, block):
        super().__init__()
        self.block, self.calls = block, 0

    def __getattr__(self, name):  # forwards attribute lookups to the block, as CheckpointWrapper does
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)

    def forward(self, x):
        self.calls += 1
        return self.block(x) + torch.linspace(0, 1, x.shape[-1])  # per feature: no norm after it removes it


def test_norms_and_blocks_swapped_in_run_their_own_forward_on_both_paths():
    """The fused path read a swapped-in norm's weight into its LayerNorm kernel (a scaled norm, an RMSNorm
    computed as a LayerNorm), and chained a wrapper's block without the wrapper's forward (activation
    checkpointing saved nothing); with plain blocks replaced, neither path ran at all."""
    torch.manual_seed(0)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    models = {k: create_model("mae_vit_micro_patch4", kernels=k) for k in ("torch", "triton")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    for edit in ("scaled norm2", "identity norms", "wrapped blocks"):
        losses = {}
        for kernels, model in models.items():
            edited = copy.deepcopy(model)
            if edit == "scaled norm2":
                edited.blocks[1].norm2 = _ScaledLayerNorm(64, eps=1e-6)
            elif edit == "identity norms":
                edited.blocks[0].norm1, edited.norm = torch.nn.Identity(), torch.nn.Identity()
            else:
                edited.blocks = torch.nn.ModuleList([_Adapter(b) for b in edited.blocks])
            losses[kernels] = edited(imgs, noise=noise)[0]
            if edit == "wrapped blocks":
                assert [b.calls for b in edited.blocks] == [1, 1], kernels
        torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5, atol=1e-5, msg=edit)
        assert not torch.equal(losses["torch"], models["torch"](imgs, noise=noise)[0]), edit  # the edit counts


def test_a_transposed_noise_and_a_half_precision_model_are_taken_on_both_paths():
    """noise.T (valid, not contiguous) gave index rows the Triton kernels refused; reconstruct() of a
    bf16 or float64 model fed it float32 images, which the PyTorch path refused."""
    from fastmae.reconstruction import reconstruct

    torch.manual_seed(0)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(64, 2).T
    plain = create_model("mae_vit_micro_patch4", kernels="torch")
    fused = create_model("mae_vit_micro_patch4", kernels="triton")
    fused.load_state_dict(plain.state_dict())
    torch.testing.assert_close(fused(imgs, noise=noise)[0], plain(imgs, noise=noise.contiguous())[0],
                               rtol=1e-5, atol=1e-5)
    for dtype in (torch.bfloat16, torch.float64):
        shown = reconstruct(copy.deepcopy(plain).to(dtype), imgs, 0.75, noise=noise)
        assert shown.prediction.dtype == torch.float32 and torch.isfinite(shown.prediction).all()


def test_torch_func_transforms_take_a_triton_model():
    """torch.func.grad over functional_call refused the kernels' autograd (old-style Functions, the custom
    ops' too): under its transforms the PyTorch references compute, with the same gradients."""
    torch.manual_seed(0)
    plain = create_model("mae_vit_micro_patch4", kernels="torch")
    fused = create_model("mae_vit_micro_patch4", kernels="triton")
    fused.load_state_dict(plain.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    grads = {}
    for name, model in (("torch", plain), ("triton", fused)):
        params = {k: v.detach() for k, v in model.named_parameters()}
        loss = lambda p, m=model: torch.func.functional_call(m, p, (imgs,), {"noise": noise})[0]  # noqa: E731
        grads[name] = torch.func.grad(loss)(params)
    assert grads["triton"].keys() == grads["torch"].keys()
    for key, grad in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][key], grad, msg=key)
