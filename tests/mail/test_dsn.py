"""Delivery status reports read as text, whatever their fields hold."""

from __future__ import annotations

from mailbridge.mail import dsn, mime


def report(fields: bytes) -> bytes:
    return (b"From: MAILER-DAEMON@mx.ortho.example\r\nTo: bounce@portal.example\r\n"
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=r\r\n\r\n"
            b"--r\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
            b"--r\r\nContent-Type: message/delivery-status\r\n\r\n"
            b"Reporting-MTA: dns; mx.ortho.example\r\n\r\n" + fields + b"\r\n--r--\r\n")


def test_a_long_diagnostic_with_a_utf7_encoded_word_still_names_the_failure():
    # Written back through the modern policy, the long field was re-folded and its encoded
    # word decoded to a lone surrogate, which the stdlib then failed to encode: the report
    # raised UnicodeEncodeError instead of marking the link undeliverable.
    raw = report(b"Final-Recipient: rfc822; dr.smith@ortho.example\r\nAction: failed\r\n"
                 b"Status: 5.1.1\r\nDiagnostic-Code: smtp; 550 =?utf-7?q?+2AA-?= 5.1.1 The "
                 b"email account that you tried to reach does not exist\r\n")
    [failure] = dsn.failed_recipients(mime.read_message(raw))
    assert failure.recipient == "dr.smith@ortho.example"
    assert failure.status == "5.1.1"
    assert "does not exist" in dsn.reason(failure)
    dsn.reason(failure).encode("utf-8")


def test_a_utf8_report_with_a_stray_8bit_byte_comes_out_as_text_that_can_be_stored():
    # message/global-delivery-status is UTF-8 (RFC 6533); a byte that is not UTF-8 came out
    # as a lone surrogate, which cannot be stored with the bounce.
    raw = report("Final-Recipient: rfc822; dr.smith@ortho.example\r\nAction: failed\r\n"
                 "Diagnostic-Code: smtp; 550 Empfänger unbekannt \udcff\r\n".encode(
                     "utf-8", "surrogateescape"))
    raw = raw.replace(b"message/delivery-status", b"message/global-delivery-status")
    [failure] = dsn.failed_recipients(mime.read_message(raw))
    assert failure.recipient == "dr.smith@ortho.example"
    assert failure.diagnostic == "550 Empfänger unbekannt \ufffd"


def test_an_encoded_word_as_transfer_encoding_is_no_transfer_encoding():
    # The modern policy decoded it to a lone surrogate and raised reading the field.
    raw = report(b"Final-Recipient: rfc822; dr.smith@ortho.example\r\nAction: failed\r\n")
    raw = raw.replace(b"Content-Type: message/delivery-status\r\n",
                      b"Content-Type: message/delivery-status\r\n"
                      b"Content-Transfer-Encoding: =?utf-7?q?+2AA-?=\r\n")
    [failure] = dsn.failed_recipients(mime.read_message(raw))
    assert failure.recipient == "dr.smith@ortho.example"
