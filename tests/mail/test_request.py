"""Reading a share request out of real-looking e-mail: recipients, documents, note, rejects."""

from __future__ import annotations

import base64
import email.message
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailbridge.config import load_settings
from mailbridge.mail import attachments, mime, note, recipients, request
from mailbridge.mail.filetypes import KIND_EXTENSIONS, detect_kind
from mailbridge.outcomes import Reject
from mailbridge.settings import DEFAULT_ALLOWED_TYPES, Settings
from tests.conftest import MAIL

SHARE = "share@portal.example"
HYPOTHESIS = settings(max_examples=150, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


def make_settings(data_dir: Path, **env: str) -> Settings:
    values = {
        "MAILBRIDGE_SERVICE_BASE_URL": "http://localhost:8080",
        "MAILBRIDGE_ADDRESSES_SHARING": SHARE,
        "MAILBRIDGE_ADDRESSES_REPLY_DOMAIN": "reply.portal.example",
        "MAILBRIDGE_OUTBOUND_FROM": "mailbridge@portal.example",
        "MAILBRIDGE_SERVICE_DATA_DIR": str(data_dir),
    }
    values.update(env)
    return load_settings(None, env=values)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("data"))


@pytest.fixture
def limited(tmp_path):
    """Settings with some limits lowered: limited(max_file_bytes=1000)."""
    def build(**limits: object) -> Settings:
        env = {f"MAILBRIDGE_LIMITS_{k.upper()}": str(v) for k, v in limits.items()}
        return make_settings(tmp_path, **env)
    return build


def pdf_bytes(size: int = 0, text: str = "Plan of care") -> bytes:
    body = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
            b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n% " + text.encode() + b"\n")
    tail = b"trailer<</Root 1 0 R>>\n%%EOF\n"
    return body + b"%" * max(0, size - len(body) - len(tail)) + tail


def fixture(name: str) -> email.message.EmailMessage:
    return mime.read_message((MAIL / name).read_bytes())


def share(name: str, cfg: Settings, envelope: tuple[str, ...] = (SHARE,)):
    return request.parse_share(fixture(name), list(envelope), cfg)


def message(body: str = "To: dr.smith@ortho.example\n\nPlease see attached.\n",
            files: list[tuple[str, str, bytes]] | None = None,
            subject: str = "Plan of care") -> email.message.EmailMessage:
    """A message as a mail client would send it, read back the way the pipeline reads it."""
    msg = email.message.EmailMessage()
    msg["From"] = "Maria Lopez <mlopez@sunrise-pt.example>"
    msg["To"] = SHARE
    msg["Subject"] = subject
    msg.set_content(body)
    for filename, content_type, data in ([("plan.pdf", "application/pdf", pdf_bytes())]
                                          if files is None else files):
        maintype, subtype = content_type.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return mime.read_message(msg.as_bytes())


def raw_message(body: str, attachment_headers: str, attachment_body: str) -> bytes:
    return (
        "From: Maria Lopez <mlopez@sunrise-pt.example>\n"
        f"To: {SHARE}\nSubject: Records\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="XyZ"\n\n'
        f"--XyZ\nContent-Type: text/plain; charset=utf-8\n\n{body}\n"
        f"--XyZ\n{attachment_headers}\n\n{attachment_body}\n--XyZ--\n"
    ).encode("utf-8", "surrogateescape")


def docs(result) -> list[tuple[str, str, str]]:
    assert isinstance(result, request.ParsedShare), result
    return [(a.filename, a.kind, a.content_type) for a in result.attachments]


PDF_DOC = "application/pdf"


# --- fixtures: what real mail clients send ----------------------------------------------------


def test_outlook_inline_forward(cfg):
    result = share("outlook_forward_pdf.eml", cfg)
    assert docs(result) == [("Plan of Care - J Doe.pdf", "pdf", PDF_DOC)]
    # The forwarded block's own To:/Cc: lines come after its From: line and are not taken.
    assert result.recipients == ["dr.smith@ortho.example"]
    assert result.title == "FW: Plan of care - J. Doe"
    assert result.note_html.startswith("Dr. Smith, please find the updated plan of care")
    assert "To: Dr. Alan Smith" not in result.note_html


