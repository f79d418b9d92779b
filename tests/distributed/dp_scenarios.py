"""Scenarios the multi-process tests run under ``accelerate launch`` (2 gloo ranks on CPU), and
their one-process references, which the tests run in-process.

    accelerate launch ... tests/distributed/dp_scenarios.py ddp OUT_DIR
    accelerate launch ... tests/distributed/dp_scenarios.py deepspeed OUT_DIR
    accelerate launch ... tests/distributed/dp_scenarios.py estimators OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.pt`` (parameters, spectral-norm vectors, collective counts,
per-step reduced metrics, ...); the tests compare ranks with each other and with the reference.
Not collected by pytest (no ``test_`` prefix).
"""
from __future__ import annotations

import os
import sys

import torch

if __name__ == "__main__":  # launched as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ebmscale import dist  # noqa: E402
from ebmscale.config import load_config  # noqa: E402
from ebmscale.parallel import count_collectives  # noqa: E402
from ebmscale.sampling import LangevinSettings, langevin, sampling_mode, uniform_noise  # noqa: E402
from ebmscale.trainer import Trainer, train  # noqa: E402

STEPS = 4
PER_RANK_BATCH = 16

# A tiny spectrally normalised MLP on a 2-D density: spectral norm gives the model buffers (the
# power-iteration vectors) that DDP broadcasts in every wrapped forward.
BASE = ["data.dataset=8gaussians", "model.arch=mlp", "model.width=16", "model.depth=2", "model.spectral_norm=true",
        "data.toy_train_size=2000", "sampler.kind=sgld", "sampler.steps=5", "sampler.step_size=0.1",
        "sampler.noise_std=0.05", "buffer.capacity=64", "objective.alpha=0.1", "train.progress=false",
        "train.tensorboard=false", "train.threads=1", "train.device=cpu", "optim.ema=0", "buffer.backend=local",
        # fp32 pinned: these scenarios compare world sizes at fp32 rounding (auto is bf16 on AMX CPUs).
        "train.precision=fp32"]

# The equivalence run: short-run chains (no per-rank buffer), SGD (Adam's first steps are
# sign(g) and would magnify summation-order noise in near-zero gradient entries).
EQUIV = BASE + ["sampler.init=noise", "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9"]

# Gradient accumulation: 2 micro-batches of half the batch, compared (like the world-size runs)
# with one process at the global batch.
ACCUM = ["optim.accumulate=2"]

# bf16 learning check: IGEBM-style low-temperature SGLD, which shapes a 2-D energy within a few
# hundred steps (proper Langevin at the toy recipe's step needs thousands).
LEARN = ["data.dataset=8gaussians", "model.arch=mlp", "model.width=32", "model.depth=2", "data.toy_train_size=4000",
         "sampler.kind=sgld", "sampler.steps=10", "sampler.step_size=0.1", "sampler.noise_std=0.01",
         "buffer.capacity=128", "objective.alpha=0.1", "optim.lr=1e-2", "optim.betas=[0.9,0.999]", "optim.ema=0",
         "train.precision=bf16", "train.steps=200", "train.log_every=50", "train.sample_every=100",
         "train.checkpoint_every=0", "train.progress=false", "train.tensorboard=true", "train.threads=1",
         "train.device=cpu", "data.batch_size=32", "buffer.backend=local"]


# fp16 under DDP: the same learning check with the loss GradScaler and the sampler's input-gradient
# scaler, logged every step so the test can count skipped steps and scale back-offs.
FP16 = [o for o in LEARN if not o.startswith(("train.precision=", "train.log_every=", "train.steps="))] + [
    "train.precision=fp16", "train.steps=150", "train.log_every=1"]


