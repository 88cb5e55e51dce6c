"""Benchmark entcal's batched KV-cached sampler against transformers' ``model.generate``.

Same model, prompts (the built-in python-docs corpus, or random ids), prompt length, batch and
seed for every variant, all timed in one run and interleaved round-robin (so CPU contention from
other processes hits each variant alike):

  * entcal      ``tasks.generate.generate_table`` with ``DecodingSpec(temperature=1.0)``,
                ``eos_ids=()`` so every row runs to ``--new-tokens``; records per-step entropy and
                log-prob through ``kernels.token_stats``; preallocated (static) KV cache; on CUDA the
                decode step is compiled with CUDA graphs (``--compile``), as in a study.
  * entcal_dynamic  the same with transformers' growing KV cache (``kv_cache="dynamic"``), the
                one ``model.generate`` uses: the difference is what writing the cache in place buys.
  * entcal_nostats  the same call with ``tasks.generate.kernels`` swapped (inside this benchmark
                only, restored afterwards) for a stand-in whose ``token_stats`` returns zeros of the
                right shape: FOR TIMING ONLY, its statistics are meaningless. The difference to
                ``entcal`` is the cost of the per-step statistics.
  * hf_generate ``model.generate(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                min_new_tokens=N, max_new_tokens=N, use_cache=True)`` after ``torch.manual_seed``.
  * forward_only  the floor: prefill + N-1 single-token forwards through the KV cache with no
                sampling at all (fed token 0), i.e. what any sampler has to pay for the model.

Every variant makes exactly batch x N new tokens (asserted). Each is warmed up once, then timed
``--repeats`` times; tokens/s come from the best (shortest) time, and the spread
((worst - best) / best) is reported next to it. Ratios:
  speedup_vs_hf_generate = entcal tok/s / hf_generate tok/s
  static_cache_speedup   = t_entcal_dynamic / t_entcal
  stats_overhead         = (t_entcal - t_entcal_nostats) / t_entcal_nostats
  forward_fraction_*     = t_forward_only / t_variant (1.0 = no overhead beyond the model)
The same ratios from process CPU seconds are under "cpu_time": on a shared CPU they are steadier
than wall time (exact with ``--threads 1``; with more threads OpenMP spin-waits count too).

The last stdout line is one JSON object; ``--json`` prints only that line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
import types
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("entcal", "entcal_nostats", "entcal_dynamic", "hf_generate", "forward_only")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(source: str, tokenizer, batch: int, prompt_tokens: int, vocab: int, seed: int):
    """The prompts table [batch rows]: python-docs text cut to ``prompt_tokens``, or random ids."""
    import polars as pl

    from tasks.config import DatasetSpec
    from tasks.contracts import PROMPTS_SCHEMA
    from tasks.datasets import build_prompts, documents

    if source == "python-docs":
        df, stats = build_prompts(
            documents(DatasetSpec(name="python-docs")), tokenizer, label="python-docs",
            num_examples=batch, prompt_tokens=prompt_tokens, min_reference_tokens=1,
            max_reference_tokens=0, prompt_format="raw",
        )
        if stats.kept < batch:
            raise ValueError(f"python-docs: expected {batch} prompts, got {stats.kept}")
        return df
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_tokens), generator=g).tolist()
    return pl.DataFrame({"example_id": [f"random/{i}" for i in range(batch)], "dataset": ["random"] * batch,
                         "prompt_ids": ids, "reference_ids": [[] for _ in range(batch)],
                         "prompt_text": [None] * batch, "reference_text": [None] * batch}, schema=PROMPTS_SCHEMA)


def _no_stats(logits: torch.Tensor, targets=None, **_kw):
    """Stand-in for kernels.token_stats: zeros of the right shape. For timing only."""
    from kernels.reference import TokenStats

    z = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    return TokenStats(z, z, z)


@contextlib.contextmanager
def _stats_off():
    """Swap tasks.generate's ``kernels`` module reference (not the kernels module itself)."""
    import tasks.generate as gen

    saved = gen.kernels
    gen.kernels = types.SimpleNamespace(token_stats=_no_stats)
    try:
        yield
    finally:
        gen.kernels = saved