def test_gmail_inline_forward(cfg):
    result = share("gmail_forward_inline_pdf.eml", cfg)
    assert result.recipients == ["j.ortiz@lawfirm.example", "claims@insurer.example"]
    assert docs(result) == [("Progress note 2024-03-01.pdf", "pdf", PDF_DOC)]
    assert "Forwarded message" in result.note_html
    assert "Recipients:" not in result.note_html


def test_apple_mail_forward(cfg):
    result = share("apple_mail_forward.eml", cfg)
    assert result.recipients == ["a.jones@cardio.example"]
    # The HTML fragments around the inline PDF are body, not documents.
    assert docs(result) == [("Referral - knee rehab.pdf", "pdf", PDF_DOC)]
    assert result.note_html.startswith("Referral below.")


def test_thunderbird_forward_as_attachment(cfg):
    result = share("thunderbird_forward_as_attachment.eml", cfg)
    # format=flowed wrapped the Recipient: line; the enclosed message's To: is not taken.
    assert result.recipients == ["claims.adjuster@insurer.example",
                                 "records.department@lawfirm.example"]
    # The PDF inside the forwarded message is found; the .eml wrapper is not a document.
    assert docs(result) == [("Discharge Summary.pdf", "pdf", PDF_DOC)]


def test_rfc2231_continued_utf8_name_is_decoded_and_nfc(cfg):
    result = share("rfc2231_filename.eml", cfg)
    assert docs(result) == [("Arztbrief Müller – Röntgen Knie links.pdf", "pdf", PDF_DOC)]
    assert result.title == "Arztbrief Müller"
    assert result.recipients == ["praxis.weber@ortho.example"]


def test_pdf_sent_as_octet_stream_without_extension_is_a_pdf(cfg):
    result = share("wrong_content_type_pdf.eml", cfg)
    assert docs(result) == [("scan.pdf", "pdf", PDF_DOC)]
    assert result.recipients == ["r.kim@chiro.example"]  # "to:" in lower case


def test_pdf_without_any_name_gets_a_generated_one(cfg):
    result = share("no_filename_pdf.eml", cfg)
    assert docs(result) == [("document-1.pdf", "pdf", PDF_DOC)]
    assert result.attachments[0].data.startswith(b"%PDF-1.")


def test_inline_signature_logo_is_not_a_document(cfg, limited):
    assert docs(share("inline_signature_image.eml", cfg)) == [
        ("Re-evaluation.pdf", "pdf", PDF_DOC)]
    # A picture bigger than a signature logo counts as a document even when shown inline.
    big = share("inline_signature_image.eml", limited(inline_image_max_bytes=10))
    assert [d[0] for d in docs(big)] == ["image001.png", "Re-evaluation.pdf"]


def test_plain_share_with_two_pdfs(cfg):
    result = share("plain_share_two_pdfs.eml", cfg)
    assert result.recipients == ["claims@insurer.example", "j.ortiz@lawfirm.example"]
    # The trailing "Sent from my iPhone" text part is body, not a document.
    assert docs(result) == [("Initial evaluation.pdf", "pdf", PDF_DOC),
                            ("Discharge.pdf", "pdf", PDF_DOC)]
    assert result.title == "Records for claim 4471"


def test_plus_addressing_in_the_to_header(cfg):
    result = share("plus_addressing.eml", cfg)
    assert result.recipients == ["dr.smith@ortho.example"]
    assert result.note_html == "Dr. Smith, the MRI report you asked for.<br><br>Kim"


def test_plus_addressing_in_the_envelope_only(cfg):
    result = share("no_recipients.eml", cfg,
                   envelope=("share+Dr.Smith=Ortho.Example@portal.example",))
    assert result.recipients == ["dr.smith@ortho.example"]
    assert docs(result) == [("Plan of care.pdf", "pdf", PDF_DOC)]


def test_body_recipients_come_before_plus_recipients(cfg):
    result = request.parse_share(message(), ["share+a.b=c.example@portal.example"], cfg)
    assert result.recipients == ["dr.smith@ortho.example", "a.b@c.example"]


def test_no_recipients(cfg):
    assert share("no_recipients.eml", cfg) == Reject(
        "no_recipients", "no recipient lines and no plus-address")


def test_disallowed_executable(cfg):
    result = share("disallowed_exe.eml", cfg)
    assert result.code == "disallowed_type"
    assert result.details == {"filename": "setup.exe", "allowed": list(DEFAULT_ALLOWED_TYPES)}


