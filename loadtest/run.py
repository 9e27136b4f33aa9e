"""`python -m loadtest`: serve a library, drive it with Locust, observe replicas, report.

By default it serves a library itself on a local Ray instance (a free port), runs the short
profile headless and writes `loadtest/results/latest/`: Locust's CSVs, `replicas.csv`,
`report.json`, `report.md`, `report.png`. With `--host URL` it loads a service that is
already running (a cluster) and reads replicas from Serve's REST API at `--dashboard`.

For the short profile the experts' downscale delays are shortened (`--downscale-to-zero-s`,
15 s by default) in a derived library written to the results folder, so scale-to-zero shows
within the run, and each expert's queue at the ingress is limited (`--max-queued`, 2 by
default), so backpressure can happen at the short profile's peak: a busy expert is skipped for
the next in the ranking, and when none can take a request it is answered 503 with Retry-After
(counted as rejected, not as a failure). The long profile keeps the library's own settings
unless told otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from loadtest import shape
from loadtest.observer import ReplicaObserver, local_source, rest_source
from loadtest.report import write_report
from serve_app.api import API_KEYS_ENV, Guard
from serve_app.session import free_port, workers_import_checkout

ROOT = Path(__file__).resolve().parents[1]
SMOKE_DIR = ROOT / "libraries" / "smoke"
RESULTS = ROOT / "loadtest" / "results" / "latest"
APP = "tryage"
#: The default of --downscale-to-zero-s by profile; None keeps the library's own delays.
DOWNSCALE_S = {"short": 15.0, "long": None}
#: The default of --max-queued by profile (each expert's max_queued_requests); None keeps the
#: library's own. The short profile peaks at 16 users, one request each, and a replica takes 8
#: at once, so an expert's queue only grows while it has no replica (a cold start) or when most
#: users are routed to it at once; a limit of 2 sheds that load to the next expert in the
#: ranking without refusing a steady stream.
MAX_QUEUED = {"short": 2, "long": None}
#: The short profile scales out, on purpose and within minutes (--no-scale-out keeps the
#: library's own targets): the experts aim at half a request in flight per replica (up to
#: 3 replicas) and the router at 2 (up to 2 replicas), reacting within a few seconds; a
#: 2-core machine then shows an expert past one replica and a second router, and the scale
#: back to zero and one within the idle window. Tiny experts on fractions of a CPU (the smoke
#: library) fit; a real library's accelerators would be the limit instead.
SCALE_OUT = {
    "short": {
        "expert": {"target_ongoing_requests": 0.5, "max_replicas": 3, "upscale_delay_s": 2.0},
        "router": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 2.0,
        },
    },
    "long": None,
}
#: The experts' look-back window in a derived library: longer than Serve's 10 s metrics push
#: interval (a shorter window sees the gaps between pushes as idleness).
LOOK_BACK_S = 15.0
#: Serve samples each deployment's ongoing requests every look_back_period_s x this factor
#: (Serve's default 0.2: every 3 s for a 15 s window) and scales to zero when every sample in
#: the window is 0. A small expert answers in tens of milliseconds, so most samples miss its
#: requests: under steady load it looked idle and flapped to zero within the short delays.
#: Sampling every 0.15 s sees them.
METRIC_RECORD_FACTOR = "0.01"
#: Files a run writes; an earlier run's copies are removed first.
OUTPUTS = (
    "locust_stats.csv",
    "locust_stats_history.csv",
    "locust_failures.csv",
    "locust_exceptions.csv",
    "locust.log",
    "locust.html",
    "replicas.csv",
    "served_library.yaml",
    "run.json",
    "report.json",
    "report.md",
    "report.png",
    "requests.csv",
    "load_start.txt",
)


def default_library() -> Path:
    """The smoke library (built here if missing): tiny experts on fractions of a CPU, so a
    2-core machine can push them past one replica. The demo library, whose pretrained experts
    take a second or more per answer on a CPU, is for `--library`."""
    path = SMOKE_DIR / "library.yaml"
    if not path.is_file():
        from serve_app.demo.smoke import build_smoke_library

        print(f"loadtest: building the smoke library in {SMOKE_DIR}")
        build_smoke_library(SMOKE_DIR)
    return path


def derive_library(
    library: Path,
    out: Path,
    downscale_s: float | None = None,
    max_queued: int | None = None,
    ingress_max_queued: int | None = None,
    scale_out: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """A copy of `library` at `out` with the load test's settings; the original is untouched.

    `downscale_s` sets the experts' downscale_delay_s and downscale_to_zero_delay_s and
    shortens their look-back window to LOOK_BACK_S (Serve's default is 30 s) so idleness is
    noticed sooner. `max_queued` sets every expert's max_queued_requests (requests waiting at
    the ingress for a replica of that expert) and `ingress_max_queued` the ingress's (waiting
    at the HTTP proxy). `scale_out` (SCALE_OUT) merges autoscaling fields over the experts'
    and the router's (the router's downscale delay and look-back follow `downscale_s` too).
    None keeps the library's value. Relative model paths are made absolute so the copy loads
    from anywhere.
    """
    from serve_app.config import MINILM, load_library, write_library

    raw = yaml.safe_load(library.read_text())
    base = library.parent

    def absolute(value: str) -> str:
        path = base / Path(value).expanduser()
        return str(path.resolve()) if value != MINILM and path.exists() else value

    router = raw["router"]
    router["checkpoint"] = str((base / router["checkpoint"]).resolve())
    router["model"] = absolute(router.get("model", MINILM))
    changes: list[str] = []
    if scale_out:
        scaling = {**(router.get("autoscaling") or {}), **scale_out["router"]}
        if downscale_s is not None:
            scaling.update(downscale_delay_s=downscale_s, look_back_period_s=LOOK_BACK_S)
        router["autoscaling"] = scaling
        changes.append(f"scale-out targets {scale_out}")
    for expert in raw["experts"]:
        expert["model"] = absolute(expert["model"])
    # An expert's own deployment, or its pool's (a pooled expert's replicas are the pool's).
    raw["pools"] = pools = raw.get("pools") or {}
    for name in {e["pool"] for e in raw["experts"] if e.get("pool")}:
        pools[name] = pools.get(name) or {}
    deployments = [e for e in raw["experts"] if not e.get("pool")] + list(pools.values())
    for deployment in deployments:
        if max_queued is not None:
            deployment["max_queued_requests"] = max_queued
        if scale_out:
            scaled = {**(deployment.get("autoscaling") or {}), **scale_out["expert"]}
            deployment["autoscaling"] = scaled
        if downscale_s is None:
            continue
        scaling = dict(deployment.get("autoscaling") or {})
        look_back = min(float(scaling.get("look_back_period_s", LOOK_BACK_S)), LOOK_BACK_S)
        scaling.update(
            downscale_delay_s=downscale_s,
            downscale_to_zero_delay_s=downscale_s,
            look_back_period_s=look_back,
        )
        deployment["autoscaling"] = scaling
    if downscale_s is not None:
        changes.append(f"experts' downscale delays {downscale_s} s")
    if max_queued is not None:
        changes.append(f"experts' max_queued_requests {max_queued}")
    if ingress_max_queued is not None:
        raw.setdefault("ingress", {})["max_queued_requests"] = ingress_max_queued
        changes.append(f"ingress max_queued_requests {ingress_max_queued}")
    header = (
        f"# Derived by loadtest from {library}: {'; '.join(changes) or 'paths made absolute'}.\n"
    )
    write_library(out, raw, header)
    load_library(out)  # fail here, naming the file, rather than inside Serve
    return out


def queue_limits(library: Path) -> dict[str, Any]:
    """max_queued_requests of every deployment of a library, and its backpressure answer."""
    from serve_app.config import INGRESS_DEPLOYMENT, ROUTER_DEPLOYMENT, load_library

    lib = load_library(library)
    limits: dict[str, Any] = {
        INGRESS_DEPLOYMENT: lib.ingress.max_queued_requests,
        ROUTER_DEPLOYMENT: lib.router.max_queued_requests,
    }
    limits.update({name: d.max_queued_requests for name, d in _replica_groups(lib)})
    return {"max_queued_requests": limits, "backpressure": lib.ingress.backpressure}


def logical_cpus(library: Path) -> int:
    """Logical CPUs for the local Ray: enough for every deployment at its max replicas.

    A small machine may have fewer cores than the library's replicas ask for in total; the
    load test is about Serve's autoscaling, so Ray's bookkeeping must not be the limit.
    """
    from serve_app.config import load_library

    lib = load_library(library)

    def need(resources: dict[str, Any], replicas: int) -> float:
        return float(resources.get("num_cpus", 1)) * replicas

    total = need(lib.router.resources, int(lib.router.autoscaling.get("max_replicas", 1)))
    total += need(lib.ingress.resources, lib.ingress.num_replicas)
    for _, d in _replica_groups(lib):
        total += need(d.resources, int(d.autoscaling["max_replicas"]))
    return max(os.cpu_count() or 1, math.ceil(total) + 1)


def _replica_groups(lib: Any) -> list[tuple[str, Any]]:
    """(deployment name, its config) of every expert deployment: the experts of their own,
    then the pools (a pooled expert runs on its pool's replicas)."""
    from serve_app.config import POOL_PREFIX

    own = [(e.name, e) for e in lib.experts if not e.pool]
    return own + [(POOL_PREFIX + name, cfg) for name, (cfg, _) in sorted(lib.pooled().items())]


def clear(out: Path) -> None:
    """Remove an earlier run's outputs from `out` (and nothing else)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)


def locust_command(host: str, out: Path) -> list[str]:
    """Headless Locust with our locustfile, CSVs (full history) and an HTML report in `out`."""
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtest" / "locustfile.py"),
        "--headless",
        "--host",
        host,
        "--csv",
        str(out / "locust"),
        "--csv-full-history",
        "--html",
        str(out / "locust.html"),
        "--only-summary",
        "--stop-timeout",
        "60",
    ]


def run_locust(
    host: str, out: Path, stages: list[shape.Stage], env: dict[str, str], observer: Any
) -> int:
    """Run Locust to the end of the shape, showing progress; returns its exit code."""
    from tqdm import tqdm

    total = shape.total_s(stages)
    with (out / "locust.log").open("w") as log:
        proc = subprocess.Popen(
            locust_command(host, out), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            start = time.monotonic()
            with tqdm(total=round(total), unit="s", desc="load test", leave=True) as bar:
                while proc.poll() is None:
                    elapsed = time.monotonic() - start
                    if elapsed > total + 180:
                        raise TimeoutError(f"Locust still running {elapsed:.0f} s after start")
                    stage = shape.stage_at(stages, elapsed)
                    replicas = " ".join(f"{s.deployment}={s.running}" for s in observer.latest)
                    users = shape.users_at(stages, elapsed) or 0
                    bar.set_postfix_str(
                        f"{stage.name if stage else 'stopping'}, {users} users, {replicas}"
                    )
                    bar.n = min(round(elapsed), round(total))
                    bar.refresh()
                    time.sleep(1)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    return proc.returncode


def serve_library(stack: contextlib.ExitStack, library: Path, port: int, num_cpus: int) -> str:
    """Serve `library` on `port` on a new local Ray until `stack` closes; the base URL."""
    from serve_app.app import build_app
    from serve_app.session import serving

    app = build_app({"library": library})  # validate before starting Ray
    os.environ.setdefault(
        "RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR", METRIC_RECORD_FACTOR
    )
    return stack.enter_context(
        serving(
            app, port=port, name=APP, address="local", num_cpus=num_cpus, include_dashboard=False
        )
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n")[0])
    p.add_argument("--library", type=Path, help="library.yaml to serve (default: the smoke one)")
    p.add_argument("--profile", choices=sorted(shape.PROFILES), default="short")
    p.add_argument("--users", type=int, help="peak simulated users (default: the profile's)")
    p.add_argument("--data", type=Path, help="prompts: a .jsonl/.parquet file or a folder")
    p.add_argument("--host", help="load a running service at this URL instead of serving one")
    p.add_argument(
        "--dashboard", help="Ray dashboard URL for --host (default: the host's name, port 8265)"
    )
    p.add_argument(
        "--app",
        help="the Serve application to observe with --host (default: the only one, or tryage)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("TRYAGE_API_KEY"),
        help="a key for a service with TRYAGE_API_KEYS set (default: $TRYAGE_API_KEY; a "
        "library served here takes the first of $TRYAGE_API_KEYS)",
    )
    p.add_argument("--port", type=int, help="port to serve on (default: a free one)")
    p.add_argument(
        "--downscale-to-zero-s",
        type=float,
        help="experts' downscale delays in the served copy of the library (default: 15 for "
        "the short profile; the library's own for the long one)",
    )
    p.add_argument(
        "--max-queued",
        type=int,
        help="every expert's max_queued_requests in the served copy (-1: no limit; default: 2 "
        "for the short profile, the library's own for the long one)",
    )
    p.add_argument(
        "--ingress-max-queued",
        type=int,
        help="the ingress's max_queued_requests in the served copy (default: the library's)",
    )
    p.add_argument(
        "--no-scale-out",
        action="store_true",
        help="keep the library's autoscaling targets (the short profile otherwise lowers them "
        "so an expert and the router scale out within the run)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a load test and write its report; exit 1 if any request failed."""
    args = parser().parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    out = args.out.resolve()
    clear(out)
    stages = shape.PROFILES[args.profile]
    stages = shape.scaled(stages, args.users) if args.users else stages
    run: dict[str, Any] = {"profile": args.profile, "stages": [vars(s) for s in stages]}
    served = args.host is None
    serving = contextlib.ExitStack()
    try:
        if served:
            library = (args.library or default_library()).resolve()
            run["library"] = str(library)
            downscale = _given(args.downscale_to_zero_s, DOWNSCALE_S[args.profile])
            max_queued = _given(args.max_queued, MAX_QUEUED[args.profile])
            scale_out = None if args.no_scale_out else SCALE_OUT[args.profile]
            if (downscale, max_queued, args.ingress_max_queued, scale_out) != (None,) * 4:
                library = derive_library(
                    library,
                    out / "served_library.yaml",
                    downscale,
                    max_queued,
                    args.ingress_max_queued,
                    scale_out,
                )
            if scale_out:
                run["scale_out"] = scale_out
            if downscale is not None:
                run["downscale_to_zero_s"] = downscale
            run.update(queue_limits(library))
            cpus = logical_cpus(library)
            print(f"loadtest: serving {library} on a local Ray ({cpus} logical CPUs)")
            host = serve_library(serving, library, args.port or free_port(), cpus)
            source = local_source(APP)
            keys = Guard.keys_from(os.environ.get(API_KEYS_ENV))
            api_key = args.api_key or (keys[0] if keys else None)
        else:
            host = args.host.rstrip("/")
            dashboard = args.dashboard or f"http://{urlsplit(host).hostname}:8265"
            run["dashboard"] = dashboard
            source = observed(dashboard, args.app)
            run["app"] = getattr(source, "app", None)
            api_key = args.api_key
        check_service(host, api_key)  # before minutes of load: a wrong host or key says so
        run["host"] = host
        workers_import_checkout()  # Locust imports loadtest/ and serve_app/ from the checkout
        env = {
            **os.environ,
            "TRYAGE_LOADTEST_OUT": str(out),
            "TRYAGE_LOADTEST_PROFILE": args.profile,
            "TRYAGE_LOADTEST_SEED": str(args.seed),
        }
        if args.users:
            env["TRYAGE_LOADTEST_USERS"] = str(args.users)
        if api_key:
            env["TRYAGE_LOADTEST_API_KEY"] = api_key
        if args.data:
            env["TRYAGE_LOADTEST_DATA"] = str(args.data.resolve())
            run["data"] = str(args.data)
        observer = ReplicaObserver(source, out / "replicas.csv").start()
        try:
            time.sleep(3)  # a few samples before the load starts
            started = time.time()
            code = run_locust(host, out, stages, env, observer)
            run["wall_s"] = round(time.time() - started, 1)
            run["locust_exit_code"] = code
        finally:
            observer.stop()
    except KeyboardInterrupt:
        print("loadtest: interrupted", file=sys.stderr)
        return 130
    except ServiceError as err:
        print(f"loadtest: {err}", file=sys.stderr)
        return 2
    finally:
        serving.close()
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    try:
        report = write_report(out)
    except ValueError as err:  # Locust ran no user: its log says why
        print(f"loadtest: no report: {err}; see {out / 'locust.log'}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    print(f"loadtest: report in {out / 'report.md'}")
    return 0 if report["failures"] == 0 else 1


class ServiceError(Exception):
    """The service to load cannot be used as it is: unreachable, or it refuses the key."""


def observed(dashboard: str, app: str | None) -> Any:
    """rest_source for `app` (or the one pick_app finds). Where the dashboard cannot be read
    (a service whose dashboard only SSH reaches) or the application is not there, it says
    so and the load test goes on without replicas: the report then has latency and failures
    only."""
    import httpx

    try:
        source = rest_source(dashboard, app)
        if source():
            return source
        problem = f"{dashboard} shows no deployment of the application {source.app!r}"
    except (httpx.HTTPError, httpx.InvalidURL, PermissionError, ValueError) as err:
        problem = f"replicas cannot be read from {dashboard}: {err}"
    print(f"loadtest: warning: {problem}; the report will have no replicas", file=sys.stderr)
    return lambda: []


def check_service(host: str, api_key: str | None, timeout_s: float = 60.0) -> None:
    """One GET /v1/models, as every simulated user starts with: raises ServiceError saying
    what to fix where it does not answer 200."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = httpx.get(f"{host}/v1/models", headers=headers, timeout=timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL) as err:
        raise ServiceError(f"{host} does not answer ({err}); is the service up there?") from None
    if answer.status_code == 401:
        hint = "wrong" if api_key else "needed"
        raise ServiceError(
            f"{host} answered 401: an API key is {hint}; pass --api-key or set TRYAGE_API_KEY"
        )
    if answer.status_code != 200:
        raise ServiceError(f"{host}/v1/models answered {answer.status_code}: {answer.text[:200]}")


def _given(value: int | None, default: int | None) -> int | None:
    """An option's value where given (0 included), else the profile's default."""
    return default if value is None else value


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
