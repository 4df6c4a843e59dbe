"""The shared skeleton is textually identical across the training scripts, in the same order."""

from __future__ import annotations

import dataclasses
import re

import pytest

from conftest import ROOT

SCRIPTS = ["supervised_baseline.py", "simsiam_rwsam.py", "msn_prior.py", "excb.py"]
MARKER = re.compile(r"^ *# =+ (shared|method): (.+)$")
SHARED = ["imports", "arguments", "loop", "runtime"]


def sections(path):
    """[(kind, name, text)] from one marker line to the next."""
    out, current = [], None
    for line in path.read_text().splitlines(keepends=True):
        m = MARKER.match(line)
        if m:
            current = [m.group(1), m.group(2).strip(), ""]
            out.append(current)
        elif current is not None:
            current[2] += line
    return [tuple(s) for s in out]


def present():
    return [s for s in SCRIPTS if (ROOT / s).exists()]


@pytest.mark.parametrize("script", present())
def test_shared_sections_in_order(script):
    shared = [name for kind, name, _ in sections(ROOT / script) if kind == "shared"]
    assert shared == SHARED


@pytest.mark.parametrize("script", [s for s in present() if s != SCRIPTS[0]])
def test_shared_sections_identical_to_the_reference(script):
    ref = {name: text for kind, name, text in sections(ROOT / SCRIPTS[0]) if kind == "shared"}
    for kind, name, text in sections(ROOT / script):
        if kind == "shared":
            assert text == ref[name], f"shared section '{name}' of {script} differs from {SCRIPTS[0]}"


def test_marker_parser_sees_a_difference(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("# ===== shared: imports\nimport os\n# ===== method: x\npass\n")
    b = tmp_path / "b.py"
    b.write_text("# ===== shared: imports\nimport sys\n# ===== method: x\npass\n")
    assert sections(a)[0] != sections(b)[0] and sections(a)[1] == sections(b)[1]


def _fake_run(S, args, tmp_path, steps_per_epoch: int):
    """The script's own RunState over stand-ins for what the Logger reads of the model, optimizer and data: one process
    on the CPU, lr 0.1, a 16 px data set and a ResNet-18 backbone (the hyperparameter table's values)."""
    from types import SimpleNamespace

    return S.RunState(
        args=dataclasses.replace(args, amp="none"),
        model=SimpleNamespace(
            export_prefix="backbone.",
            backbone_spec={"arch": "resnet18", "arch_kwargs": {}},
            get_submodule=lambda name: None,  # the exported backbone, for a stand-in kNN monitor
        ),
        train_model=None,
        optimizer=SimpleNamespace(param_groups=[{"lr": 0.1}]),
        data=SimpleNamespace(image_size=16),
        steps_per_epoch=steps_per_epoch,
        run_dir=str(tmp_path),
    )


def test_logger_averages_device_tensors_and_host_floats_over_the_interval(tmp_path, capsys):
    """Methods return tensors (kept on the device, no sync) and Python floats (host-side schedules); a CPU
    scalar tensor is moved to the run's device, so a GPU run never stacks tensors of two devices."""

    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import supervised_baseline as S

    args = S.Args(dataset="synthetic", batch_size=4, epochs=1)
    run = _fake_run(S, args, tmp_path, steps_per_epoch=10)
    logger = S.Logger(run, resumed=False)
    for step, (loss, momentum) in enumerate([(1.0, 0.9), (3.0, 0.95)], start=1):
        run.step = step
        logger.accumulate({"loss": torch.tensor(loss), "charts/momentum": momentum, "charts/hist": torch.arange(3.0)})
    logger.write()
    logger.close("done")
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("losses/loss")] == [(2, 2.0)]
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("charts/momentum")] == [(2, 0.925)]
    assert "charts/hist" in acc.Tags()["histograms"]
    assert "loss 2.0000" in capsys.readouterr().out


def test_eta_rounds_minutes_up_and_carries_into_hours(tmp_path):
    """Minutes round up (0h00m only when nothing is left: it showed 0h00m while the last evaluations ran)."""
    import supervised_baseline as S

    args = S.Args(dataset="synthetic", batch_size=4, epochs=1, eval_every=0)
    run = _fake_run(S, args, tmp_path, steps_per_epoch=10)
    logger = S.Logger(run, resumed=False)

    def eta(seconds: float, left: int = 1) -> str:  # ``left`` steps to go at ``seconds`` a step
        logger.pace, run.step = [seconds, 1], run.stop_step - left
        return logger.eta()

    assert eta(3000) == "0h50m"  # was 1h50m: hours were rounded
    assert eta(3599.9) == "1h00m"  # not 0h60m
    assert eta(3001) == "0h51m" and eta(1) == "0h01m" and eta(0) == "0h00m" and eta(60, left=0) == "0h00m"
    assert eta(5400) == "1h30m" and eta(7199) == "2h00m" and eta(2700, left=2) == "1h30m"
    logger.close("done")


