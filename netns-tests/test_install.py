"""scripts/install, run into a temporary root (--root): the venv, the unit pointing
into it, the example config; the compiled build where a compiler is, pure Python when
asked or without one; idempotent; --uninstall takes back exactly its own.
It needs no root and no namespace (as root, the installed command also runs the standard
pair's tunnels), but it is here and not in tests/ because it pip-installs the project and
its dependencies into fresh venvs and compiles once (about two minutes): the unit tests stay
fast.  Nothing outside the temporary root and the test's namespaces is touched."""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from udp_encap_tun import build
from uetlab import READY_RE, Lab, Pair, clean_env

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "install"
PREFIX = "/opt/udp-encap-tun"


def install(*args, check=True, env=None) -> subprocess.CompletedProcess:
    # clean_env: no UDP_ENCAP_TUN_PURE from the caller's environment, only what a test sets
    r = subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                       timeout=600, env=clean_env(env))
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def installed_build(venv: Path) -> str:
    """build.describe() of the installed package (-I: not the checkout's, the cwd)."""
    return subprocess.run([venv / "bin/python", "-I", "-c",
                           "from udp_encap_tun import build; print(build.describe())"],
                          capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()


def importable(venv: Path, module: str) -> bool:
    return subprocess.run([venv / "bin/python", "-I", "-c", f"import {module}"],
                          capture_output=True).returncode == 0


def compiled_files(venv: Path) -> list[Path]:
    return sorted(venv.glob("lib/python*/site-packages/udp_encap_tun/*.so"))


def why_no_compiled_build() -> str | None:
    """Why scripts/install cannot compile here (python3's C compiler or headers are
    missing), or None: then it must (mypy installs from the index that gave the
    test extra its mypy)."""
    probe = subprocess.run(
        ["python3", "-c", "import sysconfig; print((sysconfig.get_config_var('CC') or 'cc')"
         ".split()[0]); print(sysconfig.get_paths()['include'])"],
        capture_output=True, text=True, check=True).stdout.split("\n")
    compiler, include = probe[0], probe[1]
    if not shutil.which(compiler):
        return f"no {compiler}"
    if not Path(include, "Python.h").exists():
        return f"no {include}/Python.h"
    return None


def netns_possible() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and Path("/dev/net/tun").exists()


def tunnel_through_installed(venv: Path, tmp: Path) -> list[str]:
    """The standard pair's two tunnels run by the installed command (the one the unit
    runs, from the venv, not the checkout), 1 MB each way through them, byte-exact;
    their ready lines."""
    tmp.mkdir()
    lab = Lab(tmp, "offload")
    try:
        pair = Pair(lab)
        command = [venv / "bin/udp-encap-tun"]
        pair.start_server(command=command)
        pair.start_client(command=command)
        pair.transfer(7001, "upload")
        pair.transfer(7002, "download")
        return [READY_RE.search(tool.log()).group(0) for tool in (pair.server, pair.client)]
    finally:
        lab.cleanup()


NO_VENV = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import ensurepip"]).returncode != 0
    and subprocess.run(["python3", "-c", "import ensurepip"]).returncode != 0,
    reason="python3 -m venv does not work here (no ensurepip)")


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if not str(p.relative_to(root)).startswith(PREFIX[1:] + "/")}


