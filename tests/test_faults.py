"""Faults of round 4, each kind through the command line where a user meets it: numeric flags out of range, a
partial torchrun environment, output to a closed pipe, paths that are not UTF-8, a fresh start over an earlier run's
files, --amp auto resumed on another kind of machine, and the progress of a --max-steps run."""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import subprocess
import sys
import typing

import pytest
from PIL import Image

import linear_probe
import lt_data
from conftest import ROOT, TINY_ARGS, run_script, script_env

SCRIPTS = [s for s in TINY_ARGS if (ROOT / s).exists()]
per_script = pytest.mark.parametrize("script", SCRIPTS)
# Behaviour of the shared sections, textually identical in every script (tests/test_skeleton.py): tried on the
# cheapest script and on one with a view pipeline of its own, not on all four
shared_code = pytest.mark.parametrize("script", [s for s in ("supervised_baseline.py", "msn_prior.py") if s in SCRIPTS])
PROGRAMS = [*SCRIPTS, "linear_probe.py", "lt_data.py"]
FAST = ["--batch-size", "8", "--num-workers", "0", "--eval-every", "0"]


def _module(script: str):
    return importlib.import_module(script[:-3])


def _ranges(script: str) -> tuple[type, dict]:
    """A program's flags (its dataclass) and the ranges it checks them against."""
    if script == "linear_probe.py":
        return linear_probe.ProbeArgs, lt_data.RANGES | linear_probe.RANGES
    if script == "lt_data.py":
        return lt_data.DataArgs, lt_data.RANGES
    module = _module(script)
    return module.Args, module.SHARED_RANGES | module.RANGES | lt_data.RANGES


