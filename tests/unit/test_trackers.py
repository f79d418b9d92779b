"""train.trackers: scalars and images reach accelerate's trackers (TensorBoard by default, any
tracker registered with accelerate, wandb offline when installed); bad names fail at start."""
from __future__ import annotations

import glob
import os

import pytest

from ebmscale.config import ConfigError, load_config
from ebmscale.trainer import Trainer, train

TINY = ["data.dataset=digits", "model.width=4", "model.depth=2", "data.batch_size=16", "sampler.steps=2",
        "buffer.capacity=64", "train.progress=false", "buffer.backend=local", "train.precision=fp32",
        "train.threads=1", "train.device=cpu", "train.steps=4", "train.log_every=2", "train.sample_every=2",
        "train.checkpoint_every=0", "train.rollback_max=0", "train.report=false"]


def _recorder_class():
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        """A user's own tracker, plugged in through accelerate's public registration."""

        name = "ebmscale_test_recorder"
        requires_logging_directory = True
        calls: list = []

        def __init__(self, run_name: str, logging_dir: str):
            super().__init__()
            self.run_name, self.logging_dir = run_name, logging_dir

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values: dict) -> None:
            self.calls.append(("config", values))

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            self.calls.append(("log", step, dict(values)))

        def log_images(self, values: dict, step: int | None = None, **kwargs) -> None:
            self.calls.append(("images", step, {k: [im.shape for im in v] for k, v in values.items()}))

        def finish(self) -> None:
            self.calls.append(("finish",))

    return Recorder


def test_a_registered_tracker_gets_config_scalars_and_images_beside_tensorboard(tmp_path):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, register_tracker_class

    rec = _recorder_class()
    register_tracker_class(rec)
    try:
        run = str(tmp_path / "run")
        train(load_config(None, [*TINY, f"train.trackers=tensorboard,{rec.name}"]), run)
    finally:
        LOGGER_TYPE_TO_CLASS.pop(rec.name)
    kinds = [c[0] for c in rec.calls]
    assert kinds[0] == "config" and kinds[-1] == "finish"
    assert rec.calls[0][1]["train"]["trackers"] == f"tensorboard,{rec.name}"
    logs = [c for c in rec.calls if c[0] == "log"]
    assert [c[1] for c in logs] == [2, 4] and all("loss" in c[2] and "buffer_fill" in c[2] for c in logs)
    images = [c for c in rec.calls if c[0] == "images"]
    assert sorted({(c[1], tag) for c in images for tag in c[2]}) == [
        (2, "samples/buffer"), (2, "samples/negatives"), (4, "samples/buffer"), (4, "samples/negatives")]
    assert len(glob.glob(os.path.join(run, "tb", "events.out.tfevents.*"))) == 1  # TensorBoard as before


def test_no_trackers_writes_only_the_jsonl(tmp_path):
    run = str(tmp_path / "run")
    train(load_config(None, [*TINY, "train.trackers=", "train.steps=2"]), run)
    assert not os.path.exists(os.path.join(run, "tb")) and os.path.isfile(os.path.join(run, "metrics.jsonl"))
    # train.tensorboard=false leaves tensorboard out of the list, as before trackers existed.
    from ebmscale.config import tracker_names

    assert tracker_names(load_config(None, ["train.tensorboard=false", "train.trackers=tensorboard,wandb"]).train) \
        == ["wandb"]


def test_bad_tracker_names_fail_at_start(tmp_path):
    with pytest.raises(ConfigError, match="train.trackers must be comma-separated"):
        load_config(None, ["train.trackers=tensor board"])
    with pytest.raises(ConfigError, match="train.trackers: accelerate knows no tracker 'tensorbored'"):
        Trainer(load_config(None, [*TINY, "train.trackers=tensorbored"]), str(tmp_path / "a"))
    from accelerate.tracking import get_available_trackers

    if "mlflow" not in {str(t) for t in get_available_trackers()}:
        with pytest.raises(ConfigError, match="train.trackers: 'mlflow' is not installed"):
            Trainer(load_config(None, [*TINY, "train.trackers=mlflow"]), str(tmp_path / "b"))


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed in this test environment (it is not in the lock: "
                                        "a large package with its own service binary); install it to run this test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = str(tmp_path / "run")
    train(load_config(None, [*TINY, "train.trackers=wandb"]), run)
    offline = glob.glob(os.path.join(run, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(offline) == 1 and os.path.getsize(offline[0]) > 0
