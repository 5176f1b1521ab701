#!/usr/bin/env python3
"""A hostile client of velo-mountd for tests/security.rs.

It speaks the wire protocol (mount-helper/src/protocol.rs) by hand: NUL-terminated JSON
messages, raw payloads after `import`, and mount fds arriving with SCM_RIGHTS. It is run as an
ordinary user (through setpriv) and does what a malicious user could do, then prints what
happened as one JSON document per line on stdout for the Rust test to assert on.

    raw_client.py --socket S ask [--no-hello] [--retry-busy SECS] MSG...
    raw_client.py --socket S raw [--no-hello] [--fill N] [--shut-wr] [DATA]
    raw_client.py --socket S import --image F [--digest HEX] [--size N] [--name REF]
                                    [--objects DIR] [--cut-image N] [--cut-object N]
                                    [--profile F]
    raw_client.py --socket S mount NAME --writes W --target DIR [--read REL]... [--write REL]
                                    [--clear-nosuid] [--run JSON]... [--hold]
    raw_client.py --socket S host-attach NAME --writes W --target DIR [--hold]
    raw_client.py --socket S flood
    raw_client.py --socket S replay FILE
    raw_client.py verity FILE

A MSG or DATA is JSON text, or `hex:…` for arbitrary bytes. `--hold` prints the result, then
waits until stdin closes (the test looks at the host meanwhile).
"""

import argparse
import ctypes
import errno
import hashlib
import json
import os
import select
import socket
import stat
import struct
import subprocess
import sys
import time

VERSION = 1
MAX_MESSAGE = 64 << 10

# x86-64 syscall numbers and flags of the new mount API.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 16384
MS_SLAVE = 1 << 19

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def out(doc):
    print(json.dumps(doc), flush=True)


def errname(e):
    return errno.errorcode.get(e, str(e))


def sys_result(r):
    """None on success, else the errno's name."""
    if r < 0:
        return errname(ctypes.get_errno())
    return None


def verity_digest(data):
    """The fs-verity digest (sha256, 4 KiB blocks, no salt) of `data`, as velo names files."""
    block = 4096
    if not data:
        root = bytes(32)
    else:
        level = data
        while True:
            hashes = b"".join(
                hashlib.sha256(level[i : i + block].ljust(block, b"\0")).digest()
                for i in range(0, len(level), block)
            )
            if len(hashes) == 32:
                root = hashes
                break
            level = hashes
    desc = struct.pack("<BBBBIQ", 1, 1, 12, 0, 0, len(data))
    desc += root.ljust(64, b"\0") + bytes(32) + bytes(144)
    assert len(desc) == 256
    return hashlib.sha256(desc).hexdigest()


def message_bytes(text):
    if text.startswith("hex:"):
        return bytes.fromhex(text[4:])
    return text.encode()


class Conn:
    """One connection: messages split at NULs, fds kept as they arrive."""

    def __init__(self, path, timeout=20.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.fds = []
        self.eof = False
        self.reset = False

    def send(self, data):
        self.sock.sendall(data)

    def send_msg(self, obj):
        self.send(json.dumps(obj).encode() + b"\0")

    def fill(self):
        fds = []
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 16))
        except ConnectionResetError:
            # The service closed with bytes of ours unread (it stopped listening to us).
            self.reset = True
            data, anc = b"", []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = len(payload) // 4
                fds.extend(struct.unpack(f"{n}i", payload[: n * 4]))
        self.fds.extend(fds)
        if not data:
            self.eof = True
        self.buf += data
        return len(data)

    def read_message(self):
        """The next message, parsed if it is JSON (else its hex), or None at the end."""
        while b"\0" not in self.buf:
            if self.eof or self.fill() == 0:
                return None
        raw, self.buf = self.buf.split(b"\0", 1)
        try:
            return json.loads(raw)
        except ValueError:
            return {"unparsable": raw.hex()}

    def read_exact(self, n):
        while len(self.buf) < n:
            if self.eof or self.fill() == 0:
                raise EOFError(f"closed after {len(self.buf)} of {n} bytes")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def hello(self):
        try:
            self.send_msg({"hello": {"version": VERSION}})
        except OSError:
            pass  # refused at once (busy): the answer is already there to read
        return self.read_message()

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()


def kind(resp):
    if isinstance(resp, dict) and "error" in resp:
        return resp["error"].get("kind")
    return None


def connect_hello(path, retry_busy=0.0):
    """A connection that said hello, retrying while the service says busy (connections
    of this user that just closed may not be counted out yet)."""
    deadline = time.monotonic() + retry_busy
    while True:
        conn = Conn(path)
        hello = conn.hello()
        if kind(hello) == "busy" and time.monotonic() < deadline:
            conn.close()
            time.sleep(0.05)
            continue
        return conn, hello


