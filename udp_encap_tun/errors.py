"""Errors that are the operator's to fix: reported as one line, exit status 2."""

import sys


class OperatorError(Exception):
    pass


class OneLineErrors:
    """Mixin for argparse parsers: a usage mistake is one line, not the whole usage."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def positive(kind):
    """argparse type: a number of *kind* greater than zero."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise ValueError(text)
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse
