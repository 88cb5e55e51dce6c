"""Bad study configs, defined once. tests/reliability/test_bad_inputs.py checks each through the loader and
preflight in-process (the UserError's one-line message); tests/flows/test_cli.py through `entcal run`
(exit 2, that message as the one ``entcal: error:`` line on stderr, no traceback)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from tests.conftest import tiny_config


@dataclass(frozen=True)
class BadConfig:
    """A study config file with one mistake, and the words its one-line error must contain."""

    id: str
    content: Callable[[Path, Path], dict | str | bytes | None]  # (case dir, tiny model dir) -> the file; None: no file
    expected: str  # words of the error message; "{dir}" stands for the case dir

    def write(self, case_dir: Path, model_dir: Path) -> Path:
        """The config file ``case_dir/study.yaml`` (a dict is written as YAML, bytes as they are)."""
        path = case_dir / "study.yaml"
        content = self.content(case_dir, model_dir)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            path.write_text(yaml.safe_dump(content))
        return path

    def expected_in(self, case_dir: Path) -> str:
        return self.expected.replace("{dir}", str(case_dir))


def _broken_model_dir(case_dir: Path) -> str:
    d = case_dir / "broken-model"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    return str(d)


def _jsonl(case_dir: Path, rows: list[dict]) -> str:
    p = case_dir / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return str(p)


def _file(case_dir: Path, name: str, data: bytes) -> str:
    p = case_dir / name
    p.write_bytes(data)
    return str(p)


RANDOM_BYTES = bytes(range(256)) * 64  # what a binary file saved as .txt holds: not UTF-8
CONTROL_BYTES = b"\x01\x02\x03 ok \x04\x05\x06\x07\x08" * 500  # UTF-8, but mostly control characters


def _decoding(m: Path, **decoding) -> dict:
    return tiny_config(m, decodings=[decoding])


def _dataset(m: Path, path: str) -> dict:
    return tiny_config(m, datasets=[{"name": "x", "path": path}])


def _model(m: Path, cfg: dict | None = None, **model) -> dict:
    """The tiny model with ``model`` fields added, in the study ``cfg`` overrides (default: tiny_config's)."""
    return tiny_config(m, models=[{"path": str(m), "name": "tiny", **model}], **(cfg or {}))


CONFIG = "config {dir}/study.yaml: "  # how a mistake in the file itself starts: which file
BAD_CONFIGS = [
    BadConfig("missing-file", lambda t, m: None, CONFIG + "no such file"),
    BadConfig("unknown-key", lambda t, m: {**tiny_config(m), "num_exampels": 2}, CONFIG + "num_exampels: unknown key"),
    BadConfig("not-a-mapping", lambda t, m: "- a\n- b\n", CONFIG + "expected a mapping of study fields, got list"),
    BadConfig("invalid-yaml", lambda t, m: "models: [\n", CONFIG + "not valid YAML at line 2"),
    BadConfig("not-utf8", lambda t, m: b"\xff\xfe\x00bad: [", CONFIG + "cannot read it (UnicodeDecodeError"),
    BadConfig("temperature<0", lambda t, m: _decoding(m, temperature=-1),
              CONFIG + "decodings.0.temperature: temperature must be > 0, got -1"),
    BadConfig("temperature=0", lambda t, m: _decoding(m, temperature=0),
              CONFIG + "decodings.0.temperature: temperature must be > 0, got 0"),
    BadConfig("top_p>1", lambda t, m: _decoding(m, top_p=1.5),
              CONFIG + "decodings.0.top_p: top_p must be <= 1, got 1.5"),
    BadConfig("top_p=0", lambda t, m: _decoding(m, top_p=0), CONFIG + "decodings.0.top_p: top_p must be > 0, got 0"),
    BadConfig("top_k<0", lambda t, m: _decoding(m, top_k=-5), CONFIG + "decodings.0.top_k: top_k must be >= 0, got -5"),
    BadConfig("min_p=1", lambda t, m: _decoding(m, min_p=1.0),
              CONFIG + "decodings.0.min_p: min_p must be < 1, got 1.0"),
    BadConfig("horizon<1", lambda t, m: tiny_config(m, horizon=0), CONFIG + "horizon: horizon must be >= 1, got 0"),
    BadConfig("model-path-missing", lambda t, m: tiny_config(t / "nope"),
              "model tiny: path {dir}/nope is not a directory"),
    BadConfig("gguf-missing", lambda t, m: {**tiny_config(m), "models": [{"gguf": str(t / "x.gguf")}]},
              "model x: GGUF file {dir}/x.gguf does not exist"),
    BadConfig("model-does-not-load", lambda t, m: tiny_config(_broken_model_dir(t)),
              "model tiny: cannot read its config from {dir}/broken-model"),
    BadConfig("dataset-missing", lambda t, m: _dataset(m, str(t / "no.jsonl")),
              "dataset x: {dir}/no.jsonl does not exist"),
    BadConfig("dataset-empty", lambda t, m: _dataset(m, _jsonl(t, [])), "dataset x: {dir}/d.jsonl is empty"),
    BadConfig("dataset-not-utf8", lambda t, m: _dataset(m, _file(t, "d.txt", RANDOM_BYTES)),
              "dataset x: {dir}/d.txt is not UTF-8 text (byte 0x80 at offset 128)"),
    BadConfig("dataset-control-bytes", lambda t, m: _dataset(m, _file(t, "d.txt", CONTROL_BYTES)),
              "dataset x: {dir}/d.txt is not text (67% control characters)"),
    BadConfig("dataset-dir-with-binary", lambda t, m: _dataset(m, str(Path(_file(t, "a.txt", RANDOM_BYTES)).parent)),
              "dataset x: {dir}/a.txt is not UTF-8 text"),
    BadConfig("jsonl-text-is-binary", lambda t, m: _dataset(m, _jsonl(t, [{"text": CONTROL_BYTES.decode()}] * 3)),
              "dataset x: {dir}/d.jsonl row 0 is not text (67% control characters)"),
    BadConfig("tau-bracket-reversed", lambda t, m: tiny_config(m, calibration={"tau_bracket": [1.2, 0.7]}),
              CONFIG + "calibration: tau_bracket [1.2, 0.7]: expected two temperatures 0 < low < high"),
    BadConfig("tau-bracket-degenerate", lambda t, m: tiny_config(m, calibration={"tau_bracket": [1.0, 1.0]}),
              CONFIG + "calibration: tau_bracket [1, 1]: expected two temperatures 0 < low < high"),
    BadConfig("tau-tol-wider-than-bracket", lambda t, m: tiny_config(m, calibration={"tau_tol": 0.6}),
              CONFIG + "calibration: tau_tol 0.6 is not narrower than tau_bracket [0.7, 1.2]"),
    BadConfig("sweep-top-p-out-of-range", lambda t, m: tiny_config(m, calibration={"top_p": [0.9, 1.5]}),
              CONFIG + "calibration.top_p.1: top_p must be < 1, got 1.5"),
    BadConfig("sweep-top-k-zero", lambda t, m: tiny_config(m, calibration={"top_k": [0]}),
              CONFIG + "calibration.top_k.0: top_k must be > 0, got 0"),
    BadConfig("text-column-missing", lambda t, m: _dataset(m, _jsonl(t, [{"body": "hi"}])),
              "dataset x: {dir}/d.jsonl has no column 'text' (columns: ['body'])"),
    BadConfig("too-few-examples", lambda t, m: _dataset(m, _jsonl(t, [{"text": "short"}] * 3)),
              "dataset x: 0 usable examples of 2 requested (3 documents read; 3 dropped"),
    BadConfig("revision-on-local-dir", lambda t, m: _model(m, revision="step1000"),
              CONFIG + "models.0: revision 'step1000' applies to hub models (hf:); a local directory or GGUF file "
              "has one version"),
    BadConfig("tensor-parallel-on-cpu", lambda t, m: _model(m, device="cpu", tensor_parallel_size=2),
              CONFIG + "models.0: tensor_parallel_size 2 needs GPUs, but device is cpu"),
    BadConfig("device-map-on-cuda0", lambda t, m: _model(m, device="cuda:0", device_map="auto"),
              CONFIG + "models.0: device_map: auto places the model over all GPUs itself, but device is cuda:0"),
    BadConfig("device-map-on-cpu", lambda t, m: _model(m, device="cpu", device_map="auto"),
              CONFIG + "models.0: device_map: auto places the model over all GPUs itself, but device is cpu"),
    BadConfig("compile-on-with-device-map", lambda t, m: _model(m, compile="on", device_map="auto"),
              CONFIG + "models.0: compile: on needs the whole model on one device"),
    BadConfig("vllm-top-nsigma", lambda t, m: _model(m, {"decodings": [{"top_nsigma": 1.0}]}, engine="vllm"),
              CONFIG + "decodings.0: top_nsigma is not a vLLM sampling parameter, and model tiny has engine: vllm"),
    BadConfig("vllm-min-p-with-top-p",
              lambda t, m: _model(m, {"decodings": [{"min_p": 0.05, "top_p": 0.9}]}, engine="vllm"),
              CONFIG + "decodings.0: vLLM applies min_p before top_p"),
    BadConfig("vllm-tiny-temperature", lambda t, m: _model(m, {"decodings": [{"temperature": 0.005}]}, engine="vllm"),
              CONFIG + "decodings.0: vLLM raises a temperature below 0.01 to 0.01"),
    BadConfig("model-labels-repeat", lambda t, m: tiny_config(m, models=[{"path": str(m), "name": "tiny"}] * 2),
              CONFIG + "models.1: its label 'tiny' repeats models.0's"),
    BadConfig("vllm-calibration-lookahead",
              lambda t, m: _model(m, {"calibration": {"future_entropy": False, "tau_schedule": False,
                                                      "entropy_feedback": False, "top_nsigma": [], "typical_p": [],
                                                      "eta_cutoff": [], "epsilon_cutoff": []}}, engine="vllm"),
              CONFIG + "calibration: lookahead samples through entcal's own sampler, and model tiny has engine: vllm"),
    BadConfig("vllm-device-index", lambda t, m: _model(m, engine="vllm", device="cuda:1"),
              CONFIG + "models.0: device cuda:1: vLLM takes its GPUs from CUDA_VISIBLE_DEVICES"),
]
