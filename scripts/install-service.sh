#!/bin/sh
# Install poller's systemd units, its user and directories. Idempotent: run it
# again after an upgrade. Prints every step; --dry-run only prints.
#
#   scripts/install-service.sh [--dry-run] [--root DIR] [--instance NAME]...
#
#   --root DIR       install under DIR (packaging, tests): no user is created,
#                    no ownership changed, systemctl is not called
#   --instance NAME  also prepare the template instance poller@NAME
#                    (/etc/poller/NAME.toml, /etc/poller/NAME.env)
#
# Layout: units in /etc/systemd/system, configuration in /etc/poller (the
# .env files hold POLLER_SECRET_KEY: mode 0600), state in /var/lib/poller
# (systemd's StateDirectory creates it too), the program in /opt/poller/.venv.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
dry_run=0
root=""
instances=""

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --root) shift; root=${1:?--root needs a directory} ;;
        --instance)
            shift
            name=${1:?--instance needs a name}
            case "$name" in
                *[!A-Za-z0-9_.-]*|"") echo "install-service: bad instance name: $name" >&2; exit 2 ;;
            esac
            instances="$instances $name" ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "install-service: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

run() {
    echo "+ $*"
    if [ "$dry_run" -eq 0 ]; then
        "$@"
    fi
}

if [ -z "$root" ] && [ "$dry_run" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    echo "install-service: run as root (or use --dry-run / --root DIR)" >&2
    exit 1
fi

etc="$root/etc/poller"
state="$root/var/lib/poller"
units="$root/etc/systemd/system"

# 1. The system user the service runs as (no login, no home of its own).
if [ -z "$root" ]; then
    if getent group poller >/dev/null 2>&1; then
        echo "= group poller exists"
    else
        run groupadd --system poller
    fi
    if getent passwd poller >/dev/null 2>&1; then
        echo "= user poller exists"
    else
        run useradd --system --gid poller --home-dir /var/lib/poller --no-create-home \
            --shell /usr/sbin/nologin --comment "poller service" poller
    fi
fi

# 2. Directories: configuration readable by the service, state its own.
make_dir() { # path mode owner ("-": leave as it is)
    if [ -d "$1" ]; then
        echo "= $1 exists"
    else
        run install -d -m "$2" "$1"
    fi
    if [ -z "$root" ] && [ "$3" != "-" ]; then
        run chown "$3" "$1"
        run chmod "$2" "$1"
    fi
}
make_dir "$etc" 0750 root:poller
make_dir "$state" 0750 poller:poller
make_dir "$units" 0755 -  # systemd's own: never re-owned

# 3. Secret files: created empty (mode 0600), never overwritten.
make_env() { # path
    if [ -e "$1" ]; then
        echo "= $1 exists (kept)"
        return
    fi
    if [ "$dry_run" -eq 1 ]; then
        echo "+ create $1 (mode 0600)"
        return
    fi
    echo "+ create $1 (mode 0600)"
    (umask 077 && printf '%s\n' "# POLLER_SECRET_KEY=<output of: poller secret-key>" > "$1")
    chmod 0600 "$1"
}
make_env "$etc/poller.env"
for name in $instances; do
    make_env "$etc/$name.env"
    make_dir "$state/$name" 0750 poller:poller
done

# 4. The units themselves (always refreshed: they belong to the package).
for unit in poller.service poller@.service; do
    run install -m 0644 "$here/$unit" "$units/$unit"
done

# 5. Tell systemd, when it runs here.
if [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    run systemctl daemon-reload
else
    echo "= systemd not running here (or --root): skipping daemon-reload"
fi

echo "next: write $etc/poller.toml, put the key in $etc/poller.env, then"
echo "      systemctl enable --now poller.service"
for name in $instances; do
    echo "      (instance $name: $etc/$name.toml, then systemctl enable --now poller@$name.service)"
done
