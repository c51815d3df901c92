"""Install fastpath-cni into a CNI bin directory as one self-contained file.

    python3 -m chainer.install /opt/cni/bin [--python /usr/bin/python3]

chainer/plugin.py needs nothing outside the standard library, so a node
needs nothing from this repository or its venv: only an interpreter
(CPython 3.8 or later). The file written is a short script run with -sSE (no
site packages, no user site, no PYTHON* variables from the runtime's
environment) that carries, in comment lines, the plugin's code object
compiled by that interpreter (loaded with `marshal`) and the plugin's source
(compiled instead if the node's interpreter has changed since). That is the
quickest start-up of the forms measured (chainer/README-section.md): a
zipapp pays for zipimport and runpy, a script importing chainer.plugin from
a directory for the path search, plain source or a code literal for parsing
it on every pod.

The file is written next to its destination and renamed into place, so a
runtime executing the plugin mid-install runs either the old or the new one.
"""
from __future__ import annotations

import argparse
import binascii
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "chainer" / "plugin.py"
NAME = "fastpath-cni"
MIN_PYTHON = (3, 8)

# Run by the target interpreter: the code object must be its own.
_COMPILE = """\
import marshal, sys
code = compile(sys.stdin.buffer.read(), "chainer/plugin.py", "exec", dont_inherit=True)
sys.stdout.buffer.write(sys.implementation.cache_tag.encode() + b" " + marshal.dumps(code))
"""

# The payload lines ("#:<kind> <tag> <base64>") are comments to the parser,
# so starting the plugin costs reading them, not compiling a literal.
_SCRIPT = """\
#!{python} -sSE
# fastpath-cni, written by `python3 -m chainer.install` from chainer/plugin.py.
# The last two lines carry the plugin: its code object compiled by {python}
# ({tag}) and its source for any other interpreter. See chainer/README-section.md.
import time
_t_launch = time.time()
import sys


def _plugin_code():
    import binascii
    import marshal
    with open(__file__, "rb") as f:
        data = f.read()
    payload = {{}}
    for line in data[data.index(b"\\n#:") + 1:].splitlines():
        kind, tag, blob = line[2:].split(b" ", 2)
        payload[kind] = (tag.decode(), binascii.a2b_base64(blob))
    tag, code = payload[b"code"]
    if tag == sys.implementation.cache_tag:
        return marshal.loads(code)
    return compile(payload[b"source"][1], "chainer/plugin.py", "exec", dont_inherit=True)


_plugin = {{"__name__": "fastpath_cni", "__builtins__": __builtins__}}
exec(_plugin_code(), _plugin)
sys.exit(_plugin["main"](_t_launch))
#:code {tag} {code}
#:source - {source}
"""


class InstallError(RuntimeError):
    pass


def _interpreter(python: str, host_root: str | None) -> list[str]:
    """How to run the node's interpreter from here: directly, or inside the
    node's filesystem when installing from a container that mounts it."""
    return ["chroot", host_root, python] if host_root else [python]


def _check_python(python: str, host_root: str | None = None) -> None:
    try:
        out = subprocess.run([*_interpreter(python, host_root), "-sSE", "-c",
                              "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise InstallError(f"cannot run {python}: {exc.strerror}") from None
    if out.returncode != 0:
        raise InstallError(f"{python} failed: {out.stderr.strip()}")
    version = tuple(int(v) for v in out.stdout.split())
    if version < MIN_PYTHON:
        raise InstallError(f"{python} is Python {'.'.join(map(str, version))}; "
                           f"{NAME} needs {'.'.join(map(str, MIN_PYTHON))} or later")


def build(python: str = "/usr/bin/python3", host_root: str | None = None) -> bytes:
    """The installed file's bytes."""
    _check_python(python, host_root)
    r = subprocess.run([*_interpreter(python, host_root), "-sSE", "-c", _COMPILE],
                       input=SOURCE.read_bytes(), capture_output=True, timeout=60)
    if r.returncode != 0:
        raise InstallError(f"{python} could not compile {SOURCE}: "
                           f"{r.stderr.decode(errors='replace').strip()}")
    tag, _, code = r.stdout.partition(b" ")
    return _SCRIPT.format(python=python, tag=tag.decode(),
                          code=binascii.b2a_base64(code, newline=False).decode(),
                          source=binascii.b2a_base64(SOURCE.read_bytes(), newline=False).decode()
                          ).encode()


def install(dest_dir: str | Path, python: str = "/usr/bin/python3", name: str = NAME,
            host_root: str | None = None) -> Path:
    """Write the plugin to dest_dir/name atomically and check that it
    answers VERSION; returns its path. With `host_root`, dest_dir lies
    inside it and `python` is the node's interpreter, as seen from there."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    data = build(python, host_root)
    target = dest_dir / name
    tmp = dest_dir / f".{name}.{os.getpid()}.tmp"
    try:
        tmp.write_bytes(data)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    run = [str(target)]
    if host_root:
        run = ["chroot", host_root, "/" + str(target.resolve().relative_to(
            Path(host_root).resolve()))]
    r = subprocess.run(run, input=b'{"cniVersion":"1.0.0"}', capture_output=True, timeout=30,
                       env={"CNI_COMMAND": "VERSION",
                            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")})
    if r.returncode != 0 or b"supportedVersions" not in r.stdout:
        raise InstallError(f"installed {target} does not answer VERSION: "
                           f"{(r.stdout + r.stderr).decode(errors='replace').strip()}")
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m chainer.install", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dest", help="CNI bin directory (e.g. /opt/cni/bin)")
    p.add_argument("--python", default="/usr/bin/python3",
                   help="interpreter on the node that will run the plugin (default: %(default)s)")
    p.add_argument("--name", default=NAME, help="file name (the conflist's type)")
    p.add_argument("--host-root", metavar="DIR",
                   help="the node's / as mounted in an installing container (e.g. /host): "
                        "DEST lies under it, --python is run with chroot DIR")
    args = p.parse_args(argv)
    try:
        path = install(args.dest, args.python, args.name, args.host_root)
    except InstallError as exc:
        print(f"install: {exc}", file=sys.stderr)
        return 1
    print(f"installed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
