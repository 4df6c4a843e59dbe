"""Every training script as a user runs it: kill and resume, torchrun, the NaN guard, bad input, --help.

Parametrised over the scripts present; each script's tiny configuration is in conftest.TINY_ARGS.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
import torch

import linear_probe
import lt_data
from conftest import ARCH_CHANGE, HANG_GUARD, ROOT, TINY_ARGS, run_script, run_torchrun, script_env

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
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in proc.stdout:  # kill it hard between checkpoints (every 2 steps), after step 5
        if " step 5/" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = tmp_path / "runs" / "killed"
    assert _load(killed / "checkpoint.pt")["step"] in (4, 5)
    assert not (killed / "backbone.pt").exists()
    out = run_script(script, *args, "--run-name", "killed", cwd=tmp_path).stdout  # the same command
    assert "resuming at step" in out
    a, b = _load(tmp_path / "runs" / "straight" / "checkpoint.pt"), _load(killed / "checkpoint.pt")
    assert a["step"] == b["step"] == 9
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"][0].items():  # momentum buffer (SGD), exp_avg / exp_avg_sq / step (AdamW)
        assert torch.equal(v, b["optimizer"]["state"][0][k]), k
    steps = _scalar_steps(killed)  # TensorBoard continues without duplicate or missing points
    assert steps == list(range(1, 10))
    assert (killed / "backbone.pt").exists()


def test_resume_keeps_every_tensorboard_point(tmp_path):
    """The writer used to purge from the checkpoint step itself, which a resumed run never logs again."""
    script = "supervised_baseline.py"  # the shared runtime's resume path
    args = [
        *TINY_ARGS[script],
        "--batch-size",
        "8",
        "--log-every",
        "1",
        "--checkpoint-every",
        "2",
        "--num-workers",
        "0",
        "--run-name",
        "tb",
    ]
    run_script(script, *args, "--max-steps", "4", cwd=tmp_path)
    run_script(script, *args, "--max-steps", "6", cwd=tmp_path)
    assert _scalar_steps(tmp_path / "runs" / "tb") == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("signum,to_group", [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGHUP, True)])
def test_interrupted_run_saves_a_checkpoint_and_says_how_to_resume(tmp_path, signum, to_group):
    """SIGTERM (to the process) or Ctrl-C (SIGINT to the whole process group, DataLoader workers included) used to
    end in a 20-line traceback: now a checkpoint at the current step, one line, exit 128 + signal, and the same
    command resumes from it."""
    script = "supervised_baseline.py"  # the shared runtime's loop
    args = [*base(script), "--epochs", "6", "--checkpoint-every", "100", "--num-workers", "1", "--run-name", "i"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=tmp_path,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in proc.stdout:
        if " step 3/" in line:
            os.killpg(proc.pid, signum) if to_group else proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 128 + signum, out + err
    assert "Traceback" not in err and err.strip() == "", err
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"interrupted at step (\d+); checkpoint saved; run the same command to resume", last)
    assert m, last
    step = int(m.group(1))
    assert 3 <= step < 54 and _load(tmp_path / "runs" / "i" / "checkpoint.pt")["step"] == step
    assert not (tmp_path / "runs" / "i" / "backbone.pt").exists()
    out = run_script(script, *args, cwd=tmp_path).stdout  # the same command
    assert f"resuming at step {step} of 54" in out and "done: step 54" in out


def test_first_progress_line_comes_after_the_first_step(tmp_path):
    script = "supervised_baseline.py"  # the shared runtime's loop
    out = run_script(
        script,
        *TINY_ARGS[script],
        "--batch-size",
        "8",
        "--log-every",
        "50",
        "--max-steps",
        "3",
        "--num-workers",
        "0",
        cwd=tmp_path,
    ).stdout
    assert " step 1/" in out and " step 2/" not in out and " step 3/" in out


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
    args = [*base(script), "--max-steps", "6", "--num-workers", "0", "--run-name", "nan", "--log-every", "5"]
    proc = run_script(script, *args, cwd=tmp_path, check=False, seams=("--inject-nan-at-step", "3"))
    assert proc.returncode == 2
    assert "non-finite loss at step 3" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "the last good checkpoint" in proc.stderr and "(step 2) is untouched" in proc.stderr
    ckpt = _load(tmp_path / "runs" / "nan" / "checkpoint.pt")
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "runs" / "nan" / "backbone.pt").exists()


def test_a_non_finite_loss_on_the_last_step_of_an_epoch_is_reported_in_that_epoch(tmp_path):
    """Steps count from 1, so step k x steps-per-epoch ends epoch k (the message named epoch k + 1)."""
    script, args = (
        "supervised_baseline.py",
        [*base("supervised_baseline.py"), "--num-workers", "0", "--eval-every", "0"],
    )
    first = run_script(script, *args, "--max-steps", "1", "--run-name", "one", cwd=tmp_path).stdout
    per_epoch = int(re.search(r"(\d+) steps/epoch", first).group(1))
    seams = ("--inject-nan-at-step", str(per_epoch))
    proc = run_script(script, *args, "--run-name", "nan", cwd=tmp_path, check=False, seams=seams)
    assert proc.returncode == 2 and f"non-finite loss at step {per_epoch} (epoch 1);" in proc.stderr, proc.stderr


@per_script
def test_non_finite_weights_are_never_checkpointed(tmp_path, script):
    """--lr 1e45 gives a finite loss at step 1 but infinite weights after its update: that state used to be saved
    as checkpoint.pt of step 1 and called "the last good checkpoint". Now the save is refused, nothing is written
    and the message says so."""
    args = [
        *base(script),
        "--amp",
        "none",
        "--lr",
        "1e45",
        "--checkpoint-every",
        "1",
        "--log-every",
        "1",
        "--max-steps",
        "4",
        "--num-workers",
        "0",
        "--run-name",
        "inf",
    ]
    proc = run_script(script, *args, cwd=tmp_path, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stdout + proc.stderr
    assert "non-finite weights after step 1" in err[0] and "no checkpoint was written" in err[0]
    assert not (tmp_path / "runs" / "inf" / "checkpoint.pt").exists()
    assert not (tmp_path / "runs" / "inf" / "backbone.pt").exists()


@pytest.mark.parametrize(
    "before,after", [("--channels-last", "--no-channels-last"), ("--no-channels-last", "--channels-last")]
)
def test_resume_with_another_memory_format_keeps_the_sgd_update_exact(tmp_path, before, after):
    """--channels-last may change on resume: the momentum buffers used to keep the saved layout while the weights
    took the new one, and the fused SGD kernel paired them element by element in memory order. The resumed
    step must satisfy w_new = w_old - lr * momentum_buffer (SGD, no Nesterov; the buffer includes weight decay)."""
    script = "supervised_baseline.py"  # the shared runtime's resume path
    args = [*base(script), "--amp", "none", "--num-workers", "0", "--run-name", "m"]
    run_script(script, *args, before, "--max-steps", "2", cwd=tmp_path)
    old = _load(tmp_path / "runs" / "m" / "checkpoint.pt")
    run_script(script, *args, after, "--max-steps", "3", cwd=tmp_path)
    new = _load(tmp_path / "runs" / "m" / "checkpoint.pt")
    assert (old["step"], new["step"]) == (2, 3)
    module = _import_script(script)
    model = module.Model(module.Args(**old["args"]), lt_data.build_data(module.Args(**old["args"])))
    names = [n for n, p in model.named_parameters() if p.ndim > 1] + [
        n for n, p in model.named_parameters() if p.ndim <= 1
    ]  # the optimizer's parameter order
    checked = 0
    for group in new["optimizer"]["param_groups"]:  # the lr of the last step taken, the resumed one
        for i in group["params"]:
            w_old, w_new = old["model"][names[i]], new["model"][names[i]]
            step = group["lr"] * new["optimizer"]["state"][i]["momentum_buffer"]
            # 1e-3 of the update, above fp32 rounding of the weights (a wrong pairing is off by ~100%)
            err = (w_old - w_new - step).norm() - 2**-23 * w_old.norm()
            assert err <= 1e-3 * step.norm(), (names[i], float(err / step.norm()))
            checked += w_old.ndim == 4
    assert checked >= 10  # the convolutions, whose layout channels-last changes


@per_script
def test_torchrun_two_processes_gloo(tmp_path, script):
    out = run_torchrun(
        script,
        *base(script),
        "--batch-size",
        "4",
        "--max-steps",
        "3",
        "--num-workers",
        "0",
        "--run-name",
        "ddp",
        cwd=tmp_path,
        seams=("--record-draws", str(tmp_path / "draws.txt")),
    ).stdout
    assert "global batch 8 on 2 x cpu" in out
    ckpt = _load(tmp_path / "runs" / "ddp" / "checkpoint.pt")
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    draws = [line.split() for line in (tmp_path / "draws.txt").read_text().splitlines()]
    assert sorted((rank, step) for rank, step, _ in draws) == [(r, s) for r in "01" for s in "012"]
    assert len({x for _, _, x in draws}) == 6  # ranks draw different masks and noise, and so does every step
    assert (tmp_path / "runs" / "ddp" / "backbone.pt").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--batch-size", "0"], "--batch-size must be >= "),
        (["--batch-size", "1000"], "exceeds the 72 training images"),
        (["--imbalance-ratio", "0.5"], "--imbalance-ratio must be >= 1"),
        (["--dataset", "cifar10", "--data-dir", "nowhere", "--no-download"], "use --dataset synthetic"),
        (["--output-dir", "afile"], "cannot write to the run folder"),
        (["--sync-bn"], "--sync-bn needs CUDA"),
        (["--seed=-1"], "--seed must be in [0, 4294967296), got -1"),
        (["--seed", str(2**63)], "--seed must be in [0, 4294967296), got 9223372036854775808"),
        (["--dataset", "imagenet-lt", "--data-dir", ".", "--split-file", "lt_train.txt"], "listed images not found"),
    ],
)
@per_script
def test_bad_input_one_clear_line(tmp_path, script, extra, message):
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "lt_train.txt").write_text("train/n01/missing.png 0\n")
    (tmp_path / "lt_test.txt").write_text("val/n01/missing.png 0\n")
    proc = run_script(
        script, *base(script), "--max-steps", "1", "--num-workers", "0", *extra, cwd=tmp_path, check=False
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def _float_flags(module) -> list[tuple[str, int]]:
    """Every float-valued flag of a script (its own, the shared and the data flags): (name, number of values)."""
    return [
        (f.name, 2 if str(f.type).startswith("tuple") else 1)
        for f in dataclasses.fields(module.Args)
        if "float" in str(f.type)
    ]


@pytest.mark.parametrize("value", ["nan", "inf"])
@per_script
def test_every_float_flag_refuses_non_finite_values_before_writing_anything(
    tmp_path, monkeypatch, capsys, script, value
):
    """`--lr nan` used to train to NaN weights (or die in a traceback): each float flag is refused in one line
    naming it, with exit code 2, and no run folder is created. In-process: about 30 flags x 4 scripts."""
    module = _import_script(script)
    monkeypatch.chdir(tmp_path)
    flags = _float_flags(module)
    assert {"lr", "imbalance_ratio"} <= {n for n, _ in flags}
    for name, count in flags:
        flag = "--" + name.replace("_", "-")
        monkeypatch.setattr(
            sys, "argv", [script, *base(script), "--max-steps", "1", "--num-workers", "0", flag, *[value] * count]
        )
        with pytest.raises(SystemExit) as exit_:
            module.main()
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and f" {flag} " in f" {err[0]} ", (flag, err)
        assert not (tmp_path / "runs").exists(), flag


@per_script
def test_a_failed_start_leaves_nothing_behind(tmp_path, script):
    """A failed CIFAR download used to leave an empty run folder and create the missing data folder."""
    env = {
        **script_env(),
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
    }  # offline, deterministically
    (tmp_path / "empty").mkdir()
    for data_dir in ("no_such_dir/sub", "empty"):
        proc = run_script(
            script,
            "--dataset",
            "cifar10",
            "--data-dir",
            data_dir,
            "--num-workers",
            "0",
            cwd=tmp_path,
            env=env,
            check=False,
        )
        assert proc.returncode == 2 and "the download failed" in proc.stderr, proc.stdout + proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["empty"] and os.listdir(tmp_path / "empty") == []


@per_script
def test_a_truncated_image_stops_the_run_in_one_line_naming_it(tmp_path, script):
    """A JPEG cut in half used to end the run with exit 1 and two anonymous tracebacks (from the DataLoader
    worker): now exit 2 and one line naming the file."""
    from test_lt_data import _write_tree, truncated_jpeg

    _write_tree(tmp_path / "d", "train", [12, 12])
    _write_tree(tmp_path / "d", "val", [1, 1])
    bad = tmp_path / "d" / "train" / "n0001" / "img3.jpg"
    (tmp_path / "d" / "train" / "n0001" / "img3.png").unlink()
    truncated_jpeg(bad)
    proc = run_script(
        script,
        *base(script),
        "--dataset",
        "imagefolder",
        "--data-dir",
        "d",
        "--imbalance-ratio",
        "1",
        "--max-steps",
        "3",
        "--num-workers",
        "1",
        cwd=tmp_path,
        check=False,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stdout + proc.stderr
    assert f"cannot read image {os.path.join('d', 'train', 'n0001', 'img3.jpg')}: " in err[0]
    assert "truncated" in err[0].lower()


@per_script
def test_batch_size_one_trains_or_is_refused_in_one_line(tmp_path, script):
    """BatchNorm in train mode refuses a batch of one: a method whose heads would see one row per process says so
    up front (simsiam's projector, MSN's target head) instead of a ValueError traceback; the others train."""
    proc = run_script(
        script,
        *TINY_ARGS[script],
        "--batch-size",
        "1",
        "--max-steps",
        "1",
        "--num-workers",
        "0",
        cwd=tmp_path,
        check=False,
    )
    if script in ("simsiam_rwsam.py", "msn_prior.py"):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].endswith("BatchNorm needs 2 images per process), got 1")
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
    else:
        assert proc.returncode == 0 and "done: step 1" in proc.stdout, proc.stderr


@per_script
def test_unknown_dataset_is_refused_by_the_parser(tmp_path, script):
    proc = run_script(script, "--dataset", "mnist", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "mnist" in proc.stderr


@pytest.mark.parametrize("script", [*SCRIPTS, "linear_probe.py", "lt_data.py"])
def test_help_breaks_lines_only_where_the_terminal_is_full(tmp_path, script):
    """--help at 200 columns: a flag's help is one paragraph, wrapped only where the next word would not fit. tyro
    1.0.17 kept every source line break of a multi-line attribute docstring ("imagenet-lt (split" / "files over an
    image root)"); lt_data.help_from_docstrings hands tyro the reflowed text."""
    env = {**script_env(), "COLUMNS": "200"}
    out = run_script(script, "--help", cwd=tmp_path, env=env).stdout
    boxed = [line for line in out.splitlines() if line.startswith("│") and line.rstrip().endswith("│")]
    assert boxed, out
    flags, width = 0, len(boxed[0]) - 4  # "│ " ... " │": the room inside the box
    for i, line in enumerate(boxed):
        text = line[1:-1].rstrip()
        if not text.startswith(" -"):  # a flag's entry: its line, then its help indented below (or beside it)
            continue
        flags += 1
        help_lines = []
        for later in boxed[i + 1 :]:
            body = later[1:-1].rstrip()
            if not body.strip() or body.startswith(" -") or not body.startswith("   "):
                break
            help_lines.append(body)
        indent = len(help_lines[0]) - len(help_lines[0].lstrip()) if help_lines else 0
        if help_lines and len(text) > indent and text[indent - 1] == " " and text[indent] != " ":
            help_lines.insert(0, text)  # the compact layout: the help starts beside the flag
        for first, second in zip(help_lines, help_lines[1:]):
            # a wrap: the next word would have overflowed the line (10 columns of slack for the box's padding)
            assert len(first) + 1 + len(second.split()[0]) > width - 10, (
                f"{script}: {text.split()[0]} breaks mid-sentence at {first.strip()[-40:]!r} / {second.strip()[:40]!r}"
            )
    assert flags >= 10, out


