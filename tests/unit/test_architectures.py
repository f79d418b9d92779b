"""IGEBM ResNets, JEM's Wide-ResNet and the classifier-energy head.

Everything runs at tiny width on 2 CPU cores, except the full-size parameter counts, which only
build the networks (no forward pass).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from ebmscale.config import ModelConfig
from ebmscale.models import build_model, count_parameters
from ebmscale.models.heads import ClassifierEnergy
from ebmscale.models.igebm import (IGEBM_VARIANTS, CappedSpectralNorm, IGEBMResNet, build_igebm, default_variant,
                                   igebm_resnet)
from ebmscale.models.wrn import WideBlock, WideResNet, build_wrn

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64)]
VARIANTS = sorted(IGEBM_VARIANTS)
TINY_WIDTH = 4


def _energy_and_input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None):
    x = x.clone().requires_grad_(True)
    e = model(x) if y is None else model(x, y)
    (g,) = torch.autograd.grad(e.sum(), x)
    return e, g


def _check(e: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    assert e.shape == (x.shape[0],)
    assert torch.isfinite(e).all()
    assert g.shape == x.shape and torch.isfinite(g).all()
    assert g.abs().sum() > 0, "energy does not depend on the input"


def _as_if_trained(model: nn.Module, seed: int = 0) -> None:
    """The original initialises every class row identically (biases 0, gains 1) and the residual
    branches' last conv near zero, so labels cannot matter at init; give both values, as training
    would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".table") or name.endswith(".offset"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif ".conv2." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- IGEBM: shapes and gradients

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", VARIANTS)
def test_igebm_variant_energy_and_input_grad(variant, shape):
    # Tiny width and one block per stage: the same code as the full networks, CPU-sized.
    torch.manual_seed(0)
    model = igebm_resnet(variant, in_channels=shape[0], width=TINY_WIDTH, depth=1)
    x = torch.rand(2, *shape)
    _check(*_energy_and_input_grad(model, x), x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_igebm_conditional_variant_energy_and_input_grad(variant):
    # The conditional path differs only inside the blocks, so one resolution per variant suffices.
    torch.manual_seed(0)
    model = igebm_resnet(variant, in_channels=3, width=TINY_WIDTH, depth=1, num_classes=3)
    x = torch.rand(2, 3, 32, 32)
    _check(*_energy_and_input_grad(model, x, torch.tensor([0, 2])), x)  # E(x, y)
    _check(*_energy_and_input_grad(model, x), x)  # the marginal E(x)


@pytest.mark.parametrize("num_classes", [0, 5], ids=["uncond", "cond"])
def test_igebm_resnet128_at_128(num_classes):
    torch.manual_seed(0)
    model = igebm_resnet("resnet128", width=TINY_WIDTH, num_classes=num_classes, activation="swish")
    x = torch.rand(2, 3, 128, 128)
    _check(*_energy_and_input_grad(model, x, torch.tensor([1, 4]) if num_classes else None), x)


@pytest.mark.parametrize("variant,resolution", [("resnet32", 32), ("resnet32large", 32), ("resnet32wider", 32),
                                                ("resnet64", 64), ("resnet128", 128)])
def test_igebm_reaches_4x4_before_the_head(variant, resolution):
    """Every released IGEBM network sum-pools a 4x4 map; resnet64 was chosen to keep that."""
    model = igebm_resnet(variant, width=TINY_WIDTH)
    seen = {}

    def record(module, inputs, output):  # returns None, so the output is left alone
        seen["shape"] = output.shape

    model.blocks[-1].register_forward_hook(record)
    with torch.no_grad():
        model(torch.rand(1, 3, resolution, resolution))
    assert seen["shape"][-2:] == (4, 4)


def test_igebm_layouts_follow_the_original():
    # Block counts and widths of the original (models.py): ResNet32 6 blocks, F-2F-2F; ResNet32Large
    # and ResNet32Wider 9 blocks, F-2F-4F (Wider's stem fixed at 128 for F=256); ResNet128 6 blocks,
    # 64-128-256-512-512 with a 64-wide stem.
    expect = {"resnet32": (6, 128, [128, 128, 256, 256, 256, 256]),
              "resnet32large": (9, 128, [128] * 3 + [256] * 3 + [512] * 3),
              "resnet32wider": (9, 128, [256] * 3 + [512] * 3 + [1024] * 3),
              "resnet128": (6, 64, [64, 128, 256, 512, 512, 512])}
    for variant, (n_blocks, stem, widths) in expect.items():
        spec = IGEBM_VARIANTS[variant]
        assert sum(spec.blocks) == n_blocks
        assert (spec.stem or spec.width) == stem
        assert [m * spec.width for m, b in zip(spec.stage_multipliers, spec.blocks) for _ in range(b)] == widths


def test_igebm_width_and_depth_overrides():
    m = igebm_resnet("resnet32wider", width=8, depth=2)
    assert m.stem.out_channels == 4  # the fixed 128-wide stem scales with F (128/256 of it)
    assert len(m.blocks) == 6 and m.head.in_features == 32
    m = igebm_resnet("resnet128", width=4)
    assert [b.conv1.out_channels for b in m.blocks] == [4, 8, 16, 32, 32, 32]
    # Downsampling in the first block of every stage only.
    assert [b.downsample for b in m.blocks] == [True, True, True, True, True, False]


@pytest.mark.parametrize("shape,conditional,expected", [
    ((1, 28, 28), False, "resnet32large"), ((3, 32, 32), False, "resnet32large"),
    ((3, 32, 32), True, "resnet32"), ((3, 64, 64), False, "resnet64"), ((3, 64, 64), True, "resnet64"),
    ((3, 128, 128), True, "resnet128")])
def test_build_igebm_picks_variant_by_resolution(shape, conditional, expected):
    assert default_variant(shape[-1], conditional) == expected
    cfg = ModelConfig(arch="igebm", width=TINY_WIDTH, depth=0, activation="leaky_relu", spectral_norm=True,
                      num_classes=10 if conditional else 0, conditional=conditional)
    model = build_model(cfg, shape)
    spec = IGEBM_VARIANTS[expected]
    assert isinstance(model, IGEBMResNet)
    assert model.stem.in_channels == shape[0]
    assert len(model.blocks) == sum(spec.blocks)
    assert model.head.in_features == spec.stage_multipliers[-1] * TINY_WIDTH
    assert model.num_classes == (10 if conditional else 0)


def test_build_igebm_explicit_variant_and_labels_only_when_conditional():
    cfg = ModelConfig(arch="igebm", variant="resnet32wider", width=TINY_WIDTH, depth=1, num_classes=10,
                      conditional=False)
    model = build_igebm(cfg, (3, 64, 64))
    assert len(model.blocks) == 3 and model.num_classes == 0
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.rand(1, 3, 64, 64), torch.tensor([1]))


# --------------------------------------------------------------------------- IGEBM: conditioning

def test_igebm_conditional_energy_respects_labels():
    torch.manual_seed(0)
    k = 4
    model = igebm_resnet("resnet32", width=TINY_WIDTH, depth=1, num_classes=k).eval()  # eval: frozen sigma
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        # The original initialises all class rows alike, so every class starts with the same energy.
        per_class = torch.stack([model(x, torch.full((3,), c)) for c in range(k)], dim=1)
        assert torch.allclose(per_class, per_class[:, :1].expand_as(per_class), atol=1e-6)

        _as_if_trained(model)
        per_class = torch.stack([model(x, torch.full((3,), c)) for c in range(k)], dim=1)
        assert (per_class.max(dim=1).values - per_class.min(dim=1).values > 1e-3).all()
        # class_energies / logits agree with one forward per label.
        assert torch.allclose(model.class_energies(x), per_class, atol=1e-5)
        assert torch.allclose(model.logits(x), -per_class, atol=1e-5)
        # The marginal is -logsumexp_y(-E(x, y)).
        assert torch.allclose(model(x), -torch.logsumexp(-per_class, dim=1), atol=1e-5)
        # Labels as indices or as one-hot weights (the original's label vectors) are the same.
        y = torch.tensor([2, 0, 3])
        assert torch.allclose(model(x, y), model(x, nn.functional.one_hot(y, k).float()), atol=1e-6)
        # Soft labels mix the tables linearly, as the original's label @ table does.
        soft = torch.full((3, k), 1.0 / k)
        assert not torch.allclose(model(x, soft), model(x, y), atol=1e-4)


def test_igebm_unconditional_has_no_classifier():
    model = igebm_resnet("resnet32", width=TINY_WIDTH, depth=1)
    with pytest.raises(RuntimeError):
        model.logits(torch.rand(1, 3, 32, 32))


# --------------------------------------------------------------------------- spectral norm

def _convs_and_linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("variant", VARIANTS)
def test_igebm_spectral_norm_everywhere_but_the_head(variant):
    model = igebm_resnet(variant, width=TINY_WIDTH, num_classes=3, spectral_norm=True)
    layers = _convs_and_linears(model)
    assert model.head in layers and len(layers) > 1
    for layer in layers:
        if layer is model.head:
            assert not parametrize.is_parametrized(layer)
            continue
        assert parametrize.is_parametrized(layer, "weight")
        kinds = [type(p).__name__ for p in layer.parametrizations.weight]
        assert len(kinds) == 1
        # The residual branch's last conv has the original's capped norm, the rest torch's (through
        # ebmscale's SpectralNorm subclass, which only adds fp32 sigma for half-precision weights).
        is_conv2 = any(layer is b.conv2 for b in model.blocks)
        assert kinds[0] == ("CappedSpectralNorm" if is_conv2 else "SpectralNorm")


def test_igebm_without_spectral_norm_zero_inits_branch_output():
    model = igebm_resnet("resnet32large", width=TINY_WIDTH, spectral_norm=False)
    assert not any(parametrize.is_parametrized(m) for m in _convs_and_linears(model))
    assert all((b.conv2.weight == 0).all() for b in model.blocks)


def test_capped_spectral_norm_caps_and_freezes_in_eval():
    torch.manual_seed(0)
    big = torch.randn(6, 4, 3, 3) * 5
    cap = CappedSpectralNorm(big)
    for _ in range(30):
        out = cap(big)
    assert torch.linalg.matrix_norm(out.flatten(1), ord=2).item() == pytest.approx(1.0, rel=1e-3)
    small = torch.randn(6, 4, 3, 3) * 1e-3
    assert torch.equal(CappedSpectralNorm(small)(small), small)  # below 1: left as it is
    cap.eval()
    u = cap._u.clone()
    cap(big * 3)
    assert torch.equal(cap._u, u)  # samplers run in eval mode and must not advance the estimate


@pytest.mark.parametrize("num_classes", [0, 10])
def test_wrn_spectral_norm_everywhere_but_the_head(num_classes):
    cfg = ModelConfig(arch="wrn", width=1, depth=10, num_classes=num_classes, spectral_norm=True)
    model = build_wrn(cfg, (3, 32, 32))
    layers = _convs_and_linears(model)
    assert model.head in layers
    for layer in layers:
        assert parametrize.is_parametrized(layer, "weight") == (layer is not model.head)


# --------------------------------------------------------------------------- WRN and heads

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("num_classes", [0, 10], ids=["uncond", "jem"])
def test_wrn_energy_and_input_grad(shape, num_classes):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="wrn", width=1, depth=10, num_classes=num_classes, activation="leaky_relu")
    model = build_model(cfg, shape)
    assert isinstance(model, ClassifierEnergy)
    x = torch.rand(3, *shape)
    assert model.features(x).shape == (3, 64)
    _check(*_energy_and_input_grad(model, x), x)
    if num_classes:
        assert model.logits(x).shape == (3, num_classes)
        _check(*_energy_and_input_grad(model, x, torch.tensor([0, 5, 9])), x)


