"""Gaps found by a mutation audit of the downstream recipes (fastmae/downstream/*, the command line,
fastmae/train/config.py): each test pins a behaviour of the reference main_finetune.py /
main_linprobe.py / util/lr_decay.py / util/lars.py (and timm's batch-mode Mixup, which the
reference fine-tuning uses) that the other tests let a plausible bug through on. Tiny models, CPU."""

import argparse
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmae.checkpoint import save_checkpoint
from fastmae.cli import build_parser
from fastmae.cli import main as fastmae_main
from fastmae.downstream import finetune, linprobe
from fastmae.downstream.classify import datasets_and_loaders, evaluate
from fastmae.downstream.lars import LARS
from fastmae.downstream.linprobe import FeatureBatches, make_linear_probe
from fastmae.downstream.lr_decay import param_groups_lrd
from fastmae.downstream.mixup import Mixup, cutmix_box, smooth_one_hot
from fastmae.downstream.visualize import load_mae
from fastmae.downstream.vit_classifier import create_classifier, init_head
from fastmae.models import create_model
from fastmae.train.config import PretrainConfig
from test_downstream import mae_checkpoint, read_log, tiny_folder  # noqa: F401  (fixtures)


# ---- layer-wise lr decay ----
def test_layer_decay_leaves_frozen_parameters_out_and_scales_a_cls_token_model():
    model = create_classifier("vit_micro_patch4", 10, depth=3)  # cls token: `norm`, no fc_norm
    model.patch_embed.proj.weight.requires_grad_(False)
    model.cls_token.requires_grad_(False)
    groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), layer_decay=0.65)
    names = [name for g in groups for name in g["names"]]
    assert "patch_embed.proj.weight" not in names and "cls_token" not in names  # frozen: not optimised
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    for name in trainable:  # layer 0: embeddings, block i: i + 1, everything after the blocks: depth + 1
        layer = (0 if name == "pos_embed" or name.startswith("patch_embed") else
                 int(name.split(".")[1]) + 1 if name.startswith("blocks.") else 4)
        assert scale[name] == pytest.approx(0.65 ** (4 - layer)), name
    assert scale["norm.weight"] == scale["head.bias"] == 1.0


@pytest.mark.parametrize("global_pool, tail", [
    (True, ["head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"]),  # models_vit adds fc_norm last
    (False, ["norm.weight", "norm.bias", "head.weight", "head.bias"]),  # timm's VisionTransformer
])
def test_the_classifiers_parameters_come_in_the_reference_order(global_pool, tail):
    """models_vit.VisionTransformer's order, so param_groups_lrd makes the reference's groups in its order
    and an AdamW state loads both ways (the last two groups: [head.weight], then the rest)."""
    model = create_classifier("vit_micro_patch4", 10, depth=2, global_pool=global_pool)
    names = [name for name, _ in model.named_parameters()]
    assert names[:4] == ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert names[-4:] == tail
    groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75)
    assert [g["names"] for g in groups[-2:]] == ([["head.weight"], ["head.bias", "fc_norm.weight", "fc_norm.bias"]]
                                                 if global_pool else [["norm.weight", "norm.bias", "head.bias"],
                                                                      ["head.weight"]])


