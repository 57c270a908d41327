"""vitlab-bench attention: forward + backward time of every attention backend at ViT sequence lengths.

    vitlab-bench attention                                   # conf/bench_attention.yaml: ViT-B heads, N = 65..1025
    vitlab-bench attention seq_lens=[197,577] batch_size=64 backends=[math,sdpa,flash_attn] output_file=att.json

For each sequence length N and backend, q, k, v of shape (batch_size, num_heads, N, head_dim) go through
``vitlab.layers.attention.attention(..., backend=...)`` forward and backward. Rows report

- the median time of ``repeats`` timed runs (after ``warmup``; CUDA synchronised), every backend timed
  once per round in turn so load drift hits all alike;
- ``speedup_vs_math``: the ``math`` reference's time divided by the backend's, measured in the same run;
- the largest absolute error of the output and of the gradients (dq, dk, dv) against ``math`` computed
  in float32 from the same inputs;
- the kernel that ran, from vitlab's kernel record (``sdpa:flash``, ``flash_attn:dense``, ...), and the
  attention ops torch's profiler saw (``aten::_scaled_dot_product_flash_attention`` ...), which confirm it.

A backend that cannot run on these inputs (sdpa_efficient on the CPU, flash_attn without the package)
gives an ``n/a`` row with the reason instead of stopping the run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from omegaconf import DictConfig

from vitlab.cli.bench.common import PROG, compose, cpu_model, write_results
from vitlab.cli.common import fail

# Substrings of profiler event names that belong to attention kernels (aten ops, CUDA kernels,
# the flash-attn package's ops). vitlab's own math backend is matmul + softmax: it shows none.
_ATTENTION_OP_MARKS = ("attention", "attn", "flash", "fmha", "sdp")
# The kernel of a record entry -> the profiler op that confirms it ran.
_KERNEL_OPS = {"flash": "_scaled_dot_product_flash_attention", "efficient": "_scaled_dot_product_efficient_attention",
               "cudnn": "_scaled_dot_product_cudnn_attention", "math": "_scaled_dot_product_attention_math",
               "dense": "flash", "varlen": "flash"}
_DTYPES = ("auto", "float32", "bfloat16", "float16")


def attention_ops_ran(fn: Callable[[], Any]) -> list[str]:
    """Run ``fn`` under torch.profiler (CPU, and CUDA where present) and return the sorted distinct names
    of the attention-related ops and kernels it ran, e.g. ['aten::_scaled_dot_product_flash_attention', ...].

    Works for compiled models too (vitlab's kernel record does not count calls traced by torch.compile).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    names = {evt.name for evt in prof.events()}
    return sorted(n for n in names if any(mark in n.lower() for mark in _ATTENTION_OP_MARKS))


def _confirmed(kernels: Sequence[str], ops: Sequence[str]) -> bool | None:
    """Whether the profiler saw the op of every recorded kernel (None when the record names no kernel)."""
    wanted = [_KERNEL_OPS[k.split(":", 1)[1]] for k in kernels
              if not k.startswith("math:") and k.split(":", 1)[1] in _KERNEL_OPS]
    if not wanted:
        return None
    return all(any(w in op for op in ops) for w in wanted)


def bench_attention(cfg: DictConfig) -> dict:
    """Measure the backends configured by ``cfg`` (conf/bench_attention.yaml); return the results dict."""
    import torch

    from vitlab.layers.attention import (
        BACKENDS,
        attention,
        backend_unavailable_reason,
        kernel_record,
        reset_kernel_record,
    )

    def say(msg: str) -> None:
        print(f"[bench] {msg}", flush=True)

    backends = list(dict.fromkeys(str(b) for b in cfg.backends))
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        fail(f"unknown attention backend(s) {bad} in backends; valid choices: {', '.join(BACKENDS)}"
             if bad else f"backends is empty; list some of {', '.join(BACKENDS)}")
    if "math" in backends:                                       # the reference runs first, once
        backends.remove("math")
    backends.insert(0, "math")
    seq_lens = [int(n) for n in cfg.seq_lens]
    B, H, Dh = int(cfg.batch_size), int(cfg.num_heads), int(cfg.head_dim)
    if not seq_lens or min(seq_lens) < 1 or min(B, H, Dh) < 1 or int(cfg.repeats) < 1 or int(cfg.warmup) < 0:
        fail("seq_lens must be a non-empty list of lengths >= 1; batch_size, num_heads, head_dim and repeats >= 1; "
             f"warmup >= 0 (got seq_lens={list(cfg.seq_lens)}, batch_size={B}, num_heads={H}, head_dim={Dh}, "
             f"repeats={cfg.repeats}, warmup={cfg.warmup})")
    if cfg.device not in ("auto", "cpu", "cuda"):
        fail(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("device=cuda but torch sees no CUDA device; use device=auto or device=cpu")
    if cfg.dtype not in _DTYPES:
        fail(f"dtype must be one of {', '.join(_DTYPES)}, got {cfg.dtype!r}")
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if cfg.dtype == "auto" \
        else getattr(torch, cfg.dtype)
    on_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    say(f"device {device}, dtype {dtype}, batch {B}, heads {H}, head dim {Dh}, seq_lens {seq_lens}, "
        f"backends {backends}, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")

    rows: list[dict] = []
    for n in seq_lens:
        g = torch.Generator(device="cpu").manual_seed(int(cfg.seed) + n)
        q, k, v = (torch.randn(B, H, n, Dh, generator=g).to(device, dtype) for _ in range(3))
        cot = torch.randn(B, H, n, Dh, generator=g).to(device, dtype)     # a fixed cotangent for backward

        def step(backend: str, q=q, k=k, v=v, cot=cot) -> tuple:
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = attention(*leaves, backend=backend)
            return (out, *torch.autograd.grad(out, leaves, cot))

        # float32 math on the same inputs: the reference for the errors
        ref = step("math", *(t.float() for t in (q, k, v, cot)))
        runnable: dict[str, dict] = {}
        for b in backends:
            why = backend_unavailable_reason(b, q, k, v)
            if why is None:
                reset_kernel_record()
                try:
                    got = step(b)
                except RuntimeError as e:                            # a kernel that refused at run time
                    why = str(e)
            if why is not None:
                rows.append({"seq_len": n, "backend": b, "status": "n/a", "reason": why})
                say(f"N={n:<5} {b:<15} n/a: {why}")
                continue
            kernels = sorted(kernel_record())
            errs = [(x.float() - r).abs().max().item() for x, r in zip(got, ref)]
            ops = attention_ops_ran(lambda b=b: step(b)) if cfg.profile else []
            runnable[b] = {"seq_len": n, "backend": b, "status": "ok", "kernel": ", ".join(kernels),
                           "profiler_ops": ops, "profiler_confirms": _confirmed(kernels, ops) if cfg.profile else None,
                           "max_abs_err_out": errs[0], "max_abs_err_grad": max(errs[1:]), "ms_runs": []}
            del got
        for _ in range(int(cfg.warmup)):
            for b in runnable:
                step(b)
        sync()
        for _ in range(int(cfg.repeats)):
            for b, r in runnable.items():
                sync()
                t0 = time.perf_counter()
                step(b)
                sync()
                r["ms_runs"].append((time.perf_counter() - t0) * 1e3)
        # math may be missing (e.g. out of memory at large N)
        math_ms = statistics.median(runnable["math"]["ms_runs"]) if "math" in runnable else None
        for b, r in runnable.items():
            ms = statistics.median(r["ms_runs"])
            r["ms"], r["ms_runs"] = round(ms, 4), [round(x, 4) for x in r["ms_runs"]]
            r["speedup_vs_math"] = round(math_ms / ms, 3) if math_ms else None
            rows.append(r)
            vs = f"{r['speedup_vs_math']:6.2f}x math" if math_ms else "(no math reference)"
            say(f"N={n:<5} {b:<15} {ms:9.3f} ms  {vs}  kernel {r['kernel']}  "
                f"err out {r['max_abs_err_out']:.2e} grad {r['max_abs_err_grad']:.2e}")
        del q, k, v, cot, ref
    rows.sort(key=lambda r: (r["seq_len"], backends.index(r["backend"])))

    return {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if on_cuda else f" ({cpu_model()})"),
        "cpu": cpu_model(), "intra_op_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda": torch.version.cuda if on_cuda else None, "flash_attn": _flash_attn_version(),
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": B, "num_heads": H, "head_dim": Dh, "seq_lens": seq_lens, "backends": backends,
        "warmup": int(cfg.warmup), "repeats": int(cfg.repeats), "seed": int(cfg.seed),
        "reference": "math (vitlab's reference) for the speedup; math in float32 on the same inputs for the errors",
        "rows": rows, "date": datetime.now().isoformat(timespec="seconds"),
    }


def _flash_attn_version() -> str | None:
    try:
        import flash_attn
    except ImportError:
        return None
    return getattr(flash_attn, "__version__", "unknown")


def format_table(rows: Sequence[dict]) -> str:
    """The rows as plain aligned text."""
    head = (f"{'N':>6}  {'backend':<15}{'ms':>10}{'vs math':>9}{'err out':>10}{'err grad':>10}  "
            f"{'kernel (profiler)':<40}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['seq_len']:>6}  {r['backend']:<15}  n/a: {r['reason']}")
            continue
        seen = {True: " (seen)", False: " (NOT seen)", None: ""}[r["profiler_confirms"]]
        vs = f"{r['speedup_vs_math']:>8.2f}x" if r["speedup_vs_math"] else f"{'-':>9}"
        lines.append(f"{r['seq_len']:>6}  {r['backend']:<15}{r['ms']:>10.3f}{vs}"
                     f"{r['max_abs_err_out']:>10.1e}{r['max_abs_err_grad']:>10.1e}  {r['kernel']}{seen}")
    return "\n".join(lines)


def attention_main(argv: Sequence[str]) -> None:
    cfg = compose("bench_attention", argv)
    results = bench_attention(cfg)
    results["command"] = " ".join([PROG, "attention", *argv])
    print(f"\nattention fwd+bwd, batch {results['batch_size']}, {results['num_heads']} heads x {results['head_dim']}, "
          f"{results['dtype']}, device {results['device']}, torch {results['torch']}\n{format_table(results['rows'])}",
          flush=True)
    write_results(cfg.output_file, results)


main = attention_main          # the subcommand's entry (vitlab.cli.bench.SUBCOMMANDS)
