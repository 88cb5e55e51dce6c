"""engine: vllm's two-way support check on a real engine (``make gpu-check``: bf16 on CUDA).

vLLM samples each decoding with its own sampler (on CUDA: bf16 logits, its Triton top-k / top-p), entcal
re-scores every step teacher-forced, and ``tasks.vllm_support`` compares, per step, the set vLLM sampled
from with entcal's kept set (``tasks.vllm_engine.generate``, as a study's shard runs it). The decodings:
the untruncated baseline (log-prob noise alone), top-k 50, top-p 0.9 at τ = 1 (on a random-weight model
nearly uniform rows: where vLLM's pivot search gives up and keeps the whole row), and top-p 0.9 and
top-k 20 + top-p 0.95 at τ = 0.15 (peaked rows, as a trained model's). ``--random-llama 0.5b`` builds
the Qwen2.5-0.5B-shaped random Llama of bench_generate.py once; the engine starts eager
(``--compile off``: seconds instead of a minute of CUDA graphs; the sampler is the same code).

The last stdout line is one JSON object: per decoding key the agreement (``support_differs_share``,
``support_larger_in_vllm``, ``support_smaller_in_vllm``, ``support_beyond_top_l``, ``implied_abs_dH_mean``,
the tolerances and the log-prob |Δ|), and what ran it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_generate (it puts the repository root on the path too)

DECODINGS = [{}, {"top_k": 50}, {"top_p": 0.9}, {"temperature": 0.15, "top_p": 0.9},
             {"temperature": 0.15, "top_k": 20, "top_p": 0.95}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-path", help="a save_pretrained directory")
    src.add_argument("--random-llama", choices=("0.5b",), help="bench_generate.py's random-weight Llama")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="off")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # stdout keeps the JSON line
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch
    from bench_generate import _prompts, _random_llama

    from entcal.tasks import vllm_engine
    from entcal.tasks.config import DecodingSpec, ModelSpec
    from entcal.tasks.contracts import GenerationKnobs
    from entcal.tasks.models import load_model

    t0 = time.perf_counter()
    path = str(_random_llama(args.random_llama)) if args.random_llama else args.model_path
    label = f"random-llama-{args.random_llama}" if args.random_llama else Path(path).name
    spec = ModelSpec(path=path, name=label, engine="vllm", dtype=args.dtype, compile=args.compile)
    lm = load_model(spec)
    prompts = _prompts("random", lm.tokenizer, args.rows, args.prompt_tokens, lm.model.config.vocab_size, 0)
    knobs = GenerationKnobs(max_new_tokens=args.new_tokens, samples_per_prompt=1, seed=0, batch_size=args.rows)
    result: dict = {"model": label, "device": str(lm.device), "dtype": str(lm.model.dtype).removeprefix("torch."),
                    "device_name": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else "cpu",
                    "vllm": __import__("vllm").__version__, "rows": args.rows, "new_tokens": args.new_tokens,
                    "decodings": {}}
    for kw in DECODINGS:
        d = DecodingSpec(**kw)
        t = time.perf_counter()
        _, a = vllm_engine.generate(lm, spec, prompts, d, knobs)
        result["decodings"][d.key] = {**a, "wall_s": time.perf_counter() - t}
        print(f"vllm_support {d.key}: support differs at {100 * a['support_differs_share']:.2f}% of {a['tokens']} "
              f"steps (vLLM's set larger {a['support_larger_in_vllm']}, smaller {a['support_smaller_in_vllm']}, "
              f"beyond the top {a['support_top_l']} {a['support_beyond_top_l']}), implied |ΔH| mean "
              f"{a['implied_abs_dH_mean']:.2e} nats; log-prob |Δ| mean {a['logprob_abs_diff_mean']:.2e}",
              file=sys.stderr, flush=True)
    llm = vllm_engine.current()  # which model runner (and so which sampler) vLLM picked here
    result["vllm_v2_model_runner"] = bool(llm and llm.llm_engine.vllm_config.use_v2_model_runner)
    vllm_engine.close()
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
