"""Log set-up: one line per event, no PHI (modules log ids and counts, never content)."""

from __future__ import annotations

import logging


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Third-party loggers that would print addresses or message content at INFO.
    for noisy in ("mail.log", "aiosmtpd", "waitress", "apscheduler", "imapclient"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