def test_wrn_layout_and_norm_option():
    none = WideResNet(16, 2, norm="none")
    assert sum(isinstance(m, WideBlock) for m in none.modules()) == 6  # n = (16 - 4) / 6 = 2 per stage
    assert not any(isinstance(m, nn.BatchNorm2d) for m in none.modules())
    assert all(m.bias is not None for m in none.modules() if isinstance(m, nn.Conv2d))
    batch = WideResNet(16, 2, norm="batch")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in batch.modules()) == 2 * 6 + 1
    assert all(m.bias is None for m in batch.modules() if isinstance(m, nn.Conv2d))
    assert batch.out_dim == 128
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(12, 2)
    with pytest.raises(ValueError, match="model.depth"):
        build_wrn(ModelConfig(arch="wrn", width=10, depth=2), (3, 32, 32))


def test_classifier_energy_definitions():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh())
    jem = ClassifierEnergy(backbone, 8, num_classes=5)
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 4, 2])
    with torch.no_grad():
        logits = jem.logits(x)
        assert logits.shape == (4, 5)
        assert torch.allclose(jem(x), -torch.logsumexp(logits, dim=1))
        assert torch.allclose(jem(x, y), -logits[torch.arange(4), y])

    uncond = ClassifierEnergy(backbone, 8, num_classes=0)
    with torch.no_grad():
        assert torch.allclose(uncond(x), -uncond.head(backbone(x)).squeeze(-1))  # E = -s(x)
    with pytest.raises(RuntimeError):
        uncond.logits(x)
    with pytest.raises(ValueError):
        uncond(x, y)


