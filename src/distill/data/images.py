"""A folder of images with one sub-folder per class, read with Pillow (no torchvision).

``root/<class>/<image>``: class names are the sorted sub-folder names (hidden ones skipped); images are
the files directly inside each class folder with a suffix in IMAGE_SUFFIXES (case-insensitive).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distill.data.arrays import DataSplits, make_splits
from distill.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _check_size(image_size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_size)
        ok = h > 0 and w > 0 and tuple(image_size) == (h, w)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"image_size must be two positive integers (height, width), got {image_size!r}: "
                        "pass e.g. (28, 28).")
    return h, w


def read_image(path: Path, size: tuple[int, int], grayscale: bool) -> np.ndarray:
    """One image as float32 (C, H, W) in [0, 1]; size is (H, W)."""
    h, w = size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. palette-with-transparency notices ...
            # ... but not Pillow's decompression-bomb warning (more than Image.MAX_IMAGE_PIXELS): refused below
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = img.convert("L" if grayscale else "RGB")
                if img.size != (w, h):  # Pillow sizes are (width, height)
                    img = img.resize((w, h), Image.Resampling.BILINEAR)
                a = np.asarray(img, dtype=np.float32)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise UserError(f"Image {path} has more than {Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's Image.MAX_IMAGE_PIXELS), "
                        "so it may be a decompression bomb and is refused: shrink or remove that file.") from None
    except Exception as e:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ValueError, DecompressionBomb...
        raise UserError(f"Cannot read image {path} ({type(e).__name__}: {e}): "
                        "delete or replace that file.") from None
    a = a / 255.0
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def load_image_folder(path: str, *, image_size: tuple[int, int], grayscale: bool, val_fraction: float,
                      test_fraction: float, unlabelled_fraction: float, seed: int) -> DataSplits:
    size = _check_size(image_size)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"Image folder {root} does not exist: pass a folder holding one sub-folder of images "
                        "per class.")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                        key=lambda d: d.name)
    if len(class_dirs) < 2:
        raise UserError(f"Image folder {root} has {len(class_dirs)} class sub-folder(s): "
                        "put each class's images in its own sub-folder, at least 2 classes.")
    files: list[Path] = []
    labels: list[int] = []
    for k, d in enumerate(class_dirs):
        images = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UserError(f"Class folder {d} has no images ({', '.join(IMAGE_SUFFIXES)}): "
                            "add images to it or remove the folder.")
        files.extend(images)
        labels.extend([k] * len(images))
    channels = 1 if grayscale else 3
    x_np = np.empty((len(files), channels, *size), dtype=np.float32)
    for i, f in enumerate(files):
        x_np[i] = read_image(f, size, grayscale)
    x = torch.from_numpy(x_np)
    y = torch.tensor(labels, dtype=torch.int64)
    return make_splits("image-folder", x, y, val_fraction=val_fraction, test_fraction=test_fraction,
                       unlabelled_fraction=unlabelled_fraction, seed=seed, num_classes=len(class_dirs),
                       class_names=[d.name for d in class_dirs])
