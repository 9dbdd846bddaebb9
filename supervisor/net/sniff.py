"""Sans-io sniffers: the name a flow claims in its first bytes (TLS SNI, HTTP Host).

Feed the client's bytes as they arrive (``sniffer.feed(data)``), in segments of any size;
each call returns a :class:`SniffResult` whose ``state`` is one of

``need-more``
    nothing decided yet: keep the bytes coming (and buffered for the upstream).
``found``
    the protocol was recognised and its first message read completely. ``name`` is the
    claimed host name (lower case, no trailing dot, no port), or ``None`` when the client
    sent none (a ClientHello without SNI, an HTTP/1.0 request without Host).
``not-this-protocol``
    the first bytes are not a TLS ClientHello / an HTTP/1.x request (SSH, raw data, HTTP/2
    prior knowledge...): the flow claims no name this module can read (``protocol`` is
    ``"h2"`` for HTTP/2 prior knowledge, whose names are in HPACK-coded frames).
``malformed``
    it started like the protocol but breaks its grammar, or the first message did not fit
    in the byte budget (``reason`` says which).

Once a result other than ``need-more`` is returned it is final: later ``feed`` calls return
it again and ignore their data. Only the first ``budget`` bytes (16 KiB by default) are ever
looked at, and a sniffer never holds more than that many bytes, so a slow or hostile client
cannot make the supervisor buffer without bound. Because every decision is a function of
those first ``budget`` bytes alone, the answer does not depend on how the stream was split
into segments.

No I/O, no trio: the netstack driver owns the bytes and the clock (the "bounded wait" for
the first bytes is the driver's timer, not this module's).
"""

from __future__ import annotations

import attrs

__all__ = [
    "DEFAULT_BUDGET",
    "FOUND",
    "FlowSniffer",
    "HttpSniffer",
    "MALFORMED",
    "NEED_MORE",
    "NOT_THIS_PROTOCOL",
    "SniffResult",
    "TlsSniffer",
    "sniff",
]

NEED_MORE = "need-more"
FOUND = "found"
NOT_THIS_PROTOCOL = "not-this-protocol"
MALFORMED = "malformed"

DEFAULT_BUDGET = 16 * 1024

# TLS constants (RFC 8446, RFC 6066, draft-ietf-tls-esni).
_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0x0000
_EXT_ALPN = 0x0010
_EXT_SUPPORTED_VERSIONS = 0x002B
_EXT_ECH = 0xFE0D
_MAX_RECORD = 16384 + 256  # plaintext limit plus slack some stacks use
_TLS_VERSIONS = {0x0300: "SSL3.0", 0x0301: "1.0", 0x0302: "1.1", 0x0303: "1.2", 0x0304: "1.3"}

_HOST_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~:[]%!$&'()*+,;=")
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")
_MAX_METHOD = 24
_H2_PREFACE = b"PRI * HTTP/2.0\r\n"


@attrs.frozen(kw_only=True)
class SniffResult:
    """What the first bytes of a flow say. See the module docstring for ``state``."""

    state: str
    protocol: str | None = None  # "tls" | "http" once recognised; "h2": HTTP/2 prior knowledge
    name: str | None = None  # normalized claimed host name
    raw_name: str | None = None  # the SNI / Host value exactly as sent (decoded as latin-1)
    reason: str | None = None  # why not-this-protocol / malformed
    # TLS details
    tls_version: str | None = None  # highest offered: "1.2", "1.3"...
    alpn: tuple[str, ...] = ()
    ech: bool = False  # an encrypted_client_hello extension was present: name is the outer SNI
    # HTTP details
    http_method: str | None = None
    http_path: str | None = None
    http_version: str | None = None

    @property
    def done(self) -> bool:
        return self.state != NEED_MORE

    def __repr__(self) -> str:
        what = self.name or self.reason or ""
        proto = f" {self.protocol}" if self.protocol else ""
        return f"<SniffResult {self.state}{proto} {what!r}>" if what else f"<SniffResult {self.state}{proto}>"


_NEED = SniffResult(state=NEED_MORE)


class _Bad(Exception):
    pass


