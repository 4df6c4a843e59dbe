"""What changes with scale (issues 33 and 37): a job indexes its data once, every rank agrees on where a run stands
without a shared run folder, a stop before the first step is one line, and the scale benchmark runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections import Counter

import torch
from PIL import Image

from conftest import HANG_GUARD, ROOT, TINY_ARGS, run_script, run_torchrun, script_env, with_seams

SCRIPT = "supervised_baseline.py"  # the shared loop's behaviour; the other scripts share it textually


def _image_folder(root, counts=(12, 8, 6), val=2, size=16):
    for split, per_class in (("train", counts), ("val", [val] * len(counts))):
        for c, n in enumerate(per_class):
            (root / split / f"c{c}" / "sub").mkdir(parents=True)
            for i in range(n):  # half of each class one folder down: every folder level is listed
                rel = f"c{c}/sub/{i}.png" if i % 2 else f"c{c}/{i}.png"
                Image.new("RGB", (size, size), (40 * c, 20 * i % 256, 0)).save(root / split / rel)


def test_a_torchrun_job_lists_each_data_folder_once_on_rank_0(tmp_path):
    """Issue 33: every torchrun process indexed the data on its own (an 8-GPU node listed ImageNet-LT 8 times)."""
    data = tmp_path / "data"
    _image_folder(data)
    listings = tmp_path / "listings.txt"
    args = ["--dataset", "imagefolder", "--data-dir", str(data), "--image-size", "16", "--batch-size", "4"]
    out = run_torchrun(
        SCRIPT,
        *args,
        "--max-steps",
        "1",
        "--num-workers",
        "0",
        "--eval-every",
        "0",
        cwd=tmp_path,
        seams=("--record-listings", str(listings)),
    ).stdout
    assert "global batch 8 on 2 x cpu" in out and "done: step 1" in out
    lines = [line.split(" ", 1) for line in listings.read_text().splitlines()]
    of_data = [(rank, folder) for rank, folder in lines if folder.startswith(str(data))]
    assert {rank for rank, _ in of_data} == {"0"}, of_data
    folders = Counter(folder for _, folder in of_data)
    expected = set()
    for split in ("train", "val"):
        expected |= {str(data / split)} | {str(data / split / f"c{c}") for c in range(3)}
        expected |= {str(data / split / f"c{c}" / "sub") for c in range(3)}
    assert set(folders) == expected and set(folders.values()) == {1}, folders


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path, *args, timeout=HANG_GUARD):
    """Two torchrun "nodes" of one process each on 127.0.0.1 (static rendezvous), each with its own --output-dir
    (a run folder on each node's local disk); returns both CompletedProcess-like (returncode, stdout, stderr)."""
    port, procs = _free_port(), []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
        cmd += ["--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
        cmd += [*with_seams(SCRIPT, ()), *args, "--output-dir", str(tmp_path / f"node{node}")]
        env = {**script_env(), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out.decode(), err.decode()))
    return results


def test_two_nodes_with_their_own_run_folders_resume_every_rank_from_the_same_step(tmp_path):
    """Issue 37: with a run folder per node, rank 0 resumed at its checkpoint's step while rank 1 started afresh:
    two replicas, an export, then a "Connection reset by peer" traceback and a hung torchrun. Now rank 0's folder
    decides for every rank: the resumed job ends with the weights of a job that was never stopped."""
    args = [*TINY_ARGS[SCRIPT], "--batch-size", "4", "--checkpoint-every", "2", "--num-workers", "0"]
    args += ["--deterministic", "--run-name", "r"]
    for steps in ("4", "6"):
        results = _two_nodes(tmp_path, *args, "--max-steps", steps)
        for code, out, err in results:
            assert code == 0 and "Traceback" not in err, out + err
    first = results[0][1]
    assert "resuming at step 4 of 6" in first and "done: step 6" in first
    assert not (tmp_path / "node1").exists()  # rank 1 writes nothing
    straight = run_torchrun(SCRIPT, *args, "--max-steps", "6", cwd=tmp_path)
    assert "done: step 6" in straight.stdout
    a = torch.load(tmp_path / "runs" / "r" / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "node0" / "r" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_refused_resume_is_one_line_on_every_rank(tmp_path):
    """A checkpoint that rank 0 refuses (here: another process count) stops every rank with the same one line,
    not rank 0 alone while the others wait in a collective. (torchrun itself then prints its ChildFailedError
    summary, whose traceback is torchrun's, not the script's.)"""
    args = [*TINY_ARGS[SCRIPT], "--batch-size", "4", "--num-workers", "0", "--run-name", "r", "--max-steps", "2"]
    run_script(SCRIPT, *args, "--output-dir", str(tmp_path / "node0"), cwd=tmp_path)  # one process
    results = _two_nodes(tmp_path, *args)
    for code, out, err in results:
        assert code != 0 and f'File "{ROOT / SCRIPT}"' not in err, out + err
        line = [x for x in err.splitlines() if f"{SCRIPT}: error:" in x]
        assert len(line) == 1 and "was written by 1 processes, this run has 2" in line[0], err


def test_ctrl_c_during_the_step_0_monitor_is_one_line_and_leaves_nothing_behind(tmp_path):
    """Issue 37: the signal handlers came after the data and the step-0 kNN monitor; a Ctrl-C there was a 60-line
    KeyboardInterrupt traceback. Now one line, exit 130, and the rerun's TensorBoard has one run's events."""
    args = [*TINY_ARGS[SCRIPT][:-4], "--synthetic-per-class", "3000", *TINY_ARGS[SCRIPT][-6:]]
    args += ["--eval-bank", "12000", "--eval-queries", "0", "--num-workers", "0", "--run-name", "c"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / SCRIPT), *args],
        cwd=tmp_path,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("kNN monitor"):  # the monitor says what it embeds, then embeds it
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
            break
    out, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 130, "".join(lines) + out + err
    assert err == "", err
    assert out.strip() == "interrupted (SIGINT) before the first step: nothing to save; run the same command to go on"
    run_script(SCRIPT, *args[:-8], "--eval-every", "0", "--max-steps", "2", "--run-name", "c", cwd=tmp_path)
    # what TensorBoard shows: its plugins' accumulator (the older one purges no text)
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    run = tmp_path / "runs" / "c"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the interrupted start's went to earlier_1/
    assert len(list((run / "earlier_1").glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert len(acc.Tensors("hyperparameters/text_summary")) == 1
    assert [e.step for e in acc.Tensors("losses/loss")] == [1, 2]


def test_scale_benchmark_prints_its_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--n", "60", "--classes", "5", "--val-per-class", "2"]
        + ["--distinct", "4", "--epoch-images", "60", "--items", "5", "--repeats", "1", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=script_env(),
        timeout=HANG_GUARD,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 8 and rows[0] == "| what | ours | torchvision | ratio |"
    assert all(len(r.split("|")) == 6 for r in rows)
    assert os.listdir(tmp_path) == []  # the synthetic files are removed
