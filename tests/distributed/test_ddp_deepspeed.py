"""DeepSpeed ZeRO-2 through accelerate: 2 gloo processes started by ``accelerate launch`` with
launch/accelerate/deepspeed_zero2.yaml (so the ZeRO template is launch/deepspeed/zero2.json and
``train.distributed=auto`` picks DeepSpeed from the launcher).

ZeRO-2 shards optimizer state and gradients but must train exactly what one process with the
global batch trains, keep the ranks' module weights identical, and leave the sampler free of
collectives (ZeRO-1/2 never partition the weights the sampler reads). The first run on a fresh
checkout JIT-compiles DeepSpeed's shared-memory op (about 30-120 s) into .cache/torch_extensions.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.dp_scenarios import launch, reference

TOL = 1e-6


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return launch("deepspeed", str(tmp_path_factory.mktemp("zero2")), "deepspeed_zero2.yaml")


def test_zero2_engine_from_the_accelerate_config(ranks):
    for r in ranks:
        assert r["wrapper"] == "DeepSpeedEngine" and r["parallel"].startswith("deepspeed ZeRO-2 x2 on cpu")
        assert r["param_dtype"] == "torch.float32"


def test_zero2_ranks_identical_no_sampler_collectives_and_equal_to_one_process(ranks, tmp_path_factory):
    r0, r1 = ranks
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert all(torch.equal(a, b) for a, b in zip(r0["sn_u"], r1["sn_u"]))
    assert r0["sampler_collectives"] == r1["sampler_collectives"] == 0
    ref = reference(str(tmp_path_factory.mktemp("ref")))
    for name, p in ref["params"].items():
        assert float((r0["params"][name] - p).abs().max()) < TOL, name
    for got, want in zip(r0["logged"], ref["logged"]):
        for k in ("loss", "e_pos", "e_neg", "grad_norm"):
            assert abs(got[k] - want[k]) < TOL * max(1.0, abs(want[k])), (k, got[k], want[k])


@pytest.fixture(scope="module")
def accumulating(tmp_path_factory) -> list[dict]:
    return launch("deepspeed_accumulate", str(tmp_path_factory.mktemp("zero2_accum")), "deepspeed_zero2.yaml")


def test_zero2_gradient_accumulation_matches_one_process_with_the_global_batch(accumulating, tmp_path_factory):
    # 2 ranks x gradient_accumulation_steps 2 x B/2 = 1 process x 2B.
    from tests.distributed.test_ddp import assert_matches_reference

    ref = reference(str(tmp_path_factory.mktemp("ref")))
    r0, r1 = accumulating
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    for r in accumulating:
        assert_matches_reference(r, ref)
