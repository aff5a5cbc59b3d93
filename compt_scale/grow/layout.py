"""`Layout`: what an architecture's tensors are (growth data). The layout tables (grow/layouts/) and
the registry's generic operators (grow/registry.py) both import it; neither imports the other's
module at load time."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import CompTError
from .axes import parse_spec


@dataclass
class Layout:
    """An architecture's tensors. `tensors` maps key templates to specs; `{name}` in a template is a
    layer index of the stack `name`, whose depth is `sizes(config)[name]`. `tied` maps an alias key
    (lm_head) to the key it shares storage with when the config ties them. `saved_as` maps a key to
    the name transformers writes it under on disk when that differs (GPT-NeoX's lm_head is saved as
    embed_out): streaming reads such files, while the in-memory path sees the model's own names."""
    name: str
    sizes: Callable[[Any], dict[str, int]]        # (the architecture's config: HF object or CLIP dict)
    tensors: dict[str, str]
    stacks: tuple[str, ...] = ("layers",)
    tied: dict[str, str] = field(default_factory=dict)
    saved_as: dict[str, str] = field(default_factory=dict)
    is_tied: Callable[[Any], bool] = lambda cfg: bool(getattr(cfg, "tie_word_embeddings", False))

    def __post_init__(self):
        self._compiled = []
        for tmpl, spec in self.tensors.items():
            pat = re.escape(tmpl)
            for s in self.stacks:
                pat = pat.replace(re.escape("{" + s + "}"), f"(?P<{s.replace('.', '_')}>\\d+)")
            self._compiled.append((re.compile(pat + "$"), tmpl, parse_spec(spec)))

    def match(self, key: str):
        """(template, spec, stack name or None, layer index or None) for a tensor key."""
        for rx, tmpl, spec in self._compiled:
            m = rx.match(key)
            if m:
                if m.groupdict():
                    (g, i), = m.groupdict().items()
                    stack = next(s for s in self.stacks if s.replace(".", "_") == g)
                    return tmpl, spec, stack, int(i)
                return tmpl, spec, None, None
        raise CompTError(f"layout {self.name!r} has no entry for tensor {key!r}")
