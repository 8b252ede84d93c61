#!/usr/bin/env python3
"""Measure mailbridge intake end to end against a bare SMTP sink, and peak memory for one
large attachment. Prints a small table; run as `.venv/bin/python scripts/bench_intake.py`."""

from __future__ import annotations

import argparse
import math
import os
import platform
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
SHARING = "share@portal.example"
MEMBER = "bench@clinic.example"
SMALL_PDF_BYTES = 100 * 1024
LARGE_PDF_BYTES = 25 * 1024 * 1024
STARTUP_SECONDS = 30.0
STOP_SECONDS = 30.0


class BenchError(Exception):
    """Something did not complete; the message says what."""


# --- an in-process SMTP sink ---------------------------------------------------------------


class Sink:
    """aiosmtpd in a thread that notes when each recipient address was accepted."""

    def __init__(self) -> None:
        self.port = free_port()
        self._accepted: dict[str, float] = {}
        self._cond = threading.Condition()
        self._controller = Controller(self, hostname=HOST, port=self.port,
                                      data_size_limit=100 * 1024 * 1024)

    async def handle_DATA(self, server, session, envelope):
        now = time.monotonic()
        with self._cond:
            for address in envelope.rcpt_tos:
                self._accepted[address.lower()] = now
            self._cond.notify_all()
        return "250 OK"

    def wait_all(self, addresses: set[str], timeout: float) -> dict[str, float]:
        """When each address was accepted; raises BenchError if some did not come in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not addresses <= self._accepted.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    got = len(addresses & self._accepted.keys())
                    raise BenchError(f"only {got} of {len(addresses)} link e-mails reached "
                                     f"the sink within {timeout:.0f} s")
                self._cond.wait(min(left, 1.0))
            return {a: self._accepted[a] for a in addresses}

    def __enter__(self) -> Sink:
        self._controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self._controller.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --- messages ------------------------------------------------------------------------------


def pdf_bytes(marker: str, size: int) -> bytes:
    """A valid-looking PDF padded to about `size` bytes; `marker` makes each one distinct."""
    head = (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
            b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\n"
            b"% " + marker.encode() + b"\n")
    tail = b"trailer << /Root 1 0 R >>\n%%EOF\n"
    pad = max(0, size - len(head) - len(tail) - 3)
    return head + b"% " + b"x" * pad + b"\n" + tail


def recipients_for(index: int, count: int) -> list[str]:
    """Addresses unique to message `index`, so the sink can tell its link e-mails apart."""
    if count == 1:
        return [f"dr.bench{index}@ortho.example"]
    return [f"dr.bench{index}.{j}@ortho.example" for j in range(count)]


def share_message(recipients: list[str], pdf: bytes, subject: str) -> bytes:
    """A member's message as staff write it: a `To:` line at the top of the body. CRLF ends."""
    msg = EmailMessage()
    msg["From"] = f"Bench Staff <{MEMBER}>"
    msg["To"] = SHARING
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="clinic.example")
    msg.set_content(f"To: {', '.join(recipients)}\n\nPlease review.\n")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="plan-of-care.pdf")
    return msg.as_bytes(policy=policy.SMTP)


# --- sending -------------------------------------------------------------------------------


def send_all(port: int, messages: list[bytes], connections: int,
             timeout: float) -> tuple[list[float], list[float]]:
    """Send over `connections` parallel SMTP sessions; returns each message's start and end of
    its `sendmail` call (monotonic seconds)."""
    starts = [0.0] * len(messages)
    ends = [0.0] * len(messages)
    ready = threading.Barrier(connections)

    def session(first: int) -> None:
        with smtplib.SMTP(HOST, port, local_hostname="bench.localhost", timeout=timeout) as smtp:
            ready.wait(timeout)
            for i in range(first, len(messages), connections):
                starts[i] = time.monotonic()
                smtp.sendmail(MEMBER, [SHARING], messages[i])
                ends[i] = time.monotonic()

    with ThreadPoolExecutor(max_workers=connections) as pool:
        futures = [pool.submit(session, k) for k in range(connections)]
        for future in futures:
            try:
                future.result(timeout=timeout)
            except smtplib.SMTPResponseException as exc:
                raise BenchError(f"a message was refused: {exc.smtp_code} "
                                 f"{exc.smtp_error.decode(errors='replace')}") from None
            except TimeoutError:
                raise BenchError(f"sending did not finish within {timeout:.0f} s") from None
            except (smtplib.SMTPException, OSError, threading.BrokenBarrierError) as exc:
                raise BenchError(f"sending failed: {type(exc).__name__}: {exc}") from None
    return starts, ends


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(count: int, first: float, last: float, latencies: list[float]) -> dict[str, float]:
    return {"rate": count / (last - first), "p50": percentile(latencies, 50) * 1000,
            "p99": percentile(latencies, 99) * 1000}