@NO_VENV
def test_install_compiled_reinstall_pure_uninstall(tmp_path):
    """The one compile of the test run: the first install is the compiled build where
    a compiler is; the second, with --pure, is pure Python and changes nothing else."""
    root = tmp_path / "root"
    first = install("--root", root)

    venv = root / PREFIX[1:]
    why = why_no_compiled_build()
    if why is None:
        assert installed_build(venv) == build.COMPILED, first.stdout + first.stderr
        assert "pure Python build" not in first.stdout
        # the compiled modules and their library, beside the .py files (which never count
        # as newer than the build in an installed package: no STALE above)
        assert {p.name.split(".")[0] for p in compiled_files(venv)} == \
            {*build.MODULES, build.LIBRARY}
    else:  # no compiler: pure, and the operator is told why in one line
        assert installed_build(venv) == build.PURE
        assert [line for line in first.stdout.splitlines()
                if line.startswith("install: pure Python build: ")], first.stdout
    assert f"into {PREFIX}: {installed_build(venv)}" in first.stdout.replace(str(root), "")
    # the build's tools stayed in the throwaway build venv
    assert not importable(venv, "mypy") and not importable(venv, "mypyc")
    if netns_possible():  # the daemon as installed runs that build, and carries data
        for ready in tunnel_through_installed(venv, tmp_path / "lab"):
            assert ready.endswith("; " + installed_build(venv)), ready
    version = subprocess.run([venv / "bin" / "udp-encap-tun", "--version"], capture_output=True,
                             text=True, check=True).stdout
    assert version.startswith("udp-encap-tun ")
    link = root / "usr/local/bin/udp-encap-tun"
    assert os.readlink(link) == f"{PREFIX}/bin/udp-encap-tun"  # the real path, not the staging one

    unit = root / "etc/systemd/system/udp-encap-tun@.service"
    ours = (REPO / "systemd/udp-encap-tun@.service").read_text().splitlines()
    theirs = unit.read_text().splitlines()
    assert [line for line in theirs if line.startswith("ExecStart=")] == \
        [f"ExecStart={PREFIX}/bin/udp-encap-tun --config %d/config"]
    assert [line for line in theirs if not line.startswith("ExecStart=")] == \
        [line for line in ours if not line.startswith("ExecStart=")]

    example = root / "etc/udp-encap-tun/example.conf"
    pristine = (REPO / "systemd/example.conf").read_text()
    assert example.read_text() == pristine
    assert stat.S_IMODE(example.stat().st_mode) == 0o600  # it may hold an address-key

    # the operator edits the example and writes a config; a second run changes neither
    example.write_text(pristine + "# edited\n")
    server = root / "etc/udp-encap-tun/server.conf"
    server.write_text("interface = tun0\n")
    before = files(root)
    second = install("--root", root, "--pure")
    assert files(root) == before
    assert "install: pure Python build: asked for (--pure)" in second.stdout.splitlines()
    assert installed_build(venv) == build.PURE and compiled_files(venv) == []
    assert example.read_text().endswith("# edited\n") and server.read_text() == "interface = tun0\n"
    assert unit.read_text().splitlines() == theirs

    # uninstall: the venv, the unit and the link go; an edited example stays, as do configs
    install("--root", root, "--uninstall")
    assert not venv.exists() and not unit.exists() and not link.exists()
    assert example.exists() and server.exists()
    # an unchanged example is the script's own: removed
    example.write_text(pristine)
    install("--root", root, "--uninstall")
    assert not example.exists() and server.exists()
    install("--root", root, "--uninstall", "--purge")
    assert not (root / "etc/udp-encap-tun").exists()
    assert not [p for p in root.rglob("*") if p.is_file() or p.is_symlink()]


@NO_VENV
def test_install_pure_without_a_compiler_or_when_asked(tmp_path):
    """No C compiler: pure Python, and one line says why; UDP_ENCAP_TUN_PURE=1 as --pure."""
    root = tmp_path / "root"
    venv = root / PREFIX[1:]
    r = install("--root", root, env={"CC": "/nonexistent/cc"})
    [why] = [line for line in r.stdout.splitlines() if "pure Python build" in line]
    assert why.startswith("install: pure Python build: no working C compiler "), why
    assert installed_build(venv) == build.PURE and compiled_files(venv) == []
    r = install("--root", root, env={"UDP_ENCAP_TUN_PURE": "1"})
    assert "install: pure Python build: UDP_ENCAP_TUN_PURE is set" in r.stdout.splitlines()
    assert installed_build(venv) == build.PURE
    install("--root", root, "--uninstall", "--purge")
    assert not [p for p in root.rglob("*") if p.is_file() or p.is_symlink()]


def test_install_refuses_what_it_cannot_do(tmp_path):
    for args in (["--bogus"], ["--purge"], ["--pure", "--uninstall"],
                 ["--root", tmp_path, "--prefix", "relative/dir"]):
        r = install(*args, check=False)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, (args, r.stderr)
    if os.geteuid() != 0:
        r = install(check=False)
        assert r.returncode == 2 and "root" in r.stderr
    assert not any(tmp_path.iterdir())