@per_script
def test_help_explains_every_flag(tmp_path, script):
    out = run_script(script, "--help", cwd=tmp_path).stdout
    assert "{None," not in out  # MSN's --sinkhorn offered None next to off
    for flag in ("--image-size", "--imbalance-ratio") + (("--lr", "--weight-decay") if script == "excb.py" else ()):
        text = re.sub(r"[\s│]+", " ", out.split(flag + " ", 1)[1].split("\n --", 1)[0])
        assert "(default: None)" not in text.split(" --")[0], flag  # the rule resolved at run time instead
    for flag in (
        "--dataset",
        "--data-dir",
        "--split-file",
        "--imbalance-ratio",
        "--imbalance-profile",
        "--balanced-twin",
        "--image-size",
        "--epochs",
        "--max-steps",
        "--batch-size",
        "--lr",
        "--seed",
        "--amp",
        "--num-workers",
        "--run-name",
        "--sampling",
    ):
        assert flag in out


def test_hyperparameter_table_records_the_resolved_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script = "supervised_baseline.py"  # the shared Logger
    run_script(
        script,
        "--dataset",
        "synthetic",
        "--synthetic-classes",
        "4",
        "--synthetic-per-class",
        "8",
        "--synthetic-test-per-class",
        "2",
        "--batch-size",
        "4",
        "--max-steps",
        "1",
        "--num-workers",
        "0",
        "--run-name",
        "h",
        cwd=tmp_path,
    )
    acc = EventAccumulator(str(tmp_path / "runs" / "h"), size_guidance={"tensors": 0})
    acc.Reload()
    table = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "|image_size|32|" in table and "|imbalance_ratio|100.0|" in table and "|backbone.cifar_stem|True|" in table
    assert "None" not in table.split("|image_size|")[1].split("\n")[0]


