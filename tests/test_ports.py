"""The suite's own port picker: ports asked for one after another are all different, so a
service started with several of them never finds one "already in use" by itself."""

from __future__ import annotations

import socket

from tests.ports import free_port


def test_ports_asked_for_in_a_row_are_all_different_and_free():
    ports = [free_port() for _ in range(300)]  # a random pick would repeat one (birthdays)
    assert len(set(ports)) == len(ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # and free