def test_a_fine_tuning_state_saved_with_fc_norm_before_the_head_resumes(monkeypatch):
    """fastmae's earlier classifier put fc_norm before the head: its AdamW states, matched by the groups'
    names, load into the reference order, each parameter's moments where they belong."""
    from fastmae.downstream.lr_decay import optimizer_state_in_group_order

    torch.manual_seed(0)
    model = create_classifier("vit_micro_patch4", 10, depth=2, global_pool=True)
    reference_order = list(model.named_parameters())
    earlier_order = ([item for item in reference_order if not item[0].startswith(("head.", "fc_norm."))]
                     + [item for item in reference_order if item[0].startswith("fc_norm.")]
                     + [item for item in reference_order if item[0].startswith("head.")])
    monkeypatch.setattr(model, "named_parameters", lambda: iter(earlier_order))
    earlier = torch.optim.AdamW(param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75), lr=1e-3)
    monkeypatch.undo()
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    earlier.step()
    saved = earlier.state_dict()
    assert [len(g["params"]) for g in saved["param_groups"][-2:]] == [3, 1]

    groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75)
    resumed = torch.optim.AdamW(groups, lr=1e-3)
    with pytest.raises(ValueError, match="doesn't match the size"):  # as it was saved
        torch.optim.AdamW(param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75), lr=1e-3).load_state_dict(saved)
    resumed.load_state_dict(optimizer_state_in_group_order(saved, groups))
    for name, param in reference_order:
        torch.testing.assert_close(resumed.state[param]["exp_avg"], earlier.state[param]["exp_avg"], rtol=0, atol=0,
                                   msg=name)
    for group in resumed.param_groups:
        assert all(p is dict(reference_order)[n] for p, n in zip(group["params"], group["names"]))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_every_command_reads_a_ddp_or_compiled_models_checkpoint(prefix, mae_checkpoint, tiny_folder, tmp_path):
    """A checkpoint saved from a DDP-wrapped or compiled model (every key prefixed): visualize, export,
    linprobe and finetune read it as pretrain --resume does."""
    container = torch.load(mae_checkpoint, weights_only=True)
    container["model"] = {prefix + key: value for key, value in container["model"].items()}
    wrapped = tmp_path / "wrapped.pth"
    torch.save(container, wrapped)
    data = ["--data_path", str(tiny_folder), "--num_workers", "0", "--batch_size", "4", "--epochs", "1"]
    assert fastmae_main(["visualize", "--checkpoint", str(wrapped), "--images", str(tiny_folder / "val"),
                         "--output", str(tmp_path / "rec.png")]) == 0
    assert fastmae_main(["export", "--checkpoint", str(wrapped), "--format", "timm",
                         "--output", str(tmp_path / "vit.safetensors")]) == 0
    assert fastmae_main(["linprobe", "--checkpoint", str(wrapped), *data]) == 0
    assert fastmae_main(["finetune", "--checkpoint", str(wrapped), *data]) == 0


def test_random_init_starts_where_the_reference_starts_without_a_checkpoint():
    """main_finetune.py / main_linprobe.py without --finetune: timm's ViT init, trunc-normal 0.02 for the
    position table, the cls token and every Linear (the head too), not MAE's sin-cos table and xavier."""
    from fastmae.downstream.classify import Pretrained, build_classifier

    torch.manual_seed(0)
    model, report = build_classifier(Pretrained(None, "vit_micro_patch4", None), 10, 32, global_pool=True)
    assert report is None
    for name, tensor in [("pos_embed", model.pos_embed), ("cls_token", model.cls_token),
                         ("qkv", model.blocks[0].attn.qkv.weight), ("fc1", model.blocks[1].mlp.fc1.weight),
                         ("head", model.head.weight)]:
        assert 0.015 < tensor.std() < 0.025, name  # MAE's sin-cos table and xavier are 10x wider
    assert not model.blocks[0].attn.qkv.bias.any() and torch.equal(model.fc_norm.weight, torch.ones(64))
    fan_in = 3 * 4 * 4  # PyTorch's Conv2d init: uniform within 1/sqrt(fan_in)
    assert model.patch_embed.proj.weight.abs().max() <= fan_in ** -0.5


@pytest.mark.parametrize("command", ["finetune", "linprobe"])
def test_the_head_is_reinitialised_for_a_checkpoint_only(command, tiny_folder, mae_checkpoint, monkeypatch):  # noqa: F811
    module = finetune if command == "finetune" else linprobe
    calls = []
    real = module.init_head
    monkeypatch.setattr(module, "init_head", lambda model, std: calls.append(std) or real(model, std))
    common = [command, "--data_path", str(tiny_folder), "--num_workers", "0", "--batch_size", "4", "--epochs", "1"]
    assert fastmae_main([*common, "--random_init", "--model", "vit_micro_patch4", "--input_size", "32"]) == 0
    assert calls == []
    assert fastmae_main([*common, "--checkpoint", str(mae_checkpoint)]) == 0
    assert calls == [2e-5 if command == "finetune" else 0.01]


