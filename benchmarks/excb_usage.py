"""Cluster usage of a trained ExCB teacher: assign every pre-training image (one deterministic view) to its
nearest centroid and report the clusters in use, the usage entropy (÷ log K, 1 = uniform), the largest
cluster's share, and how many clusters each class occupies (head classes split into more clusters when
usage is forced towards uniform). Both the raw teacher argmax and the balanced one (with the run's size
estimate s) are reported.

    python benchmarks/excb_usage.py runs/<run>/checkpoint.pt
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import excb  # noqa: E402
import lt_data  # noqa: E402


@torch.no_grad()
def usage(path: str) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    args = excb.Args(**ckpt["args"])
    data = lt_data.build_data(args)
    model = excb.Model(args, data)
    model.load_state_dict(ckpt["model"])
    model.eval()
    tf = lt_data.eval_transform(data.image_size, data.mean, data.std)
    idx = data.pretrain_indices(args.balanced_twin)
    labels = torch.tensor([data.train_full.targets[i] for i in idx])
    scores = []
    for i in range(0, len(idx), 256):
        x = torch.stack([tf(data.train_full.image(j)) for j in idx[i : i + 256]])
        scores.append(model.teacher.scores(model.teacher.project(x)).float())
    z = torch.cat(scores)
    k = args.num_clusters
    out = {"checkpoint": path, "step": ckpt["step"], "images": len(idx), "K": k}
    for name, a in (("raw", z.argmax(1)), ("balanced", excb.excb_targets(z, model.sizes).argmax(1))):
        p = torch.bincount(a, minlength=k).double() / len(a)
        h = -(p * p.clamp_min(1e-12).log()).sum().item()
        per_class = [len(set(a[labels == c].tolist())) for c in range(data.num_classes)]
        out[name] = {
            "clusters_in_use": int((p > 0).sum()),
            "entropy_over_logK": h / math.log(k),
            "max_share": p.max().item(),
            "clusters_per_class": per_class,
        }
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isfile(sys.argv[1]):
        sys.exit("usage: python benchmarks/excb_usage.py runs/<run>/checkpoint.pt (an excb.py checkpoint)")
    print(json.dumps(usage(sys.argv[1]), indent=1))
