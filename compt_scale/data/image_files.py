"""Reading one image as open_clip's eval transform does (shared by the indexed and streamed corpora)."""
from __future__ import annotations

import numpy as np
from PIL import Image


def load_image(path, size: int) -> np.ndarray:
    """open_clip's eval transform: resize the shortest side to `size` (bicubic), centre crop.
    `path`: a file path or a binary file object (a tar member)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        # torchvision's Resize(int): the long side is truncated, not rounded
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im).transpose(2, 0, 1)
