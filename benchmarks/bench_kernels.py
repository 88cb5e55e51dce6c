"""Benchmark the Triton scoring kernels against PyTorch, relative to limits measured in one run.

On a CUDA device (N = 8192 rows, bf16):
  * token_stats over logits [N, V], V in (49152, 151936), vs PyTorch eager (float32 log-softmax,
    entropy, gather) and torch.compile of the same function. Effective bandwidth = logits bytes
    read / time, reported as a fraction of a device-to-device copy's bandwidth ((read + write)
    bytes / time) of the same tensor, timed in the same run.
  * fused_token_stats(hidden [N, D], weight [V, D]), D in (576, 896), vs matmul + token_stats,
    as a fraction of a bf16 matmul of the same shape (t_matmul / t), and the peak extra memory
    (torch.cuda.max_memory_allocated above the inputs) vs the N*V*2 logits bytes it avoids.
  * truncated_token_stats (top-k 50, top-p 0.9) on 1024 rows vs the PyTorch reference.
  * gumbel_argmax (the sampler's Gumbel-max draw, kernels.sampling_triton) over float32 logits
    [SAMPLE_ROWS, V], as a fraction of the copy bandwidth, and its draws against the numpy reference
    (kernels.sampling) on 64 rows: mismatches should be 0.
Without CUDA: a CPU smoke run of the Triton kernels in the interpreter against the reference on
small shapes (correctness only; no timing claims), with "gpu": null.

The last stdout line is one JSON object; `--json` prints only that line.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VOCABS = (49152, 151936)
SAMPLE_ROWS = 256  # rows of one sampling step (a generation batch)
DIMS = ((49152, 576), (151936, 896))  # (V, D) pairs of the fused benchmark


def _kernels():
    """Import the kernel modules; without CUDA make them run in Triton's interpreter."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "1"
        for name in ("entcal.kernels.stats", "entcal.kernels.truncation", "entcal.kernels.fused_head",
                     "entcal.kernels.sampling_triton"):
            if name in sys.modules:
                importlib.reload(sys.modules[name])
    from entcal import kernels
    from entcal.kernels import fused_head, reference, stats, truncation

    return kernels, reference, stats, truncation, fused_head


