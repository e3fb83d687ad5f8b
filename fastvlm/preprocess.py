"""Image preprocessing as the reference ``predict.py`` does it (docs/model.md).

RGB -> pad to a square with black, centred -> bicubic resize (shortest edge to ``size``) ->
centre crop ``size`` x ``size`` (a no-op after squaring) -> /255. No mean/std normalisation.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import numpy as np
import torch

try:
    from PIL import Image
except ImportError as e:  # pragma: no cover - Pillow is a hard dependency of the package
    raise ImportError("fastvlm.preprocess needs Pillow: pip install pillow") from e

__all__ = ["preprocess", "expand_to_square", "to_pil"]

ImageLike = Union["Image.Image", np.ndarray]


def to_pil(image: ImageLike) -> "Image.Image":
    """A PIL RGB image from a PIL image (any mode) or a uint8 array (H, W), (H, W, 1|3|4)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"preprocess: image arrays must be uint8, got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 2:
            return Image.fromarray(np.ascontiguousarray(image), mode="L").convert("RGB")
        if image.ndim == 3 and image.shape[2] in (3, 4):
            # RGBA -> RGB drops alpha, as PIL's convert('RGB') does.
            return Image.fromarray(np.ascontiguousarray(image[:, :, :3]), mode="RGB")
        raise ValueError(f"preprocess: image array must be (H, W) or (H, W, 1|3|4), got shape {image.shape}")
    raise TypeError(f"preprocess: expected a PIL.Image or a uint8 numpy array, got {type(image).__name__}")


def expand_to_square(image: "Image.Image", fill=(0, 0, 0)) -> "Image.Image":
    """Paste ``image`` centred on a square canvas of side max(W, H) filled with ``fill``."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _resize_crop(image: "Image.Image", size: int) -> "Image.Image":
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ValueError(f"preprocess: image has zero size {image.size}")
    # shortest edge -> size, keeping the aspect ratio (CLIPImageProcessor rounding: int()).
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess(images: Union[ImageLike, Sequence[ImageLike]], size: int = 1024, pad_to_square: bool = True,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images -> a (B, 3, size, size) tensor in [0, 1].

    ``images``: one PIL image / uint8 array, or a list of them. ``pad_to_square=False`` gives the
    resize + centre-crop variant (HF processor, Swift app)."""
    single = isinstance(images, (Image.Image, np.ndarray))
    items: List[ImageLike] = [images] if single else list(images)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"preprocess: size must be a positive int, got {size!r}")
    out = []
    for im in items:
        pil = to_pil(im)
        if pad_to_square:
            pil = expand_to_square(pil)
        pil = _resize_crop(pil, size)
        arr = np.asarray(pil, dtype=np.uint8)
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    if not out:
        return torch.empty(0, 3, size, size, dtype=dtype)
    return (torch.stack(out).to(torch.float32) / 255.0).to(dtype)
