"""Every Triton kernel compiles for a real GPU (sm_90, cubin via Triton's bundled ptxas).

The interpreter runs the kernels' Python, not Triton's compiler, so type errors of the compiled
path (loop-carried types, constexpr branches, tl.dot shapes) would only show on a GPU. This test
compiles each specialisation the host code launches, ahead of time, in a subprocess without
TRITON_INTERPRET; no GPU is needed. Run as a script it prints one line per kernel.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROW = {"X": "*bf16", "stride_n": "i64", "stride_v": "i32", "V": "i32", "cols_per_split": "i32",
       "scale": "fp32"}
FUSED = {"H": "*bf16", "W": "*bf16", "T": "*i64", "OUT": "*fp32", "N": "i32", "V": "i32",
         "D": "i32", "stride_hn": "i32", "stride_hd": "i32", "stride_wv": "i32",
         "stride_wd": "i32", "cols_per_split": "i32", "scale": "fp32"}


def _cases():
    from entcal.kernels import fused_head, stats, truncation

    submax = {"X": "*bf16", "stride_n": "i64", "stride_v": "i32", "V": "i32", "NSUB": "i32",
              "cols_per_split": "i32", "scale": "fp32", "OUT": "*fp32"}
    fused_f32 = dict(FUSED, H="*fp32", W="*fp32")
    dot = dict(CAST_F32=False, GROUP_N=16, BLOCK_N=128, BLOCK_V=128, BLOCK_D=64)
    for dtype in ("*bf16", "*fp16", "*fp32"):
        sig = dict(ROW, X=dtype, LO="*fp32", OUT="*fp32")
        for mode, has_lo, moments in ((0, False, False), (1, True, True), (2, False, True)):
            yield stats._stats_kernel, sig, dict(MODE=mode, HAS_LO=has_lo, MOMENTS=moments,
                                                 BLOCK=4096), 8
    yield truncation._submax_kernel, submax, dict(MODE=1, R=16, BLOCK=4096), 8
    mass = dict(ROW, M="*fp32", LO="*fp32", C="*fp64", R="*fp64", OUT="*fp64")
    compact = dict(ROW, LO="*fp32", C="*fp64", R="*fp64", BUF="*i32", CNT="*i32", CAP="i32")
    for band, block, warps in ((True, 1024, 4), (False, 4096, 8)):  # float64 sums, radii or not
        yield truncation._mass_kernel, mass, dict(MODE=1, G=16, BAND=band, BLOCK=block), warps
        yield truncation._compact_kernel, compact, dict(MODE=1, BAND=band, BLOCK=4096), 8
    yield fused_head._fused_kernel, FUSED, dict(MODE=0, HAS_T=True, IEEE=False, **dot), 8
    yield fused_head._fused_kernel, FUSED, dict(MODE=1, HAS_T=False, IEEE=False, **dot), 8
    yield fused_head._fused_kernel, fused_f32, dict(MODE=1, HAS_T=True, IEEE=True, **dot), 8


def _sampling_cases():
    """kernels.sampling_triton's Gumbel-max kernel as gumbel_argmax_triton launches it (float32 logits from the
    sampler; bfloat16 too)."""
    from entcal.kernels import sampling_triton
    from entcal.kernels.sampling import SALT

    for z in ("*fp32", "*bf16"):
        sig = {"Z": z, "stride_n": "i32", "stride_v": "i32", "V": "i32", "WORDS": "*i32", "step": "i32",
               "OUT": "*i64"}
        yield (sampling_triton._gumbel_argmax_kernel, sig,
               dict(SALT0=SALT[0], SALT1=SALT[1], BLOCK=sampling_triton.BLOCK), 4)


def compile_all(arch: int = 90, cases=_cases) -> int:
    """Compile every case for sm_<arch>; print one line each; return the number compiled."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    done = 0
    for kernel, sig, constexprs, warps in cases():
        signature = dict(sig, **{k: "constexpr" for k in constexprs})
        src = ASTSource(kernel, signature, constexprs=constexprs)
        ck = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": 3})
        assert ck.asm.get("cubin"), kernel
        print(f"ok {kernel.fn.__name__ if hasattr(kernel, 'fn') else kernel} {constexprs}")
        done += 1
    return done


def _compile_in_subprocess(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and ("ptxas" in out and "not found" in out.lower()
                                 or "No module named 'triton.backends.nvidia'" in out):
        pytest.skip("Triton's NVIDIA backend / ptxas is not installed")
    assert proc.returncode == 0, out[-4000:]
    return out


def test_kernels_compile_for_sm90():
    out = _compile_in_subprocess()
    assert "compiled 17 kernels" in out, out[-4000:]


def test_sampling_kernel_compiles_for_sm90():
    out = _compile_in_subprocess("--sampling")
    assert "compiled 2 kernels" in out, out[-4000:]


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    print(f"compiled {compile_all(cases=_sampling_cases if '--sampling' in sys.argv else _cases)} kernels")
