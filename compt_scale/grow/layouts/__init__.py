"""Per-architecture tensor layouts: growth data, so a new architecture is a table here, never new
growth code. `hf` holds the Hugging Face decoders (by model_type), `open_clip` the CLIP towers."""
from __future__ import annotations

from ...errors import CompTError
from ..layout import Layout


def supported() -> list[str]:
    from .hf import LAYOUTS
    return sorted(LAYOUTS) + ["open_clip"]


def get_layout(config) -> Layout:
    """The layout for a transformers config (by model_type) or an open_clip model-config dict."""
    if isinstance(config, dict):
        from .open_clip import CLIP_LAYOUT, check_supported
        check_supported(config)
        return CLIP_LAYOUT
    from .hf import LAYOUTS
    mt = getattr(config, "model_type", None)
    if mt not in LAYOUTS:
        raise CompTError(f"no growth layout for architecture {mt!r} (supported: {', '.join(supported())})")
    return LAYOUTS[mt]
