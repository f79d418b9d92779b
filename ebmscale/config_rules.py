"""The configuration's cross-field rules: :func:`check`, run by ``ebmscale.config.validate`` (from
``load_config`` and ``from_dict``) after every value passed its own type, choice and range check.
Each failure is one :class:`~ebmscale.config.ConfigError` line naming the key to change.
"""
from __future__ import annotations

import math
import os

from ebmscale.config import (LSD_CRITIC_ARCHS, TOY_DATASETS, Config, ConfigError, SamplerConfig,
                             class_conditional_chains)


def check(cfg: Config) -> None:
    """Cross-field checks; each failure names the key to change."""
    d, m, s = cfg.data, cfg.model, cfg.sampler
    toy = d.dataset in TOY_DATASETS
    if toy and m.arch != "mlp":
        raise ConfigError(f"model.arch '{m.arch}' cannot model 2-D dataset '{d.dataset}'; set model.arch=mlp")
    if not toy and m.arch == "mlp":
        raise ConfigError(f"model.arch 'mlp' is for the 2-D toy sets; dataset '{d.dataset}' needs a conv arch")
    if m.arch == "wrn" and (m.depth < 10 or (m.depth - 4) % 6 != 0):
        raise ConfigError(f"model.depth for arch wrn is the total depth 6n+4 (JEM: 28), got {m.depth}")
    if m.arch in ("wrn", "mlp", "cnn", "resnet") and m.width < 1:
        raise ConfigError(f"model.width must be >= 1 for arch {m.arch}, got {m.width}")
    if cfg.objective.kind == "jem" and m.num_classes < 2:
        raise ConfigError("objective.kind=jem needs model.num_classes >= 2 (the classifier's logits)")
    if cfg.objective.kind == "jem" and m.conditional:
        raise ConfigError("objective.kind=jem uses the logits head directly; set model.conditional=false")
    _validate_estimator(cfg, toy)
    if m.conditional and m.num_classes < 2:
        raise ConfigError("model.conditional needs model.num_classes >= 2")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas}")
    if any(int(x) != x or x <= 0 for x in cfg.optim.decay_steps):
        raise ConfigError(f"optim.decay_steps must be positive integers, got {cfg.optim.decay_steps}")
    if d.noise_std_max and d.noise_std_max <= d.noise_std:
        raise ConfigError(f"data.noise_std_max ({d.noise_std_max}) must exceed data.noise_std ({d.noise_std}) "
                          "(or be 0: one noise std)")
    # The default noise_std is accepted and unused by the kinds whose noise follows from the step.
    if s.kind in ("langevin", "mala", "annealed") and s.noise_std not in (0.0, SamplerConfig.noise_std):
        raise ConfigError(f"sampler.noise_std is only used by kind=sgld; {s.kind}'s noise follows from step_size")
    if s.kind in ("mala", "annealed") and not (0.0 < s.step_size < math.inf):
        raise ConfigError(f"sampler.step_size must be a positive finite number for sampler.kind={s.kind}, "
                          f"got {s.step_size}")
    _check_noise_conditional(cfg)
    if d.dataset in ("shards", "folder", "cifar10", "cifar100", "npz") and not d.path:
        raise ConfigError(f"data.path is required for dataset '{d.dataset}'")
    if d.dataset == "folder" and not d.resolution:
        raise ConfigError("data.resolution is required for dataset 'folder' "
                          "(images are resized and centre-cropped to it)")
    if d.manifest and d.dataset != "shards":
        raise ConfigError(f"data.manifest is only read for dataset 'shards', not '{d.dataset}'")
    b = cfg.buffer
    if b.backend == "local" and (b.ray_address or b.shards or b.mixing != "random"):
        key = "buffer.ray_address" if b.ray_address else "buffer.shards" if b.shards else "buffer.mixing"
        raise ConfigError(f"{key} is only read with buffer.backend=ray")
    if b.ray_address and (b.ray_dashboard or b.ray_temp_dir):
        key = "buffer.ray_dashboard" if b.ray_dashboard else "buffer.ray_temp_dir"
        raise ConfigError(f"{key} only applies to the embedded Ray (buffer.ray_address=''); a cluster sets it at "
                          "'ray start'")
    if s.batch_size and cfg.objective.kind not in ("pcd", "jem"):
        raise ConfigError(f"sampler.batch_size is only read by objective.kind=pcd or jem, not {cfg.objective.kind!r}")
    chains = s.batch_size or d.batch_size
    if class_conditional_chains(cfg) and chains > d.batch_size:
        # Class-conditional chains take their labels from the data batch.
        raise ConfigError(f"sampler.batch_size ({chains}) must be <= data.batch_size ({d.batch_size}) when chains "
                          "are class-conditional (their labels come from the data batch)")
    if s.init == "buffer" and cfg.buffer.capacity < chains:
        key = "sampler.batch_size" if s.batch_size else "data.batch_size"
        raise ConfigError(f"buffer.capacity ({cfg.buffer.capacity}) must be >= {key} ({chains})")
    t = cfg.train
    if t.distributed == "ddp" and (t.zero_stage or t.deepspeed_config):
        key = "train.zero_stage" if t.zero_stage else "train.deepspeed_config"
        raise ConfigError(f"{key} is only read with train.distributed=deepspeed (or auto under a DeepSpeed launcher)")
    if t.compile == "true" and t.sampler_checkpointing:
        raise ConfigError("train.compile=true cannot run with train.sampler_checkpointing (its per-call patching "
                          "forces a recompile every call); set train.compile=auto or false")
    if cfg.optim.accumulate > 1 and cfg.objective.kind not in ("pcd", "jem"):
        raise ConfigError(f"optim.accumulate > 1 is only supported by objective.kind=pcd or jem, "
                          f"not {cfg.objective.kind!r}")
    if t.fid_every:
        if toy:
            raise ConfigError(f"train.fid_every needs an image dataset, not '{d.dataset}'")
        if not t.fid_ref_stats:
            raise ConfigError("train.fid_every needs train.fid_ref_stats (write it with `ebmscale eval ref-stats`)")
        if not os.path.isfile(t.fid_ref_stats):
            raise ConfigError(f"train.fid_ref_stats '{t.fid_ref_stats}' does not exist")
        if t.fid_weights and not os.path.isfile(t.fid_weights):
            raise ConfigError(f"train.fid_weights '{t.fid_weights}' does not exist")
        if (t.fid_init or s.init) == "buffer" and t.fid_samples > cfg.buffer.capacity:
            raise ConfigError(f"train.fid_samples ({t.fid_samples}) must be <= buffer.capacity "
                              f"({cfg.buffer.capacity}) with buffer starts (or set train.fid_init=noise)")
    bad = [n for n in (n.strip() for n in t.trackers.split(",")) if n and not n.replace("_", "").isalnum()]
    if bad:
        raise ConfigError(f"train.trackers must be comma-separated tracker names (e.g. tensorboard,wandb), got "
                          f"{bad[0]!r}")
    if t.deepspeed_config and not os.path.isfile(t.deepspeed_config):
        raise ConfigError(f"train.deepspeed_config '{t.deepspeed_config}' does not exist")


