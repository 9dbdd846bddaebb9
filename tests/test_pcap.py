"""`--pcap FILE` (issue 4, item 4): every frame of the sandbox's interface, both
directions, on both data paths, readable by scapy and by tshark."""

import shutil
import subprocess

import pytest

from net_support import corral
from world import HELLO_BODY, HTTP_V4

pytestmark = pytest.mark.network

SANDBOX = "10.0.2.100"
DNS = "10.0.2.3"
NAME = "www.corral.test"


@pytest.fixture(scope="module", params=["direct", "pump"])
def capture(request, world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"pcap-{request.param}")
    pcap = tmp / "sandbox.pcap"
    out = corral(world, tmp, ["--data-path", request.param, "--pcap", str(pcap), "--allow", NAME],
                 ["curl", "-sS", "-m", "5", f"http://{NAME}/"])
    assert out.proc.returncode == 0 and out.proc.stdout == HELLO_BODY.decode(), out.dump()
    return pcap


def test_scapy_reads_the_dns_query_and_both_directions_of_the_http_flow(capture):
    from scapy.all import DNS as DNSLayer, IP, TCP, UDP, Ether, Raw, rdpcap

    frames = rdpcap(str(capture))
    assert all(f.haslayer(Ether) for f in frames)
    queries = [f for f in frames if f.haslayer(UDP) and f[IP].src == SANDBOX and f[IP].dst == DNS
               and f[UDP].dport == 53 and f.haslayer(DNSLayer) and f[DNSLayer].qr == 0]
    assert any(q[DNSLayer].qd[0].qname == f"{NAME}.".encode() for q in queries), frames.summary()
    answers = [f for f in frames if f.haslayer(UDP) and f[IP].src == DNS and f[UDP].sport == 53]
    assert answers, "no DNS answer to the sandbox in the capture"
    to_http = [f for f in frames if f.haslayer(TCP) and f[IP].src == SANDBOX
               and f[IP].dst == HTTP_V4 and f[TCP].dport == 80]
    syns = [f for f in to_http if f[TCP].flags & 0x12 == 0x02]
    assert len(syns) == 1, to_http
    request = b"".join(bytes(f[Raw].load) for f in to_http if f.haslayer(Raw))
    assert request.startswith(b"GET / HTTP/1.1\r\n") and f"Host: {NAME}".encode() in request
    back = b"".join(bytes(f[Raw].load) for f in frames if f.haslayer(TCP) and f[IP].src == HTTP_V4
                    and f[TCP].sport == 80 and f.haslayer(Raw))
    assert HELLO_BODY in back
    # ARP for the gateway is an ethernet frame too: captured, not dropped
    assert any(f[Ether].type == 0x0806 for f in frames)


def test_tshark_reads_the_same_flows(capture):
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.fail("tshark is not installed. Fix: apt-get install -y tshark") if _must() else \
            pytest.skip("tshark is not installed")
    fields = subprocess.run(
        [tshark, "-n", "-r", str(capture), "-Y", "dns.flags.response == 0 || tcp.flags.syn == 1",
         "-T", "fields", "-e", "ip.src", "-e", "ip.dst", "-e", "tcp.dstport", "-e", "udp.dstport",
         "-e", "dns.qry.name", "-e", "tcp.flags.ack"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    rows = [line.split("\t") for line in fields.splitlines()]
    assert [SANDBOX, DNS, "", "53", NAME, ""] in rows, fields
    syn = [r for r in rows if r[:3] == [SANDBOX, HTTP_V4, "80"]]
    assert len(syn) == 1 and syn[0][5] in ("0", "False"), fields
    # the SYN-ACK, the other direction
    assert any(r[:2] == [HTTP_V4, SANDBOX] and r[5] in ("1", "True") for r in rows), fields
    http = subprocess.run([tshark, "-n", "-r", str(capture), "-Y", "http.request", "-T", "fields",
                           "-e", "http.host", "-e", "http.request.uri"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert http.split() == [NAME, "/"], http


def _must():
    import os

    return os.environ.get("CORRAL_MUST_WORK") == "1"