@per_script
def test_ddp_step_matches_one_process_at_twice_the_batch(tmp_path, script):
    """2 processes x B == 1 process x 2B after one step, to float tolerance. BatchNorm is switched to its
    running statistics (a test seam, tests/seams.py): per-process BatchNorm batch statistics are the one legitimate
    difference (README), everything else that depends on the batch must be global."""
    seams = ("--bn-running-stats",)
    args = [*TINY_ARGS[script], "--max-steps", "1", "--num-workers", "0", "--amp", "none"]
    two = run_torchrun(script, *args, "--batch-size", "8", "--run-name", "two", cwd=tmp_path, seams=seams)
    one = run_script(script, *args, "--batch-size", "16", "--run-name", "one", cwd=tmp_path, seams=seams)
    # the kNN monitor before training: each process embeds half the images, the features are all-gathered
    before = [re.search(r"before training \| knn_top1 ([0-9.]+)", p.stdout).group(1) for p in (two, one)]
    assert before[0] == before[1], before
    one, two = _load(tmp_path / "runs" / "one" / "checkpoint.pt"), _load(tmp_path / "runs" / "two" / "checkpoint.pt")
    for k, v in one["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(two["model"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@per_script
def test_knn_monitor_and_view_grid_reach_tensorboard(tmp_path, script):
    """eval/knn_top1 before training, at the end of every --eval-every epoch and at the last step, on the progress
    line too; one grid of augmented views at the first step; --eval-every 0 turns the monitor off."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [*TINY_ARGS[script], "--batch-size", "8", "--epochs", "3", "--num-workers", "0", "--log-every", "100"]
    out = run_script(script, *args, "--max-steps", "20", "--eval-every", "2", "--run-name", "m", cwd=tmp_path).stdout
    per_epoch = int(re.search(r"(\d+) steps/epoch", out).group(1))
    acc = EventAccumulator(str(tmp_path / "runs" / "m"), size_guidance={"images": 0})
    acc.Reload()
    knn = acc.Scalars("eval/knn_top1")
    assert 2 * per_epoch < 20 < 3 * per_epoch  # epoch 2 ends before step 20; the run stops in epoch 3
    assert [e.step for e in knn] == [0, 2 * per_epoch, 20]
    assert all(0 <= e.value <= 100 for e in knn) and out.count("knn_top1") == len(knn)
    (grid,) = acc.Images("views/augmented")
    assert grid.step == 0 and grid.width > 0
    off = run_script(script, *args, "--max-steps", "2", "--eval-every", "0", "--run-name", "off", cwd=tmp_path).stdout
    assert "knn_top1" not in off


def _import_script(script):
    spec = importlib.util.spec_from_file_location(script[:-3], ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@per_script
def test_export_loads_strict_into_torchvision_and_gives_the_training_features(tmp_path, script):
    run_script(script, *base(script), "--max-steps", "2", "--num-workers", "0", "--run-name", "e", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "e"
    ckpt, export = _load(run_dir / "checkpoint.pt"), _load(run_dir / "backbone.pt")
    module = _import_script(script)
    args = module.Args(**ckpt["args"])
    model = module.Model(args, lt_data.build_data(args))
    model.load_state_dict(ckpt["model"])
    trained = functools.reduce(getattr, model.export_prefix.rstrip(".").split("."), model)
    meta = export["backbone"]
    plain = linear_probe.build_backbone(meta["arch"], **meta["arch_kwargs"])  # as the probe rebuilds it
    plain.load_state_dict(export["state_dict"], strict=True)
    from_ckpt, _ = linear_probe.load_backbone(str(run_dir / "checkpoint.pt"))  # the probe takes either file
    x = torch.randn(4, 3, 16, 16)
    for m in (trained, plain, from_ckpt):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), trained(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_ckpt(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["corrupted", "pickled_object"])
def test_resume_refuses_an_unsafe_or_corrupted_checkpoint(tmp_path, case):
    script = "supervised_baseline.py"  # the shared runtime's resume path, the same text in every script
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    if case == "corrupted":
        (run_dir / "checkpoint.pt").write_bytes(b"\x00not a checkpoint" * 20)
    else:
        torch.save({"format": linear_probe.CHECKPOINT_FORMAT, "payload": _Pickled()}, run_dir / "checkpoint.pt")
    before = (run_dir / "checkpoint.pt").read_bytes()
    proc = run_script(
        script, *base(script), "--max-steps", "1", "--num-workers", "0", "--run-name", "x", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2 and "cannot resume" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    if case == "pickled_object":
        assert "Weights only load failed" in proc.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == before


class _Pickled:
    """An arbitrary Python object: weights_only=True must refuse to unpickle it."""


def test_every_torch_load_is_weights_only():
    for path in sorted(ROOT.glob("*.py")):
        for call in re.findall(r"torch\.load\((.*)", path.read_text()):
            assert "weights_only=True" in call, f"{path.name}: torch.load({call}"


def test_atomic_save_never_leaves_a_half_written_file(tmp_path):
    module = _import_script("supervised_baseline.py")
    target = tmp_path / "checkpoint.pt"
    module.atomic_save({"step": 1}, str(target))
    with pytest.raises(Exception):  # noqa: B017 (whatever torch.save raises for an object it cannot pickle)
        module.atomic_save({"bad": _Unpicklable()}, str(target))  # fails half-way through writing
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")


def test_train_steps_sets_the_epochs_from_the_data_size(tmp_path):
    """--train-steps N: the fewest whole epochs with >= N steps (9 steps/epoch here: N = 20 -> 3 epochs, 27 steps),
    recorded in the checkpoint so the same command resumes."""
    args = [
        *TINY_ARGS["supervised_baseline.py"],
        "--batch-size",
        "8",
        "--train-steps",
        "20",
        "--num-workers",
        "0",
        "--eval-every",
        "0",
        "--run-name",
        "t",
    ]
    out = run_script("supervised_baseline.py", *args, "--max-steps", "2", cwd=tmp_path).stdout
    assert "9 steps/epoch, 2 steps of the schedules' 27 (--max-steps)" in out and "step 2/2" in out
    assert _load(tmp_path / "runs" / "t" / "checkpoint.pt")["args"]["epochs"] == 3
    out = run_script("supervised_baseline.py", *args, "--max-steps", "4", cwd=tmp_path).stdout
    assert "resuming at step 2 of 4 of the schedules' 27" in out and "step 4/4" in out


@per_script
@pytest.mark.parametrize("amp", ["bf16", "fp16", None])
def test_amp_choice_is_printed_first_stored_and_trains(tmp_path, script, amp):
    """--amp bf16 and fp16 (with its GradScaler) train on the CPU; the default, auto, resolves to the device's
    native dtype: printed in the run's first line and stored (resolved) in the checkpoint, so a resume compares
    like with like."""
    module = _import_script(script)
    expected = amp or module.resolve_amp("auto", torch.device("cpu"))
    args = [
        *TINY_ARGS[script],
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "--eval-every",
        "0",
        "--run-name",
        "a",
        *(["--amp", amp] if amp else []),
    ]
    out = run_script(script, *args, "--max-steps", "2", cwd=tmp_path).stdout
    first = out.splitlines()[0]
    assert f", amp {expected}{'' if amp else ' (--amp auto)'} -> " in first, first
    ckpt = _load(tmp_path / "runs" / "a" / "checkpoint.pt")
    assert ckpt["args"]["amp"] == expected and ckpt["step"] == 2
    assert bool(ckpt["scaler"]) == (expected == "fp16")  # the GradScaler runs with fp16 only
    again = run_script(script, *args, "--max-steps", "3", cwd=tmp_path).stdout  # the same command resumes
    assert "resuming at step 2" in again and "done: step 3" in again


def test_resolve_amp_picks_the_native_dtype_per_device(monkeypatch):
    """bf16 on CUDA GPUs with bf16, fp16 on older ones; on x86 CPUs bf16 only with AVX512-BF16 or AMX (emulated
    bf16 was 2.2x slower than fp32 on an Ice Lake Xeon), on Arm with the BF16 extension; explicit choices pass."""
    module = _import_script("supervised_baseline.py")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for gpu_bf16, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, v=gpu_bf16: v)
        assert module.resolve_amp("auto", cuda) == expected
    monkeypatch.setattr(module.platform, "machine", lambda: "x86_64")
    for avx512_bf16, amx, expected in ((False, False, "none"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert module.resolve_amp("auto", cpu) == expected
    monkeypatch.setattr(module.platform, "machine", lambda: "aarch64")
    for arm_bf16, expected in ((False, "none"), (True, "bf16")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda v=arm_bf16: v)
        assert module.resolve_amp("auto", cpu) == expected
    for explicit in ("bf16", "fp16", "none"):
        assert module.resolve_amp(explicit, cpu) == explicit


@per_script
def test_fp16_overflowing_first_step_leaves_the_optimizer_untouched(script):
    """With --amp fp16 the GradScaler skips a step whose gradients overflow. A skipped first step must leave no trace:
    the second step's update equals that of an optimizer that only saw the second step. (torch 2.14's fused SGD
    allocates its momentum with empty_like on the first step and keeps that memory when the step is skipped; the
    freed NaN buffers below make that garbage NaN, so the comparison fails with fused SGD.)"""
    import tyro

    module = _import_script(script)
    args = tyro.cli(module.Args, args=[*TINY_ARGS[script], "--amp", "fp16"])
    data = lt_data.build_data(args)

    def two_steps(skip_first: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = module.Model(args, data)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = module.make_optimizer(args, model, 0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for factor in (1e6, 1.0) if skip_first else (1.0,):  # fp16 gradients overflow at 65504: 1e6 * 2^8 does
            optimizer.zero_grad(set_to_none=True)
            loss = sum((p.half().float() ** 2).sum() for p in params) * factor
            scaler.scale(loss).backward()
            junk = [torch.full_like(p, float("nan")) for p in params]
            del junk  # the allocator hands this memory to the next empty_like
            scaler.step(optimizer)
            scaler.update()
        assert scaler.get_scale() == (2.0**7 if skip_first else 2.0**8)  # only the first step was skipped
        return [p.detach().clone() for p in params]

    after_skip, reference = two_steps(True), two_steps(False)
    assert all(torch.isfinite(p).all() for p in after_skip)
    for a, b in zip(after_skip, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_supervised_vit_trains_resumes_exports_and_probes(tmp_path):
    """--arch vit_tiny gives the supervised baseline the SSL scripts' ViT (AdamW, DeiT's defaults), so a gap table
    compares like with like: it resumes bit-identically, exports the ViT and the probe loads it."""
    script = "supervised_baseline.py"
    vit = ["--arch", "vit_tiny", "--vit-layers", "2", "--vit-dim", "32", "--vit-heads", "2", "--patch-size", "4"]
    args = [*base(script), *vit, "--num-workers", "0", "--deterministic"]
    run_script(script, *args, "--max-steps", "6", "--run-name", "straight", cwd=tmp_path)
    run_script(script, *args, "--max-steps", "3", "--run-name", "resumed", cwd=tmp_path)
    assert (
        "resuming at step 3"
        in run_script(script, *args, "--max-steps", "6", "--run-name", "resumed", cwd=tmp_path).stdout
    )
    a, b = (
        _load(tmp_path / "runs" / "straight" / "checkpoint.pt"),
        _load(tmp_path / "runs" / "resumed" / "checkpoint.pt"),
    )
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert set(a["optimizer"]["state"][0]) >= {"exp_avg", "exp_avg_sq"}  # AdamW
    assert (a["args"]["lr"], a["args"]["weight_decay"]) == (2.5e-4, 0.05)
    export = tmp_path / "runs" / "straight" / "backbone.pt"
    meta = _load(export)["backbone"]
    assert meta["arch"] == "vit" and (meta["arch_kwargs"]["num_layers"], meta["arch_kwargs"]["hidden_dim"]) == (2, 32)
    model, _ = linear_probe.load_backbone(str(export))
    plain = linear_probe.build_backbone("vit", **meta["arch_kwargs"])
    plain.load_state_dict(_load(export)["state_dict"], strict=True)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=0, atol=0)
    for extra in ([], ["--random-init"]):
        out = tmp_path / f"probe{len(extra)}.json"
        run_script(
            "linear_probe.py",
            str(export),
            "--epochs",
            "2",
            "--num-workers",
            "0",
            "--output",
            str(out),
            *extra,
            cwd=tmp_path,
        )
        res = json.loads(out.read_text())
        assert res["method"] == "supervised" and res["random_init"] == bool(extra) and 0 <= res["linear"]["top1"] <= 100
    resnet = _import_script(script).Args()
    assert (resnet.lr, resnet.weight_decay) == (0.2, 2e-4)  # the ResNet recipe is unchanged


@pytest.mark.parametrize("seed", ["20240101", str(2**32 - 1)])
@per_script
def test_any_seed_the_flag_accepts_trains(tmp_path, script, seed):
    """A date as the seed overflowed MSN's mask hash (OverflowError at step 1): every accepted seed trains."""
    out = run_script(script, *base(script), "--max-steps", "2", "--num-workers", "0", "--seed", seed, cwd=tmp_path)
    assert "done: step 2" in out.stdout


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_a_killed_data_loading_worker_stops_the_run_in_one_line_and_it_resumes(tmp_path):
    """The OOM killer taking a DataLoader worker: a RuntimeError or ConnectionResetError traceback, exit 1. Now one
    line naming the data-loading worker and the likely cause, exit 2, and the same command resumes."""
    script = "supervised_baseline.py"  # the shared runtime's loop
    args = [*base(script), "--epochs", "40", "--num-workers", "2", "--run-name", "w"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=tmp_path,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:
            if " step 3/" in line:
                os.kill(_children(proc.pid)[0], signal.SIGKILL)
                break
        out, err = proc.communicate(timeout=HANG_GUARD)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 2, out + err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "a data-loading worker died (the out-of-memory killer" in err
    step = _load(tmp_path / "runs" / "w" / "checkpoint.pt")["step"]
    assert step >= 2
    assert f"resuming at step {step}" in run_script(script, *args, "--max-steps", str(step + 1), cwd=tmp_path).stdout


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """ENOSPC / quota / file-size limit while writing a checkpoint: two tracebacks ending in 'unexpected pos'. Now
    one line naming the file and the OS error, exit 2, the previous checkpoint intact, no temporary file left."""
    import resource

    script = "supervised_baseline.py"  # the shared runtime's save path
    args = [*base(script), "--num-workers", "0", "--run-name", "d"]
    run_script(script, *args, "--max-steps", "2", cwd=tmp_path)
    ckpt = tmp_path / "runs" / "d" / "checkpoint.pt"
    limit = ckpt.stat().st_size - 1  # the next checkpoint does not fit

    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args, "--max-steps", "4"],
        cwd=tmp_path,
        env=script_env(),
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        "supervised_baseline.py: error: cannot write runs/d/checkpoint.pt: File too large; "
        "the checkpoint.pt on disk is untouched"
    )
    assert _load(ckpt)["step"] == 2 and not [p for p in ckpt.parent.iterdir() if ".tmp" in p.name]


