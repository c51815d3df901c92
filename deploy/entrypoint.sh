#!/bin/sh
# The image's entrypoint: give bcc kernel headers for the node's kernel, then
# run the command (`fastpath agent ...`).
#
# bcc compiles against /lib/modules/$(uname -r)/{build,source}. The node's own
# headers are mounted at /host/lib/modules and /host/usr/src; their symlinks
# are absolute paths on the node, so they are re-pointed under /host here. A
# node without headers gets the image's Debian headers instead: fastpath's
# programs use only stable uapi definitions (the same fallback as
# scripts/setup.sh).
set -eu
# The three roots can be moved for tests (tests/unit/test_deploy.py).
host_root=${FASTPATH_HOST_ROOT:-/host}
modules=${FASTPATH_MODULES:-/lib/modules}
image_src=${FASTPATH_IMAGE_SRC:-/usr/src}
release=$(uname -r)
mods=$modules/$release
host=$host_root/lib/modules/$release

host_link() {
    # $1: build or source. Prints the headers directory on the node, as seen
    # from this container, if it has one.
    target=$(readlink "$host/$1" 2>/dev/null) || return 1
    case "$target" in
        /*) target=$host_root$target ;;
        *) target=$host/$target ;;
    esac
    [ -d "$target/include" ] && printf '%s\n' "$target"
}

if ! mkdir -p "$mods" 2>/dev/null || [ ! -w "$mods" ]; then
    # A read-only /lib/modules: a container that compiles nothing (the CNI
    # installer, uninstall). The agent's container mounts an emptyDir there.
    exec "$@"
fi
if build=$(host_link build); then
    source=$(host_link source || printf '%s\n' "$build")
    ln -sfn "$build" "$mods/build"
    ln -sfn "$source" "$mods/source"
elif [ ! -e "$mods/build/include" ]; then
    arch=$(ls -d "$image_src"/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    common=$(ls -d "$image_src"/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$arch" ] && [ -n "$common" ]; then
        echo "fastpath: no kernel headers for $release on the node; using $arch" >&2
        ln -sfn "$arch" "$mods/build"
        ln -sfn "$common" "$mods/source"
    fi
fi
exec "$@"