def test_the_val_loss_is_the_mean_of_the_batches_means_as_the_reference_logs_it():
    """engine_finetune.evaluate: metric_logger.update(loss=loss.item()) per batch, so a short last batch
    weighs as much as a full one; top-1 stays per image."""
    torch.manual_seed(0)
    model = create_classifier("vit_micro_patch4", 3, depth=1)
    imgs, labels = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(imgs, labels), batch_size=2)  # 2, 2, 1
    with torch.no_grad():
        logits = model.eval()(imgs)
    batch_means = [F.cross_entropy(logits[i:i + 2], labels[i:i + 2]).item() for i in (0, 2, 4)]
    stats = evaluate(model, loader, torch.device("cpu"), bar=False)
    assert stats["loss"] == pytest.approx(sum(batch_means) / 3, rel=1e-5)
    assert stats["loss"] != pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-3)  # not per image
    assert stats["top1"] == pytest.approx(100.0 * (logits.argmax(1) == labels).sum().item() / 5)


# ---- LARS ----
def expected_lars(w, grads, lr, wd, momentum, tc=0.001):
    """The rule, step by step: trust-scaled (grad + wd * w) for matrices, the raw grad for vectors,
    then heavy-ball momentum on what comes out."""
    w, mu = w.clone(), torch.zeros_like(w)
    for g in grads:
        u = g
        if w.ndim > 1:
            u = g + wd * w
            wn, un = w.norm(), u.norm()
            u = u * (tc * wn / un if wn > 0 and un > 0 else 1.0)
        mu = momentum * mu + u
        w = w - lr * mu
    return w


def test_lars_momentum_accumulates_over_steps_and_a_zero_weight_moves_at_full_rate():
    gen = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(4, generator=gen), "z": torch.zeros(5, 2)}
    grads = {k: [torch.randn(v.shape, generator=gen) for _ in range(3)] for k, v in start.items()}
    params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    opt = LARS(list(params.values()), lr=0.5, weight_decay=0.1, momentum=0.8)
    for step in range(3):
        for k, p in params.items():
            p.grad = grads[k][step].clone()
        opt.step()
    for k, p in params.items():
        torch.testing.assert_close(p.detach(), expected_lars(start[k], grads[k], 0.5, 0.1, 0.8), msg=k)
    # a zero matrix has no norm to trust: it takes the plain (momentum) step, it is not stuck at zero
    assert params["z"].detach().abs().sum() > 0


# ---- mixup / cutmix (timm's Mixup, mode 'batch') ----
class CentreRng:
    """A Generator stand-in whose integers() always picks the middle of the range."""

    def integers(self, low, high=None):
        return (low if high is None else high) // 2


def test_cutmix_box_covers_one_minus_lam_of_a_non_square_image():
    # lam 0.75: the box sides are sqrt(1 - lam) = 1/2 of the image's, centred on (cy, cx)
    assert cutmix_box(40, 80, 0.75, CentreRng()) == (10, 30, 20, 60)
    top, bottom, left, right = cutmix_box(40, 80, 0.84, CentreRng())  # sides 0.4 of the image
    assert (bottom - top, right - left) == (16, 32)
    rng = np.random.default_rng(0)
    for _ in range(50):  # clipped at the borders, never larger than the unclipped box
        top, bottom, left, right = cutmix_box(40, 80, 0.75, rng)
        assert 0 <= top <= bottom <= 40 and 0 <= left <= right <= 80
        assert bottom - top <= 20 and right - left <= 40


