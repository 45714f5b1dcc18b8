"""From a run's results: the targets of issue #4 (measured, target, limit, pass/miss), the PNG
charts, and the Markdown tables that benchmarks/README.md shows."""

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
            limit: float = math.nan, limit_label: str = "", note: str = "") -> dict[str, Any]:
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
            "limit_label": limit_label, "result": verdict, "miss_by": miss, "note": note}


def targets(results: Results, quota_bytes: int) -> list[dict[str, Any]]:
    """Each target of the issue, from the medians of this run."""
    out = []
    curl_file = value(results, "seq", "curl→file", None, "mb_s")
    cold = value(results, "seq", "kitfs", "cold", "mb_s")
    out.append(_target("Cold sequential read ≥ 0.8× curl→file (verify=eventual: sha256 on)", cold,
                       0.8 * curl_file, "MB/s", True, curl_file, "curl→file"))
    out.append(_target("  stretch: ≥ 1.0× curl→file", cold, curl_file, "MB/s", True, curl_file,
                       "curl→file"))
    local_cold = value(results, "seq", "local file", "page cache dropped", "mb_s")
    disk = value(results, "seq", "kitfs", "disk cache, page cache dropped", "mb_s")
    out.append(_target("Re-read from disk cache (page cache dropped) ≥ 0.8× local file", disk,
                       0.8 * local_cold, "MB/s", True, local_cold, "local file, dropped"))
    local_warm = value(results, "seq", "local file", "page cache warm", "mb_s")
    page = value(results, "seq", "kitfs", "page cache warm", "mb_s")
    out.append(_target("Page-cache re-read ≥ 0.9× local file", page, 0.9 * local_warm, "MB/s", True,
                       local_warm, "local file, warm"))
    curl_first = value(results, "ttfb", "curl→/dev/null", None, "first_byte_ms")
    out.append(_target("First byte after open, index cached ≤ 20 ms",
                       value(results, "ttfb", "kitfs", "index cached", "first_byte_ms"), 20, "ms", False,
                       curl_first, "curl 4 KiB range"))
    out.append(_target("First byte after open, index not cached ≤ 50 ms",
                       value(results, "ttfb", "kitfs", "index not cached", "first_byte_ms"), 50, "ms", False,
                       curl_first, "curl 4 KiB range"))
    out.append(_target("A 4 KiB read mid-layer fetches ≤ 8 MiB (index already read)",
                       value(results, "ttfb", "kitfs", "4 KiB mid-layer read", "fetched_bytes") / MiB, 8,
                       "MiB", False,
                       note="first mount, index included: "
                       f"{value(results, 'ttfb', 'kitfs', 'index not cached', 'fetched_bytes') / MiB:.1f}"
                       " MiB "
                       "for the first 4 KiB"))
    out.append(_target("A full sequential read fetches ≤ 1.02× the file",
                       value(results, "seq", "kitfs", "cold", "fetch_ratio"), 1.02, "×", False))
    curl_dataset = value(results, "find", "curl→/dev/null", None, "elapsed_s")
    out.append(_target("100k files: first find ≤ 1.5× curl of the whole layer",
                       value(results, "find", "kitfs", "first mount", "elapsed_s"), 1.5 * curl_dataset, "s",
                       False, curl_dataset, "curl→/dev/null of the layer"))
    out.append(_target("100k files: find after remount ≤ 3 s",
                       value(results, "find", "kitfs", "remount (index cached)", "elapsed_s"), 3, "s", False))
    out.append(_target("100k files: no blob request after remount",
                       value(results, "find", "kitfs", "remount (index cached)", "blob_requests", "max"), 0,
                       "requests", False))
    out.append(_target("Daemon peak RSS ≤ 200 MiB streaming the model file (max of runs)",
                       value(results, "seq", "kitfs", "page cache warm", "peak_rss_mib", "max"), 200, "MiB",
                       False))
    out.append(_target("Cache never exceeds its quota (peak chunk bytes, sampled every 0.1 s)",
                       value(results, "quota", "kitfs", None, "peak_chunks_bytes", "max") / MiB,
                       quota_bytes / MiB, "MiB", False,
                       note="whole cache dir incl. SQLite: "
                       f"{value(results, 'quota', 'kitfs', None, 'peak_cache_dir_bytes', 'max') / MiB:.0f}"
                       " MiB"))
    first_pass_ms = value(results, "gzip", "kitfs", "first read of the last file", "elapsed_s") * 1e3
    out.append(_target("gzip: after the first pass a 1 MiB read anywhere costs one span "
                       "(p50 ≤ 10% of decompressing from the start)",
                       value(results, "gzip", "kitfs", "1 MiB reads after first pass", "p50_ms"),
                       0.1 * first_pass_ms, "ms", False, first_pass_ms, "first pass (ms)"))
    out.append(_target("gzip: … and fetches nothing again",
                       value(results, "gzip", "kitfs", "1 MiB reads after first pass", "fetched_bytes",
                             "max"),
                       0, "bytes", False))
    out.append(_target("gzip: the decompressed state persists across a remount (no fetch)",
                       value(results, "gzip", "kitfs", "1 MiB reads after remount", "fetched_bytes", "max"),
                       0, "bytes", False))
    evicted = value(results, "gzip", "kitfs", "1 MiB read after eviction, new daemon",
                    "fetched_bytes") / MiB
    layer_mib = value(results, "gzip", "curl→/dev/null", None, "size_bytes") / MiB
    out.append(_target("gzip: a 1 MiB read whose chunk was evicted (a new daemon) fetches "
                       "≤ one checkpoint span (≤ 3 spacings of 4 MiB of data: 12 MiB)",
                       evicted, 12, "MiB", False, layer_mib, "layer size (MiB)",
                       note="a re-decompression from the start fetches the layer up to that point"))
    return out