def eager_stats(logits: torch.Tensor, targets: torch.Tensor):
    """The PyTorch baseline: float32 log-softmax, entropy and target gather."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(lp.exp() * lp).sum(-1)
    return entropy, lp.gather(-1, targets[:, None])[:, 0]


def _max_err(a, b) -> float:
    d = [(x.double() - y.double()).abs().nan_to_num(0.0, 0.0, 0.0) for x, y in zip(a, b)]
    return max((e.max().item() for e in d if e.numel()), default=0.0)


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))  # ms


def _peak_extra(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def gpu_bench(n: int, log) -> dict:
    kernels, reference, stats, truncation, fused_head = _kernels()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    out = {"device": torch.cuda.get_device_name(dev), "n": n, "dtype": "bfloat16",
           "token_stats": [], "fused_token_stats": [], "truncated_token_stats": []}
    compiled = torch.compile(eager_stats)
    for v in VOCABS:
        x = (torch.randn(n, v, device=dev, generator=g) * 3).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device=dev, generator=g)
        nbytes = x.numel() * x.element_size()
        dst = torch.empty_like(x)
        t_copy = _bench(lambda: dst.copy_(x))
        del dst
        t_tri = _bench(lambda: stats.token_stats(x, t))
        t_eager = _bench(lambda: eager_stats(x, t))
        try:
            compiled(x, t)
            t_comp = _bench(lambda: compiled(x, t))
        except Exception as err:  # torch.compile may be unavailable; report, don't fail
            t_comp = None
            out.setdefault("errors", []).append(f"torch.compile V={v}: {err!r}"[:300])
        rows = slice(0, 512)
        err = _max_err(stats.token_stats(x[rows], t[rows]), reference.token_stats(x[rows], t[rows]))
        copy_bw = 2 * nbytes / (t_copy * 1e-3)
        rec = {
            "V": v, "logits_bytes": nbytes, "copy_ms": t_copy, "copy_GBps": copy_bw / 1e9,
            "triton_ms": t_tri, "eager_ms": t_eager, "compile_ms": t_comp,
            "triton_GBps": nbytes / (t_tri * 1e-3) / 1e9,
            "triton_fraction_of_copy_bw": nbytes / (t_tri * 1e-3) / copy_bw,
            "eager_fraction_of_copy_bw": nbytes / (t_eager * 1e-3) / copy_bw,
            "compile_fraction_of_copy_bw": None if t_comp is None
            else nbytes / (t_comp * 1e-3) / copy_bw,
            "max_abs_err_vs_reference": err,
        }
        out["token_stats"].append(rec)
        log(f"token_stats V={v}: triton {t_tri:.3f} ms ({rec['triton_fraction_of_copy_bw']:.2f} of "
            f"copy bw), eager {t_eager:.3f} ms, compile {t_comp} ms, copy {t_copy:.3f} ms")
        if v == VOCABS[-1]:
            m = 1024
            kw = dict(top_k=50, top_p=0.9, temperature=0.8)
            t_tr = _bench(lambda: truncation.truncated_token_stats(x[:m], t[:m], **kw))
            t_ref = _bench(lambda: reference.token_stats(x[:m], t[:m], **kw))
            err = _max_err(truncation.truncated_token_stats(x[:m], t[:m], **kw),
                           reference.token_stats(x[:m], t[:m], **kw))
            out["truncated_token_stats"].append(
                {"V": v, "n": m, **kw, "triton_ms": t_tr, "reference_ms": t_ref,
                 "max_abs_err_vs_reference": err})
            log(f"truncated V={v} n={m} {kw}: triton {t_tr:.3f} ms, reference {t_ref:.3f} ms")
        del x, t
        torch.cuda.empty_cache()
    for v, d in DIMS:
        h = (torch.randn(n, d, device=dev, generator=g) / 3).to(torch.bfloat16)
        w = (torch.randn(v, d, device=dev, generator=g) / math.sqrt(d)).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device=dev, generator=g)
        t_mm = _bench(lambda: h @ w.T)
        t_fused = _bench(lambda: fused_head.fused_token_stats(h, w, t))
        t_unfused = _bench(lambda: stats.token_stats(h @ w.T, t))
        mem_fused = _peak_extra(lambda: fused_head.fused_token_stats(h, w, t))
        mem_unfused = _peak_extra(lambda: stats.token_stats(h @ w.T, t))
        rows = slice(0, 256)
        err = _max_err(fused_head.fused_token_stats(h[rows], w, t[rows]),
                       reference.fused_token_stats(h[rows], w, t[rows]))
        rec = {
            "V": v, "D": d, "matmul_ms": t_mm, "fused_ms": t_fused, "unfused_ms": t_unfused,
            "matmul_TFLOPs": 2 * n * d * v / (t_mm * 1e-3) / 1e12,
            "fused_fraction_of_matmul": t_mm / t_fused,
            "unfused_fraction_of_matmul": t_mm / t_unfused,
            "fused_peak_extra_bytes": mem_fused, "unfused_peak_extra_bytes": mem_unfused,
            "logits_bytes_avoided": n * v * 2, "max_abs_err_vs_reference": err,
        }
        out["fused_token_stats"].append(rec)
        log(f"fused V={v} D={d}: fused {t_fused:.3f} ms ({rec['fused_fraction_of_matmul']:.2f} of "
            f"matmul), matmul+stats {t_unfused:.3f} ms, matmul {t_mm:.3f} ms, peak extra "
            f"{mem_fused / 2**20:.1f} MiB vs {mem_unfused / 2**20:.1f} MiB")
        del h, w, t
        torch.cuda.empty_cache()
    out["gumbel_argmax"] = []
    for v in VOCABS:
        z = torch.randn(SAMPLE_ROWS, v, device=dev, generator=g) * 3
        words = kernels.seed_words(range(1, SAMPLE_ROWS + 1)).to(dev)
        rec = {"V": v, "n": SAMPLE_ROWS, "dtype": "float32"}
        try:
            t_g = _bench(lambda: kernels.gumbel_argmax(z, words, 7, impl="triton"))
            got = kernels.gumbel_argmax(z[:64], words[:64], 7, impl="triton").cpu()
            want = kernels.gumbel_argmax(z[:64].cpu(), words[:64].cpu(), 7, impl="reference")
            rec.update(triton_ms=t_g, triton_GBps=z.numel() * 4 / (t_g * 1e-3) / 1e9,
                       mismatches_vs_reference=int((got != want).sum()))
            log(f"gumbel_argmax V={v} n={SAMPLE_ROWS}: triton {t_g:.3f} ms, "
                f"{rec['mismatches_vs_reference']} of 64 draws differ from the reference")
        except Exception as err:  # report, don't lose the other kernels' figures
            rec["error"] = f"{type(err).__name__}: {err}"[:300]
            out.setdefault("errors", []).append(f"gumbel_argmax V={v}: {rec['error']}")
        out["gumbel_argmax"].append(rec)
        del z
    return out


def cpu_smoke(log) -> dict:
    """Interpreter correctness on small shapes (no timing claims)."""
    kernels, reference, stats, truncation, fused_head = _kernels()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 1000, generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, 1000, (4,), generator=g)
    res = {"shape": [4, 1000], "dtype": "bfloat16"}
    res["token_stats_max_abs_err"] = _max_err(
        kernels.token_stats(x, t, temperature=0.8, impl="triton"),
        kernels.token_stats(x, t, temperature=0.8, impl="reference"))
    kw = dict(top_k=20, top_p=0.9, min_p=0.02)
    res["truncated_max_abs_err"] = _max_err(kernels.token_stats(x, t, impl="triton", **kw),
                                            kernels.token_stats(x, t, impl="reference", **kw))
    h = torch.randn(8, 64, generator=g).to(torch.bfloat16)
    w = (torch.randn(300, 64, generator=g) / 8).to(torch.bfloat16)
    tt = torch.randint(0, 300, (8,), generator=g)
    res["fused_max_abs_err"] = _max_err(kernels.fused_token_stats(h, w, tt, impl="triton"),
                                        kernels.fused_token_stats(h, w, tt, impl="reference"))
    z = torch.randn(3, 2049, generator=g) * 3
    z[0, ::3] = -math.inf
    words = kernels.seed_words([1, 2**40 + 3, 2**62 + 5])
    res["gumbel_argmax_mismatches"] = sum(
        int((kernels.gumbel_argmax(z, words, step, impl="triton")
             != kernels.gumbel_argmax(z, words, step, impl="reference")).sum()) for step in range(3))
    res["ok"] = max(res["token_stats_max_abs_err"], res["truncated_max_abs_err"],
                    res["fused_max_abs_err"]) < 1e-4 and res["gumbel_argmax_mismatches"] == 0
    log(f"cpu smoke (TRITON_INTERPRET=1): {res}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--n", type=int, default=8192, help="rows (GPU run)")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        if not args.json:
            print(msg, flush=True)

    if torch.cuda.is_available():
        result = {"gpu": gpu_bench(args.n, log), "cpu_smoke": None}
    else:
        result = {"gpu": None, "timings": "not measured (no CUDA device)",
                  "cpu_smoke": cpu_smoke(log)}
    print(json.dumps(result), flush=True)
    ok = result["gpu"] is not None or result["cpu_smoke"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    rc = main()
    if rc:
        raise SystemExit(rc)