def test_every_sample_is_mixed_with_its_mirror_in_the_batch():
    labels = torch.tensor([0, 1, 2, 3, 4, 2])
    imgs = torch.randn(6, 3, 8, 8)
    mixed, soft = Mixup(5, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, seed=3)(imgs, labels)
    y = smooth_one_hot(labels, 5, 0.1)
    lam = (soft[0] - y[5]) @ (y[0] - y[5]) / ((y[0] - y[5]) @ (y[0] - y[5]))  # soft[0] = lam y0 + (1-lam) y5
    assert 0.0 < lam.item() < 1.0
    torch.testing.assert_close(soft, lam * y + (1 - lam) * y.flip(0))
    torch.testing.assert_close(mixed, lam * imgs + (1 - lam) * imgs.flip(0))


def test_switch_prob_picks_cutmix_and_each_mode_draws_lam_with_its_own_alpha():
    imgs = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    # switch_prob 1: always cutmix, whose alpha (large: lam near 1/2) is not the mixup alpha (tiny: lam near 0 or 1)
    always_cutmix = Mixup(4, mixup_alpha=0.01, cutmix_alpha=200.0, switch_prob=1.0, label_smoothing=0.0, seed=0)
    for _ in range(10):
        mixed, soft = always_cutmix(imgs, labels)
        assert set(mixed[0].unique().tolist()) == {0.0, 3.0}  # pixels pasted, not blended
        # lam ~ 1/2: a box of 11 x 11 px or less (clipped), lam corrected to 1 - its area: 0.61 to 0.9
        assert 0.6 < soft[0, 0].item() < 0.95
    always_mixup = Mixup(4, mixup_alpha=200.0, cutmix_alpha=0.01, switch_prob=0.0, label_smoothing=0.0, seed=0)
    for _ in range(10):
        mixed, soft = always_mixup(imgs, labels)
        lam = soft[0, 0].item()
        assert 0.4 < lam < 0.6
        torch.testing.assert_close(mixed[0], torch.full_like(mixed[0], 3.0 * (1 - lam)))


# ---- the classifier ----
def test_global_pool_is_fc_norm_of_the_mean_patch_token_without_the_cls_token():
    torch.manual_seed(0)
    model = create_classifier("vit_micro_patch4", 10, global_pool=True).eval()
    with torch.no_grad():
        for p in list(model.fc_norm.parameters()) + [model.cls_token]:
            p.normal_()  # a non-identity fc_norm, a cls token unlike the patch tokens
        imgs = torch.randn(2, 3, 32, 32)
        x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
        x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), x], dim=1)
        for block in model.blocks:
            x = block(x)
        expected = model.fc_norm(x[:, 1:].mean(dim=1))
        torch.testing.assert_close(model.forward_features(imgs), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(imgs), model.head(expected), atol=1e-5, rtol=1e-5)


def test_drop_path_grows_linearly_over_the_blocks():
    model = create_classifier("vit_micro_patch4", 10, depth=5, drop_path_rate=0.2)
    rates = [getattr(block.drop_path, "p", 0.0) for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


@pytest.mark.parametrize("std", [2e-5, 0.01])
def test_head_init_is_truncated_normal_of_the_given_std_with_zero_bias(std):
    model = create_classifier("vit_micro_patch4", 100)
    init_head(model, std)
    assert model.head.weight.std().item() == pytest.approx(std, rel=0.1)
    assert torch.equal(model.head.bias, torch.zeros(100))


def test_linear_probe_head_is_batchnorm_without_affine_eps_1e_6_then_a_std_0_01_linear():
    model = make_linear_probe(create_classifier("vit_micro_patch4", 100))
    bn, linear = model.head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1) and not linear.bias.any()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]


def test_cached_feature_batches_shuffle_with_the_seed_and_keep_every_validation_sample():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    train = FeatureBatches(x, y, 4, seed=0)
    batches = list(train)
    assert len(train) == len(batches) == 2 and all(len(b) == 4 for b, _ in batches)  # drop_last
    order = torch.cat([b[:, 0] for b, _ in batches])
    assert len(set(order.tolist())) == 8 and order.tolist() != sorted(order.tolist())  # shuffled
    assert all(torch.equal(b[:, 0].long(), labels) for b, labels in batches)  # features stay with their labels
    val = FeatureBatches(x, y, 4, seed=None)
    assert len(val) == 3 and torch.equal(torch.cat([b for b, _ in val])[:, 0], x[:, 0])  # all, in order