def _numeric_flags(cls: type) -> dict[str, type]:
    """Every int / float flag (Optional and tuples included) of a flags dataclass: name -> int or float."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        kinds = {t for t in typing.get_args(hints[f.name]) or [hints[f.name]] if t in (int, float)}
        kinds |= {a for t in typing.get_args(hints[f.name]) for a in typing.get_args(t) if a in (int, float)}
        if kinds and hints[f.name] is not bool:
            out[f.name] = float if float in kinds else int
    return out


@pytest.mark.parametrize("script", PROGRAMS)
def test_every_numeric_flag_of_every_program_has_a_range(script):
    """`--vit-layers -1` trained a ViT with no blocks: a numeric flag without a range is how that happens."""
    cls, ranges = _ranges(script)
    flags = _numeric_flags(cls)
    assert {"image_size", "split_seed"} <= set(flags)
    assert set(flags) - set(ranges) == set(), "numeric flags without a range"
    assert set(ranges) - set(flags) == set(), "ranges of flags that do not exist"


def _outside(interval: str, kind: type) -> list[str]:
    """Values just outside ``interval`` ("[1, inf)", "(0, 1]", ...) that the parser takes for a flag of ``kind``."""
    interval = interval.partition(": ")[0]  # "[2, inf): why"
    lo, hi = (float(v) for v in interval[1:-1].split(","))
    step = 1 if kind is int else 0.5
    values = [lo - step if interval[0] == "[" else lo] if kind is float or lo == int(lo) else []
    if hi != math.inf:
        values.append(hi + step if interval[-1] == "]" else hi)
    return [str(int(v)) if kind is int else str(v) for v in values]


@pytest.mark.parametrize("script", [*SCRIPTS, "linear_probe.py"])
def test_each_numeric_flag_just_outside_its_range_is_refused_before_any_work(tmp_path, monkeypatch, capsys, script):
    """Every numeric flag, at the values just outside its range (0 where 0 is not allowed: never "the default"):
    exit 2, one line naming the flag, nothing written. In-process: some 40 flags x 2 values per program."""
    cls, ranges = _ranges(script)
    kinds = _numeric_flags(cls)
    module = linear_probe if script == "linear_probe.py" else _module(script)
    monkeypatch.chdir(tmp_path)
    tried = 0
    for name, interval in ranges.items():
        flag = "--" + name.replace("_", "-")
        for value in _outside(interval, kinds[name]):
            default = getattr(cls, name, None)
            count = len(default) or 1 if isinstance(default, tuple) else 1  # --crop-scale takes 2, --shots any
            before = ["no-such-checkpoint.pt"] if script == "linear_probe.py" else TINY_ARGS[script]
            monkeypatch.setattr(sys, "argv", [script, *before, flag, *[value] * count])
            with pytest.raises(SystemExit) as exit_:
                module.main()
            err = capsys.readouterr().err.strip().splitlines()
            assert exit_.value.code == 2 and len(err) == 1, (flag, value, err)
            assert err[0].startswith(f"{script}: error: {flag} must be ") and err[0].endswith(f", got {value}"), err
            assert os.listdir(tmp_path) == [], (flag, value)
            tried += 1
    assert tried >= len(ranges)


@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("excb.py", ["--arch", "vit_tiny", "--vit-layers", "-1"], "--vit-layers must be >= 1, got -1"),
        ("excb.py", ["--arch", "vit_tiny", "--vit-layers", "0"], "--vit-layers must be >= 1, got 0"),
        ("msn_prior.py", ["--patch-size", "-4"], "--patch-size must be >= 1, got -4"),
        ("msn_prior.py", ["--head-out", "0"], "--head-out must be >= 1, got 0"),
        ("msn_prior.py", ["--head-hidden", "0"], "--head-hidden must be >= 1, got 0"),
        ("linear_probe.py", ["--few-shot-seeds", "0", "--shots", "2"], "--few-shot-seeds must be >= 1, got 0"),
    ],
)
def test_the_reported_architecture_sizes_are_refused_in_one_line(tmp_path, script, flags, message):
    """The round's reports, as typed: before, a ViT with no blocks, the preset's 12 layers, tracebacks after the run
    folder was made, and a ZeroDivisionError after the whole probe ran."""
    before = ["x.pt"] if script == "linear_probe.py" else TINY_ARGS[script]
    proc = run_script(script, *before, *flags, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"{script}: error: {message}", proc.stderr
    assert os.listdir(tmp_path) == []


def test_vit_sizes_below_one_are_refused_by_the_backbone_builder_too():
    """vit_kwargs is public: 0 layers is refused there too, never read as "the preset's"."""
    for kwargs, flag in (
        (dict(layers=0), "--vit-layers"),
        (dict(patch=-4), "--patch-size"),
        (dict(dim=0), "--vit-dim"),
    ):
        with pytest.raises(linear_probe.BackboneError, match=f"{flag} must be >= 1"):
            linear_probe.vit_kwargs("vit_tiny", 32, **kwargs)
    assert linear_probe.vit_kwargs("vit_tiny", 32)["num_layers"] == 12


@per_script
@pytest.mark.parametrize(
    "env, shown",
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 RANK=0"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE=two"),
    ],
)
def test_a_partial_torchrun_environment_is_named_in_one_line(tmp_path, monkeypatch, capsys, script, env, shown):
    """WORLD_SIZE left in a shell, without torchrun: init_process_group's traceback ("RANK expected") before.
    In-process, through the script's main."""
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *TINY_ARGS[script]])
    with pytest.raises(SystemExit) as exit_:
        _module(script).main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0, err
    assert f"a partial torchrun environment ({shown}): launch with torchrun, or unset these variables" in err
    assert os.listdir(tmp_path) == []


def test_complete_or_one_process_environments_are_accepted():
    """What torchrun sets, and WORLD_SIZE=1 alone (a one-process torchrun or a leftover), pass."""
    module = _module("supervised_baseline.py")
    full = dict(WORLD_SIZE="4", RANK="3", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    for env, expected in ((full, (4, 3, 1)), ({"WORLD_SIZE": "1"}, (1, 0, 0)), ({}, (1, 0, 0))):
        with pytest.MonkeyPatch.context() as mp:
            for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                mp.delenv(k, raising=False)
            for k, v in env.items():
                mp.setenv(k, v)
            assert module.launch_env() == expected
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**full, "RANK": "4"}.items():
            mp.setenv(k, v)
        with pytest.raises(module.RunError, match="RANK=4"):
            module.launch_env()


