import pytest

from ebmscale.config import Config, ConfigError, dump_yaml, from_dict, load_config, to_dict
from ebmscale.config_docs import describe
import yaml


def test_defaults_validate_and_round_trip():
    cfg = load_config()
    assert cfg.data.dataset == "mnist"
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert to_dict(again) == to_dict(cfg)


def test_dotted_overrides_are_typed(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("sampler:\n  steps: 60\noptim:\n  lr: 3.0e-4\n")
    cfg = load_config(p, ["sampler.steps=40", "optim.lr=1e-4", "optim.betas=[0, 0.9]", "model.spectral_norm=true",
                          "sampler.step_size=10"])
    assert cfg.sampler.steps == 40 and cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.optim.betas == [0, 0.9] and cfg.model.spectral_norm is True
    assert isinstance(cfg.sampler.step_size, float)


@pytest.mark.parametrize("overrides, key", [
    (["sampler.stepz=3"], "sampler.stepz"),
    (["nosection.x=1"], "nosection"),
    (["sampler.steps=abc"], "sampler.steps"),
    (["sampler.steps=-1"], "sampler.steps"),
    (["optim.lr=0"], "optim.lr"),
    (["buffer.reinit_prob=1.5"], "buffer.reinit_prob"),
    (["model.spectral_norm=3"], "model.spectral_norm"),
    (["data.dataset=imagenet7"], "data.dataset"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["data.dataset=8gaussians"], "model.arch"),
    (["model.conditional=true"], "model.conditional"),
    (["buffer.backend=local", "buffer.shards=4"], "buffer.shards"),
    (["buffer.backend=local", "buffer.ray_address=auto"], "buffer.ray_address"),
    (["buffer.ray_address=auto", "buffer.ray_dashboard=true"], "buffer.ray_dashboard"),
    (["buffer.mixing=rank"], "buffer.mixing"),
    (["sampler.batch_size=8", "objective.kind=dsm"], "sampler.batch_size"),
    (["sampler.batch_size=128", "model.num_classes=10", "model.conditional=true"], "sampler.batch_size"),
    (["sampler.batch_size=20000"], "sampler.batch_size"),
    (["optim.accumulate=0"], "optim.accumulate"),
    (["optim.accumulate=2", "objective.kind=dsm"], "optim.accumulate"),
])
def test_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_unknown_key_in_file_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  arch: resnet\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"model\.widht"):
        load_config(p)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_every_field_has_help():
    rows = describe(Config)
    assert len(rows) > 40
    assert all(h for _, _, h in rows), [k for k, _, h in rows if not h]


def test_shipped_configs_load():
    import glob
    import os

    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    files = sorted(glob.glob(os.path.join(here, "configs", "*.yaml")))
    assert files
    for f in files:
        load_config(f)


def test_mnist_recipe_is_the_default_job():
    import os

    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    recipe = to_dict(load_config(os.path.join(here, "configs", "mnist_pcd.yaml")))
    default = to_dict(load_config())
    recipe["train"].pop("run_dir"), default["train"].pop("run_dir")
    assert recipe == default