class GlobalNoiseTrainer(Trainer):
    """Test mode for world-size and accumulation equivalence: chain starts and Langevin noise are
    drawn for the *global* batch of the step (ranks x micro-batches) from streams that ignore the
    rank and the micro-batch, and each (micro-batch, rank) takes its own slice, so any number of
    ranks and micro-batches sees the same negatives in total. (Production draws per-rank,
    per-micro-batch streams.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._normal: tuple[int, torch.Generator] | None = None
        if self.estimator is not None:  # the estimators' own draws (mpf, kl_contraction, lsd)
            self.estimator.normal = lambda shape, gen: self._global_draw(torch.randn, shape)
            self.estimator.uniform = lambda shape, gen: self._global_draw(torch.rand, shape)

    def _global_draw(self, draw, shape: tuple) -> torch.Tensor:
        """Draws for the global batch from one stream per step (ignoring the rank). These are
        paired with data examples, so each rank takes the rows of its own examples: the stream deals
        the global batch out interleaved (rank r holds global rows r, r + world, ...)."""
        if self._normal is None or self._normal[0] != self.step:
            self._normal = (self.step, dist.torch_generator(self.cfg.train.seed, 0, self.step, "objective", self.device))
        full = draw((shape[0] * self.world, *shape[1:]), generator=self._normal[1])
        return full[self.rank::self.world]

    def _slice(self, full: torch.Tensor, n: int) -> torch.Tensor:
        part = self.micro * self.world + self.rank
        return full[part * n:(part + 1) * n]

    def _global(self, n: int) -> int:
        return n * self.world * self.cfg.optim.accumulate

    def _chain_init(self, n: int, gen: torch.Generator) -> torch.Tensor:
        g = dist.torch_generator(self.cfg.train.seed, 0, self.step, "init", self.device)
        return self._slice(uniform_noise(self._global(n), self.shape, self.init_bounds, g, self.device), n)

    def _noise_fn(self, n: int, gen: torch.Generator):
        g = dist.torch_generator(self.cfg.train.seed, 0, self.step, "langevin", self.device)
        return lambda x: self._slice(torch.randn((self._global(n), *x.shape[1:]), generator=g, dtype=x.dtype), n)


def run_equivalence(overrides: list[str], batch: int, run_dir: str) -> dict:
    """``STEPS`` steps of :class:`GlobalNoiseTrainer`; per-step metrics reduced across ranks
    (what would be logged) and the final parameters."""
    tr = GlobalNoiseTrainer(load_config(None, [*EQUIV, f"data.batch_size={batch}", *overrides]), run_dir)
    init = {n: p.detach().float().clone() for n, p in tr.model.named_parameters()}
    logged = []
    for _ in range(STEPS):
        for k, v in tr.train_step().items():
            if k in ("loss", "e_pos", "e_neg", "grad_norm"):
                tr.metrics.report(k, v)
        logged.append(tr.metrics.flush(tr.step))
    tr.metrics.close()
    return {"params": {n: p.detach().float().clone() for n, p in tr.model.named_parameters()}, "init": init,
            "logged": logged, "sn_u": _spectral_vectors(tr.model), "wrapper": type(tr.wrapped).__name__,
            "param_dtype": str(next(tr.model.parameters()).dtype), "parallel": tr.parallel.describe(),
            "sampler_collectives": _sampler_collectives(tr)}


def _spectral_vectors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b.detach().float().clone() for n, b in model.named_buffers() if n.endswith(("_u", "_v"))]


def _sampler_collectives(tr: Trainer) -> int:
    """Collectives issued by one call of the trainer's sampler path (starts, K steps, write-back)."""
    with count_collectives() as names:
        tr.context.negatives(PER_RANK_BATCH, None, dist.numpy_rng(0, tr.rank, 99, "buffer"),
                             dist.torch_generator(0, tr.rank, 99, "langevin", tr.device))
    return len(names)