def _check_noise_conditional(cfg: Config) -> None:
    """objective.noise_conditional and sampler.kind=annealed: each needs the other's setting."""
    o, s = cfg.objective, cfg.sampler
    if o.kind == "lsd" and o.lsd_trace == "denoising" and not o.noise_conditional:
        raise ConfigError("objective.lsd_trace=denoising needs each example's noise: set objective.noise_conditional"
                          "=true (data.noise_std's noise is added before the objective sees it)")
    if o.noise_conditional:
        if o.kind not in ("dsm", "lsd"):
            raise ConfigError(f"objective.noise_conditional is read by objective.kind=dsm or lsd, not {o.kind}")
        if o.sigma_max <= o.sigma_min:
            raise ConfigError(f"objective.sigma_max ({o.sigma_max}) must exceed objective.sigma_min ({o.sigma_min})")
        if cfg.data.noise_std:
            raise ConfigError("objective.noise_conditional draws each example's noise itself (objective.sigma_min.."
                              "sigma_max); set data.noise_std=0")
    if (s.sigma_min or s.sigma_max) and s.kind != "annealed":
        raise ConfigError("sampler.sigma_min / sigma_max are read by sampler.kind=annealed only")
    if s.kind == "annealed":
        if not o.noise_conditional:
            raise ConfigError("sampler.kind=annealed samples a noise-conditional energy E(x)/sigma: set "
                              "objective.noise_conditional=true (objective.kind=dsm or lsd)")
        hi, lo = s.sigma_max or o.sigma_max, s.sigma_min or o.sigma_min
        if s.levels > 1 and hi <= lo:
            raise ConfigError(f"sampler.sigma_max ({hi}) must exceed sampler.sigma_min ({lo}) "
                              "(0 = objective.sigma_max / sigma_min)")
        # The default clip is accepted and unused, as the default noise_std is (above).
        if s.grad_clip not in (0.0, SamplerConfig.grad_clip):
            raise ConfigError("sampler.grad_clip is not used by kind=annealed (a clipped score is not the score); "
                              "set it to 0")


