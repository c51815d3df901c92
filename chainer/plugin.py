"""fastpath-cni: the CNI plugin chained after Terway's in the node's conflist.

Terway's plugin creates the pod's veth and gives it an ENI address; this
plugin then tells the fastpath agent about the pod, so that by the time the
runtime starts the pod's containers, fastpath's programs are attached to the
host-side veth and the pod is in the endpoints map.

The plugin runs once per pod event, inside every pod's start path, so it
does as little as it can: it parses the conflist entry and the CNI
environment, makes one request to the agent (framed JSON on the agent's unix
socket, agent/api/wire.py) and prints the result. Everything that touches
the kernel (finding the veth from CNI_NETNS, its host-side peer, the ENI from
the node's policy routing, tc attach, map writes) happens in the agent, a
warm process. Hence the imports below: only modules that are built into the
interpreter or cost next to nothing. Not even `json` and `socket`: they pull
in `re` and `enum`, about 15 ms per pod here (chainer/README-section.md has
the figures), so the plugin speaks agent/api/wire.py's framed protocol
through the C modules `_json` and `_socket` that those two are built on.

Commands: ADD, DEL, CHECK, VERSION (spec 0.3.0 - 1.1.0) and, for 1.1.0
conflists, STATUS and GC. Errors are the spec's JSON on stdout with exit
status 1; the codes are listed below and in chainer/README-section.md.
"""
from __future__ import annotations

import _json
import _socket
import os
import sys
import time

PLUGIN = "fastpath-cni"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

# The spec's well-known codes ...
E_INCOMPATIBLE_VERSION = 1
E_UNSUPPORTED_FIELD = 2
E_INVALID_ENV = 4
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN_LATER = 11
E_NOT_AVAILABLE = 50
# ... and ours (the spec leaves 100 and up to plugins).
E_AGENT = 100            # the agent failed in a way the codes below do not name
E_POD_INTERFACE = 101    # the pod's interface / host veth could not be discovered
E_ENI_UNRESOLVED = 102   # no ENI for the pod's IP in the node's policy routing
E_DATAPATH = 103         # attaching programs or writing maps failed
E_CHECK_FAILED = 104     # CHECK found the datapath not as ADD left it
E_HOSTPORT = 105         # a hostPort is taken (by a Service or another pod) or does not fit

AGENT_CODES = {"discovery": E_POD_INTERFACE, "eni-unresolved": E_ENI_UNRESOLVED,
               "datapath": E_DATAPATH, "check-failed": E_CHECK_FAILED,
               "not-found": E_CHECK_FAILED, "hostport-refused": E_HOSTPORT,
               "invalid-port-mappings": E_INVALID_CONFIG,
               # the agent checks what it is handed, whoever calls it: an
               # environment this plugin passed on unchanged
               "invalid-netns": E_INVALID_ENV, "invalid-argument": E_INVALID_ENV}

# Keys of our conflist entry, with their defaults.
DEFAULTS = {
    "agent_socket": "/var/run/fastpath/agent.sock",
    "state_dir": "/var/run/fastpath",
    "log_file": "",
    "log_level": "info",
    "timeout_seconds": 10,
    "require_eni": True,
}
# Keys the runtime or the spec may put in any plugin's entry.
STANDARD_KEYS = frozenset(("cniVersion", "name", "type", "prevResult", "runtimeConfig",
                           "capabilities", "args", "ipam", "dns", "cni.dev/valid-attachments"))
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
MAX_TIMEOUT = 300
DEL_QUEUE = "cni-del-queue"        # shared with agent/daemon/agent.py (replay_deletions)
DEL_QUEUE_MAX = 4096
LOG_ROTATE_BYTES = 4 << 20
SUN_PATH_MAX = 107                 # sizeof(sockaddr_un.sun_path) - 1
# Input bounds. The spec bounds the interface name (IFNAMSIZ - 1) but not the
# container id; ours must fit a file name (NAME_MAX 255) as the DEL queue's
# ".<id>-<ifname>.json.<pid>.tmp" (id + 34 bytes), and 200 holds containerd's
# longest "<namespace>-<id>" pair (76 + 1 + 76) as well as any 64-hex id.
MAX_CONTAINER_ID = 200
MAX_IFNAME = 15
MAX_NETNS_PATH = 4095              # PATH_MAX - 1
MAX_STDIN = 1 << 20                # a conflist entry plus prevResult: kilobytes
# Real configurations nest a few levels (prevResult.ips[0]); anything deeper
# is refused before it can exhaust the interpreter's recursion limit.
MAX_NESTING = 32
# Kubernetes' own bounds for the names the runtime passes in CNI_ARGS.
MAX_POD_NAMESPACE = 63             # a DNS-1123 label
MAX_POD_NAME = 253                 # a DNS-1123 subdomain