# --- Markdown --------------------------------------------------------------------------------

_COLUMNS = [("mb_s", "MB/s", "{:.0f}"), ("elapsed_s", "s", "{:.2f}"),
            ("first_byte_ms", "first byte ms", "{:.1f}"),
            ("mean_ms", "mean ms", "{:.2f}"), ("p50_ms", "p50 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}"),
            ("ops_s", "ops/s", "{:.0f}"),
            ("entries", "entries", "{:.0f}"), ("fetch_ratio", "fetched ÷ read", "{:.3f}"),
            ("blob_requests", "blob GETs", "{:.0f}"), ("peak_rss_mib", "peak RSS MiB", "{:.0f}")]


def _fmt(v: Any, pattern: str) -> str:
    if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return ""
    return pattern.format(v)


def results_tables(results: Results) -> str:
    """One table per workload, every system and variant, medians."""
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in results):
        rows = [r for r in results if r["workload"] == workload]
        used = [c for c in _COLUMNS if any(isinstance(r["median"].get(c[0]), (int, float)) for r in rows)]
        lines.append(f"\n**{workload}**\n")
        lines.append("| system | variant | " + " | ".join(c[1] for c in used) + " |")
        lines.append("|---|---|" + "---|" * len(used))
        for r in rows:
            cells = [_fmt(r["median"].get(key), pattern) for key, _, pattern in used]
            lines.append(f"| {r['system']} | {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(v: float, unit: str) -> str:
    if math.isnan(v):
        return "–"
    if unit == "bytes" and v >= MiB:
        return f"{v / MiB:.1f} MiB"
    return f"{v:.3g} {unit}" if abs(v) < 1000 else f"{v:.0f} {unit}"


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | target value | limit / reference | result | missed by |",
             "|---|---|---|---|---|---|"]
    for t in rows:
        limit = f"{_num(t['limit'], t['unit'])} ({t['limit_label']})" if t["limit_label"] else ""
        note = f" ({t['note']})" if t["note"] else ""
        mark = {"pass": "**pass**", "miss": "**MISS**"}.get(t["result"], t["result"])
        lines.append(f"| {t['name'].strip()}{note} | {_num(t['measured'], t['unit'])} | "
                     f"{_num(t['target'], t['unit'])} | {limit} | {mark} | {t['miss_by']} |")
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
            "ratarmount (HTTP)": "#9467bd"}


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

    conc = [r for r in results if r["workload"] == "concurrent"]
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