# --- subcommands --------------------------------------------------------------------------


def cmd_ask(a):
    if a.no_hello:
        conn, hello = Conn(a.socket), None
    else:
        conn, hello = connect_hello(a.socket, a.retry_busy)
    responses = []
    closed = False
    if hello is None or kind(hello) is None:
        for m in a.messages:
            try:
                conn.send(message_bytes(m) + b"\0")
            except OSError as e:
                responses.append({"send_error": errname(e.errno)})
                closed = True
                break
            r = conn.read_message()
            if r is None:
                closed = True
                break
            responses.append(r)
    fds = len(conn.fds)
    conn.close()
    out({"hello": hello, "responses": responses, "closed": closed, "fds": fds})


def cmd_raw(a):
    conn = Conn(a.socket)
    hello = None if a.no_hello else conn.hello()
    send_error = None
    try:
        if a.data is not None:
            conn.send(message_bytes(a.data))
        if a.fill:
            conn.send(b"x" * a.fill)
        if a.shut_wr:
            conn.sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        send_error = errname(e.errno)
    responses = []
    timed_out = False
    try:
        while True:
            r = conn.read_message()
            if r is None:
                break
            responses.append(r)
    except socket.timeout:
        timed_out = True
    except OSError as e:
        responses.append({"recv_error": errname(e.errno)})
    conn.close()
    out(
        {
            "hello": hello,
            "responses": responses,
            "eof": conn.eof,
            "timed_out": timed_out,
            "send_error": send_error,
        }
    )


def cmd_import(a):
    image = open(a.image, "rb").read()
    digest = a.digest or verity_digest(image)
    size = len(image) if a.size is None else a.size
    result = {"claimed": digest, "actual": verity_digest(image), "responses": []}
    conn, hello = connect_hello(a.socket, 5.0)
    result["hello"] = hello
    req = {"import": {"name": a.name, "image": digest, "size": size}}
    profile = None
    if a.profile is not None:
        profile = open(a.profile, "rb").read()
        req["import"]["profile"] = len(profile)
    conn.send_msg(req)
    body = image if a.cut_image is None else image[: a.cut_image]
    if profile is not None and a.cut_image is None:
        body += profile
    try:
        conn.send(body)
        if a.cut_image is not None:
            conn.sock.shutdown(socket.SHUT_WR)
            result["cut"] = "image"
        first = conn.read_message()
        result["responses"].append(first)
        if isinstance(first, dict) and "need" in first:
            count = first["need"]["count"]
            digests = conn.read_exact(32 * count)
            need = [digests[i : i + 32].hex() for i in range(0, len(digests), 32)]
            result["need"] = need
            if a.objects is None:
                conn.sock.shutdown(socket.SHUT_WR)
                result["cut"] = "before-objects"
            else:
                for i, d in enumerate(need):
                    data = open(os.path.join(a.objects, d), "rb").read()
                    if a.cut_object is not None and i == 0:
                        conn.send(data[: a.cut_object])
                        conn.sock.shutdown(socket.SHUT_WR)
                        result["cut"] = "object"
                        break
                    conn.send(data)
            r = conn.read_message()
            result["responses"].append(r)
    except OSError as e:
        result["error"] = errname(e.errno)
    except EOFError as e:
        result["error"] = str(e)
    result["fds"] = len(conn.fds)
    conn.close()
    out(result)


def mountinfo_of(path):
    """(mount options, super options, source) of the topmost mount at `path`, or None."""
    found = None
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4].replace("\\040", " ") == real:
                found = {
                    "options": fields[5].split(","),
                    "fstype": fields[sep + 1],
                    "source": fields[sep + 2],
                }
    return found


def listing(root):
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames) + sorted(filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                t = "dir"
            elif stat.S_ISREG(st.st_mode):
                t = "file"
            elif stat.S_ISLNK(st.st_mode):
                t = "symlink"
            elif stat.S_ISCHR(st.st_mode):
                t = "char"
            elif stat.S_ISBLK(st.st_mode):
                t = "block"
            elif stat.S_ISFIFO(st.st_mode):
                t = "fifo"
            else:
                t = "other"
            entries.append(
                {
                    "path": os.path.relpath(p, root),
                    "type": t,
                    "mode": stat.S_IMODE(st.st_mode),
                    "uid": st.st_uid,
                    "gid": st.st_gid,
                    "rdev": st.st_rdev,
                    "xattrs": sorted(os.listxattr(p, follow_symlinks=False)),
                }
            )
    return entries


def parse_writes(w):
    if w.startswith("persist:"):
        return {"persist": w[len("persist:") :]}
    return w


def hold(result):
    out(result)
    sys.stdin.read()


def enter_own_namespace():
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1\n")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1\n")
    if libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None) != 0:
        raise OSError(ctypes.get_errno(), "make / a slave")


