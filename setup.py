"""The optional compiled build: the per-packet modules (udp_encap_tun/build.py's
MODULES) compiled with mypyc when mypyc can be imported and a C compiler builds
against this Python's headers; the same .py files, pure Python, otherwise or
when UDP_ENCAP_TUN_PURE=1 is set.  Everything else is in pyproject.toml.

pip builds in an isolated environment without mypy, so a plain `pip install .`
or `pip install -e .` is the pure build; scripts/build compiles into the tree,
scripts/install builds a compiled wheel in a build venv that has mypy."""

import os
import sys
import sysconfig
import tempfile

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _modules() -> list[str]:
    namespace: dict[str, object] = {}  # build.py read as text: the package is not importable yet
    with open(os.path.join(HERE, "udp_encap_tun", "build.py")) as f:
        exec(compile(f.read(), "build.py", "exec"), namespace)
    return [f"udp_encap_tun/{name}.py" for name in namespace["MODULES"]]  # type: ignore[attr-defined]


def _why_pure() -> str | None:
    """Why the build is pure Python, or None if it can be compiled."""
    if os.environ.get("UDP_ENCAP_TUN_PURE", "") not in ("", "0"):
        return "UDP_ENCAP_TUN_PURE is set"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed"
    return _why_no_compiler()


def _why_no_compiler() -> str | None:
    """Why no C compiler builds against this Python's headers, or None if one does
    (scripts/install asks this before it installs mypy for the build)."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler
    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write("#include <Python.h>\nint probe(void) { return 0; }\n")
        try:
            compiler.compile([source], output_dir=tmp,
                             include_dirs=[sysconfig.get_paths()["include"]])
        except Exception as exc:  # no compiler, or no Python headers
            return f"no working C compiler ({exc.__class__.__name__})"
    return None


def _extensions() -> list[object]:
    why = _why_pure()
    if why is not None:
        print(f"udp-encap-tun: pure Python build: {why}", file=sys.stderr)
        return []
    from mypyc.build import mypycify
    print("udp-encap-tun: compiling with mypyc", file=sys.stderr)
    # one library for all, inside the package: udp_encap_tun/_compiled__mypyc.*.so (build.py's
    # LIBRARY); each module's own extension only loads its part of it
    return mypycify(_modules(), group_name="udp_encap_tun._compiled")


if __name__ == "__main__":  # as pip's build backend and `python setup.py` run it (tests import it)
    setup(ext_modules=_extensions())
