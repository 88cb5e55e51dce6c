"""Benchmark entcal's batched KV-cached sampler against transformers' ``model.generate``.

Same model, prompts (the built-in python-docs corpus, or random ids), prompt length, batch and
seed for every variant, all timed in one run and interleaved round-robin (so CPU contention from
other processes hits each variant alike):

  * entcal      ``tasks.generate.generate`` with ``DecodingSpec(temperature=1.0)``, the loaded model
                without EOS ids so every row runs to ``--new-tokens``; records per-step entropy and
                log-prob through ``kernels.token_stats``, draws by ``kernels.gumbel_argmax``;
                preallocated (static) KV cache; on CUDA the decode step is compiled with CUDA graphs
                (``--compile``), as in a study.
  * entcal_dynamic  the same with transformers' growing KV cache (``kv_cache="dynamic"``), the
                one ``model.generate`` uses: the difference is what writing the cache in place buys.
  * entcal_nostats  the same call with ``tasks.generate.kernels`` swapped (inside this benchmark
                only, restored afterwards) for a stand-in whose ``token_stats`` returns zeros of the
                right shape (the draws are the real ``gumbel_argmax``'s): FOR TIMING ONLY, its
                statistics are meaningless. The difference to ``entcal`` is the cost of the per-step
                statistics.
  * hf_generate ``model.generate(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                min_new_tokens=N, max_new_tokens=N, use_cache=True)`` after ``torch.manual_seed``.
  * forward_only  the floor: prefill + N-1 single-token forwards through the KV cache with no
                sampling at all (fed token 0), i.e. what any sampler has to pay for the model.
  * vllm        vLLM alone (``engine: vllm``'s sampler): ``LLM.generate`` of the batch, one request
                per row with its own seed (``tasks.vllm_engine.sampling_params``, plus
                ``ignore_eos`` / ``min_tokens=N`` so every row makes N tokens), ``max_num_seqs`` =
                batch. The engine is started once before the warm-up (``vllm_start_s``); on CUDA it
                compiles and captures CUDA graphs unless ``--compile off``, as in a study.
  * vllm_rescore  the same generation plus entcal's teacher-forced re-score of those tokens
                (``tasks.vllm_engine.rescore`` with the transformers copy of the model): what a study
                with ``engine: vllm`` pays per shard.
The vLLM variants run when vllm is importable (else they are skipped with a one-line reason).
vLLM reads the model from a directory: ``--model-path`` as it is, the bundled SmolLM2 dequantised
once (``tasks.vllm_engine.weights``). ``--random-llama 0.5b`` builds a Llama of Qwen2.5-0.5B's shape
with random weights (and the bundled SmolLM2 tokenizer) once under ``$ENTCAL_STATE_DIR/bench-models/``,
so a GPU can be measured at scale without downloads: FOR TIMING ONLY, its samples are noise.

Every variant makes exactly batch x N new tokens (asserted). Each is warmed up once, then timed
``--repeats`` times; tokens/s come from the best (shortest) time, and the spread
((worst - best) / best) is reported next to it. Ratios:
  speedup_vs_hf_generate = entcal tok/s / hf_generate tok/s
  static_cache_speedup   = t_entcal_dynamic / t_entcal
  stats_overhead         = (t_entcal - t_entcal_nostats) / t_entcal_nostats
  forward_fraction_*     = t_forward_only / t_variant (1.0 = no overhead beyond the model)
  rescore_overhead       = (t_vllm_rescore - t_vllm) / t_vllm
  vllm_engine_speedup_vs_entcal = t_entcal / t_vllm_rescore
  vllm_vs_hf_generate    = vllm tok/s / hf_generate tok/s
The same ratios from process CPU seconds are under "cpu_time": on a shared CPU they are steadier
than wall time (exact with ``--threads 1``; with more threads OpenMP spin-waits count too; on CUDA
vLLM's engine core runs in its own process, whose CPU seconds are not counted).

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

HF_VARIANTS = ("entcal", "entcal_nostats", "entcal_dynamic", "hf_generate", "forward_only")
VLLM_VARIANTS = ("vllm", "vllm_rescore")
VARIANTS = HF_VARIANTS + VLLM_VARIANTS
# --random-llama shapes (LlamaConfig fields); 0.5b: Qwen2.5-0.5B's (494M parameters, tied embeddings)
RANDOM_LLAMAS = {"0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                          "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(source: str, tokenizer, batch: int, prompt_tokens: int, vocab: int, seed: int):
    """The prompts table [batch rows]: python-docs text cut to ``prompt_tokens``, or random ids."""
    import polars as pl

    from entcal.tasks.config import DatasetSpec
    from entcal.tasks.contracts import PROMPTS_SCHEMA
    from entcal.tasks.datasets import build_prompts, documents

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
    from entcal.kernels.reference import TokenStats

    z = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    return TokenStats(z, z, z)


@contextlib.contextmanager
def _stats_off():
    """Swap tasks.generate's ``kernels`` module reference (not the kernels module itself) for one whose
    token_stats is the stand-in and whose sampler (gumbel_argmax, seed_words) is the real one."""
    import entcal.tasks.generate as gen

    saved = gen.kernels
    gen.kernels = types.SimpleNamespace(token_stats=_no_stats, gumbel_argmax=saved.gumbel_argmax,
                                        seed_words=saved.seed_words)
    try:
        yield
    finally:
        gen.kernels = saved


def _runners(lm, prompts, *, new_tokens: int, batch: int, seed: int, device, compiled: bool):
    """The entcal and transformers variants on ``lm`` (tasks.models.LoadedModel): entcal's sampler with no
    EOS ids (every row makes ``new_tokens``), compiled when ``compiled`` and the cache is static."""
    import dataclasses

    from entcal.tasks.config import DecodingSpec
    from entcal.tasks.contracts import GenerationKnobs
    from entcal.tasks.generate import generate, left_pad

    model, pad = lm.model, lm.pad_id
    decoding = DecodingSpec(temperature=1.0)
    knobs = GenerationKnobs(max_new_tokens=new_tokens, samples_per_prompt=1, seed=seed, batch_size=batch)
    ids, mask = left_pad(prompts["prompt_ids"].to_list(), pad, device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    width = ids.shape[1]

    last: dict[str, list] = {}  # token ids of each entcal variant's latest run

    def entcal(key: str = "entcal", kv_cache: str = "static") -> int:
        sampler = dataclasses.replace(lm, eos_ids=(), compiled=compiled and kv_cache == "static")
        df = generate(sampler, prompts, decoding, knobs, kv_cache=kv_cache)
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


def _vllm_missing() -> str | None:
    """Why the vLLM variants cannot run here (vllm not importable), or None."""
    try:
        import vllm  # noqa: F401
    except Exception as err:  # noqa: BLE001  ImportError, or a broken install (e.g. torchvision for another torch)
        return f"vllm is not importable ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]})"
    return None


def _random_llama(size: str) -> Path:
    """A Llama of ``RANDOM_LLAMAS[size]``'s shape with random weights (seed 0, bfloat16) and the bundled
    SmolLM2 tokenizer (the vocabulary grows to the tokenizer's if it would not fit), saved once under
    ``$ENTCAL_STATE_DIR/bench-models/`` (to a temporary name, then renamed). For timing only."""
    import hashlib
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from entcal.storage.settings import state_dir
    from entcal.tasks.config import ModelSpec
    from entcal.tasks.models import load_tokenizer

    tok = load_tokenizer(ModelSpec(name="smollm2-135m"))
    shape = dict(RANDOM_LLAMAS[size])
    shape["vocab_size"] = max(shape["vocab_size"], len(tok))
    shape.update(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    digest = hashlib.sha256(json.dumps([shape, len(tok)], sort_keys=True).encode()).hexdigest()[:12]
    out = state_dir() / "bench-models" / f"random-llama-{size}-{digest}"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _vllm_runners(llm, model, prompts, *, new_tokens: int, rows: int, seed: int, pad: int):
    """The vLLM variants: ``llm.generate`` of the batch (one seeded request per row, exactly
    ``new_tokens`` each), and the same plus entcal's teacher-forced re-score with ``model``, ``rows``
    rows per forward."""
    from entcal.tasks import vllm_engine
    from entcal.tasks.config import DecodingSpec
    from entcal.tasks.generate import row_seed

    decoding = DecodingSpec(temperature=1.0)
    ids = prompts["prompt_ids"].to_list()
    seeds = [row_seed(seed, ex, 0) for ex in prompts["example_id"].to_list()]
    requests = [{"prompt_token_ids": list(p)} for p in ids]
    last: dict = {}

    def generate():
        params = []
        for s in seeds:  # built as a study builds them (no EOS ids), then held to exactly new_tokens
            p = vllm_engine.sampling_params(decoding, max_new_tokens=new_tokens, seed=s, eos_ids=())
            p.ignore_eos, p.min_tokens = True, new_tokens
            params.append(p)
        outs = [o.outputs[0] for o in llm.generate(requests, params, use_tqdm=False)]
        return [list(o.token_ids) for o in outs], outs

    def vllm() -> int:
        gen, _ = generate()
        last["vllm"] = gen
        return sum(len(g) for g in gen)

    def vllm_rescore() -> int:
        gen, outs = generate()
        scored, _ = vllm_engine.rescore(model, ids, gen, decoding, batch_size=rows, pad_id=pad)
        assert [len(e) for e, _ in scored] == [len(g) for g in gen], "re-score: one entropy per generated token"
        last["vllm_rescore"] = gen
        reported = [vllm_engine.drawn_logprobs(o.logprobs) for o in outs]
        last["agreement"] = vllm_engine.agreement([lp for _, lp in scored], reported)
        return sum(len(e) for e, _ in scored)

    return {"vllm": vllm, "vllm_rescore": vllm_rescore}, last


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
    src.add_argument("--random-llama", choices=tuple(RANDOM_LLAMAS), default=None,
                     help="a Llama of this shape with random weights, built once (timing only; --prompts random)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--batch", type=int, default=None, help="rows per batch (default 8; 64 on CUDA)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--prompts", choices=("python-docs", "random"), default=None,
                    help="prompt source (default python-docs; random with --random-llama)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant (best is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="compile entcal's decode step (auto: on CUDA, as a study does)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma list of {VARIANTS} (vLLM ones are skipped when vllm is not importable)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    for name in ("new_tokens", "prompt_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        raise ValueError(f"--variants: expected names from {VARIANTS}, got {sorted(unknown)}")
    args.prompts = args.prompts or ("random" if args.random_llama else "python-docs")
    skipped: dict[str, str] = {}
    if any(v in VLLM_VARIANTS for v in variants):
        # vLLM logs to stdout by default: keep stdout for results (and only the JSON line under --json)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        if why := _vllm_missing():
            skipped = {v: why for v in variants if v in VLLM_VARIANTS}
            variants = [v for v in variants if v not in VLLM_VARIANTS]
            print(f"bench_generate: skipping {', '.join(skipped)}: {why}", file=sys.stderr, flush=True)
    use_vllm = any(v in VLLM_VARIANTS for v in variants)

    def log(msg: str) -> None:
        if not args.json:
            print(msg, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.json:  # keep stdout to the JSON line; library chatter goes to stderr or nowhere
        logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")

    from entcal.tasks.config import ModelSpec
    from entcal.tasks.models import load_model, max_positions

    t0 = time.perf_counter()
    if args.random_llama:  # built once: later runs find it (and only load the tokenizer)
        args.model_path = str(_random_llama(args.random_llama))
    build_s = time.perf_counter() - t0 if args.random_llama else None
    label = f"random-llama-{args.random_llama}" if args.random_llama else Path(args.model_path or ".").name
    source = {"path": args.model_path, "name": label} if args.model_path else {"name": args.model}
    # engine vllm: the spec vLLM starts from (and the GGUF dequantises from: the copy loaded here)
    spec = ModelSpec(**source, device=args.device, compile=args.compile, engine="vllm" if use_vllm else "entcal")
    t0 = time.perf_counter()
    lm = load_model(spec)
    load_s = time.perf_counter() - t0
    device = lm.device
    batch = args.batch or (64 if device.type == "cuda" else 8)
    if batch < 1:
        raise ValueError(f"--batch: expected >= 1, got {batch}")
    model = lm.model
    pad = lm.pad_id
    prompts = _prompts(args.prompts, lm.tokenizer, batch, args.prompt_tokens, model.config.vocab_size, args.seed)
    lens = [len(p) for p in prompts["prompt_ids"].to_list()]
    log(f"model {spec.label} on {device} ({model.dtype}), loaded in {load_s:.1f} s; batch {batch}, "
        f"prompt tokens {min(lens)}..{max(lens)}, new tokens {args.new_tokens}, "
        f"torch threads {torch.get_num_threads()}")
    compiled = lm.compiled  # tasks.models.pick_compile of --compile on this device, as a study picks it
    runners, last = _runners(lm, prompts, new_tokens=args.new_tokens, batch=batch, seed=args.seed, device=device,
                             compiled=compiled)
    want = batch * args.new_tokens
    vllm_info: dict = {}
    if use_vllm:
        from entcal.tasks import vllm_engine

        threads, set_threads = torch.get_num_threads(), torch.set_num_threads  # vLLM's CPU worker patches it
        if device.type == "cuda":
            torch.cuda.empty_cache()  # vLLM checks free memory against its share of the device
        t0 = time.perf_counter()
        # the context and re-scoring rows a study's shard uses (tasks.vllm_engine.generate)
        llm = vllm_engine.engine(spec, vllm_engine.max_model_len(max(lens), args.new_tokens, max_positions(spec)),
                                 batch)
        vllm_info = {"vllm": __import__("vllm").__version__, "vllm_start_s": time.perf_counter() - t0,
                     "vllm_weights": vllm_engine.weights(spec),
                     "vllm_eager": bool(llm.llm_engine.vllm_config.model_config.enforce_eager)}
        if torch.get_num_threads() != threads:  # give every variant the same threads
            log(f"vLLM set torch threads to {torch.get_num_threads()}; back to {threads}")
            set_threads(threads)
        log(f"vLLM {vllm_info['vllm']} started in {vllm_info['vllm_start_s']:.1f} s from "
            f"{vllm_info['vllm_weights']} (eager: {vllm_info['vllm_eager']})")
        rows = max(1, min(batch, vllm_engine.RESCORE_TOKENS // (max(lens) + args.new_tokens)))
        vr, vlast = _vllm_runners(llm, model, prompts, new_tokens=args.new_tokens, rows=rows, seed=args.seed,
                                  pad=pad)
        vllm_info["rescore_rows"] = rows
        runners.update(vr)

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
    if use_vllm:
        vllm_engine.close()
        vllm_info["vllm_same_tokens"] = vlast.get("vllm") == vlast.get("vllm_rescore") \
            if "vllm" in vlast and "vllm_rescore" in vlast else None
        vllm_info["vllm_agreement"] = vlast.get("agreement")  # vLLM's log q_t(token) vs the re-score's

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
        "random_llama": args.random_llama, "random_llama_build_s": build_s, "params": lm.params,
        "model_load_s": load_s, "variants": res,
        "nostats_same_tokens": same if "entcal" in last and "entcal_nostats" in last else None,
        "speedup_vs_hf_generate": ratio("entcal", "hf_generate", lambda a, b: b / a),
        "speedup_nostats_vs_hf_generate": ratio("entcal_nostats", "hf_generate", lambda a, b: b / a),
        "stats_overhead": ratio("entcal", "entcal_nostats", lambda a, b: (a - b) / b),
        "static_cache_speedup": ratio("entcal", "entcal_dynamic", lambda a, b: b / a),
        "dynamic_same_tokens": last.get("entcal") == last.get("entcal_dynamic") if "entcal_dynamic" in last else None,
        "forward_fraction_entcal": ratio("forward_only", "entcal", lambda a, b: a / b),
        "forward_fraction_hf_generate": ratio("forward_only", "hf_generate", lambda a, b: a / b),
        "rescore_overhead": ratio("vllm_rescore", "vllm", lambda a, b: (a - b) / b),
        "vllm_engine_speedup_vs_entcal": ratio("entcal", "vllm_rescore", lambda a, b: a / b),
        "vllm_vs_hf_generate": ratio("vllm", "hf_generate", lambda a, b: b / a),
        "skipped": skipped, **vllm_info,
        "max_spread": max((r["spread"] for r in res.values()), default=nan),
        # the same ratios from process CPU seconds: steadier than wall time when other processes
        # compete for the cores (exact with --threads 1; with more threads OpenMP spin-waits count)
        "cpu_time": {
            "speedup_vs_hf_generate": ratio("entcal", "hf_generate", lambda a, b: b / a, best_cpu),
            "stats_overhead": ratio("entcal", "entcal_nostats", lambda a, b: (a - b) / b, best_cpu),
            "static_cache_speedup": ratio("entcal", "entcal_dynamic", lambda a, b: b / a, best_cpu),
            "forward_fraction_entcal": ratio("forward_only", "entcal", lambda a, b: a / b, best_cpu),
            "forward_fraction_hf_generate": ratio("forward_only", "hf_generate", lambda a, b: a / b, best_cpu),
            "rescore_overhead": ratio("vllm_rescore", "vllm", lambda a, b: (a - b) / b, best_cpu),
            "vllm_engine_speedup_vs_entcal": ratio("entcal", "vllm_rescore", lambda a, b: a / b, best_cpu),
            "vllm_vs_hf_generate": ratio("vllm", "hf_generate", lambda a, b: b / a, best_cpu),
        },
    }
    for k in ("speedup_vs_hf_generate", "stats_overhead", "static_cache_speedup", "forward_fraction_entcal",
              "forward_fraction_hf_generate", "rescore_overhead", "vllm_engine_speedup_vs_entcal",
              "vllm_vs_hf_generate"):
        if result[k] is not None:
            log(f"{k}: {result[k]:.3f}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    rc = main()
    if rc:
        raise SystemExit(rc)
