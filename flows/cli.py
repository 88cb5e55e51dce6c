"""`entcal`: run studies, manage the local stack, simulate the theory, benchmark the kernels.

A user mistake (bad config, missing file, unreachable service) prints one line on stderr and
exits 2; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from entcal.storage.errors import UserError

class UserErrorFilter(logging.Filter):
    """Drop tracebacks of user mistakes from log records (Prefect logs task failures with exc_info)."""

    def __init__(self, kinds: tuple[type, ...]):
        super().__init__()
        self.kinds = kinds

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.kinds):
            record.exc_info, record.exc_text = None, None
        return True


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an orderly exit: the study's ``finally``, Prefect's crash hooks and
    ``ensure``'s shutdown of the services it started all run (the default action would skip them)."""


_stopping: list[int] = []  # the SIGTERM already turned into Terminated: later ones let the clean-up finish


def _on_sigterm(signum, frame) -> None:
    if _stopping:
        print("entcal: already stopping", file=sys.stderr)
        return
    _stopping.append(signum)
    raise Terminated(signum)


def _environment() -> None:
    """Prefect's home and results stay under the project's state dir unless the user set them."""
    from entcal.storage.settings import from_env

    settings = from_env()
    (settings.state_dir / "prefect").mkdir(parents=True, exist_ok=True)  # Prefect makes only the last level
    os.environ.setdefault("PREFECT_HOME", str(settings.state_dir / "prefect"))
    # absolute, so Ray workers and other processes started from here find the same stack.json
    os.environ["ENTCAL_STATE_DIR"] = str(settings.state_dir)
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(settings.state_dir / "results"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # MLflow's default retries a dead server for minutes per request; the publish tasks retry on top
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    # Prefect's ephemeral server migrates its database on first start: 20 s is too short on 2 busy cores
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if settings.prefect_api and "PREFECT_API_URL" not in os.environ:
        from entcal.storage.stack import health, read_stack_file

        if health(read_stack_file(settings.state_dir), "prefect"):
            os.environ["PREFECT_API_URL"] = settings.prefect_api


class ServiceError(UserError, RuntimeError):
    """A configured service does not answer."""


def check_prefect(api_url: str | None) -> None:
    """A configured Prefect API must answer; without one, Prefect runs an ephemeral server."""
    from entcal.storage.stack import http_ok

    if api_url and not http_ok(api_url.rstrip("/") + "/health", timeout=5):
        raise ServiceError(f"Prefect API at {api_url} is unreachable; check PREFECT_API_URL or `entcal stack status`")


def stop_orphan_prefect_servers(home: str | None) -> list[int]:
    """Stop Prefect's ephemeral API servers on this PREFECT_HOME whose entcal process is gone.

    Without PREFECT_API_URL each CLI run starts one (a uvicorn child process) and stops it at exit; a CLI
    killed with SIGKILL leaves it running, re-parented to init. Returns the pids stopped."""
    import psutil

    stopped: list[psutil.Process] = []
    for p in psutil.process_iter(["cmdline", "ppid"]):
        try:
            if "prefect.server.api.server:create_app" not in " ".join(p.info["cmdline"] or []):
                continue
            env = p.environ()
            parent = p.parent()
            if env.get("PREFECT__SERVER_EPHEMERAL") != "1" or not home or env.get("PREFECT_HOME") != home:
                continue
            if parent is not None and p.info["ppid"] != 1 and "python" in parent.name():
                continue  # its process is alive
            p.terminate()
            stopped.append(p)
            logging.getLogger(__name__).warning("stopped Prefect's ephemeral server (pid %d) left by a killed "
                                                "entcal process", p.pid)
        except psutil.Error:
            continue
    for p in psutil.wait_procs(stopped, timeout=10)[1]:
        p.kill()
    return [p.pid for p in stopped]


def _delta(value: float, ci) -> str:
    """A paired difference for reading: its CI, and "no detectable effect" when the CI holds 0."""
    lo, hi = ci
    return f"Δ {value:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (" (no detectable effect)" if lo <= 0 <= hi else "")


def print_calibration(label: str, cal: dict) -> None:
    """calibration.json's headline: τ*, where each sweep zeroes EntCE, and each method against τ = 1 (paired)."""
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lo, hi = cal["tau_star_ci"]
    print(f"\nCalibration {label} (evaluation split): τ* = {fmt(cal['tau_star'])} [{fmt(lo)}, {fmt(hi)}], "
          f"L̄ there {fmt(cal['logloss_at_tau_star'])} (τ = 1: {fmt(cal['logloss_at_tau_1'])})")
    for t in cal["truncation"]:
        print(f"  {t['method']:<16} zeroes EntCE at {t['param']:.4g}, L̄ there {fmt(t['logloss'])}")
    for name in ("lookahead", "future_entropy", "tau_schedule", "entropy_feedback"):
        if r := cal.get(name):
            zero = "; EntCE = 0 nowhere in its bracket"
            if r.get("alpha_zero_entce") is not None:
                zero = (f"; EntCE = 0 at {r['knob']} {r['alpha_zero_entce']:.4g}: L̄ "
                        f"{_delta(r['delta_logloss_at_zero_entce'], r['delta_logloss_at_zero_entce_ci'])}")
            print(f"  {name:<16} {r['knob']} {r['alpha']:.4g}: EntCE {r['entce_before']:+.3f} -> {r['entce_after']:+.3f} "
                  f"{_delta(r['delta_entce'], r['delta_entce_ci'])}; L̄ {r['logloss_before']:.3f} -> "
                  f"{r['logloss_after']:.3f} {_delta(r['delta_logloss'], r['delta_logloss_ci'])}{zero}")


def print_result(result: dict) -> None:
    print("\nEntCE = H̄ − L̄ (nats/token), 95% bootstrap CI over examples:")
    for r in result["rows"]:
        print(f"  {r['model']:<14} {r['dataset']:<14} {r['decoding']:<10} EntCE {r['entce']:+.3f} "
              f"[{r['entce_ci_low']:+.3f}, {r['entce_ci_high']:+.3f}]  H̄ {r['entropy']:.3f}  L̄ {r['logloss']:.3f}")
    print(f"\nMLflow run: {result['run_url']}")
    if result.get("experiment_url"):
        print(f"MLflow experiment: {result['experiment_url']}")
    print(f"Report:     {result.get('html') or result['report']}")
    for label, cal in result.get("calibration", {}).items():
        print_calibration(label, cal)
    if result["cached"]:
        print(f"Served from cache: {len(result['cached'])} stages; ran: {len(result['ran'])}")


def cmd_study(cfg_dict: dict | None, args) -> int:
    from entcal.tasks.config import load_config, parse_config  # light: a bad config fails before torch loads

    overrides = {k: v for k, v in (("num_examples", args.num_examples), ("max_new_tokens", args.max_new_tokens),
                                   ("horizon", args.horizon), ("seed", args.seed), ("batch_size", args.batch_size))
                 if v is not None}
    if cfg_dict is None:
        config = load_config(args.config, overrides)
    else:
        config = parse_config({**cfg_dict, **overrides}, source="demo config")
    from entcal.flows.preflight import preflight

    preflight(config)  # before the flow's imports (Prefect, MLflow): a mistake fails in seconds
    from entcal.storage.stack import ensure

    check_prefect(os.environ.get("PREFECT_API_URL"))  # every service answers before Prefect and MLflow load too
    if not os.environ.get("PREFECT_API_URL"):
        stop_orphan_prefect_servers(os.environ.get("PREFECT_HOME"))
    with ensure(("s3", "mlflow")) as settings:
        from entcal.storage.tracking import check_server

        check_server(settings.mlflow_uri)
        from entcal.flows.study import study

        result = study(config, out=args.out)
    print_result(result)
    return 0


def cmd_stack(args) -> int:
    from entcal.storage.stack import Stack

    stack = Stack()
    if args.action == "up":
        started = stack.up()
        print(f"started: {', '.join(started) or 'nothing (all healthy)'}", file=sys.stderr)
    elif args.action == "down":
        stopped = stack.down()
        print(f"stopped: {', '.join(stopped) or 'nothing'}", file=sys.stderr)
    st = stack.status()
    if args.json:
        print(json.dumps(st))
    else:
        for name in ("s3", "mlflow", "prefect"):
            print(f"{name:<8} {'healthy' if st['healthy'][name] else 'down':<8} {st[name] or '-'}")
        print(f"bucket   {st['bucket']}  artifacts: {st['artifact_root']}  state: {st['state_dir']}")
    return 1 if args.action == "up" and not all(st["healthy"].values()) else 0


def cmd_theory(args) -> int:
    from entcal.tasks import figures, theory

    alphas = args.alpha or [1.2, 1.5, 2.0, 3.0]
    results = theory.theory_results(alphas)
    if args.json:
        print(json.dumps({"results": results}))
        return 0
    print(f"{'alpha':>6} {'fitted':>9} {'predicted 1/α−1':>16}")
    for r in results:
        print(f"{r['alpha']:>6.2f} {r['fitted_exponent']:>9.3f} {r['predicted_exponent']:>16.3f}")
    if args.plot:
        path = figures.plot_theory(theory.theory_curves(alphas), args.plot)
        print(f"plot: {path}")
    return 0


def scheduled_studies(args) -> list:
    """The studies of ``--config FILE --cron EXPR [--timezone TZ]`` (repeatable; one --cron per --config, one
    --timezone for all or one per --config), each checked before any service starts."""
    from entcal.flows.serve import NIGHTLY_TIMEZONE, Scheduled
    from entcal.tasks.config import ConfigError, load_config

    configs, crons, zones = args.config or [], args.cron or [], args.timezone or [NIGHTLY_TIMEZONE]
    if len(crons) != len(configs):
        raise ConfigError(f"entcal {args.command}: {len(configs)} --config and {len(crons)} --cron: give each study "
                          "file its schedule, e.g. --config study.yaml --cron '0 3 * * *'")
    if len(zones) not in (1, len(configs)):
        raise ConfigError(f"entcal {args.command}: {len(zones)} --timezone for {len(configs)} --config: give one "
                          "for all, or one per study")
    zones = zones * len(configs) if len(zones) == 1 else zones
    studies = [Scheduled(load_config(c), cron, tz) for c, cron, tz in zip(configs, crons, zones)]
    for s in studies:
        s.schedule()  # a bad cron or zone: one line, now
    return studies


def cmd_serve(args) -> int:
    from entcal.flows.serve import deployments, serve_all
    from entcal.storage.settings import from_env
    from entcal.storage.stack import Stack

    studies = scheduled_studies(args)
    deployments(studies)  # names and schedules checked before the stack starts
    Stack().up()
    os.environ["PREFECT_API_URL"] = from_env().prefect_api
    served = ", ".join(f"{s.config.name} ({s.cron}, {s.timezone})" for s in studies) or "the demo's nightly study"
    print(f"serving {served} and the on-demand form to {os.environ['PREFECT_API_URL']} (Prefect UI: "
          f"{os.environ['PREFECT_API_URL'].removesuffix('/api')}); Ctrl-C to stop", file=sys.stderr)
    serve_all(limit=args.limit, studies=studies)
    return 0


def cmd_deploy(args) -> int:
    from entcal.flows.serve import deploy_all

    studies = scheduled_studies(args)
    check_prefect(os.environ.get("PREFECT_API_URL"))
    if not os.environ.get("PREFECT_API_URL"):
        from entcal.tasks.config import ConfigError

        raise ConfigError("entcal deploy: set PREFECT_API_URL to the Prefect server whose work pool runs the studies")
    ids = deploy_all(args.pool, studies)
    names = [s.config.name for s in studies] or ["nightly"]
    print(f"deployed {', '.join(names)} and on-demand ({len(ids)} deployments) to work pool {args.pool} at "
          f"{os.environ['PREFECT_API_URL']}; its workers run them")
    return 0


def cmd_bench(args) -> int:
    import runpy

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"bench_{args.what}.py"
    if not script.is_file():
        raise SystemExit(f"entcal bench {args.what}: {script} not found (benchmarks live in the source checkout)")
    sys.argv = [str(script)] + (["--json"] if args.json else [])
    runpy.run_path(str(script), run_name="__main__")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entcal", description="Is your language model's entropy calibrated?")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def study_flags(sp):
        sp.add_argument("--out", help="also write tables, summary.json and the report to this directory")
        sp.add_argument("--num-examples", type=int, help="override num_examples")
        sp.add_argument("--max-new-tokens", type=int, help="override max_new_tokens")
        sp.add_argument("--horizon", type=int, help="override horizon T")
        sp.add_argument("--seed", type=int, help="override seed")
        sp.add_argument("--batch-size", type=int, help="override batch_size (rows per forward; the numbers do not "
                        "depend on it: each row's draws are its own)")

    d = sub.add_parser("demo", help="study SmolLM2-135M on the built-in corpora (local S3 + MLflow)")
    d.add_argument("--quick", action="store_true", help="a smaller study (about 2 minutes on 2 CPU cores)")
    d.add_argument("--calibrate", action="store_true",
                   help="a calibration study on the prose corpus: τ*, the truncation sweeps, lookahead, future "
                        "entropy, a per-step τ schedule and entropy feedback, each paired against τ = 1")
    study_flags(d)
    r = sub.add_parser("run", help="run a study from a YAML config")
    r.add_argument("--config", required=True, help="YAML study config (see docs/example-study.yaml)")
    study_flags(r)
    s = sub.add_parser("stack", help="local services: S3 (rclone), MLflow, Prefect on 127.0.0.1")
    s.add_argument("action", choices=["up", "down", "status"])
    s.add_argument("--json", action="store_true")
    t = sub.add_parser("theory", help="simulate the simplified setting; fitted vs predicted exponents")
    t.add_argument("--alpha", type=float, action="append", help="power-law exponent(s) of the data")
    t.add_argument("--json", action="store_true")
    t.add_argument("--plot", help="write a PNG of the curves here")
    def schedule_flags(sp):
        sp.add_argument("--config", action="append", help="a YAML study to run on --cron (repeatable: one "
                        "deployment per study, named after it; default: the demo's nightly study)")
        sp.add_argument("--cron", action="append", help="the study's schedule, a cron expression: '0 3 * * *' is "
                        "03:00 every day (one per --config)")
        sp.add_argument("--timezone", action="append", help="the schedules' time zone, e.g. Europe/Paris (default "
                        "UTC; one for all, or one per --config)")

    sv = sub.add_parser("serve", help="serve scheduled studies and the on-demand form here (starts the local stack)")
    sv.add_argument("--limit", type=int, default=1, help="flow runs at once (1: one GPU, one study)")
    schedule_flags(sv)
    dp = sub.add_parser("deploy", help="register scheduled studies and the on-demand form for a work pool "
                        "(docker/compose.yaml's gpu worker; PREFECT_API_URL names its server)")
    dp.add_argument("--pool", default="gpu", help="the work pool (default gpu)")
    schedule_flags(dp)
    b = sub.add_parser("bench", help="benchmarks (GPU figures need CUDA)")
    b.add_argument("what", choices=["kernels", "generate"])
    b.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "botocore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _environment()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)  # Prefect's flow engine chains to it after marking the run Crashed
    if not args.debug:
        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).addFilter(UserErrorFilter((UserError,)))
    try:
        if args.command == "demo":
            from entcal.flows.serve import demo_config

            return cmd_study(demo_config(args.quick, calibrate=args.calibrate), args)
        if args.command == "run":
            return cmd_study(None, args)
        if args.command == "stack":
            return cmd_stack(args)
        if args.command == "theory":
            return cmd_theory(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "deploy":
            return cmd_deploy(args)
        return cmd_bench(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"entcal: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print("entcal: terminated" if isinstance(err, Terminated) else "entcal: interrupted", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(err, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