# --------------------------------------------------------------------------- full-size parameter counts

# Reference counts for IGEBM, from the variables the original creates in models.py / utils.py
# (openai/ebm_code_release) and that its forward pass uses -- i.e. the ones trained:
#   stem conv 3x3, C -> S, no bias:                        9*C*S
#   residual block cin -> cout with R = max(K, 1) label rows (K classes, 1 if unconditional):
#     conv1 9*cin*cout + conv2 9*cout*cout (no conv biases: init_conv_weight makes a 'b' but
#     conv_block never adds it), + a 3x3 'adaptive' skip conv 9*cin*cout when cin != cout,
#     + input bias of conv1 R*cin + input bias of conv2 R*cout + output gain of conv2 R*cout
#     + the shared gain offset 'cb' (cout) when conditional.
#   head ('fc5', no spectral norm): C_last + 1.
# (Variables the code creates but never uses are not counted: the unused conv biases, conv1's
# gain, 'cb' in unconditional runs, the attention block, ResNet32's dangling 'fc_dense'.)
#
# ResNet32, conditional CIFAR-10 (F=128, K=10):
#   stem 3,456; 2 blocks 128->128 at 294,912 + 3*1,280 + 128 = 298,880 each;
#   128->256: 294,912 + 589,824 + 294,912 + 1,280 + 2,560 + 2,560 + 256 = 1,186,304;
#   3 blocks 256->256 at 1,179,648 + 7,680 + 256 = 1,187,584 each; head 257
#   -> 3,456 + 597,760 + 1,186,304 + 3,562,752 + 257 = 5,350,529.
# ResNet32 unconditional: the same convs, one row per table, no offset -> 5,315,841.
# ResNet32Large, unconditional CIFAR-10 (F=128): stem 3,456; 3 blocks at 128 (295,296 each);
#   128->256 (1,180,288); 2 at 256 (1,180,416 each); 256->512 (4,719,872); 2 at 512
#   (4,720,128 each); head 513 -> 18,591,105.
# ResNet32Wider, conditional ImageNet 32x32 (F=256, stem 128, K=1000): stem 3,456;
#   128->256 (1,819,904); 2 at 256 (1,947,904 each); 256->512 (5,999,104); 2 at 512
#   (6,255,104 each); 512->1024 (21,435,392); 2 at 1024 (21,947,392 each); head 1,025
#   -> 89,559,681 (the 1000-row label tables alone are 16.7M of it).
# ResNet128, conditional ImageNet 128x128 (F=64, stem 64, K=1000): stem 1,728; 64->64 (265,792);
#   64->128 (615,040); 128->256 (1,819,904); 256->512 (5,999,104); 2 at 512 (6,255,104 each);
#   head 513 -> 21,212,289.
IGEBM_REFERENCE = [
    ("resnet32", 10, 5_350_529),
    ("resnet32", 0, 5_315_841),
    ("resnet32large", 0, 18_591_105),
    ("resnet32wider", 1000, 89_559_681),
    ("resnet128", 1000, 21_212_289),
]


