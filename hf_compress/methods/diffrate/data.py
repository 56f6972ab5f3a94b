"""Image sets for the DiffRate search and its tests: scikit-learn's digits (shipped inside the package, so no
download), or any ``pixel_values``/``labels`` tensor file.

Why digits: the rate search needs a labelled image set on a machine without network access; the 1,797 8×8 digits
upsampled to 32×32 give a ViT with patch 4 the 64 patch tokens (+ CLS) that make per-layer token counts matter.
"""

from __future__ import annotations

import os

import torch

DIGITS_CLASSES = 10


def digits(image_size: int = 32, split: str = "train", test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's digits as ``(pixel_values [N, 1, S, S] in [-1, 1], labels [N])``, bilinearly upsampled.

    Args:
        image_size: side ``S`` of the upsampled images.
        split: ``"train"``, ``"test"`` or ``"all"``; the split is a fixed permutation (``seed``).
        test_fraction: share of the images in ``"test"``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits image set needs scikit-learn: pip install 'hf-compress[diffrate]'") from exc
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                             align_corners=False) * 2 - 1
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    pick = {"test": order[:n_test], "train": order[n_test:], "all": order}[split]
    return images[pick], labels[pick]


def load_images(path: str | os.PathLike):
    """``(pixel_values, labels)`` from a safetensors file holding those two tensors (``[N, C, H, W]`` float, ``[N]``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise OSError(f"image file {path} does not exist")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    missing = {"pixel_values", "labels"} - set(tensors)
    if missing:
        raise ValueError(f"{path} lacks the tensor(s) {sorted(missing)}; it needs pixel_values [N,C,H,W] and labels [N]")
    pixels, labels = tensors["pixel_values"].float(), tensors["labels"].long()
    check_images(pixels, labels)
    return pixels, labels


def check_images(pixels: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise ValueError for data the search cannot use (wrong ranks, mismatched counts, NaN/inf pixels)."""
    if pixels.dim() != 4 or labels.dim() != 1 or pixels.shape[0] != labels.shape[0] or not len(labels):
        raise ValueError(f"expected pixel_values [N, C, H, W] and labels [N] with N > 0, got "
                         f"{tuple(pixels.shape)} and {tuple(labels.shape)}")
    if not torch.isfinite(pixels).all():
        raise ValueError("pixel_values contain NaN or inf")


def batches(pixels: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int | None = None):
    """Mini-batches ``(pixels, labels)``; shuffled with ``seed`` when given, in order otherwise."""
    order = torch.arange(len(labels)) if seed is None else torch.randperm(
        len(labels), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(labels), batch_size):
        pick = order[start:start + batch_size]
        yield pixels[pick], labels[pick]
