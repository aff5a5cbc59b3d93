"""fused_ifd_loss with a process group, and IFDProjection inside a ZeRO-3 DeepSpeed engine.

Two real gloo ranks on CPU (this file run as a script is the worker). Tokens are split unevenly
(23 / 18) so the test shows the exact global mean, not a mean of means. Both implementations are
checked: the workers run with TRITON_INTERPRET=1, so impl="triton" runs the real kernels on CPU.

Convention under test (compt_scale/kernels/ifd.py): every rank returns the global-mean value; with
grad_reduce="mean" each rank's gradient is world_size x its local contribution, so the AVERAGE over
ranks (what DDP/DeepSpeed do) equals the unsharded gradient; with "sum" the SUM does.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compt_scale.train.distributed import free_port

pytestmark = [pytest.mark.slow, pytest.mark.dist]

N_SPLIT = (23, 18)
D_IN, D_S, D_T, ALPHA, LR = 12, 20, 14, 0.7, 0.1


def _data():
    g = torch.Generator().manual_seed(0)
    n = sum(N_SPLIT)
    return dict(x=torch.randn(n, D_IN, generator=g), s=torch.randn(n, D_S, generator=g),
                t=torch.randn(n, D_T, generator=g), w=torch.randn(D_T, D_S, generator=g) / 4,
                b=torch.randn(D_T, generator=g))


def _rows(rank):
    lo = sum(N_SPLIT[:rank])
    return slice(lo, lo + N_SPLIT[rank])


class Toy(nn.Module):
    """A student layer + the IFD projection: ZeRO-3 partitions both."""

    def __init__(self, impl):
        super().__init__()
        from compt_scale.kernels import IFDProjection
        torch.manual_seed(1)
        self.body = nn.Linear(D_IN, D_S)
        self.ifd = IFDProjection(D_S, D_T, init="default", impl=impl)

    def forward(self, x, t, group=None):
        return self.ifd(self.body(x).view(1, -1, D_S), t.view(1, -1, D_T), ALPHA, group)


def _grads(loss, *params):
    loss.backward()
    return [p.grad.clone() for p in params]


def _worker(rank, outdir):
    import deepspeed
    import torch.distributed as dist

    from compt_scale.kernels import fused_ifd_loss
    deepspeed.init_distributed(dist_backend="gloo")
    d, rows, res = _data(), _rows(rank), {}
    for impl in ("reference", "triton"):
        for red in ("mean", "sum"):
            s, w, b = (d[k].clone().requires_grad_() for k in ("s", "w", "b"))
            t = d["t"].clone().requires_grad_()
            loss = fused_ifd_loss(s[rows], t[rows], w, b, ALPHA, dist.group.WORLD, grad_reduce=red,
                                  impl=impl)
            res[f"group/{impl}/{red}"] = [loss.detach()] + _grads(loss, s, w, b) + [t.grad]
        model = Toy(impl)
        ref = copy.deepcopy(model)  # unsharded single-process oracle on ALL tokens
        ref_loss = ref(d["x"], d["t"])
        ref_grads = _grads(ref_loss, ref.ifd.weight, ref.ifd.bias, ref.body.weight)
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
               "train_batch_size": 2, "zero_allow_untested_optimizer": True, "zero_optimization": {
                   "stage": 3, "stage3_param_persistence_threshold": 0}}
        engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                          optimizer=torch.optim.SGD(model.parameters(), lr=LR))
        w = engine.module.ifd.weight
        partitioned = (w.numel() == 0, tuple(w.ds_shape), w.ds_tensor.numel())
        try:  # reading the weight outside the module's forward must fail loudly, not compute garbage
            fused_ifd_loss(d["s"][rows], d["t"][rows], w, None, impl=impl)
            raise AssertionError("ungathered ZeRO-3 weight was accepted")
        except RuntimeError as e:
            assert "not gathered" in str(e)
        loss = engine(d["x"][rows], d["t"][rows], dist.group.WORLD)
        engine.backward(loss)
        got = [deepspeed.utils.safe_get_full_grad(p).clone()
               for p in (w, engine.module.ifd.bias, engine.module.body.weight)]
        engine.step()
        with deepspeed.zero.GatheredParameters([w]):
            w_after = w.detach().clone()
        res[f"zero3/{impl}"] = dict(partitioned=partitioned, loss=loss.detach(), ref_loss=ref_loss.detach(),
                                    grads=got, ref_grads=ref_grads, w_after=w_after,
                                    w_expect=ref.ifd.weight.detach() - LR * ref_grads[0])
    from compt_scale.kernels import IFDProjection
    with deepspeed.zero.Init(config_dict_or_path=cfg):  # built partitioned: identity init must survive
        proj = IFDProjection(D_S, D_T)
    with deepspeed.zero.GatheredParameters([proj.weight]):
        res["zero_init_identity"] = (proj.weight.detach().clone(), proj.weight.ds_tensor.numel())
    torch.save(res, Path(outdir) / f"rank{rank}.pt")
    dist.barrier()



def test_two_gloo_ranks_group_and_zero3(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(tmp_path)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=open(tmp_path / f"log{r}", "w"), stderr=subprocess.STDOUT)
             for r in range(2)]
    rcs = [p.wait(timeout=240) for p in procs]
    assert rcs == [0, 0], "\n".join((tmp_path / f"log{r}").read_text()[-3000:] for r in range(2))
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    d = _data()
    from compt_scale.kernels import fused_ifd_loss
    s, w, b = (d[k].clone().requires_grad_() for k in ("s", "w", "b"))
    full = fused_ifd_loss(s, d["t"], w, b, ALPHA, impl="reference")  # one process, all tokens
    full_grads = _grads(full, s, w, b)
    close = dict(rtol=1e-5, atol=1e-6)
    for impl in ("reference", "triton"):
        for red, factor in (("mean", 2.0), ("sum", 1.0)):
            r0, r1 = (r[f"group/{impl}/{red}"] for r in res)
            for r in (r0, r1):
                torch.testing.assert_close(r[0], full.detach(), **close)   # global mean on every rank
                assert r[4] is None                                          # teacher: no gradient
            # student rows: each rank owns its tokens' gradient (x world_size under "mean")
            for rank, r in enumerate((r0, r1)):
                torch.testing.assert_close(r[1][_rows(rank)] / factor, full_grads[0][_rows(rank)], **close)
            # weight/bias: the ranks' mean ("mean") or sum ("sum") is the unsharded gradient
            for i in (2, 3):
                torch.testing.assert_close((r0[i] + r1[i]) / factor, full_grads[i - 1], **close)
        for r in res:
            z = r[f"zero3/{impl}"]
            empty, full_shape, local_numel = z["partitioned"]
            assert empty and full_shape == (D_T, D_S) and local_numel < D_T * D_S  # really partitioned
            torch.testing.assert_close(z["loss"], z["ref_loss"], **close)
            for g, rg in zip(z["grads"], z["ref_grads"], strict=True):
                torch.testing.assert_close(g, rg, **close)
            torch.testing.assert_close(z["w_after"], z["w_expect"], **close)
    for r in res:
        w, local = r["zero_init_identity"]
        assert local < D_T * D_S
        torch.testing.assert_close(w, torch.eye(D_T, D_S))


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2])
