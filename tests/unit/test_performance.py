"""Speed settings: how train.precision / compile / channels_last / reuse_cpu_memory resolve per device,
that the compiled sampler agrees with the eager one (and compiles once), and that the sampler equals
the published loop the throughput benchmark compares against."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from ebmscale import performance
from ebmscale.config import ConfigError, load_config
from ebmscale.models.wrn import WideResNet
from ebmscale.models.heads import ClassifierEnergy
from ebmscale.performance import SpeedSettings, hardware_bf16, resolve_compile, resolve_precision, resolve_speed
from ebmscale.sampling import LangevinSettings, langevin, sampling_mode
from ebmscale.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def _cpu_units(monkeypatch, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)


def test_auto_precision_is_bf16_only_on_native_bf16_hardware(monkeypatch):
    _cpu_units(monkeypatch, amx=False, avx512_bf16=False)
    assert not hardware_bf16(CPU) and resolve_precision("auto", CPU) == "fp32"
    _cpu_units(monkeypatch, amx=True, avx512_bf16=False)
    assert resolve_precision("auto", CPU) == "bf16"
    _cpu_units(monkeypatch, amx=False, avx512_bf16=True)
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", CUDA) == "fp32"  # pre-Ampere GPU: fp16 needs loss scaling, not picked
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", CUDA) == "bf16"
    # An explicit request is never second-guessed.
    _cpu_units(monkeypatch, amx=False, avx512_bf16=False)
    assert [resolve_precision(p, CPU) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


def test_compile_auto_is_cuda_only_and_never_with_checkpointing():
    assert resolve_compile("auto", CPU) is False
    assert resolve_compile("auto", CUDA) is True
    assert resolve_compile("auto", CUDA, sampler_checkpointing=True) is False
    assert resolve_compile("true", CPU) is True and resolve_compile("false", CUDA) is False


def test_resolve_speed_applies_layout_and_allocator_where_they_mean_something(monkeypatch):
    _cpu_units(monkeypatch, amx=False, avx512_bf16=False)
    t = load_config(None, []).train
    assert (t.precision, t.compile, t.channels_last, t.reuse_cpu_memory) == ("auto", "auto", True, True)
    img = resolve_speed(t, CPU, image_data=True)
    assert img == SpeedSettings(precision="fp32", channels_last=True, compile=False,
                                reuse_cpu_memory=performance._glibc() is not None)
    assert resolve_speed(t, CPU, image_data=False).channels_last is False  # 2-D toy energies
    assert resolve_speed(t, CUDA, image_data=True).reuse_cpu_memory is False
    off = load_config(None, ["train.channels_last=false", "train.compile=false", "train.reuse_cpu_memory=false",
                             "train.precision=bf16"]).train
    assert resolve_speed(off, CPU, image_data=True) == SpeedSettings("bf16", False, False, False)
    assert "precision bf16, contiguous, eager" == SpeedSettings("bf16", False, False, False).describe()


def test_compile_switch_reads_yaml_booleans_and_rejects_checkpointing():
    assert load_config(None, ["train.compile=true"]).train.compile == "true"
    assert load_config(None, ["train.compile=false"]).train.compile == "false"
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["train.compile=sometimes"])
    with pytest.raises(ConfigError, match="train.sampler_checkpointing"):
        load_config(None, ["train.compile=true", "train.sampler_checkpointing=true"])


def test_malloc_reuse_takes_effect_on_glibc():
    if performance._glibc() is None:
        pytest.skip("not glibc")
    assert performance.reuse_freed_cpu_memory() is True


def _benchmark_module():
    path = os.path.join(REPO, "benchmarks", "sampler.py")
    spec = importlib.util.spec_from_file_location("sampler_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("net", ["wrn", "igebm"])
def test_our_sampler_equals_the_published_loop(net):
    """The benchmark's reference loop (JEM's sample_q; IGEBM's clip and clamp) and ours follow the
    same chains: any speed-up it reports is for the same computation."""
    bench = _benchmark_module()
    torch.manual_seed(0)
    model = ClassifierEnergy(WideResNet(10, 1), 64, 10) if net == "wrn" else \
        bench.build_net("igebm", 1, 8, "resnet32", 16)[0]
    settings, (lo, hi) = bench.sampler_settings(net, steps=4)
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * (hi - lo) + lo
    ref = bench.reference_langevin(model, x0, settings, torch.Generator().manual_seed(2))
    model.requires_grad_(True).to(memory_format=torch.channels_last)
    with sampling_mode(model) as m:
        ours = langevin(m, x0.contiguous(memory_format=torch.channels_last), settings,
                        torch.Generator().manual_seed(2))
    assert all(p.requires_grad for p in model.parameters())
    moved = float((ref - x0).abs().max())
    assert moved > 1e-3 and float((ours - ref).abs().max()) < 1e-4 * moved
    assert bench.step_flops(model, x0) > 0


@pytest.mark.slow  # one real inductor compile: 66 s measured on the 2-core machine under a load of ~11
def test_compiled_sampler_in_the_trainer_matches_eager_and_compiles_once(tmp_path):
    """train.compile=true: the trainer's sampler runs a torch.compile wrapper of its model (inductor,
    a real C++ compile); two training steps -- the parameters' requires_grad flipping between the
    sampler and the loss every time -- give the eager trainer's negatives and weights within fp32
    rounding, and the second step reuses the first step's compiled graph."""
    import torch._dynamo

    base = ["data.dataset=digits", "model.width=4", "model.depth=2", "data.batch_size=8", "sampler.steps=3",
            "buffer.capacity=32", "train.progress=false", "train.tensorboard=false", "train.seed=5"]
    eager = Trainer(load_config(None, [*base, "train.compile=false"]), str(tmp_path / "eager"))
    assert eager.sampler_energy is eager.model and not eager.speed.compile
    compiled = Trainer(load_config(None, [*base, "train.compile=true"]), str(tmp_path / "compiled"))
    assert compiled.speed.compile and compiled.sampler_energy._orig_mod is compiled.model
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager.train_step()
    assert not counters["stats"]["unique_graphs"], "the eager trainer compiled something"
    compiled.train_step()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1, "the compiled trainer's sampler did not go through torch.compile"
    with torch._dynamo.config.patch(error_on_recompile=True):
        eager.train_step()
        compiled.train_step()
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.allclose(compiled.last_negatives, eager.last_negatives, atol=1e-4)
    for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
