"""`samples.png`: a labeled grid of generated images, one row per class."""
from __future__ import annotations

from pathlib import Path

import torch

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def save_sample_grid(path: Path, pixels: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor,
                     class_names: tuple[str, ...] | None = None, per_class: int = 8) -> None:
    """pixels [N,3,H,W] in [0,1]; rows are the sampled classes, titles show the teacher's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(set(labels.tolist()))[:20]
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 1.1, len(classes) * 1.25), squeeze=False)
    for r, c in enumerate(classes):
        idx = (labels == c).nonzero().flatten()[:per_class]
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        for j in range(per_class):
            ax = axes[r][j]
            ax.axis("off")
            if j < len(idx):
                i = int(idx[j])
                ax.imshow(pixels[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
                p = int(predicted[i])
                pname = class_names[p] if class_names and p < len(class_names) else str(p)
                ax.set_title(pname, fontsize=6, color="black" if p == c else "red")
        axes[r][0].text(-0.1, 0.5, name, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle("generated images per sampled class (title: teacher prediction, red = disagrees)", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
