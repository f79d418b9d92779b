"""Data-parallel training with DDP: 2 real gloo processes started by ``accelerate launch`` with
launch/accelerate/cpu_gloo.yaml (one launch for the whole module; the scenarios are in
dp_scenarios.py).

Shown here: ranks stay identical (parameters and spectral-norm state) while drawing their own
noise and buffer samples; the sampler issues no collective at all (counted with the profiler,
which sees DDP's C++ reducer too -- the control run through the DDP wrapper does communicate);
2 ranks x batch B equal 1 rank x batch 2B on the same data and sampler noise, and so do 2 ranks
x 2 accumulated micro-batches of B/2 (which all-reduce once per step) and one rank x k
micro-batches; the logged metrics are the global ones; bf16 training learns a 2-D density; only rank 0 writes.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.distributed.dp_scenarios import PER_RANK_BATCH, STEPS, launch, reference, run_equivalence

TOL = 1e-6  # float32 summation order; measured differences are ~5e-8


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    return launch("ddp", str(out), "cpu_gloo.yaml") + [{"out": str(out)}]


def test_ranks_stay_identical_but_draw_their_own_randomness(ranks):
    r0, r1 = ranks[0], ranks[1]
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2) and r0["wrapper"] == "DistributedDataParallel"
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert len(r0["sn_u"]) == 4 and all(torch.equal(a, b) for a, b in zip(r0["sn_u"], r1["sn_u"]))
    # Per-rank streams: different chains and different buffer contents on each rank.
    assert not torch.allclose(r0["negatives"], r1["negatives"])
    assert not torch.equal(r0["buffer"], r1["buffer"])


def test_sampler_issues_no_collectives(ranks):
    for r in ranks[:2]:
        assert r["sampler_collectives"] == [0] * STEPS
        # The counter is live: a training step all-reduces the gradients and broadcasts the
        # spectral-norm buffers, and the same sampler through the DDP wrapper communicates.
        assert "c10d::allreduce_" in r["step_collectives"] and "c10d::broadcast_" in r["step_collectives"]
        assert r["wrapped_sampler_collectives"] >= 3


def assert_matches_reference(eq: dict, ref: dict) -> None:
    """``eq`` (one rank's equivalence run) trained what the one-process reference trained, to float32
    rounding, step by step in its logged (global) metrics."""
    moved = max(float((ref["params"][n] - ref["init"][n]).abs().max()) for n in ref["params"])
    assert moved > 1e-2, "the reference barely trained: the comparison would be vacuous"
    assert all(torch.equal(eq["init"][n], ref["init"][n]) for n in ref["init"]), "same initialisation"
    for name, p in ref["params"].items():
        assert float((eq["params"][name] - p).abs().max()) < TOL, name
    assert all(float((a - b).abs().max()) < TOL for a, b in zip(eq["sn_u"], ref["sn_u"]))
    # What each rank logs is the global value: the one-process run's, step by step.
    for step, (got, want) in enumerate(zip(eq["logged"], ref["logged"])):
        for k in ("loss", "e_pos", "e_neg", "grad_norm"):
            assert abs(got[k] - want[k]) < TOL * max(1.0, abs(want[k])), (step, k, got[k], want[k])
    assert eq["sampler_collectives"] == 0


def test_two_ranks_with_batch_b_match_one_rank_with_batch_2b(ranks, tmp_path_factory):
    ref = reference(str(tmp_path_factory.mktemp("ref")))
    for r in ranks[:2]:
        assert_matches_reference(r["equiv"], ref)


def test_accumulation_on_two_ranks_matches_one_rank_with_the_global_batch(ranks, tmp_path_factory):
    # 2 ranks x 2 micro-batches x B/2 = 1 rank x 2B, on the same data and chain noise (see
    # GlobalNoiseTrainer), spectral-norm state included (one power iteration per step).
    ref = reference(str(tmp_path_factory.mktemp("ref")))
    for r in ranks[:2]:
        assert_matches_reference(r["equiv_accum"], ref)


def test_accumulation_all_reduces_only_on_the_last_micro_batch(ranks):
    for r in ranks[:2]:
        one = r["step_collectives"].count("c10d::allreduce_")
        assert one >= 2  # the gradient bucket(s) and the divergence check
        assert r["accum_step_collectives"].count("c10d::allreduce_") == one, r["accum_step_collectives"]


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_in_one_process_matches_one_batch(k, tmp_path_factory):
    # k micro-batches of 2B/k = one batch of 2B (no launcher: a single process).
    ref = reference(str(tmp_path_factory.mktemp("ref")))
    eq = run_equivalence([f"optim.accumulate={k}"], 2 * PER_RANK_BATCH // k,
                         str(tmp_path_factory.mktemp(f"acc{k}")))
    assert_matches_reference(eq, ref)


def test_bf16_training_learns_a_2d_density_and_ranks_share_one_run_dir(ranks):
    out = ranks[2]["out"]
    learn = ranks[0]["learn"]
    assert learn["steps"] == 200 and ranks[1]["learn"]["steps"] == 200
    # Data scored lower than uniform points over the box (0.5 at initialisation) ...
    assert learn["auc"] > 0.8, learn
    # ... and the persistent chains moved from uniform noise towards the modes.
    assert learn["chain_nll_median"] < learn["uniform_nll_median"] - 3.0, learn
    assert ranks[0]["learn"]["last_metrics"] == ranks[1]["learn"]["last_metrics"], "metrics reduced before logging"
    run0 = os.path.join(out, "learn")
    # Rank 0 writes the run directory -- one report, one set of images, one event file -- and in a
    # checkpoint every rank writes its own part. run.lock stays behind, emptied (ebmscale.runguard).
    assert sorted(os.listdir(run0)) == ["checkpoints", "config.yaml", "metrics.jsonl", "report.html", "run.lock",
                                        "runtime.yaml", "samples", "tb"]
    assert sorted(os.listdir(os.path.join(run0, "samples"))) == [
        "buffer-step-0000100.png", "buffer-step-0000200.png", "final.png", "step-0000100.png", "step-0000200.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(os.listdir(os.path.join(run0, "tb"))) == 1
    acc = EventAccumulator(os.path.join(run0, "tb"), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    for tag in ("samples/negatives", "samples/buffer"):
        assert [e.step for e in acc.Images(tag)] == [100, 200], tag
    for tag in ("energy/positive", "energy/negative", "energy/buffer"):
        assert [e.step for e in acc.Histograms(tag)] == [100, 200], tag
    # Buffer health of the two ranks' local buffers, reduced like every metric (same on both ranks).
    health = ranks[0]["learn"]["last_metrics"]
    assert health["buffer_age_max"] > 0 and 0 < health["buffer_fill"] <= 1 and health["buffer_diversity"] > 0
    with open(os.path.join(run0, "report.html")) as fh:
        assert "buffer_age_mean" in fh.read()
    assert sorted(os.listdir(os.path.join(run0, "checkpoints", "step-200"))) == [
        "COMPLETE", "rank-00000.pt", "rank-00001.pt", "shared.pt"]
    with open(os.path.join(run0, "metrics.jsonl")) as fh:
        assert [json.loads(line)["step"] for line in fh] == [50, 100, 150, 200]