# The agent's framed protocol, as agent/api/wire.py defines it: a 4-byte
# big-endian length, then that many bytes of UTF-8 JSON; request
# {"method", "params", "version"}, reply {"ok": true, "result"} or
# {"ok": false, "error": {"code", "message"}}. Keep these in step with
# wire.py (tests/cni/test_plugin.py checks that they are).
MAX_FRAME = 4 << 20
PROTOCOL_VERSION = 1


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


class AgentUnreachable(Exception):
    """No connection could be made: nothing was sent."""


class WireError(Exception):
    """The connection broke or the agent sent something unreadable."""


class RemoteError(Exception):
    """The agent answered with an error."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# -- JSON, on the interpreter's C accelerator --------------------------------------

class _ScanContext:
    def __init__(self) -> None:
        self.strict = True
        self.object_hook = None
        self.object_pairs_hook = None
        self.parse_float = float
        self.parse_int = int
        self.parse_constant = float       # NaN, Infinity, -Infinity


_scan = _json.make_scanner(_ScanContext())
_WHITESPACE = " \t\n\r"


def loads(data):
    """JSON text (str or UTF-8 bytes) -> Python value; ValueError if invalid."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    i, n = 0, len(text)
    while i < n and text[i] in _WHITESPACE:
        i += 1
    try:
        value, end = _scan(text, i)
    except StopIteration as stop:
        raise ValueError(f"expecting a JSON value at char {stop.value}") from None
    except RecursionError:
        raise ValueError(f"nested deeper than the decoder can follow "
                         f"(more than {MAX_NESTING} levels are refused)") from None
    except Exception:
        # Malformed inside a value: the C scanner reports that through
        # json.decoder's exception class, which it finds only if json is
        # already imported. Only on this path is it worth importing.
        import json
        json.loads(text)
        raise
    while end < n and text[end] in _WHITESPACE:
        end += 1
    if end != n:
        raise ValueError(f"extra data after the JSON value at char {end}")
    return value


def _encode(obj, out: list) -> None:
    if isinstance(obj, str):
        out.append(_json.encode_basestring_ascii(obj))
    elif obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        out.append(int.__repr__(obj))
    elif isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            raise ValueError(f"{obj!r} has no JSON form")
        out.append(float.__repr__(obj))
    elif isinstance(obj, dict):
        out.append("{")
        first = True
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be strings, not {key!r}")
            if not first:
                out.append(",")
            first = False
            out.append(_json.encode_basestring_ascii(key))
            out.append(":")
            _encode(value, out)
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _encode(value, out)
        out.append("]")
    else:
        raise TypeError(f"{type(obj).__name__} has no JSON form")


def dumps(obj) -> str:
    out: list = []
    _encode(obj, out)
    return "".join(out)


def nesting(value, limit: int) -> int:
    """How deep `value` nests (a scalar is 0), counted without recursion and
    up to limit + 1 at most."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            break
        stack.extend((item, depth + 1) for item in v)
    return deepest


def _json_type(value) -> str:
    """A value's type as JSON names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _vtuple(v: str) -> tuple:
    return tuple(int(p) for p in v.split("."))


# -- configuration -------------------------------------------------------------

class Conf:
    """Our conflist entry, validated."""

    __slots__ = ("cni_version", "name", "prev_result", "valid_attachments",
                 "agent_socket", "state_dir", "log_file", "log_level", "timeout", "require_eni",
                 "port_mappings")

    def __init__(self) -> None:
        self.cni_version = "1.0.0"
        self.name = ""
        self.prev_result = None
        self.valid_attachments = None
        self.agent_socket = DEFAULTS["agent_socket"]
        self.state_dir = DEFAULTS["state_dir"]
        self.log_file = DEFAULTS["log_file"]
        self.log_level = DEFAULTS["log_level"]
        self.timeout = float(DEFAULTS["timeout_seconds"])
        self.require_eni = DEFAULTS["require_eni"]
        # runtimeConfig.portMappings (the portMappings capability): the
        # pod's hostPorts, passed on to the agent, which validates them
        self.port_mappings = None


