"""Axis kinds and the generic width operators.

A layout describes every tensor of an architecture as a list of dims; each dim is a role and a
product of *factors* (slowest first), e.g. Llama's q_proj.weight is `o:kv*qpg*hd, i:hidden`
(rows = kv heads x q-heads-per-kv-head x head_dim; columns = hidden). Packed tensors just name their
packing as a fixed factor: GPT-2 c_attn is `i:hidden, o:3*heads*hd`, GPT-NeoX query_key_value is
`o:heads*3*hd, i:hidden` (per-head interleaved). Because growth maps every factor separately, q, k
and v are grown per block and per head; nothing ever slices a packed matrix's top-left corner.

Roles: `o` dims are produced (replicated by `clone`), `i` dims are contracted with a cloned input
(`clone` divides by the copy count so the sum is unchanged). Factor names are layout sizes
("hidden", "v.hidden", ...); the part after the last dot is the axis kind. An integer is a fixed
packing count and `_` a fixed size read from the tensor itself (patch size, grid): both must match.
Flags after `|`: `norm` (student init = ones), `res` (residual output projection, zeroed in the new
layers of depth `zero`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CompTError

# Axis kinds that `clone` duplicates (interleaved: target unit t comes from source unit t // ratio).
# Interleaving per factor keeps GQA groups intact for any integer ratios: q head (k', r') reads kv
# head k' in the target and (k'//m, r'//n) in the source, whose kv head is k'//m.
CLONED_KINDS = frozenset({"hidden", "ffn", "heads", "kv", "qpg", "wep", "embed"})
# Kinds that must keep their size under `clone` (head_dim: attention scale and rotary pairs change).
CLONE_FIXED_KINDS = frozenset({"hd", "vocab"})

CHUNK_ELEMS = 1 << 20  # elements per working block (4 MiB in fp32): bounds the temporary memory


def kind(factor: str) -> str:
    return factor.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class TensorSpec:
    dims: tuple[tuple[str, tuple[str, ...]], ...]   # ((role, (factor, ...)), ...)
    norm: bool = False
    res: bool = False

    @property
    def factors(self) -> set[str]:
        return {f for _, fs in self.dims for f in fs if not _fixed(f)}


def _fixed(f: str) -> bool:
    return f == "_" or f.isdigit()


def parse_spec(text: str) -> TensorSpec:
    body, _, flag_text = text.partition("|")
    flags = {x.strip() for x in flag_text.split(",") if x.strip()}
    dims = []
    for part in (p.strip() for p in body.split(",") if p.strip()):
        role, _, fs = part.partition(":")
        if role not in ("o", "i") or not fs:
            raise ValueError(f"bad layout dim {part!r} in {text!r}")
        dims.append((role, tuple(x.strip() for x in fs.split("*"))))
    return TensorSpec(tuple(dims), norm="norm" in flags, res="res" in flags)


def factor_sizes(spec: TensorSpec, sizes: dict[str, int], shape: tuple[int, ...], key: str) -> list[list[int]]:
    """Concrete size of every factor of every dim; `_` takes what the tensor's shape leaves."""
    if len(shape) != len(spec.dims):
        raise CompTError(f"{key}: layout has {len(spec.dims)} dims, tensor has shape {list(shape)}")
    out = []
    for (_role, fs), n in zip(spec.dims, shape, strict=True):
        given = [int(f) if f.isdigit() else (None if f == "_" else sizes[f]) for f in fs]
        rest = math.prod(k for k in given if k is not None)
        known = [n // rest if k is None else k for k in given]
        if math.prod(known) != n:
            raise CompTError(f"{key}: shape {list(shape)} does not match the layout ({'*'.join(fs)} = "
                             f"{'*'.join(map(str, known))}); is the config right for this checkpoint?")
        out.append(known)
    return out


def dim_map(factors, src_sizes, tgt_sizes, width: str):
    """Map every target index of one dim to a source index (-1: keep the student's init).

    Returns (index LongTensor, copies): `copies` is how many target units read each source unit
    (the product of the clone ratios of this dim's factors), the divisor for contracted dims.
    """
    idx = torch.zeros(1, dtype=torch.long)
    ok = torch.ones(1, dtype=torch.bool)
    copies = 1
    for f, s, t in zip(factors, src_sizes, tgt_sizes, strict=True):
        ar = torch.arange(t)
        if width == "clone" and not _fixed(f) and kind(f) in CLONED_KINDS and t != s:
            sub, sub_ok = ar // (t // s), torch.ones(t, dtype=torch.bool)
            copies *= t // s
        else:  # insert, and non-cloned axes under clone (positions): the leading block
            sub, sub_ok = ar.clamp(max=s - 1), ar < s
        idx = (idx[:, None] * s + sub[None, :]).reshape(-1)
        ok = (ok[:, None] & sub_ok[None, :]).reshape(-1)
    return torch.where(ok, idx, -1), copies


class Source:
    """Read access to one source tensor by slabs along a dim, so a streaming reader never has to
    hold the whole tensor. In-memory tensors slice; readers override `read`."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype

    def read(self, dim: int, lo: int, hi: int) -> torch.Tensor:
        return self.tensor.narrow(dim, lo, hi - lo)


def interp_matrix(s: int, t: int) -> torch.Tensor:
    """[t, s] weights of 1-D linear interpolation from s to t points, as F.interpolate(mode="linear",
    align_corners=False) computes them (half-pixel centres, edges clamped)."""
    x = ((torch.arange(t, dtype=torch.float64) + 0.5) * s / t - 0.5).clamp(min=0)
    i0 = x.floor().long().clamp(max=s - 1)
    i1 = (i0 + 1).clamp(max=s - 1)
    w = x - i0
    a = torch.zeros(t, s, dtype=torch.float64)
    a[torch.arange(t), i0] += 1 - w
    a[torch.arange(t), i1] += w
    return a


def interpolate_dim(factors, src_sizes, tgt_sizes) -> torch.Tensor:
    """One dim's [T, S] interpolation: per factor (so packed q/k/v blocks and heads never mix), the
    Kronecker product of the factors' linear interpolations; fixed factors are kept."""
    a = torch.ones(1, 1, dtype=torch.float64)
    for f, s, t in zip(factors, src_sizes, tgt_sizes, strict=True):
        a = torch.kron(a, torch.eye(s, dtype=torch.float64) if (_fixed(f) or s == t) else interp_matrix(s, t))
    return a


def _interpolate(out: torch.Tensor, src: Source, spec: TensorSpec, src_fs, tgt_fs) -> dict:
    """Width `interpolate` (paper App. D.1, Fig. A (b)): the teacher's tensor resampled to the
    student's shape by separable linear interpolation along every dim (bilinear for matrices). It
    reads the whole source tensor: an ablation operator, not the streaming default."""
    x = src.read(0, 0, src.shape[0]).to(torch.float64)
    for d, ((_, fs), s, t) in enumerate(zip(spec.dims, src_fs, tgt_fs, strict=True)):
        if s == t:
            continue  # an unchanged dim (vocab, positions): nothing to resample
        x = torch.movedim(torch.tensordot(interpolate_dim(fs, s, t), x, dims=([1], [d])), 0, d)
    out.copy_(x.to(out.dtype))
    return {"copies": 1}


def place(out: torch.Tensor, src: Source, spec: TensorSpec, src_fs, tgt_fs, width: str,
          noise_snr: float | None = None, generator: torch.Generator | None = None) -> dict:
    """Write the grown source into `out` (already holding the student's init) in place."""
    if out.dim() == 0:
        out.copy_(src.read(0, 0, 1) if src.shape else src.tensor)
        return {"copies": 1}
    if width == "interpolate":
        return _interpolate(out, src, spec, src_fs, tgt_fs)
    maps, copies = zip(*(dim_map(fs, s, t, width) for (_, fs), s, t in zip(spec.dims, src_fs, tgt_fs, strict=True)),
                       strict=True)
    div_dims = [d for d, (role, _) in enumerate(spec.dims) if role == "i" and copies[d] > 1]
    scale = 1.0 / math.prod(copies[d] for d in div_dims) if div_dims else 1.0
    sigma = _noise_sigma(src, scale, noise_snr) if (noise_snr and div_dims) else 0.0
    # Work in slabs along a dim that is not a noise dim, so every copy group lies in one slab.
    cd = next(d for d in range(out.dim()) if d not in div_dims) if sigma else 0
    others = [d for d in range(out.dim()) if d != cd]
    mask = None
    if any((maps[d] < 0).any() for d in others):
        shape = [1] * out.dim()
        mask = torch.ones(shape, dtype=torch.bool)
        for d in others:
            v = shape.copy(); v[d] = -1
            mask = mask & (maps[d] >= 0).view(v)
    rows = (maps[cd] >= 0).nonzero().flatten()
    per_row = max(1, out.numel() // max(1, out.shape[cd]))
    # Plain placement (insert, or clone of o-only tensors) needs no arithmetic: stay in the source
    # dtype (bf16 <-> fp32 round trips dominated the time); scaling and noise work in fp32.
    work = torch.float32 if (scale != 1.0 or sigma or src.dtype != out.dtype) else out.dtype
    # 2-D with holes (insert): write only the valid columns into the output's rows, no masking.
    cols = (maps[others[0]] >= 0).nonzero().flatten() if (mask is not None and len(others) == 1) else None
    for chunk in rows.split(max(1, CHUNK_ELEMS // per_row)):
        s_idx = maps[cd][chunk]
        lo, hi = int(s_idx.min()), int(s_idx.max()) + 1
        block = src.read(cd, lo, hi).to(work).index_select(cd, s_idx - lo)
        if cols is not None:
            block = block.index_select(others[0], maps[others[0]][cols])
        else:
            for d in others:
                block = block.index_select(d, maps[d].clamp(min=0))
        if scale != 1.0:
            block.mul_(scale)
        if sigma:
            block += _zero_sum_noise(block, maps, div_dims, sigma, generator)
        a, n = int(chunk[0]), len(chunk)
        contiguous = int(chunk[-1]) - a + 1 == n
        dst = out.narrow(cd, a, n) if contiguous else out.index_select(cd, chunk)
        if cols is not None:
            dst.index_copy_(others[0], cols, block.to(out.dtype))
        elif mask is not None:
            dst.copy_(torch.where(mask, block.to(out.dtype), dst))
        else:
            dst.copy_(block)
        if not contiguous:
            out.index_copy_(cd, chunk, dst)
    return {"copies": math.prod(copies), "scale": scale, "noise_sigma": sigma}


def _noise_sigma(src: Source, scale: float, snr: float) -> float:
    """Noise std for a signal-to-noise power ratio `snr` of the cloned tensor: rms(W*scale)/sqrt(snr)."""
    total, n = 0.0, 0
    step = max(1, CHUNK_ELEMS // max(1, math.prod(src.shape[1:])))
    for lo in range(0, src.shape[0], step):
        b = src.read(0, lo, min(src.shape[0], lo + step)).to(torch.float64)
        total, n = total + float(b.pow(2).sum()), n + b.numel()
    return math.sqrt(total / max(n, 1)) * scale / math.sqrt(snr)


def _zero_sum_noise(block, maps, div_dims, sigma, generator):
    """Gaussian noise that sums to zero over the copies of each source unit along the contracted
    dims: every copy gets a different weight (symmetry broken) yet the clone's output is unchanged."""
    e = torch.randn(block.shape, generator=generator) * sigma
    for d in div_dims:
        idx = maps[d]
        n_src = int(idx.max()) + 1
        shape = list(e.shape); shape[d] = n_src
        sums = torch.zeros(shape).index_add_(d, idx, e)
        counts = torch.bincount(idx, minlength=n_src).to(e.dtype)
        v = [1] * e.dim(); v[d] = -1
        e -= (sums / counts.view(v)).index_select(d, idx)
    return e