def test_outlook_rich_text_winmail_dat(cfg):
    result = share("winmail_tnef.eml", cfg)
    assert (result.code, result.details) == ("tnef", {})


# --- recipients ------------------------------------------------------------------------------


def test_forwarded_headers_at_the_top_are_not_recipients(cfg):
    body = "From: Front Desk <desk@sunrise-pt.example>\nTo: dr.smith@ortho.example\n\nHi\n"
    assert recipients.find_recipients(message(body), [SHARE], cfg).code == "no_recipients"


def test_display_names_with_separators_and_mailto_links(cfg):
    body = ('To: "Smith, John" <JS@Ortho.Example>; Jane Roe <jroe@law.example>\n'
            "Recipients: billing@insurer.example<mailto:billing@insurer.example>\n\nHello\n")
    assert recipients.find_recipients(message(body), [SHARE], cfg) == [
        "js@ortho.example", "jroe@law.example", "billing@insurer.example"]


@pytest.mark.parametrize(("body", "expected"), [
    ("Recipients:\na@one.example\nb@two.example\n\nHello\n", ["a@one.example", "b@two.example"]),
    ("To: a@one.example\nb@two.example; c@three.example\n\nHi\n",
     ["a@one.example", "b@two.example", "c@three.example"]),
    ("To: a@one.example,\nDr Roe <b@two.example>\nHi\n", ["a@one.example", "b@two.example"]),
    ("To: a@one.example\nPlease also tell b@two.example\n", ["a@one.example"]),
    ("\n\nTo: a@one.example\n\nTo: b@two.example\nHi\nTo: c@three.example\n",
     ["a@one.example", "b@two.example"]),
])
def test_wrapped_recipient_lists(cfg, body, expected):
    assert recipients.find_recipients(message(body), [SHARE], cfg) == expected


def test_bad_recipient_names_the_text_as_written(cfg):
    result = request.parse_share(message("To: dr.smith@ortho\n\nSee attached.\n"), [SHARE], cfg)
    assert (result.code, result.details) == ("bad_recipient", {"address": "dr.smith@ortho"})


def test_bad_plus_address_names_the_address_as_written(cfg):
    envelope = ["share+nobody=nowhere@portal.example"]
    result = request.parse_share(message("See attached.\n"), envelope, cfg)
    assert (result.code, result.details) == (
        "bad_recipient", {"address": "share+nobody=nowhere@portal.example"})


@pytest.mark.parametrize("written", [
    "share@portal.example", "SHARE@Portal.Example", "someone@reply.portal.example",
    "mailbridge@portal.example", "share+x=portal.example@portal.example"])
def test_own_addresses_are_refused(cfg, written):
    body = f"To: dr.smith@ortho.example, {written}\n\nSee attached.\n"
    result = request.parse_share(message(body), [SHARE], cfg)
    assert result.code == "own_address"
    assert result.details == {"address": written}


def test_too_many_recipients(limited):
    body = "To: a@one.example, b@two.example\nTo: c@three.example, A@ONE.example\n\nHi\n"
    result = request.parse_share(message(body), [SHARE], limited(max_recipients=2))
    assert (result.code, result.details) == ("too_many_recipients", {"count": 3, "limit": 2})


def test_recipient_problems_come_before_attachment_problems(cfg):
    files = [("setup.exe", "application/x-msdownload", b"MZ\x90\x00\x03\x00\x00\x00")]
    result = request.parse_share(message("To: nobody\n\nHi\n", files), [SHARE], cfg)
    assert result.code == "bad_recipient"


def test_html_only_body_recipient_lines(cfg):
    msg = email.message.EmailMessage()
    msg["Subject"] = "Referral"
    msg.set_content(
        '<html><head><style>p{color:red}</style></head><body><div dir="ltr">'
        '<div>To: <a href="mailto:dr.smith@ortho.example">dr.smith@ortho.example</a>,</div>'
        "<div>jroe@law.example</div><div><br></div><div>Referral <b>attached</b>."
        '<a href="javascript:alert(1)">x</a><script>alert(2)</script>'
        '<img src="https://tracker.example/p.gif"></div></div></body></html>', subtype="html")
    msg.add_attachment(pdf_bytes(), maintype="application", subtype="pdf", filename="r.pdf")
    result = request.parse_share(mime.read_message(msg.as_bytes()), [SHARE], cfg)
    assert result.recipients == ["dr.smith@ortho.example", "jroe@law.example"]
    assert result.note_html == "<div>Referral <b>attached</b>.<a>x</a></div>"