# ---- evaluation and the loaders ----
def test_evaluate_counts_top1_top5_and_the_mean_loss_over_uneven_batches():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(10, 7, generator=gen), torch.randint(0, 7, (10,), generator=gen)
    batches = [(logits[:4], labels[:4]), (logits[4:8], labels[4:8]), (logits[8:], labels[8:])]
    stats = evaluate(torch.nn.Identity(), batches, torch.device("cpu"))  # the "model" passes logits through
    rank = (logits > logits.gather(1, labels[:, None])).sum(1)  # how many classes score above the label
    assert stats["n"] == 10
    assert stats["top1"] == pytest.approx(100 * (rank == 0).float().mean().item())
    assert stats["top5"] == pytest.approx(100 * (rank < 5).float().mean().item())
    assert stats["top1"] < stats["top5"] < 100
    # the loss per batch, as engine_finetune.evaluate's metric_logger.update(loss=loss.item()) averages it
    batch_means = [F.cross_entropy(x, y).item() for x, y in batches]
    assert stats["loss"] == pytest.approx(sum(batch_means) / 3, rel=1e-5)


def test_train_loader_shuffles_and_drops_the_last_batch_val_loader_keeps_order(tiny_folder):  # noqa: F811
    args = argparse.Namespace(data_path=str(tiny_folder), batch_size=5, accum_iter=1, num_workers=0, seed=0,
                              pin_mem=True)
    _, _, train_loader, val_loader = datasets_and_loaders(args, 32, True)
    train_labels = [y.tolist() for _, y in train_loader]
    assert [len(y) for y in train_labels] == [5, 5]  # 12 images, batch 5: drop_last, as the reference
    assert sum(train_labels, []) != sorted(sum(train_labels, []))  # class folders are not fed in order
    assert torch.cat([y for _, y in val_loader]).tolist() == [0] * 4 + [1] * 4  # every val image, in order


# ---- the commands' flags: the reference scripts' defaults ----
def parse(argv):
    parser, _ = build_parser(argv)
    return parser.parse_args(argv)


def test_linprobe_defaults_are_main_linprobe_py():
    args = parse(["linprobe", "--data_path", "d"])
    assert (args.batch_size, args.epochs, args.blr, args.lr, args.weight_decay) == (512, 90, 0.1, None, 0.0)
    assert (args.warmup_epochs, args.min_lr, args.global_pool, args.optimizer) == (10, 0.0, False, "lars")
    assert args.momentum == 0.9


def test_finetune_defaults_are_main_finetune_py():
    args = parse(["finetune", "--data_path", "d"])
    assert (args.batch_size, args.epochs, args.lr, args.weight_decay, args.layer_decay) == (64, 50, None, 0.05, 0.75)
    assert args.blr == 1e-3  # with layer_decay 0.75: the ViT-L/H recipe main_finetune.py defaults to
    assert (args.warmup_epochs, args.min_lr, args.drop_path, args.smoothing, args.clip_grad) == (5, 1e-6, 0.1, 0.1, None)
    assert (args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob) == (0.0, 0.0, 1.0, 0.5)
    assert (args.aa, args.reprob, args.remode, args.recount) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel", 1)
    assert args.global_pool and not parse(["finetune", "--data_path", "d", "--cls_token"]).global_pool


# ---- the commands, run with the optimizer's step switched off (what they set up stays visible) ----
def no_step_adamw(monkeypatch):
    """torch.optim.AdamW whose step only records the gradient norm; -> the optimizers made."""
    made = []

    class NoStepAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.grad_norms = []
            made.append(self)

        def step(self, closure=None):
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            self.grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    monkeypatch.setattr(torch.optim, "AdamW", NoStepAdamW)
    return made


