"""End-to-end CLI runs in subprocesses (real entry point, real files)."""
import json
import os

import pytest

from tests.conftest import REPO, run_cli

TINY = ["model.width=4", "model.depth=1", "data.batch_size=8", "sampler.steps=3", "buffer.capacity=64",
        "train.log_every=5", "train.sample_every=10", "train.checkpoint_every=10", "train.progress=false",
        "buffer.backend=local"]


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_20_steps_end_to_end_then_resume(tmp_path, cli_env):
    run = tmp_path / "run"
    r = run_cli(["train", "--run-dir", str(run), "train.steps=20", *TINY], cli_env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = _last_json(r.stdout)
    assert summary["steps"] == 20
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in lines] == [5, 10, 15, 20]
    for key in ("loss", "e_pos", "e_neg", "energy_gap", "grad_norm", "sampler_time", "buffer_time",
                "data_time", "step_time", "samples_per_s"):
        assert key in lines[-1]
    assert (run / "samples" / "final.png").stat().st_size > 100
    assert (run / "samples" / "step-0000010.png").exists()
    assert (run / "checkpoints" / "step-20" / "COMPLETE").exists() and (run / "config.yaml").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    # Resume continues from step 20 to 30 and appends, nothing repeated.
    r = run_cli(["train", "--run-dir", str(run), "--resume", "auto", "train.steps=30", *TINY], cli_env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30]


def test_dry_run_prints_resolved_config(tmp_path, cli_env):
    r = run_cli(["train", "--dry-run", "sampler.steps=7", "optim.lr=2e-4"], cli_env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "steps: 7" in r.stdout and "lr: 0.0002" in r.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, needle", [
    (["train", "--config", "missing.yaml"], "missing.yaml"),
    (["train", "model.nonsense=1"], "model.nonsense"),
    (["train", "optim.accumulate=0"], "optim.accumulate"),
    (["train", "data.dataset=npz", "data.path=/no/such/data.npz"], "/no/such/data.npz"),
    (["eval", "toy-nll", "--checkpoint", "/no/such/ckpt.pt"], "/no/such/ckpt.pt"),
    (["train", "sampler.kind=mala", "sampler.step_size=0"], "sampler.step_size"),
    (["train", "sampler.kind=hmc"], "sampler.kind"),
    (["train", "objective.kind=score_flow"], "objective.kind"),
    (["train", "objective.kind=lsd", "model.arch=igebm"], "model.arch"),
])
def test_bad_input_is_one_clear_line(tmp_path, cli_env, args, needle):
    r = run_cli(args, cli_env, tmp_path)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ebmscale: error:") and needle in err[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_config_keeps_existing_run_dir(tmp_path, cli_env):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    r = run_cli(["train", "--run-dir", str(run), "sampler.steps=-3"], cli_env, tmp_path)
    assert r.returncode == 2 and "sampler.steps" in r.stderr
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_info_prints_parameter_count(tmp_path, cli_env):
    r = run_cli(["info", "model.width=8"], cli_env, tmp_path)
    assert r.returncode == 0, r.stderr
    info = _last_json(r.stdout)
    assert info["parameters"] > 1000 and info["input_shape"] == [1, 28, 28]


def test_toy_train_then_eval_toy_nll(tmp_path, cli_env):
    run = tmp_path / "toy"
    r = run_cli(["train", "--config", "configs/toy_8gaussians.yaml", "--run-dir", str(run), "train.steps=20",
                 "data.toy_train_size=2000", "data.batch_size=128", "buffer.capacity=256", "buffer.backend=local",
                 "train.progress=false"], cli_env, REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(["eval", "toy-nll", "--checkpoint", str(run), "--grid", "128"], cli_env, REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    res = _last_json(r.stdout)
    for key in ("nll", "true_nll", "kde_nll", "gap", "kde_train_size", "log_z"):
        assert key in res
    assert res["kde_train_size"] == 2000 and abs(res["true_nll"] - 2.82) < 0.1
    assert res["gap"] == pytest.approx(res["nll"] - res["true_nll"])
    assert (run / "density.png").exists() and (run / "eval_toy_nll.json").exists()


def test_overrides_stand_anywhere_on_the_line(capsys):
    from ebmscale import cli

    parser = cli.build_parser()
    # The example: overrides before and after --resume.
    args = cli.parse_args(parser, ["train", "--run-dir", "R", "train.progress=false", "--resume", "auto",
                                   "train.steps=80"])
    assert (args.run_dir, args.resume, args.overrides) == ("R", "auto", ["train.progress=false", "train.steps=80"])
    args = cli.parse_args(parser, ["info", "a.b=1", "--config", "x.yaml", "c.d=2", "a.b=3"])
    assert (args.config, args.overrides) == ("x.yaml", ["a.b=1", "c.d=2", "a.b=3"])
    # Anything else that argparse does not know is still an error (exit 2), as are overrides
    # given to a command that takes none.
    for argv in (["train", "a.b=1", "--resume", "auto", "stray"], ["export", "--run", "R", "--out", "x.safetensors", "a=1"]):
        with pytest.raises(SystemExit) as exc:
            cli.parse_args(parser, argv)
        assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_overrides_after_options_reach_the_config(tmp_path, capsys):
    from ebmscale import cli

    assert cli.main(["train", "--run-dir", str(tmp_path), "train.progress=false", "--dry-run", "train.steps=80"]) == 0
    out = capsys.readouterr().out
    assert "steps: 80" in out and "progress: false" in out and str(tmp_path) in out
