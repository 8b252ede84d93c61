#!/usr/bin/env python3
"""Send a test message to a running mailbridge over SMTP.

    scripts/send_eml.py message.eml                       # send an .eml file as it is
    scripts/send_eml.py --from staff@clinic.example --to dr.smith@ortho.example plan.pdf

The second form writes a `To:` line at the top of the body, as staff would.
"""

from __future__ import annotations

import argparse
import mimetypes
import re
import smtplib
import sys
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid
from pathlib import Path


def build(sender: str, recipients: list[str], files: list[Path], subject: str,
          sharing: str) -> bytes:
    msg = EmailMessage(policy=SMTP)  # CRLF line ends, as SMTP requires
    msg["From"] = sender
    msg["To"] = sharing
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain=sender.rsplit("@", 1)[-1])
    msg.set_content(f"To: {', '.join(recipients)}\n\nPlease find the documents attached.\n")
    for path in files:
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        maintype, subtype = kind.split("/", 1)
        msg.add_attachment(path.read_bytes(), maintype=maintype, subtype=subtype,
                           filename=path.name)
    return bytes(msg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help=".eml file, or documents to attach")
    ap.add_argument("--from", dest="sender", help="member address (builds a new message)")
    ap.add_argument("--to", action="append", default=[], help="recipient (repeatable)")
    ap.add_argument("--subject", default="Plan of care")
    ap.add_argument("--sharing", default="share@portal.example")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=2525)
    args = ap.parse_args()
    missing = [str(p) for p in args.paths if not p.is_file()]
    if missing:
        ap.error(f"paths: no such file: {', '.join(missing)}")
    if args.sender:
        if not args.to:
            ap.error("--to is required with --from")
        raw = build(args.sender, args.to, args.paths, args.subject, args.sharing)
        envelope_from = args.sender
    else:
        if len(args.paths) != 1:
            ap.error("give one .eml file, or use --from/--to with documents")
        # .eml files saved on Unix end lines with LF alone; SMTP needs CRLF, or the server
        # reads the whole message as one line ("500 Line too long").
        raw = re.sub(rb"\r?\n", b"\r\n", args.paths[0].read_bytes())
        envelope_from = ""
        for line in raw.splitlines():
            if line.lower().startswith(b"from:"):
                envelope_from = line.split(b"<")[-1].split(b">")[0].split()[-1].decode()
                break
            if not line.strip():
                break
    with smtplib.SMTP(args.host, args.port) as smtp:
        try:
            smtp.sendmail(envelope_from, [args.sharing], raw)
        except smtplib.SMTPResponseException as exc:
            print(f"refused: {exc.smtp_code} {exc.smtp_error.decode(errors='replace')}")
            return 1
    print(f"sent {len(raw)} bytes to {args.sharing} at {args.host}:{args.port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
