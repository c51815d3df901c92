#!/usr/bin/env bash
# One-command, idempotent set-up of a development/CI machine (Debian 12,
# root): system packages, the kernel-headers link bcc needs, and the venv.
# Every step checks before it acts, so a second run is quick and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-bpfcc bpftool libbpf1 iproute2 iperf3 linux-headers-amd64
  python3-venv gcc make netcat-openbsd iptables nftables
  containerd containernetworking-plugins busybox-static
)

log() { printf 'setup: %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "setup: must run as root (installs packages, needs BPF and netns)" >&2
    exit 1
  fi
}

install_packages() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # containerd is only a tool for the tests, which start their own instance:
  # make sure the packaged service does not hold the default socket.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active -q containerd 2>/dev/null; then
    systemctl stop containerd || true
  fi
}

# bcc compiles against /lib/modules/$(uname -r)/build. Kernels that ship no
# headers of their own (and no CONFIG_IKHEADERS) get Debian's generic headers:
# networking programs only use stable uapi definitions.
link_kernel_headers() {
  # Debian splits headers in an arch part (build) and a common part (source);
  # bcc needs both links, as a packaged kernel would have them.
  local kdir="/lib/modules/$(uname -r)"
  if [ -e "$kdir/build/include" ] && [ -e "$kdir/source/include/linux/kconfig.h" ]; then return; fi
  local arch common
  arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$arch" ] || [ -z "$common" ]; then
    echo "setup: linux-headers-amd64 is installed but /usr/src/linux-headers-*-{amd64,common} are missing" >&2
    exit 1
  fi
  log "linking $kdir/build -> $arch and $kdir/source -> $common"
  mkdir -p "$kdir"
  ln -sfn "$arch" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
}

make_venv() {
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv (system site packages, for bcc)"
    /usr/bin/python3 -m venv --system-site-packages .venv
  fi
  local stamp=.venv/.fastpath-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "pip install -e .[test]"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
  fi
  .venv/bin/python -c 'import bcc, pyroute2, scapy, grpc, kubernetes, prometheus_client' \
    || { echo "setup: the venv cannot import its dependencies" >&2; exit 1; }
}

need_root
install_packages
link_kernel_headers
make_venv
log "ready"
