"""Fixtures shared by the unit tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


@pytest.fixture
def tun_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A datagram socket pair standing in for the tun: packet boundaries kept.
    The first end is the loop's (non-blocking), the second the test's."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    theirs.settimeout(2)
    yield ours, theirs
    ours.close()
    theirs.close()
