"""Benchmark rows that each run in their own process and are cached as JSON, so an interrupted run resumes.

Every SmolLM2 benchmark measures one configuration per row; a separate process per row keeps peak memory and
timings per row honest, and the cache lets a 2-core machine spread a long benchmark over several sessions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


class RowCache:
    """``~/.cache/hf_compress/<name>/<row>.json`` (``HF_COMPRESS_BENCH_CACHE`` overrides the folder)."""

    def __init__(self, name: str, script: str):
        default = Path.home() / ".cache" / "hf_compress" / name
        self.dir = Path(os.environ.get("HF_COMPRESS_BENCH_CACHE", default))
        self.script = script

    def path(self, row: str) -> Path:
        return self.dir / f"{row.replace(':', '_')}.json"

    def ensure(self, row: str) -> dict:
        """The cached result of ``row``, running ``script --row ROW`` in a new process when missing."""
        path = self.path(row)
        if path.exists():
            return json.loads(path.read_text())
        proc = subprocess.run([sys.executable, self.script, "--row", row], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"row {row} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(line[7:])
        self.dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
        print(result, flush=True)
        return result

    def cached(self, rows) -> dict[str, dict]:
        return {row: json.loads(self.path(row).read_text()) for row in rows if self.path(row).exists()}


def measured_on(results: dict) -> str:
    """The date (or date range) the cached rows were measured on; today for rows that do not say."""
    dates = sorted({r.get("date", datetime.date.today().isoformat()) for r in results.values()})
    return dates[0] if len(dates) <= 1 else f"{dates[0]} to {dates[-1]}"


def main(rows: list[str], cache: RowCache, run_row: Callable[[str], dict],
         write_results: Callable[[dict], None]) -> None:
    """``--row ROW`` (child: measure and print), ``--only ROW…`` (these, in order), ``--table-only``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--row")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--table-only", action="store_true", help="write the table from cached rows, run nothing")
    args = parser.parse_args()
    if args.row:
        result = {**run_row(args.row), "date": datetime.date.today().isoformat()}
        cache.dir.mkdir(parents=True, exist_ok=True)  # written here too: a row survives its parent dying
        cache.path(args.row).write_text(json.dumps(result))
        print("RESULT " + json.dumps(result), flush=True)
        return
    if not args.table_only:
        for row in args.only or rows:
            cache.ensure(row)
    write_results(cache.cached(rows))