def test_deeply_nested_html_note_is_reduced_to_its_words(cfg):
    msg = email.message.EmailMessage()
    msg["Subject"] = "Referral"
    msg.set_content("<div>To: dr.smith@ortho.example</div>" + "<div><b>" * 10_000
                    + "Hello <script>alert(1)</script>&amp; bye", subtype="html")
    msg.add_attachment(pdf_bytes(), maintype="application", subtype="pdf", filename="r.pdf")
    result = request.parse_share(mime.read_message(msg.as_bytes()), [SHARE], cfg)
    assert result.recipients == ["dr.smith@ortho.example"]
    assert result.note_html == "Hello &amp; bye"


# --- attachments -----------------------------------------------------------------------------


def test_no_attachments(cfg):
    result = request.parse_share(message(files=[]), [SHARE], cfg)
    assert result == Reject("no_attachments", "the message has no documents")


def test_too_large_file(limited):
    files = [("small.pdf", "application/pdf", pdf_bytes(500)),
             ("big.pdf", "application/pdf", pdf_bytes(2000))]
    result = request.parse_share(message(files=files), [SHARE], limited(max_file_bytes=1000))
    assert (result.code, result.details) == (
        "too_large", {"filename": "big.pdf", "limit_bytes": 1000})


def test_too_large_total(limited):
    files = [(f"part{i}.pdf", "application/pdf", pdf_bytes(600)) for i in range(3)]
    result = request.parse_share(message(files=files), [SHARE], limited(max_total_bytes=1500))
    assert (result.code, result.details) == ("too_large_total", {"limit_bytes": 1500})


def test_too_many_parts(limited):
    files = [(f"part{i}.pdf", "application/pdf", pdf_bytes()) for i in range(3)]
    result = request.parse_share(message(files=files), [SHARE], limited(max_parts=4))
    assert (result.code, result.details) == ("too_many_parts", {"limit": 4})


def test_too_deep(limited, cfg):
    inner = message("Inner", subject="inner")
    middle = email.message.EmailMessage()
    middle["Subject"] = "Fwd: inner"
    middle.set_content("forwarding")
    middle.add_attachment(inner)
    outer = email.message.EmailMessage()
    outer["Subject"] = "Fwd: Fwd: inner"
    outer.set_content("To: dr.smith@ortho.example\n\nnested")
    outer.add_attachment(middle)
    msg = mime.read_message(outer.as_bytes())
    result = request.parse_share(msg, [SHARE], limited(max_depth=3))
    assert (result.code, result.details) == ("too_deep", {"limit": 3})
    assert docs(request.parse_share(msg, [SHARE], cfg)) == [("plan.pdf", "pdf", PDF_DOC)]


def test_nesting_too_deep_for_the_parser_itself(cfg):
    levels = 3000
    raw = b"Subject: deep\n" + b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i)
        for i in range(levels))
    raw += b"Content-Type: text/plain\n\nTo: dr.smith@ortho.example\n"
    raw += b"".join(b"--b%d--\n" % i for i in reversed(range(levels)))
    result = attachments.find_attachments(mime.read_message(raw), cfg.limits)
    assert (result.code, result.details) == ("too_deep", {"limit": cfg.limits.max_depth})


def test_undecodable_attachment(cfg):
    raw = raw_message("To: dr.smith@ortho.example\n",
                      'Content-Type: application/pdf; name="plan.pdf"\n'
                      "Content-Transfer-Encoding: base64",
                      "JVBERi0xLjQK*&^%$#!JVBERi0xLjQK")
    result = request.parse_share(mime.read_message(raw), [SHARE], cfg)
    assert (result.code, result.details) == ("unreadable_attachment", {"filename": "plan.pdf"})


def test_allowed_types_come_from_settings(limited):
    files = [("logo.png", "image/png", base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC"
    ))]
    result = request.parse_share(message(files=files), [SHARE], limited(allowed_types="pdf"))
    assert (result.code, result.details) == (
        "disallowed_type", {"filename": "logo.png", "allowed": ["pdf"]})