def scenario_ddp(out: str) -> dict:
    rank = dist.rank()
    res: dict = {}
    # 1. Production semantics: per-rank streams, sampler free of communication, ranks in lockstep.
    tr = Trainer(load_config(None, [*BASE, f"data.batch_size={PER_RANK_BATCH}"]), os.path.join(out, "scratch"))
    with count_collectives() as step_names:
        tr.train_step()
    res["step_collectives"] = list(step_names)
    res["sampler_collectives"] = [_sampler_collectives(tr)]
    for _ in range(STEPS - 1):
        tr.train_step()
        res["sampler_collectives"].append(_sampler_collectives(tr))
    # Control: the same sampler run through the DDP wrapper does communicate (buffer broadcasts),
    # so a count of zero above is a real measurement.
    x0 = uniform_noise(PER_RANK_BATCH, (2,), (-5.0, 5.0), torch.Generator().manual_seed(rank))
    with count_collectives() as wrapped_names, sampling_mode(tr.wrapped) as m:
        langevin(m, x0, LangevinSettings(steps=3, step_size=0.1, noise_std=0.01), torch.Generator().manual_seed(0))
    res["wrapped_sampler_collectives"] = len(wrapped_names)
    res["params"] = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    res["sn_u"] = _spectral_vectors(tr.model)
    res["negatives"] = tr.last_negatives.clone()
    res["buffer"] = torch.from_numpy(tr.buffer.data.copy())
    res["wrapper"] = type(tr.wrapped).__name__
    # 2. World-size equivalence (compared with a one-process run at twice the batch), without and
    # with gradient accumulation.
    res["equiv"] = run_equivalence([], PER_RANK_BATCH, os.path.join(out, "equiv"))
    res["equiv_accum"] = run_equivalence(ACCUM, PER_RANK_BATCH // 2, os.path.join(out, "equiv_accum"))
    # Accumulation communicates only on the last micro-batch: one step of 2 micro-batches issues
    # the collectives of one step without accumulation.
    acc = Trainer(load_config(None, [*BASE, f"data.batch_size={PER_RANK_BATCH // 2}", "optim.accumulate=2"]),
                  os.path.join(out, "scratch_accum"))
    with count_collectives() as accum_names:
        acc.train_step()
    res["accum_step_collectives"] = list(accum_names)
    # 3. bf16 training through train(): learns, and only rank 0 writes anything.
    cfg = load_config(None, LEARN)
    # One run directory for both ranks: each writes its own part of the sharded checkpoints.
    result = train(cfg, run_dir=os.path.join(out, "learn"))
    res["learn"] = _learn_report(result, cfg, rank, out)
    return res


def _learn_report(result, cfg, rank: int, out: str, name: str = "learn") -> dict:
    """How well the bf16 model separates data from uniform points, and where its chains are."""
    from ebmscale.checkpoint import load_checkpoint
    from ebmscale.data import toy_splits
    from ebmscale.data.toy import get_toy
    from ebmscale.models import build_model

    report = {"steps": result.steps, "last_metrics": result.last_metrics}
    if rank != 0:
        return report
    state = load_checkpoint(os.path.join(out, name))
    model = build_model(cfg.model, (2,))
    model.load_state_dict(state["model"])
    model.eval()
    d = get_toy("8gaussians")
    test = toy_splits(cfg)["test"][:2000].float()
    lo, hi = d.bounds
    u = torch.rand(2000, 2, generator=torch.Generator().manual_seed(0)) * (hi - lo) + lo
    with torch.no_grad():
        e_data, e_unif = model(test), model(u)
    chains = state["buffer"]["data"].float()
    report.update(auc=float((e_data[:, None] < e_unif[None, :]).float().mean()),
                  chain_nll_median=float(-d.log_prob(chains.double()).median()),
                  uniform_nll_median=float(-d.log_prob(u.double()).median()),
                  data_nll_median=float(-d.log_prob(test.double()).median()))
    return report


def scenario_fp16(out: str) -> dict:
    """fp16 training through train() on 2 ranks: GradScaler on the loss, InputGradScaler in the
    sampler; every step's reduced metrics are in metrics.jsonl (rank 0)."""
    cfg = load_config(None, FP16)
    result = train(cfg, run_dir=os.path.join(out, "fp16"))
    return {"fp16": _learn_report(result, cfg, dist.rank(), out, "fp16")}


def scenario_deepspeed(out: str) -> dict:
    """DeepSpeed through accelerate, as the launcher's config says (train.distributed=auto). One
    engine per process (accelerate keeps one DeepSpeed state), so one trainer -- the equivalence
    one -- serves every check."""
    return run_equivalence([], PER_RANK_BATCH, os.path.join(out, "equiv"))


# fp32 pinned: train.precision=auto is bf16 on CPUs with bf16 units, whose rounding differs per batch size.
SM_EQUIV = ("objective.kind=sm", "train.precision=fp32")
# Issue 19's objectives for world-size equivalence (fp32 pinned: bf16 would round differently per batch).
NEW_OBJECTIVES = {
    "mpf": ("objective.kind=mpf", "objective.mpf_step=0.3", "train.precision=fp32"),
    "kl_contraction": ("objective.kind=kl_contraction", "objective.kl_contraction_samples=4", "train.precision=fp32"),
    "lsd": ("objective.kind=lsd", "objective.lsd_critic_steps=2", "train.precision=fp32"),
    "lsd_noise_conditional": ("objective.kind=lsd", "objective.lsd_critic_steps=2", "objective.noise_conditional=true",
                              "objective.sigma_min=0.05", "objective.sigma_max=0.5", "train.precision=fp32"),
    "lsd_denoising_skip": ("objective.kind=lsd", "objective.lsd_critic_steps=2", "objective.noise_conditional=true",
                           "objective.lsd_trace=denoising", "objective.lsd_critic_skip=true", "objective.sigma_min=0.05",
                           "objective.sigma_max=0.5", "train.precision=fp32"),
    "pcd_kl": ("objective.kl_weight=1", "objective.entropy_weight=0", "train.precision=fp32"),
}


def scenario_deepspeed_accumulate(out: str) -> dict:
    """DeepSpeed with gradient_accumulation_steps = optim.accumulate = 2 (its own launch: one
    engine per process)."""
    return run_equivalence(ACCUM, PER_RANK_BATCH // 2, os.path.join(out, "equiv"))


def scenario_estimators(out: str) -> dict:
    """The estimators of ``ebmscale.objectives.estimators`` under DDP: exact score matching (a
    deterministic loss of the data that back-propagates through input gradients) for world-size
    equivalence, and NCE / adversarial runs whose extra parameters (log Z, the sampler) must stay
    identical on every rank."""
    res: dict = {"equiv_sm": run_equivalence(list(SM_EQUIV), PER_RANK_BATCH, os.path.join(out, "sm"))}
    for name, overrides in NEW_OBJECTIVES.items():
        res[f"equiv_{name}"] = run_equivalence(list(overrides), PER_RANK_BATCH, os.path.join(out, name))
    # MALA under DDP: runs, and its acceptance rate is reduced across ranks like any metric.
    tr = Trainer(load_config(None, [*BASE, f"data.batch_size={PER_RANK_BATCH}", "sampler.kind=mala",
                                    "sampler.noise_std=0", "train.precision=fp32"]), os.path.join(out, "mala"))
    local = []
    for _ in range(2):
        local.append(tr.train_step()["accept_rate"])
        tr.metrics.report("accept_rate", local[-1])
    res["mala"] = {"local": local, "reduced": tr.metrics.flush(tr.step)["accept_rate"]}
    tr.metrics.close()
    for kind, extra in (("nce", []), ("adversarial", ["objective.sampler_width=16"])):
        tr = Trainer(load_config(None, [*BASE, f"data.batch_size={PER_RANK_BATCH}", f"objective.kind={kind}", *extra]),
                     os.path.join(out, kind))
        for _ in range(STEPS):
            tr.train_step()
        res[kind] = {"params": {n: p.detach().clone() for n, p in tr.model.named_parameters()},
                     "extra": {k: v.detach().clone() for k, v in tr.estimator.state_dict().items()
                               if isinstance(v, torch.Tensor)} if kind == "nce" else
                     {n: p.detach().clone() for n, p in tr.estimator.sampler.named_parameters()},
                     "negatives": tr.last_negatives.clone()}
    return res


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(scenario: str, out: str, accelerate_config: str, timeout: float = 900) -> list[dict]:
    """Run ``scenario`` on 2 CPU ranks with ``accelerate launch --config_file`` (a file under
    launch/accelerate/) and return each rank's results. DeepSpeed's JIT-built shared-memory op is
    cached under the repository's .cache/ (gitignored), so only the first run pays its compile."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "DS_"))}
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.path.join(REPO, ".cache", "torch_extensions"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "launch", "accelerate", accelerate_config), "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(_free_port()),
           os.path.abspath(__file__), scenario, out]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    noise = ("USDT:", "gpuGetDeviceCount")  # the profiler's chatter on a machine without a GPU
    log = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith(noise)
                    and "DeviceProperties.cpp" not in line)
    assert proc.returncode == 0, log[-6000:]
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


_REFERENCE: dict = {}


def reference(tmp_dir: str, overrides: tuple[str, ...] = ()) -> dict:
    """The one-process run with the global batch (2 x PER_RANK_BATCH), computed once per session
    (per set of overrides)."""
    if overrides not in _REFERENCE:
        before = torch.get_num_threads()
        _REFERENCE[overrides] = run_equivalence(list(overrides), 2 * PER_RANK_BATCH, os.path.join(tmp_dir, "reference"))
        torch.set_num_threads(before)
    return _REFERENCE[overrides]


def main() -> None:
    torch.set_num_threads(1)
    scenario, out = sys.argv[1], sys.argv[2]
    res = {"ddp": scenario_ddp, "deepspeed": scenario_deepspeed, "deepspeed_accumulate": scenario_deepspeed_accumulate,
           "estimators": scenario_estimators, "fp16": scenario_fp16}[scenario](out)
    res["rank"], res["world"] = dist.rank(), dist.world_size()
    torch.save(res, os.path.join(out, f"rank{dist.rank()}.pt"))
    dist.barrier()


if __name__ == "__main__":
    main()
