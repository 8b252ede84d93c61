"""Portal rate limits with several processes, on the real Redis: two portal processes under
gunicorn count into one limit when `[web] ratelimit_storage_uri` names Redis (with memory://
each would count alone), and a Redis that cannot be reached leaves the limits on."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT, free_port
from tests.helpers import MINIMAL_CONFIG

pytestmark = pytest.mark.slow
REDIS = os.environ.get("MAILBRIDGE_TEST_REDIS", "redis://127.0.0.1:6379")
LINK_PAGE_LIMIT = 30  # web/links.py: "link_page": "30/minute"


def redis_reachable() -> None:
    host, port = REDIS.removeprefix("redis://").split("/")[0].split(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError as exc:
        if os.environ.get("MAILBRIDGE_TEST_REQUIRE_REDIS") == "1":
            pytest.fail(f"Redis not reachable at {REDIS}: {exc}")
        pytest.skip(f"Redis not reachable at {REDIS}: {exc}")


def portal_config(tmp_path, storage_uri: str):
    """A portal of its own (its own address, so its counters are its own in Redis)."""
    config = tmp_path / "config.toml"
    base_url = f"http://portal-{secrets.token_hex(4)}.example"
    config.write_text(MINIMAL_CONFIG.replace("http://portal.example", base_url)
                      + f'\n[web]\nratelimit_storage_uri = "{storage_uri}"\n')
    subprocess.run([sys.executable, "-m", "mailbridge", "--config", str(config), "init"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=120)
    return config


def gunicorn(config, port: int) -> subprocess.Popen:
    env = {**os.environ, "MAILBRIDGE_CONFIG": str(config), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "1", "-b",
                             f"127.0.0.1:{port}", "mailbridge.web.wsgi:app"],
                            cwd=config.parent, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def two_portals(tmp_path):
    started: list[subprocess.Popen] = []

    def start(storage_uri: str) -> list[int]:
        config = portal_config(tmp_path, storage_uri)
        ports = [free_port(), free_port()]
        started.extend(gunicorn(config, port) for port in ports)
        deadline = time.monotonic() + 60
        while not all(_answers(port) for port in ports):
            assert time.monotonic() < deadline, [p.stderr.read() for p in started if p.poll()]
            time.sleep(0.3)
        return ports

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(20)


def _answers(port: int) -> bool:
    try:
        return status(port, "/healthz") == 200
    except OSError:
        return False


def statuses(ports: list[int], count: int) -> list[int]:
    """`count` requests for one link page from one address, alternating between processes."""
    path = f"/s/{secrets.token_urlsafe(16)}"
    return [status(ports[i % 2], path) for i in range(count)]


def test_two_gunicorn_processes_share_one_limit_in_redis(two_portals):
    redis_reachable()
    ports = two_portals(REDIS)
    seen = statuses(ports, LINK_PAGE_LIMIT + 2)
    assert 429 not in seen[:LINK_PAGE_LIMIT]
    assert seen[LINK_PAGE_LIMIT:] == [429, 429]  # the limit is crossed together, not each alone


def test_with_memory_storage_each_process_counts_alone(two_portals):
    ports = two_portals("memory://")
    assert 429 not in statuses(ports, LINK_PAGE_LIMIT + 2)  # why Redis is needed


def test_an_unreachable_redis_leaves_each_process_limiting_on_its_own(two_portals):
    ports = two_portals(f"redis://127.0.0.1:{free_port()}")
    seen = [status(ports[0], "/s/abc") for _ in range(LINK_PAGE_LIMIT + 1)]
    assert 429 not in seen[:LINK_PAGE_LIMIT] and seen[-1] == 429
