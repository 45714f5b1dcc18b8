"""Run the kitfs benchmark suite (issues #4 and #10) and write its results.

    .venv/bin/python benchmarks/run.py [--quick] [--out DIR] [--only seq,find] [--repeat N]

Starts the CNCF distribution registry (``/usr/bin/docker-registry``) on a free loopback port
in a temporary directory under /var/tmp, generates and pushes the benchmark ModelKit
(benchmarks/kits.py), runs every workload through a real ``kitfs mount`` beside the physical
limit, a full pull + untar and ratarmount over HTTP (benchmarks/workloads.py), on the
remote-registry profile (benchmarks/remote.py), with the CPU each spends per GiB, profiles one
cold sequential read with py-spy, and writes to ``--out``:

- ``run-<UTC time>.json``: git sha, machine, config, every run of every measurement, the
  medians, the targets with pass/miss, the profile summary and any errors;
- PNG charts and ``summary.md`` (the tables benchmarks/README.md shows; ``--update-readme``
  also replaces the generated block in benchmarks/README.md).

Needs root (drop_caches, FUSE) and the ``bench`` extra: ``.venv/bin/pip install -e '.[bench]'``.
Everything it starts is stopped by PID; everything it mounts is unmounted; the temporary
directory (several GB for a full run) is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import Bench
from common import REPO_ROOT, GiB, git_info, log, machine_info, snapshot_kitfs
from kits import Blob, Kit, Sizes, build_and_push
from profiles import profile_find, profile_seq, summarise_collapsed
from remote import remote_profile
from report import charts, profile_markdown, results_tables, targets, targets_table
from workloads import WORKLOADS as LOCAL_WORKLOADS

from kitfs.demo import Registry

WORKLOADS = {**LOCAL_WORKLOADS, "remote": remote_profile}
README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes and one repetition: a smoke run of a few minutes")
    p.add_argument("--out", type=Path, default=None,
                   help="where the JSON, PNGs and summary go (default benchmarks/results, "
                   "benchmarks/results/quick with --quick)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="parent of the temporary directory (registry, local copies, kitfs caches)")
    p.add_argument("--repeat", type=int, default=None, help="runs per timing (default 3, 1 with --quick)")
    p.add_argument("--random-reads", type=int, default=None, help="reads per random workload (default 2000)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    p.add_argument("--update-readme", action="store_true",
                   help="replace the generated block of benchmarks/README.md with this run's tables")
    p.add_argument("--report", type=Path, default=None, metavar="RUN_JSON",
                   help="measure nothing: redo the targets, charts and summary.md of a run's JSON")
    p.add_argument("--kitfs", choices=["HEAD", "worktree"], default="HEAD",
                   help="which kitfs to measure: the committed HEAD (default) or the working tree "
                   "with uncommitted edits; it is copied at the start, so edits during the run "
                   "do not leak into it")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (for --reuse)")
    p.add_argument("--reuse", type=Path, default=None,
                   help="a directory kept by --keep: reuse its registry storage and local copies")
    return p.parse_args(argv)


def _save_kit(kit: Kit, path: Path, sizes: Sizes) -> None:
    data = dataclasses.asdict(kit)
    data["sizes"] = dataclasses.asdict(sizes)
    path.write_text(json.dumps(data, default=str, indent=1))


def _load_kit(path: Path, host: str) -> tuple[Kit, Sizes]:
    data = json.loads(path.read_text())
    sizes = Sizes(**data.pop("sizes"))

    def blob(d: dict[str, Any]) -> Blob:
        return Blob(Path(d["path"]), d["media_type"], d["digest"], d["size_bytes"], d["diff_id"],
                    d["annotations"])

    kit = Kit(f"{host}/{data['repository']}:v1", data["repository"], host, blob(data["model"]),
              [blob(b) for b in data["parts"]], blob(data["raw"]), blob(data["dataset"]), blob(data["text"]),
              {k: Path(v) for k, v in data["local"].items()}, text_names=data["text_names"],
              dataset_entries=data["dataset_entries"])
    return kit, sizes


def _update_readme(markdown: str) -> None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        log(f"{README} has no {BEGIN} … {END} block; not updated")
        return
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{markdown}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        write_report(json.loads(args.report.read_text()), args.report, args.update_readme)
        return 0
    if os.geteuid() != 0:
        print("run.py needs root (drop_caches, FUSE read_ahead_kb)", file=sys.stderr)
        return 2
    out_dir = args.out or (REPO_ROOT / "benchmarks" / "results" / ("quick" if args.quick else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    repeat = args.repeat or (1 if args.quick else 3)
    random_reads = args.random_reads or (200 if args.quick else 2000)
    selected = [w for w in args.only.split(",") if w] or list(WORKLOADS)
    unknown = [w for w in selected if w not in WORKLOADS]
    if unknown:
        print(f"unknown workloads: {unknown}", file=sys.stderr)
        return 2

    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    workdir = args.reuse or Path(tempfile.mkdtemp(prefix="kitfs-bench-", dir=args.workdir))
    log(f"work directory {workdir}")
    registry = Registry(workdir / "registry")
    (workdir / "registry").mkdir(parents=True, exist_ok=True)
    bench: Bench | None = None
    profile: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        kitfs_info = snapshot_kitfs(workdir / "kitfs-src", args.kitfs)
        log(f"measuring kitfs {args.kitfs} of {kitfs_info['git_sha'][:12]} "
            f"(tree sha256 {kitfs_info['tree_sha256'][:12]}), copied to {workdir / 'kitfs-src'}")
        registry.start()
        log(f"registry on {registry.host} (pid {registry.process.pid if registry.process else '?'})")
        if args.reuse and (workdir / "kit.json").exists():
            kit, sizes = _load_kit(workdir / "kit.json", registry.host)
        else:
            sizes = Sizes.quick() if args.quick else Sizes()
            kit = build_and_push(registry.host, workdir / "data", sizes)
            _save_kit(kit, workdir / "kit.json", sizes)
        quota_bytes = 1 * GiB if not args.quick else sizes.model_bytes // 4
        scratch = workdir / "scratch"
        (scratch / "logs").mkdir(parents=True, exist_ok=True)
        bench = Bench(kit, registry, scratch, repeat, random_reads, quota_bytes, workdir / "kitfs-src")
        for name in selected:
            WORKLOADS[name](bench)
        if not args.no_profile:
            try:
                profile = profile_seq(bench, out_dir)
                if "find" in selected:
                    profile["find"] = profile_find(bench, out_dir)
            except Exception as exc:
                log(f"profile FAILED: {exc}")
                bench.errors.append({"workload": "profile", "system": "kitfs", "error": str(exc)})
    finally:
        registry.stop()
        if bench is not None and args.keep:
            log(f"kept {workdir} (logs in {workdir / 'scratch' / 'logs'})")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    assert bench is not None
    elapsed_s = time.perf_counter() - t0

    record = {
        "schema": 2,  # 2: CPU per GiB, floor, pass-through, isolated reads, remote; 1 is still read
        "started_utc": started,
        "elapsed_s": elapsed_s,
        "git": git_info(),
        "kitfs": kitfs_info,
        "machine": machine_info(args.workdir),
        "config": {"quick": args.quick, "repeat": repeat, "random_reads": random_reads,
                   "workloads": selected, "sizes": dataclasses.asdict(sizes), "quota_bytes": quota_bytes,
                   "kit": {"reference": kit.reference, "model_layer_bytes": kit.model.size_bytes,
                           "dataset_layer_bytes": kit.dataset.size_bytes,
                           "dataset_entries": kit.dataset_entries, "gzip_layer_bytes": kit.text.size_bytes,
                           "raw_layer_bytes": kit.raw.size_bytes,
                           "part_layer_bytes": [p.size_bytes for p in kit.parts]},
                   "kitfs_mount_options": "defaults (verify=eventual, 4 MiB chunks)"},
        "results": bench.results,
        "targets": [],
        "profile": profile,
        "errors": bench.errors,
    }
    json_path = out_dir / f"run-{started}{'-quick' if args.quick else ''}.json"
    json_path.write_text(json.dumps(record, indent=1, default=str))
    write_report(record, json_path, args.update_readme)
    return 0


def write_report(record: dict[str, Any], json_path: Path, update_readme: bool) -> None:
    """Targets, charts and summary.md (next to the JSON) from a run's record."""
    out_dir = json_path.parent
    record["targets"] = targets(record["results"], record["config"]["quota_bytes"])
    stacks = out_dir / "profile-seq.txt"
    if record["profile"] and stacks.exists():  # the summary of the profile, by the current rules
        record["profile"] |= summarise_collapsed(stacks)
    find_stacks = out_dir / "profile-find.txt"
    if record["profile"] and find_stacks.exists():
        record["profile"]["find"] = record["profile"].get("find", {}) | summarise_collapsed(find_stacks)
    json_path.write_text(json.dumps(record, indent=1, default=str))
    pngs = charts(record["results"], out_dir)
    rel = os.path.relpath(out_dir, README.parent)
    machine, config = record["machine"], record["config"]
    measured = record.get("kitfs", {})
    if measured:
        sha = measured["git_sha"]
        dirty = (f", kitfs measured: {measured['source']}, a copy taken at the start, tree sha256 "
                 f"{measured['tree_sha256'][:12]}")
    else:
        sha = record["git"]["sha"]
        dirty = " + uncommitted kitfs changes" if record["git"]["kitfs_dirty"] else ""
    errors = record["errors"]
    summary = "\n".join([
        f"Run `{json_path.name}` ({'quick' if config['quick'] else 'full'}, {config['repeat']} run(s) "
        f"per timing, medians; git `{sha[:12]}`{dirty}; "
        f"{record['elapsed_s'] / 60:.0f} min). Machine: {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['ram_bytes'] / GiB:.0f} GiB RAM, kernel {machine['kernel']}, "
        f"disk `{machine['disk'] or '?'}` ({machine['data_fs']}).",
        "",
        "### Targets",
        "",
        targets_table(record["targets"]),
        "### Charts",
        "",
        *[f"![{p}]({rel}/{p})" for p in pngs],
        "",
        "### All measurements (medians)",
        results_tables(record["results"]),
        "### Profile of a cold sequential read",
        "",
        profile_markdown(record["profile"]),
        *(["### Profile of the first find over the small-files layer", "",
            profile_markdown(record["profile"]["find"], what="the first find",
                             svg=None)] if record["profile"].get("find") else []),
        *(["### Errors\n\n" + "\n".join(f"- {e['workload']} / {e['system']}: {e['error'][:300]}"
                                          for e in errors)] if errors else []),
    ])
    (out_dir / "summary.md").write_text(summary + "\n")
    if update_readme:
        _update_readme(summary)
    target_rows = record["targets"]
    log(f"wrote {json_path}, {len(pngs)} charts and {out_dir / 'summary.md'}")
    misses = [t["name"].strip() for t in target_rows if t["result"] == "miss"]
    log(f"targets: {sum(t['result'] == 'pass' for t in target_rows)} pass, {len(misses)} miss")

if __name__ == "__main__":
    sys.exit(main())
