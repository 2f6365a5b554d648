"""Turning a run's raw figures into the table, the JSON file and the keys chart."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import Results

PLAIN_OF = {"dramatiq/ShardedBroker": "dramatiq/RedisBroker", "celery/sharded+redis": "celery/redis"}
FLAT_ENOUGH = 0.8  # slowest / fastest rate across key counts that we still call flat
WHAT = {"enqueue_per_s": "enqueue", "drain_per_s": "lease+ack"}


def flatness_by_backend(results: Results) -> list[tuple[str, str, list[dict[str, Any]], float]]:
    """(backend, rate name, rows compared, slowest/fastest) for the scaling goal.

    Only rows where every call had the same shape are compared: at least as many keys
    as messages per call (``per_key`` 1). With fewer keys, one ``enqueue_many`` or
    ``lease`` call handles several messages of each key and so costs less per message,
    for a reason that has nothing to do with how many keys there are.
    """
    scaling = results.sections.get("scaling", {})
    verdicts = []
    for backend in sorted({row["backend"] for row in scaling.values()}):
        for what in WHAT:
            rows = [r for r in scaling.values() if r["backend"] == backend and r["per_key"] == 1]
            if len(rows) >= 2:
                rates = [r[what] for r in rows]
                verdicts.append((backend, what, rows, min(rates) / max(rates)))
    return verdicts


def profiles_of_misses(results: Results) -> list[tuple[str, str]]:
    """(title, text) of the profiles that explain each missed goal.

    For a keyed drain (enqueue) slower than the plain broker's: the worker threads' (the
    sending thread's) profile. For a rate that is not flat: the small profiled samples of the fastest and the slowest
    configurations, side by side.
    """
    shown = []
    for name, text in results.sections.get("profiles", {}).items():
        whose = "the worker threads" if name.endswith("drain") else "the sending thread"
        shown.append((f"{name}, slower than the plain broker (cProfile of {whose})", text))
    profiles = results.sections.get("scaling_profiles", {})
    for backend, what, rows, flatness in flatness_by_backend(results):
        if flatness >= FLAT_ENOUGH:
            continue
        phase = "enqueue" if what == "enqueue_per_s" else "lease+ack"
        for label, row in (("fastest", max(rows, key=lambda r: r[what])), ("slowest", min(rows, key=lambda r: r[what]))):
            row_name = f"{backend}/backlog={row['backlog']}/keys={row['keys']}"
            if row_name in profiles:
                server = row.get("server_us_per_enqueue" if phase == "enqueue" else "server_us_per_lease_ack")
                on_server = f", Redis server {server} µs per message" if server is not None else ""
                title = (f"{backend} {phase}, {label}: {row['keys']:,} keys, backlog {row['backlog']:,}, "
                         f"{row[what]:,.0f}/s{on_server} (cProfile of a small sample of the client)")
                shown.append((title, profiles[row_name][phase]))
    return shown


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table, padded so it reads in a terminal too."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@dataclass(frozen=True)
class Goal:
    """One goal of issue 11 as measured in a run; ``met`` is None when not measured."""

    number: int
    what: str
    measured: str
    target: str
    met: bool | None

    @property
    def verdict(self) -> str:
        return "not measured" if self.met is None else "met" if self.met else "MISSED"


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def _check(number: int, what: str, value: float | None, target: float, *, at_most: bool,
           shown: str | None = None, unit: str = "x", why_missing: str = "not in this run") -> Goal:
    """A goal comparing ``value`` with ``target`` (``at_most``: value <= target)."""
    sign = "<=" if at_most else ">="
    target_text = f"{sign} {target:,.2f}{unit}" if unit == "x" else f"{sign} {target:,.0f}{unit}"
    if value is None:
        return Goal(number, what, why_missing, target_text, None)
    met = value <= target if at_most else value >= target
    text = shown or (f"{value:.2f}x" if unit == "x" else f"{value:,.0f}{unit}")
    return Goal(number, what, text, target_text, met)


def server_rows(results: Results) -> dict[str, dict[str, Any]]:
    """Redis server cost per task of each adapter run ('target/label' -> phases)."""
    return {name: row["server"] for name, row in results.sections.get("adapters", {}).items() if "server" in row}


def goal_rows(results: Results) -> list[Goal]:
    """Every goal of issue 11 (1-5) with its measured value, target and verdict."""
    s = results.sections
    rows: list[Goal] = []
    adapters = s.get("adapters", {})
    server = server_rows(results)
    # 1. Redis server time per message, send + fetch + ack, top-level commandstats.
    for sharded, plain in PLAIN_OF.items():
        for label, target in (("keyed", 1.25 if sharded.startswith("dramatiq") else 1.0), ("unkeyed", 1.0)):
            mine, base = server.get(f"{sharded}/{label}"), server.get(f"{plain}/{label}")
            ratio = cpu = None
            if mine and base:
                ratio = _ratio(mine["total"]["server_us"], base["total"]["server_us"])
                cpu = _ratio(mine["total"]["cpu_us"], base["total"]["cpu_us"])
            shown = None if ratio is None else (
                f"{ratio:.2f}x ({mine['total']['server_us']:.0f} vs {base['total']['server_us']:.0f} us; "
                f"CPU {cpu:.2f}x)" if cpu is not None else f"{ratio:.2f}x")
            rows.append(_check(1, f"server time {label}, {sharded} / {plain}", ratio, target, at_most=True, shown=shown))
    # 2. Adapters: enqueue and drain rates against the plain broker of the same framework.
    for sharded, plain in PLAIN_OF.items():
        for label in ("keyed", "unkeyed"):
            mine, base = adapters.get(f"{sharded}/{label}"), adapters.get(f"{plain}/{label}")
            for what, name, target in (("enqueue_per_s", "enqueue", 1.0), ("drain_per_s", "drain", 1.2)):
                ratio = _ratio(mine[what], base[what]) if mine and base else None
                rows.append(_check(2, f"{name} {label}, {sharded} / {plain}", ratio, target, at_most=False))
    # 3. The engine on Redis from one Python process.
    engine = s.get("engine", {})
    cycle = engine.get("redis/keyed")
    rows.append(_check(
        3, f"engine full cycle, redis, {cycle['keys']:,} keys (enqueue_many {cycle['batch']}, "
           f"lease {cycle['lease_batch']}, ack_many)" if cycle and "lease_batch" in cycle else "engine full cycle, redis",
        cycle["round_trip_per_s"] if cycle else None, 50_000, at_most=False, unit=" msgs/s"))
    single = engine.get("redis/keyed, one per call")
    rows.append(_check(3, "engine one per call, redis / raw unpipelined LPUSH+RPOP",
                       single["round_trip_fraction_of_limit"] if single else None, 0.5, at_most=False))
    for what in WHAT:
        rows.append(_keys_goal(results, what))
    # 4. Redis bytes per queued keyed message through the adapters.
    memory = s.get("redis_memory", {})
    for sharded, plain in PLAIN_OF.items():
        mine, base = memory.get(f"{sharded} (keyed)"), memory.get(plain)
        ratio = _ratio(mine, base)
        shown = None if ratio is None else f"{ratio:.2f}x ({mine:,.0f} vs {base:,.0f} B)"
        rows.append(_check(4, f"Redis bytes per keyed message, {sharded} / {plain}", ratio, 1.0, at_most=True,
                           shown=shown))
    # 5. SQLite and memory backends.
    now, then = engine.get("sqlite/keyed, one per call"), s.get("baseline")
    ratio = _ratio(now["round_trip_per_s"], then["round_trip_per_s"]) if now and then else None
    rows.append(_check(5, f"sqlite one per call full cycle / {then['revision'] if then else 'baseline'}'s", ratio,
                       2.0, at_most=False))
    for backend in ("memory", "sqlite"):
        for what in WHAT:
            rows.append(_check(5, f"{backend} {WHAT[what]} at a 1,000,000 backlog / smallest backlog",
                               _backlog_ratio(results, backend, what), 0.8, at_most=False,
                               why_missing="no 1,000,000 backlog in this mode (make bench-full)"))
    return rows


def _keys_goal(results: Results, what: str) -> Goal:
    """Goal 3's 100,000 keys against 10 keys, on the smallest backlog of the scaling rows."""
    rows = [r for r in results.sections.get("scaling", {}).values() if r["backend"] == "redis"]
    backlog = min((r["backlog"] for r in rows), default=None)
    by_keys = {r["keys"]: r for r in rows if r["backlog"] == backlog}
    many, few = by_keys.get(100_000), by_keys.get(10)
    ratio = _ratio(many[what], few[what]) if many and few else None
    shown = None if ratio is None else (
        f"{ratio:.2f}x ({many[what]:,.0f} vs {few[what]:,.0f}/s; per_key {many['per_key']} vs {few['per_key']})")
    return _check(3, f"engine {WHAT[what]}, redis, 100,000 keys / 10 keys", ratio, 0.8, at_most=False,
                  shown=shown, why_missing="no 10 and 100,000 key rows")


def _backlog_ratio(results: Results, backend: str, what: str) -> float | None:
    """Slowest over the key counts of (rate at a 1,000,000 backlog / rate at the smallest)."""
    rows = [r for r in results.sections.get("scaling", {}).values() if r["backend"] == backend]
    smallest = min((r["backlog"] for r in rows), default=None)
    if smallest is None or smallest >= 1_000_000:
        return None
    small = {r["keys"]: r[what] for r in rows if r["backlog"] == smallest}
    big = {r["keys"]: r[what] for r in rows if r["backlog"] == 1_000_000}
    ratios = [big[keys] / small[keys] for keys in big if small.get(keys)]
    return min(ratios) if ratios else None


SCALE_OUT = (("cluster-3", "cluster-1", 2.5), ("cluster-1", "plain", 0.9))  # issue 13: (topology, base, goal)
SCALE_OUT_RATES = (("engine", "round_trip_per_s", "engine full cycle"), ("dramatiq", "drain_per_s", "Dramatiq keyed drain"))


def scale_out_goals(results: Results) -> list[Goal]:
    """Issue 13's goals: a queue on 3 cluster masters >= 2.5x on 1 (goal 1), a 1-master
    cluster >= 0.9x a plain server (goal 2), measured in msgs/s and, independent of the
    machine's cores, in capacity (1e6 / the busiest master's CPU µs per message)."""
    scale = results.sections.get("scale_out", {})
    rows = []
    for number, (mine, base, target) in enumerate(SCALE_OUT, start=1):
        for kind, what, label in SCALE_OUT_RATES:
            a, b = scale.get(f"{mine}/{kind}"), scale.get(f"{base}/{kind}")
            for measure, name in ((what, "msgs/s"), ("capacity_per_s", "server capacity")):
                ratio = _ratio(a[measure], b[measure]) if a and b else None
                shown = None if ratio is None else f"{ratio:.2f}x ({a[measure]:,.0f} vs {b[measure]:,.0f}/s)"
                rows.append(_check(number, f"{label}, {name}, {mine} / {base}", ratio, target, at_most=False,
                                   shown=shown))
    return rows


def _server_cpu(row: dict[str, Any], kind: str) -> list[float]:
    """A scale-out row's server CPU µs per message, per master (both phases for the engine)."""
    return row["server_cpu_us_per_message"]["total"] if kind == "engine" else row["server_cpu_us_per_task"]


def _function_calls(row: dict[str, Any], kind: str) -> float | None:
    """A scale-out row's function calls (FCALL, all masters) per message, both phases."""
    calls = row.get("function_calls_per_message" if kind == "engine" else "function_calls_per_task")
    if isinstance(calls, dict):
        return calls["enqueue"] + calls["lease_ack"]
    return calls


def scale_out_why(results: Results) -> list[str]:
    """Why each missed scale-out goal was missed, from the per-master server time: the
    queue not spread over the masters (one master did most of the work), or spread but
    sharing too few cores with its clients; and what a 1-master cluster costs more than a
    plain server."""
    scale = results.sections.get("scale_out", {})
    nproc = results.machine.get("nproc")
    lines = []
    for kind, what, label in SCALE_OUT_RATES:
        three, one, plain = (scale.get(f"{t}/{kind}") for t in ("cluster-3", "cluster-1", "plain"))
        if three and one and one[what] and three[what] < 2.5 * one[what]:
            per_master, single = _server_cpu(three, kind), _server_cpu(one, kind)[0]
            share = max(per_master) / sum(per_master) if sum(per_master) else 0.0
            spent = ", ".join(f"{us:.1f}" for us in per_master)
            head = (f"- {label}, 3 masters vs 1: {three[what]:,.0f}/s vs {one[what]:,.0f}/s "
                    f"({three[what] / one[what]:.2f}x, goal 2.5x); server CPU per message per master {spent} µs "
                    f"(1 master: {single:.1f} µs). ")
            if share > 0.6:
                lines.append(head + f"The queue was not spread: one master did {share:.0%} of the server work, "
                             "so its keys' partitions were (nearly) all on it; a queue spread over P partitions on "
                             "3 masters gives each about a third.")
            else:
                calls3, calls1 = _function_calls(three, kind), _function_calls(one, kind)
                grown = sum(per_master) / single if single else 0.0
                more_calls = (
                    f" All masters together spent {grown:.2f}x the one master's CPU per message, in {calls3:.3f} "
                    f"function calls per message against {calls1:.3f}"
                    + (f": each of the {three['processes']} consumers' lease calls and acks split over the partitions "
                       "of its turn, and every call has a fixed cost." if grown > 1.05 and calls3 > calls1
                       else ": the work spread over the masters, it did not grow.")
                    if calls3 and calls1 else ""
                )
                lines.append(head + f"The busiest master did {max(per_master) / single:.0%} of the one master's "
                             f"work per message, so with a core per master the queue could go "
                             f"{_ratio(three['capacity_per_s'], one['capacity_per_s']) or 0:.2f}x faster (capacity)."
                             f"{more_calls} "
                             f"This machine has {nproc} cores for {three['processes']} masters, "
                             f"{three['processes']} consumer processes and the producers: they take turns on the "
                             "cores, and the rate cannot scale past them.")
        capacity_short = bool(one and plain and plain["capacity_per_s"] and one["capacity_per_s"]
                              and one["capacity_per_s"] < 0.9 * plain["capacity_per_s"])
        if one and plain and plain[what] and (one[what] < 0.9 * plain[what] or capacity_short):
            cluster_us, plain_us = _server_cpu(one, kind)[0], _server_cpu(plain, kind)[0]
            lines.append(
                f"- {label}, 1-master cluster vs plain server: {one[what]:,.0f}/s vs {plain[what]:,.0f}/s "
                f"({one[what] / plain[what]:.2f}x, goal 0.9x), capacity "
                f"{one['capacity_per_s'] / plain['capacity_per_s']:.2f}x; server CPU {cluster_us:.1f} vs {plain_us:.1f} µs "
                f"per message ({cluster_us / plain_us:.2f}x: cluster mode's slot checks and bus on the server, and "
                f"{_function_calls(one, kind) or 0:.3f} function calls per message against "
                f"{_function_calls(plain, kind) or 0:.3f}: one queue in 16 partitions on one master splits every "
                "batch), the rest is the client's (redis-py's cluster client and the per-partition calls).")
    return lines


def goals(results: Results) -> list[str]:
    """One line per goal of issue 11 and per flatness check: met or missed, with the figures."""
    verdicts = [f"goal {g.number}: {g.what}: {g.measured} (target {g.target}; {g.verdict})" for g in goal_rows(results)]
    for backend, what, rows, flatness in flatness_by_backend(results):
        verdict = "flat" if flatness >= FLAT_ENOUGH else "NOT FLAT"
        configs = ", ".join(f"{r['keys']:,} keys/{r['backlog']:,} backlog" for r in rows)
        verdicts.append(
            f"flat scaling, {backend} {WHAT[what]}: slowest/fastest = {flatness:.2f} over {configs} "
            f"({verdict}, threshold {FLAT_ENOUGH})"
        )
    return verdicts


def table(results: Results) -> str:
    """Every section of the run as Markdown tables, with the goals' verdicts."""
    s = results.sections
    out: list[str] = []
    server = server_rows(results)
    if server:
        out += ["", "### Redis server cost per task through the adapters (µs per task; ratio = sharded / plain, "
                "same run, same server)", "",
                "Server time: INFO commandstats usec of the top-level commands only (a script's or EXEC's "
                "commands are inside its usec; see docs/benchmarks.md). CPU: the server main thread's "
                "used_cpu_user + used_cpu_sys, an independent measure that also covers network I/O.", ""]
        rows = []
        for name, phases in server.items():
            target, _, label = name.rpartition("/")
            base = server.get(f"{PLAIN_OF.get(target, target)}/{label}")
            send, fetch, total = phases["send"], phases["fetch_ack"], phases["total"]
            rows.append([
                target, label, send["server_us"], fetch["server_us"], total["server_us"],
                round(_ratio(total["server_us"], base["total"]["server_us"]) or 0, 2) if base else None,
                send["cpu_us"], fetch["cpu_us"], total["cpu_us"],
                round(_ratio(total["cpu_us"], base["total"]["cpu_us"]) or 0, 2) if base else None,
                total["commands_sent"], total["naive_sum_us"],
            ])
        out += _table(["broker", "tasks", "send µs", "fetch+ack µs", "total µs", "ratio", "CPU send µs",
                       "CPU fetch+ack µs", "CPU total µs", "CPU ratio", "commands sent", "plain sum µs"], rows)
        out += ["", "(plain sum: every commandstats line added up, nested commands twice: what not to quote.)"]
        out += ["", "Where the server time goes (top-level commands per task: calls, µs; the four costliest):", ""]
        rows = []
        for name, phases in server.items():
            target, _, label = name.rpartition("/")
            for phase in ("send", "fetch_ack"):
                commands = [(command, cost) for command, cost in phases[phase].get("by_command", {}).items()
                            if cost["us"] >= 0.05][:4]
                rows.append([target, label, phase.replace("_", "+"), ", ".join(
                    f"{command} {cost['calls']:.2f}x {cost['us']:.1f} µs" for command, cost in commands)])
        out += _table(["broker", "tasks", "phase", "commands"], rows)
    nesting = s.get("commandstats_nesting")
    if nesting:
        script, function, transaction = nesting["script"], nesting["function"], nesting["transaction"]
        out += ["", f"Checked on this server: one EVAL of {script['nested_calls']:,} SETs took "
                    f"{script['eval_usec']:,} µs, its nested SETs {script['nested_set_usec']:,} µs counted again "
                    f"under set; one FCALL of as many {function['fcall_usec']:,} µs, its SETs "
                    f"{function['nested_set_usec']:,} µs; one EXEC of as many {transaction['exec_usec']:,} µs, "
                    f"its SETs {transaction['nested_set_usec']:,} µs."]
    adapters = s.get("adapters")
    if adapters:
        out += ["", "### Adapters vs plain brokers (tasks/s; ratio = sharded / plain, same run)", ""]
        rows = []
        for name, row in adapters.items():
            target, _, label = name.rpartition("/")
            base = adapters.get(f"{PLAIN_OF.get(target, target)}/{label}")
            rows.append([
                target, label, row["enqueue_per_s"], row["drain_per_s"],
                round(row["enqueue_per_s"] / base["enqueue_per_s"], 2) if base else None,
                round(row["drain_per_s"] / base["drain_per_s"], 2) if base else None,
            ])
        out += _table(["broker", "tasks", "enqueue/s", "drain/s", "enqueue ratio", "drain ratio"], rows)
    limit = s.get("raw_redis_limit")
    engine = s.get("engine")
    if limit and engine:
        out += ["", "### Engine vs the raw Redis limit (messages/s; fraction = engine round trip / raw "
                "LPUSH+RPOP round trip, pipelined for batches, unpipelined for one per call)", ""]
        single = limit["one_per_call"]
        rows = [
            ["raw Redis LPUSH/RPOP", "pipelined", limit["enqueue_per_s"], limit["drain_per_s"], limit["round_trip_per_s"], 1.0],
            ["raw Redis LPUSH/RPOP", "one per call", single["enqueue_per_s"], single["drain_per_s"], single["round_trip_per_s"], 1.0],
        ]
        for name, row in engine.items():
            backend, _, label = name.partition("/")
            rows.append([backend, label, row["enqueue_per_s"], row["drain_per_s"], row["round_trip_per_s"],
                         row["round_trip_fraction_of_limit"]])
        out += _table(["backend", "messages", "enqueue/s", "lease+ack/s", "round trip/s", "fraction of limit"], rows)
        if "server_us_per_enqueue" in limit:
            out += ["", f"Redis server time per message, raw: {limit['server_us_per_enqueue']} µs per LPUSH, "
                        f"{limit['server_us_per_lease_ack']} µs per RPOP (the engine's: see the scaling table)."]
    scaling = s.get("scaling")
    if scaling:
        out += ["", "### Scaling with keys and backlog (messages/s on top of the backlog; Redis µs = server time per message, INFO commandstats)", ""]
        rows = [[r["backend"], r["backlog"], r["keys"], r["per_key"], r["preload_per_s"], r["enqueue_per_s"], r["drain_per_s"],
                 r.get("server_us_per_enqueue"), r.get("server_us_per_lease_ack")]
                for r in scaling.values()]
        out += _table(["backend", "backlog", "keys", "per_key", "backlog enqueue/s", "enqueue/s", "lease+ack/s",
                       "Redis µs/enqueue", "Redis µs/lease+ack"], rows)
    memory = s.get("redis_memory")
    if memory:
        out += ["", "### Redis memory per queued message (bytes, INFO used_memory delta / count)", ""]
        out += _table(["what", "bytes/message"], [[name, value] for name, value in memory.items()])
    latency = s.get("latency")
    if latency:
        out += ["", "### Latency, enqueue to start, at a steady load", ""]
        rows = [[name, row["rate_per_s"], row["keys"], row["p50_ms"], row["p99_ms"]] for name, row in latency.items()]
        out += _table(["broker", "tasks/s", "keys", "p50 ms", "p99 ms"], rows)
    seeds = s.get("seeds")
    if seeds:
        out += ["", "### The seed libraries (ratio = sharded-broker / seed, same run)", ""]
        rows = []
        sq = seeds.get("sharded-queue")
        if sq:
            seed, twin = sq["sharded-queue 0.2.10 (RuntimeStorage)"], sq["sharded-broker memory://"]
            rows.append(["sharded-queue register", seed["register_per_s"], twin["register_per_s"], sq["register_ratio"]])
            rows.append(["sharded-queue handle (batches)", seed["handle_per_s"], twin["handle_per_s"], sq["handle_ratio"]])
        sharq = seeds.get("sharq")
        if sharq:
            seed, twin = sharq["SharQ 1.3.0"], sharq["sharded-broker redis://"]
            rows.append(["SharQ enqueue", seed["enqueue_per_s"], twin["enqueue_per_s"], sharq["enqueue_ratio"]])
            rows.append(["SharQ dequeue+finish", seed["dequeue_finish_per_s"], twin["dequeue_finish_per_s"], sharq["dequeue_finish_ratio"]])
        out += _table(["workload", "seed/s", "sharded-broker/s", "ratio"], rows)
    scale = s.get("scale_out")
    if scale:
        out += ["", "### Scale-out: one queue over Redis Cluster masters (issue 13; one producer and one "
                "consumer process per master, 1,000 keys)", "",
                "Server CPU: each master's main thread (INFO cpu used_cpu_user + used_cpu_sys) per message, "
                "before/after each phase. Capacity: 1e6 / the busiest master's µs per message, what the "
                "queue could do with a core per master, whatever the clients' cores.", ""]
        rows = []
        for name, row in scale.items():
            topology, _, kind = name.rpartition("/")
            if kind == "engine":
                cpu = row["server_cpu_us_per_message"]["total"]
                calls = row.get("function_calls_per_message")
                rows.append([topology, "engine full cycle", row["processes"], row["messages"], row["enqueue_per_s"],
                             row["drain_per_s"], row["round_trip_per_s"], ", ".join(f"{us:.1f}" for us in cpu),
                             None if calls is None else f"{calls['enqueue'] + calls['lease_ack']:.3f}",
                             row["capacity_per_s"]])
            else:
                cpu = row["server_cpu_us_per_task"]
                calls = row.get("function_calls_per_task")
                rows.append([topology, f"Dramatiq drain ({row['worker_threads']} threads)", row["processes"],
                             row["tasks"], None, row["drain_per_s"], None, ", ".join(f"{us:.1f}" for us in cpu),
                             None if calls is None else f"{calls:.3f}", row["capacity_per_s"]])
        out += _table(["topology", "workload", "processes", "messages", "enqueue/s", "drain/s", "round trip/s",
                       "server CPU µs/msg per master", "function calls/msg", "capacity/s"], rows)
        scale_goals = scale_out_goals(results)
        out += ["", "#### Goals of issue 13 (this run)", ""]
        out += _table(["goal", "what", "measured", "target", "verdict"],
                      [[g.number, g.what, g.measured, g.target, g.verdict] for g in scale_goals])
        why = scale_out_why(results)
        if why:
            out += ["", "Why a scale-out goal was missed:", ""] + why
    goal_table = goal_rows(results)
    if goal_table:
        out += ["", "### Goals of issue 11 (this run)", ""]
        out += _table(["goal", "what", "measured", "target", "verdict"],
                      [[g.number, g.what, g.measured, g.target, g.verdict] for g in goal_table])
    flatness = goals(results)[len(goal_table):]
    if flatness:
        out += ["", "### Flat scaling (per_key 1 rows)", ""] + [f"- {v}" for v in flatness]
    if results.skipped:
        out += ["", "### Not measured in this run", ""] + [f"- {k}: {v}" for k, v in results.skipped.items()]
    return "\n".join(out).lstrip("\n")


# What --publish writes into docs/, per mode: the JSON copy, the chart, and the block of
# docs/benchmarks.md between two markers.
PUBLISHED = {
    "quick": ("benchmarks-latest.json", "benchmarks-keys.png", "make bench"),
    "full": ("benchmarks-full-latest.json", "benchmarks-full-keys.png", "make bench-full"),
}
# The scale-out chart of each mode: written next to the keys chart, published under this name.
SCALE_OUT_CHARTS = {"quick": "benchmarks-cluster.png", "full": "benchmarks-full-cluster.png"}


def scale_out_chart_path(keys_chart: Path) -> Path:
    """Where a run's scale-out chart lies, next to its keys chart."""
    return keys_chart.with_name(keys_chart.name.replace("-keys.png", "-cluster.png"))


def markers(mode: str) -> tuple[str, str]:
    return (
        f"<!-- {mode} benchmark results: written by `python -m benchmarks.run --{mode} --publish` -->",
        f"<!-- end of {mode} benchmark results -->",
    )


def markdown(results: Results, command: str, chart_name: str) -> str:
    """A generated block of docs/benchmarks.md: command, machine, tables, chart, profiles."""
    m = results.machine
    packages = ", ".join(f"{name} {version}" for name, version in m.get("packages", {}).items() if version)
    lines = [
        f"Command: `{command}` ({results.mode} mode, {m.get('seconds')} s), {m.get('date')}, commit {m.get('commit')}.",
        "",
        f"Machine: {m.get('nproc')} cores ({m.get('cpu')}), {m.get('platform')}, Python {m.get('python')}, "
        f"Redis {m.get('redis_server')}; {packages}. Load average (1, 5, 15 min) "
        f"{m.get('load_average_at_start')} at the start and {m.get('load_average_at_end')} at the end: "
        "other engineers were using the same 2 cores, so absolute rates are noisy; the ratios "
        "below come from this one run.",
        "",
        table(results),
        "",
        f"![engine throughput vs number of shard keys]({chart_name})",
    ]
    if results.sections.get("scale_out") and results.mode in SCALE_OUT_CHARTS:
        lines += ["", f"![one queue over 1 and 3 Redis Cluster masters]({SCALE_OUT_CHARTS[results.mode]})"]
    for title, text in profiles_of_misses(results):
        lines += ["", f"#### Profile: {title}", "", "```", text, "```"]
    return "\n".join(lines)


# The README's short table of a quick run, between these lines (see readme_block).
README_MARKERS = ("<!-- benchmark block: generated from docs/benchmarks-latest.json -->",
                  "<!-- end of benchmark block -->")
README_ADAPTERS = (
    ("dramatiq/RedisBroker", "Dramatiq `RedisBroker`", "dramatiq/RedisBroker"),
    ("dramatiq/ShardedBroker", "Dramatiq `ShardedBroker` (redis)", "dramatiq/RedisBroker"),
    ("celery/redis", "Celery `redis://`", "celery/redis"),
    ("celery/sharded+redis", "Celery `sharded+redis://`", "celery/redis"),
)


def readme_block(results: Results) -> str:
    """The README's benchmark block for a quick run: the adapters against their plain
    brokers (rates, server time) and Redis bytes per queued message."""
    machine = results.machine
    adapters = results.sections.get("adapters") or {}
    load = machine.get("load_average_at_start", [0])[0], machine.get("load_average_at_end", [0])[0]
    packages = machine.get("packages", {})
    lines = [
        f"Latest quick run: {machine['date'][:10]}, commit {machine.get('commit', 'unknown')}, "
        f"{machine['nproc']} cores ({machine.get('cpu', 'unknown CPU')}), Python {machine['python']}, "
        f"Redis {machine.get('redis_server', '?')}, redis-py {packages.get('redis', '?')}, "
        f"Celery {packages.get('celery', '?')}, Dramatiq {packages.get('dramatiq', '?')}, on a machine shared "
        f"with other work (load {min(load):.1f}-{max(load):.1f}): absolute rates are noisy, the ratios come from "
        "one run.",
        "",
        "| broker (no-op tasks, in-process worker) | tasks | enqueue/s | drain/s | drain vs plain | enqueue vs plain "
        "| Redis server µs per task (send + fetch + ack) | vs plain |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, label, plain_name in README_ADAPTERS:
        for tasks in ("unkeyed", "keyed"):
            row, plain = adapters.get(f"{name}/{tasks}"), adapters.get(f"{plain_name}/{tasks}")
            if not row or not plain:
                continue
            server = row.get("server", {}).get("total", {}).get("server_us")
            plain_server = plain.get("server", {}).get("total", {}).get("server_us")
            ratios = [_ratio(row[what], plain[what]) for what in ("drain_per_s", "enqueue_per_s")]
            server_ratio = _ratio(server, plain_server)
            keys = f"{row['keys']:,} keys" if row.get("keys") else "unkeyed"
            lines.append(
                f"| {label} | {keys} | {row['enqueue_per_s']:,.0f} | {row['drain_per_s']:,.0f} | "
                + " | ".join("-" if r is None else f"{r:.2f}" for r in ratios)
                + f" | {'-' if server is None else f'{server:,.0f}'} | "
                + ("-" if server_ratio is None else f"{server_ratio:.2f}") + " |"
            )
    memory = results.sections.get("redis_memory")
    if memory:
        lines += ["", "Redis bytes per queued message (100-byte payload or task argument): "
                  + ", ".join(f"{name} {size:,.0f}" for name, size in memory.items()) + "."]
    return "\n".join(lines)


def replace_between(path: Path, start_marker: str, end_marker: str, block: str) -> None:
    text = path.read_text()
    start, end = text.index(start_marker) + len(start_marker), text.index(end_marker)
    path.write_text(text[:start] + "\n" + block + "\n" + text[end:])


def publish(results: Results, json_path: Path, png_path: Path | None, docs: Path) -> list[Path]:
    """Copy the run's JSON and chart into ``docs``, replace its mode's block of
    ``docs/benchmarks.md`` and, for a quick run, the README's benchmark block; the files
    written."""
    json_name, chart_name, command = PUBLISHED[results.mode]
    docs.mkdir(exist_ok=True)
    written = [docs / json_name, docs / "benchmarks.md"]
    shutil.copyfile(json_path, docs / json_name)
    if png_path is not None:
        shutil.copyfile(png_path, docs / chart_name)
        written.append(docs / chart_name)
        scale_chart = scale_out_chart_path(png_path)
        if scale_chart.exists() and results.sections.get("scale_out"):
            shutil.copyfile(scale_chart, docs / SCALE_OUT_CHARTS[results.mode])
            written.append(docs / SCALE_OUT_CHARTS[results.mode])
    start_marker, end_marker = markers(results.mode)
    replace_between(docs / "benchmarks.md", start_marker, end_marker, "\n" + markdown(results, command, chart_name) + "\n")
    readme = docs.parent / "README.md"
    if results.mode == "quick" and readme.exists() and README_MARKERS[0] in readme.read_text():
        replace_between(readme, *README_MARKERS, readme_block(results))
        written.append(readme)
    return written


def write_json(results: Results, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results.as_dict(), indent=2, sort_keys=False) + "\n")


def load_json(path: Path) -> Results:
    raw = json.loads(path.read_text())
    return Results(raw["mode"], raw["machine"], raw["sections"], raw.get("skipped", {}))


def chart(results: Results, path: Path) -> bool:
    """PNG of engine throughput vs number of keys, one line per backend, rate and
    backlog; the raw Redis limit as a reference. False when there is nothing to plot."""
    scaling = results.sections.get("scaling")
    if not scaling:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    colors = {"memory": "tab:green", "sqlite": "tab:blue", "redis": "tab:red"}
    limit = results.sections.get("raw_redis_limit")
    for axis, what, title in ((axes[0], "enqueue_per_s", "enqueue_many"), (axes[1], "drain_per_s", "lease + ack_many")):
        series: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for row in scaling.values():
            series.setdefault((row["backend"], row["backlog"]), []).append((row["keys"], row[what]))
        for (backend, backlog), points in sorted(series.items()):
            points.sort()
            style = "-o" if backlog == min(r["backlog"] for r in scaling.values()) else "--s"
            axis.plot([k for k, _ in points], [v for _, v in points], style, color=colors.get(backend),
                      label=f"{backend}, backlog {backlog:,}")
        for row in scaling.values():
            if row["per_key"] > 1:  # a different call shape: say so on the point
                axis.annotate(f"{row['per_key']}/key/call", (row["keys"], row[what]), fontsize=7,
                              textcoords="offset points", xytext=(4, 4))
        if limit:
            axis.axhline(limit[what], color="black", linestyle=":", label="raw Redis LPUSH/RPOP")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("shard keys")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("messages / s")
    axes[1].legend(fontsize=8)
    machine = results.machine
    figure.suptitle(
        f"sharded-broker engine throughput vs keys ({results.mode} mode, {machine.get('nproc')} cores, "
        f"{machine.get('date', '')[:10]})"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def scale_out_chart(results: Results, path: Path) -> bool:
    """PNG of the scale-out section: msgs/s per topology (left) and the capacity from the
    busiest master's server time (right), for the engine cycle and the Dramatiq drain.
    False when the run has no scale-out figures."""
    scale = results.sections.get("scale_out")
    if not scale:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topologies = [t for t in ("plain", "cluster-1", "cluster-3") if any(n.startswith(f"{t}/") for n in scale)]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.38
    for axis, title, measure in ((axes[0], "measured on this machine", None),
                                 (axes[1], "capacity: 1e6 / busiest master's server µs per message", "capacity_per_s")):
        for offset, (kind, what, label) in enumerate(SCALE_OUT_RATES):
            values = [(scale.get(f"{t}/{kind}") or {}).get(measure or what) or 0 for t in topologies]
            positions = [i + (offset - 0.5) * width for i in range(len(topologies))]
            bars = axis.bar(positions, values, width, label=label)
            axis.bar_label(bars, fmt="{:,.0f}", fontsize=7)
        axis.set_xticks(range(len(topologies)), topologies)
        axis.set_ylabel("messages / s")
        axis.set_title(title, fontsize=10)
        axis.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    machine = results.machine
    figure.suptitle(f"one queue, 1,000 keys, over Redis Cluster masters ({results.mode} mode, "
                    f"{machine.get('nproc')} cores, {machine.get('date', '')[:10]})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
