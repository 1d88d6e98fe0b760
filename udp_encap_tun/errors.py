"""Errors that are the operator's to fix: reported as one line, exit status 2."""


class OperatorError(Exception):
    pass
