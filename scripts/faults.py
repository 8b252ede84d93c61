#!/usr/bin/env python3
"""Run the fault scenarios of `tests/faults/` with more messages than the suite does (1,000 per
scenario by default, as in the issue's runs) against PostgreSQL, and print each scenario's
figures: acknowledged, lost, duplicated shares, duplicate sends, recovery time.

Run as root (the full-disk scenario mounts a small tmpfs) with PostgreSQL on 127.0.0.1:
`.venv/bin/python scripts/faults.py [--messages N] [-k EXPR]`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("acknowledged", "lost", "duplicated_shares", "duplicate_sends",
           "resent_with_new_message_id", "recovery_seconds")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("-k", dest="select", default="", help="pytest -k expression")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "figures.jsonl"
        env = {**os.environ, "MAILBRIDGE_FAULT_MESSAGES": str(args.messages),
               "MAILBRIDGE_FAULT_REPORT": str(report), "MAILBRIDGE_TEST_REQUIRE_POSTGRES": "1"}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "tests/faults", *(["-k", args.select] if args.select else [])]
        started = time.monotonic()
        status = subprocess.run(command, cwd=ROOT, env=env).returncode
        elapsed = time.monotonic() - started
        rows = [json.loads(line) for line in report.read_text().splitlines()] \
            if report.exists() else []
    print(f"\nfault scenarios, {args.messages} messages where a scenario sends a batch "
          f"({elapsed:.0f} s in all; pytest exit {status})\n")
    print("| scenario | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for row in rows:
        print(f"| {row['scenario']} | " + " | ".join(
            "" if row[c] is None else str(row[c]) for c in COLUMNS) + " |")
    for row in rows:
        if row["note"]:
            print(f"- {row['scenario']}: {row['note']}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
