"""The analytic FLOP counts against torch.utils.flop_counter, and the paper's FLOP statements."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastmae.flops import (
    COMPONENTS,
    component_flops,
    device_peak_flops,
    forward_flops_per_image,
    token_counts,
    train_flops_per_image,
)
from fastmae.models import MAEConfig, create_model


def counted_flops(name, encoder_mask_tokens, full_pred, attn="sdpa", batch=2):
    """(forward, forward+backward) FLOPs per image that FlopCounterMode sees, on the meta device."""
    with torch.device("meta"):
        model = create_model(name, attn=attn, kernels="torch", encoder_mask_tokens=encoder_mask_tokens)
    size = model.config.img_size
    imgs = torch.randn(batch, 3, size, size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _, _ = model(imgs, full_pred=full_pred)
        forward = counter.get_total_flops()
        loss.backward()
    return forward / batch, counter.get_total_flops() / batch, model.config


@pytest.mark.parametrize("name", ["mae_vit_micro_patch4", "mae_vit_base_patch16", "mae_vit_large_patch16"])
@pytest.mark.parametrize("encoder_mask_tokens", [False, True])
def test_analytic_matches_flop_counter(name, encoder_mask_tokens):
    forward, train, config = counted_flops(name, encoder_mask_tokens, full_pred=False)
    analytic = forward_flops_per_image(config, 0.75, encoder_mask_tokens)
    assert forward == pytest.approx(analytic, rel=1e-9)
    # training = 3x forward; exact up to the patch projection's missing input gradient (< 1%)
    assert train == pytest.approx(train_flops_per_image(config, 0.75, encoder_mask_tokens), rel=0.01)
    assert train < train_flops_per_image(config, 0.75, encoder_mask_tokens)


@pytest.mark.parametrize("attn", ["math", "sdpa"])
def test_full_prediction_head_and_math_attention(attn):
    forward, _, config = counted_flops("mae_vit_micro_patch4", False, full_pred=True, attn=attn)
    assert forward == pytest.approx(forward_flops_per_image(config, full_pred=True), rel=1e-9)
    partial = component_flops(config, full_pred=False)["prediction_head"]
    full = component_flops(config, full_pred=True)["prediction_head"]
    assert full == pytest.approx(partial * 64 / 48)  # L=64 patches, 48 removed


def test_components_and_token_counts():
    config = MAEConfig()  # ViT-L/16 at 224 px
    n = token_counts(config)
    assert (n.num_patches, n.num_visible, n.encoder_tokens, n.decoder_tokens, n.predicted_patches) == (196, 49, 50, 197, 147)
    naive = token_counts(config, encoder_mask_tokens=True)
    assert (naive.embedded_patches, naive.encoder_tokens) == (196, 197)
    flops = component_flops(config)
    assert tuple(flops) == COMPONENTS
    assert flops["encoder_norm"] == flops["loss"] == 0.0
    vector = component_flops(config, elementwise=True)
    assert vector["loss"] > 0 and vector["encoder_norm"] > 0
    extra = sum(vector.values()) / sum(flops.values()) - 1
    assert 0 < extra < 0.02  # vector work is small next to the matmuls
    with pytest.raises(ValueError, match="mask_ratio"):
        component_flops(config, mask_ratio=1.0)


def test_paper_flop_statements():
    """Table 1c: dropping mask tokens cuts ViT-L's total FLOPs 3.3x, the encoder's ~4x; the decoder
    costs < 10% per token of the encoder; Table 2's FLOP limits are about 3.2x, 4.1x, 3.6x, 4.1x."""
    large = MAEConfig()
    huge = MAEConfig(patch_size=14, embed_dim=1280, depth=32)
    enc_ratio = (component_flops(large, encoder_mask_tokens=True)["encoder_blocks"]
                 / component_flops(large)["encoder_blocks"])
    assert 3.8 < enc_ratio < 4.2
    baseline = train_flops_per_image(large, encoder_mask_tokens=True)
    assert baseline / train_flops_per_image(large) == pytest.approx(3.25, abs=0.05)
    one_block = MAEConfig(decoder_depth=1)
    assert baseline / train_flops_per_image(one_block) == pytest.approx(4.19, abs=0.05)
    huge_base = train_flops_per_image(huge, encoder_mask_tokens=True)
    assert huge_base / train_flops_per_image(huge) == pytest.approx(3.61, abs=0.05)
    flops = component_flops(large)
    n = token_counts(large)
    per_token = (flops["decoder_blocks"] / n.decoder_tokens) / (flops["encoder_blocks"] / n.encoder_tokens)
    assert per_token < 0.10


def test_device_peaks():
    assert device_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == pytest.approx(989.4e12)
    assert device_peak_flops("NVIDIA H100 PCIe", torch.float16) == pytest.approx(756.5e12)
    assert device_peak_flops("NVIDIA H200", torch.bfloat16) == pytest.approx(989.4e12)
    assert device_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32, tf32=True) == pytest.approx(156e12)
    assert device_peak_flops("NVIDIA A100-PCIE-40GB", torch.float32) == pytest.approx(19.5e12)
    assert device_peak_flops("cpu", torch.float32) is None
    assert device_peak_flops("NVIDIA H100 80GB HBM3", torch.int8) is None


@pytest.mark.parametrize("name", ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
                                  "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB"])
def test_device_peaks_per_dtype(name):
    """Dense tensor-core rates on Ampere and Hopper: fp16 = bf16, TF32 = half of bf16; the tf32 flag only
    changes fp32 matmuls; plain fp32 (no tensor cores) is far below TF32."""
    bf16 = device_peak_flops(name, torch.bfloat16)
    assert device_peak_flops(name, torch.float16) == bf16
    assert device_peak_flops(name, torch.float32, tf32=True) == pytest.approx(bf16 / 2, rel=2e-3)
    assert device_peak_flops(name, torch.bfloat16, tf32=True) == bf16
    assert device_peak_flops(name, torch.float32) < device_peak_flops(name, torch.float32, tf32=True) / 5


def test_nvl_parts_have_their_own_peaks():
    """The NVL boards (lower power) are not the SXM parts: H100 NVL and H200 NVL, 835.5 dense bf16 TFLOP/s."""
    assert device_peak_flops("NVIDIA H100 NVL", torch.bfloat16) == pytest.approx(835.5e12)
    assert device_peak_flops("NVIDIA H200 NVL", torch.bfloat16) == pytest.approx(835.5e12)
    assert device_peak_flops("NVIDIA H200 NVL", torch.bfloat16) < device_peak_flops("NVIDIA H200", torch.bfloat16)
