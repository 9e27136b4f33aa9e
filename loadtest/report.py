"""The load-test report: a pure function of a results folder.

Reads Locust's CSVs (`locust_stats.csv`, `locust_stats_history.csv`) and the observer's
`replicas.csv` (plus `run.json`, the run's settings, where present) and writes
`report.json`, `report.md` and `report.png`. Rebuild a report from a recorded folder with

    python -m loadtest.report loadtest/results/latest

Definitions (also written into report.md):
- the load window runs from the load shape's start (`load_start.txt`, which the locustfile
  writes; in a folder without it, the first history second with a simulated user) to the
  first history second after it with no user (the end of the ramp-down);
- `scale_up_s`: seconds from the load start until a deployment first ran more replicas than
  at the load start; only deployments that scaled up are listed;
- `scale_down_s`: seconds from the load end until such a deployment was back to its minimum
  (`min_replicas`, 0 for experts; the count at the load start where unknown) for the rest of
  the run; 0 if it already was when the load ended; null if it was not by the end of the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.prompts import REJECTED, REROUTED

STATS = "locust_stats.csv"
HISTORY = "locust_stats_history.csv"
FAILURES = "locust_failures.csv"
REPLICAS = "replicas.csv"
REQUESTS = "requests.csv"  # one row per request (the locustfile writes it)
RUN = "run.json"
LOAD_START = "load_start.txt"  # the load shape's t = 0, Unix seconds (the locustfile writes it)


@dataclass
class Window:
    """The load window in Unix seconds."""

    start: float
    end: float


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts; [] when the file is missing."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(value: str | None) -> float:
    """A Locust CSV number; NaN for 'N/A' or empty."""
    try:
        return float(value) if value not in (None, "", "N/A") else math.nan
    except ValueError:
        return math.nan


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def load_window(history: list[dict[str, str]], started: float | None = None) -> Window:
    """From the load shape's start (`started`; else the first history second with users) to
    the first history second after the users came with none (or the last).

    Locust's history is kept in whole seconds and the first user comes about a second after
    the shape starts, so the history alone starts the window, and the stages counted from
    it, a second or two late: the first requests, those that meet cold starts, would fall
    before the first phase."""
    rows = [r for r in history if r["Name"] == "Aggregated"]
    if not rows:
        raise ValueError(f"{HISTORY} has no Aggregated rows: did Locust run?")
    busy = [i for i, r in enumerate(rows) if _num(r["User Count"]) > 0]
    if not busy:
        raise ValueError(f"{HISTORY}: no second with a simulated user")
    start = float(rows[busy[0]]["Timestamp"]) if started is None else started
    after = [r for r in rows[busy[0] :] if _num(r["User Count"]) == 0]
    end = float(after[0]["Timestamp"]) if after else float(rows[-1]["Timestamp"])
    return Window(start, end)


def window_of(folder: Path) -> Window:
    """A results folder's load window (load_window)."""
    started = folder / LOAD_START
    return load_window(
        read_csv(folder / HISTORY), float(started.read_text()) if started.is_file() else None
    )


def replica_series(rows: list[dict[str, str]]) -> dict[str, list[tuple[float, int]]]:
    """(time, running replicas) per deployment, in time order."""
    out: dict[str, list[tuple[float, int]]] = {}
    for r in rows:
        out.setdefault(r["deployment"], []).append((float(r["time"]), int(r["running"])))
    return {name: sorted(points) for name, points in sorted(out.items())}


def _minimum(rows: list[dict[str, str]], name: str) -> int | None:
    known = [_int_or_none(r.get("min_replicas")) for r in rows if r["deployment"] == name]
    known = [k for k in known if k is not None]
    return known[-1] if known else None


def _count_at(points: list[tuple[float, int]], t: float) -> int:
    """Replicas at time t: the last sample at or before t (the first sample if none)."""
    before = [n for when, n in points if when <= t]
    return before[-1] if before else points[0][1]


