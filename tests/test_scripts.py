"""Every training script as a user runs it: kill and resume, torchrun, the NaN guard, bad input, --help.

Parametrised over the scripts present; each script's tiny configuration is in conftest.TINY_ARGS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ARCH_CHANGE, ROOT, TINY_ARGS, run_script, run_torchrun, script_env

SCRIPTS = [s for s in TINY_ARGS if (ROOT / s).exists()]
per_script = pytest.mark.parametrize("script", SCRIPTS)


def base(script):
    return [*TINY_ARGS[script], "--batch-size", "8", "--epochs", "3", "--checkpoint-every", "2", "--log-every", "1"]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _scalar_steps(run_dir, tag="losses/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@per_script
def test_killed_run_resumes_bit_identical(tmp_path, script):
    args = [*base(script), "--max-steps", "9", "--num-workers", "2", "--deterministic"]
    run_script(script, *args, "--run-name", "straight", cwd=tmp_path)
    cmd = [sys.executable, str(ROOT / script), *args, "--run-name", "killed"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:   # kill it hard between checkpoints (every 2 steps), after step 5
        if " step 5/" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = tmp_path / "runs" / "killed"
    assert _load(killed / "checkpoint.pt")["step"] in (4, 5)
    assert not (killed / "backbone.pt").exists()
    out = run_script(script, *args, "--run-name", "killed", cwd=tmp_path).stdout   # the same command
    assert "resuming at step" in out
    a, b = _load(tmp_path / "runs" / "straight" / "checkpoint.pt"), _load(killed / "checkpoint.pt")
    assert a["step"] == b["step"] == 9
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["optimizer"]["state"][0]["momentum_buffer"], b["optimizer"]["state"][0]["momentum_buffer"])
    steps = _scalar_steps(killed)   # TensorBoard continues without duplicate points
    assert steps == sorted(set(steps)) and steps[-1] == 9
    assert (killed / "backbone.pt").exists()


@per_script
def test_finished_run_reruns_as_a_no_op_and_refuses_changed_flags(tmp_path, script):
    args = [*base(script), "--max-steps", "2", "--num-workers", "0", "--run-name", "r"]
    run_script(script, *args, cwd=tmp_path)
    ckpt = tmp_path / "runs" / "r" / "checkpoint.pt"
    before = ckpt.read_bytes()
    out = run_script(script, *args, cwd=tmp_path).stdout
    assert "resuming at step 2 of 2" in out
    change, words = ARCH_CHANGE[script]
    proc = run_script(script, *args, *change, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and words in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and ckpt.read_bytes() == before


@per_script
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, script):
    env = script_env()
    env["SSL_IMBALANCE_INJECT_NAN_AT_STEP"] = "3"
    args = [*base(script), "--max-steps", "6", "--num-workers", "0", "--run-name", "nan", "--log-every", "5"]
    proc = run_script(script, *args, cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2
    assert "non-finite loss at step 3" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    ckpt = _load(tmp_path / "runs" / "nan" / "checkpoint.pt")
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "runs" / "nan" / "backbone.pt").exists()


@per_script
def test_torchrun_two_processes_gloo(tmp_path, script):
    out = run_torchrun(script, *base(script), "--batch-size", "4", "--max-steps", "3", "--num-workers", "0",
                       "--run-name", "ddp", cwd=tmp_path).stdout
    assert "global batch 8 on 2 x cpu" in out
    ckpt = _load(tmp_path / "runs" / "ddp" / "checkpoint.pt")
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert (tmp_path / "runs" / "ddp" / "backbone.pt").exists()


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--batch-size", "1000"], "exceeds the 72 training images"),
    (["--imbalance-ratio", "0.5"], "--imbalance-ratio must be >= 1"),
    (["--dataset", "cifar10", "--data-dir", "nowhere", "--no-download"], "use --dataset synthetic"),
    (["--output-dir", "afile"], "cannot write to the run folder"),
    (["--sync-bn"], "--sync-bn needs CUDA"),
])
@per_script
def test_bad_input_one_clear_line(tmp_path, script, extra, message):
    (tmp_path / "afile").write_text("a file, not a folder")
    proc = run_script(script, *base(script), "--max-steps", "1", "--num-workers", "0", *extra, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@per_script
def test_unknown_dataset_is_refused_by_the_parser(tmp_path, script):
    proc = run_script(script, "--dataset", "mnist", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "mnist" in proc.stderr


@per_script
def test_help_explains_every_flag(tmp_path, script):
    out = run_script(script, "--help", cwd=tmp_path).stdout
    for flag in ("--dataset", "--data-dir", "--split-file", "--imbalance-ratio", "--imbalance-profile",
                 "--balanced-twin", "--image-size", "--epochs", "--max-steps", "--batch-size", "--lr", "--seed",
                 "--amp", "--num-workers", "--run-name", "--sampling"):
        assert flag in out
