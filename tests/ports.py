"""Free TCP ports for the servers a test starts."""

from __future__ import annotations

import collections
import random
import socket

# Below the kernel's ephemeral range (32768 and up on Linux): a port picked there can be taken
# by any outgoing connection (to PostgreSQL, a relay, a browser) between the pick and the bind,
# which made a listener fail with "already in use" now and then on a busy machine.
LOW, HIGH = 20000, 32767


# The ports handed out lately: a test that asks for several (SMTP, portal, metrics) before any
# is bound must get different ones. A random pick repeated one now and then, and the service
# then found its second listener's port "already in use" by its first.
_RECENT: collections.deque[int] = collections.deque(maxlen=1000)


def free_port() -> int:
    """A TCP port nothing listens on (also handy as a relay that is down), not one handed out
    in the last thousand calls."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(LOW, HIGH)
        if port in _RECENT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _RECENT.append(port)
        return port
    with socket.socket() as s:  # the low range is crowded: let the kernel choose
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _RECENT.append(port)
    return port
