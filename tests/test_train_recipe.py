"""The optimisation recipe: learning-rate schedule, scaling rule, parameter groups, AdamW settings."""

import math

import pytest
import torch

from fastmae.models import create_model
from fastmae.train.optim import ADAMW_BETAS, build_optimizer, param_groups
from fastmae.train.schedule import base_batch_lr, lr_at, set_lr


def test_linear_scaling_rule():
    assert base_batch_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)  # the paper's ViT-L setting
    assert base_batch_lr(1.5e-4, 256) == pytest.approx(1.5e-4)


def test_warmup_then_half_cycle_cosine_values():
    peak, floor, warmup, epochs = 1e-3, 1e-5, 4, 20
    assert lr_at(0.0, peak, floor, warmup, epochs) == 0.0
    assert lr_at(1.0, peak, floor, warmup, epochs) == pytest.approx(2.5e-4)  # linear, per iteration
    assert lr_at(3.5, peak, floor, warmup, epochs) == pytest.approx(8.75e-4)
    assert lr_at(4.0, peak, floor, warmup, epochs) == pytest.approx(peak)
    assert lr_at(12.0, peak, floor, warmup, epochs) == pytest.approx((peak + floor) / 2)  # half-way down
    assert lr_at(8.0, peak, floor, warmup, epochs) == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(20.0, peak, floor, warmup, epochs) == pytest.approx(floor)
    values = [lr_at(e / 10, peak, floor, warmup, epochs) for e in range(0, 200)]
    top = values.index(max(values))
    assert all(a <= b for a, b in zip(values[:top], values[1:top + 1]))  # rises, then only falls
    assert all(a >= b for a, b in zip(values[top:], values[top + 1:]))
    assert lr_at(3.0, peak, floor, 0, epochs) < peak  # no warm-up: cosine from the start


def test_set_lr_honours_lr_scale():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(2))], "lr_scale": 0.1}])
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05])


def test_weight_decay_groups_are_the_references():
    """timm's add_weight_decay, as main_pretrain.py calls it: [no decay: 1-D parameters and biases, decay:
    the rest, the 3-D cls and mask tokens included], each in the model's order."""
    model = create_model("mae_vit_micro_patch4")
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay, decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decayed = [names[id(p)] for p in decay["params"]]
    not_decayed = [names[id(p)] for p in no_decay["params"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    timm_no_decay = [n for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))]
    assert not_decayed == timm_no_decay and decayed == [n for n in trainable if n not in timm_no_decay]
    assert {"cls_token", "mask_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
            "decoder_embed.weight", "decoder_pred.weight"} <= set(decayed)
    assert {"norm.weight", "norm.bias", "decoder_norm.weight", "patch_embed.proj.bias", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.bias", "decoder_pred.bias"} <= set(not_decayed)
    # frozen sin-cos position embeddings are not optimised at all
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable


def test_adamw_recipe_settings():
    model = create_model("mae_vit_micro_patch4")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == ADAMW_BETAS == (0.9, 0.95)
    assert opt.defaults["fused"] is True  # this torch has a fused AdamW for CPU as well as CUDA
    # weight decay really is off for the no-decay group: with zero gradients only decayed weights move
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"blocks.0.attn.qkv.weight", "cls_token", "mask_token"} <= moved and "norm.weight" not in moved
    assert not any(n.endswith(".bias") for n in moved)


# ---- found by mutation testing ----

def test_accumulated_micro_batches_take_the_full_batch_step():
    """Gradients averaged over micro-batches: 2 x 4 images accumulate to the step of one batch of 8
    (plain SGD, which unlike AdamW does not hide a wrongly scaled gradient)."""
    import copy

    from fastmae.train.trainer import train_step

    accumulated = create_model("mae_vit_micro_patch4")
    whole = copy.deepcopy(accumulated)
    generator = torch.Generator().manual_seed(1)
    imgs, noise = torch.randn(8, 3, 32, 32, generator=generator), torch.rand(8, 64, generator=generator)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def sgd(model):
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)

    losses = train_step(accumulated, sgd(accumulated), scaler, [(imgs[:4], noise[:4]), (imgs[4:], noise[4:])], 0.75, None)
    train_step(whole, sgd(whole), scaler, [(imgs, noise)], 0.75, None)
    assert losses.shape == (2,)
    for (name, a), b in zip(accumulated.named_parameters(), whole.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.grad is None for p in accumulated.parameters())  # nothing carried into the next step


def test_cosine_stays_at_min_lr_after_the_last_epoch():
    assert lr_at(25.0, 1e-3, 1e-5, 4, 20) == pytest.approx(1e-5)
