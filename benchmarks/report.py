"""From a run's results: the targets of issue #10 (figure now with its CPU per GiB, goal, the
same-run reference, pass/miss), the PNG charts, and the Markdown tables that
benchmarks/README.md shows. Runs written before a measurement existed are read too: their
rows show "not measured"."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from common import MiB

Results = list[dict[str, Any]]


def find(results: Results, workload: str, system: str, variant: str | None = None) -> dict[str, Any] | None:
    for r in results:
        if (r["workload"], r["system"]) == (workload, system) and variant in (None, r["variant"]):
            return r
    return None


def value(results: Results, workload: str, system: str, variant: str | None, key: str,
          how: str = "median") -> float:
    """The median (or ``max`` over runs) of ``key``; NaN when that result is missing."""
    r = find(results, workload, system, variant)
    if r is None:
        return math.nan
    if how == "max":
        values = [run[key] for run in r["runs"] if key in run]
        return float(max(values)) if values else math.nan
    v = r["median"].get(key)
    return float(v) if isinstance(v, (int, float)) else math.nan


def _target(name: str, measured: float, target: float, unit: str, higher_is_better: bool,
            limit: float = math.nan, limit_label: str = "", note: str = "",
            cpu_s_per_gib: float = math.nan, limit_cpu_s_per_gib: float = math.nan) -> dict[str, Any]:
    """One row: ``measured`` against ``target``; ``limit`` is the same-run reference the target
    is derived from; the CPU per GiB goes beside a throughput (the system's own process)."""
    if math.isnan(measured) or math.isnan(target):
        verdict, miss = "not measured", ""
    elif (measured >= target) if higher_is_better else (measured <= target):
        verdict, miss = "pass", ""
    else:
        verdict = "miss"
        if target == 0:
            miss = f"{measured:g} {unit} instead of 0"
        elif higher_is_better:
            miss = f"{measured / target:.2f}× the target ({target - measured:.3g} {unit} short)"
        else:
            miss = f"{measured / target:.2f}× the target ({measured - target:.3g} {unit} over)"
    return {"name": name, "measured": measured, "target": target, "unit": unit, "limit": limit,
            "limit_label": limit_label, "result": verdict, "miss_by": miss, "note": note,
            "cpu_s_per_gib": cpu_s_per_gib, "limit_cpu_s_per_gib": limit_cpu_s_per_gib}


def _known(pattern: str, number: float) -> str:
    """``pattern`` filled with ``number``; empty when it was not measured."""
    return "" if math.isnan(number) else pattern.format(number)


def targets(results: Results, quota_bytes: int) -> list[dict[str, Any]]:
    """Each target of issue #10, from the medians of this run. A run made before a figure was
    measured (an older JSON) shows that row as "not measured"."""
    out = []

    def v(workload: str, system: str, variant: str | None, key: str, how: str = "median") -> float:
        return value(results, workload, system, variant, key, how)

    def cpu(workload: str, system: str, variant: str | None) -> float:
        return v(workload, system, variant, "cpu_s_per_gib")

    floor = v("seq", "verifying floor", None, "mb_s")
    cold = v("seq", "kitfs", "cold", "mb_s")
    cold_cpu = cpu("seq", "kitfs", "cold")
    out.append(_target("Cold sequential read of the model file, sha256 on: ≥ 0.9× the verifying floor",
                       cold, 0.9 * floor, "MB/s", True, floor, "verifying floor", cpu_s_per_gib=cold_cpu,
                       limit_cpu_s_per_gib=cpu("seq", "verifying floor", None)))
    rivals = {label: v("seq", system, variant, "elapsed_s")
              for label, system, variant in (("pull+untar", "pull+untar", None),
                                             ("curl\\|tar", "curl|tar", None),
                                             ("ratarmount", "ratarmount (HTTP)", "cold"))}
    known = {label: s for label, s in rivals.items() if not math.isnan(s)}
    soonest = min(known.values()) if len(known) == len(rivals) else math.nan
    out.append(_target("  … last byte sooner than pull+untar, curl\\|tar and ratarmount",
                       v("seq", "kitfs", "cold", "elapsed_s"), soonest, "s", False, soonest,
                       "the soonest of them",
                       note=", ".join(f"{label} {s:.2f} s" for label, s in known.items())))
    curl_file = v("seq", "curl→file", None, "mb_s")
    out.append(_target("  stretch: ≥ 0.8× curl→file", cold, 0.8 * curl_file, "MB/s", True, curl_file,
                       "curl→file", cpu_s_per_gib=cold_cpu,
                       limit_cpu_s_per_gib=cpu("seq", "curl→file", None)))
    references = ", ".join(f"{label} {c:.2f}" for label, c in (
        ("curl→file", cpu("seq", "curl→file", None)), ("floor", cpu("seq", "verifying floor", None)),
        ("ratarmount", cpu("seq", "ratarmount (HTTP)", "cold"))) if not math.isnan(c))
    out.append(_target("Daemon CPU per GiB, cold sequential", cold_cpu, 2.5, "CPU s/GiB", False,
                       note=f"same run, CPU s/GiB: {references}" if references else ""))
    out.append(_target("Daemon CPU per GiB, from the disk cache (page cache dropped)",
                       cpu("seq", "kitfs", "disk cache, page cache dropped"), 0.5, "CPU s/GiB", False,
                       note=_known("pyfuse3 pass-through, page cache dropped: {:.2f}",
                                   cpu("seq", "pyfuse3 pass-through", "page cache dropped"))))
    disk = v("seq", "kitfs", "disk cache, page cache dropped", "mb_s")
    disk_cpu = cpu("seq", "kitfs", "disk cache, page cache dropped")
    through = v("seq", "pyfuse3 pass-through", "page cache dropped", "mb_s")
    out.append(_target("Re-read from the disk cache, page cache dropped: ≥ 0.8× a pyfuse3 pass-through",
                       disk, 0.8 * through, "MB/s", True, through, "pass-through, dropped",
                       cpu_s_per_gib=disk_cpu,
                       limit_cpu_s_per_gib=cpu("seq", "pyfuse3 pass-through", "page cache dropped")))
    local_cold = v("seq", "local file", "page cache dropped", "mb_s")
    out.append(_target("  stretch: ≥ 0.8× a local file", disk, 0.8 * local_cold, "MB/s", True, local_cold,
                       "local file, dropped", cpu_s_per_gib=disk_cpu))
    local_warm = v("seq", "local file", "page cache warm", "mb_s")
    out.append(_target("Re-read from the page cache: ≥ 0.9× a local file",
                       v("seq", "kitfs", "page cache warm", "mb_s"), 0.9 * local_warm, "MB/s", True,
                       local_warm, "local file, warm",
                       note=_known("pyfuse3 pass-through from the page cache: {:.0f} MB/s",
                                   v("seq", "pyfuse3 pass-through", "page cache warm", "mb_s"))))
    curls4 = v("concurrent", "curl→/dev/null", "4 readers", "mb_s")
    out.append(_target("4 readers of 4 different files, cold: ≥ 0.8× 4 parallel curls",
                       v("concurrent", "kitfs", "4 readers, cold", "mb_s"), 0.8 * curls4, "MB/s", True,
                       curls4, "4 parallel curls",
                       cpu_s_per_gib=cpu("concurrent", "kitfs", "4 readers, cold"),
                       limit_cpu_s_per_gib=cpu("concurrent", "curl→/dev/null", "4 readers"),
                       note=_known("4 verifying floors at once: {:.0f} MB/s",
                                   v("concurrent", "verifying floor", "4 readers", "mb_s"))))
    out.append(_target("  4 readers of one file share every fetch (fetched ÷ file ≤ 1.02)",
                       v("concurrent", "kitfs", "4 readers of one file, cold", "fetch_ratio"), 1.02, "×",
                       False))
    out.append(_target("Isolated random 4 KiB reads of an uncached layer: ≤ 256 KiB fetched each",
                       v("random-4KiB", "kitfs", "isolated reads, cold", "fetched_per_read_kib"), 256, "KiB",
                       False))
    curl_range = v("random-4KiB", "curl→/dev/null", None, "p50_ms")
    out.append(_target("  … p50 ≤ 1.5× a curl of the same 4 KiB range",
                       v("random-4KiB", "kitfs", "isolated reads, cold", "p50_ms"), 1.5 * curl_range, "ms",
                       False, curl_range, "curl, same ranges, keep-alive"))
    remote_curl = v("remote", "curl→/dev/null", "whole model blob, cold", "mb_s")
    remote_cpu = cpu("remote", "kitfs", "cold sequential")
    remote_seq = v("remote", "kitfs", "cold sequential", "mb_s")
    out.append(_target("Remote profile: cold sequential ≥ 0.9× one curl over the same path", remote_seq,
                       0.9 * remote_curl, "MB/s", True, remote_curl, "curl of the blob, same path",
                       cpu_s_per_gib=remote_cpu,
                       limit_cpu_s_per_gib=cpu("remote", "curl→/dev/null", "whole model blob, cold")))
    out.append(_target("  stretch: ahead of the curl", remote_seq, remote_curl, "MB/s", True, remote_curl,
                       "curl of the blob, same path", cpu_s_per_gib=remote_cpu))
    round_trip = v("remote", "curl→/dev/null", "same 4 KiB ranges, keep-alive", "p50_ms")
    out.append(_target("Remote profile: lone 4 KiB reads, p50 ≤ 1.5× the round trip",
                       v("remote", "kitfs", "isolated reads, cold", "p50_ms"), 1.5 * round_trip, "ms", False,
                       round_trip, "curl of the same ranges, keep-alive",
                       note=_known("fetched per read: {:.0f} KiB",
                                   v("remote", "kitfs", "isolated reads, cold", "fetched_per_read_kib"))))
    out.append(_target("First byte after open, index cached ≤ 20 ms",
                       v("ttfb", "kitfs", "index cached", "first_byte_ms"), 20, "ms", False,
                       v("ttfb", "curl→/dev/null", None, "first_byte_ms"), "curl 4 KiB range"))
    out.append(_target("First find over the 100k-file layer ≤ 1.0 s",
                       v("find", "kitfs", "first mount", "elapsed_s"), 1.0, "s", False,
                       v("find", "curl→/dev/null", None, "elapsed_s"), "curl→/dev/null of the layer"))
    out.append(_target("Daemon peak RSS streaming the model file ≤ 200 MiB (max of runs)",
                       v("seq", "kitfs", "page cache warm", "peak_rss_mib", "max"), 200, "MiB", False))
    out.append(_target("Cache within its quota (peak chunk bytes, sampled every 0.1 s)",
                       v("quota", "kitfs", None, "peak_chunks_bytes", "max") / MiB, quota_bytes / MiB, "MiB",
                       False, note=_known("whole cache dir incl. SQLite: {:.0f} MiB",
                                          v("quota", "kitfs", None, "peak_cache_dir_bytes", "max") / MiB)))
    return out


# --- Markdown --------------------------------------------------------------------------------

_COLUMNS = [("mb_s", "MB/s", "{:.0f}"), ("elapsed_s", "s", "{:.2f}"),
            ("first_byte_ms", "first byte ms", "{:.1f}"),
            ("mean_ms", "mean ms", "{:.2f}"), ("p50_ms", "p50 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}"),
            ("ops_s", "ops/s", "{:.0f}"),
            ("entries", "entries", "{:.0f}"), ("fetch_ratio", "fetched ÷ read", "{:.3f}"),
            ("fetched_per_read_kib", "fetched per read KiB", "{:.0f}"),
            ("blob_requests", "blob GETs", "{:.0f}"), ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
            ("cpu_s_per_gib", "CPU s/GiB", "{:.2f}"), ("cpu_s", "CPU s", "{:.2f}"),
            ("registry_cpu_s_per_gib", "registry CPU s/GiB", "{:.2f}"),
            ("proxy_cpu_s_per_gib", "proxy CPU s/GiB", "{:.2f}")]
# CPU s only where a row has no per-GiB figure (a find: nothing read sequentially)
_ONLY_WITHOUT = {"cpu_s": "cpu_s_per_gib"}


def _fmt(v: Any, pattern: str) -> str:
    if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return ""
    return pattern.format(v)


def results_tables(results: Results) -> str:
    """One table per workload, every system and variant, medians."""
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in results):
        rows = [r for r in results if r["workload"] == workload]
        used = [c for c in _COLUMNS
                if any(isinstance(r["median"].get(c[0]), (int, float))
                       and (c[0] not in _ONLY_WITHOUT or _ONLY_WITHOUT[c[0]] not in r["median"])
                       for r in rows)]
        lines.append(f"\n**{workload}**\n")
        lines.append("| system | variant | " + " | ".join(c[1] for c in used) + " |")
        lines.append("|---|---|" + "---|" * len(used))
        for r in rows:
            cells = [_fmt(r["median"].get(key), pattern) for key, _, pattern in used]
            system, variant = (text.replace("|", "\\|") for text in (r["system"], r["variant"]))
            lines.append(f"| {system} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(v: float, unit: str) -> str:
    if math.isnan(v):
        return "–"
    if unit == "bytes" and v >= MiB:
        return f"{v / MiB:.1f} MiB"
    return f"{v:.3g} {unit}" if abs(v) < 1000 else f"{v:.0f} {unit}"


def _with_cpu(text: str, cpu_s_per_gib: float | None) -> str:
    if cpu_s_per_gib is None or math.isnan(cpu_s_per_gib):
        return text
    return f"{text} · {cpu_s_per_gib:.2f} CPU s/GiB"


def targets_table(rows: list[dict[str, Any]]) -> str:
    """Figure now (with its ratio to the reference and its CPU per GiB), goal, reference."""
    lines = ["| target | now | goal | same-run reference | result | missed by |",
             "|---|---|---|---|---|---|"]
    for t in rows:
        now = _num(t["measured"], t["unit"])
        if t["limit_label"] and not math.isnan(t["limit"]) and t["limit"] and not math.isnan(t["measured"]):
            now += f" ({t['measured'] / t['limit']:.2f}×)"
        now = _with_cpu(now, t.get("cpu_s_per_gib"))
        limit = (_with_cpu(f"{_num(t['limit'], t['unit'])} ({t['limit_label']})",
                           t.get("limit_cpu_s_per_gib")) if t["limit_label"] else "")
        note = f" ({t['note']})" if t["note"] else ""
        mark = {"pass": "**pass**", "miss": "**MISS**"}.get(t["result"], t["result"])
        lines.append(f"| {t['name'].strip()}{note} | {now} | {_num(t['target'], t['unit'])} | {limit} | "
                     f"{mark} | {t['miss_by']} |")
    return "\n".join(lines) + "\n"


def profile_markdown(profile: dict[str, Any], top: int = 12, what: str = "",
                     svg: str | None = "results/profile-seq.svg") -> str:
    if not profile or "top_python" not in profile:
        return "(no profile in this run)\n"
    if not what:
        read = profile.get("raw_read", {})
        what = f"a cold read at {read.get('mb_s', math.nan):.0f} MB/s"
    elif "find" in profile:
        what += f" ({profile['find']['elapsed_s']:.1f} s under the profiler)"
    graph = f" Flame graph: [{svg.rsplit('/', 1)[-1]}]({svg})." if svg else ""
    lines = [f"{profile['samples']} samples of the daemon (py-spy with native frames, 100 Hz, all "
             f"threads, idle excluded) during {what}; profiling slows it. Not counted: "
             f"{profile.get('idle_worker_samples', 0)} samples of an idle trio worker thread waiting "
             f"for a job.{graph}\n"]
    for key, heading in (("top_python", "deepest Python function (incl. the C it calls)"),
                         ("top_native", "leaf frame (C function / syscall)"),
                         ("top_inclusive", "kitfs function, inclusive")):
        lines += [f"| % of samples | {heading} |", "|---|---|"]
        lines += [f"| {t['share'] * 100:.1f} | `{t['frame']}` |" for t in profile[key][:top]]
        lines.append("")
    return "\n".join(lines)


# --- charts ----------------------------------------------------------------------------------

_COLOURS = {"kitfs": "#1f77b4", "curl→/dev/null": "#7f7f7f", "curl→file": "#555555",
            "local file": "#2ca02c", "pull+untar": "#d62728", "curl|tar": "#ff9896",
            "ratarmount (HTTP)": "#9467bd", "verifying floor": "#bcbd22", "pyfuse3 pass-through": "#17becf"}


def _bar_chart(path: Path, items: list[tuple[str, str, float]], title: str, xlabel: str,
               log_scale: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [i for i in items if not math.isnan(i[2])]
    if not items:
        return
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(items) + 1.1), dpi=80)
    labels = [f"{s} · {v}" for s, v, _ in items]
    values = [x for _, _, x in items]
    ax.barh(range(len(items)), values, color=[_COLOURS.get(s, "#bbbbbb") for s, _, _ in items])
    ax.set_yticks(range(len(items)), labels, fontsize=8)
    ax.invert_yaxis()
    if log_scale:
        ax.set_xscale("log")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _items(results: Results, workload: str, key: str, scale: float = 1.0) -> list[tuple[str, str, float]]:
    out = []
    for r in results:
        if r["workload"] == workload and isinstance(r["median"].get(key), (int, float)):
            out.append((r["system"], r["variant"], float(r["median"][key]) * scale))
    return out