def _normalize_host(value: str) -> str | None:
    """'Example.COM.:8080' → 'example.com'; '[2001:db8::1]:443' → '2001:db8::1'; '' → None."""
    v = value.strip()
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            raise _Bad(f"unbalanced '[' in host {value!r}")
        rest = v[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            raise _Bad(f"bad port in host {value!r}")
        v = v[1:end]
    elif v.count(":") == 1:
        v, port = v.split(":")
        if port and not port.isdigit():
            raise _Bad(f"bad port in host {value!r}")
    elif v.count(":") > 1:
        raise _Bad(f"an IPv6 host must be in brackets: {value!r}")
    v = v.rstrip(".").lower()
    return v or None


class _Sniffer:
    protocol = "?"

    def __init__(self, *, budget: int = DEFAULT_BUDGET) -> None:
        if budget < 64:
            raise ValueError(f"budget must be at least 64 bytes, not {budget}")
        self.budget = budget
        self.seen = 0  # bytes looked at (never more than budget)
        self.result = _NEED

    def feed(self, data: bytes) -> SniffResult:
        if self.result.done:
            return self.result
        room = self.budget - self.seen
        chunk = bytes(data[:room])
        self.seen += len(chunk)
        try:
            result = self._feed(chunk)
        except _Bad as e:
            result = SniffResult(state=MALFORMED, protocol=self._recognised(), reason=str(e))
        if not result.done and self.seen >= self.budget:
            result = SniffResult(
                state=MALFORMED, protocol=self._recognised(),
                reason=f"no complete {self.protocol} first message within the {self.budget}-byte budget",
            )
        self.result = result
        return result

    def _recognised(self) -> str | None:
        return self.protocol

    def _feed(self, chunk: bytes) -> SniffResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} seen={self.seen} {self.result.state}>"