def _validate_estimator(cfg: Config, toy: bool) -> None:
    """Cross-field checks of the estimators beyond PCD/JEM (objective.kind cd ... ksd)."""
    o = cfg.objective
    if o.kl_weight > 0:
        if o.kind != "pcd":
            raise ConfigError(f"objective.kl_weight (improved CD's KL term) is read by objective.kind=pcd only, "
                              f"not {o.kind}")
        if cfg.sampler.kind == "mala" or cfg.sampler.steps < 1:
            raise ConfigError("objective.kl_weight differentiates through the last sampler step: it needs "
                              "sampler.kind sgld or langevin and sampler.steps >= 1")
        if cfg.train.distributed == "deepspeed":
            raise ConfigError("objective.kl_weight differentiates through input gradients, which is tested under DDP "
                              "only; set train.distributed=ddp")
        if cfg.train.precision == "fp16":
            raise ConfigError("objective.kl_weight's input gradients are not loss-scaled: set train.precision to "
                              "fp32 or bf16")
        if o.entropy_weight > 0 and cfg.sampler.init != "buffer":
            raise ConfigError("objective.entropy_weight > 0 with objective.kl_weight compares the chains with past "
                              "ones from the replay buffer: set sampler.init=buffer (or objective.entropy_weight=0)")
    if o.kind in ("pcd", "jem"):
        return
    if cfg.model.conditional:
        raise ConfigError(f"objective.kind={o.kind} trains an unconditional energy; set model.conditional=false")
    if cfg.train.precision == "fp16":
        raise ConfigError(f"objective.kind={o.kind} runs in fp32 or bf16 (its extra parameters and input "
                          "gradients are not loss-scaled); set train.precision")
    if o.kind == "lsd" and o.lsd_critic == "head" and cfg.model.arch not in LSD_CRITIC_ARCHS:
        raise ConfigError(f"objective.kind=lsd builds its critic from model.arch with a d-way output head; "
                          f"model.arch={cfg.model.arch} cannot take one (use one of {', '.join(LSD_CRITIC_ARCHS)}, "
                          "or objective.lsd_critic=unet)")
    if o.kind == "lsd" and o.lsd_critic_skip and o.lsd_trace != "denoising":
        raise ConfigError("objective.lsd_critic_skip needs objective.lsd_trace=denoising (a trace of the skip "
                          "would need the model's Hessian)")
    if o.kind == "lsd" and o.lsd_critic == "unet" and toy:
        raise ConfigError(f"objective.lsd_critic=unet is a per-pixel field for images; dataset '{cfg.data.dataset}' is "
                          "2-D (use objective.lsd_critic=head)")
    if o.kind in ("sm", "dsm", "ssm", "ksd", "lsd") and cfg.train.distributed == "deepspeed":
        raise ConfigError(f"objective.kind={o.kind} differentiates through input gradients, which is tested "
                          "under DDP only; set train.distributed=ddp")
    if o.kind == "sm" and not toy:
        raise ConfigError("objective.kind=sm costs one backward pass per input dimension; use dsm or ssm "
                          f"for dataset '{cfg.data.dataset}'")
    if o.kind == "dsm" and (not o.dsm_sigmas or any(s <= 0 for s in o.dsm_sigmas)):
        raise ConfigError(f"objective.dsm_sigmas must be a non-empty list of positive numbers, got {o.dsm_sigmas}")
    if o.kind == "nce" and o.nce_noise_ratio * cfg.data.batch_size < 1:
        raise ConfigError("objective.nce_noise_ratio * data.batch_size must give at least one noise sample")
    if o.kind == "ksd" and cfg.data.batch_size < 2:
        raise ConfigError("objective.kind=ksd is a U-statistic over pairs; data.batch_size must be >= 2")