def _runners(model, prompts, *, new_tokens: int, batch: int, seed: int, pad: int, device, compiled: bool):
    from tasks.config import DecodingSpec
    from tasks.generate import generate_table, left_pad

    decoding = DecodingSpec(temperature=1.0)
    ids, mask = left_pad(prompts["prompt_ids"].to_list(), pad, device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    width = ids.shape[1]

    last: dict[str, list] = {}  # token ids of each entcal variant's latest run

    def entcal(key: str = "entcal", kv_cache: str = "static") -> int:
        df = generate_table(model, prompts, decoding, max_new_tokens=new_tokens, seed=seed,
                            batch_size=batch, eos_ids=(), pad_id=pad, kv_cache=kv_cache,
                            compiled=compiled and kv_cache == "static")
        last[key] = df["token_ids"].to_list()
        return int(df["token_ids"].list.len().sum())

    def entcal_nostats() -> int:
        with _stats_off():
            return entcal("entcal_nostats")

    def entcal_dynamic() -> int:
        return entcal("entcal_dynamic", kv_cache="dynamic")

    def hf_generate() -> int:
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad, use_cache=True,
        )
        assert out.shape == (ids.shape[0], width + new_tokens), tuple(out.shape)
        return int(out.shape[0] * (out.shape[1] - width))

    def forward_only() -> int:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        cache, m, pos = out.past_key_values, mask, positions[:, -1:] + 1
        tok = torch.zeros((ids.shape[0], 1), dtype=torch.long, device=device)
        for _ in range(new_tokens - 1):
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=-1)
            out = model(input_ids=tok, attention_mask=m, position_ids=pos, past_key_values=cache, use_cache=True)
            cache, pos = out.past_key_values, pos + 1
        out.logits[:, -1].sum().item()  # make the last step happen
        return ids.shape[0] * new_tokens

    return {"entcal": entcal, "entcal_nostats": entcal_nostats, "entcal_dynamic": entcal_dynamic,
            "hf_generate": hf_generate, "forward_only": forward_only}, last