class _Reader:
    """Bounds-checked reads over one message; running off the end is malformed."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Bad(f"{self.what}: truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vec(self, len_bytes: int) -> bytes:
        return self.take(int.from_bytes(self.take(len_bytes), "big"))

    def left(self) -> int:
        return len(self.data) - self.pos


class TlsSniffer(_Sniffer):
    """TLS ClientHello → SNI (all TLS versions up to 1.3; ECH outer SNI; any extensions).

    The ClientHello may span several TLS records and any number of segments.
    """

    protocol = "tls"

    def __init__(self, *, budget: int = DEFAULT_BUDGET) -> None:
        super().__init__(budget=budget)
        self._buf = bytearray()  # bytes of the current, incomplete record
        self._hs = bytearray()  # handshake bytes reassembled from records
        self._first = True

    def _recognised(self) -> str | None:
        return None if self._first else "tls"

    def _feed(self, chunk: bytes) -> SniffResult:
        self._buf += chunk
        while True:
            buf = self._buf
            if self._first:
                if len(buf) >= 1 and buf[0] != _HANDSHAKE:
                    return SniffResult(state=NOT_THIS_PROTOCOL, reason="first byte is not a TLS handshake record")
                if len(buf) >= 2 and buf[1] != 3:
                    return SniffResult(state=NOT_THIS_PROTOCOL, reason="not a TLS record version")
            if len(buf) < 5:
                if buf and buf[0] != _HANDSHAKE:
                    raise _Bad(f"record type {buf[0]} inside the ClientHello (expected handshake, 22)")
                return _NEED
            if buf[0] != _HANDSHAKE:
                raise _Bad(f"record type {buf[0]} inside the ClientHello (expected handshake, 22)")
            if buf[1] != 3:
                raise _Bad(f"record version {buf[1]}.{buf[2]}")
            length = int.from_bytes(buf[3:5], "big")
            if length == 0:
                raise _Bad("empty handshake record")
            if length > _MAX_RECORD:
                raise _Bad(f"record of {length} bytes exceeds the TLS limit")
            self._first = False
            if len(buf) < 5 + length:
                return _NEED
            self._hs += buf[5 : 5 + length]
            del buf[: 5 + length]
            result = self._handshake()
            if result.done:
                return result

    def _handshake(self) -> SniffResult:
        hs = self._hs
        if hs[0] != _CLIENT_HELLO:
            raise _Bad(f"first handshake message is type {hs[0]}, not ClientHello")
        if len(hs) < 4:
            return _NEED
        length = int.from_bytes(hs[1:4], "big")
        if 4 + length > self.budget:
            raise _Bad(f"ClientHello of {length} bytes exceeds the {self.budget}-byte budget")
        if len(hs) < 4 + length:
            return _NEED
        return _parse_client_hello(bytes(hs[4 : 4 + length]))


def _parse_client_hello(body: bytes) -> SniffResult:
    r = _Reader(body, "ClientHello")
    legacy_version = r.u16()
    if legacy_version >> 8 != 3:
        raise _Bad(f"ClientHello version {legacy_version:#06x}")
    r.take(32)  # random
    if len(r.vec(1)) > 32:
        raise _Bad("session id longer than 32 bytes")
    suites = r.vec(2)
    if not suites or len(suites) % 2:
        raise _Bad("bad cipher suite list")
    if not r.vec(1):
        raise _Bad("empty compression method list")
    versions = [legacy_version]
    raw = None
    alpn: list[str] = []
    ech = False
    if r.left():
        exts = _Reader(r.vec(2), "ClientHello extensions")
        if r.left():
            raise _Bad("bytes after the ClientHello extensions")
        seen: set[int] = set()
        while exts.left():
            etype = exts.u16()
            data = exts.vec(2)
            if etype in seen:
                raise _Bad(f"duplicate extension {etype:#06x}")
            seen.add(etype)
            if etype == _EXT_SERVER_NAME:
                raw = _parse_sni(data)
            elif etype == _EXT_ALPN:
                alpn = _parse_alpn(data)
            elif etype == _EXT_SUPPORTED_VERSIONS:
                v = _Reader(data, "supported_versions")
                lst = v.vec(1)
                if v.left() or not lst or len(lst) % 2:
                    raise _Bad("bad supported_versions extension")
                versions += [int.from_bytes(lst[i : i + 2], "big") for i in range(0, len(lst), 2)]
            elif etype == _EXT_ECH:
                ech = True
            # everything else (padding 21, GREASE 0x?a?a, key shares...) is skipped
    known = [v for v in versions if v in _TLS_VERSIONS]
    top = _TLS_VERSIONS[max(known)] if known else None
    name = _normalize_host(raw) if raw is not None else None
    return SniffResult(
        state=FOUND, protocol="tls", name=name, raw_name=raw, tls_version=top, alpn=tuple(alpn), ech=ech,
    )


def _parse_sni(data: bytes) -> str | None:
    r = _Reader(data, "server_name extension")
    lst = _Reader(r.vec(2), "server_name list")
    if r.left():
        raise _Bad("bytes after the server_name list")
    host = None
    while lst.left():
        kind = lst.u8()
        value = lst.vec(2)
        if kind != 0:
            continue
        if host is not None:
            raise _Bad("two host_name entries in server_name")
        if not value or any(b not in _HOST_CHARS for b in value) or b":" in value:
            raise _Bad(f"invalid SNI host name {value[:80]!r}")
        host = value.decode("ascii")
    return host


def _parse_alpn(data: bytes) -> list[str]:
    r = _Reader(data, "ALPN extension")
    lst = _Reader(r.vec(2), "ALPN list")
    if r.left():
        raise _Bad("bytes after the ALPN list")
    out = []
    while lst.left():
        proto = lst.vec(1)
        if not proto:
            raise _Bad("empty ALPN protocol name")
        out.append(proto.decode("latin-1"))
    return out


class HttpSniffer(_Sniffer):
    """HTTP/1.x request head → Host (and method, path, version).

    The request target's authority names the request (absolute-form, ``CONNECT host:port``),
    as RFC 9112 §3.2.2 says; a Host header naming another host is malformed (servers
    differ on which one they route by), and so are two Host headers, obs-folded lines or
    bad header names. HTTP/2 prior knowledge (``PRI * HTTP/2.0``) is not-this-protocol.
    """

    protocol = "http"

    def __init__(self, *, budget: int = DEFAULT_BUDGET) -> None:
        super().__init__(budget=budget)
        self._buf = bytearray()
        self._line = 0  # where the current line starts
        self._scan = 0  # where to look for its end
        self._method_ok = False
        self._request: tuple[str, str, str] | None = None
        self._host: str | None = None
        self._host_seen = False

    def _recognised(self) -> str | None:
        return "http" if self._method_ok else None

    def _feed(self, chunk: bytes) -> SniffResult:
        self._buf += chunk
        if not self._method_ok:
            # RFC 9112 §2.2: servers ignore empty lines before the request line, so
            # a request behind CRLFs is still a request (and still names its Host).
            blank = len(self._buf) - len(self._buf.lstrip(b"\r\n"))
            del self._buf[:blank]
            if not self._buf:
                return _NEED
            result = self._check_method()
            if result is not None:
                return result
        while True:
            nl = self._buf.find(b"\n", self._scan)
            if nl < 0:
                self._scan = len(self._buf)
                return _NEED
            line = bytes(self._buf[self._line : nl])
            self._line = self._scan = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._request is None:
                self._request_line(line)
            elif not line:
                return self._done()
            else:
                self._header(line)

    def _check_method(self) -> SniffResult | None:
        head = bytes(self._buf[: _MAX_METHOD + 1])
        for i, b in enumerate(head):
            if b == 0x20:
                if i == 0:
                    break
                if _H2_PREFACE.startswith(bytes(self._buf[: len(_H2_PREFACE)])):
                    if len(self._buf) < len(_H2_PREFACE):
                        return _NEED
                    return SniffResult(state=NOT_THIS_PROTOCOL, protocol="h2", reason="HTTP/2 connection preface")
                self._method_ok = True
                return None
            if b not in _METHOD_CHARS:
                break
        else:
            if len(head) <= _MAX_METHOD:
                return _NEED
        return SniffResult(state=NOT_THIS_PROTOCOL, reason="does not start with an HTTP method")

    def _request_line(self, line: bytes) -> None:
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[1]:
            raise _Bad(f"bad request line {line[:80]!r}")
        method, target, version = parts
        if not (version.startswith(b"HTTP/1.") and len(version) == 8 and version[7:8].isdigit()):
            raise _Bad(f"not HTTP/1.x: {version[:20]!r}")
        if any(b <= 0x20 or b >= 0x7F for b in target):
            raise _Bad("control or non-ASCII bytes in the request target")
        self._request = (method.decode("ascii"), target.decode("ascii"), version.decode("ascii")[5:])

    def _header(self, line: bytes) -> None:
        if line[:1] in (b" ", b"\t"):
            raise _Bad("obsolete line folding in the request head")
        name, colon, value = line.partition(b":")
        if not colon or not name or any(b not in _TOKEN for b in name):
            raise _Bad(f"bad header line {line[:80]!r}")
        if name.lower() != b"host":
            return
        if self._host_seen:
            raise _Bad("two Host headers")
        self._host_seen = True
        value = value.strip(b" \t")
        if any(b not in _HOST_CHARS for b in value):
            raise _Bad(f"invalid Host header {value[:80]!r}")
        self._host = value.decode("ascii")

    def _done(self) -> SniffResult:
        assert self._request is not None
        method, target, version = self._request
        raw = self._host
        path = target
        authority = None
        if method == "CONNECT":
            authority, path = target, None
        elif "://" in target:
            scheme, _, rest = target.partition("://")
            authority, slash, tail = rest.partition("/")
            authority = authority.rpartition("@")[2]
            path = slash + tail if slash else "/"
        if authority is not None:
            if not authority or any(ord(c) not in _HOST_CHARS for c in authority):
                raise _Bad(f"invalid authority in the request target {target[:80]!r}")
            # Servers differ on which one routes (RFC 9112 says the target; many
            # backends and proxies read Host): two different names are not one claim.
            if self._host and _normalize_host(self._host) != _normalize_host(authority):
                raise _Bad(f"the request target names {authority[:80]!r} but its Host header "
                           f"names {self._host[:80]!r}")
            raw = authority
        elif version != "1.0" and not self._host_seen:
            raise _Bad("HTTP/1.1 request without a Host header")
        name = _normalize_host(raw) if raw else None
        return SniffResult(
            state=FOUND, protocol="http", name=name, raw_name=raw, http_method=method,
            http_path=path, http_version=version,
        )


class FlowSniffer(_Sniffer):
    """TLS or HTTP/1.x, whichever the first byte says (0x16: TLS; a letter, CR or LF: HTTP)."""

    protocol = "TLS or HTTP"

    def __init__(self, *, budget: int = DEFAULT_BUDGET) -> None:
        super().__init__(budget=budget)
        self._inner: _Sniffer | None = None

    def _recognised(self) -> str | None:
        return self._inner._recognised() if self._inner is not None else None

    def feed(self, data: bytes) -> SniffResult:
        if self._inner is None and data:
            first = data[0]
            if first == _HANDSHAKE:
                self._inner = TlsSniffer(budget=self.budget)
            elif first in _METHOD_CHARS or first in b"\r\n":
                self._inner = HttpSniffer(budget=self.budget)
            else:
                self.result = SniffResult(state=NOT_THIS_PROTOCOL, reason="neither TLS nor HTTP/1.x")
        if self._inner is not None and not self.result.done:
            self.result = self._inner.feed(data)
        return self.result


def sniff(data: bytes, *, budget: int = DEFAULT_BUDGET) -> SniffResult:
    """One-shot: the result for these bytes (``need-more`` if they are a proper prefix)."""
    return FlowSniffer(budget=budget).feed(data)
