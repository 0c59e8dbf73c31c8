"""swapd.handoff: snapshot format, codecs, fd objects, SharedBuffer and pre-copy."""

from __future__ import annotations

import ctypes
import fcntl
import gc
import json
import mmap
import os
import pickle
import socket
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swapd.handoff import (
    CHECKSUM_BUFFERS_LIMIT,
    ChecksumMismatch,
    CorruptSnapshot,
    DecodeError,
    EncodeError,
    Envelope,
    FdMismatch,
    FormatRefused,
    MalformedEnvelope,
    PrecopyError,
    Restored,
    SharedBuffer,
    SimpleCodec,
    Snapshot,
    SnapshotError,
    TrackedDict,
    Truncated,
    UnknownCodec,
    VersionRefused,
    available_codecs,
    dump,
    load,
    read_envelope,
    register_codec,
)
from swapd.handoff import codecs as _handoff_codecs
from swapd.handoff import memfd as _handoff_memfd
from swapd.handoff.envelope import HEADER, HEADER_SIZE, MAGIC

DEADLINE = 10.0  # seconds, for every wait on another process or socket


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Every test here must leave the process with exactly the fds it found."""
    before = open_fds()
    yield
    gc.collect()
    # listdir's own directory fd appears in both snapshots; compare the rest.
    assert open_fds() == before


def transfer(snap: Snapshot) -> tuple[dict[str, Any], int, list[int]]:
    """What SCM_RIGHTS does: the receiver gets its own fds; the sender closes its snapshot."""
    env = json.loads(json.dumps(snap.envelope.to_dict()))
    fds = [os.dup(fd) for fd in snap.send_fds]
    snap.close()
    return env, fds[0], fds[1:]


def roundtrip(state: Any, **kw: Any) -> Restored:
    codec = kw.pop("codec", "pickle5")
    env, fd, fds = transfer(dump(state, app_version=kw.pop("app_version", 1), codec=codec, **kw))
    return load(env, fd, fds)


def records(n: int) -> dict[str, dict[str, Any]]:
    return {
        f"player:{i:08d}": {"id": i, "name": f"n{i}", "level": i % 100, "alive": True,
                            "x": i * 0.5, "inv": [i, "sword"]}
        for i in range(n)
    }


def memfd_bytes(fd: int) -> bytearray:
    return bytearray(os.pread(fd, os.fstat(fd).st_size, 0))


def sealed_memfd(data: bytes, seals: int = _handoff_memfd.SEALS_IMMUTABLE) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    _handoff_memfd.pwrite_all(fd, data, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


@dataclass
class Player:  # a class instance in the state (module-level so pickle can name it)
    name: str
    hp: int


# -- round trips ---------------------------------------------------------------------------

SHAPES: dict[str, Any] = {
    "records": records(500),
    "nested": {"a": [1, 2.5, None, True, ("t", b"b")], "b": {"c": {"d": [{}, [], ""]}},
               "big": 2**100, "neg": -7, "f": frozenset({1, 2}), "s": {3}},
    "bytes": {"small": b"x" * 10, "large": os.urandom(300_000)},
    "bytearray": {"small": bytearray(b"y" * 10), "large": bytearray(os.urandom(300_000))},
    "empty": {},
    "scalar": 42,
}


@pytest.mark.parametrize("codec", ["pickle5", "marshal"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_roundtrip_plain_data(codec: str, shape: str) -> None:
    restored = roundtrip(SHAPES[shape], codec=codec, app_version=7)
    assert restored.state == SHAPES[shape]
    assert restored.app_version == 7
    assert restored.envelope.codec == codec
    assert restored.envelope.buffers == 0  # bytes/bytearray travel in-band


def test_pickle5_keeps_identity_cycles_and_instances() -> None:
    shared = {"k": 1}
    cyclic: list[Any] = [shared]
    cyclic.append(cyclic)
    state = {"a": shared, "b": shared, "cyc": cyclic, "p": Player("ann", 3)}
    out = roundtrip(state).state
    assert out["a"] is out["b"]
    assert out["cyc"][1] is out["cyc"] and out["cyc"][0] is out["a"]
    assert out["p"] == Player("ann", 3)


def test_large_memoryviews_travel_out_of_band_and_zero_copy() -> None:
    writable = bytearray(os.urandom(200_000))
    readonly = os.urandom(150_000)
    matrix = memoryview(bytearray(8 * 300 * 100)).cast("d", (300, 100))
    matrix[3, 4] = 2.5
    state = {"w": memoryview(writable), "r": memoryview(readonly), "m": matrix}
    restored = roundtrip(state)
    out = restored.state
    assert restored.envelope.buffers == 3
    assert [b.offset % mmap.PAGESIZE for b in restored.buffers] == [0, 0, 0]
    assert bytes(out["w"]) == bytes(writable) and not out["w"].readonly
    assert bytes(out["r"]) == readonly and out["r"].readonly
    assert (out["m"].format, out["m"].shape, out["m"][3, 4]) == ("d", (300, 100), 2.5)
    # Zero copy: the views are over the receiver's mapping, not over fresh Python objects...
    assert isinstance(out["w"].obj, mmap.mmap) and isinstance(out["m"].obj, mmap.mmap)
    # ...which is copy-on-write: writing there changes neither the sender nor the memfd.
    out["w"][0] = writable[0] ^ 0xFF
    assert out["w"][0] != writable[0]


def test_small_noncontiguous_and_odd_memoryviews() -> None:
    state = {
        "small": memoryview(bytearray(b"abc")),
        "strided": memoryview(bytearray(range(200)))[::3],
        "scalar": memoryview(bytearray(4)).cast("i", ()),
        "empty": memoryview(b"").cast("d"),
    }
    out = roundtrip(state).state
    assert out["small"].tolist() == [97, 98, 99] and not out["small"].readonly
    assert out["strided"].tolist() == list(range(0, 200, 3))
    assert out["scalar"].shape == () and out["scalar"][()] == 0
    assert out["empty"].format == "d" and out["empty"].nbytes == 0


def test_dump_and_load_leave_no_reference_cycles() -> None:
    # A cycle holding a PickleBuffer export of a memoryview crashes CPython's GC (it cannot
    # clear a memoryview with exports): none may be left behind, even by a temporary state.
    gc.collect()
    gc.disable()
    try:
        a, b = socket.socketpair()
        with SharedBuffer(4096) as sb:
            state = {"s": memoryview(bytearray(10)), "l": memoryview(bytearray(100_000)),
                     "sock": a, "sb": sb, "r": records(10)}
            restored = roundtrip(state)
            del state, restored
        a.close()
        b.close()
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_pickle_buffers_travel_out_of_band() -> None:
    data = bytearray(os.urandom(100_000))
    restored = roundtrip({"pb": pickle.PickleBuffer(data)})
    assert restored.envelope.buffers == 1
    assert bytes(restored.state["pb"]) == bytes(data)


def test_dump_only_reads_the_state() -> None:
    a, b = socket.socketpair()
    try:
        state = {"r": records(50), "ba": bytearray(b"q" * 100_000), "sock": a}
        expected = pickle.dumps({"r": state["r"], "ba": state["ba"]})
        with dump(state, app_version=1) as snap:
            assert snap.envelope.fds == 1
        assert pickle.dumps({"r": state["r"], "ba": state["ba"]}) == expected
        a.sendall(b"still mine")  # the old worker's socket is intact after the snapshot closed
        assert b.recv(100) == b"still mine"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("algo", ["crc32", "sha256", "blake2b"])
def test_checksum_algorithms(algo: str) -> None:
    restored = roundtrip({"m": memoryview(bytearray(100_000)), "x": 1}, checksum=algo)
    assert restored.envelope.checksum.startswith(f"{algo}:")
    assert restored.state["x"] == 1


def test_checksum_scope_follows_the_buffer_volume() -> None:
    small = {"m": memoryview(bytearray(100_000))}
    large = {"m": memoryview(bytearray(CHECKSUM_BUFFERS_LIMIT + 1))}
    assert roundtrip(small).envelope.checksum_scope == "all"
    assert roundtrip(large).envelope.checksum_scope == "payload"
    assert roundtrip(large, checksum_buffers=True).envelope.checksum_scope == "all"
    assert roundtrip(small, checksum_buffers=False).envelope.checksum_scope == "payload"


def test_memfds_are_sealed_and_self_describing() -> None:
    with dump({"m": memoryview(bytearray(100_000))}, app_version=4) as snap:
        for fd in snap.send_fds[:2]:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & _handoff_memfd.SEALS_IMMUTABLE == _handoff_memfd.SEALS_IMMUTABLE
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"x", 0)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 1)
        assert read_envelope(snap.memfd) == snap.envelope
        _, fd, fds = transfer(snap)
    assert load(None, fd, fds).state["m"].nbytes == 100_000


def test_gc_state_is_restored() -> None:
    assert gc.isenabled()
    roundtrip(records(10))
    assert gc.isenabled()
    gc.disable()
    try:
        roundtrip(records(10))
        assert not gc.isenabled()
    finally:
        gc.enable()


# -- envelope validation --------------------------------------------------------------------


def good_envelope() -> dict[str, Any]:
    with dump({"m": memoryview(bytearray(70_000))}, app_version=2) as snap:
        return snap.envelope.to_dict()


def test_envelope_roundtrip() -> None:
    env = good_envelope()
    assert Envelope.from_dict(env).to_dict() == env
    assert Envelope.from_dict(env).checksum_algo == "crc32"
    assert len(Envelope.from_dict(env).to_json()) < 400


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.pop("codec"), "lacks field(s) codec"),
        (lambda e: e.update(extra=1), "unknown field(s) extra"),
        (lambda e: e.update(format="1"), "'format' must be an int"),
        (lambda e: e.update(app_version=True), "'app_version' must be an int"),
        (lambda e: e.update(size=-1), "'size' must be an int >= 0"),
        (lambda e: e.update(fds=1.0), "'fds' must be an int"),
        (lambda e: e.update(codec="no spaces"), "not a valid codec name"),
        (lambda e: e.update(codec=5), "'codec' must be a string"),
        (lambda e: e.update(checksum="crc32"), "not '<algo>:<hex>'"),
        (lambda e: e.update(checksum="crc32:XYZ"), "not '<algo>:<hex>'"),
        (lambda e: e.update(checksum_scope="some"), "checksum_scope 'some' is unknown"),
        (lambda e: e.update(size=e["size"] + 1), "!= layout size"),
        (lambda e: e.update(buffers_size=0), "buffer(s) in a 0-byte buffers memfd"),
        (lambda e: e.update(fds=0), "no fd for the buffers memfd"),
    ],
)
def test_envelope_validation(change: Any, message: str) -> None:
    env = good_envelope()
    change(env)
    with pytest.raises(MalformedEnvelope, match=message.replace("(", r"\(").replace(")", r"\)")):
        Envelope.from_dict(env)


def test_every_error_is_a_snapshot_error() -> None:
    errors = [ChecksumMismatch, CorruptSnapshot, DecodeError, EncodeError, FdMismatch,
              FormatRefused, MalformedEnvelope, PrecopyError, Truncated, UnknownCodec,
              VersionRefused]
    assert all(issubclass(e, SnapshotError) for e in errors)  # one except clause aborts


def test_envelope_not_a_mapping() -> None:
    with pytest.raises(MalformedEnvelope, match="must be a mapping, not list"):
        Envelope.from_dict([1])


def test_unknown_format_is_refused_before_anything_else() -> None:
    with pytest.raises(FormatRefused, match="snapshot format 2 not supported"):
        Envelope.from_dict({"format": 2, "whatever": "else"})


# -- refusing bad snapshots (and never leaking an fd) ---------------------------------------


@pytest.fixture
def snap() -> Iterator[Snapshot]:
    a, b = socket.socketpair()
    state = {"r": records(20), "m": memoryview(bytearray(os.urandom(100_000))), "sock": a}
    snapshot = dump(state, app_version=5)
    a.close()
    b.close()
    yield snapshot
    snapshot.close()


def resend(snap: Snapshot, memfd: int | None = None) -> list[int]:
    """The fds a receiver gets, optionally with a doctored snapshot memfd."""
    return [os.dup(snap.memfd) if memfd is None else memfd, *(os.dup(fd) for fd in snap.fds)]


def test_load_refuses_unknown_format_version(snap: Snapshot) -> None:
    env = snap.envelope.to_dict() | {"format": 99}
    fds = resend(snap)
    with pytest.raises(FormatRefused, match="format 99"):
        load(env, fds[0], fds[1:])


def test_load_refuses_unknown_format_in_the_header(snap: Snapshot) -> None:
    data = memfd_bytes(snap.memfd)
    HEADER.pack_into(data, 0, MAGIC, 2, 0)
    fds = resend(snap, sealed_memfd(data))
    with pytest.raises(FormatRefused, match="format 2"):
        load(None, fds[0], fds[1:])


def test_load_refuses_app_version(snap: Snapshot) -> None:
    fds = resend(snap)
    with pytest.raises(VersionRefused, match="version 5 is not accepted"):
        load(snap.envelope.to_dict(), fds[0], fds[1:], accept_versions=range(1, 5))
    fds = resend(snap)
    load(snap.envelope.to_dict(), fds[0], fds[1:], accept_versions={5}).state["sock"].close()


def test_load_refuses_corrupted_payload(snap: Snapshot) -> None:
    data = memfd_bytes(snap.memfd)
    data[HEADER_SIZE + 100] ^= 0x01
    fds = resend(snap, sealed_memfd(data))
    with pytest.raises(ChecksumMismatch, match="scope: all"):
        load(snap.envelope.to_dict(), fds[0], fds[1:])


def test_load_refuses_corrupted_buffer(snap: Snapshot) -> None:
    data = memfd_bytes(snap.fds[0])
    data[5000] ^= 0x01
    fds = resend(snap)
    os.close(fds[1])
    fds[1] = sealed_memfd(data)
    with pytest.raises(ChecksumMismatch):
        load(snap.envelope.to_dict(), fds[0], fds[1:])


@pytest.mark.parametrize("cut", [1, 3000, 10_000])
def test_load_refuses_truncated_memfd(snap: Snapshot, cut: int) -> None:
    data = memfd_bytes(snap.memfd)
    fds = resend(snap, sealed_memfd(data[:-cut]))
    with pytest.raises(Truncated, match="bytes"):
        load(snap.envelope.to_dict(), fds[0], fds[1:])


def test_load_refuses_truncated_buffers_memfd(snap: Snapshot) -> None:
    fds = resend(snap)
    data = memfd_bytes(fds[1])
    os.close(fds[1])
    fds[1] = sealed_memfd(data[:-1])
    with pytest.raises(Truncated, match="buffers memfd"):
        load(snap.envelope.to_dict(), fds[0], fds[1:])


def test_load_refuses_unsealed_memfd(snap: Snapshot) -> None:
    fds = resend(snap, sealed_memfd(memfd_bytes(snap.memfd), seals=0))
    with pytest.raises(CorruptSnapshot, match="not sealed"):
        load(snap.envelope.to_dict(), fds[0], fds[1:])


def test_load_refuses_a_file_that_is_not_a_memfd(snap: Snapshot, tmp_path: Any) -> None:
    path = tmp_path / "snap"
    path.write_bytes(memfd_bytes(snap.memfd))
    fds = resend(snap, os.open(path, os.O_RDONLY))
    with pytest.raises(CorruptSnapshot, match="is not a memfd"):
        load(snap.envelope.to_dict(), fds[0], fds[1:])


def test_load_refuses_envelope_that_differs_from_header(snap: Snapshot) -> None:
    env = snap.envelope.to_dict() | {"app_version": 6}
    fds = resend(snap)
    with pytest.raises(CorruptSnapshot, match="differs"):
        load(env, fds[0], fds[1:])


def test_load_refuses_memfd_without_magic(snap: Snapshot) -> None:
    data = memfd_bytes(snap.memfd)
    data[:8] = b"NOTSWAPD"
    fds = resend(snap, sealed_memfd(data))
    with pytest.raises(CorruptSnapshot, match="magic"):
        load(None, fds[0], fds[1:])


def test_load_refuses_missing_or_extra_fds(snap: Snapshot) -> None:
    fds = resend(snap)
    with pytest.raises(FdMismatch, match="came with 1 fd"):
        load(snap.envelope.to_dict(), fds[0], fds[1:2])
    os.close(fds[2])
    fds = resend(snap)
    extra = os.dup(fds[2])
    with pytest.raises(FdMismatch, match="came with 3 fd"):
        load(snap.envelope.to_dict(), fds[0], [*fds[1:], extra])


def test_load_refuses_wrong_kind_of_fd(snap: Snapshot) -> None:
    fds = resend(snap)
    os.close(fds[2])
    fds[2] = os.open("/dev/null", os.O_RDONLY)  # where the socket should be
    with pytest.raises(FdMismatch, match="not a socket"):
        load(snap.envelope.to_dict(), fds[0], fds[1:])


def test_load_refuses_socket_of_the_wrong_type(snap: Snapshot) -> None:
    fds = resend(snap)
    os.close(fds[2])
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fds[2] = udp.detach()
    with pytest.raises(FdMismatch, match="AF_INET/SOCK_DGRAM socket, expected AF_UNIX"):
        load(snap.envelope.to_dict(), fds[0], fds[1:])


def test_load_refuses_unknown_codec() -> None:
    register_codec(SimpleCodec("test-json", lambda o: json.dumps(o).encode(), json.loads))
    try:
        env, fd, fds = transfer(dump({"a": 1}, app_version=1, codec="test-json"))
    finally:
        del _handoff_codecs._CODECS["test-json"]  # the receiver does not have it
    with pytest.raises(UnknownCodec, match="unknown codec 'test-json'"):
        load(env, fd, fds)


def test_load_reports_undecodable_state(monkeypatch: pytest.MonkeyPatch) -> None:
    env, fd, fds = transfer(dump({"p": Player("bob", 1)}, app_version=1))
    monkeypatch.delattr(sys.modules[__name__], "Player")  # the new code lost the class
    with pytest.raises(DecodeError, match="AttributeError"):
        load(env, fd, fds)
    assert gc.isenabled()


def test_failed_decode_releases_sockets_and_shared_buffers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = socket.socketpair()
    with SharedBuffer(4096) as sb:
        state = {"sock": a, "sb": sb, "m": memoryview(bytearray(100_000)),
                 "z": Player("late", 0)}  # decoded after the fd objects and the buffer
        env, fd, fds = transfer(dump(state, app_version=1))
    a.close()
    monkeypatch.delattr(sys.modules[__name__], "Player")
    with pytest.raises(DecodeError):
        load(env, fd, fds)
    b.close()
    # no_fd_leak checks that the socket, the shared buffer and both mappings were released


# -- encode errors ------------------------------------------------------------------------------


def test_dump_refuses_what_it_cannot_encode() -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(EncodeError, match="pickle5 cannot encode the state"):
            dump({"sock": a, "f": lambda: 1}, app_version=1)  # the socket's dup is closed too
        with pytest.raises(EncodeError, match="marshal cannot encode"):
            dump({"sock": a}, app_version=1, codec="marshal")
        with pytest.raises(EncodeError, match="closed socket"):
            closed = socket.socket()
            closed.close()
            dump([closed], app_version=1)
        with pytest.raises(EncodeError, match="format '<i' cannot be restored"):
            dump(memoryview((ctypes.c_int32 * 4)()), app_version=1)
    finally:
        a.close()
        b.close()


class TLSish(socket.socket):
    pass


def test_dump_refuses_ssl_and_socket_subclasses() -> None:
    raw = socket.socket()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls = ctx.wrap_socket(raw, server_hostname="example.org", do_handshake_on_connect=False)
    sub = TLSish()
    try:
        with pytest.raises(EncodeError, match=r"SSLSocket: only socket\.socket"):
            dump([tls], app_version=1)
        with pytest.raises(EncodeError, match=r"TLSish: only socket\.socket"):
            dump([sub], app_version=1)
    finally:
        tls.close()
        sub.close()


def test_dump_argument_errors() -> None:
    with pytest.raises(UnknownCodec):
        dump({}, app_version=1, codec="nope")
    with pytest.raises(ValueError, match="app_version"):
        dump({}, app_version=-1)
    with pytest.raises(ValueError, match="checksum"):
        dump({}, app_version=1, checksum="md5")


def test_codec_registry() -> None:
    assert {"pickle5", "marshal"} <= set(available_codecs())
    codec = SimpleCodec("test-repr", lambda o: repr(o).encode(), lambda b: eval(bytes(b)))
    register_codec(codec)
    try:
        assert roundtrip({"a": [1, 2]}, codec="test-repr").state == {"a": [1, 2]}
        with pytest.raises(ValueError, match="already registered"):
            register_codec(codec)
        register_codec(codec, replace=True)
    finally:
        del _handoff_codecs._CODECS["test-repr"]
    with pytest.raises(ValueError, match="invalid codec name"):
        register_codec(SimpleCodec("bad name", repr, repr))  # type: ignore[arg-type]


# -- sockets ----------------------------------------------------------------------------------


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=DEADLINE)
        server, _ = listener.accept()
    server.settimeout(DEADLINE)
    yield server, client
    server.close()
    client.close()


def is_nonblocking(sock: socket.socket) -> bool:
    return bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)


@pytest.mark.parametrize("timeout", [None, 0.0, 2.5])
def test_socket_travels_as_fd_with_its_mode(
    tcp_pair: tuple[socket.socket, socket.socket], timeout: float | None
) -> None:
    server, client = tcp_pair
    server.settimeout(timeout)
    nonblocking = is_nonblocking(server)
    restored = roundtrip({"conn": server, "again": server})
    conn = restored.state["conn"]
    try:
        assert conn is restored.state["again"]
        assert conn.fileno() != server.fileno()
        assert (conn.family, conn.type, conn.gettimeout()) == (
            socket.AF_INET, socket.SOCK_STREAM, timeout)
        assert is_nonblocking(server) == is_nonblocking(conn) == nonblocking
        conn.sendall(b"from the successor")
        assert client.recv(100) == b"from the successor"
    finally:
        conn.close()
    # Closing the successor's copy (what an abort does) leaves the connection to the old worker.
    server.settimeout(DEADLINE)
    client.sendall(b"ping")
    assert server.recv(100) == b"ping"


def test_udp_and_unix_sockets_travel() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        out = roundtrip([udp, left]).state
        assert out[0].getsockname() == udp.getsockname()
        out[1].send(b"dgram")
        assert right.recv(100) == b"dgram"
        for s in out:
            s.close()
    finally:
        for s in (udp, left, right):
            s.close()


def test_fd_objects_cannot_be_unpickled_outside_load() -> None:
    a, b = socket.socketpair()
    try:
        snap = dump([a], app_version=1)
        payload = memfd_bytes(snap.memfd)[HEADER_SIZE : HEADER_SIZE + snap.envelope.payload_size]
        snap.close()
        with pytest.raises(DecodeError, match=r"only be unpickled by swapd\.handoff\.load"):
            pickle.loads(payload)
    finally:
        a.close()
        b.close()


# -- a real successor: fork + exec, fds over SCM_RIGHTS ----------------------------------------

CHILD = textwrap.dedent(
    """
    import json, socket, sys
    from swapd.handoff import load

    chan = socket.socket(fileno=int(sys.argv[1]))
    chan.settimeout(10)
    msg, fds, _, _ = socket.recv_fds(chan, 4096, 16)
    restored = load(json.loads(msg), fds[0], fds[1:])
    state = restored.state
    conn, sb = state["conn"], state["sb"]
    conn.settimeout(10)
    conn.sendall(b"hello from the new worker")
    ping = conn.recv(100).decode()
    try:
        sb.buf[:5] = b"CHILD"
        refused = None
    except TypeError as e:
        refused = str(e)
    chan.send(json.dumps({"ping": ping, "refused": refused, "sb": bytes(sb.buf[:5]).decode(),
                          "writable": sb.writable, "n": state["n"]}).encode())
    assert json.loads(chan.recv(100)) == "commit"
    restored.commit()
    sb.buf[:5] = b"CHILD"
    chan.send(json.dumps({"writable": sb.writable}).encode())
    """
)


@pytest.mark.parametrize("outcome", ["commit", "abort"])
def test_successor_process_uses_handed_sockets_and_shared_buffer(
    tcp_pair: tuple[socket.socket, socket.socket], outcome: str
) -> None:
    server, client = tcp_pair
    parent_chan, child_chan = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent_chan.settimeout(DEADLINE)
    sb = SharedBuffer(1 << 20)
    sb.buf[:5] = b"hello"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(child_chan.fileno())],
        pass_fds=[child_chan.fileno()], stderr=subprocess.PIPE,
    )
    child_chan.close()
    try:
        with dump({"conn": server, "sb": sb, "n": 42}, app_version=1) as snap:
            socket.send_fds(parent_chan, [snap.envelope.to_json()], snap.send_fds)
        assert client.recv(100) == b"hello from the new worker"
        client.sendall(b"ping")
        report = json.loads(parent_chan.recv(4096))
        assert report == {"ping": "ping", "refused": "cannot modify read-only memory",
                          "sb": "hello", "writable": False, "n": 42}
        assert bytes(sb.buf[:5]) == b"hello"  # before commit the successor cannot write
        if outcome == "commit":
            parent_chan.send(json.dumps("commit").encode())
            assert json.loads(parent_chan.recv(4096)) == {"writable": True}
            assert bytes(sb.buf[:5]) == b"CHILD"  # same pages: zero copy, both ways
            assert proc.wait(timeout=DEADLINE) == 0
        else:
            proc.kill()
            proc.wait(timeout=DEADLINE)
            # The old worker resumes: its connection and buffer are exactly as they were.
            server.sendall(b"resumed")
            assert client.recv(100) == b"resumed"
            sb.buf[:5] = b"again"
            assert bytes(sb.buf[:5]) == b"again"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DEADLINE)
        assert proc.stderr is not None
        proc.stderr.close()
        parent_chan.close()
        sb.close()


# -- SharedBuffer --------------------------------------------------------------------------


def test_shared_buffer_basics() -> None:
    with pytest.raises(ValueError, match="positive int"):
        SharedBuffer(0)
    sb = SharedBuffer(10_000)
    assert (len(sb), sb.size, sb.writable, sb.closed) == (10_000, 10_000, True, False)
    view = sb.buf
    view[:3] = b"abc"
    with pytest.raises(BufferError):
        sb.close()  # a view is alive: same contract as multiprocessing.SharedMemory
    view.release()
    with pytest.raises(PermissionError):
        os.ftruncate(sb._fd, 1)  # size sealed: nobody can SIGBUS a peer's mapping
    with pytest.raises(TypeError, match="only inside a swapd snapshot"):
        pickle.dumps(sb)
    sb.close()
    sb.close()
    assert sb.closed
    with pytest.raises(ValueError, match="closed"):
        sb.buf  # noqa: B018
    with pytest.raises(EncodeError, match="closed SharedBuffer"):
        dump(sb, app_version=1)


def test_shared_buffer_is_read_only_until_commit() -> None:
    sb = SharedBuffer(8192)
    sb.buf[:4] = b"live"
    restored = roundtrip({"sb": sb, "again": sb})
    rx = restored.state["sb"]
    assert rx is restored.state["again"] and restored.shared == (rx,)
    assert not rx.writable and bytes(rx.buf[:4]) == b"live"
    early = rx.buf
    with pytest.raises(TypeError, match="read-only"):
        early[0] = 0  # a restore() that writes fails: the swap aborts, the old buffer is intact
    assert bytes(sb.buf[:4]) == b"live"
    sb.buf[:4] = b"more"
    assert bytes(early[:4]) == b"more"  # shared pages, no copy
    restored.commit()
    assert rx.writable
    rx.buf[:4] = b"new!"
    assert bytes(sb.buf[:4]) == b"new!"
    assert early.readonly and bytes(early[:4]) == b"new!"  # old views stay read-only
    early.release()
    rx.close()
    sb.close()


def test_shared_buffer_refuses_unsealed_or_resized_memfd() -> None:
    with SharedBuffer(4096) as sb:
        env, fd, fds = transfer(dump(sb, app_version=1))
    os.close(fds[0])
    fds[0] = sealed_memfd(b"x" * 4096, seals=0)
    with pytest.raises(CorruptSnapshot, match="not sealed"):
        load(env, fd, fds)
    with SharedBuffer(4096) as sb:
        env, fd, fds = transfer(dump(sb, app_version=1))
    os.close(fds[0])
    fds[0] = sealed_memfd(b"x" * 100, seals=_handoff_memfd.SEALS_FIXED_SIZE)
    with pytest.raises(Truncated, match="shared buffer memfd has 100 bytes"):
        load(env, fd, fds)


# -- TrackedDict -----------------------------------------------------------------------------


def test_tracked_dict_is_a_mapping() -> None:
    td: TrackedDict[str, int] = TrackedDict({"a": 1})
    td["b"] = 2
    td.update({"c": 3}, d=4)
    assert td.setdefault("e", 5) == 5 and td.setdefault("a", 9) == 1
    assert td.pop("e") == 5 and td.pop("zz", None) is None
    with pytest.raises(KeyError):
        td.pop("zz")
    with pytest.raises(KeyError):
        td.touch("zz")
    del td["d"]
    assert td == {"a": 1, "b": 2, "c": 3} and td == TrackedDict({"a": 1, "b": 2, "c": 3})
    assert list(td.items()) == [("a", 1), ("b", 2), ("c", 3)] and td.get("a") == 1
    assert "a" in td and len(td) == 3 and not td.tracking
    assert pickle.loads(pickle.dumps(td)) == td


def test_tracking_records_sets_touches_and_deletions() -> None:
    td: TrackedDict[str, Any] = TrackedDict({"a": {"hp": 1}, "b": 2, "c": 3})
    td["b"] = 20  # before the round: not tracked, the bulk carries it
    with td.begin_precopy(app_version=1) as bulk:
        env, fd, fds = transfer(bulk)
    rx = TrackedDict.from_bulk(load(env, fd, fds))
    td["a"]["hp"] = 0
    td.touch("a")
    del td["c"]
    td["d"] = 4
    td["e"] = 5
    del td["e"]  # created and deleted after the bulk
    assert td.dirty_count == 4
    with td.delta() as delta:
        msg = pickle.loads(  # peek at the wire format
            memfd_bytes(delta.memfd)[HEADER_SIZE : HEADER_SIZE + delta.envelope.payload_size]
        )
        assert msg["set"] == {"a": {"hp": 0}, "d": 4}
        assert sorted(msg["del"]) == ["c", "e"] and msg["seq"] == 1
        env, fd, fds = transfer(delta)
    assert td.dirty_count == 0
    rx.apply_delta(load(env, fd, fds))
    assert rx == td == {"a": {"hp": 0}, "b": 20, "d": 4}


def test_untouched_nested_change_is_not_shipped() -> None:
    td = TrackedDict({"a": {"hp": 1}})
    rx = TrackedDict.from_bulk(roundtrip_part(td.begin_precopy(app_version=1)))
    td["a"]["hp"] = 0  # no touch(): the documented way to lose a change
    rx.apply_delta(roundtrip_part(td.delta()))
    assert rx["a"] == {"hp": 1}


def roundtrip_part(snap: Snapshot) -> Restored:
    env, fd, fds = transfer(snap)
    return load(env, fd, fds)


def test_migrate_runs_on_bulk_and_delta_entries() -> None:
    td = TrackedDict({f"k{i}": {"hp": i} for i in range(5)})
    seen: list[tuple[Any, int]] = []

    def migrate(value: dict[str, int], from_version: int) -> dict[str, int]:
        seen.append((dict(value), from_version))
        return {"health": value["hp"], "v": 2}

    rx = TrackedDict.from_bulk(roundtrip_part(td.begin_precopy(app_version=1)), migrate=migrate)
    assert len(seen) == 5
    td["k0"] = {"hp": 100}
    rx.apply_delta(roundtrip_part(td.delta()))
    assert len(seen) == 6 and seen[-1] == ({"hp": 100}, 1)
    assert rx["k0"] == {"health": 100, "v": 2} and rx["k4"] == {"health": 4, "v": 2}


def test_precopy_refuses_parts_out_of_order() -> None:
    td = TrackedDict({"a": 1})
    bulk = roundtrip_part(td.begin_precopy(app_version=1))
    td["a"] = 2
    first = roundtrip_part(td.delta())
    td["a"] = 3
    second = roundtrip_part(td.delta())
    rx = TrackedDict.from_bulk(bulk)
    with pytest.raises(PrecopyError, match="does not follow"):
        rx.apply_delta(second)
    with pytest.raises(PrecopyError, match="is not a bulk"):
        TrackedDict.from_bulk(first)
    rx.apply_delta(first)
    rx.apply_delta(second)
    assert rx == {"a": 3}
    other_round = roundtrip_part(TrackedDict({"a": 1}).begin_precopy(app_version=1))
    with pytest.raises(PrecopyError, match="does not follow"):
        rx.apply_delta(other_round)
    with pytest.raises(PrecopyError, match="not a swapd pre-copy part"):
        rx.apply_delta(roundtrip({"a": 1}))
    with pytest.raises(PrecopyError, match="without a loaded bulk"):
        TrackedDict().apply_delta(first)


def test_precopy_refuses_a_part_of_another_state_version() -> None:
    td = TrackedDict({"a": 1})
    rx = TrackedDict.from_bulk(roundtrip_part(td.begin_precopy(app_version=1)))
    td._app_version = 2  # a confused sender
    with pytest.raises(PrecopyError, match="state version 2, bulk had 1"):
        rx.apply_delta(roundtrip_part(td.delta()))


def test_delta_needs_a_complete_bulk() -> None:
    td = TrackedDict({f"k{i}": i for i in range(10)})
    with pytest.raises(PrecopyError, match="without begin_precopy"):
        td.delta()
    chunks = td.precopy_chunks(app_version=1, chunk_entries=4)
    next(chunks).close()
    with pytest.raises(PrecopyError, match="before every bulk chunk"):
        td.delta()
    for chunk in chunks:
        chunk.close()
    td.delta().close()
    td.end_precopy()
    assert not td.tracking


def test_precopy_with_marshal() -> None:
    td = TrackedDict(records(100))
    rx = TrackedDict.from_bulk(roundtrip_part(td.begin_precopy(app_version=3, codec="marshal")))
    td["player:00000001"] = {"gone": True}
    del td["player:00000002"]
    delta = roundtrip_part(td.delta())
    assert delta.envelope.codec == "marshal"
    rx.apply_delta(delta)
    assert rx == td


KEYS = st.sampled_from([f"k{i}" for i in range(8)])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), KEYS, st.integers()),
        st.tuples(st.just("nested"), KEYS, st.integers()),
        st.tuples(st.just("del"), KEYS),
        st.tuples(st.just("pop"), KEYS),
        st.tuples(st.just("update"), st.dictionaries(KEYS, st.integers(), max_size=3)),
        st.tuples(st.just("setdefault"), KEYS, st.integers()),
        st.tuples(st.just("clear")),
        st.tuples(st.just("round")),  # an intermediate pre-copy round
    ),
    max_size=25,
)


def apply_op(
    td: TrackedDict[str, Any], op: tuple[Any, ...], rx: list[TrackedDict[str, Any]]
) -> None:
    kind = op[0]
    if kind == "set":
        td[op[1]] = {"hp": op[2]}
    elif kind == "nested" and op[1] in td:
        td[op[1]]["hp"] = op[2]
        td.touch(op[1])
    elif kind == "del" and op[1] in td:
        del td[op[1]]
    elif kind == "pop":
        td.pop(op[1], None)
    elif kind == "update":
        td.update({k: {"hp": v} for k, v in op[1].items()})
    elif kind == "setdefault":
        td.setdefault(op[1], {"hp": op[2]})
    elif kind == "clear":
        td.clear()
    elif kind == "round" and rx and td.tracking:
        rx[0].apply_delta(roundtrip_part(td.delta()))


@pytest.mark.slow
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    initial=st.dictionaries(KEYS, st.integers(), max_size=8),
    before=OPS,
    between=st.lists(OPS, max_size=4),
    after=OPS,
    chunk=st.integers(min_value=1, max_value=5),
    codec=st.sampled_from(["pickle5", "marshal"]),
)
def test_bulk_plus_deltas_equal_the_live_dict(
    initial: dict[str, int], before: list[Any], between: list[list[Any]], after: list[Any],
    chunk: int, codec: str,
) -> None:
    """Any sets/deletes/touches around a (chunked) bulk: bulk + deltas == the live dict."""
    td: TrackedDict[str, Any] = TrackedDict({k: {"hp": v} for k, v in initial.items()})
    rx: list[TrackedDict[str, Any]] = []
    for op in before:
        apply_op(td, op, rx)
    chunks = td.precopy_chunks(app_version=1, codec=codec, chunk_entries=chunk)
    rx.append(TrackedDict.from_bulk(roundtrip_part(next(chunks))))
    for i, part in enumerate(chunks):
        for op in between[i] if i < len(between) else []:
            apply_op(td, op, rx[:0])  # no delta while the bulk is unfinished
        rx[0].apply_delta(roundtrip_part(part))
    for op in after:
        apply_op(td, op, rx)
    rx[0].apply_delta(roundtrip_part(td.delta()))
    assert rx[0] == td