# --- the mailbridge process ----------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """Where one benchmark's mailbridge keeps its config and log, and its SMTP port."""

    config: Path
    smtp_port: int
    log: Path


def write_config(mb: Instance, data_dir: Path, relay_port: int) -> None:
    mb.config.write_text(f"""\
[service]
base_url = "http://portal.example"
data_dir = "{data_dir}"
log_level = "WARNING"

[smtp]
host = "{HOST}"
port = {mb.smtp_port}
max_messages_per_hour_per_sender = 0  # the benchmark sends more than a person would
max_bytes_per_hour_per_sender = 0

[web]
host = "{HOST}"
port = {free_port()}

[metrics]
port = 0

[addresses]
sharing = "{SHARING}"
reply_domain = "reply.portal.example"

[outbound]
transport = "smtp"
from = "mailbridge@portal.example"

[outbound.smtp]
host = "{HOST}"
port = {relay_port}
tls = "none"
timeout_seconds = 30

[senders]
require_authentication = false

[worker]
poll_seconds = 0.5
""")


def child_env() -> dict[str, str]:
    # Only the bench config counts, not overrides someone has in their shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBRIDGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def mailbridge_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mailbridge", "--config", str(config), *args]


def set_up(config: Path) -> None:
    for args in (("init",), ("members", "add", MEMBER, "--name", "Bench Staff",
                             "--clinic", "Bench Clinic")):
        try:
            done = subprocess.run(mailbridge_cmd(config, *args), cwd=ROOT, env=child_env(),
                                  capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise BenchError(f"`mailbridge {args[0]}` did not finish within 60 s") from None
        if done.returncode != 0:
            raise BenchError(f"`mailbridge {' '.join(args[:2])}` failed:\n"
                             f"{done.stdout}{done.stderr}")


def start_serve(mb: Instance, processes: list[subprocess.Popen]) -> int:
    """Start `serve`, wait until it accepts SMTP; returns its pid."""
    with mb.log.open("ab") as log:
        proc = subprocess.Popen(mailbridge_cmd(mb.config, "serve"), cwd=ROOT, env=child_env(),
                                stdout=log, stderr=subprocess.STDOUT)
    processes.append(proc)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"`mailbridge serve` exited with {proc.returncode}\n"
                             f"{log_tail(mb.log)}")
        try:
            with socket.create_connection((HOST, mb.smtp_port), timeout=1):
                return proc.pid
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"`mailbridge serve` did not open its SMTP port within "
                     f"{STARTUP_SECONDS:.0f} s\n{log_tail(mb.log)}")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_SECONDS)


def log_tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "last lines of the service log:\n" + "\n".join(text.splitlines()[-lines:])


