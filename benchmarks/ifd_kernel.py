"""Benchmark the IFD loss (forward + backward): eager PyTorch, torch.compile of it, the project's
reference path and the chunked kernel, side by side in one process.

GPU (default): bf16, N in {8K, 64K} tokens x (d_s, d_t) in {(1024, 512), (4096, 2048)}; the issue's
headline shape, 64K tokens 4096 -> 2048, is one of the four. --extended adds N=256K and (2048, 1024),
(4096, 4096). Implementations:
  eager      alpha * F.mse_loss(F.linear(s, w, b), t), as a user writes it;
  compile    torch.compile of eager (inductor);
  reference  fused_ifd_loss(impl="reference"), what `ifd.kernel: reference` runs;
  kernel     fused_ifd_loss(impl="triton"), the chunked kernel `ifd.kernel: auto` runs on CUDA;
  kernel@XMiB  (--chunk-mib X,...) the kernel with triton_ifd.CHUNK_BYTES = X MiB.

Time ("ms"): fwd+bwd per step, measured as ITERS steps back to back between one pair of CUDA events,
after an L2 flush (a write of twice the L2 size), median over REPS such pairs. This is what a training
step sees, CPU launch overhead included where the GPU outruns the host (small shapes). "graph_ms":
the same step captured once in a CUDA graph and replayed ITERS times per event pair: GPU time only.

Extra memory ("extra_bytes"), the one definition used here and in the README: the peak of
torch.cuda.max_memory_allocated() during one fwd+bwd step, minus what was allocated before the step
(inputs, weights: gradients set to None), minus the bytes of the gradients the step returns (dS, dW,
db: every implementation must produce them). "peak_bytes" is the same without the last subtraction.

roofline_frac: 3 GEMMs x 2*N*d_s*d_t FLOPs per step over the bf16 matmul rate measured here (an
8192^3 torch.mm timed the same way).

--smoke: tiny shapes on CPU so the script itself is tested (the kernel's Triton pass under
TRITON_INTERPRET=1, torch.compile with backend="eager": no C++ toolchain needed); no memory figures,
timings meaningless. The JSON is rewritten after every measurement: a run cut short keeps its rows.
"""
import os
import sys

if "--smoke" in sys.argv:
    # Must be set before triton is imported (torch may import it): first thing in the process.
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from compt_scale.kernels import fused_ifd_loss, triton_ifd  # noqa: E402

GPU_NS = (8 * 1024, 64 * 1024)
GPU_DIMS = ((1024, 512), (4096, 2048))
EXTENDED_NS = (256 * 1024,)
EXTENDED_DIMS = ((2048, 1024), (4096, 4096))
SMOKE_NS = (40, 77)
SMOKE_DIMS = ((48, 32), (40, 24))
HEADLINE = (64 * 1024, 4096, 2048)
# Issue 20's targets for the kernel: time at the headline shape, extra memory at every shape.
TARGETS = {"time_over_eager_at_headline": 1.0, "time_over_compile_at_headline": 1.0,
           "extra_over_eager_every_shape": 0.25}
ALPHA = 0.5


def eager_ifd(s, t, w, b):
    return ALPHA * F.mse_loss(F.linear(s, w, b), t)


def reference_ifd(s, t, w, b):
    return fused_ifd_loss(s, t, w, b, ALPHA, impl="reference")


def kernel_ifd(s, t, w, b):
    return fused_ifd_loss(s, t, w, b, ALPHA, impl="triton")


@contextmanager
def chunk_bytes(nbytes):
    old = triton_ifd.CHUNK_BYTES
    triton_ifd.CHUNK_BYTES = nbytes
    try:
        yield
    finally:
        triton_ifd.CHUNK_BYTES = old


def kernel_with_chunk(mib: float):
    def fn(s, t, w, b):
        with chunk_bytes(max(1, int(mib * 2 ** 20))):
            return kernel_ifd(s, t, w, b)
    return fn


class Timer:
    """ITERS calls of fn between one pair of events after an L2 flush, median over REPS (CUDA);
    wall clock around the same loop on CPU."""

    def __init__(self, dev, iters, reps):
        self.dev, self.iters, self.reps = dev, iters, reps
        self.flush_buf = None
        if dev.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or (64 << 20)
            self.flush_buf = torch.empty(2 * l2, dtype=torch.uint8, device=dev)

    def seconds(self, fn) -> float:
        times = []
        for _ in range(self.reps):
            if self.dev.type == "cuda":
                self.flush_buf.zero_()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(self.iters):
                    fn()
                e1.record()
                e1.synchronize()
                times.append(e0.elapsed_time(e1) / 1e3 / self.iters)
            else:
                t0 = time.perf_counter()
                for _ in range(self.iters):
                    fn()
                times.append((time.perf_counter() - t0) / self.iters)
        return statistics.median(times)


