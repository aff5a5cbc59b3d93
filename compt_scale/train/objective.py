"""The CoM-PT objective: L = L_task + alpha * ||F_teacher - T(F_student)||^2.

`StudentWithIFD` is the module DeepSpeed wraps: the student and the projection T (dropped at export).
The teacher stays outside the student's engine: frozen, eval mode, no grads, never optimized.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.profiler import record_function

from ..errors import CompTError
from ..kernels.unit_ifd import UnitIFDProjection  # noqa: F401  (CLIP's `ifd.normalize: before` head)


class StudentWithIFD(nn.Module):
    """The student plus one projection T per feature stream (decoders: the final hidden state; CLIP:
    image and text embeddings). L_IFD is the mean over streams, as the paper averages CLIP's two."""

    def __init__(self, family, student: nn.Module, ifd_heads: list[nn.Module] | None):
        super().__init__()
        self.family = family
        self.student = student
        self.ifd = nn.ModuleList(ifd_heads) if ifd_heads else None

    def forward(self, batch, teacher_features=None, alpha: float = 0.0):
        task, features = self.family.losses(self.student, batch)
        if self.ifd is None or teacher_features is None:
            return task, torch.zeros((), device=task.device)
        # Each T runs inside its own module's forward so ZeRO-3 gathers its weight for the kernel.
        with record_function("ifd"):
            terms = [head(f_s, f_t, alpha=alpha)
                     for head, f_s, f_t in zip(self.ifd, features, teacher_features, strict=True)]
        return task, sum(terms) / len(terms)


class FrozenTeacher:
    """The predecessor's export, used only for its features: replicated, or (partitioned=True) a
    ZeRO-3 inference module already placed by DeepSpeed (chain/weights.py load_teacher).

    At its FLOP share: in the training dtype, forward only under `torch.inference_mode` (no autograd
    graph, no version counters), only the final hidden state asked for, and with train.compile its
    blocks compiled as the student's are. A partitioned teacher runs under `no_grad` instead: ZeRO-3
    gathers parameters into `param.data` in its hooks, and inference tensors written there would be
    refused outside inference mode when it releases them."""

    def __init__(self, family, model: nn.Module, dtype: torch.dtype, device: torch.device,
                 partitioned: bool = False):
        self.family = family
        self.partitioned = partitioned
        self.model = model.eval() if partitioned else model.to(device=device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.config = family.config_of(model)

    def compile(self) -> None:
        """torch.compile the teacher's blocks (train.compile), as the student's."""
        from .compile import compile_blocks
        compile_blocks(self.model)

    def features(self, batch) -> list[torch.Tensor]:
        if self.partitioned:
            with torch.no_grad():
                return self.family.features(self.model, batch)
        with torch.inference_mode():
            feats = self.family.features(self.model, batch)
        # Out of inference mode: the IFD loss may save the teacher's features for its backward, which
        # an inference tensor cannot be. One copy of the final hidden state (d_teacher per token).
        return [f.clone() for f in feats]


def calibrate_alpha(module: StudentWithIFD, teacher: FrozenTeacher, batches, ratio: float,
                    reduce=lambda x: x) -> float:
    """alpha so that alpha * L_ifd ~= ratio * L_task on the first batches (paper: ratio 0.1).

    Computed on the grown student before any update, each rank on its own share of the first batches;
    `reduce` averages the sums over ranks, so every rank gets the same alpha.
    """
    task_sum, ifd_sum = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            task, ifd = module(batch, teacher.features(batch), alpha=1.0)
            task_sum += float(task)
            ifd_sum += float(ifd)
    task_sum, ifd_sum = reduce(task_sum), reduce(ifd_sum)
    if not math.isfinite(task_sum) or not math.isfinite(ifd_sum):
        raise CompTError("ifd.alpha: calibration saw a non-finite loss (check the teacher export)")
    if ifd_sum <= 1e-12:
        # The projection already reproduces the teacher (e.g. function-preserving growth): any alpha
        # gives ~0 now; use the ratio itself so the term still acts once the student drifts.
        return ratio
    return ratio * task_sum / ifd_sum


# ---------------------------------------------------------------- alpha modes
# Converting the official code's alpha (CoM-PT repository, open_clip/loss.py KDClipLoss): it computes
# alpha_official * (mse(normalize(T(s_img)), t_img) + mse(normalize(T(s_txt)), t_txt)), a SUM of the
# image and text terms with T applied BEFORE the L2 normalization; this project AVERAGES the streams
# (the paper's /2). With `ifd.normalize: before` the terms are the same (T without a bias, see
# UnitIFDProjection), so alpha here = 2 x alpha_official: the paper's alpha = 500 is `alpha: 1000`.
# With `normalize: after` (T on the unit embedding, unnormalized output) the IFD term has a different
# scale and no fixed factor exists; use `alpha: auto`.

def alpha_at(alpha_spec, alpha: float, step: int, steps: int) -> float:
    """The alpha of optimizer step `step` (0-based): a schedule's value, else the current alpha."""
    if not isinstance(alpha_spec, dict):
        return alpha
    start, end = float(alpha_spec["start"]), float(alpha_spec.get("end", 0.0))
    return start + (end - start) * step / max(1, steps - 1)


class AutoAlpha:
    """`alpha: auto` after the first calibration: at every eval, alpha is re-set so that
    alpha * L_ifd / L_task = ratio, measured on the train steps since the previous eval.

    Tracked per step: q = L_ifd(unscaled) / L_task (the logged ifd_loss / alpha / task_loss). The
    smoothing is the median of q over the later half of the window: per-batch IFD is spiky (one batch
    can carry 10x the typical value), so a mean would let one spike set alpha for the whole next
    interval; and early in a stage q falls fast (the student and T adapt to the teacher), so the
    window's first steps describe a past that the next interval will not see. Each rank takes its
    own median, `reduce` averages them, so every rank gets the same alpha. `state()` goes
    into checkpoints so a resumed run recalibrates exactly as an uninterrupted one.
    """

    def __init__(self, state: dict | None = None):
        self.window = list((state or {}).get("alpha_window", []))
        self._pending: list[tuple] = []   # (task, ifd) device scalars + alpha, not yet read back

    def observe(self, task, ifd, alpha: float) -> None:
        """One step's losses: floats, or device scalars kept as they are until the next read-back
        (recalibrate/state), so the training loop never waits on the device for this."""
        if alpha > 0:
            self._pending.append((task, ifd, alpha))

    def _flush(self) -> None:
        if not self._pending:
            return
        vals = torch.tensor([[float(t), float(i)] for t, i, _ in self._pending]) \
            if not torch.is_tensor(self._pending[0][0]) else \
            torch.stack([torch.stack([t.double(), i.double()]) for t, i, _ in self._pending]).cpu()
        for (task, ifd), (_, _, alpha) in zip(vals.tolist(), self._pending, strict=True):
            if task > 0 and math.isfinite(task) and math.isfinite(ifd):
                self.window.append(ifd / alpha / task)
        self._pending = []

    def recalibrate(self, alpha: float, ratio: float, reduce=lambda x: x) -> float:
        self._flush()
        q = sorted(self.window[len(self.window) // 2:])
        med = (q[(len(q) - 1) // 2] + q[len(q) // 2]) / 2 if q else 0.0
        self.window = []
        med = reduce(med)
        if not math.isfinite(med) or med <= 1e-12:
            return alpha  # nothing to go by (IFD ~ 0): keep the current alpha
        return ratio / med

    def state(self) -> dict:
        self._flush()
        return {"alpha_window": list(self.window)}
