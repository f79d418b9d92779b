"""Every published recipe builds its model and trains 2 steps at tiny width on fabricated data in
the recipe's own format (a CIFAR python archive, ImageNet-style shards at 32/64/128), and the
full-size parameter counts printed by `ebmscale info` match the published architectures."""
import json
import math
import os

import numpy as np
import pytest

from ebmscale.config import load_config
from ebmscale.data.sources import load_source
from ebmscale.data.writer import write_shards
from ebmscale.trainer import train
from tests.conftest import REPO, run_cli
from tests.unit.test_shards import make_cifar

CONFIGS = os.path.join(REPO, "configs")
TINY = {"igebm": ["model.width=4", "model.depth=1"], "wrn": ["model.depth=10", "model.width=1"]}


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes-data")
    paths = {"cifar10": str(root / "cifar-10-python.tar.gz")}
    make_cifar(paths["cifar10"], per_batch=8)
    rng = np.random.default_rng(0)
    for res in (32, 64, 128):
        npz = root / f"in{res}.npz"
        np.savez(npz, x=rng.integers(0, 256, (16, res, res, 3), dtype=np.uint8), y=rng.integers(0, 1000, 16))
        out = root / f"shards{res}"
        write_shards(load_source("npz", str(npz)), str(out), shard_size=8)
        paths[res] = str(out)
    return paths


def _data_overrides(cfg_path: str, fake: dict) -> list[str]:
    cfg = load_config(cfg_path)
    path = fake["cifar10"] if cfg.data.dataset == "cifar10" else fake[cfg.data.resolution]
    return [f"data.path={path}", f"data.cache_dir={os.path.dirname(fake['cifar10'])}/cache"]


PUBLISHED = ["igebm_cifar10.yaml", "igebm_cifar10_cond.yaml", "igebm_imagenet32.yaml", "igebm_imagenet64.yaml",
             "igebm_imagenet128.yaml", "jem_cifar10.yaml", "jem_imagenet32.yaml", "jem_imagenet64.yaml",
             "jem_imagenet128.yaml"]


@pytest.mark.parametrize("name", PUBLISHED)
def test_recipe_trains_two_steps_at_tiny_width(name, fake_data, tmp_path):
    path = os.path.join(CONFIGS, name)
    arch = load_config(path).model.arch
    cfg = load_config(path, [*_data_overrides(path, fake_data), *TINY[arch], "data.batch_size=4", "data.holdout=0",
                             "sampler.steps=2", "buffer.capacity=1000", "train.steps=2", "train.progress=false",
                             "train.tensorboard=false", "train.log_every=1", "buffer.backend=local"])
    result = train(cfg, run_dir=str(tmp_path / "run"))
    assert result.steps == 2 and math.isfinite(result.last_metrics["loss"])
    assert os.path.exists(result.checkpoint)


# Full-size trainable parameter counts (derivations in tests/unit/test_architectures.py):
# IGEBM counted from openai/ebm_code_release models.py variable shapes; WRN-28-10 in JEM's setting
# (no normalisation, conv biases, 10-way head) = 36,479,194 (standard, BN + bias-free convs)
# - 17,952 BN parameters + 10,096 conv biases.
FULL_SIZE = {
    "igebm_cifar10.yaml": 18_591_105,        # ResNet32Large, unconditional
    "igebm_cifar10_cond.yaml": 5_350_529,    # ResNet32, 10-class conditional
    "igebm_imagenet32.yaml": 89_559_681,     # ResNet32Wider (256 filters), 1000-class conditional
    "igebm_imagenet128.yaml": 21_212_289,    # ResNet128, 1000-class conditional
    "jem_cifar10.yaml": 36_471_338,          # WRN-28-10, JEM's no-norm variant
    # The same network with a 1000-way head (+ 640 x 990 weights + 990 biases) at every resolution:
    # global average pooling makes the count independent of the image size.
    "jem_imagenet32.yaml": 37_105_928,
    "jem_imagenet64.yaml": 37_105_928,
    "jem_imagenet128.yaml": 37_105_928,
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_info_prints_published_parameter_counts(name, fake_data, cli_env, tmp_path):
    path = os.path.join(CONFIGS, name)
    r = run_cli(["info", "--config", path, *_data_overrides(path, fake_data)], cli_env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["parameters"] == FULL_SIZE[name]


@pytest.mark.parametrize("name", ["igebm_cifar10_cond.yaml", "jem_cifar10.yaml"])
def test_conditional_igebm_and_jem_train_with_bf16_forced(name, fake_data, tmp_path):
    """What a GPU runs under train.precision=auto, forced here so that every CPU runs it (emulated bf16
    where there are no bf16 units): the class-conditional IGEBM with spectral norm and JEM's hybrid
    objective, through the half-precision canary, with finite losses and gradients."""
    path = os.path.join(CONFIGS, name)
    arch = load_config(path).model.arch
    cfg = load_config(path, [*_data_overrides(path, fake_data), *TINY[arch], "data.batch_size=4", "data.holdout=0",
                             "sampler.steps=2", "buffer.capacity=1000", "train.steps=2", "train.progress=false",
                             "train.tensorboard=false", "train.log_every=1", "buffer.backend=local",
                             "train.precision=bf16"])
    result = train(cfg, run_dir=str(tmp_path / "run"))
    assert result.steps == 2 and math.isfinite(result.last_metrics["loss"])
    assert math.isfinite(result.last_metrics["grad_norm"])
    with open(os.path.join(str(tmp_path / "run"), "runtime.yaml")) as fh:
        assert "precision: bf16" in fh.read()
