"""The estimators beyond PCD under DDP: 2 real gloo processes started by ``accelerate launch``
(scenario ``estimators`` of dp_scenarios.py).

Shown here: exact score matching, whose loss back-propagates through input gradients (double
backward through the DDP wrapper), gives on 2 ranks x batch B exactly the one-rank run at batch 2B;
NCE's log Z and the adversarial sampler (parameters outside the wrapped module, averaged by hand)
stay identical on every rank while each rank draws its own noise.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.dp_scenarios import NEW_OBJECTIVES, SM_EQUIV, launch, reference

TOL = 1e-6


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return launch("estimators", str(tmp_path_factory.mktemp("ddp_est")), "cpu_gloo.yaml")


def test_score_matching_two_ranks_match_one_rank_with_twice_the_batch(ranks, tmp_path_factory):
    ref = reference(str(tmp_path_factory.mktemp("ref_sm")), SM_EQUIV)
    moved = max(float((ref["params"][n] - ref["init"][n]).abs().max()) for n in ref["params"])
    assert moved > 1e-3, "the reference barely trained: the comparison would be vacuous"
    for r in ranks:
        eq = r["equiv_sm"]
        for name, p in ref["params"].items():
            assert float((eq["params"][name] - p).abs().max()) < TOL, name
        for got, want in zip(eq["logged"], ref["logged"]):
            assert abs(got["loss"] - want["loss"]) < TOL * max(1.0, abs(want["loss"]))


@pytest.mark.parametrize("name", list(NEW_OBJECTIVES))
def test_new_objectives_two_ranks_match_one_rank_with_twice_the_batch(ranks, tmp_path_factory, name):
    """MPF, KL contraction, LSD (critic included: its gradients are averaged by hand) and PCD with
    improved CD's KL term: 2 ranks x B equal 1 rank x 2B (each rank slices the global batch's noise)."""
    ref = reference(str(tmp_path_factory.mktemp(f"ref_{name}")), NEW_OBJECTIVES[name])
    moved = max(float((ref["params"][n] - ref["init"][n]).abs().max()) for n in ref["params"])
    assert moved > 1e-4, "the reference barely trained: the comparison would be vacuous"
    for r in ranks:
        eq = r[f"equiv_{name}"]
        for pname, p in ref["params"].items():
            assert float((eq["params"][pname] - p).abs().max()) < TOL, (name, pname)
        for got, want in zip(eq["logged"], ref["logged"]):
            assert abs(got["loss"] - want["loss"]) < TOL * max(1.0, abs(want["loss"])), name


def test_mala_runs_under_ddp_and_reports_the_global_acceptance(ranks):
    r0, r1 = ranks[0]["mala"], ranks[1]["mala"]
    assert r0["reduced"] == r1["reduced"] and 0 < r0["reduced"] <= 1
    # Reduced once per interval: the mean over both ranks and both steps (each rank draws its own chains).
    assert r0["reduced"] == pytest.approx(sum(r0["local"] + r1["local"]) / 4, rel=1e-9)
    assert r0["local"] != r1["local"]


@pytest.mark.parametrize("kind", ["nce", "adversarial"])
def test_extra_parameters_stay_identical_across_ranks(ranks, kind):
    r0, r1 = ranks[0][kind], ranks[1][kind]
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert r0["extra"] and all(torch.equal(v, r1["extra"][k]) for k, v in r0["extra"].items())
    assert not torch.allclose(r0["negatives"], r1["negatives"]), "each rank draws its own noise"