@pytest.mark.parametrize("variant,num_classes,expected", IGEBM_REFERENCE,
                         ids=[f"{v}-K{k}" for v, k, _ in IGEBM_REFERENCE])
def test_igebm_full_size_parameter_counts(variant, num_classes, expected):
    model = igebm_resnet(variant, in_channels=3, num_classes=num_classes, spectral_norm=True)
    assert count_parameters(model) == expected


def test_wrn_28_10_full_size_parameter_counts():
    # The standard WRN-28-10 (Zagoruyko & Komodakis 2016; BatchNorm, bias-free convs, 10-way head)
    # has the well-known 36,479,194 (~36.5M) parameters. Per block BN(2*cin) + 9*cin*cout +
    # BN(2*cout) + 9*cout^2 (+ a 1x1 shortcut cin*cout on the first block of a stage), 4 blocks per
    # stage: stem 432 + stage 1 (16->160) 1,640,672 + stage 2 (160->320) 6,968,000 + stage 3
    # (320->640) 27,862,400 + final BN 1,280 + linear 6,410 = 36,479,194.
    model = ClassifierEnergy(WideResNet(28, 10, in_channels=3, norm="batch"), 640, 10)
    assert count_parameters(model) == 36_479_194
    # JEM's setting: no BatchNorm (-17,952 = 2 * 8,976 BN channels) but a bias on every conv
    # (+10,096), as in JEM's wideresnet.py: 36,479,194 - 17,952 + 10,096 = 36,471,338.
    cfg = ModelConfig(arch="wrn", width=10, depth=28, num_classes=10, activation="leaky_relu")
    assert count_parameters(build_wrn(cfg, (3, 32, 32))) == 36_471_338
