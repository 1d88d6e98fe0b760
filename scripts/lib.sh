# Shared by scripts/test and scripts/demo: install what is missing on a fresh Debian machine.
# Sourced, not run.  Leaves the project's virtual environment in .venv.

ensure_apt() {  # ensure_apt CMD:PACKAGE ...
    local need=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
    done
    ((${#need[@]})) || return 0
    if [ "$(id -u)" != 0 ]; then
        echo "missing ${need[*]} (run as root to install them)" >&2
        return 1
    fi
    echo "installing: ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}

ensure_venv() {  # ensure_venv [EXTRAS]
    local extras=${1:+[$1]}
    if [ ! -x .venv/bin/python ]; then
        if ! python3 -m venv .venv 2>/dev/null; then  # Debian's python3 lacks ensurepip
            rm -rf .venv
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            python3 -m venv .venv
        fi
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extras"
}
