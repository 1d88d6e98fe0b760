"""Errors that end the daemon with one line: the operator's to fix (exit status
2), or a fault of the host under a running tunnel (exit status 1)."""

import sys
from collections.abc import Callable
from typing import Final, NoReturn, TypeVar

IFNAMSIZ: Final = 16  # the kernel's limit on interface names, with the terminating NUL


class OperatorError(Exception):
    pass


def one_line(message: str) -> str:
    """*message* made safe to print as one line: newlines and other control
    characters (from an environment value, a file name) escaped, and text that
    is not valid Unicode (undecodable bytes of the environment) shown as escapes."""
    text = str(message).encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def report(prog: str, message: str) -> None:
    """Write ``PROG: error: MESSAGE`` as exactly one line on stderr."""
    sys.stderr.write(f"{prog}: error: {one_line(message)}\n")
class LinkFault(Exception):
    """Something the running tunnel needs was taken away (the tun was deleted):
    exit 1, so that a service manager starts it again (Restart=on-failure)."""


class OneLineErrors:
    """Mixin for argparse parsers: a usage mistake is one line, not the whole usage."""

    prog: str  # the parser's

    def error(self, message: str) -> NoReturn:
        report(self.prog, message)
        raise SystemExit(2)


_Number = TypeVar("_Number", int, float)


def positive(kind: type[_Number]) -> Callable[[str], _Number]:
    """argparse type: a number of *kind* greater than zero."""
    def parse(text: str) -> _Number:
        value = kind(text)
        if not value > 0:
            raise ValueError(text)
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def interface_name_problem(name: str) -> str | None:
    """Why the kernel would refuse *name* as an interface name (or, with a %,
    make up another one), or None if it is fine."""
    if not name:
        return "is empty"
    if len(name.encode()) >= IFNAMSIZ:
        return f"is longer than {IFNAMSIZ - 1} bytes"
    if name in (".", ".."):
        return "is not a name"
    for c in name:
        if c in "/:%" or c.isspace() or not c.isprintable():
            return f"contains {c!r}" + (" (a pattern; give the name itself)" if c == "%" else "")
    return None