def charts(results: Results, out_dir: Path) -> list[str]:
    """Write the PNGs; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def bar(name: str, items: list[tuple[str, str, float]], title: str, xlabel: str,
            log: bool = False) -> None:
        _bar_chart(out_dir / name, items, title, xlabel, log)
        if (out_dir / name).exists():
            made.append(name)

    bar("seq.png", _items(results, "seq", "mb_s"), "Sequential read of the model file",
        "MB/s (higher is better)")
    bar("ttfb.png", _items(results, "ttfb", "first_byte_ms")
        + [i for i in _items(results, "seq", "first_byte_ms") if i[0] in ("pull+untar", "curl|tar")],
        "open() to first 4 KiB", "ms, log scale (lower is better)", log=True)
    random_items = []
    for label in ("4KiB", "1MiB"):
        for key in ("p50_ms", "p99_ms"):
            random_items += [(s, f"{label} {v} {key[:3]}", x)
                             for s, v, x in _items(results, f"random-{label}", key)]
    bar("random.png", random_items, "Random pread latency", "ms, log scale", log=True)
    bar("find.png", _items(results, "find", "elapsed_s"), "find + stat over the small-files layer",
        "s (lower is better)", log=True)
    bar("safetensors.png", _items(results, "safetensors", "mb_s") + _items(results, "raw", "mb_s"),
        "safe_open of every tensor (safetensors) and the raw layer", "MB/s")
    whole = [i for i in _items(results, "gzip", "elapsed_s") if "1 MiB" not in i[1]]
    bar("gzip.png", whole, "gzip layer: fetch, or read its last file", "s, log scale", log=True)
    reads = [(s, f"{v} p50", x) for s, v, x in _items(results, "gzip", "p50_ms")]
    reads += [(s, f"{v} p99", x) for s, v, x in _items(results, "gzip", "p99_ms")]
    reads += [(s, v, x) for s, v, x in _items(results, "gzip", "first_byte_ms") if s == "kitfs"]
    bar("gzip-reads.png", reads, "gzip layer: 1 MiB reads after the first pass", "ms, log scale", log=True)
    bar("remote.png", _items(results, "remote", "mb_s"),
        "Remote profile (+20 ms per answer, 100 MB/s link): whole reads", "MB/s (higher is better)")
    bar("remote-latency.png", [(s, f"{v} p50", x) for s, v, x in _items(results, "remote", "p50_ms")]
        + [(s, f"{v} p99", x) for s, v, x in _items(results, "remote", "p99_ms")],
        "Remote profile: 4 KiB reads", "ms (lower is better)")

    conc = [r for r in results if r["workload"] == "concurrent" and "one file" not in r["variant"]]
    if conc:
        fig, ax = plt.subplots(figsize=(6, 3.4), dpi=80)
        for system in dict.fromkeys(r["system"] for r in conc):
            points = sorted((r["readers"], r["median"]["mb_s"]) for r in conc if r["system"] == system)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system,
                    color=_COLOURS.get(system))
        ax.set_xticks([1, 2, 4])
        ax.set_xlabel("readers (one file each)", fontsize=8)
        ax.set_ylabel("aggregate MB/s", fontsize=8)
        ax.set_title("Concurrent readers, cold", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "concurrent.png")
        plt.close(fig)
        made.append("concurrent.png")
    return made
