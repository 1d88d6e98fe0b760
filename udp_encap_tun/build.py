"""Which build runs: the data-path modules compiled with mypyc, or pure Python.

setup.py compiles MODULES with mypyc when it can (mypyc importable, a working C
compiler, UDP_ENCAP_TUN_PURE unset); the extension modules land next to the .py
files, and Python imports an extension module before a .py of the same name.
Which one runs is read from the imported modules themselves (their loader), not
from a flag that could disagree with them."""

from __future__ import annotations

import importlib
import os
import sysconfig
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader
from typing import Final

# the modules of the per-packet path (setup.py reads this list)
MODULES: Final = ("packet", "tiu", "offload", "store", "core", "tiumode", "conn", "fastpath",
                   "loop")

# the library mypyc builds for all of them (setup.py's group_name), beside them
LIBRARY: Final = "_compiled__mypyc"

COMPILED: Final = "compiled (mypyc)"
PURE: Final = "pure Python"


def compiled_modules() -> list[str]:
    """The MODULES that are extension modules (imported here if they were not yet)."""
    return [name for name in MODULES
            if isinstance(importlib.import_module(f"{__package__}.{name}").__loader__,
                          ExtensionFileLoader)]


def describe() -> str:
    """The build in words: COMPILED, PURE, or which modules are which if mixed;
    compiled modules whose .py changed after the build are named (stale)."""
    compiled = compiled_modules()
    if len(compiled) == len(MODULES):
        text = COMPILED
    elif not compiled:
        return PURE
    else:
        text = (f"mixed: compiled {', '.join(compiled)}; pure "
                f"{', '.join(m for m in MODULES if m not in compiled)}")
    old = stale()
    if old:
        text += f"; STALE: {', '.join(m + '.py' for m in old)} changed since the build"
    return text


def stale() -> list[str]:
    """Compiled MODULES whose .py was changed after the build: the .py edits do
    not run until the build is redone (scripts/build).  The code is in the
    group's library (LIBRARY), each module's extension is a small shim that a
    rebuild may leave as it was: the newer of the two counts.  An installed
    wheel (scripts/install) is never stale: pip writes its .py files after its
    extension modules."""
    found = []
    installed = {os.path.realpath(sysconfig.get_path(kind)) for kind in ("purelib", "platlib")}
    for name in compiled_modules():
        extension = importlib.import_module(f"{__package__}.{name}").__file__ or ""
        if os.path.realpath(os.path.dirname(os.path.dirname(extension))) in installed:
            continue
        suffix = next((s for s in EXTENSION_SUFFIXES if extension.endswith(s)), "")
        base = extension[:-len(suffix)] if suffix else extension
        library = os.path.join(os.path.dirname(extension), LIBRARY + suffix)
        try:
            built = max(os.stat(path).st_mtime for path in (extension, library)
                        if os.path.exists(path))
            if os.stat(base + ".py").st_mtime > built:
                found.append(name)
        except (OSError, ValueError):  # no source beside it
            pass
    return found