def _time(fn, device) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, new tokens) of one call."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        n = fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default="smollm2-135m", help="built-in model alias")
    src.add_argument("--model-path", default=None, help="local save_pretrained directory (instead of --model)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--batch", type=int, default=None, help="rows per batch (default 8; 64 on CUDA)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--prompts", choices=("python-docs", "random"), default="python-docs")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant (best is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="compile entcal's decode step (auto: on CUDA, as a study does)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    for name in ("new_tokens", "prompt_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        raise ValueError(f"--variants: expected names from {VARIANTS}, got {sorted(unknown)}")

    def log(msg: str) -> None:
        if not args.json:
            print(msg, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.json:  # keep stdout to the JSON line; library chatter goes to stderr or nowhere
        logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")

    from tasks.config import ModelSpec
    from tasks.models import load_model, pad_id, pick_compile

    spec = ModelSpec(path=args.model_path, name=Path(args.model_path).name, device=args.device) \
        if args.model_path else ModelSpec(name=args.model, device=args.device)
    t0 = time.perf_counter()
    lm = load_model(spec)
    load_s = time.perf_counter() - t0
    device = lm.device
    batch = args.batch or (64 if device.type == "cuda" else 8)
    if batch < 1:
        raise ValueError(f"--batch: expected >= 1, got {batch}")
    model = lm.model
    pad = pad_id(lm.tokenizer)
    prompts = _prompts(args.prompts, lm.tokenizer, batch, args.prompt_tokens, model.config.vocab_size, args.seed)
    lens = [len(p) for p in prompts["prompt_ids"].to_list()]
    log(f"model {spec.label} on {device} ({model.dtype}), loaded in {load_s:.1f} s; batch {batch}, "
        f"prompt tokens {min(lens)}..{max(lens)}, new tokens {args.new_tokens}, "
        f"torch threads {torch.get_num_threads()}")
    compiled = pick_compile(args.compile, device)
    runners, last = _runners(model, prompts, new_tokens=args.new_tokens, batch=batch, seed=args.seed, pad=pad,
                             device=device, compiled=compiled)
    want = batch * args.new_tokens

    for v in variants:  # warm-up: one full run each
        dt, ct, n = _time(runners[v], device)
        assert n == want, f"{v}: expected {want} new tokens, got {n}"
        log(f"warm-up {v}: {dt:.2f} s")
    if "entcal" in last and "entcal_nostats" in last:  # the stand-in drops statistics, not tokens
        same = last["entcal"] == last["entcal_nostats"]
        if device.type == "cpu":
            assert same, "entcal_nostats sampled other tokens than entcal"
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):  # round-robin so background load is shared out evenly
        for v in variants:
            dt, ct, n = _time(runners[v], device)
            assert n == want, f"{v}: expected {want} new tokens, got {n}"
            times[v].append(dt)
            cpu[v].append(ct)
            log(f"repeat {r + 1}/{args.repeats} {v}: {dt:.2f} s wall, {ct:.2f} s cpu ({n / dt:.1f} tok/s)")

    res = {}
    for v, ts in times.items():
        best = min(ts)
        res[v] = {"best_s": best, "times_s": ts, "cpu_s": cpu[v], "tokens": want, "tokens_per_s": want / best,
                  "ms_per_step": 1e3 * best / args.new_tokens, "spread": (max(ts) - best) / best}
    best = {v: r["best_s"] for v, r in res.items()}
    best_cpu = {v: min(c) for v, c in cpu.items()}
    nan = math.nan

    def ratio(a: str, b: str, f, t=best) -> float | None:
        return f(t[a], t[b]) if a in t and b in t else None

    result = {
        "model": spec.label, "device": str(device), "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "dtype": str(model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "batch": batch, "compiled": compiled, "prompt_tokens": args.prompt_tokens, "prompt_lengths": [min(lens), max(lens)],
        "prompts": args.prompts, "new_tokens": args.new_tokens, "repeats": args.repeats, "seed": args.seed,
        "model_load_s": load_s, "variants": res,
        "nostats_same_tokens": same if "entcal" in last and "entcal_nostats" in last else None,
        "speedup_vs_hf_generate": ratio("entcal", "hf_generate", lambda a, b: b / a),
        "speedup_nostats_vs_hf_generate": ratio("entcal_nostats", "hf_generate", lambda a, b: b / a),
        "stats_overhead": ratio("entcal", "entcal_nostats", lambda a, b: (a - b) / b),
        "static_cache_speedup": ratio("entcal", "entcal_dynamic", lambda a, b: b / a),
        "dynamic_same_tokens": last.get("entcal") == last.get("entcal_dynamic") if "entcal_dynamic" in last else None,
        "forward_fraction_entcal": ratio("forward_only", "entcal", lambda a, b: a / b),
        "forward_fraction_hf_generate": ratio("forward_only", "hf_generate", lambda a, b: a / b),
        "max_spread": max((r["spread"] for r in res.values()), default=nan),
        # the same ratios from process CPU seconds: steadier than wall time when other processes
        # compete for the cores (exact with --threads 1; with more threads OpenMP spin-waits count)
        "cpu_time": {
            "speedup_vs_hf_generate": ratio("entcal", "hf_generate", lambda a, b: b / a, best_cpu),
            "stats_overhead": ratio("entcal", "entcal_nostats", lambda a, b: (a - b) / b, best_cpu),
            "static_cache_speedup": ratio("entcal", "entcal_dynamic", lambda a, b: b / a, best_cpu),
            "forward_fraction_entcal": ratio("forward_only", "entcal", lambda a, b: a / b, best_cpu),
            "forward_fraction_hf_generate": ratio("forward_only", "hf_generate", lambda a, b: a / b, best_cpu),
        },
    }
    for k in ("speedup_vs_hf_generate", "stats_overhead", "static_cache_speedup", "forward_fraction_entcal",
              "forward_fraction_hf_generate"):
        if result[k] is not None:
            log(f"{k}: {result[k]:.3f}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    rc = main()
    if rc:
        raise SystemExit(rc)
