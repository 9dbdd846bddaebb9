"""NameTable: attribution, CNAME chains, TTL clamping and expiry, bounds."""

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.policy import Answer, NameTable


def A(name, ip, ttl=300):
    return Answer(name=name, rtype="AAAA" if ":" in ip else "A", value=ip, ttl=ttl)


def CNAME(name, target, ttl=300):
    return Answer(name=name, rtype="CNAME", value=target, ttl=ttl)


def test_direct_answers():
    t = NameTable()
    learned = t.learn("Example.COM.", [A("example.com.", "203.0.113.7"), A("example.com", "2001:db8::7")], now=0)
    assert learned == {ipaddress.ip_address("203.0.113.7"): ("example.com",),
                       ipaddress.ip_address("2001:db8::7"): ("example.com",)}
    assert t.names_for("203.0.113.7", now=1) == ("example.com",)
    assert t.names_for("::ffff:203.0.113.7", now=1) == ("example.com",)  # mapped form is the same address
    assert t.names_for("2001:db8::7", now=1) == ("example.com",)
    assert t.names_for("203.0.113.8", now=1) == ()


def test_cname_chain_attributes_final_ips_to_every_name_on_the_chain():
    t = NameTable()
    t.learn(
        "files.pythonhosted.org",
        [
            CNAME("files.pythonhosted.org.", "dualstack.python.map.fastly.net."),
            CNAME("dualstack.python.map.fastly.net.", "edge.fastly.test."),
            A("edge.fastly.test.", "198.51.100.20"),
            A("unrelated.test.", "198.51.100.99"),  # off the chain: ignored
        ],
        now=0,
    )
    assert t.names_for("198.51.100.20", now=1) == (
        "files.pythonhosted.org", "dualstack.python.map.fastly.net", "edge.fastly.test",
    )
    assert t.names_for("198.51.100.99", now=1) == ()


def test_cname_loop_terminates():
    t = NameTable()
    t.learn("a.test", [CNAME("a.test", "b.test"), CNAME("b.test", "a.test"), A("b.test", "203.0.113.1")], now=0)
    assert set(t.names_for("203.0.113.1", now=0)) == {"a.test", "b.test"}


def test_garbage_values_are_ignored():
    t = NameTable()
    assert t.learn("a.test", [Answer(name="a.test", rtype="A", value="not-an-ip", ttl=5)], now=0) == {}
    assert len(t) == 0


def test_ttl_is_clamped_and_entries_expire():
    t = NameTable(min_ttl=60, max_ttl=3600)
    t.learn("short.test", [A("short.test", "203.0.113.1", ttl=0)], now=100)
    t.learn("long.test", [A("long.test", "203.0.113.2", ttl=10**9)], now=100)
    assert t.names_for("203.0.113.1", now=159) == ("short.test",)  # a 0 s TTL lives min_ttl
    assert t.names_for("203.0.113.1", now=160) == ()
    assert t.names_for("203.0.113.2", now=3699) == ("long.test",)
    assert t.names_for("203.0.113.2", now=3700) == ()
    assert len(t) == 0


def test_refresh_extends_and_newest_name_first():
    t = NameTable(min_ttl=10, max_ttl=1000)
    t.add("203.0.113.1", "a.test", ttl=10, now=0)
    t.add("203.0.113.1", "b.test", ttl=100, now=0)
    assert t.names_for("203.0.113.1", now=5) == ("b.test", "a.test")
    t.add("203.0.113.1", "a.test", ttl=100, now=5)
    assert t.names_for("203.0.113.1", now=50) == ("a.test", "b.test")
    # a shorter refresh never shortens what is known
    t.add("203.0.113.1", "b.test", ttl=10, now=6)
    assert "b.test" in t.names_for("203.0.113.1", now=99)


def test_expire_sweeps():
    t = NameTable(min_ttl=10, max_ttl=100)
    t.add("203.0.113.1", "a.test", ttl=10, now=0)
    t.add("203.0.113.2", "b.test", ttl=50, now=0)
    assert t.expire(now=20) == 1
    assert len(t) == 1 and t.names_for("203.0.113.2", now=20) == ("b.test",)


def test_bounded_size_evicts_least_recently_learned():
    t = NameTable(max_ips=3, max_names_per_ip=2)
    for i in range(5):
        t.add(f"203.0.113.{i}", f"n{i}.test", ttl=300, now=0)
    assert len(t) == 3
    assert t.names_for("203.0.113.0", now=0) == () and t.names_for("203.0.113.1", now=0) == ()
    assert t.names_for("203.0.113.4", now=0) == ("n4.test",)
    for n in ("x.test", "y.test", "z.test"):
        t.add("203.0.113.4", n, ttl=300, now=0)
    assert t.names_for("203.0.113.4", now=0) == ("z.test", "y.test")


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a.test", "b.test", "c.test", "d.test"]),
            st.sampled_from(["A", "AAAA", "CNAME", "TXT"]),
            st.one_of(st.ip_addresses().map(str), st.sampled_from(["a.test", "b.test", "junk", ""])),
            st.integers(0, 2**31 - 1),
        ),
        max_size=12,
    ),
    st.floats(0, 1e6),
)
@settings(max_examples=300)
def test_learn_never_crashes_and_stays_bounded(records, now):
    t = NameTable(max_ips=4, max_names_per_ip=2)
    t.learn("a.test", [Answer(name=n, rtype=r, value=v, ttl=ttl) for n, r, v, ttl in records], now=now)
    assert len(t) <= 4
    for ip in list(t._by_ip):
        assert 1 <= len(t.names_for(ip, now=now)) <= 2