def proc_status_mb(pid: int, field: str) -> float:
    """A `kB` figure from /proc/<pid>/status (VmRSS now, VmHWM peak), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"/proc/{pid}/status has no {field} (Linux only)")


# --- the three measurements ----------------------------------------------------------------


def bench_bare(messages: list[bytes], connections: int, timeout: float) -> dict[str, float]:
    with Sink() as bare:
        starts, ends = send_all(bare.port, messages, connections, timeout)
    return summary(len(messages), min(starts), max(ends),
                   [e - s for s, e in zip(starts, ends, strict=True)])


def bench_mailbridge(mb: Instance, sink: Sink, messages: list[bytes],
                     recipients: list[list[str]], connections: int, timeout: float,
                     processes: list[subprocess.Popen]
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """Figures for the SMTP answer alone (250 = spooled and committed) and end to end."""
    start_serve(mb, processes)
    starts, ends = send_all(mb.smtp_port, messages, connections, timeout)
    try:
        accepted = sink.wait_all({a for rs in recipients for a in rs}, timeout)
    except BenchError as exc:
        raise BenchError(f"{exc}\n{log_tail(mb.log)}") from None
    done = [max(accepted[a] for a in rs) for rs in recipients]
    stop_process(processes.pop())
    accept = summary(len(messages), min(starts), max(ends),
                     [e - s for s, e in zip(starts, ends, strict=True)])
    end_to_end = summary(len(messages), min(starts), max(done),
                         [d - s for s, d in zip(starts, done, strict=True)])
    return accept, end_to_end


def bench_memory(mb: Instance, sink: Sink, timeout: float,
                 processes: list[subprocess.Popen]) -> dict[str, float]:
    pid = start_serve(mb, processes)
    time.sleep(1.0)  # let start-up allocations settle before taking the baseline
    before = proc_status_mb(pid, "VmRSS")
    address = "dr.large@ortho.example"
    raw = share_message([address], pdf_bytes("large", LARGE_PDF_BYTES), "Large scan")
    send_all(mb.smtp_port, [raw], 1, timeout)
    try:
        sink.wait_all({address}, timeout)
    except BenchError as exc:
        raise BenchError(f"{exc}\n{log_tail(mb.log)}") from None
    peak = proc_status_mb(pid, "VmHWM")
    stop_process(processes.pop())
    return {"before": before, "peak": peak, "growth": peak - before}


# --- report --------------------------------------------------------------------------------


def report(args: argparse.Namespace, bare: dict[str, float], accept: dict[str, float],
           mb: dict[str, float], mem: dict[str, float]) -> None:
    print(f"mailbridge intake benchmark: {args.messages} messages, one ~"
          f"{SMALL_PDF_BYTES // 1024} KB PDF each, {args.recipients} recipient(s), "
          f"{args.connections} SMTP connection(s)")
    print(f"machine: {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}")
    print()
    print(f"{'':34}{'msgs/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, row in (("bare aiosmtpd sink (sendmail)", bare),
                      ("mailbridge intake (sendmail)", accept),
                      ("mailbridge (send -> link at sink)", mb)):
        print(f"{name:34}{row['rate']:10.1f}{row['p50']:10.1f}{row['p99']:10.1f}")
    print()
    print(f"intake/bare-sink ratio (end to end): throughput {mb['rate'] / bare['rate']:.3f}, "
          f"p50 latency {mb['p50'] / bare['p50']:.1f}x")
    print()
    print(f"one {LARGE_PDF_BYTES // (1024 * 1024)} MiB PDF through a fresh `serve`: "
          f"RSS after start {mem['before']:.1f} MB, peak {mem['peak']:.1f} MB, "
          f"difference {mem['growth']:+.1f} MB")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--recipients", type=int, default=1, help="per message (1-20)")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds each phase may take before the run is failed")
    args = ap.parse_args()
    if args.messages < 1 or args.connections < 1 or not 1 <= args.recipients <= 20:
        ap.error("--messages and --connections must be at least 1, --recipients 1 to 20")
    args.connections = min(args.connections, args.messages)
    return args


def run(args: argparse.Namespace, workdir: Path, processes: list[subprocess.Popen]) -> None:
    recipients = [recipients_for(i, args.recipients) for i in range(args.messages)]
    messages = [share_message(rs, pdf_bytes(f"bench {i}", SMALL_PDF_BYTES), f"Bench {i}")
                for i, rs in enumerate(recipients)]
    bare = bench_bare(messages, args.connections, args.timeout)
    with Sink() as sink:
        mb = Instance(workdir / "config.toml", free_port(), workdir / "serve.log")
        write_config(mb, workdir / "data", sink.port)
        set_up(mb.config)
        accept, intake = bench_mailbridge(mb, sink, messages, recipients, args.connections,
                                  args.timeout, processes)
        mem = bench_memory(mb, sink, args.timeout, processes)
    report(args, bare, accept, intake, mem)


def run_benchmark(name: str, args: argparse.Namespace, run_in) -> int:
    """Run `run_in(args, workdir, processes)` in a temporary directory; every process it
    started is stopped afterwards, and a BenchError becomes a FAILED line and exit code 1."""
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="mailbridge-bench-") as tmp:
        try:
            run_in(args, Path(tmp), processes)
        except BenchError as exc:
            print(f"{name}: FAILED: {exc}", file=sys.stderr)
            return 1
        finally:
            for proc in processes:
                stop_process(proc)
    return 0


def main() -> int:
    return run_benchmark("bench_intake", parse_args(), run)


if __name__ == "__main__":
    sys.exit(main())