def _closed_pipe_run(args: list[str], cwd) -> subprocess.CompletedProcess:
    """``python ARGS`` with its stdout a pipe whose reader has gone (``| head -n 0``), deterministically."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, *args], cwd=cwd, env=script_env(), stdout=write, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(write)


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_into_a_closed_pipe_is_quiet(tmp_path, program):
    """`--help | head -n 0`: a 20-line BrokenPipeError traceback from every program before."""
    proc = _closed_pipe_run([str(ROOT / program), "--help"], tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""


def test_a_training_run_and_the_split_summary_into_a_closed_pipe_finish_quietly(tmp_path):
    """The progress lines of a run, and lt_data.py's summary, piped into a reader that has gone: the run still
    trains to its end and exports, with nothing on stderr."""
    args = [str(ROOT / "supervised_baseline.py"), *TINY_ARGS["supervised_baseline.py"], *FAST, "--max-steps", "2"]
    proc = _closed_pipe_run([*args, "--run-name", "p"], tmp_path)
    assert proc.returncode == 0 and proc.stderr == "" and (tmp_path / "runs" / "p" / "backbone.pt").exists()
    proc = _closed_pipe_run([str(ROOT / "lt_data.py"), *TINY_ARGS["supervised_baseline.py"]], tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""


def _latin1_imagefolder(root: bytes) -> None:
    """A two-class ImageFolder whose root and one class folder are named with a Latin-1 byte (0xe9), not UTF-8."""
    for split in (b"train", b"val"):
        for cls in (b"caf\xe9", b"tea"):
            folder = os.path.join(root, split, cls)
            os.makedirs(folder)
            for i in range(12):  # 24 training images: more than ExCB's 16 centroids
                Image.new("RGB", (16, 16), (30 * i, 200 if cls == b"tea" else 0, 0)).save(
                    os.fsdecode(os.path.join(folder, b"%d.png" % i))
                )


@pytest.mark.parametrize("script", ["supervised_baseline.py", "excb.py"])  # ExCB's k-means reads the data too
def test_a_data_dir_named_with_bytes_that_are_not_utf8_trains_logs_and_probes(tmp_path, script):
    """--data-dir with a Latin-1 byte: the data read fine, then TensorBoard's hyperparameter table raised
    UnicodeEncodeError after the run folder was made. The table, the log lines and the probe's JSON hold the name
    with the byte escaped."""
    from tensorboard.backend.event_processing import plugin_event_accumulator

    _latin1_imagefolder(os.path.join(os.fsencode(tmp_path), b"d\xe9"))
    args = [*TINY_ARGS[script], "--dataset", "imagefolder", "--imbalance-ratio", "1", "--image-size", "16", *FAST]
    proc = run_script(
        script, *args, "--data-dir", os.fsdecode(b"d\xe9"), "--max-steps", "1", "--run-name", "u", cwd=tmp_path
    )
    assert "from d\\xe9," in proc.stdout.splitlines()[0] and proc.stderr == ""
    acc = plugin_event_accumulator.EventAccumulator(str(tmp_path / "runs" / "u"))
    acc.Reload()
    table = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "|data_dir|d\\xe9|" in table
    if script == "supervised_baseline.py":  # the probe: the same folder, read back from the checkpoint
        run_script("linear_probe.py", str(tmp_path / "runs" / "u"), "--epochs", "1", "--num-workers", "0", cwd=tmp_path)
        assert (tmp_path / "runs" / "u" / "probe_imagefolder.json").read_bytes().decode("utf-8")


@per_script
def test_an_output_dir_that_is_not_utf8_is_refused_before_any_work(tmp_path, monkeypatch, capsys, script):
    """TensorBoard's event writer encodes its folder as UTF-8 (it raised after the run folder was made): refused
    in one line, the name escaped. In-process, through the script's main."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *TINY_ARGS[script], "--output-dir", os.fsdecode(b"r\xe9")])
    with pytest.raises(SystemExit) as exit_:
        _module(script).main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    assert err == f"{script}: error: --output-dir r\\xe9 is not UTF-8, which TensorBoard cannot write to"
    assert os.listdir(tmp_path) == []


def _events(folder) -> list[str]:
    return [f for f in os.listdir(folder) if f.startswith("events.out.tfevents.")]


def _loss_steps(folder) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), purge_orphaned_data=False)  # every event written, what any reader sees
    acc.Reload()
    return [e.step for e in acc.Scalars("losses/loss")]