def _suggest(key: str) -> str:
    import difflib   # only on this error path: it is not cheap to import
    close = difflib.get_close_matches(key, list(DEFAULTS), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _abs_path(key: str, value, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise CniError(E_INVALID_CONFIG, f"{key} must be a string path, not {value!r}")
    if allow_empty and value == "":
        return value
    if not value.startswith("/"):
        raise CniError(E_INVALID_CONFIG, f"{key} must be an absolute path, not {value!r}")
    return value


def parse_config(data: bytes, command: str) -> Conf:
    """stdin -> Conf. Raises CniError with the spec's code for each failure."""
    try:
        raw = loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(E_DECODE, f"the network configuration on stdin is not valid JSON: {exc}")
    if not isinstance(raw, dict):
        raise CniError(E_DECODE, "the network configuration on stdin must be a JSON object, "
                       f"not {_json_type(raw)}")
    if nesting(raw, MAX_NESTING) > MAX_NESTING:
        raise CniError(E_DECODE, f"the network configuration on stdin nests deeper than "
                       f"{MAX_NESTING} levels")
    conf = Conf()
    version = raw.get("cniVersion", "")
    if not isinstance(version, str):
        raise CniError(E_INVALID_CONFIG, f"cniVersion must be a string such as \"1.0.0\", "
                       f"not {_json_type(version)}")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(E_INCOMPATIBLE_VERSION,
                       f"{PLUGIN} does not support cniVersion {version!r}; it supports "
                       f"{', '.join(SUPPORTED_VERSIONS)} (set cniVersion in the conflist)")
    conf.cni_version = version
    if command == "CHECK" and _vtuple(version) < (0, 4, 0):
        raise CniError(E_INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, "
                       f"the conflist says {version}")
    if command in ("STATUS", "GC") and _vtuple(version) < (1, 1, 0):
        raise CniError(E_INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0 or later, "
                       f"the conflist says {version}")
    for required in ("name", "type"):
        value = raw.get(required)
        if value is not None and not isinstance(value, str):
            raise CniError(E_INVALID_CONFIG, f"{required} must be a string, not "
                           f"{_json_type(value)}")
        if not value:
            raise CniError(E_INVALID_CONFIG, f"the network configuration has no {required!r}")
    conf.name = raw["name"]
    for key, value in raw.items():
        if key in STANDARD_KEYS or key in DEFAULTS:
            continue
        try:
            shown = dumps(value)
        except (TypeError, ValueError):
            shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise CniError(E_UNSUPPORTED_FIELD,
                       f"unknown key {key!r} (value {shown}) in the {PLUGIN} entry of conflist "
                       f"{conf.name!r}{_suggest(key)}; known keys: {', '.join(DEFAULTS)}")

    conf.agent_socket = _abs_path("agent_socket", raw.get("agent_socket", conf.agent_socket))
    if len(conf.agent_socket.encode()) > SUN_PATH_MAX:
        raise CniError(E_INVALID_CONFIG, f"agent_socket {conf.agent_socket!r} is longer than a "
                       f"unix socket path may be ({SUN_PATH_MAX} bytes)")
    conf.state_dir = _abs_path("state_dir", raw.get("state_dir", conf.state_dir))
    conf.log_file = _abs_path("log_file", raw.get("log_file", conf.log_file), allow_empty=True)
    level = raw.get("log_level", conf.log_level)
    if not isinstance(level, str) or level not in LOG_LEVELS:
        raise CniError(E_INVALID_CONFIG, f"log_level must be one of {', '.join(LOG_LEVELS)}, "
                       f"not {level!r}")
    conf.log_level = level
    timeout = raw.get("timeout_seconds", conf.timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 < timeout <= MAX_TIMEOUT:
        raise CniError(E_INVALID_CONFIG, f"timeout_seconds must be a number of seconds in "
                       f"(0, {MAX_TIMEOUT}], not {timeout!r}")
    conf.timeout = float(timeout)
    require_eni = raw.get("require_eni", conf.require_eni)
    if not isinstance(require_eni, bool):
        raise CniError(E_INVALID_CONFIG, f"require_eni must be true or false, not {require_eni!r}")
    conf.require_eni = require_eni

    runtime = raw.get("runtimeConfig")
    if runtime is not None and not isinstance(runtime, dict):
        raise CniError(E_DECODE, f"runtimeConfig must be a JSON object, not {_json_type(runtime)}")
    mappings = (runtime or {}).get("portMappings")
    if mappings is not None and not isinstance(mappings, list):
        raise CniError(E_INVALID_CONFIG, f"runtimeConfig.portMappings must be a list, not "
                       f"{_json_type(mappings)}")
    conf.port_mappings = mappings or None

    prev = raw.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(E_DECODE, f"prevResult must be a JSON object, not {_json_type(prev)}")
    conf.prev_result = prev
    if command == "GC":
        valid = raw.get("cni.dev/valid-attachments", [])
        if not isinstance(valid, list) or not all(isinstance(a, dict) for a in valid):
            raise CniError(E_DECODE, "cni.dev/valid-attachments must be a list of objects")
        for i, a in enumerate(valid):
            for key in ("containerID", "ifname"):
                if not isinstance(a.get(key), str):
                    raise CniError(E_DECODE, f"cni.dev/valid-attachments[{i}].{key} must be "
                                   f"a string, not {_json_type(a.get(key))}")
        conf.valid_attachments = valid
    return conf


# -- environment -----------------------------------------------------------------

class Env:
    __slots__ = ("command", "container_id", "netns", "ifname", "args", "pod_namespace",
                 "pod_name", "infra_container_id", "ignored_netns")


COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
NEEDS = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
         "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
         "DEL": ("CNI_CONTAINERID", "CNI_IFNAME")}


def parse_cni_args(text: str) -> dict:
    """`K1=V1;K2=V2` -> dict; entries without '=' are ignored."""
    out = {}
    for item in text.split(";"):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def container_id_problem(cid) -> str:
    """Why `cid` is not a container id the spec allows ("" if it is): an
    ASCII alphanumeric, then alphanumerics, '_', '.' or '-'; at most
    MAX_CONTAINER_ID bytes (ours, see there). The agent checks with this too."""
    if not isinstance(cid, str):
        return f"must be a string, not {_json_type(cid)}"
    if not cid:
        return "must not be empty"
    if len(cid) > MAX_CONTAINER_ID:
        return f"is {len(cid)} characters long; at most {MAX_CONTAINER_ID} are accepted"
    if not (cid[0].isascii() and cid[0].isalnum()):
        return "must start with a letter or digit"
    if not all(c.isascii() and (c.isalnum() or c in "_.-") for c in cid):
        return "may hold only letters, digits, '_', '.' and '-'"
    return ""


def ifname_problem(name) -> str:
    """Why `name` is not an interface name the spec allows ("" if it is):
    1 to 15 bytes, not "." or "..", no '/', ':' or whitespace."""
    if not isinstance(name, str):
        return f"must be a string, not {_json_type(name)}"
    size = len(name.encode(errors="surrogateescape"))
    if not 0 < size <= MAX_IFNAME:
        return f"must be 1 to {MAX_IFNAME} bytes long, not {size}"
    if name in (".", ".."):
        return "must not be '.' or '..'"
    if any(c in "/:" or c.isspace() for c in name):
        return "must not contain '/', ':' or whitespace"
    return ""


def netns_path_problem(path) -> str:
    """Why `path` cannot name a pod's network namespace, as far as the text
    tells ("" if it can); the agent then asks the kernel what it is."""
    if not isinstance(path, str):
        return f"must be a string, not {_json_type(path)}"
    if not path.startswith("/"):
        return "must be an absolute path (such as /var/run/netns/cni-...)"
    if len(path) > MAX_NETNS_PATH:
        return f"is longer than a path may be ({MAX_NETNS_PATH} bytes)"
    return ""


def _dns_name_problem(value: str, limit: int, dots: bool) -> str:
    if len(value) > limit:
        return f"is {len(value)} characters long; at most {limit} are allowed"
    allowed = "abcdefghijklmnopqrstuvwxyz0123456789-" + ("." if dots else "")
    if not all(c in allowed for c in value) or value[0] in "-." or value[-1] in "-.":
        return ("must be lower-case letters, digits and '-'" + (" or '.'" if dots else "")
                + ", starting and ending with a letter or digit")
    return ""


def parse_env(environ) -> Env:
    env = Env()
    env.command = environ.get("CNI_COMMAND", "")
    if env.command not in COMMANDS:
        raise CniError(E_INVALID_ENV, f"CNI_COMMAND={env.command!r} is not one of "
                       f"{', '.join(COMMANDS)}: {PLUGIN} is a CNI plugin, run by the "
                       f"container runtime")
    missing = [v for v in NEEDS.get(env.command, ()) if not environ.get(v)]
    if missing:
        raise CniError(E_INVALID_ENV, f"{env.command} needs {', '.join(missing)} in the "
                       f"environment")
    env.container_id = environ.get("CNI_CONTAINERID", "")
    env.netns = environ.get("CNI_NETNS", "")
    env.ifname = environ.get("CNI_IFNAME", "")
    if env.command in NEEDS:
        why = container_id_problem(env.container_id)
        if why:
            raise CniError(E_INVALID_ENV, f"CNI_CONTAINERID={_shown(env.container_id)} {why}")
        why = ifname_problem(env.ifname)
        if why:
            raise CniError(E_INVALID_ENV, f"CNI_IFNAME={env.ifname!r} {why}")
    env.ignored_netns = ""
    if env.command in ("ADD", "CHECK"):
        why = netns_path_problem(env.netns)
        if why:
            raise CniError(E_INVALID_ENV, f"CNI_NETNS={_shown(env.netns)} {why}")
    elif env.netns and netns_path_problem(env.netns):
        # DEL may come without a netns (the runtime lost it) and never fails
        # for it: one that names nothing usable is as good as none
        env.ignored_netns, env.netns = env.netns, ""
    env.args = parse_cni_args(environ.get("CNI_ARGS", ""))
    env.pod_namespace = env.args.get("K8S_POD_NAMESPACE", "")
    env.pod_name = env.args.get("K8S_POD_NAME", "")
    for key, value, limit, dots in (("K8S_POD_NAMESPACE", env.pod_namespace, MAX_POD_NAMESPACE,
                                     False),
                                    ("K8S_POD_NAME", env.pod_name, MAX_POD_NAME, True)):
        why = _dns_name_problem(value, limit, dots) if value else ""
        if why:
            raise CniError(E_INVALID_ENV, f"CNI_ARGS {key}={_shown(value)} {why}")
    env.infra_container_id = env.args.get("K8S_POD_INFRA_CONTAINER_ID", "")
    return env


def _shown(value: str, limit: int = 60) -> str:
    """A value for an error message: quoted, and cut short if long."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


# -- log ---------------------------------------------------------------------------

class Log:
    """One line per event, appended with O_APPEND so concurrent plugin runs
    never interleave within a line. Before the config is read (or without a
    log_file) warnings and errors go to stderr, which runtimes keep."""

    def __init__(self) -> None:
        self.path = ""
        self.level = LOG_LEVELS["warning"]
        self.context = ""

    def configure(self, conf: Conf, env: Env | None) -> None:
        self.path = conf.log_file
        self.level = LOG_LEVELS[conf.log_level] if conf.log_file else LOG_LEVELS["warning"]
        if env is not None:
            self.context = f"{env.command} {env.container_id[:12]}/{env.ifname}"

    def enabled(self, level: str) -> bool:
        return LOG_LEVELS[level] >= self.level

    def write(self, level: str, msg: str) -> None:
        if not self.enabled(level):
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e3):03d}Z"
        line = f"{stamp} {level.upper()} pid={os.getpid()} {self.context or '-'} {msg}\n"
        if self.path:
            try:
                self._append(line)
                return
            except OSError as exc:
                line += f"(cannot write {self.path}: {exc.strerror})\n"
        sys.stderr.write(f"{PLUGIN}: {line}")

    def _append(self, line: str) -> None:
        try:
            if os.stat(self.path).st_size > LOG_ROTATE_BYTES:
                os.replace(self.path, self.path + ".1")
        except FileNotFoundError:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        # the log names containers, pods and netns paths: root's alone
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


# -- the agent -------------------------------------------------------------------

def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise WireError("the agent closed the connection mid-reply")
        buf += chunk
    return bytes(buf)


def agent_call(conf: Conf, method: str, params: dict, *, wait: float):
    """One request to the agent. While the socket is missing or refuses
    (the agent is starting or restarting), retry the connect for up to
    `wait` seconds; never re-send a request once it went out.
    Raises AgentUnreachable, RemoteError, or OSError/WireError for a
    connection that broke or timed out mid-request."""
    deadline = time.monotonic() + wait
    pause = 0.02
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(conf.timeout)
        try:
            sock.connect(conf.agent_socket)
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f", waited {wait:.1f}s" if wait > 0 else ""
                raise AgentUnreachable(f"{exc.strerror.lower()}{waited}") from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.25)
        except OSError as exc:
            sock.close()
            raise AgentUnreachable(exc.strerror or str(exc) or type(exc).__name__) from None
    try:
        body = dumps({"method": method, "params": params, "version": PROTOCOL_VERSION}).encode()
        sock.sendall(len(body).to_bytes(4, "big") + body)
        size = int.from_bytes(_recv_exact(sock, 4), "big")
        if size > MAX_FRAME:
            raise WireError(f"reply frame of {size} bytes exceeds {MAX_FRAME}")
        try:
            reply = loads(_recv_exact(sock, size))
        except ValueError as exc:
            raise WireError(f"malformed reply: {exc}") from None
    finally:
        sock.close()
    if not isinstance(reply, dict):
        raise WireError("the reply is not a JSON object")
    if not reply.get("ok"):
        err = reply.get("error") or {}
        raise RemoteError(err.get("code", "internal"), err.get("message", "unknown error"))
    return reply.get("result")


def _unreachable(conf: Conf, why: str, code: int = E_TRY_AGAIN_LATER) -> CniError:
    return CniError(code, f"fastpath agent unreachable at {conf.agent_socket} ({why}): is the "
                    f"fastpath agent running on this node? (the socket path is the conflist's "
                    f"agent_socket)")


def _remote(exc: RemoteError, what: str) -> CniError:
    code = AGENT_CODES.get(exc.code, E_AGENT)
    if code == E_AGENT:
        return CniError(code, f"fastpath agent failed to {what}: {exc.message} "
                        f"(agent error {exc.code})")
    return CniError(code, exc.message, f"agent error {exc.code} while trying to {what}")


def _broken(conf: Conf, exc: Exception, what: str) -> CniError:
    if isinstance(exc, _socket.timeout):
        return CniError(E_TRY_AGAIN_LATER, f"fastpath agent at {conf.agent_socket} did not "
                        f"answer {what} within timeout_seconds={conf.timeout:g}")
    return CniError(E_TRY_AGAIN_LATER, f"the connection to the fastpath agent at "
                    f"{conf.agent_socket} broke during {what}: {exc}")


# -- results -------------------------------------------------------------------------

def convert_result(prev: dict, version: str) -> dict:
    """prevResult re-labelled for `version`: results of 0.3.0 to 0.4.0 carry
    a "version" on each IP, 1.x results do not; nothing else differs."""
    out = dict(prev)
    out["cniVersion"] = version
    ips = out.get("ips")
    if isinstance(ips, list):
        legacy = _vtuple(version) < (1, 0, 0)
        converted = []
        for ip in ips:
            if isinstance(ip, dict):
                ip = dict(ip)
                if legacy:
                    ip.setdefault("version", "6" if ":" in str(ip.get("address", "")) else "4")
                else:
                    ip.pop("version", None)
            converted.append(ip)
        out["ips"] = converted
    return out


def result_ips(prev: dict) -> set:
    ips = prev.get("ips") if isinstance(prev, dict) else None
    if not isinstance(ips, list):
        return set()
    return {str(ip.get("address", "")).split("/")[0] for ip in ips if isinstance(ip, dict)}


# -- commands --------------------------------------------------------------------------

def cmd_add(conf: Conf, env: Env, log: Log) -> dict:
    if conf.prev_result is None:
        raise CniError(E_INVALID_CONFIG,
                       f"{PLUGIN} got no prevResult: it must be chained after the plugin that "
                       f"creates the pod's interface (Terway's `terway`); put it after that "
                       f"plugin in the conflist's plugins list")
    if env.infra_container_id and env.infra_container_id != env.container_id:
        # DEL and CHECK find the endpoint by CNI_CONTAINERID: say so if the
        # runtime names the sandbox differently
        log.write("warning", f"CNI_CONTAINERID {env.container_id} differs from "
                             f"K8S_POD_INFRA_CONTAINER_ID {env.infra_container_id}; the "
                             f"endpoint is keyed by CNI_CONTAINERID")
    params = {"netns": env.netns, "ifname": env.ifname, "container_id": env.container_id,
              "pod_namespace": env.pod_namespace, "pod_name": env.pod_name,
              "require_eni": conf.require_eni}
    if conf.port_mappings:
        params["port_mappings"] = conf.port_mappings
    t0 = time.monotonic()
    try:
        ep = agent_call(conf, "EndpointAdd", params, wait=conf.timeout)
    except AgentUnreachable as exc:
        raise _unreachable(conf, str(exc)) from None
    except RemoteError as exc:
        raise _remote(exc, "register the endpoint") from None
    except (OSError, WireError) as exc:
        raise _broken(conf, exc, "ADD") from None
    rpc_ms = (time.monotonic() - t0) * 1e3
    ep = ep if isinstance(ep, dict) else {}
    timing = ep.get("timing_ms") or {}
    # (an IPv6-only pod's address is its IPv6 one)
    addr = ep.get("ip") or ep.get("ip6")
    log.write("info", f"endpoint {addr} veth={ep.get('host_ifname')} "
                      f"eni={ep.get('eni') or '-'} pod={env.pod_namespace}/{env.pod_name}"
                      + (f" hostPorts={','.join(ep.get('host_ports') or [])}"
                         if ep.get("host_ports") else ""))
    if log.enabled("debug"):
        log.write("debug", "timing " + dumps(
            {"t_launch": START[0], "t_main": START[1], "rpc_ms": round(rpc_ms, 3),
             "agent_discover_ms": timing.get("discover"), "agent_attach_ms": timing.get("attach"),
             "agent_identity_ms": timing.get("identity"), "agent_policy_ms": timing.get("policy"),
             "agent_total_ms": timing.get("total")}))
    prev_ips = result_ips(conf.prev_result)
    if prev_ips and addr not in prev_ips and ep.get("ip6") not in prev_ips:
        log.write("warning", f"the pod's {env.ifname} holds {addr}, which the previous "
                             f"plugin's result does not list ({', '.join(sorted(prev_ips))})")
    return convert_result(conf.prev_result, conf.cni_version)


def queue_deletion(conf: Conf, env: Env, log: Log, why: str) -> None:
    """Leave the deletion for the agent to replay when it starts. Bounded:
    beyond DEL_QUEUE_MAX files the deletion is dropped (and logged); the
    agent still forgets endpoints whose veth is gone when it restores."""
    qdir = os.path.join(conf.state_dir, DEL_QUEUE)
    name = f"{env.container_id}-{env.ifname}.json"
    path = os.path.join(qdir, name)
    try:
        # the agent's state dir is root's alone (agent/agent.py); if the
        # plugin is first to make it, it makes it so
        os.makedirs(conf.state_dir, mode=0o700, exist_ok=True)
        try:
            os.mkdir(qdir, 0o700)
        except FileExistsError:
            pass
        if not os.path.exists(path):
            queued = sum(1 for n in os.listdir(qdir) if n.endswith(".json"))
            if queued >= DEL_QUEUE_MAX:
                log.write("error", f"agent unreachable ({why}) and the deletion queue {qdir} is "
                                   f"full ({queued} files): deletion of {name[:-5]} dropped; the "
                                   f"agent drops its endpoint at start if the veth is gone")
                return
        tmp = os.path.join(qdir, f".{name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, dumps({"container_id": env.container_id, "ifname": env.ifname,
                                "netns": env.netns, "queued_at": time.time()}).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        log.write("error", f"agent unreachable ({why}) and the deletion could not be queued in "
                           f"{qdir}: {exc}; the agent drops the endpoint at start if its veth "
                           f"is gone")
        return
    log.write("warning", f"agent unreachable ({why}): deletion queued as {path}")


def cmd_del(conf: Conf, env: Env, log: Log) -> None:
    if env.ignored_netns:
        log.write("warning", f"CNI_NETNS={_shown(env.ignored_netns)} is not an absolute path: "
                             "deleting by container id and interface alone")
    params = {"container_id": env.container_id, "ifname": env.ifname}
    try:
        res = agent_call(conf, "EndpointDel", params, wait=0)
    except AgentUnreachable as exc:
        queue_deletion(conf, env, log, f"{conf.agent_socket}: {exc}")
        return
    except RemoteError as exc:
        raise _remote(exc, "delete the endpoint") from None
    except (OSError, WireError) as exc:
        # the agent may or may not have done it; a replayed DEL is harmless
        queue_deletion(conf, env, log, f"{conf.agent_socket}: {exc or type(exc).__name__}")
        return
    if isinstance(res, dict) and res.get("deleted"):
        log.write("info", f"endpoint {res.get('ip')} deleted")
    else:
        log.write("info", "no such endpoint (already deleted, or never added)")


def cmd_check(conf: Conf, env: Env, log: Log) -> None:
    if conf.prev_result is None:
        raise CniError(E_INVALID_CONFIG, f"CHECK got no prevResult: the runtime must pass the "
                       f"result of the ADD it checks")
    params = {"container_id": env.container_id, "ifname": env.ifname}
    try:
        res = agent_call(conf, "EndpointCheck", params, wait=conf.timeout)
    except AgentUnreachable as exc:
        raise _unreachable(conf, str(exc)) from None
    except RemoteError as exc:
        if exc.code == "not-found":
            raise CniError(E_CHECK_FAILED, f"the fastpath agent has no endpoint for container "
                           f"{env.container_id} interface {env.ifname}: the pod is not "
                           f"accelerated (was ADD run? was the agent's state dir lost?)") from None
        if exc.code == "check-failed":
            raise CniError(E_CHECK_FAILED, f"fastpath datapath for container "
                           f"{env.container_id} is not as ADD left it: {exc.message}") from None
        raise _remote(exc, "check the endpoint") from None
    except (OSError, WireError) as exc:
        raise _broken(conf, exc, "CHECK") from None
    ep = (res or {}).get("endpoint") or {}
    prev_ips = result_ips(conf.prev_result)
    # (an IPv6-only pod's address is its IPv6 one)
    addr = ep.get("ip") or ep.get("ip6")
    if prev_ips and addr not in prev_ips:
        raise CniError(E_CHECK_FAILED, f"fastpath has {addr} for container "
                       f"{env.container_id}, the ADD result says {', '.join(sorted(prev_ips))}")


def cmd_status(conf: Conf, env: Env, log: Log) -> None:
    try:
        status = agent_call(conf, "Status", {}, wait=0)
    except AgentUnreachable as exc:
        raise _unreachable(conf, str(exc), E_NOT_AVAILABLE) from None
    except (RemoteError, OSError, WireError) as exc:
        raise CniError(E_NOT_AVAILABLE, f"fastpath agent at {conf.agent_socket} cannot report "
                       f"its status: {exc}") from None
    if not (status or {}).get("ready"):
        raise CniError(E_NOT_AVAILABLE, f"fastpath agent at {conf.agent_socket} is starting")


def cmd_gc(conf: Conf, env: Env, log: Log) -> None:
    """Delete endpoints of attachments the runtime no longer knows. Only
    endpoints the CNI made (those with a container id) are candidates."""
    valid = {(a.get("containerID"), a.get("ifname")) for a in conf.valid_attachments}
    try:
        endpoints = agent_call(conf, "EndpointList", {}, wait=0) or []
        for ep in endpoints:
            key = (ep.get("container_id"), ep.get("ifname"))
            if ep.get("container_id") and key not in valid:
                agent_call(conf, "EndpointDel", {"container_id": key[0], "ifname": key[1]},
                           wait=0)
                log.write("info", f"GC deleted endpoint {ep.get('ip')} of {key[0]}/{key[1]}")
    except (AgentUnreachable, RemoteError, OSError, WireError) as exc:
        # GC is housekeeping: the next one catches up
        log.write("warning", f"GC incomplete, agent at {conf.agent_socket}: {exc}")


def cmd_version(data: bytes) -> dict:
    asked = ""
    try:
        raw = loads(data) if data.strip() else {}
        asked = raw.get("cniVersion", "") if isinstance(raw, dict) else ""
    except ValueError:
        pass
    version = asked if asked in SUPPORTED_VERSIONS else "1.0.0"
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


HANDLERS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status,
            "GC": cmd_gc}

# wall-clock (launcher's first line, main() entered), for the timing log line
START = [0.0, 0.0]


def _error_json(exc: CniError, version: str) -> str:
    out = {"cniVersion": version, "code": exc.code, "msg": exc.msg}
    if exc.details:
        out["details"] = exc.details
    return dumps(out)


def run(environ, data: bytes, log: Log | None = None) -> tuple[int, str]:
    """One plugin invocation: (exit status, text for stdout)."""
    log = log or Log()
    version = "1.0.0"
    try:
        if len(data) > MAX_STDIN:
            raise CniError(E_DECODE, f"the network configuration on stdin is larger than "
                           f"{MAX_STDIN} bytes")
        env = parse_env(environ)
        if env.command == "VERSION":
            return 0, dumps(cmd_version(data))
        conf = parse_config(data, env.command)
        version = conf.cni_version
        log.configure(conf, env)
        result = HANDLERS[env.command](conf, env, log)
        return 0, (dumps(result) if result is not None else "")
    except CniError as exc:
        log.write("error", f"code {exc.code}: {exc.msg}")
        return 1, _error_json(exc, version)
    except Exception as exc:  # never leave the runtime without an answer
        log.write("error", f"unexpected {type(exc).__name__}: {exc}")
        return 1, _error_json(CniError(E_AGENT, f"{PLUGIN} failed unexpectedly: "
                                       f"{type(exc).__name__}: {exc}"), version)


def main(t_launch: float | None = None) -> None:
    """Entry point; exits the process. `t_launch` is when the launcher's
    first line ran (before this module was loaded), for the timing log."""
    START[1] = time.time()
    START[0] = t_launch or START[1]
    data = sys.stdin.buffer.read(MAX_STDIN + 1)
    log = Log()
    code, out = run(os.environ, data, log)
    if out:
        sys.stdout.write(out + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written (the log unbuffered); skipping the interpreter's
    # teardown saves the runtime a few milliseconds per pod.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