def test_smime_signature_is_skipped(cfg):
    files = [("plan.pdf", "application/pdf", pdf_bytes()),
             ("smime.p7s", "application/pkcs7-signature", b"\x30\x82\x05\x00" + b"\x01" * 64)]
    assert docs(request.parse_share(message(files=files), [SHARE], cfg)) == [
        ("plan.pdf", "pdf", PDF_DOC)]


def test_gmail_base64_encoded_forwarded_message(cfg):
    inner = message("Inner text", files=[("lab.pdf", "application/pdf", pdf_bytes())])
    encoded = base64.encodebytes(inner.as_bytes()).decode()
    raw = raw_message("To: dr.smith@ortho.example\n",
                      'Content-Type: message/rfc822; name="lab.eml"\n'
                      'Content-Disposition: attachment; filename="lab.eml"\n'
                      "Content-Transfer-Encoding: base64\nX-Attachment-Id: f_abc123",
                      encoded)
    assert docs(request.parse_share(mime.read_message(raw), [SHARE], cfg)) == [
        ("lab.pdf", "pdf", PDF_DOC)]


def test_unquoted_encoded_word_filename(cfg):
    raw = raw_message("To: dr.smith@ortho.example\n",
                      "Content-Type: application/pdf; name==?utf-8?B?UGzDpG4ucGRm?=\n"
                      "Content-Disposition: attachment; filename==?utf-8?B?UGzDpG4ucGRm?=\n"
                      "Content-Transfer-Encoding: base64",
                      base64.encodebytes(pdf_bytes()).decode())
    assert docs(request.parse_share(mime.read_message(raw), [SHARE], cfg)) == [
        ("Plän.pdf", "pdf", PDF_DOC)]


# --- title and note --------------------------------------------------------------------------


def test_title_is_decoded_collapsed_and_capped(cfg):
    msg = mime.read_message(
        b"Subject: =?utf-8?Q?Plan_of_care_=E2=80=93?=\n   \t  J. Doe\n\nTo: a@b.example\n")
    assert request.message_title(msg) == "Plan of care – J. Doe"
    long = message(subject="x" * 2000)
    assert request.message_title(long) == "x" * request.MAX_TITLE_CHARS


def test_plain_note_is_escaped_and_capped(cfg):
    body = "To: dr.smith@ortho.example\n\n<script>alert(1)</script> & more\nline two\n"
    assert note.sender_note(message(body)) == (
        "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more<br>line two")
    huge = note.sender_note(message("To: a@b.example\n\n" + "word " * 10_000))
    assert len(huge) <= note.MAX_NOTE_CHARS


# --- properties ------------------------------------------------------------------------------

LOCAL = st.lists(st.text("abcxyz0189_-", min_size=1, max_size=6),
                min_size=1, max_size=3).map(".".join)
DOMAIN = st.builds(lambda labels, tld: ".".join([*labels, tld]),
                   st.lists(st.text("abcmno0129", min_size=1, max_size=8), min_size=1, max_size=3),
                   st.sampled_from(["example", "org", "com", "co.uk"]))
ADDRESS = st.builds(lambda local, domain: f"{local}@{domain}", LOCAL, DOMAIN).filter(
    lambda a: not a.endswith(("@portal.example", "@reply.portal.example")))


def _randomly_cased(draw, text: str) -> str:
    flags = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(ch.upper() if up else ch for ch, up in zip(text, flags, strict=True))


@st.composite
def recipient_block(draw):
    unique = draw(st.lists(ADDRESS, min_size=1, max_size=8, unique=True))
    written = draw(st.lists(st.sampled_from(unique), min_size=len(unique), max_size=16))
    written = unique + written  # every address at least once, then repeats
    written = draw(st.permutations(written))
    lines, i = [], 0
    while i < len(written):
        n = draw(st.integers(min_value=1, max_value=4))
        chunk = written[i:i + n]
        i += n
        items = []
        for address in chunk:
            shown = _randomly_cased(draw, address)
            if draw(st.booleans()):
                name = draw(st.sampled_from(["Dr Who", '"Roe, Jane"', "X"]))
                shown = f"{name} <{shown}>"
            items.append(shown)
        label = draw(st.sampled_from(["To:", "to:", "TO:", "Recipients:", "recipient:",
                                      "Recipient :", "  To:"]))
        separators = [draw(st.sampled_from([", ", ",", "; ", ";", " ", " , ", ",  "]))
                      for _ in items]
        value = "".join(item + sep for item, sep in zip(items, separators, strict=True))
        lines.append(f"{label} {value.rstrip(' ,;')}")
        if draw(st.booleans()):
            lines.append("")
    seen: list[str] = []
    for address in written:
        if address.lower() not in seen:
            seen.append(address.lower())
    return "\n".join(lines), seen


