import math

import pytest
import torch

from ebmscale.config import ConfigError, load_config
from ebmscale.optim import lr_factor
from ebmscale.trainer import DivergenceError, Trainer

TINY = ["data.dataset=digits", "model.width=4", "model.depth=2", "data.batch_size=16", "sampler.steps=3",
        "buffer.capacity=64", "train.progress=false", "train.tensorboard=false", "buffer.backend=local"]


def make(tmp_path, *extra):
    return Trainer(load_config(None, [*TINY, *extra]), str(tmp_path / "run"))


def test_lr_schedule_warmup_and_step_decay():
    assert lr_factor(0, 10, [], 0.3) == pytest.approx(0.1)
    assert lr_factor(9, 10, [], 0.3) == 1.0
    assert lr_factor(99, 0, [100, 200], 0.3) == 1.0
    assert lr_factor(100, 0, [100, 200], 0.3) == pytest.approx(0.3)
    assert lr_factor(250, 0, [100, 200], 0.3) == pytest.approx(0.09)


def test_divergence_stops_with_step_and_metric(tmp_path):
    tr = make(tmp_path)
    tr.train_step()
    with torch.no_grad():
        next(tr.model.parameters()).fill_(float("nan"))
    with pytest.raises(DivergenceError, match=r"step 1: (loss|e_pos|e_neg|grad_norm)=nan"):
        tr.train_step()


def test_energy_threshold_trips(tmp_path):
    tr = make(tmp_path, "train.max_abs_energy=1e-9")
    with pytest.raises(DivergenceError, match=r"step 0: e_pos=.*limit 1e-09"):
        tr.train_step()


def test_resume_in_process_is_bitwise_identical(tmp_path):
    a = make(tmp_path, "train.seed=3")
    for _ in range(6):
        a.train_step()
    b = make(tmp_path, "train.seed=3")
    for _ in range(3):
        b.train_step()
    state = b.state_dict()
    c = make(tmp_path, "train.seed=3")
    c.load_state_dict(state)
    for _ in range(3):
        c.train_step()
    for (n, p), q in zip(a.model.named_parameters(), c.model.parameters()):
        assert torch.equal(p, q), n
    assert (a.buffer.data == c.buffer.data).all()


def test_sampler_does_not_advance_spectral_norm(tmp_path):
    tr = make(tmp_path, "model.spectral_norm=true")
    conv = tr.model.body[0]
    u0 = conv.parametrizations.weight[0]._u.clone()
    rng = __import__("numpy").random.default_rng(0)
    tr.context.negatives(4, None, rng, torch.Generator().manual_seed(0))
    assert torch.equal(conv.parametrizations.weight[0]._u, u0)
    tr.train_step()  # the training forward advances it exactly once
    assert not torch.equal(conv.parametrizations.weight[0]._u, u0)


def test_jem_and_conditional_steps(tmp_path):
    tr = make(tmp_path, "objective.kind=jem", "model.num_classes=10", "objective.pxy_weight=1.0",
              "data.noise_std=0.03")
    stats = tr.train_step()
    for k in ("ce", "train_acc", "e_pos", "e_neg", "e_pos_y", "e_neg_y", "loss"):
        assert k in stats and math.isfinite(stats[k])
    assert tr.buffer.num_classes == 10
    tr2 = make(tmp_path, "model.conditional=true", "model.num_classes=10", "sampler.init=noise")
    stats = tr2.train_step()
    assert math.isfinite(stats["loss"])


def test_input_noise_with_several_scales_is_log_uniform_per_example():
    """data.noise_std_max: each example's noise std is noise_std * (max/noise_std)^u, u ~ U(0, 1):
    log std uniform on [log 0.1, log 1]; one std for all without it."""
    from ebmscale.data.transforms import to_model_input

    x = torch.full((4000, 1, 16, 16), 128, dtype=torch.uint8)
    clean = to_model_input(x, "symmetric")
    g = torch.Generator().manual_seed(0)
    std = (to_model_input(x, "symmetric", noise_std=0.1, noise_std_max=1.0, generator=g) - clean).flatten(1).std(1)
    log_std = std.log()
    assert float(std.min()) > 0.07 and float(std.max()) < 1.2  # 256 pixels: each std within ~5%
    # Uniform on [log 0.1, 0]: mean log(0.1)/2, quartiles at 1/4 and 3/4 of the interval.
    lo = math.log(0.1)
    assert float(log_std.mean()) == pytest.approx(lo / 2, abs=0.05)
    assert float(log_std.quantile(0.25)) == pytest.approx(0.75 * lo, abs=0.08)
    one = (to_model_input(x, "symmetric", noise_std=0.3, generator=g) - clean).flatten(1).std(1)
    # One std: the per-example estimates scatter by 0.3 / sqrt(2 * 256) only.
    assert float(one.mean()) == pytest.approx(0.3, abs=0.003) and float(one.std()) < 0.02
    with pytest.raises(ConfigError, match="data.noise_std_max"):
        load_config(None, ["data.noise_std=0.3", "data.noise_std_max=0.2"])