def test_eta_counts_to_the_step_the_run_stops_at(tmp_path, capsys, monkeypatch):
    """With --max-steps 4 of a 1000-step schedule, the ETA counts the 2 steps left, not 998."""

    import torch

    import supervised_baseline as S

    clock = [0.0]  # Logger starts at 0 s, writes at 100 s (2 steps: 50 s a step)
    monkeypatch.setattr(S.time, "perf_counter", lambda: clock.pop(0) if clock else 100.0)
    args = S.Args(dataset="synthetic", batch_size=4, epochs=1, max_steps=4)
    run = _fake_run(S, args, tmp_path, steps_per_epoch=1000)
    logger = S.Logger(run, resumed=False)
    for step in (1, 2):
        run.step = step
        logger.accumulate({"loss": torch.tensor(1.0)})
    logger.write()
    logger.close("done")
    assert "eta 0h02m" in capsys.readouterr().out  # 2 steps x 50 s, rounded up; was 14h52m (998 steps)


def test_eta_counts_the_kNN_evaluations_still_to_run(tmp_path, capsys, monkeypatch):
    """4 epochs of 10 steps, the monitor every epoch taking 60 s: at step 35 (after steps of 1 s) 5 steps and one
    evaluation are left, 65 s, 0h02m; the ETA used to leave the evaluations out (0h01m) and showed 0h00m while the
    last ones ran."""
    import torch

    import supervised_baseline as S

    now = [0.0]
    monkeypatch.setattr(S.time, "perf_counter", lambda: now[0])
    args = S.Args(dataset="synthetic", batch_size=4, epochs=4, eval_every=1)
    run = _fake_run(S, args, tmp_path, steps_per_epoch=10)
    logger = S.Logger(run, resumed=False)

    def monitor(backbone, prepare, autocast):  # one kNN evaluation: 60 s
        now[0] += 60.0
        return 50.0

    logger.write(monitor)  # before training
    for step in (1, 35):  # step 1, then 34 steps of 1 s each
        now[0] += step - run.step
        run.step = step
        logger.accumulate({"loss": torch.tensor(1.0)})
        logger.write()
    logger.close("done")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "step 0, before training | knn_top1 50.00 (60s)", lines
    assert lines[1].endswith("eta --") and lines[2].endswith("eta 0h02m"), lines


@pytest.mark.parametrize("script", present())
def test_every_recipe_resolves_its_values_and_a_flag_beside_it_wins(script):
    """--recipe NAME applies RECIPES[NAME] before the command line: every value lands in Args as if given as a
    flag, so the defaults that follow from it resolve too (a ViT recipe's weight decay was the ResNet default), a
    flag given beside the recipe (before or after it) wins, and without --recipe the plain defaults stand."""
    import importlib
    import typing

    mod = importlib.import_module(script[:-3])
    assert {"cpu", "cifar10-lt"} <= set(mod.RECIPES)
    assert mod.parse_args([]) == mod.Args()
    archs = typing.get_args(typing.get_type_hints(mod.Args)["arch"])
    for name, (_, values) in mod.RECIPES.items():
        assert mod.parse_args(["--recipe", name]) == mod.Args(**values, recipe=name), name
        for flags in (
            ["--recipe", name, "--batch-size", "7", "--lr", "0.5"],
            ["--lr=0.5", "--batch-size", "7", "--recipe", name],
        ):
            assert mod.parse_args(flags) == mod.Args(**{**values, "batch_size": 7, "lr": 0.5}, recipe=name), flags
        for arch in archs:  # the defaults an --arch beside the recipe resolves (those the recipe leaves unset)
            beside = mod.parse_args(["--recipe", name, "--arch", arch])
            assert beside == mod.Args(**{**values, "arch": arch}, recipe=name), (name, arch)


@pytest.mark.parametrize("script", present())
def test_help_lists_each_recipe_in_one_line_and_an_unknown_one_is_refused(tmp_path, script):
    import importlib

    from conftest import run_script

    mod = importlib.import_module(script[:-3])
    help_text = run_script(script, "--help", cwd=tmp_path).stdout
    for name, (about, _) in mod.RECIPES.items():
        assert f"  {name}: {about}\n" in help_text
    bad = run_script(script, "--recipe", "cifar-lt", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        f"{script}: error: --recipe cifar-lt is not one of {', '.join(mod.RECIPES)}"
    )
