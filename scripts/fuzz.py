#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris) of every entry point that reads untrusted mail.

Starts from the mail fixtures, the crashes kept in tests/fixtures/fuzz/ and the shared corpus
(../shared/corpus beside the checkout, or --corpus DIR), mutates them with libFuzzer's own
mutations and with mail-shaped ones (tests/mail_mutations.py), and runs each input through
tests/untrusted.py: reading the message, the share request, screening, the sender's From and
Authentication-Results, the once-only keys, the reply command and DSN parsing. An input that
makes one of them raise or hand on unstorable text is shrunk and saved as
tests/fixtures/fuzz/<entry>-<error>-<hash>.eml, which the ordinary test suite replays. The run
goes on after a finding; it exits 1 if it found anything, 2 if the fuzzer itself failed.

    scripts/fuzz --seconds 60          # the bounded run scripts/test makes
    scripts/fuzz --runs 1000000 --jobs 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's mailbridge and tests, whatever is installed

DEFAULT_MAX_LEN = 16 * 1024
# Coverage is measured in these packages. The standard library's email package doubles the
# cost of every execution when measured too, so it is only with --instrument-stdlib.
INSTRUMENTED = ["mailbridge", "authres", "dkim"]
PROGRESS_SECONDS = 60
SHRINK_BUDGET = 2000  # checks spent shrinking one finding


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=0,
                        help="stop after N executions in all (0: no limit)")
    parser.add_argument("--seconds", type=float, default=0,
                        help="stop after S seconds (0: no limit)")
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus",
                        help="real-world messages to start from (default: ../shared/corpus)")
    parser.add_argument("--crashes", type=Path, default=ROOT / "tests" / "fixtures" / "fuzz",
                        help="where findings are saved as .eml (default: tests/fixtures/fuzz)")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep libFuzzer's growing corpus and logs here (default: a "
                             "temporary folder, removed afterwards)")
    parser.add_argument("--jobs", type=int, default=1, help="fuzzing processes (default 1)")
    parser.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN,
                        help=f"largest input in bytes (default {DEFAULT_MAX_LEN})")
    parser.add_argument("--timeout", type=int, default=30,
                        help="seconds one input may take before it counts as a hang")
    parser.add_argument("--instrument-stdlib", action="store_true",
                        help="measure coverage inside the standard library's email package "
                             "too (about half the executions a second)")
    parser.add_argument("--verbose", action="store_true", help="show libFuzzer's own output")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs <= 0 and args.seconds <= 0:
        parser.error("give --runs N or --seconds S (or both)")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.child is not None:
        return child(args)
    return supervise(args)


# --- the supervisor: starts the fuzzing processes, keeps what they find -----------------------


