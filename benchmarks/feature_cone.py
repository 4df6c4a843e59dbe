"""How tightly a random-init backbone's features of a data set's images bunch together: the mean pairwise cosine of
the (un-augmented) features of up to --images long-tailed training images (default backbone: the CPU recipes'
4-layer ViT, seeded).

Near 1 (a narrow cone: every image gets almost the same feature) the batch-normalised heads of MSN and ExCB follow
what the augmentations change about as much as what differs between images, so a random network's predictions of
two views of one image disagree, and the uniformity terms (MSN's mean-entropy maximisation, ExCB's balancing) can
win (docs/cpu_recipes.md: 0.985 on the UCI digits, where MSN collapses and ExCB's head does; 0.980 on MNIST-1630,
where MSN nearly collapses and recovers; 0.846 on the Fashion-MNIST subset and 0.845 on Fashion-MNIST-LT). Compare
data sets with one architecture: a ResNet's pooled ReLU features are all positive, so its cosines are high on any
data (0.975 on Fashion-MNIST-LT, 0.977 on the digits).

    python benchmarks/feature_cone.py --dataset imagefolder --data-dir data/digits --imbalance-ratio 10 --image-size 16
    python benchmarks/feature_cone.py --dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist \
        --image-size 16
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import linear_probe  # noqa: E402  (the backbones)
import lt_data  # noqa: E402  (the data sets the scripts accept)


@dataclass
class ConeArgs(lt_data.DataArgs):
    """Mean pairwise cosine of a backbone's features of a data set's long-tailed training images."""

    arch: str = "vit_tiny"
    """architecture (resnet18, vit_tiny, ...)"""
    vit_layers: Optional[int] = None
    """ViT depth; default for a ViT: the CPU recipes' 4"""
    vit_heads: Optional[int] = None
    """ViT heads; default for a ViT: the CPU recipes' 3"""
    vit_dim: Optional[int] = None
    """ViT width; default for a ViT: the CPU recipes' 96"""
    images: int = 1024
    """at most this many long-tailed training images, evenly spaced over the set"""
    seed: int = 0
    """seed of the random init"""


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean over all ordered pairs (i, j), i != j, of cos(f_i, f_j) for features [N, D], N >= 2."""
    unit = F.normalize(features.double(), dim=1)
    n = unit.shape[0]
    return ((unit.sum(0).square().sum() - n) / (n * (n - 1))).item()


def main(args: ConeArgs) -> float:
    vit = args.arch.startswith("vit")
    try:
        if args.images < 2:
            raise lt_data.DataError(f"--images must be >= 2 (a pair), got {args.images}")
        data = lt_data.build_data(args)
        spec = linear_probe.backbone_spec(
            args.arch,
            data.image_size,
            *(
                (args.vit_layers or 4, args.vit_heads or 3, args.vit_dim or 96)
                if vit
                else (args.vit_layers, args.vit_heads, args.vit_dim)
            ),
        )
    except (lt_data.DataError, linear_probe.BackboneError) as e:
        print(f"feature_cone.py: error: {lt_data.error_line(e)}", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(args.seed)
    model = linear_probe.build_backbone(spec["arch"], **spec["arch_kwargs"])
    tf = lt_data.eval_transform(data.image_size, data.mean, data.std)
    idx = data.lt_indices[:: max(1, len(data.lt_indices) // args.images)][: args.images]
    model.eval()
    with torch.no_grad():
        feats = torch.cat(
            [
                model(torch.stack([tf(data.train_full.image(i)) for i in idx[k : k + 256]]))
                for k in range(0, len(idx), 256)
            ]
        )
    cone = mean_pairwise_cosine(feats)
    print(
        f"random {args.arch} on {data.name}: mean pairwise cosine {cone:.3f} of the features of {len(idx)} "
        "long-tailed training images"
    )
    return cone


if __name__ == "__main__":
    main(tyro.cli(ConeArgs))