def matmul_rate(timer, dtype, n) -> float:
    """Measured dense matmul FLOP/s for an n^3 product (the roofline's denominator)."""
    a = torch.randn(n, n, device=timer.dev, dtype=dtype)
    b = torch.randn(n, n, device=timer.dev, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n ** 3 / timer.seconds(lambda: a @ b)


def extra_memory(step, params) -> tuple[int, int]:
    """(peak_bytes, extra_bytes) of one step, CUDA only: see the module docstring's definition."""
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    returned = sum(p.grad.numel() * p.grad.element_size() for p in params)
    return peak, peak - returned


def graph_seconds(fn, s, t, w, b, timer) -> float:
    """GPU time of one fwd+bwd step captured in a CUDA graph (no host launch overhead)."""
    params = (s, w, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream, as torch.cuda.graph requires
        for _ in range(3):
            torch.autograd.grad(fn(s, t, w, b), params)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.autograd.grad(fn(s, t, w, b), params)
    return timer.seconds(graph.replay)


def measure(fn, s, t, w, b, timer, warmup) -> dict:
    params = (s, w, b)
    out = {}

    def step():
        for p in params:
            p.grad = None
        loss = fn(s, t, w, b)
        loss.backward()
        out["loss"] = loss

    for _ in range(warmup):
        step()
    res = {"ms": timer.seconds(step) * 1e3, "loss": out["loss"].item()}
    if timer.dev.type == "cuda":
        res["peak_bytes"], res["extra_bytes"] = extra_memory(step, params)
    return res


def ratios(row: dict, kernel_keys) -> None:
    """Per kernel variant: time and extra memory over eager / compile, loss vs the reference."""
    e, c, r = row.get("eager", {}), row.get("compile", {}), row.get("reference", {})
    for k in kernel_keys:
        f = row.get(k, {})
        if "ms" not in f:
            continue
        if "ms" in e:
            f["time_over_eager"] = f["ms"] / e["ms"]
        if "ms" in c:
            f["time_over_compile"] = f["ms"] / c["ms"]
        if e.get("extra_bytes"):
            f["extra_over_eager"] = f["extra_bytes"] / e["extra_bytes"]
        if "loss" in r:
            f["loss_rel_diff_vs_reference"] = abs(f["loss"] - r["loss"]) / max(abs(r["loss"]), 1e-30)


def targets_met(rows) -> dict:
    out = {}
    for row in rows:
        f = row.get("kernel", {})
        shape = (row["N"], row["d_s"], row["d_t"])
        if "extra_over_eager" in f:
            out[f"extra_over_eager {shape}"] = f["extra_over_eager"] <= TARGETS["extra_over_eager_every_shape"]
        if shape == HEADLINE:
            for x in ("eager", "compile"):
                if f"time_over_{x}" in f:
                    out[f"time_over_{x} {shape}"] = f[f"time_over_{x}"] <= TARGETS[f"time_over_{x}_at_headline"]
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (tests the script)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument("--iters", type=int, default=None, help="steps per event pair (default 20; smoke 2)")
    ap.add_argument("--reps", type=int, default=None, help="event pairs, median taken (default 5; smoke 1)")
    ap.add_argument("--chunk-mib", default="", help="also time the kernel at these CHUNK_BYTES (MiB, comma list)")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--extended", action="store_true", help="also N=256K and d 2048/1024, 4096/4096")
    return ap.parse_args(argv)


def build_inputs(n, d_s, d_t, dev, dtype):
    g = torch.Generator(device=dev).manual_seed(0)
    s = torch.randn(n, d_s, device=dev, dtype=dtype, generator=g).requires_grad_()
    t = torch.randn(n, d_t, device=dev, dtype=dtype, generator=g)
    w = (torch.randn(d_t, d_s, device=dev, generator=g) / d_s ** 0.5).to(dtype).requires_grad_()
    b = torch.zeros(d_t, device=dev, dtype=dtype).requires_grad_()
    return s, t, w, b


def run_shape(n, d_s, d_t, impls, timer, args, dtype, write) -> dict:
    row = {"N": n, "d_s": d_s, "d_t": d_t}
    s, t, w, b = build_inputs(n, d_s, d_t, timer.dev, dtype)
    rate = write.header["matmul_flops"]
    warmup = 1 if args.smoke else 3
    for name, fn in impls.items():
        try:
            res = measure(fn, s, t, w, b, timer, warmup)
            res["roofline_frac"] = 3 * 2 * n * d_s * d_t / (res["ms"] / 1e3) / rate
            row[name] = res
        except torch.cuda.OutOfMemoryError as e:  # record and keep going
            row[name] = {"error": f"OOM: {str(e)[:200]}"}
            torch.cuda.empty_cache()
        write(row)
    if timer.dev.type == "cuda" and not args.no_graph and write.graph_ok:
        for name, fn in impls.items():
            if "ms" not in row[name]:
                continue
            try:
                row[name]["graph_ms"] = graph_seconds(fn, s, t, w, b, timer) * 1e3
            except Exception as e:  # noqa: BLE001 - record why, stop trying graphs, keep the row
                row[name]["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                write.graph_ok = False
                break
            write(row)
    ratios(row, [k for k in impls if k.startswith("kernel")])
    write(row)
    return row


class JsonWriter:
    """Rewrites the whole JSON after every measurement (a run cut short keeps what it measured)."""

    def __init__(self, path, header):
        self.path, self.header, self.rows, self.graph_ok = path, header, [], True
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, row):
        if not self.rows or self.rows[-1] is not row:
            self.rows.append(row)
        body = {**self.header, "targets": TARGETS, "results": self.rows,
                "targets_met": targets_met(self.rows)}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=2))
        tmp.replace(self.path)