def scaling(
    rows: list[dict[str, str]], window: Window
) -> tuple[dict[str, dict[str, int]], dict[str, float], dict[str, float | None]]:
    """Replicas (max, final), scale-up and scale-down seconds per deployment."""
    replicas, up, down = {}, {}, {}
    for name, points in replica_series(rows).items():
        replicas[name] = {"max": max(n for _, n in points), "final": points[-1][1]}
        start = _count_at(points, window.start)
        first_up = next((t for t, n in points if t >= window.start and n > start), None)
        if first_up is None:
            continue
        up[name] = round(first_up - window.start, 1)
        minimum = _minimum(rows, name)
        minimum = start if minimum is None else minimum
        above = [i for i, (_, n) in enumerate(points) if n > minimum]
        if not above:
            down[name] = 0.0
        elif above[-1] == len(points) - 1:  # still above its minimum at the last sample
            down[name] = None
        else:
            back = points[above[-1] + 1][0]  # back to its minimum for the rest of the run
            down[name] = round(max(0.0, back - window.end), 1)
    return replicas, up, down


def phases(folder: Path, window: Window) -> list[dict[str, Any]]:
    """Per stage of the run's profile (run.json): requests, failures and the p50/p99 of the
    requests that started in it (requests.csv, one row per request)."""
    run = json.loads((folder / RUN).read_text()) if (folder / RUN).is_file() else {}
    rows = read_csv(folder / REQUESTS)
    if not rows or not run.get("stages"):
        return []
    out, start = [], window.start
    for stage in run["stages"]:
        end = start + float(stage["duration_s"])
        inside = [r for r in rows if start <= float(r["start"]) < end]
        times = sorted(float(r["response_ms"]) for r in inside)
        out.append(
            {
                "phase": stage["name"],
                "from_s": round(start - window.start, 1),
                "to_s": round(end - window.start, 1),
                "requests": len(inside),
                "failures": sum(int(r["failed"]) for r in inside),
                "p50_ms": _quantile(times, 0.5),
                "p99_ms": _quantile(times, 0.99),
            }
        )
        start = end
    return out


def _quantile(values: list[float], q: float) -> int | None:
    return round(values[min(len(values) - 1, int(q * len(values)))]) if values else None


def timeline(rows: list[dict[str, str]], window: Window) -> dict[str, list[list[float]]]:
    """Per deployment, [seconds since the load start, replicas] at every change of count."""
    out = {}
    for name, points in replica_series(rows).items():
        changes, last = [], None
        for t, n in points:
            if n != last:
                changes.append([round(t - window.start, 1), n])
                last = n
        out[name] = changes
    return out


def build_report(folder: str | Path) -> dict[str, Any]:
    """The report.json figures of a results folder (Locust CSVs + replicas.csv)."""
    folder = Path(folder)
    stats = read_csv(folder / STATS)
    total = next((r for r in stats if r["Name"] == "Aggregated"), None)
    if total is None:
        raise ValueError(f"{folder / STATS}: no Aggregated row; did Locust run?")
    window = window_of(folder)
    replica_rows = read_csv(folder / REPLICAS)
    replicas, up, down = scaling(replica_rows, window)
    rejected = sum(int(r["Request Count"]) for r in stats if r["Name"].endswith(REJECTED))
    rerouted = sum(int(r["Request Count"]) for r in stats if r["Name"].endswith(REROUTED))
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "rejected": rejected,
        "rerouted": rerouted,
        "rps": round(_num(total["Requests/s"]), 2),
        "p50_ms": _ms(total["50%"]),
        "p95_ms": _ms(total["95%"]),
        "p99_ms": _ms(total["99%"]),
        "replicas": replicas,
        "scale_up_s": up,
        "scale_down_s": down,
        "load_s": round(window.end - window.start, 1),
        "phases": phases(folder, window),
        "timeline": timeline(replica_rows, window),
    }


def _ms(value: str) -> int | None:
    v = _num(value)
    return None if math.isnan(v) else round(v)


# --- report.md ------------------------------------------------------------------------------


