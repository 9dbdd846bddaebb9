"""corral.net.sniff: SNI and Host from the first bytes, fed in any segmentation.

ClientHellos are real: produced at test time by OpenSSL through Python's ``ssl`` module
(a MemoryBIO handshake, no socket), then re-fragmented into several TLS records and TCP
segments; the ECH/GREASE/padding variants are built by hand on top of them.
"""

import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.net.sniff import (
    DEFAULT_BUDGET,
    FOUND,
    MALFORMED,
    NEED_MORE,
    NOT_THIS_PROTOCOL,
    FlowSniffer,
    HttpSniffer,
    TlsSniffer,
    sniff,
)


def client_hello(server_hostname="pypi.example.org", *, tls12_only=False, alpn=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sock = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        sock.do_handshake()
    return outgoing.read()


def split_records(hello: bytes, size: int) -> bytes:
    """The same handshake bytes carried in records of at most *size* bytes."""
    assert hello[0] == 0x16
    length = struct.unpack("!H", hello[3:5])[0]
    hs = hello[5 : 5 + length]
    out = b""
    for i in range(0, len(hs), size):
        piece = hs[i : i + size]
        out += hello[:3] + struct.pack("!H", len(piece)) + piece
    return out + hello[5 + length :]


def parse_hello(hello: bytes):
    """(record-header, handshake-header, fixed part up to extensions, [(type, data)])."""
    hs = hello[5:]
    body = hs[4:]
    pos = 2 + 32
    pos += 1 + body[pos]
    pos += 2 + struct.unpack("!H", body[pos : pos + 2])[0]
    pos += 1 + body[pos]
    fixed = body[:pos]
    ext_len = struct.unpack("!H", body[pos : pos + 2])[0]
    exts, p = [], pos + 2
    while p < pos + 2 + ext_len:
        etype, elen = struct.unpack("!HH", body[p : p + 4])
        exts.append((etype, body[p + 4 : p + 4 + elen]))
        p += 4 + elen
    return fixed, exts


def build_hello(fixed: bytes, exts) -> bytes:
    ext_bytes = b"".join(struct.pack("!HH", t, len(d)) + d for t, d in exts)
    body = fixed + struct.pack("!H", len(ext_bytes)) + ext_bytes
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    out = b""
    for i in range(0, len(hs), 16384):  # a big hello needs several records
        piece = hs[i : i + 16384]
        out += b"\x16\x03\x01" + struct.pack("!H", len(piece)) + piece
    return out


def sni_ext(*names: bytes) -> bytes:
    entries = b"".join(b"\x00" + struct.pack("!H", len(n)) + n for n in names)
    return struct.pack("!H", len(entries)) + entries


def feed_all(sniffer, chunks):
    result = None
    for c in chunks:
        result = sniffer.feed(c)
    return result


def every_byte(data):
    return [data[i : i + 1] for i in range(len(data))]


TLS13 = client_hello()
TLS12 = client_hello(tls12_only=True)


@pytest.mark.parametrize("hello,version", [(TLS13, "1.3"), (TLS12, "1.2")], ids=["tls1.3", "tls1.2"])
def test_real_client_hello_gives_sni_whole_and_byte_by_byte(hello, version):
    whole = sniff(hello)
    assert whole.state == FOUND and whole.protocol == "tls"
    assert whole.name == "pypi.example.org" and whole.tls_version == version and not whole.ech
    assert feed_all(FlowSniffer(), every_byte(hello)) == whole
    assert feed_all(TlsSniffer(), every_byte(hello)) == whole
    # every proper prefix says need-more
    s = TlsSniffer()
    assert all(s.feed(b).state == NEED_MORE for b in every_byte(hello[:-1]))


def test_every_two_way_split_gives_the_same_answer():
    want = sniff(TLS13)
    for i in range(1, len(TLS13)):
        s = FlowSniffer()
        first = s.feed(TLS13[:i])
        assert first.state == NEED_MORE
        assert s.feed(TLS13[i:]) == want, i


@pytest.mark.parametrize("size", [1, 2, 7, 100, 300])
def test_hello_split_across_many_tls_records(size):
    hello = split_records(TLS13, size)
    assert hello.count(b"\x16\x03") >= len(TLS13) // (size + 5)
    want = sniff(TLS13)
    assert sniff(hello) == want
    assert feed_all(TlsSniffer(), every_byte(hello)) == want


def test_alpn_and_no_sni():
    r = sniff(client_hello(alpn=["h2", "http/1.1"]))
    assert r.alpn == ("h2", "http/1.1") and r.name == "pypi.example.org"
    none = sniff(client_hello(server_hostname=None))
    assert none.state == FOUND and none.protocol == "tls" and none.name is None


def test_ech_grease_and_padding_extensions():
    fixed, exts = parse_hello(TLS13)
    assert any(t == 0 for t, _ in exts)
    ech_payload = b"\x00" + b"\x00\x01\x00\x01" + b"\x07" + b"\x00\x20" + b"\x11" * 32 + b"\x01\x00" + b"\x22" * 256
    extra = [
        (0x0A0A, b""),  # GREASE (RFC 8701)
        (0xFE0D, ech_payload),  # encrypted_client_hello: the SNI above is the outer (public) name
        (0x3A3A, b"\x00"),
        (0x0015, b"\x00" * 400),  # padding
    ]
    outer = [(t, sni_ext(b"public.ech.example") if t == 0 else d) for t, d in exts]
    hello = build_hello(fixed, [extra[0], *outer[:2], extra[1], *outer[2:], extra[2], extra[3]])
    r = sniff(hello)
    assert r.state == FOUND and r.ech and r.name == "public.ech.example" and r.tls_version == "1.3"
    assert feed_all(FlowSniffer(), every_byte(hello)) == r
    assert sniff(split_records(hello, 50)) == r


def test_huge_hello_exceeds_the_budget_unless_raised():
    fixed, exts = parse_hello(TLS13)
    hello = build_hello(fixed, [*exts, (0x0015, b"\x00" * 20000)])  # several records
    r = sniff(hello)
    assert r.state == MALFORMED and "budget" in r.reason and r.protocol == "tls"
    assert feed_all(TlsSniffer(), [hello[i : i + 1000] for i in range(0, len(hello), 1000)]) == r
    big = TlsSniffer(budget=64 * 1024)
    assert big.feed(hello).name == "pypi.example.org"


def test_a_slow_client_never_makes_the_sniffer_hold_more_than_the_budget():
    s = FlowSniffer(budget=1024)
    r = s.feed(b"GET /" + b"a" * 2000)
    assert r.state == MALFORMED and "1024-byte budget" in r.reason
    assert s.feed(b" HTTP/1.1\r\nHost: x\r\n\r\n") is r  # final
    t = TlsSniffer(budget=1024)
    header = b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfc"  # a record and a hello that never end
    assert t.feed(header).state == NEED_MORE
    assert t.feed(b"\x00" * 5000).state == MALFORMED


@pytest.mark.parametrize(
    "mutate,why",
    [
        (lambda f, e: (f, [*e, e[0]]), "duplicate extension"),
        (lambda f, e: (f, [(t, sni_ext(b"a.example", b"b.example") if t == 0 else d) for t, d in e]), "two host_name"),
        (lambda f, e: (f, [(t, sni_ext(b"bad name") if t == 0 else d) for t, d in e]), "invalid SNI"),
        (lambda f, e: (f, [(t, sni_ext(b"evil\x00.example") if t == 0 else d) for t, d in e]), "invalid SNI"),
        (lambda f, e: (f[:34] + b"\x40" + f[35:], e), "session id longer"),
        (lambda f, e: (f[:35 + f[34]] + b"\xff\xff" + f[37 + f[34]:], e), "truncated"),
    ],
)
def test_malformed_hellos(mutate, why):
    fixed, exts = parse_hello(TLS13)
    hello = build_hello(*mutate(fixed, exts))
    r = sniff(hello)
    assert r.state == MALFORMED and why in r.reason, r
    assert feed_all(FlowSniffer(), every_byte(hello)) == r


@pytest.mark.parametrize(
    "data",
    [b"SSH-2.0-OpenSSH_9.6\r\n", b"\x00\x01\x02", b"\x16\x01\x00", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
     b"get / HTTP/1.1\r\n", b"GETTTTTTTTTTTTTTTTTTTTTTTTTTTTTT / HTTP/1.1\r\n"],
)
def test_other_protocols_are_not_this_protocol(data):
    assert sniff(data).state == NOT_THIS_PROTOCOL
    assert feed_all(FlowSniffer(), every_byte(data)).state == NOT_THIS_PROTOCOL


def test_alert_record_inside_hello_is_malformed():
    two = split_records(TLS13, 100)
    bad = two[:105] + b"\x15" + two[106:]
    assert sniff(bad).state == MALFORMED


@pytest.mark.parametrize(
    "request_bytes,name,method,path",
    [
        (b"GET /simple/six/ HTTP/1.1\r\nHost: PyPI.Example.org\r\nAccept: */*\r\n\r\n", "pypi.example.org", "GET", "/simple/six/"),
        (b"POST /x HTTP/1.1\r\nhost:  files.example:8080 \r\n\r\nbody", "files.example", "POST", "/x"),
        (b"GET /stage2.sh HTTP/1.1\nHost: [2001:db8::1]:80\n\n", "2001:db8::1", "GET", "/stage2.sh"),
        (b"GET http://proxy.example/a/b?c HTTP/1.1\r\nHost: Proxy.example:80\r\n\r\n", "proxy.example", "GET", "/a/b?c"),
        (b"CONNECT tunnel.example:443 HTTP/1.1\r\nHost: tunnel.example:443\r\n\r\n", "tunnel.example", "CONNECT", None),
        (b"GET / HTTP/1.0\r\n\r\n", None, "GET", "/"),
        (b"PROPFIND /dav HTTP/1.1\r\nHost: dav.example\r\n\r\n", "dav.example", "PROPFIND", "/dav"),
    ],
)
def test_http_host_method_path(request_bytes, name, method, path):
    r = sniff(request_bytes)
    assert (r.state, r.protocol, r.name, r.http_method, r.http_path) == (FOUND, "http", name, method, path)
    assert feed_all(HttpSniffer(), every_byte(request_bytes)) == r


@pytest.mark.parametrize(
    "request_bytes,why",
    [
        (b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", "two Host"),
        # which of the two routes is up to the server: not one claim
        (b"GET http://allowed.example/ HTTP/1.1\r\nHost: pastebin.test\r\n\r\n", "but its Host header names"),
        (b"GET / HTTP/1.1\r\nAccept: x\r\n\r\n", "without a Host"),
        (b"GET / HTTP/1.1\r\nHost: a.example\r\n folded\r\n\r\n", "folding"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "invalid Host"),
        (b"GET / HTTP/2\r\nHost: a\r\n\r\n", "not HTTP/1.x"),
        (b"GET /\x01 HTTP/1.1\r\n\r\n", "control"),
        (b"GET / HTTP/1.1\r\nBad Header: 1\r\nHost: a\r\n\r\n", "bad header"),
    ],
)
def test_malformed_http(request_bytes, why):
    r = sniff(request_bytes)
    assert r.state == MALFORMED and why in r.reason and r.protocol == "http", r


def test_result_is_final():
    s = FlowSniffer()
    r = s.feed(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert s.feed(b"GET / HTTP/1.1\r\nHost: b.example\r\n\r\n") is r
    assert r.name == "a.example"


def _chunks(data, cuts):
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


SAMPLES = [TLS13, TLS12, split_records(TLS12, 33), b"GET /a HTTP/1.1\r\nHost: h.example\r\n\r\n"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SAMPLES), st.lists(st.integers(0, 10_000), max_size=8),
       st.integers(0, 600), st.binary(max_size=4), st.booleans())
def test_any_split_of_any_mutation_gives_the_same_answer(sample, cuts, at, junk, truncate):
    """Mutated real inputs: never crash, and the segmentation never changes the answer."""
    at %= len(sample)
    data = sample[:at] + junk + (b"" if truncate else sample[at + len(junk) :])
    want = sniff(data)
    assert want.state in (NEED_MORE, FOUND, NOT_THIS_PROTOCOL, MALFORMED)
    assert feed_all(FlowSniffer(), _chunks(data, cuts) or [b""]) == want


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6),
       st.sampled_from([b"", b"\x16\x03\x01", b"GET ", b"\x16\x03\x03\x00\x40\x01\x00\x00\x3c\x03\x03"]))
def test_random_bytes_never_crash(data, cuts, prefix):
    data = prefix + data
    want = sniff(data, budget=128)
    assert want.state in (NEED_MORE, FOUND, NOT_THIS_PROTOCOL, MALFORMED)
    for cls in (FlowSniffer, TlsSniffer, HttpSniffer):
        r = feed_all(cls(budget=128), _chunks(data, cuts) or [b""])
        if cls is FlowSniffer:
            assert r == want


def test_default_budget_is_16k():
    assert DEFAULT_BUDGET == 16384
    with pytest.raises(ValueError):
        TlsSniffer(budget=10)


def test_empty_lines_before_the_request_line_do_not_hide_the_host():
    """Servers skip CRLFs before the request line (RFC 9112 2.2); a sniffer that calls
    such a stream 'not HTTP' would let its Host dodge every name rule."""
    data = b"\r\n\n\r\nGET /x HTTP/1.1\r\nHost: pastebin.test\r\n\r\n"
    r = sniff(data)
    assert (r.state, r.protocol, r.name, r.http_path) == (FOUND, "http", "pastebin.test", "/x")
    assert feed_all(FlowSniffer(), every_byte(data)) == r
