#!/bin/sh
# Install kvd as a systemd service (what `make install-service` runs).
#
#   sudo ./systemd/install.sh                   # onto this machine
#   DESTDIR=/tmp/stage ./systemd/install.sh     # into a staging tree (no user creation, no reload)
#
# Installs the unit, the sysusers/tmpfiles snippets and (if absent) /etc/kvd/kvd.toml, creates the kvd
# user and directories, and writes kvd.service.d/memory.conf with MemoryHigh/MemoryMax derived from the
# configured storage.memory_budget: MemoryMax = budget + max(2 GiB, budget / 4), MemoryHigh = 90 % of it.
# Re-run it after changing the budget. Enabling is left to you: systemctl enable --now kvd
#
# The unit runs `kvd` from PATH (/usr/local/bin, /usr/bin). If kvd is installed elsewhere (a virtual
# environment), set KVD_BIN=/path/to/kvd (default: the one in .venv next to this script's checkout);
# it then gets an ExecStart drop-in. That path must be readable by the kvd user and not under /home or
# /root (the unit has ProtectHome=yes): /opt/kvd/venv is a good place.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
dest=${DESTDIR:-}
etc="$dest/etc"
unit_dir="$etc/systemd/system"
config="$etc/kvd/kvd.toml"

if [ -z "$dest" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (or set DESTDIR to stage the files)" >&2
    exit 1
fi

install -d -m 0755 "$unit_dir" "$unit_dir/kvd.service.d" "$etc/sysusers.d" "$etc/tmpfiles.d"
install -m 0644 "$here/kvd.service" "$unit_dir/kvd.service"
install -m 0644 "$here/kvd-sysusers.conf" "$etc/sysusers.d/kvd.conf"
install -m 0644 "$here/kvd-tmpfiles.conf" "$etc/tmpfiles.d/kvd.conf"

if [ -z "$dest" ]; then
    systemd-sysusers "$etc/sysusers.d/kvd.conf"
    systemd-tmpfiles --create "$etc/tmpfiles.d/kvd.conf"
fi

install -d -m 0750 "$etc/kvd"
if [ ! -e "$config" ]; then
    install -m 0640 "$here/kvd.toml" "$config"
    [ -z "$dest" ] && chgrp kvd "$config" "$etc/kvd"
    echo "install.sh: wrote $config"
else
    echo "install.sh: kept the existing $config"
fi

# Which kvd, and which Python to read the config with.
kvd_bin=${KVD_BIN:-}
if [ -z "$kvd_bin" ] && [ -x "$repo/.venv/bin/kvd" ]; then
    kvd_bin="$repo/.venv/bin/kvd"
fi
if [ -z "$kvd_bin" ]; then
    kvd_bin=$(command -v kvd || true)
fi
if [ -z "$kvd_bin" ]; then
    echo "install.sh: no kvd executable found; install kvd first (or set KVD_BIN)" >&2
    exit 1
fi
python=$(dirname "$kvd_bin")/python
[ -x "$python" ] || python=python3

exec_conf="$unit_dir/kvd.service.d/exec.conf"
case "$kvd_bin" in
    /usr/bin/kvd|/usr/local/bin/kvd)
        rm -f "$exec_conf" ;;
    *)
        case "$kvd_bin" in
            /home/*|/root/*|/run/user/*)
                echo "install.sh: warning: $kvd_bin is hidden from the service by ProtectHome=yes;" \
                     "install kvd under /opt or /usr/local instead" >&2 ;;
        esac
        cat > "$exec_conf" <<EOF
# Written by systemd/install.sh: kvd is not on the unit's PATH.
[Service]
ExecStart=
ExecStart=$kvd_bin serve --config \${KVD_CONFIG}
EOF
        echo "install.sh: ExecStart uses $kvd_bin ($exec_conf)" ;;
esac

# MemoryMax from the configured memory budget.
budget=$("$python" -c 'import sys; from kvd.config import load; print(load(sys.argv[1]).memory_budget_bytes)' "$config")
gib=$((1024 * 1024 * 1024))
overhead=$((budget / 4))
[ "$overhead" -lt $((2 * gib)) ] && overhead=$((2 * gib))
max=$((budget + overhead))
high=$((max * 9 / 10))
cat > "$unit_dir/kvd.service.d/memory.conf" <<EOF
# Written by systemd/install.sh from storage.memory_budget = $budget bytes in /etc/kvd/kvd.toml:
# MemoryMax = budget + max(2 GiB, budget / 4); MemoryHigh = 90 % of MemoryMax. Re-run after changing it.
[Service]
MemoryHigh=$high
MemoryMax=$max
EOF
echo "install.sh: MemoryMax=$max MemoryHigh=$high (budget $budget)"

if [ -z "$dest" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "install.sh: done; start with: systemctl enable --now kvd"
elif [ -z "$dest" ]; then
    echo "install.sh: systemd is not running here; files installed, nothing reloaded"
fi