def render_markdown(report: dict[str, Any], folder: Path) -> str:
    """report.md: the figures, the definitions, every endpoint and every deployment."""
    run = json.loads((folder / RUN).read_text()) if (folder / RUN).is_file() else {}
    stats = [r for r in read_csv(folder / STATS) if r["Name"] != "Aggregated"]
    lines = ["# Load test report", ""]
    if run:
        lines += [f"- {k}: `{v}`" for k, v in run.items()] + [""]
    lines += [
        "| requests | failures | rejected | rerouted | req/s | p50 ms | p95 ms | p99 ms | load s |",
        "|---|---|---|---|---|---|---|---|---|",
        "| {requests} | {failures} | {rejected} | {rerouted} | {rps} | {p50_ms} | {p95_ms} | "
        "{p99_ms} | {load_s} |".format(**report),
        "",
        "![report](report.png)",
        "",
        "## Endpoints",
        "",
        "| name | requests | failures | median ms | p95 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in stats:
        lines.append(
            f"| `{r['Type']} {r['Name']}` | {r['Request Count']} | {r['Failure Count']} | "
            f"{r['50%']} | {r['95%']} | {r['99%']} | {_ms(r['Max Response Time'])} |"
        )
    lines += [
        "",
        "## Deployments",
        "",
        "| deployment | max replicas | final replicas | scale-up s | scale-down s |",
        "|---|---|---|---|---|",
    ]
    for name, counts in report["replicas"].items():
        up = report["scale_up_s"].get(name, "–")
        down = report["scale_down_s"].get(name, "–")
        down = "not within the run" if name in report["scale_down_s"] and down is None else down
        lines.append(f"| {name} | {counts['max']} | {counts['final']} | {up} | {down} |")
    if report.get("phases"):
        lines += [
            "",
            "## Phases",
            "",
            "| phase | from s | to s | requests | failures | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for ph in report["phases"]:
            lines.append(
                f"| {ph['phase']} | {ph['from_s']} | {ph['to_s']} | {ph['requests']} | "
                f"{ph['failures']} | {ph['p50_ms']} | {ph['p99_ms']} |"
            )
    if report.get("timeline"):
        lines += ["", "## Replica timeline", "", "Seconds since the load started: replicas.", ""]
        for name, changes in report["timeline"].items():
            steps = ", ".join(f"{t:g} s: {n}" for t, n in changes)
            lines.append(f"- **{name}**: {steps}")
    lines += ["", DEFINITIONS]
    return "\n".join(lines) + "\n"


DEFINITIONS = """## Definitions

- **requests**: every request Locust sent, rejected ones included; **rps**: requests per
  second over the load window; **p50/p95/p99**: response-time percentiles of all requests.
- **failures**: every request that failed: an HTTP error other than backpressure (a 4xx, a
  500, tryage's 503 `no_expert_available`: every expert tried failed or the deadline
  passed), a timeout or a broken connection.
- **rejected**: load shed on purpose at a queue limit (`max_queued_requests`): Serve's
  proxy's 503 or 429 with `Retry-After` when the ingress's queue was full, or tryage's
  `overloaded_error` when every expert the ingress tried (up to `max_attempts` down the
  ranking) had its queue full, or the router's was. They are
  counted apart, under the endpoint's name with ` [rejected]`, and are not failures: the
  client is told to retry later. A deployment without `max_queued_requests` (Serve's
  default, -1) queues instead of rejecting, so its load shows up as latency.
- **rerouted**: `/v1/infer` requests answered, but by an expert below the first of their
  ranking because the ones above it were at their queue limit (or failed): the answer's
  `skipped`. Reported under the endpoint's name with ` [rerouted]`; they are successes. The
  OpenAI endpoints reroute the same way but do not say so, so they are not counted here.
- **load window**: from the start of the load shape to the first second after its users came
  with none (the end of the ramp-down); `load_s` is its length.
- **scale_up_s**: seconds from the load start until a deployment first ran more replicas than
  at the load start (an expert at zero: its first replica running). Only deployments that
  scaled up are listed.
- **scale_down_s**: seconds from the load end until such a deployment was back to its
  minimum (`min_replicas`: 0 for experts) for the rest of the run; 0 if it already was when
  the load ended; `null` if it was not by the end of the run.
- **replicas**: the most replicas running at once (`max`) and at the last sample (`final`),
  sampled every second from Ray Serve's status.
"""


# --- report.png -----------------------------------------------------------------------------


def per_second(times: list[float], totals: list[float], smooth_s: int = 5) -> list[float]:
    """Rates from cumulative counts sampled once a second, averaged over `smooth_s` seconds.

    Locust's own Requests/s column is a rolling value that holds its last figure while no
    request completes, so it is not used for the plot.
    """
    rates = []
    for i in range(len(times)):
        j = max(0, i - smooth_s)
        dt = times[i] - times[j]
        rates.append((totals[i] - totals[j]) / dt if dt > 0 else 0.0)
    return rates


def _suffix_totals(
    history: list[dict[str, str]], agg: list[dict[str, str]], suffix: str
) -> list[float]:
    """Cumulative requests of the rows named with `suffix` at each Aggregated row."""
    latest: dict[str, float] = {}
    by_time: dict[str, float] = {}
    for r in history:  # rows come in time order; per-endpoint rows carry running totals
        if r["Name"].endswith(suffix):
            latest[r["Name"]] = _num(r["Total Request Count"])
        by_time[r["Timestamp"]] = sum(latest.values())
    return [by_time.get(r["Timestamp"], 0.0) for r in agg]


def plot(folder: Path, out: Path) -> None:
    """Requests per second, latency percentiles and replicas per deployment over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = read_csv(folder / HISTORY)
    window = window_of(folder)
    agg = [r for r in history if r["Name"] == "Aggregated"]
    times = [float(r["Timestamp"]) for r in agg]
    t = [x - window.start for x in times]
    totals = [_num(r["Total Request Count"]) for r in agg]
    fig, (ax_rps, ax_lat, ax_rep) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)

    ax_rps.plot(t, per_second(times, totals), label="requests/s")
    failed = [_num(r["Total Failure Count"]) for r in agg]
    ax_rps.plot(t, per_second(times, failed), label="failures/s", color="tab:red")
    rejected = _suffix_totals(history, agg, REJECTED)
    if any(rejected):
        ax_rps.plot(t, per_second(times, rejected), label="rejected/s", color="tab:orange")
    rerouted = _suffix_totals(history, agg, REROUTED)
    if any(rerouted):
        ax_rps.plot(t, per_second(times, rerouted), label="rerouted/s", color="tab:green")
    ax_rps.set_ylabel("per second (5 s mean)")
    users = ax_rps.twinx()
    users.plot(t, [_num(r["User Count"]) for r in agg], "k:", label="users")
    users.set_ylabel("simulated users")
    _legend(ax_rps, users)
    ax_rps.set_title("Load")

    # Locust's percentiles cover the last 10 s; hide them where nothing completed in it.
    quiet = [totals[i] == totals[max(0, i - 10)] for i in range(len(totals))]
    for pct, style in (("50%", "-"), ("95%", "--"), ("99%", ":")):
        values = [math.nan if q else _num(r[pct]) for r, q in zip(agg, quiet, strict=True)]
        ax_lat.plot(t, values, style, label=f"p{pct[:-1]}")
    ax_lat.set_ylabel("response time (ms)")
    ax_lat.set_yscale("log")
    ax_lat.legend(loc="upper right")
    ax_lat.set_title("Latency percentiles (Locust's 10 s window)")

    for name, points in replica_series(read_csv(folder / REPLICAS)).items():
        ax_rep.step(
            [p[0] - window.start for p in points],
            [p[1] for p in points],
            where="post",
            label=name,
        )
    ax_rep.set_ylabel("running replicas")
    ax_rep.yaxis.get_major_locator().set_params(integer=True)
    ax_rep.set_xlabel("seconds since the load started (shaded: load window)")
    ax_rep.legend(loc="upper right", fontsize="small")
    ax_rep.set_title("Replicas per deployment")
    for ax in (ax_rps, ax_lat, ax_rep):
        ax.axvspan(0, window.end - window.start, color="0.92", zorder=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _legend(*axes: Any) -> None:
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    axes[0].legend(handles, labels, loc="upper right")


def write_report(folder: str | Path) -> dict[str, Any]:
    """Build the report of a results folder and write report.json, report.md, report.png."""
    folder = Path(folder)
    report = build_report(folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(render_markdown(report, folder))
    plot(folder, folder / "report.png")
    return report


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtest.report DIR`: (re)build the report of a results folder."""
    p = argparse.ArgumentParser(prog="python -m loadtest.report", description=__doc__)
    p.add_argument("folder", type=Path, help="a results folder (Locust CSVs + replicas.csv)")
    args = p.parse_args(argv)
    try:
        report = write_report(args.folder)
    except (ValueError, KeyError) as err:
        print(f"loadtest.report: {args.folder}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