@HYPOTHESIS
@given(block=recipient_block())
def test_recipient_lines_come_back_normalised_and_deduplicated(cfg, block):
    text, expected = block
    msg = message(text + "\n\nPlease see the attached plan.\nTo: not.this@one.example\n")
    assert recipients.find_recipients(msg, [SHARE], cfg) == expected


@HYPOTHESIS
@given(body=st.text(max_size=300), prefix=st.sampled_from(["", "To: ", "Recipients: "]))
def test_random_body_text_never_raises(cfg, body, prefix):
    raw = (f"Subject: x\nContent-Type: text/plain; charset=utf-8\n\n{prefix}{body}"
           ).encode("utf-8", "surrogatepass")
    result = recipients.find_recipients(mime.read_message(raw), [SHARE], cfg)
    assert isinstance(result, Reject) or all("@" in r for r in result)


@HYPOTHESIS
@given(raw=st.binary(max_size=2000))
def test_random_bytes_as_a_message_never_raise(cfg, raw):
    result = request.parse_share(mime.read_message(raw), [SHARE], cfg)
    assert isinstance(result, request.ParsedShare | Reject)


FIXTURES = sorted(p.name for p in MAIL.glob("*.eml"))


@HYPOTHESIS
@given(name=st.sampled_from(FIXTURES), data=st.data())
def test_damaged_fixtures_never_raise(cfg, name, data):
    raw = bytearray((MAIL / name).read_bytes())
    for _ in range(data.draw(st.integers(min_value=1, max_value=20))):
        at = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "dup"]))
        if action == "flip":
            raw[at] = data.draw(st.integers(min_value=0, max_value=255))
        elif action == "cut":
            del raw[at:at + data.draw(st.integers(min_value=1, max_value=200))]
        else:
            raw[at:at] = raw[at:at + data.draw(st.integers(min_value=1, max_value=200))]
        if not raw:
            break
    result = request.parse_share(mime.read_message(bytes(raw)),
                               ["share+dr.smith=ortho.example@portal.example"], cfg)
    assert isinstance(result, request.ParsedShare | Reject)


NASTY_NAME = st.text(alphabet=st.one_of(
    st.sampled_from(list("/\\..  \t\x00\x01\x1b\x7f\u200e\u200f\u202e\u2066\ufeff\u0301é%'\";")),
    st.characters(blacklist_categories=("Cs",)),
), max_size=200).filter(lambda n: n.strip().lower() not in ("winmail.dat", "smime.p7s"))


@HYPOTHESIS
@given(name=NASTY_NAME)
def test_any_attachment_name_comes_out_safe(cfg, name):
    encoded = "".join(f"%{b:02X}" for b in name.encode("utf-8"))
    raw = raw_message("To: dr.smith@ortho.example\n",
                      "Content-Type: application/octet-stream\n"
                      f"Content-Disposition: attachment; filename*=UTF-8''{encoded}\n"
                      "Content-Transfer-Encoding: base64",
                      base64.encodebytes(pdf_bytes()).decode())
    result = request.parse_share(mime.read_message(raw), [SHARE], cfg)
    [(filename, kind, _)] = docs(result)
    assert kind == "pdf" and filename.endswith(".pdf")
    assert "/" not in filename and "\\" not in filename and not filename.startswith(".")
    assert not any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in filename)
    assert len(filename) <= 150


@HYPOTHESIS
@given(data=st.binary(min_size=1, max_size=3000), name=st.sampled_from(["scan", "a.pdf", ""]))
def test_random_bytes_as_an_attachment_pass_by_kind_or_are_refused(cfg, data, name):
    msg = message(files=[(name, "application/octet-stream", data)])
    result = request.parse_share(msg, [SHARE], cfg)
    if isinstance(result, Reject):
        assert result.code == "disallowed_type"
        assert detect_kind(data) is None
    else:
        [attachment] = result.attachments
        assert attachment.kind == detect_kind(data)
        assert attachment.data == data
        assert attachment.filename.lower().endswith(KIND_EXTENSIONS[attachment.kind])
