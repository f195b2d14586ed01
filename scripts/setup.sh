#!/usr/bin/env bash
# Sonde set-up for a fresh Debian 12 machine, as root. Idempotent.
#
#   scripts/setup.sh agent   install everything, then run the agent against the
#                            embedded InfluxDB it starts (Ctrl-C stops both)
#   scripts/setup.sh test    install everything, then run the whole test suite
#   scripts/setup.sh install install only
set -euo pipefail

mode="${1:-install}"
shift || true
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SONDE_VENV:-$repo/.venv}"

die() { echo "setup: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root: bcc needs CAP_BPF and the installer uses apt-get"
command -v apt-get >/dev/null || die "this installer supports Debian 12 (apt-get not found)"

# Debian packages. bcc for the probes, kernel headers for bcc's compiler, the
# embedded InfluxDB 1.6.7, VictoriaMetrics (tests the v2 write path), the
# real workloads the tests and benchmarks drive, and a debootstrap'd systemd
# host (nspawn, reached over ssh) that the Ansible role is tested on.
packages=(
  python3-bpfcc python3-venv python3-pip linux-headers-amd64
  influxdb victoria-metrics
  nginx-light libnginx-mod-http-js wrk fio curl iproute2 nftables procps util-linux gcc graphviz
  debootstrap systemd-container openssh-client
  redis-server redis-tools postgresql mariadb-server sysbench
  qemu-system-x86 e2fsprogs bpftool linux-perf openjdk-17-jdk-headless nodejs python3.11-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's services must not hold the ports or data dirs Sonde and its tests use.
for svc in influxdb victoria-metrics nginx; do
  if [ -x "/etc/init.d/$svc" ]; then "/etc/init.d/$svc" stop >/dev/null 2>&1 || true; fi
done

# bcc compiles against /lib/modules/$(uname -r)/build. This kernel has no
# matching headers package; Debian's newest headers work for tracepoint probes
# because TRACEPOINT_PROBE reads its argument layout from the running kernel.
kdir="/lib/modules/$(uname -r)"
mkdir -p "$kdir"
hdr_amd64="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)"
hdr_common="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)"
[ -n "$hdr_amd64" ] && [ -n "$hdr_common" ] || die "linux-headers-amd64 installed no headers under /usr/src"
[ -e "$kdir/build" ] || ln -sfn "$hdr_amd64" "$kdir/build"
[ -e "$kdir/source" ] || ln -sfn "$hdr_common" "$kdir/source"

# Tracepoints are found and attached through tracefs.
if [ ! -d /sys/kernel/tracing/events ]; then
  mount -t tracefs tracefs /sys/kernel/tracing || die "cannot mount tracefs on /sys/kernel/tracing"
fi

# A venv that sees Debian's bcc module (pure Python over libbcc).
if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp="$venv/.sonde-installed"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check -e "$repo[test]"
  touch "$stamp"
fi

case "$mode" in
  install) echo "setup: installed; the agent is $venv/bin/sonde" ;;
  agent)   exec "$venv/bin/sonde" run "$@" ;;
  test)    cd "$repo"; exec "$venv/bin/python" -m pytest "$@" ;;
  *)       die "unknown mode '$mode': use agent, test or install" ;;
esac