def test_finetune_sets_up_the_reference_recipe(tiny_folder, mae_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    optimizers = no_step_adamw(monkeypatch)
    built, smoothing = [], []
    build = finetune.build_classifier
    monkeypatch.setattr(finetune, "build_classifier", lambda *a, **kw: built.append(build(*a, **kw)) or built[-1])
    cross_entropy = F.cross_entropy

    def recording_cross_entropy(logits, *args, **kwargs):
        if logits.requires_grad:  # the training loss, not evaluation (no grad)
            smoothing.append(kwargs.get("label_smoothing", 0.0))
        return cross_entropy(logits, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", recording_cross_entropy)
    out = tmp_path / "ft"
    assert fastmae_main(["finetune", "--checkpoint", str(mae_checkpoint), "--data_path", str(tiny_folder),
                         "--num_workers", "0", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1",
                         "--blr", "0.064", "--layer_decay", "0.5", "--weight_decay", "0.07", "--drop_path", "0.2",
                         "--smoothing", "0.2", "--output_dir", str(out)]) == 0
    (opt,) = optimizers
    assert opt.defaults["lr"] == pytest.approx(0.064 * 4 / 256)  # lr = blr x batch / 256
    scale = {n: g["lr_scale"] for g in opt.param_groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    assert scale["patch_embed.proj.weight"] == 0.5**3 and scale["head.weight"] == 1.0
    assert decay["cls_token"] == decay["pos_embed"] == decay["blocks.0.norm1.weight"] == 0.0
    assert decay["blocks.0.attn.qkv.weight"] == decay["head.weight"] == 0.07
    (model, _), = built
    assert [getattr(b.drop_path, "p", 0.0) for b in model.blocks] == pytest.approx([0.0, 0.2])
    assert smoothing and set(smoothing) == {0.2}
    head = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]["head.weight"]
    assert 1e-5 < head.std().item() < 4e-5  # trunc_normal std 2e-5 (nothing trained it: no step)
    # checkpoint-best is the first epoch that reached the best top-1; the weights never changed
    log = read_log(out / "log.jsonl")
    best = torch.load(out / "checkpoint-best.pth", weights_only=True)
    # "epoch": the index of the epoch done, as the reference saves it (its resume starts at epoch + 1)
    assert best["epoch"] == 0 and best["top1"] == log[-1]["max_top1"]
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 1


def test_finetune_passes_the_mixup_flags_and_smoothing_to_mixup_and_clips_gradients(
        tiny_folder, mae_checkpoint, monkeypatch):  # noqa: F811
    optimizers = no_step_adamw(monkeypatch)
    made = []

    class RecordingMixup(Mixup):
        def __post_init__(self):
            super().__post_init__()
            made.append(self)

    monkeypatch.setattr(finetune, "Mixup", RecordingMixup)
    assert fastmae_main(["finetune", "--checkpoint", str(mae_checkpoint), "--data_path", str(tiny_folder),
                         "--num_workers", "0", "--batch_size", "4", "--epochs", "1", "--mixup", "0.5",
                         "--cutmix", "0.7", "--mixup_prob", "0.9", "--mixup_switch_prob", "0.3",
                         "--smoothing", "0.2", "--clip_grad", "0.001"]) == 0
    (mixup,) = made
    assert (mixup.num_classes, mixup.mixup_alpha, mixup.cutmix_alpha) == (2, 0.5, 0.7)
    assert (mixup.prob, mixup.switch_prob, mixup.label_smoothing) == (0.9, 0.3, 0.2)
    (opt,) = optimizers
    assert len(opt.grad_norms) == 3 and max(opt.grad_norms) <= 0.001 * (1 + 1e-4)  # --clip_grad: total norm


def test_linprobe_trains_with_lars_at_the_scaled_lr(tiny_folder, mae_checkpoint, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "lp"
    assert fastmae_main(["linprobe", "--checkpoint", str(mae_checkpoint), "--data_path", str(tiny_folder),
                         "--num_workers", "0", "--batch_size", "4", "--epochs", "1", "--blr", "0.064",
                         "--cache_features", "--output_dir", str(out)]) == 0
    assert "lars lr 0.001" in capsys.readouterr().out  # 0.064 x 4 / 256
    saved = torch.load(out / "checkpoint-linprobe.pth", weights_only=True)["optimizer"]
    (group,) = saved["param_groups"]
    assert group["trust_coefficient"] == 0.001 and group["momentum"] == 0.9 and group["weight_decay"] == 0.0
    assert all("mu" in state for state in saved["state"].values())


# ---- what an export or a reconstruction takes from the checkpoint's args ----
def test_hf_config_and_visualize_take_mask_ratio_and_norm_pix_loss_from_the_checkpoint(
        mae_checkpoint, tmp_path):  # noqa: F811
    trained = tmp_path / "npl.pth"
    save_checkpoint(trained, create_model("mae_vit_micro_patch4"),
                    args={"model": "mae_vit_micro_patch4", "mask_ratio": 0.6, "norm_pix_loss": True})
    for checkpoint, mask_ratio, norm_pix in ((trained, 0.6, True), (mae_checkpoint, 0.75, False)):
        out = tmp_path / f"hf_{mask_ratio}"
        assert fastmae_main(["export", "--checkpoint", str(checkpoint), "--format", "hf", "--output", str(out)]) == 0
        config = json.loads((out / "config.json").read_text())
        assert (config["mask_ratio"], config["norm_pix_loss"]) == (mask_ratio, norm_pix)
        model, loaded_norm_pix = load_mae(str(checkpoint), None, None)
        assert loaded_norm_pix is norm_pix and model.norm_pix_loss is norm_pix


# ---- pretraining config validation ----
@pytest.mark.parametrize("field,value", [("blr", 0.0), ("blr", -1e-4), ("lr", 0.0), ("lr", -1e-3),
                                         ("weight_decay", -0.05), ("min_lr", -1e-6), ("warmup_epochs", -1)])
def test_pretrain_config_refuses_non_positive_rates_and_negative_settings(field, value):
    with pytest.raises(ValueError, match=field):
        PretrainConfig(**{field: value})
    PretrainConfig(**{field: abs(value) or 1e-3})  # the same flag with a valid value is fine


@pytest.mark.parametrize("command", ["finetune", "linprobe", "pretrain"])
def test_a_seed_numpy_cannot_take_is_refused_as_bad_input(command, tmp_path, capsys):
    """Negative seeds used to reach numpy's SeedSequence (pretrain's data order, finetune's mixup) and fail there."""
    argv = [command, "--output_dir", str(tmp_path / "out"), "--seed", "-1"]
    if command != "pretrain":
        argv += ["--data_path", str(tmp_path), "--random_init"]
    try:
        status = fastmae_main(argv)
    except SystemExit as refusal:  # argparse's
        status = refusal.code
    assert status == 2
    assert "--seed" in (err := capsys.readouterr().err) and "must be an integer in [0, 2**63), got -1" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["finetune", "linprobe"])
def test_a_classifier_of_another_class_count_loads_without_its_head(tiny_folder, tmp_path, capsys, command):  # noqa: F811
    """main_finetune.py / main_linprobe.py drop head.weight and head.bias of another shape and load the rest."""
    torch.manual_seed(2)
    ten_classes = create_classifier("vit_micro_patch4", 10, img_size=32)
    path = tmp_path / "ten_classes.pth"
    save_checkpoint(path, ten_classes, args={"model": "vit_micro_patch4"})
    built = []
    build = finetune.build_classifier if command == "finetune" else linprobe.build_classifier
    module = finetune if command == "finetune" else linprobe
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "build_classifier", lambda *a, **kw: built.append(build(*a, **kw)) or built[-1])
        assert fastmae_main([command, "--checkpoint", str(path), "--data_path", str(tiny_folder), "--num_workers", "0",
                             "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0",
                             "--output_dir", str(tmp_path / "out")]) == 0
    (model, report), = built
    assert report.replaced == ["head.weight", "head.bias"] and "head.weight" not in report.missing
    assert [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][0].out_features == 2
    encoder = {k for k in ten_classes.state_dict() if k.startswith(("blocks.", "patch_embed.", "cls_token", "pos_embed"))}
    assert encoder <= set(report.loaded)
    assert "another shape in the checkpoint (left as initialised): head.weight, head.bias" in capsys.readouterr().out


# ---- --accum_iter, as main_finetune.py / main_linprobe.py ----
def test_finetune_accum_iter_steps_as_one_batch_of_the_effective_size(tiny_folder, mae_checkpoint, tmp_path,  # noqa: F811
                                                                      capsys, monkeypatch):
    """2 batches of 2 accumulated = 1 batch of 4: the same lr (blr x 4 / 256), the same weights after 2 epochs."""
    def trained(batch_size, accum_iter, clip=("--clip_grad", "1.0")):
        out = tmp_path / f"b{batch_size}a{accum_iter}"
        shutil.rmtree(out, ignore_errors=True)
        assert fastmae_main(["finetune", "--checkpoint", str(mae_checkpoint), "--data_path", str(tiny_folder),
                             "--num_workers", "0", "--batch_size", str(batch_size), "--accum_iter", str(accum_iter),
                             "--epochs", "2", "--warmup_epochs", "1", "--drop_path", "0", "--aa", "none",
                             "--reprob", "0", *clip, "--output_dir", str(out)]) == 0
        assert "lr 1.56e-05 (effective batch 4)" in capsys.readouterr().out
        return torch.load(out / "checkpoint-last.pth", weights_only=True)

    one, accumulated = trained(4, 1), trained(2, 2)
    for name, weight in one["model"].items():
        torch.testing.assert_close(accumulated["model"][name], weight, atol=2e-5, rtol=1e-4, msg=name)
    steps = {s["step"].item() for s in accumulated["optimizer"]["state"].values()}
    assert steps == {6.0}  # 12 images: 3 steps of 4 per epoch
    # AdamW and clipping hide a gradient's scale: the accumulated gradient itself is the mean's
    optimizers = no_step_adamw(monkeypatch)
    trained(4, 1, clip=()), trained(2, 2, clip=())
    assert len(optimizers[0].grad_norms) == len(optimizers[1].grad_norms) == 6
    assert optimizers[1].grad_norms == pytest.approx(optimizers[0].grad_norms, rel=1e-4)


def test_linprobe_accum_iter_steps_every_accum_iter_batches(tiny_folder, mae_checkpoint, tmp_path, monkeypatch,  # noqa: F811
                                                            capsys):
    steps = []
    make = linprobe.head_optimizer

    def counting(model, recipe):
        optimizer = make(model, recipe)
        step = optimizer.step
        optimizer.step = lambda *a, **kw: steps.append(optimizer.param_groups[0]["lr"]) or step(*a, **kw)
        return optimizer

    monkeypatch.setattr(linprobe, "head_optimizer", counting)
    assert fastmae_main(["linprobe", "--checkpoint", str(mae_checkpoint), "--data_path", str(tiny_folder),
                         "--num_workers", "0", "--batch_size", "2", "--accum_iter", "3", "--epochs", "2",
                         "--warmup_epochs", "1", "--blr", "0.1"]) == 0
    assert "lars lr 0.00234 (effective batch 6)" in capsys.readouterr().out
    # 12 images, 6 batches of 2 per epoch: 2 steps per epoch, each at the lr of its first batch
    peak = 0.1 * 6 / 256
    assert steps == pytest.approx([0.0, peak * 3 / 6, peak, peak * (1 + math.cos(math.pi * 0.5)) / 2])
    assert fastmae_main(["linprobe", "--checkpoint", str(mae_checkpoint), "--data_path", str(tiny_folder),
                         "--accum_iter", "0"]) == 2
    assert "--accum_iter must be >= 1, got 0" in capsys.readouterr().err
