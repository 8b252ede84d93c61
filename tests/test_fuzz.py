"""scripts/fuzz: a finding is shrunk to what breaks, saved once as .eml, and counted; a run
within its budget reports its executions and exits 0."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types

import pytest

from tests import untrusted
from tests.conftest import MAIL, ROOT

spec = importlib.util.spec_from_file_location("fuzz_script", ROOT / "scripts" / "fuzz.py")
fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz)


def breaks_on(marker: bytes):
    """An `untrusted` stand-in whose only entry point raises when `marker` is in the input."""
    def check(raw, settings=None):
        if marker in raw:
            try:
                raise ValueError("embedded null character")
            except ValueError as exc:
                raise untrusted.Broken("share_request", exc) from exc
    return types.SimpleNamespace(check=check, Broken=untrusted.Broken)


def test_a_finding_is_shrunk_to_the_bytes_that_break(tmp_path):
    raw = (MAIL / "charset_with_nul_byte.eml").read_bytes()
    fake = breaks_on(b"utf\x008")
    with pytest.raises(untrusted.Broken) as found:
        fake.check(raw)
    assert fuzz._shrink(raw, found.value.signature(), fake, None) == b"utf\x008"


def test_a_finding_is_saved_once_under_its_entry_point_and_error(tmp_path):
    args = types.SimpleNamespace(crashes=tmp_path, child=0, work=tmp_path, runs=0, seconds=0)
    run = fuzz.Run(args)
    fake = breaks_on(b"\x00")
    for raw in (b"Subject: a\x00b\n\n", b"Subject: other\x00\n\n"):
        with pytest.raises(untrusted.Broken) as found:
            fake.check(raw)
        fuzz._save(run, raw, found.value, fake, None)
    [saved] = tmp_path.glob("*.eml")
    assert saved.name.startswith("share_request-ValueError-")
    assert saved.read_bytes() == b"\x00"
    assert run.saved == [saved.name]


def test_a_bounded_run_reports_its_executions(tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "one.eml").write_bytes((MAIL / "plain_share_two_pdfs.eml").read_bytes())
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--runs", "60",
                             "--corpus", str(corpus), "--crashes", str(tmp_path / "found")],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "fuzz: 60 executions" in result.stdout
    assert "0 finding(s)" in result.stdout
