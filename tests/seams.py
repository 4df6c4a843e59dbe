"""Run a training script with a test seam, as ``python script.py ARGS`` would run it otherwise.

    python tests/seams.py [--inject-nan-at-step N] [--bn-running-stats] [--record-draws FILE] [--record-listings FILE]
        [--amp-auto-resolves DTYPE] SCRIPT.py ARGS...

--inject-nan-at-step N: the loss returned by step N (1-based) becomes NaN (the weights stay finite), for the tests of
    the NaN guard.
--bn-running-stats: every BatchNorm of the model normalises with its running statistics, so that the only
    per-process batch statistics left are the method's own (the DDP-equivalence tests).
--record-draws FILE: before each step, append "rank step x" to FILE, x the first number torch.rand would draw in the
    step (from a forked RNG state, so the step draws the same), for the tests of per-rank, per-step randomness.
--record-listings FILE: append "rank folder" to FILE for every folder listed (os.scandir, os.listdir), for the tests
    that a job indexes its data once.
--amp-auto-resolves DTYPE: --amp auto resolves to DTYPE (bf16, none), as on another kind of machine, for the tests of
    a requeue on another node type.

The script is imported and its ``train_step`` / ``Model`` are wrapped; ``train()`` itself has no test seam.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
import torch.nn as nn


def main() -> None:
    argv, nan_at, bn_running_stats, draws, listings, amp_auto = sys.argv[1:], None, False, None, None, None
    while argv and argv[0].startswith("--"):
        flag = argv.pop(0)
        if flag == "--inject-nan-at-step":
            nan_at = int(argv.pop(0))
        elif flag == "--bn-running-stats":
            bn_running_stats = True
        elif flag == "--record-draws":
            draws = argv.pop(0)
        elif flag == "--record-listings":
            listings = argv.pop(0)
        elif flag == "--amp-auto-resolves":
            amp_auto = argv.pop(0)
        else:
            raise SystemExit(f"seams.py: unknown seam {flag}")
    if listings is not None:
        for name in ("scandir", "listdir"):
            original = getattr(os, name)

            def recording(path=".", _original=original):
                if not isinstance(path, int):  # a file descriptor (shutil.rmtree) is no folder of the data
                    with open(listings, "a") as f:
                        f.write(f"{os.environ.get('RANK', '0')} {os.path.abspath(os.fsdecode(path))}\n")
                return _original(path)

            setattr(os, name, recording)
    script = argv[0]
    name = os.path.basename(script)[:-3]
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)

    if amp_auto is not None:
        module.resolve_amp = lambda amp, device: amp_auto if amp == "auto" else amp
    if nan_at is not None:
        train_step = module.train_step

        def nan_step(run, batch):
            out = train_step(run, batch)
            if run.step + 1 == nan_at:  # run.step counts the steps done before this one
                out["loss"] = out["loss"] + float("nan")
            return out

        module.train_step = nan_step
    if draws is not None:
        step_before_recording = module.train_step

        def recording_step(run, batch):
            with torch.random.fork_rng(devices=[]):
                x = torch.rand(()).item()
            with open(draws, "a") as f:
                f.write(f"{run.rank} {run.step} {x!r}\n")
            return step_before_recording(run, batch)

        module.train_step = recording_step
    if bn_running_stats:
        build = module.Model

        def model_with_running_stats(args, data):
            model = build(args, data)
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.register_forward_pre_hook(lambda mod, _: setattr(mod, "training", False))
            return model

        module.Model = model_with_running_stats
    sys.argv = argv
    module.main()


if __name__ == "__main__":
    main()