@shared_code
def test_a_fresh_start_moves_the_earlier_run_s_files_aside_and_says_so(tmp_path, script):
    """Move checkpoint.pt away as the scripts advise, train again with another --lr: losses/loss held steps
    [1, 2, 1, 2] from two runs, two hyperparameter tables, and the old backbone.pt and probe results beside the new
    run. Now the earlier files go to earlier_1/ (a run of its own in TensorBoard), said in the first line."""
    args = [*TINY_ARGS[script], *FAST, "--log-every", "1", "--max-steps", "2", "--run-name", "f"]
    run_script(script, *args, cwd=tmp_path)
    run = tmp_path / "runs" / "f"
    (run / "checkpoint.pt").rename(tmp_path / "old.pt")
    (run / "probe_synthetic.json").write_text("{}")  # a probe of the earlier backbone
    (run / "train.log").write_text("the launcher's log, written while the run starts\n")  # not the run's: it stays
    out = run_script(script, *args, "--lr", "0.01", cwd=tmp_path).stdout
    first = out.splitlines()[0]
    assert first.endswith(
        f"; the earlier run's 3 files (no checkpoint) moved to {os.path.join('runs', 'f', 'earlier_1')}"
    )
    assert _loss_steps(run) == [1, 2] and _loss_steps(run / "earlier_1") == [1, 2]
    moved = sorted(os.listdir(run / "earlier_1"))
    assert (
        moved[0] == "backbone.pt"
        and moved[1].startswith("events.out.tfevents.")
        and moved[2:] == ["probe_synthetic.json"]
    )
    assert sorted(os.listdir(run)) == sorted(
        [".lock", "backbone.pt", "checkpoint.pt", "earlier_1", "train.log", *_events(run)]
    )
    again = run_script(script, *args, "--lr", "0.01", "--max-steps", "3", cwd=tmp_path).stdout  # a resume moves nothing
    assert "resuming at step 2" in again and "moved" not in again and not (run / "earlier_2").exists()


@shared_code
def test_amp_auto_resumes_on_a_machine_where_it_resolves_otherwise(tmp_path, script):
    """A requeue on another node type: `--amp auto` was stored resolved (bf16), and the same command where auto
    resolves to fp32 was refused with "resume with the same command". Now it resumes, said in the first line; an
    explicit --amp is still held to its value."""
    args = [*TINY_ARGS[script], *FAST, "--run-name", "a"]
    run_script(script, *args, "--max-steps", "2", cwd=tmp_path, seams=("--amp-auto-resolves", "bf16"))
    out = run_script(script, *args, "--max-steps", "3", cwd=tmp_path, seams=("--amp-auto-resolves", "none"))
    first = out.stdout.splitlines()[0]
    assert "resuming at step 2 of 3" in first and "amp none (--amp auto), the checkpoint's steps ran in bf16" in first
    assert "done: step 3" in out.stdout
    refused = run_script(script, *args, "--amp", "bf16", "--max-steps", "4", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "--amp none -> bf16" in refused.stderr


def test_a_max_steps_run_shows_its_own_stop(tmp_path):
    """A 2-step smoke run of a 3-epoch schedule announced `2 steps`, then printed `epoch 1/3 step 1/27`: the
    progress counts to the stop the run makes, and the first line names the schedules' length once."""
    args = [*TINY_ARGS["supervised_baseline.py"], *FAST, "--epochs", "3", "--log-every", "1", "--max-steps", "2"]
    lines = run_script("supervised_baseline.py", *args, cwd=tmp_path).stdout.splitlines()
    assert ", 2 steps of the schedules' 27 (--max-steps), amp " in lines[0]
    progress = [line.split(" loss ")[0] for line in lines if line.startswith("epoch ")]
    assert progress == ["epoch 1/1 step 1/2", "epoch 1/1 step 2/2"]
    full = run_script("supervised_baseline.py", *args[:-2], "--epochs", "1", "--run-name", "g", cwd=tmp_path).stdout
    assert "(--max-steps)" not in full.splitlines()[0] and "step 9/9 " in full


def test_a_folder_where_the_run_writes_a_file_is_refused_before_the_training(tmp_path):
    """backbone.pt a folder: the run trained to its end, then failed to export ("Is a directory"). The kind of the
    probe's --output naming a folder, in the training scripts: refused at the start, in one line."""
    (tmp_path / "runs" / "b" / "backbone.pt").mkdir(parents=True)
    args = [*TINY_ARGS["supervised_baseline.py"], *FAST, "--max-steps", "1", "--run-name", "b"]
    proc = run_script("supervised_baseline.py", *args, cwd=tmp_path, check=False)
    path = os.path.join("runs", "b", "backbone.pt")
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr.strip()
        == f"supervised_baseline.py: error: {path} is a folder, where the run writes a file; move it away"
    )
