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
from ebmscale.performance import Runtime, hardware_bf16, resolve_compile, resolve_precision, resolve_runtime, resolve_speed
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
    # 2-D toy MLP energies stay fp32 under auto even on bf16 hardware (exact-likelihood recipes).
    _cpu_units(monkeypatch, amx=True, avx512_bf16=True)
    assert resolve_precision("auto", CPU, image_data=False) == "fp32"
    assert resolve_precision("bf16", CPU, image_data=False) == "bf16"


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
    assert img == Runtime(device=CPU, backend="ddp", precision="fp32", channels_last=True, compile=False,
                          reuse_cpu_memory=performance._glibc() is not None, hardware_bf16=False)
    assert resolve_speed(t, CPU, image_data=False).channels_last is False  # 2-D toy energies
    assert resolve_speed(t, CUDA, image_data=True).reuse_cpu_memory is False
    off = load_config(None, ["train.channels_last=false", "train.compile=false", "train.reuse_cpu_memory=false",
                             "train.precision=bf16"]).train
    rt = resolve_speed(off, CPU, image_data=True)
    assert (rt.precision, rt.channels_last, rt.compile, rt.reuse_cpu_memory) == ("bf16", False, False, False)
    assert rt.autocast_dtype == torch.bfloat16 and "precision bf16, contiguous, eager" == rt.describe()


def test_runtime_is_resolved_once_and_the_config_is_never_changed(monkeypatch, tmp_path):
    """The trainer reads one frozen Runtime; cfg.train.precision stays 'auto'; the run directory holds
    the asked config.yaml and the resolved runtime.yaml; the probe decides 'auto' both ways."""
    import dataclasses

    import yaml

    from ebmscale.loop import write_runtime

    base = ["data.dataset=digits", "model.width=4", "model.depth=2", "data.batch_size=8", "sampler.steps=2",
            "buffer.capacity=16", "buffer.backend=local", "train.progress=false", "train.tensorboard=false"]
    for units, expect in ((False, "fp32"), (True, "bf16")):
        _cpu_units(monkeypatch, amx=units, avx512_bf16=units)
        cfg = load_config(None, base)
        tr = Trainer(cfg, str(tmp_path / expect))
        assert cfg.train.precision == "auto"  # never written back
        assert tr.runtime.precision == tr.parallel.precision == expect
        assert tr.parallel.autocast_dtype == tr.runtime.autocast_dtype
        with pytest.raises(dataclasses.FrozenInstanceError):
            tr.runtime.precision = "fp32"
        with open(write_runtime(str(tmp_path), tr.runtime)) as fh:
            assert yaml.safe_load(fh)["precision"] == expect
        assert tr.state_dict()["config"]["train"]["precision"] == "auto"


def test_a_precision_the_device_cannot_run_is_one_error_naming_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ConfigError, match=r"train.precision=bf16: Tesla V100 has no bf16"):
        resolve_runtime(load_config(None, ["train.precision=bf16", "train.device=cuda:0"]), image_data=True)
    with pytest.raises(ConfigError, match=r"train.precision=fp16: DeepSpeed has no fp16 on CPU"):
        resolve_runtime(load_config(None, ["train.precision=fp16", "train.distributed=deepspeed",
                                           "train.device=cpu"]), image_data=True)


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

    # fp32 pinned: the comparison below is at fp32 rounding (auto is bf16 on AMX / AVX512-BF16 CPUs).
    base = ["data.dataset=digits", "model.width=4", "model.depth=2", "data.batch_size=8", "sampler.steps=3",
            "buffer.capacity=32", "train.progress=false", "train.tensorboard=false", "train.seed=5",
            "train.precision=fp32"]
    eager = Trainer(load_config(None, [*base, "train.compile=false"]), str(tmp_path / "eager"))
    assert eager.sampler_energy is eager.model and not eager.runtime.compile
    compiled = Trainer(load_config(None, [*base, "train.compile=true"]), str(tmp_path / "compiled"))
    assert compiled.runtime.compile and compiled.sampler_energy._orig_mod is compiled.model
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