def test_the_same_run_started_twice_is_refused_while_the_first_lives(tmp_path):
    """A scheduler requeue or a second terminal: the second copy resumed beside the first and both wrote the same
    checkpoint. Now it is refused in one line; a SIGKILLed first run leaves no stale lock, not even while its
    orphaned DataLoader workers (which share the lock file) linger for their watchdog's seconds."""
    script = "supervised_baseline.py"  # the shared runtime's start
    args = [*base(script), "--epochs", "40", "--num-workers", "2", "--run-name", "twice"]
    first = subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=tmp_path,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in first.stdout:
            if " step 2/" in line:
                break
        second = run_script(script, *args, cwd=tmp_path, check=False)
        assert second.returncode == 2 and second.stderr.strip() == (
            "supervised_baseline.py: error: runs/twice is being trained by another process; wait for it or choose "
            "another --run-name"
        )
    finally:
        first.kill()
        first.wait()
    assert "resuming at step" in run_script(script, *args, "--max-steps", "3", cwd=tmp_path).stdout


@pytest.mark.parametrize("script", ["supervised_baseline.py", "simsiam_rwsam.py"])
@pytest.mark.parametrize("change", ["image", "class"])
def test_resume_refuses_a_changed_training_set_in_one_line(tmp_path, script, change):
    """A class folder or images added before a resume: supervised died on a classifier size mismatch, SimSiam on
    sample_weights, the others resumed silently on another set."""
    from PIL import Image

    def write(split, cls, n):
        (tmp_path / "data" / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (60 * ord(cls[-1]) % 256, 9 * i, 0)).save(
                tmp_path / "data" / split / cls / f"{i}.png"
            )

    for cls in ("c0", "c1", "c2"):
        write("train", cls, 12)
        write("val", cls, 2)
    data = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--image-size", "16"]
    model = TINY_ARGS[script][TINY_ARGS[script].index("--proj-dim") :] if script == "simsiam_rwsam.py" else []
    args = [*data, *model, "--batch-size", "8", "--num-workers", "0", "--run-name", "c", "--eval-every", "0"]
    run_script(script, *args, "--max-steps", "2", cwd=tmp_path)
    if change == "image":
        write("train", "c1", 13)
        what = "images 36 -> 37"
    else:
        write("train", "c3", 12)
        write("val", "c3", 2)
        what = "images 36 -> 48, classes 3 -> 4"
    proc = run_script(script, *args, "--max-steps", "4", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"was trained on another training set ({what}); choose another --run-name" in proc.stderr


def test_resume_names_flags_the_old_checkpoint_never_had(tmp_path):
    """After an upgrade a resume was refused as '--warmup-epochs None -> 0 ... resume with the same command' to a
    user who did: name the flags as ones that did not exist then."""
    script = "supervised_baseline.py"
    args = [*base(script), "--num-workers", "0", "--run-name", "old"]
    run_script(script, *args, "--max-steps", "2", cwd=tmp_path)
    path = tmp_path / "runs" / "old" / "checkpoint.pt"
    ckpt = _load(path)
    del ckpt["args"]["label_smoothing"]
    torch.save(ckpt, path)
    proc = run_script(script, *args, "--max-steps", "3", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "was written before --label-smoothing existed" in proc.stderr
    assert "resume with the same command" not in proc.stderr


def test_resume_refuses_another_process_count(tmp_path):
    """A checkpoint of 2 processes resumed by 1 would change the global batch, the learning rate and the data order."""
    script = "supervised_baseline.py"
    args = [*base(script), "--num-workers", "0", "--run-name", "w"]
    run_script(script, *args, "--max-steps", "2", cwd=tmp_path)
    path = tmp_path / "runs" / "w" / "checkpoint.pt"
    ckpt = _load(path)
    ckpt["world_size"] = 2
    torch.save(ckpt, path)
    proc = run_script(script, *args, "--max-steps", "3", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr == (
        f"{script}: error: runs/w/checkpoint.pt was written by 2 processes, this run has 1; the global batch, "
        "learning rate and data order would change\n"
    )
    assert _load(path)["step"] == 2


def test_the_probe_hint_pastes_as_a_command_with_a_space_in_the_path(tmp_path):
    script = "supervised_baseline.py"
    out = run_script(
        script,
        *base(script),
        "--max-steps",
        "1",
        "--num-workers",
        "0",
        "--output-dir",
        "my runs",
        "--run-name",
        "r",
        cwd=tmp_path,
    ).stdout
    hint = out.strip().splitlines()[-1].split("probe with: ")[1]
    assert shlex.split(hint)[2] == "my runs/r/backbone.pt"


@pytest.mark.parametrize("script", ["msn_prior.py", "excb.py"])
def test_derived_crop_sizes_tile_at_fashion_mnist_s_own_28_px(tmp_path, script):
    """At 28 px the half-image focal / local crop (14 px) is no multiple of patch 4: the run stopped on a flag the
    user never passed. The derived size rounds down to the patch (12)."""
    from conftest import write_fashion_mnist

    write_fashion_mnist(tmp_path / "fm", per_class_train=12, per_class_test=2)
    vit = ["--arch", "vit_tiny", "--vit-layers", "1", "--vit-dim", "16", "--vit-heads", "2"]
    small = {
        "msn_prior.py": ["--num-prototypes", "8", "--head-hidden", "16", "--head-out", "8", "--num-focal", "1"],
        "excb.py": [
            "--num-clusters",
            "8",
            "--hidden-dim",
            "16",
            "--out-dim",
            "8",
            "--num-local-crops",
            "1",
            "--kmeans-iters",
            "2",
        ],
    }[script]
    args = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fm"), "--imbalance-ratio", "2", *vit, *small]
    out = run_script(
        script, *args, "--batch-size", "8", "--max-steps", "1", "--num-workers", "0", "--eval-every", "0", cwd=tmp_path
    ).stdout
    assert "done: step 1" in out
    ckpt = _load(next((tmp_path / "runs").glob("*/checkpoint.pt")))
    assert ckpt["backbone"]["arch_kwargs"]["image_size"] == 28


def test_eta_is_not_guessed_from_the_first_step(tmp_path):
    """The ETA at step 1 (warm-up, compilation) was 5.5x too high: no figure from the first step alone."""
    script = "supervised_baseline.py"
    out = run_script(script, *base(script), "--max-steps", "4", "--num-workers", "0", cwd=tmp_path).stdout
    etas = re.findall(r"step (\d+)/\d+ .*\| eta (\S+)", out)
    assert etas[0] == ("1", "--") and all(re.fullmatch(r"\dh\d\dm", e) for _, e in etas[1:]) and len(etas) == 4


def test_resume_refuses_a_changed_recipe_like_any_changed_flag(tmp_path):
    script = "supervised_baseline.py"
    args = [*base(script), "--max-steps", "2", "--num-workers", "0", "--run-name", "r"]
    run_script(script, *args, "--recipe", "cpu", cwd=tmp_path)
    assert _load(tmp_path / "runs" / "r" / "checkpoint.pt")["args"]["recipe"] == "cpu"
    again = run_script(script, *args, "--recipe", "cifar10-lt", cwd=tmp_path, check=False)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.startswith(f"{script}: error: runs/r/checkpoint.pt was written with other flags (")
    assert "--recipe cpu -> cifar10-lt" in again.stderr and "--arch vit_tiny -> resnet18" in again.stderr


@per_script
def test_a_finished_run_frees_what_it_built_without_the_garbage_collector(tmp_path, script):
    """When train() returns, reference counting alone frees the RunState and its model: a RunState whose autocast
    closure held the RunState itself lived on to interpreter exit, and with it DDP's gloo process group, whose late
    teardown now and then aborted rank 1 of a finished torchrun run ("terminate called without an active exception",
    exit 1)."""
    import gc

    import tyro

    module = _import_script(script)
    flags = [*TINY_ARGS[script], "--batch-size", "8", "--max-steps", "1", "--num-workers", "0"]
    args = tyro.cli(module.Args, args=[*flags, "--output-dir", str(tmp_path)])
    gc.collect()
    gc.disable()
    try:
        module.train(args)
        alive = [type(o).__name__ for o in gc.get_objects() if type(o) in (module.RunState, module.Model)]
    finally:
        gc.enable()
    assert alive == []