def supervise(args: argparse.Namespace) -> int:
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("fuzz: atheris is not installed (pip install -e '.[fuzz]')", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="mailbridge-fuzz-"))
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    (work / "artifacts").mkdir(exist_ok=True)
    args.crashes.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    children = []
    for number in range(args.jobs):
        command = [sys.executable, str(Path(__file__).resolve()), "--child", str(number),
                   "--runs", str(-(-args.runs // args.jobs)), "--seconds", str(args.seconds),
                   "--corpus", str(args.corpus), "--crashes", str(args.crashes),
                   "--work", str(work), "--max-len", str(args.max_len),
                   "--timeout", str(args.timeout)]
        command += ["--instrument-stdlib"] if args.instrument_stdlib else []
        log = None if args.verbose else open(work / f"libfuzzer-{number}.log", "wb")
        children.append((subprocess.Popen(command, stderr=log), log))

    def stop(signum, frame):  # Ctrl-C or a TERM: the processes stop and count, as at the end
        for proc, _ in children:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    codes = [proc.wait() for proc, _ in children]
    for _, log in children:
        if log is not None:
            log.close()
    elapsed = time.monotonic() - started
    stats = [_read_json(work / f"stats-{n}.json") for n in range(args.jobs)]
    runs = sum(s.get("runs", 0) for s in stats)
    found = sorted({name for s in stats for name in s.get("saved", [])})
    found += _keep_artifacts(work / "artifacts", args.crashes)
    print(f"fuzz: {runs} executions in {elapsed:.0f} s ({runs / max(elapsed, 1e-9):.0f} exec/s, "
          f"{args.jobs} process(es)), {len(found)} finding(s)", flush=True)
    for name in found:
        print(f"fuzz: saved {args.crashes / name}")
    broken = [c for c in codes if c not in (0, 1)]
    if broken and not found:
        print(f"fuzz: the fuzzer stopped with exit codes {codes}; see {work}/libfuzzer-*.log",
              file=sys.stderr)
    if args.work is None and not broken:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if found else (2 if broken else 0)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _keep_artifacts(folder: Path, crashes: Path) -> list[str]:
    """libFuzzer's own findings (hangs, memory blow-ups, a crash of the interpreter) as .eml."""
    kept = []
    for path in sorted(folder.iterdir()):
        kind = path.name.split("-", 1)[0]
        data = path.read_bytes()
        name = f"libfuzzer-{kind}-{hashlib.sha256(data).hexdigest()[:12]}.eml"
        (crashes / name).write_bytes(data)
        path.unlink()
        kept.append(name)
    return kept


# --- one fuzzing process ----------------------------------------------------------------------


class Run:
    """What one process counts: executions, findings already saved, when to stop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runs = 0
        self.started = time.monotonic()
        self.deadline = self.started + args.seconds if args.seconds > 0 else None
        self.next_progress = self.started + PROGRESS_SECONDS
        self.signatures: set[str] = set()
        self.saved: list[str] = []

    def tick(self) -> None:
        self.runs += 1
        now = time.monotonic()
        if now >= self.next_progress:
            self.next_progress = now + PROGRESS_SECONDS
            rate = self.runs / (now - self.started)
            print(f"fuzz[{self.args.child}]: {self.runs} executions, {rate:.0f}/s, "
                  f"{len(self.saved)} finding(s)", flush=True)
        if ((self.args.runs > 0 and self.runs >= self.args.runs)
                or (self.deadline is not None and now >= self.deadline)):
            self.finish()

    def finish(self) -> None:
        stats = {"runs": self.runs, "seconds": time.monotonic() - self.started,
                 "saved": self.saved}
        (self.args.work / f"stats-{self.args.child}.json").write_text(json.dumps(stats))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if self.saved else 0)  # libFuzzer has no way back out of atheris.Fuzz


def child(args: argparse.Namespace) -> int:
    import atheris
    packages = INSTRUMENTED + (["email"] if args.instrument_stdlib else [])
    with atheris.instrument_imports(include=packages):
        from tests import mail_mutations, untrusted
    settings = untrusted.fuzz_settings()
    seeds = [p.read_bytes()[:args.max_len] for p in untrusted.seed_files(args.corpus)]
    run = Run(args)
    signal.signal(signal.SIGTERM, lambda signum, frame: run.finish())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into TERM

    def test_one_input(data: bytes) -> None:
        try:
            untrusted.check(data, settings)
        except untrusted.Broken as found:
            _save(run, data, found, untrusted, settings)
        run.tick()

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        return mail_mutations.mutate(data, rng, seeds, max_size)

    def custom_crossover(data1: bytes, data2: bytes, max_out_size: int, seed: int) -> bytes:
        return mail_mutations.splice(data1, random.Random(seed), [data2])[:max_out_size]

    seed_dir = args.work / f"seeds-{args.child}"
    seed_dir.mkdir(exist_ok=True)
    for number, data in enumerate(seeds):  # seeds cut to --max-len, outside the repository
        (seed_dir / f"{number:04d}.eml").write_bytes(data)
    argv = [sys.argv[0], str(args.work / "corpus"), str(seed_dir),
            f"-max_len={args.max_len}", f"-timeout={args.timeout}", "-rss_limit_mb=4096",
            f"-artifact_prefix={args.work / 'artifacts'}/", f"-seed={1 + args.child}",
            "-handle_term=0", "-handle_int=0"]
    atheris.Setup(argv, test_one_input, custom_mutator=custom_mutator,
                  custom_crossover=custom_crossover)
    atheris.Fuzz()
    return 0


def _save(run: Run, data: bytes, found, untrusted, settings) -> None:
    signature = found.signature()
    if signature in run.signatures:
        return
    run.signatures.add(signature)
    small = _shrink(data, signature, untrusted, settings)
    kind = signature.split("|")[1].replace(" ", "_")
    name = f"{found.entry}-{kind}-{hashlib.sha256(small).hexdigest()[:12]}.eml"
    target = run.args.crashes / name
    known = target.exists()  # a finding kept before: the bug is back (or never went away)
    if not known:
        target.write_bytes(small)
    run.saved.append(name)
    print(f"fuzz[{run.args.child}]: {found} -> {target}{' (kept before)' if known else ''}",
          flush=True)


def _shrink(data: bytes, signature: str, untrusted, settings) -> bytes:
    """The smallest input found (lines, then bytes, removed) that breaks the same way."""
    budget = [SHRINK_BUDGET]

    def same(candidate: bytes) -> bool:
        budget[0] -= 1
        try:
            untrusted.check(candidate, settings)
        except untrusted.Broken as again:
            return again.signature() == signature
        return False

    for split in (lambda d: d.splitlines(keepends=True), lambda d: [bytes([b]) for b in d]):
        pieces = split(data)
        chunk = max(1, len(pieces) // 2)
        while chunk >= 1 and budget[0] > 0:
            at = 0
            while at < len(pieces) and budget[0] > 0:
                candidate = pieces[:at] + pieces[at + chunk:]
                if candidate and same(b"".join(candidate)):
                    pieces = candidate
                else:
                    at += chunk
            chunk //= 2
        data = b"".join(pieces)
        if len(data) > 4096:
            break  # byte by byte would take too long; the line-level result stands
    return data


if __name__ == "__main__":
    sys.exit(main())
