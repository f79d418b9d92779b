"""Every published recipe in configs/ against the table of ../shared/REFERENCE.md section 1."""
import os

import pytest

from ebmscale.config import load_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

# IGEBM (openai/ebm_code_release): steps, step size, noise, L-inf clip, buffer, re-init, lr, betas, batch, alpha.
IGEBM_COMMON = dict(noise=0.005, buffer=10000, reinit=0.05, lr=3e-4, betas=[0.0, 0.999], alpha=1.0, storage="uint8",
                    range="unit", clamp=True, spectral_norm=True)
REFERENCE = {
    "igebm_cifar10.yaml": dict(IGEBM_COMMON, steps=60, step=10.0, clip=0.01, batch=128, variant="resnet32large",
                               conditional=False),
    "igebm_cifar10_cond.yaml": dict(IGEBM_COMMON, steps=60, step=10.0, clip=0.01, batch=128, variant="resnet32",
                                    conditional=True, classes=10),
    "igebm_imagenet32.yaml": dict(IGEBM_COMMON, steps=60, step=10.0, clip=0.01, batch=32, variant="resnet32wider",
                                  conditional=True, classes=1000),
    "igebm_imagenet128.yaml": dict(IGEBM_COMMON, steps=50, step=100.0, clip=0.0, batch=16, variant="resnet128",
                                   conditional=True, classes=1000, activation="swish"),
    # JEM (wgrathwohl/JEM): SGLD 20 steps, step 1, noise 0.01, no clamp; buffer 10k, 5% re-init;
    # Adam 1e-4 (0.9, 0.999), batch 64, no energy regulariser; weights p(x)=1, p(y|x)=1, p(x,y)=0.
    "jem_cifar10.yaml": dict(steps=20, step=1.0, noise=0.01, clip=0.0, buffer=10000, reinit=0.05, lr=1e-4,
                             betas=[0.9, 0.999], batch=64, alpha=0.0, range="symmetric", clamp=False,
                             classes=10, wrn=(28, 10), input_noise=0.03, holdout=5000, warmup=1000),
}
# Our ImageNet 64x64 variants keep their family's sampler/optimiser settings.
REFERENCE["igebm_imagenet64.yaml"] = dict(REFERENCE["igebm_imagenet32.yaml"], variant="resnet64")
REFERENCE["jem_imagenet64.yaml"] = dict(REFERENCE["jem_cifar10.yaml"], classes=1000, holdout=0)
REFERENCE["jem_imagenet32.yaml"] = REFERENCE["jem_imagenet64.yaml"]
# At 128x128: micro-batches of 16, 4 accumulated (JEM's 64 per optimizer step), fp16 chains.
REFERENCE["jem_imagenet128.yaml"] = dict(REFERENCE["jem_imagenet64.yaml"], batch=16, accumulate=4, storage="fp16")


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_published_recipe_matches_reference(name):
    ref = REFERENCE[name]
    cfg = load_config(os.path.join(CONFIGS, name))
    s, b, o, d, m = cfg.sampler, cfg.buffer, cfg.optim, cfg.data, cfg.model
    assert s.kind == "sgld" and s.init == "buffer"
    assert (s.steps, s.step_size, s.noise_std, s.grad_clip) == (ref["steps"], ref["step"], ref["noise"], ref["clip"])
    assert (b.capacity, b.reinit_prob) == (ref["buffer"], ref["reinit"])
    assert b.backend == "ray"  # one global buffer across ranks, the point of this project
    assert o.name == "adam" and o.lr == pytest.approx(ref["lr"]) and o.betas == ref["betas"]
    assert d.batch_size == ref["batch"] and d.range == ref["range"] and s.clamp == ref["clamp"]
    assert o.accumulate == ref.get("accumulate", 1)
    assert cfg.objective.alpha == ref["alpha"]
    if name.startswith("igebm"):
        assert cfg.objective.kind == "pcd" and b.storage == ref["storage"]
        assert m.arch == "igebm" and m.variant == ref["variant"] and m.spectral_norm
        assert (m.width, m.depth) == (0, 0)  # the variant's published size
        assert m.conditional == ref["conditional"] and m.num_classes == ref.get("classes", 0)
        assert m.activation == ref.get("activation", "leaky_relu")
    else:
        assert cfg.objective.kind == "jem"
        assert (cfg.objective.clf_weight, cfg.objective.px_weight, cfg.objective.pxy_weight) == (1.0, 1.0, 0.0)
        assert m.arch == "wrn" and (m.depth, m.width) == ref["wrn"] and m.norm == "none" and m.dropout == 0.0
        assert m.activation == "leaky_relu" and m.leaky_slope == 0.2 and m.num_classes == ref["classes"]
        assert d.noise_std == ref["input_noise"] and d.holdout == ref["holdout"]
        assert o.warmup_steps == ref["warmup"] and o.decay_factor == 0.3
        assert b.storage == ref.get("storage", "fp32")


def test_jem_schedule_is_epochs_160_and_180_of_200():
    cfg = load_config(os.path.join(CONFIGS, "jem_cifar10.yaml"))
    steps_per_epoch = (50000 - 5000) // 64
    assert cfg.optim.decay_steps == [160 * steps_per_epoch, 180 * steps_per_epoch]
    assert cfg.train.steps == 200 * steps_per_epoch
