"""Which build runs (udp_encap_tun/build.py): read from the imported modules' loaders."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import sysconfig
from importlib.machinery import ExtensionFileLoader, SourceFileLoader
from pathlib import Path
from types import SimpleNamespace

import pytest

from udp_encap_tun import build, status
from udp_encap_tun.status import render

SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
SETUP = Path(__file__).resolve().parent.parent / "setup.py"


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py as a module (setup() itself runs only as __main__)."""
    monkeypatch.delenv("UDP_ENCAP_TUN_PURE", raising=False)
    spec = importlib.util.spec_from_file_location("uet_setup", SETUP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_modules(monkeypatch, tmp_path, compiled, stale=()):
    """MODULES as if *compiled* were extension modules (files in *tmp_path*),
    the rest source; the .py of each of *stale* newer than its extension."""
    modules = {}
    for name in build.MODULES:
        source = tmp_path / f"{name}.py"
        source.write_text("")
        if name in compiled:
            extension = tmp_path / f"{name}{SUFFIX}"
            extension.write_bytes(b"")
            os.utime(extension, (1000, 1000))
            os.utime(source, (2000, 2000) if name in stale else (500, 500))
            loader = ExtensionFileLoader(name, str(extension))
            modules[f"udp_encap_tun.{name}"] = SimpleNamespace(__loader__=loader,
                                                               __file__=str(extension))
        else:
            loader = SourceFileLoader(name, str(source))
            modules[f"udp_encap_tun.{name}"] = SimpleNamespace(__loader__=loader,
                                                               __file__=str(source))
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name: modules.get(name) or real(name))


def test_the_build_is_what_the_modules_are():
    loaders = [type(importlib.import_module(f"udp_encap_tun.{m}").__loader__)
               for m in build.MODULES]
    if all(loader is ExtensionFileLoader for loader in loaders):
        assert build.describe().startswith(build.COMPILED)
    else:  # the suite runs on a whole build, never a mixed one
        assert ExtensionFileLoader not in loaders
        assert build.describe() == build.PURE


def test_the_build_is_the_one_the_test_script_built():
    """scripts/test runs the suite once per build and says which it expects."""
    expected = os.environ.get("UDP_ENCAP_TUN_EXPECT_BUILD")
    if not expected:
        pytest.skip("not run by scripts/test (UDP_ENCAP_TUN_EXPECT_BUILD unset)")
    assert build.describe() == {"compiled": build.COMPILED, "pure": build.PURE}[expected]


def test_compiled_pure_and_mixed_builds_are_told_apart(monkeypatch, tmp_path):
    _fake_modules(monkeypatch, tmp_path, compiled=build.MODULES)
    assert build.compiled_modules() == list(build.MODULES)
    assert build.describe() == build.COMPILED and build.stale() == []
    _fake_modules(monkeypatch, tmp_path, compiled=())
    assert build.describe() == build.PURE
    _fake_modules(monkeypatch, tmp_path, compiled=("packet", "core"))
    assert build.describe() == (
        "mixed: compiled packet, core; pure "
        + ", ".join(m for m in build.MODULES if m not in ("packet", "core")))


def test_a_py_changed_after_the_build_is_named_stale(monkeypatch, tmp_path):
    _fake_modules(monkeypatch, tmp_path, compiled=build.MODULES, stale=("core",))
    assert build.stale() == ["core"]
    assert build.describe() == build.COMPILED + "; STALE: core.py changed since the build"
    # a rebuild may leave the shims as they were: the library (the code) is newer than the .py
    library = tmp_path / f"{build.LIBRARY}{SUFFIX}"
    library.write_bytes(b"")
    os.utime(library, (3000, 3000))
    assert build.stale() == [] and build.describe() == build.COMPILED


def test_an_installed_build_is_never_stale(monkeypatch, tmp_path):
    """pip writes a wheel's .py files after its extension modules: in site-packages
    the .py is always the newer, and means nothing (scripts/install's compiled wheel)."""
    _fake_modules(monkeypatch, tmp_path, compiled=build.MODULES, stale=("core",))
    site = str(tmp_path.parent)  # the package's folder is tmp_path: its parent is site-packages
    monkeypatch.setattr(build.sysconfig, "get_path", lambda kind: site)
    assert build.stale() == [] and build.describe() == build.COMPILED


def test_status_shows_the_build_in_every_format(monkeypatch, tmp_path):
    from test_status import make_tunnel, parse_exposition
    t = make_tunnel()
    try:
        for compiled, word in ((build.MODULES, "compiled"), ((), "pure")):
            _fake_modules(monkeypatch, tmp_path, compiled=compiled)
            doc = status.describe(t, t.clock(), 1_700_000_100.0, 1_700_000_000.0)
            assert doc["build"] == build.describe()
            text = status.render_text(doc)
            assert re.search(rf"^  build: +{re.escape(doc['build'])}$", text, re.MULTILINE)
            samples = parse_exposition(render.render_prometheus(doc))
            [info] = [labels for metric, labels in samples if metric == "udp_encap_tun_info"]
            assert ("build", word) in info
    finally:
        t.sock.close()


def test_setup_compiles_the_modules_build_names(setup_py):
    assert setup_py._modules() == [f"udp_encap_tun/{m}.py" for m in build.MODULES]


def test_setup_builds_pure_python_when_asked_or_without_a_compiler(setup_py, monkeypatch):
    monkeypatch.setenv("UDP_ENCAP_TUN_PURE", "1")
    assert setup_py._why_pure() == "UDP_ENCAP_TUN_PURE is set"
    assert setup_py._extensions() == []
    monkeypatch.setenv("UDP_ENCAP_TUN_PURE", "0")  # 0 is not set
    monkeypatch.setenv("CC", "/nonexistent/cc")
    why = setup_py._why_pure()
    assert why in ("no working C compiler (CompileError)", "mypyc is not installed")
    assert setup_py._extensions() == []


def test_setup_compiles_where_mypyc_and_a_compiler_are(setup_py):
    pytest.importorskip("mypyc.build")
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if not shutil.which(compiler) or not headers.exists():
        pytest.skip(f"no {compiler} or no {headers} here")
    # the probe (a C file including Python.h) compiles: the build is the compiled one
    assert setup_py._why_pure() is None
