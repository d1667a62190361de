"""``python -m benchmarks.worker <task> '<json params>'``: one measured method in a process of its own.

Prints the result (with this process's peak RSS) as one JSON line.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> None:
    task, params = argv[0], json.loads(argv[1])
    if task == "ingest":
        from benchmarks.ingest import worker
    elif task == "encode":
        from benchmarks.encode import worker
    elif task == "runtimes":
        from benchmarks.runtimes import worker
    elif task == "runtimes-prepare":
        from benchmarks.runtimes import _prepare as worker
    elif task == "airflow":
        from benchmarks.airflow_overhead import worker
    else:
        raise SystemExit(f"unknown task {task!r}")
    result = worker(params)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
