"""Shared document storage (`[storage] backend = "database"`), end to end on SQLite and
PostgreSQL: a member's message becomes a share whose documents and raw message live only in the
database; the recipient downloads the document from the node that took the message in, and
from another node that has nothing but the database and the master key."""

from __future__ import annotations

import http.client
import secrets
import shutil

from mailbridge.runtime import build_runtime
from mailbridge.store import tokens
from mailbridge.store.blobs import create_master_key_file
from mailbridge.store.models import Blob, Document, Grant, InboundMessage, WebSession
from tests.conftest import make_settings, start_service
from tests.helpers import add_jane, pdf_bytes, share_message
from tests.portal_helpers import claim, make_account, make_app, signed_in_client

DOCTOR = "dr.smith@ortho.example"


def files_in(folder) -> list:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def session_cookie(runtime, account) -> str:
    sid = secrets.token_urlsafe(32)
    now = runtime.clock()
    WebSession.create(id_hash=tokens.hash_token(sid), account=account, data={},
                      created_at=now, last_seen_at=now)
    return f"mb_session={sid}"


def test_a_share_kept_in_the_database_downloads_on_every_node(tmp_path, db_url, sink, keyring):
    key_file = tmp_path / "master.key"  # copied to every node by the operator
    create_master_key_file(key_file)
    pdf = pdf_bytes("plan for R.T.", size=1_500_000)  # several records
    node_a = tmp_path / "node-a"
    running = start_service(node_a, db_url, sink, keyring,
                            MAILBRIDGE_STORAGE_BACKEND="database",
                            MAILBRIDGE_SERVICE_MASTER_KEY_FILE=str(key_file),
                            MAILBRIDGE_WEB_HOST="127.0.0.1")
    try:
        add_jane()
        running.send(share_message(recipients=(DOCTOR,),
                                   attachments=[("plan-of-care.pdf", pdf)]))
        running.sink.wait_for(2, timeout=30)
        running.drain()
        runtime = running.runtime
        [document] = Document.select()
        assert document.size == len(pdf)
        blob_ids = {b.blob_id for b in Blob.select()}
        assert document.blob_id in blob_ids
        assert {row.blob_id for row in InboundMessage.select()} <= blob_ids  # the spool too
        data_dir = runtime.settings.service.data_dir
        assert files_in(data_dir / "documents") == [] and files_in(data_dir / "spool") == []

        grant = claim(runtime, document.share, DOCTOR, make_account(runtime, DOCTOR))
        conn = http.client.HTTPConnection("127.0.0.1", running.service.web_port, timeout=30)
        conn.request("GET", f"/documents/{document.id}/download",
                     headers={"Cookie": session_cookie(runtime, grant.account)})
        response = conn.getresponse()
        assert response.status == 200
        assert response.read() == pdf
        conn.close()
    finally:
        running.service.stop(timeout=10)
        running.runtime.db.close()
    shutil.rmtree(node_a)  # node A's disk is gone: node B has only the database and the key

    settings_b = make_settings(tmp_path / "node-b" / "data", db_url,
                               MAILBRIDGE_STORAGE_BACKEND="database",
                               MAILBRIDGE_SERVICE_MASTER_KEY_FILE=str(key_file))
    node_b = build_runtime(settings_b)
    try:
        account = Grant.get(Grant.address == DOCTOR).account
        client = signed_in_client(make_app(node_b), node_b, account)
        response = client.get(f"/documents/{document.id}/download")
        assert response.status_code == 200
        assert response.get_data() == pdf
        assert response.headers["Content-Length"] == str(len(pdf))
    finally:
        node_b.db.close()
    assert files_in(tmp_path / "node-b") == []

