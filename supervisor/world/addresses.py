"""The world's addresses, ports, names and DNS records: the client (``corral.world``)
and the servers (``corral.world.server``) import these so both sides agree."""

HTTP_V4 = "198.51.100.10"
HTTP_V6 = "2001:db8::10"
DNS_V4 = "198.51.100.53"
DNS_V6 = "2001:db8::53"
ECHO_V4 = "198.51.100.7"
ECHO_V6 = "2001:db8::7"
OTHER_V4 = ("203.0.113.1", "203.0.113.2", "203.0.113.3")
OTHER_V6 = ("2001:db8::1:1", "2001:db8::1:2")
V4_ADDRESSES = (HTTP_V4, DNS_V4, ECHO_V4, *OTHER_V4)
V6_ADDRESSES = (HTTP_V6, DNS_V6, ECHO_V6, *OTHER_V6)

PORT_HTTP = 80
PORT_HTTP_ALT = 8080
PORT_HTTPS = 443
PORT_ECHO = 7  # TCP and UDP echo
PORT_CLOSE_AFTER_WRITE = 7001  # writes CLOSE_AFTER_WRITE_MESSAGE, then closes
PORT_CLOSED = 9  # nothing listens: connects are refused
PORT_DNS = 53

CLOSE_AFTER_WRITE_MESSAGE = b"bye from the corral world\n"
HELLO_BODY = b"hello from the corral world\n"
ZONE = "corral.test."
TLS_NAMES = ("tls.corral.test", "www.corral.test", "*.corral.test")

# name -> list of (rdtype, value).  Names outside ZONE listed here are answered too, so
# that realistic allowlists (pypi.org, example.com) can be tested against world servers.
RECORDS: dict[str, list[tuple[str, str]]] = {
    "corral.test.": [("A", HTTP_V4), ("AAAA", HTTP_V6), ("TXT", "corral world zone apex")],
    "www.corral.test.": [("A", HTTP_V4), ("AAAA", HTTP_V6)],
    "tls.corral.test.": [("A", HTTP_V4), ("AAAA", HTTP_V6)],
    "ns.corral.test.": [("A", DNS_V4), ("AAAA", DNS_V6)],
    "echo.corral.test.": [("A", ECHO_V4), ("AAAA", ECHO_V6)],
    "v4only.corral.test.": [("A", HTTP_V4)],
    "v6only.corral.test.": [("AAAA", HTTP_V6)],
    "alias.corral.test.": [("CNAME", "www.corral.test.")],
    "txt.corral.test.": [("TXT", "corral world says hi")],
    "host1.corral.test.": [("A", OTHER_V4[0]), ("AAAA", OTHER_V6[0])],
    "host2.corral.test.": [("A", OTHER_V4[1]), ("AAAA", OTHER_V6[1])],
    "host3.corral.test.": [("A", OTHER_V4[2])],
    "multi.corral.test.": [("A", OTHER_V4[0]), ("A", OTHER_V4[1]), ("A", OTHER_V4[2])],
    "example.com.": [("A", OTHER_V4[0]), ("AAAA", OTHER_V6[0])],
    "example.org.": [("A", OTHER_V4[1]), ("AAAA", OTHER_V6[1])],
    "pypi.org.": [("A", OTHER_V4[2])],
    "files.pythonhosted.org.": [("A", OTHER_V4[2])],
}
