"""scripts/install, run into a temporary root (--root): the venv, the unit pointing
into it, the example config; idempotent; --uninstall takes back exactly its own.
It needs no root and no namespace, but it is here and not in tests/ because it pip-installs
the project and its dependencies into fresh venvs twice (a minute or two): the unit
tests stay fast.  Nothing outside the temporary root is touched."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "install"
PREFIX = "/opt/udp-encap-tun"


def install(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if not str(p.relative_to(root)).startswith(PREFIX[1:] + "/")}


@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import ensurepip"]).returncode != 0
                    and subprocess.run(["python3", "-c", "import ensurepip"]).returncode != 0,
                    reason="python3 -m venv does not work here (no ensurepip)")
def test_install_reinstall_uninstall(tmp_path):
    root = tmp_path / "root"
    install("--root", root)

    venv = root / PREFIX[1:]
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
    install("--root", root)
    assert files(root) == before
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


def test_install_refuses_what_it_cannot_do(tmp_path):
    for args in (["--bogus"], ["--purge"], ["--root", tmp_path, "--prefix", "relative/dir"]):
        r = install(*args, check=False)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, (args, r.stderr)
    if os.geteuid() != 0:
        r = install(check=False)
        assert r.returncode == 2 and "root" in r.stderr
    assert not any(tmp_path.iterdir())
