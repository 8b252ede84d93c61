"""`mailbridge policy` as an operator runs it on a gateway: the policy service alone, answering
over its socket until SIGTERM, which ends it cleanly; a second one on the same port is one
line naming the key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.cli.test_cli import ok
from tests.conftest import ROOT, free_port
from tests.helpers import MEMBER, MINIMAL_CONFIG
from tests.receive.policy_helpers import Client, request


def test_the_policy_service_runs_alone_and_stops_on_sigterm(tmp_path):
    port = free_port()
    cfg = tmp_path / "config.toml"
    cfg.write_text(MINIMAL_CONFIG + f"\n[policy]\nenabled = true\nport = {port}\n")
    ok(cfg, "init")
    ok(cfg, "members", "add", MEMBER, "--name", "Jane Doe")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBRIDGE_")}
    process = subprocess.Popen([sys.executable, "-m", "mailbridge", "--config", str(cfg),
                                "policy"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == f"policy service on 127.0.0.1:{port}"
        with Client(port) as client:
            client.send(request(sender=MEMBER))
            assert client.answer() == "DUNNO"
            client.send(request(sender="someone@elsewhere.example"))
            assert client.answer().startswith("REJECT 5.7.1")
        second = subprocess.run([sys.executable, "-m", "mailbridge", "--config", str(cfg),
                                 "policy"], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 2
        assert f"[policy] port: 127.0.0.1:{port} is already in use" in second.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
