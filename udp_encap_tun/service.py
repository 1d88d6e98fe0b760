"""What lives beside the data path in the loop (status socket, service manager
notification...): the Service base class."""

from __future__ import annotations

from typing import Any


class Service:
    """Something that lives beside the data path in the same loop (status
    socket, service manager notification, keepalive...).  Override what you need."""

    def watch(self, tunnel: Any):
        """(fd, callback) pairs to watch for reading; called once at start."""
        return ()

    def ready(self, tunnel: Any) -> None:
        """The tun and the socket are up and the loop is about to run."""

    def tick(self, tunnel: Any, now: float) -> None:
        """Called about every HOUSEKEEPING seconds."""

    def close(self, tunnel: Any) -> None:
        """The loop has ended."""
