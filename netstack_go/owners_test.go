package main

import (
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// inodeOf is the socket inode behind a connection, from our own fd table.
func inodeOf(t *testing.T, c syscall.Conn) uint32 {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var link string
	var readErr error
	if err := raw.Control(func(fd uintptr) {
		link, readErr = os.Readlink("/proc/self/fd/" + strconv.Itoa(int(fd)))
	}); err != nil || readErr != nil {
		t.Fatal(err, readErr)
	}
	n, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]"), 10, 32)
	if err != nil {
		t.Fatalf("not a socket link: %q", link)
	}
	return uint32(n)
}

func addrOf(proto uint8, local, remote netip.AddrPort) flowAddr {
	f := flowAddr{proto: proto, sport: local.Port(), dport: remote.Port()}
	f.v6 = !local.Addr().Is4()
	if f.v6 {
		f.src, f.dst = local.Addr().As16(), remote.Addr().As16()
	} else {
		s, d := local.Addr().As4(), remote.Addr().As4()
		copy(f.src[:], s[:])
		copy(f.dst[:], d[:])
	}
	return f
}

func diagSocket(t *testing.T) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		t.Skipf("no sock_diag here: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// inOwnNetns runs the calling test again in a network namespace of its own
// (unshare -rn, lo up) and reports false here; true in that run.  The tests below
// open sockets: nothing they send can leave that namespace.
func inOwnNetns(t *testing.T) bool {
	t.Helper()
	if os.Getenv("CORRAL_GO_TEST_NETNS") == "1" {
		return true
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("unshare", "-rn", "sh", "-c", `ip link set lo up && exec "$0" "$@"`,
		exe, "-test.run", "^"+t.Name()+"$", "-test.v")
	cmd.Env = append(os.Environ(), "CORRAL_GO_TEST_NETNS=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: "+t.Name()) {
		t.Fatalf("%s in a network namespace of its own (unshare -rn): %v\n%s", t.Name(), err, out)
	}
	return false
}

func TestSocketInodesAndHoldersFindOurOwnSockets(t *testing.T) {
	if !inOwnNetns(t) {
		return
	}
	diag := diagSocket(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	tcp, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer tcp.Close()
	udpPeer, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer udpPeer.Close()
	udp, err := net.Dial("udp4", udpPeer.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()

	tc, uc := tcp.(*net.TCPConn), udp.(*net.UDPConn)
	flows := []flowAddr{
		addrOf(ProtoTCP, tc.LocalAddr().(*net.TCPAddr).AddrPort(), tc.RemoteAddr().(*net.TCPAddr).AddrPort()),
		addrOf(ProtoUDP, uc.LocalAddr().(*net.UDPAddr).AddrPort(), uc.RemoteAddr().(*net.UDPAddr).AddrPort()),
		addrOf(ProtoTCP, netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2")),
	}
	inodes, err := socketInodes(diag, flows, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	want := []uint32{inodeOf(t, tc), inodeOf(t, uc), 0}
	for i := range want {
		if inodes[i] != want[i] {
			t.Fatalf("flow %d: inode %d, want %d", i, inodes[i], want[i])
		}
	}
	me := int32(os.Getpid())
	holders := socketHolders(inodes, []int32{1 << 30, me}, 4) // a pid that does not exist is skipped
	if len(holders[0]) != 1 || holders[0][0] != me || len(holders[1]) != 1 || holders[1][0] != me ||
		len(holders[2]) != 0 {
		t.Fatalf("holders %v, want [[%d] [%d] []]", holders, me, me)
	}
}

func TestSocketInodesFindsAV4FlowOfADualStackSocket(t *testing.T) {
	if !inOwnNetns(t) {
		return
	}
	diag := diagSocket(t)
	ln, err := net.Listen("tcp", ":0") // dual-stack ("tcp6" would be v6-only): takes v4 as ::ffff:a.b.c.d
	if err != nil {
		t.Skipf("no IPv6 here: %v", err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	c, err := net.Dial("tcp4", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	sc := server.(*net.TCPConn)
	// The server's socket is AF_INET6 with a v4-mapped address; the flow is plain v4.
	local := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))
	remote := c.LocalAddr().(*net.TCPAddr).AddrPort()
	inodes, err := socketInodes(diag, []flowAddr{addrOf(ProtoTCP, local, remote)}, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if want := inodeOf(t, sc); inodes[0] != want {
		t.Fatalf("inode %d, want %d", inodes[0], want)
	}
}
