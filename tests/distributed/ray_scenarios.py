"""The Ray-hosted buffer under ``accelerate launch`` (2 gloo ranks on CPU), embedded mode:

    accelerate launch --config_file launch/accelerate/cpu_gloo.yaml tests/distributed/ray_scenarios.py OUT_DIR [key=value ...]

Rank 0 starts a local Ray and passes its address to rank 1 over torch.distributed; both train
through ``train()``. At step 2 rank 1 writes marked chains back and rank 0 reads them from the
shards. Each rank writes ``OUT_DIR/rank<r>.json``. Not collected by pytest (no ``test_`` prefix).

The same check inside the real training CLI (the faults of ``tests.faults`` on top; each rank
writes ``OUT_DIR/cross<r>.json`` once step 2 is done, and rank 0 ``OUT_DIR/shards.json``, the
shards' :meth:`RayBuffer.shard_info`, before every later step)::

    accelerate launch ... tests/distributed/ray_scenarios.py --cli OUT_DIR [--hang step:N --go FILE] -- train ...
"""
from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":  # launched as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ebmscale.trainer as trainer_module  # noqa: E402
from ebmscale import dist  # noqa: E402
from ebmscale.config import load_config  # noqa: E402

CONFIG = ["data.dataset=8gaussians", "model.arch=mlp", "model.width=16", "model.depth=2", "data.toy_train_size=1000",
          "data.batch_size=16", "sampler.steps=3", "sampler.step_size=0.1", "sampler.noise_std=0.05",
          "buffer.backend=ray", "buffer.capacity=64", "buffer.reinit_prob=0.0", "train.steps=6", "train.log_every=3",
          "train.checkpoint_every=3", "train.sample_every=0", "train.progress=false", "train.tensorboard=false",
          "train.threads=1", "train.device=cpu"]
MARK = 0.375  # exactly representable, inside the toy box


class CrossRankTrainer(trainer_module.Trainer):
    """At step 2, rank 1 writes MARK into the slots it drew; rank 0 then reads those slots."""

    instances: list = []
    out = ""  # under the CLI (cli_main): where each rank writes cross<rank>.json after step 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cross: dict = {}
        CrossRankTrainer.instances.append(self)

    def train_step(self):
        if self.step == 2:
            x, handle = self.buffer.draw(8, None, np.random.default_rng(1234 + self.rank))
            if self.rank == 1:
                self.buffer.write_back(handle, np.full_like(x, MARK))
                self.buffer.flush()
            slots = dist.broadcast_object([(k, idx.tolist()) for k, _, idx, _ in handle], src=1)
            dist.barrier()
            session = dist.broadcast_object(self.buffer._session.temp_dir if self.rank == 0 else None, src=0)
            if session:  # embedded: every rank authenticates with the token in rank 0's session directory
                token = os.environ["RAY_AUTH_TOKEN_PATH"]
                self.cross["token"] = {"mode": os.stat(token).st_mode & 0o777, "in_session": token.startswith(session)}
            # Locality: the share of 4,000 starts served by a shard on this rank's node (mixing=affine
            # draws 1 - mix_fraction from this node's shards, the rest from any shard by size).
            nodes = [i["node"] for i in self.buffer.shard_info()]
            _, many = self.buffer.draw(4000, None, np.random.default_rng(99 + self.rank))
            here = self.buffer.node
            self.cross["local_share"] = sum(len(pos) for k, pos, _, _ in many if nodes[k] == here) / 4000
            self.cross["node"] = here
            if self.rank == 0:
                self.cross["shard_nodes"] = len(set(nodes))
                shards = self.buffer.state_dict()["shards"]
                self.cross |= {"seen": all(bool(np.all(shards[k]["data"][idx] == MARK)) for k, idx in slots),
                              "shards_touched": sorted({k for k, _ in slots}), "num_shards": len(shards)}
            if self.out:
                with open(os.path.join(self.out, f"cross{self.rank}.json"), "w") as fh:
                    json.dump(self.cross, fh)
        elif self.step > 2 and self.out and self.rank == 0:  # where the shards are now (node loss)
            with open(os.path.join(self.out, "shards.json"), "w") as fh:
                json.dump(self.buffer.shard_info(), fh)
        return super().train_step()


def main() -> None:
    torch.set_num_threads(1)
    out = sys.argv[1]
    trainer_module.Trainer = CrossRankTrainer  # train() builds this subclass
    cfg = load_config(None, [*CONFIG, *sys.argv[2:]])  # extra overrides, e.g. buffer.ray_address
    result = trainer_module.train(cfg, run_dir=os.path.join(out, "run"))
    tr = CrossRankTrainer.instances[0]
    import ray  # only to check that train() disconnected

    res = {"rank": dist.rank(), "world": dist.world_size(), "steps": result.steps, "cross": tr.cross,
           "ray_connected_after": ray.is_initialized(), "is_global": tr.buffer.is_global,
           "temp_dir": tr.buffer._session.temp_dir,
           "temp_dir_left": bool(tr.buffer._session.temp_dir and os.path.exists(tr.buffer._session.temp_dir))}
    with open(os.path.join(out, f"rank{dist.rank()}.json"), "w") as fh:
        json.dump(res, fh)
    dist.barrier()


def cli_main(argv: list[str]) -> int:
    """``--cli OUT_DIR [tests.faults options] -- <ebmscale args>``: ``ebmscale.cli`` with this trainer."""
    from tests import faults

    torch.set_num_threads(1)
    CrossRankTrainer.out = argv[0]
    trainer_module.Trainer = CrossRankTrainer  # the base the faults build on
    return faults.main(argv[1:])


if __name__ == "__main__":
    if sys.argv[1] == "--cli":
        sys.exit(cli_main(sys.argv[2:]))
    main()
