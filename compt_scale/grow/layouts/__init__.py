"""Per-architecture tensor layouts: growth data, so a new architecture is a table here, never new
growth code. `hf` holds the Hugging Face decoders (by model_type), `open_clip` the CLIP towers;
a family defined outside the package adds its own table with `register_layout`."""
from __future__ import annotations

from ...errors import CompTError
from ..layout import Layout

REGISTERED: dict[str, Layout] = {}   # model_type -> layout, added by families outside the package


def register_layout(model_type: str, layout: Layout) -> None:
    """Grow configs whose `model_type` is `model_type` with `layout` (a family module outside the
    package calls this when it is imported). A built-in architecture cannot be replaced."""
    from .hf import LAYOUTS
    if model_type in LAYOUTS or model_type == "open_clip":
        raise CompTError(f"register_layout: {model_type!r} is a built-in architecture")
    REGISTERED[model_type] = layout


def supported() -> list[str]:
    from .hf import LAYOUTS
    return sorted(LAYOUTS) + ["open_clip"] + sorted(REGISTERED)


def get_layout(config) -> Layout:
    """The layout for a transformers config (by model_type), a registered model_type, or an
    open_clip model-config dict."""
    if isinstance(config, dict):
        from .open_clip import CLIP_LAYOUT, check_supported
        check_supported(config)
        return CLIP_LAYOUT
    from .hf import LAYOUTS
    mt = getattr(config, "model_type", None)
    if mt in REGISTERED:
        return REGISTERED[mt]
    if mt not in LAYOUTS:
        raise CompTError(f"no growth layout for architecture {mt!r} (supported: {', '.join(supported())})")
    return LAYOUTS[mt]