def test_short_run_mode_leaves_buffer_untouched(tmp_path):
    tr = make(tmp_path, "sampler.init=noise")
    before = tr.buffer.data.copy()
    tr.train_step()
    assert (tr.buffer.data == before).all()


@pytest.mark.parametrize("extra", [(), ("objective.kind=jem", "model.num_classes=10", "objective.pxy_weight=1.0"),
                                   ("model.conditional=true", "model.num_classes=10")])
def test_sampler_batch_size_sets_the_number_of_chains(tmp_path, extra):
    """sampler.batch_size chains per step, independent of the data batch (16): every set of
    chains writes back exactly that many states, and the loss is finite."""
    tr = make(tmp_path, "sampler.batch_size=5", *extra)
    written, write_back = [], tr.buffer.write_back
    tr.buffer.write_back = lambda h, x: (written.append((len(h[0]), len(x))), write_back(h, x))
    stats = tr.train_step()
    assert math.isfinite(stats["loss"])
    assert tr.last_negatives.shape[0] == 5
    # JEM with the p(x, y) term runs two sets of chains: unconditional and class-conditional.
    assert written == [(5, 5)] * (2 if "objective.pxy_weight=1.0" in extra else 1)


@pytest.mark.parametrize("extra", [("train.precision=fp32",), ("train.precision=bf16",),
                                   ("model.conditional=true", "model.num_classes=10", "train.precision=fp32")])
def test_mala_sampler_with_buffer_reports_acceptance(tmp_path, extra):
    """sampler.kind=mala runs wherever the sampler runs (buffer chains, class-conditional chains,
    bf16 energies) and reports its per-step acceptance rate; the chains are written back."""
    tr = make(tmp_path, "sampler.kind=mala", "sampler.step_size=0.01", "sampler.noise_std=0", "sampler.grad_clip=0",
              *extra)
    before = tr.buffer.data.copy()
    stats = [tr.train_step() for _ in range(2)]
    for s in stats:
        assert math.isfinite(s["loss"]) and 0.0 < s["accept_rate"] <= 1.0, s
    assert not (tr.buffer.data == before).all()
    assert tr.sampler_counts["mala_proposed"] == 16 * 3


def test_mala_invalid_step_names_the_key():
    from ebmscale.config import ConfigError

    with pytest.raises(ConfigError, match=r"sampler\.step_size"):
        load_config(None, [*TINY, "sampler.kind=mala", "sampler.step_size=0"])
    with pytest.raises(ConfigError, match=r"sampler\.noise_std"):
        load_config(None, [*TINY, "sampler.kind=mala", "sampler.noise_std=0.1"])


@pytest.mark.parametrize("extra", [[], ["objective.kind=jem", "model.num_classes=10"]])
def test_step_time_split_puts_buffer_calls_in_buffer_time(tmp_path, monkeypatch, extra):
    """buffer_time is the step's time in replay-buffer calls, and sampler_time no longer holds it:
    a draw made 0.3 s slower lands in buffer_time, not in sampler_time; the parts fit in step_time."""
    import time as _time

    tr = make(tmp_path, "train.precision=fp32", *extra)
    base = tr.train_step()
    draw = tr.buffer.draw

    def slow_draw(*args):
        _time.sleep(0.3)
        return draw(*args)

    monkeypatch.setattr(tr.buffer, "draw", slow_draw)
    out = tr.train_step()
    assert out["buffer_time"] >= 0.3 > base["buffer_time"]
    assert out["sampler_time"] < 0.3 and base["sampler_time"] > 0
    assert out["data_time"] + out["sampler_time"] + out["buffer_time"] <= out["step_time"]