def print_row(row, impls):
    cells = []
    for k in impls:
        r = row.get(k, {})
        if "ms" not in r:
            cells.append(f"{k} {r.get('error', 'failed')[:20]}")
            continue
        mib = "-" if r.get("extra_bytes") is None else f"{r['extra_bytes'] / 2 ** 20:.0f}MiB"
        graph = f" g{r['graph_ms']:.3f}" if "graph_ms" in r else ""
        cells.append(f"{k} {r['ms']:.3f}ms{graph} {mib}")
    f = row.get("kernel", {})
    tail = " | kernel/eager t {:.2f} mem {:.2f}".format(f.get("time_over_eager", float("nan")),
                                                        f.get("extra_over_eager", float("nan")))
    print(f"{row['N']:>7} {row['d_s']:>5} {row['d_t']:>5} | " + " | ".join(cells) + tail, flush=True)


def main(argv=None):
    args = parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("ifd_kernel.py: no CUDA device; use --smoke to test the script on CPU")
    dev = torch.device("cpu" if smoke else "cuda")
    dtype = torch.bfloat16
    ns, dims = (SMOKE_NS, SMOKE_DIMS) if smoke else (GPU_NS, GPU_DIMS)
    if args.extended and not smoke:
        ns, dims = ns + EXTENDED_NS, dims + EXTENDED_DIMS
    timer = Timer(dev, args.iters or (2 if smoke else 20), args.reps or (1 if smoke else 5))
    out = args.out or Path(__file__).resolve().parent / "results" / (
        "ifd_kernel-cpu-smoke.json" if smoke else "ifd_kernel.json")
    impls = {"eager": eager_ifd,
             "compile": torch.compile(eager_ifd, backend="eager" if smoke else "inductor", dynamic=False),
             "reference": reference_ifd, "kernel": kernel_ifd}
    for mib in filter(None, args.chunk_mib.split(",")):
        impls[f"kernel@{float(mib):g}MiB"] = kernel_with_chunk(float(mib))
    import triton
    header = {"device": "cpu (smoke: timings meaningless)" if smoke else torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype), "alpha": ALPHA,
              "iters_per_event_pair": timer.iters, "reps": timer.reps,
              "chunk_bytes": triton_ifd.CHUNK_BYTES, "min_chunks": triton_ifd.MIN_CHUNKS,
              "matmul_flops": matmul_rate(timer, dtype, 256 if smoke else 8192),
              "definitions": {"ms": "fwd+bwd per step, ITERS steps per CUDA event pair after an L2 flush, "
                                    "median of REPS", "graph_ms": "same, one step captured in a CUDA graph",
                              "extra_bytes": "peak allocated during one fwd+bwd step - allocated before "
                                             "- bytes of the returned gradients (dS, dW, db)",
                              "roofline_frac": "3 GEMMs x 2*N*d_s*d_t / time / measured bf16 matmul rate"}}
    write = JsonWriter(out, header)
    print(f"# {header['device']}  torch {header['torch']}  bf16 matmul {header['matmul_flops'] / 1e12:.1f} "
          f"TFLOP/s  (ms: eager loop per event pair, g: CUDA graph; MiB: extra memory, grads excluded)")
    for n in ns:
        for d_s, d_t in dims:
            print_row(run_shape(n, d_s, d_t, impls, timer, args, dtype, write), impls)
    print(f"targets: {TARGETS}")
    for k, ok in targets_met(write.rows).items():
        print(f"  {k}: {'ok' if ok else 'MISSED'}")
    print(f"wrote {out}")
    return write.rows


if __name__ == "__main__":
    main()
