"""``python -m reindex.native [--force] [--optional]``: build the native helpers (see the package docs).

With ``--optional`` a failed build (no C compiler) is reported and exits 0: the project then runs on
its simdjson path.
"""

from __future__ import annotations

import argparse
import sys

from reindex.native import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reindex.native", description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the library is there")
    parser.add_argument("--optional", action="store_true", help="exit 0 when the build fails")
    args = parser.parse_args(argv)
    try:
        path = build(force=args.force)
    except (RuntimeError, OSError) as e:
        print(f"reindex.native: {e}", file=sys.stderr)
        return 0 if args.optional else 1
    print(f"reindex.native: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