def move_mount(fd, target):
    return sys_result(
        libc.syscall(
            SYS_MOVE_MOUNT,
            ctypes.c_int(fd),
            b"",
            ctypes.c_int(AT_FDCWD),
            os.fsencode(target),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        )
    )


def mount_setattr(dirfd, path, flags, clear):
    attr = MountAttr(0, clear, 0, 0)
    return sys_result(
        libc.syscall(
            SYS_MOUNT_SETATTR,
            ctypes.c_int(dirfd),
            os.fsencode(path),
            ctypes.c_uint(flags),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
    )


def get_mount(a):
    conn, hello = connect_hello(a.socket, 5.0)
    conn.send_msg({"mount": {"name": a.name, "writes": parse_writes(a.writes)}})
    resp = conn.read_message()
    fd = conn.fds.pop(0) if conn.fds else None
    return conn, hello, resp, fd


def cmd_mount(a):
    conn, hello, resp, fd = get_mount(a)
    result = {"hello": hello, "response": resp, "fd": fd is not None}
    if fd is None:
        conn.close()
        out(result)
        return
    os.makedirs(a.target, exist_ok=True)
    enter_own_namespace()
    result["attach"] = move_mount(fd, a.target)
    os.close(fd)
    result["mountinfo"] = mountinfo_of(a.target)
    result["listing"] = listing(a.target)
    result["read"] = {}
    for rel in a.read:
        try:
            with open(os.path.join(a.target, rel), "rb") as f:
                result["read"][rel] = f.read().decode(errors="replace")
        except OSError as e:
            result["read"][rel] = {"error": errname(e.errno)}
    for rel in a.write:
        try:
            with open(os.path.join(a.target, rel), "w") as f:
                f.write(f"written by uid {os.getuid()}\n")
            result.setdefault("written", []).append(rel)
        except OSError as e:
            result.setdefault("write_errors", {})[rel] = errname(e.errno)
    if a.clear_nosuid:
        result["setattr"] = mount_setattr(
            AT_FDCWD, a.target, AT_RECURSIVE, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
        )
        result["mountinfo_after_setattr"] = mountinfo_of(a.target)
    for rel in a.mknod:
        try:
            os.mknod(os.path.join(a.target, rel), stat.S_IFCHR | 0o666, os.makedev(1, 3))
            result.setdefault("mknod", {})[rel] = None
        except OSError as e:
            result.setdefault("mknod", {})[rel] = errname(e.errno)
    result["runs"] = []
    for spec in a.run:
        argv = json.loads(spec)
        argv[0] = os.path.join(a.target, argv[0])
        try:
            p = subprocess.run(argv, capture_output=True, timeout=60)
            result["runs"].append(
                {"argv": argv, "status": p.returncode, "stdout": p.stdout.decode(errors="replace")}
            )
        except OSError as e:
            result["runs"].append({"argv": argv, "error": errname(e.errno)})
    if a.hold:
        hold(result)
    else:
        out(result)
    conn.send_msg("done")
    conn.close()


def cmd_host_attach(a):
    conn, hello, resp, fd = get_mount(a)
    result = {"hello": hello, "response": resp, "fd": fd is not None}
    if fd is not None:
        os.makedirs(a.target, exist_ok=True)
        # Without a namespace of its own: into the host's mount table.
        result["move_mount"] = move_mount(fd, a.target)
        # The detached mount's flags, from the host namespace.
        result["setattr_detached"] = mount_setattr(
            fd, "", AT_EMPTY_PATH | AT_RECURSIVE, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
        )
        # A detached copy of a host path (what a mount fd would be attached next to).
        r = libc.syscall(
            SYS_OPEN_TREE,
            ctypes.c_int(AT_FDCWD),
            os.fsencode(a.target),
            ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
        )
        result["open_tree_clone"] = sys_result(r)
        if r >= 0:
            os.close(r)
        result["target_entries"] = sorted(os.listdir(a.target))
        result["mountinfo"] = mountinfo_of(a.target)
    if a.hold:
        hold(result)
    else:
        out(result)
    if fd is not None:
        os.close(fd)
    conn.close()


def cmd_flood(a):
    """Holds a user's whole allowance of connections in the ways a hostile client can (a
    message stalled half-way, one trickled a byte a second, one idle after hello, one with
    60 KB of a message that never ends), checks that one more is refused as busy, and
    reports each second until stdin closes."""
    conns = []
    stalled, hello = connect_hello(a.socket, 10.0)
    stalled.send(b'{"resolve":{"name":"sta')
    conns.append(("stalled", stalled))
    trickle, _ = connect_hello(a.socket, 10.0)
    conns.append(("trickle", trickle))
    idle, _ = connect_hello(a.socket, 10.0)
    conns.append(("idle", idle))
    nearly_full, _ = connect_hello(a.socket, 10.0)
    nearly_full.send(b'{"resolve":{"name":"' + b"f" * 60000)
    conns.append(("nearly-full", nearly_full))
    extra = Conn(a.socket)
    busy = extra.read_message()
    extra.close()
    out({"ready": True, "hello": hello, "extra": busy})
    message = b'{"resolve":{"name":"' + b"t" * 4000 + b'"}}\0'
    sent = 0
    answered = []
    while True:
        socks = [c.sock for _, c in conns]
        r, _, _ = select.select([sys.stdin] + socks, [], [], 1.0)
        if sys.stdin in r:
            if not sys.stdin.read(1):
                break
        for name, c in conns:
            if c.sock in r:
                data = c.sock.recv(1 << 16)
                answered.append({"conn": name, "bytes": data.decode(errors="replace")})
                conns = [(n, x) for n, x in conns if x is not c]
                c.close()
                out({"answered": name, "bytes": data.decode(errors="replace")})
        if any(n == "trickle" for n, _ in conns) and sent < len(message):
            trickle.send(message[sent : sent + 1])
            sent += 1
            out({"sent": sent})
    for _, c in conns:
        c.close()
    out({"done": True, "sent": sent, "answered": answered})


def cmd_replay(a):
    """Each case on a fresh connection: optional hello, the bytes and a NUL, then the write
    side closed so the service never waits on us; every answer until it closes."""
    cases = json.load(open(a.file))
    results = []
    for case in cases:
        conn = Conn(a.socket, timeout=20.0)
        res = {"responses": [], "fds": 0}
        try:
            if case["hello"]:
                res["hello"] = conn.hello()
            conn.send(bytes.fromhex(case["hex"]) + b"\0")
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            res["send_error"] = errname(e.errno)
        try:
            while True:
                r = conn.read_message()
                if r is None:
                    break
                res["responses"].append(r)
                if isinstance(r, dict) and "need" in r:
                    # Raw digests follow (never sent here: nothing hashes right).
                    conn.read_exact(32 * int(r["need"]["count"]))
            res["trailing"] = len(conn.buf)
        except socket.timeout:
            res["timed_out"] = True
        except EOFError as e:
            res["recv_error"] = str(e)
        except OSError as e:
            res["recv_error"] = errname(e.errno)
        res["fds"] = len(conn.fds)
        conn.close()
        results.append(res)
    out({"results": results})


def cmd_verity(a):
    out({"digest": verity_digest(open(a.file, "rb").read())})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--socket")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("ask")
    s.add_argument("--no-hello", action="store_true")
    s.add_argument("--retry-busy", type=float, default=5.0)
    s.add_argument("messages", nargs="*")
    s.set_defaults(func=cmd_ask)

    s = sub.add_parser("raw")
    s.add_argument("--no-hello", action="store_true")
    s.add_argument("--fill", type=int, default=0)
    s.add_argument("--shut-wr", action="store_true")
    s.add_argument("data", nargs="?")
    s.set_defaults(func=cmd_raw)

    s = sub.add_parser("import")
    s.add_argument("--image", required=True)
    s.add_argument("--digest")
    s.add_argument("--size", type=int)
    s.add_argument("--name")
    s.add_argument("--objects")
    s.add_argument("--cut-image", type=int)
    s.add_argument("--cut-object", type=int)
    s.add_argument("--profile")
    s.set_defaults(func=cmd_import)

    for name, func in (("mount", cmd_mount), ("host-attach", cmd_host_attach)):
        s = sub.add_parser(name)
        s.add_argument("name")
        s.add_argument("--writes", default="read-only")
        s.add_argument("--target", required=True)
        s.add_argument("--read", action="append", default=[])
        s.add_argument("--write", action="append", default=[])
        s.add_argument("--clear-nosuid", action="store_true")
        s.add_argument("--mknod", action="append", default=[])
        s.add_argument("--run", action="append", default=[])
        s.add_argument("--hold", action="store_true")
        s.set_defaults(func=func)

    s = sub.add_parser("flood")
    s.set_defaults(func=cmd_flood)

    s = sub.add_parser("replay")
    s.add_argument("file")
    s.set_defaults(func=cmd_replay)

    s = sub.add_parser("verity")
    s.add_argument("file")
    s.set_defaults(func=cmd_verity)

    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
