"""A quick-look PNG of a segmentation: axial, coronal and sagittal slices through the organs with
the mask over the CT, in radiological convention (the patient's right on the viewer's left,
anterior up in axial views, superior up in coronal and sagittal ones), each pixel drawn with its
true aspect from the voxel spacing, and an organ colour legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from utils import LABELS, atomic_write, canonical_transform, reorient, spacing_of

COLOURS: dict[int, tuple[float, float, float]] = {
    1: (0.85, 0.33, 0.24),  # liver
    2: (0.98, 0.80, 0.10),  # right kidney
    3: (0.20, 0.78, 0.35),  # left kidney
    4: (0.35, 0.55, 1.00),  # spleen
}
WINDOW = (-160.0, 240.0)  # HU, abdominal soft-tissue window (level 40, width 400)


def _views(hu: np.ndarray, labels: np.ndarray, spacing: np.ndarray, centre: np.ndarray) -> list[tuple]:
    """(title, CT slice, label slice, pixel aspect) of the three planes through centre, on RAS
    arrays, oriented for display: rows top to bottom, columns left to right on screen."""
    x, y, z = (int(c) for c in centre)
    sx, sy, sz = spacing
    # On RAS arrays, a (a, b) plane shown with .T[::-1, ::-1] puts high b at the top and high a
    # (the patient's right for a = x, anterior for a = y) on the left.
    return [
        ("axial", hu[:, :, z].T[::-1, ::-1], labels[:, :, z].T[::-1, ::-1], sy / sx),
        ("coronal", hu[:, y, :].T[::-1, ::-1], labels[:, y, :].T[::-1, ::-1], sz / sx),
        ("sagittal", hu[x, :, :].T[::-1, ::-1], labels[x, :, :].T[::-1, ::-1], sz / sy),
    ]


def save_quicklook(path: str | Path, hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, title: str = "") -> None:
    """Writes the PNG (atomically). hu (X, Y, Z) in HU and labels (X, Y, Z) uint8 on one grid of
    any orientation, affine (4, 4) RAS mm. Slices pass through the centre of the organs (of the
    volume when the mask is empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    transform = canonical_transform(affine, "RAS")
    hu, ras_affine = reorient(hu, affine, transform)
    labels, _ = reorient(labels, affine, transform)
    spacing = spacing_of(ras_affine)
    present = np.unique(labels)
    centre = np.round(ndimage.center_of_mass(labels > 0)) if present.max() > 0 else np.array(labels.shape) // 2

    colours = np.zeros((len(LABELS), 4))
    for value, rgb in COLOURS.items():
        colours[value] = (*rgb, 0.45)
    cmap = ListedColormap(colours)

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6), facecolor="black")
    for ax, (name, ct, lab, aspect) in zip(axes, _views(hu, labels, spacing, centre)):
        ax.imshow(np.clip(ct.astype(np.float32), *WINDOW), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1],
                  aspect=aspect, interpolation="bilinear")
        ax.imshow(lab, cmap=cmap, vmin=-0.5, vmax=len(LABELS) - 0.5, aspect=aspect, interpolation="nearest")
        if lab.any():
            ax.contour(lab, levels=np.arange(0.5, len(LABELS)), colors="white", linewidths=0.4, alpha=0.7)
        ax.set_title(name, color="white", fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        side = ("R", "L") if name != "sagittal" else ("A", "P")
        for text, xpos, ha in ((side[0], 0.01, "left"), (side[1], 0.99, "right")):
            ax.text(xpos, 0.5, text, transform=ax.transAxes, color="yellow", ha=ha, va="center", fontsize=12)
    handles = [Patch(facecolor=COLOURS[v], label=LABELS[v] + ("" if v in present else " (none)"))
               for v in COLOURS]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white",
               fontsize=11)
    fig.suptitle(title, color="white", fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80, facecolor="black"))
    plt.close(fig)
