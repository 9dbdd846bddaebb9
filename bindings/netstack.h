/* corral netstack C ABI: the only contract between supervisor (Python, cffi)
 * and netstack_go (Go, cgo).  cffi reads this file as its cdef; cgo #includes it.
 *
 * Rules (DESIGN §5): Python holds opaque integer handles, never Go pointers.
 * Every call returns an int status: 0 or a positive count on success, one of
 * the negative CORRAL_E* codes on failure.  Results come back in caller-owned
 * buffers.  Go never calls into Python and never logs: a failed call leaves
 * its text in corral_last_error().
 *
 * Life of a stack
 *   h = corral_stack_new(&cfg)             handle > 0
 *   fd = corral_stack_eventfd(h)           readable when events or frames wait
 *   loop: wait for fd readable, read 8 bytes from it (it is non-blocking), then
 *         corral_stack_poll_events(h, ...) until it returns < cap, and (pump
 *         mode) corral_stack_read_frames(h, ...) likewise; answer NEW_FLOW and
 *         FLOW_DATA with corral_stack_set_verdicts and DNS_QUERY with
 *         corral_stack_dns_reply.
 *   corral_stack_shutdown(h)               optional: end every flow, queue their
 *                                          FLOW_CLOSED; drain them with poll_events
 *   corral_stack_close(h)                  idempotent; the handle is then dead
 *
 * Addresses: family 4 or 6; IPv4 uses the first 4 bytes of the 16-byte array.
 * Pointer arguments are only read unless documented as output (no `const`:
 * cgo's exported prototypes cannot carry it).
 */
#ifndef CORRAL_NETSTACK_H
#define CORRAL_NETSTACK_H

#include <stdint.h>

/* Bumped whenever a signature or a struct below changes. */
#define CORRAL_NET_ABI_VERSION 10

/* Status codes. */
#define CORRAL_OK 0
#define CORRAL_EINVAL -1     /* bad argument */
#define CORRAL_EBADHANDLE -2 /* unknown or closed handle */
#define CORRAL_ENOSPC -3     /* caller's buffer too small */
#define CORRAL_EINTERNAL -4  /* stack failure; see corral_last_error */
#define CORRAL_EUNKNOWN -5   /* no such flow / query (already decided, timed out) */
#define CORRAL_ENOTSUP -6    /* not available in this mode */

/* Link modes (corral_config.mode). */
#define CORRAL_MODE_DIRECT 0 /* Go reads and writes the TAP fd itself */
#define CORRAL_MODE_PUMP 1   /* the caller moves frames: inject / read_frames */

/* Protocols. */
#define CORRAL_PROTO_TCP 6
#define CORRAL_PROTO_UDP 17
#define CORRAL_PROTO_ICMP 1 /* ICMP echo (v4) and ICMPv6 echo */

/* Event kinds. */
#define CORRAL_EV_NEW_FLOW 1    /* needs a verdict unless CORRAL_FLAG_DECIDED */
#define CORRAL_EV_FLOW_CLOSED 2 /* exactly one per NEW_FLOW, same id */
#define CORRAL_EV_DNS_QUERY 3   /* payload = one DNS message; answer with dns_reply */
/* FLOW_DATA: a TCP flow answered PEEK or OBSERVE.  After OBSERVE: one event,
 * payload = the client's first read (empty if none came within peek_timeout_ms),
 * for information only.  After PEEK: payload = the bytes read since the previous
 * FLOW_DATA of the flow (see CORRAL_VERDICT_PEEK); each needs an answer. */
#define CORRAL_EV_FLOW_DATA 4

/* Event flags. */
#define CORRAL_FLAG_DECIDED 1 /* NEW_FLOW that needs no verdict (see reason) */
#define CORRAL_FLAG_INBOUND 2 /* flow into the sandbox through a publish */
/* FLOW_DATA after PEEK: no more bytes will be read before the final verdict:
 * peek_timeout_ms passed since the first byte, 16 KiB are buffered, or the
 * client closed its side (reason CORRAL_REASON_EOF). */
#define CORRAL_FLAG_LAST 4

/* Close reasons (also the reason of a DECIDED NEW_FLOW). */
#define CORRAL_REASON_NONE 0
#define CORRAL_REASON_EOF 1            /* both sides closed cleanly */
#define CORRAL_REASON_RESET 2          /* a side reset or failed mid-flow */
#define CORRAL_REASON_DENIED 3         /* verdict deny */
#define CORRAL_REASON_REFUSED 4        /* upstream refused: client got RST */
#define CORRAL_REASON_UNREACHABLE 5    /* upstream unreachable: client got ICMP */
#define CORRAL_REASON_POLICY_TIMEOUT 6 /* no verdict within policy_timeout: deny */
#define CORRAL_REASON_IDLE 7           /* UDP/ICMP flow idle timeout */
#define CORRAL_REASON_OVERLOAD 8       /* too many pending decisions: deny */
#define CORRAL_REASON_SHUTDOWN 9       /* stack closed while the flow was open */
#define CORRAL_REASON_ERROR 10         /* other local error (see corral_last_error) */
#define CORRAL_REASON_DIAL_TIMEOUT 11  /* upstream did not answer: client got ICMP */

/* Config flags (corral_config.flags). */
#define CORRAL_CONFIG_PCAP 1 /* write every frame of the link to pcap_fd */

/* Verdict actions. */
#define CORRAL_VERDICT_DENY 0
#define CORRAL_VERDICT_ALLOW 1
/* PEEK (TCP; UDP/ICMP take it as ALLOW): decide on the client's first bytes.
 * The stack dials the destination (dial_* apply) so that a refused or
 * unreachable upstream still fails the client's connect(); it then completes
 * the client's handshake, lets the server's bytes through to the client (a
 * server-first protocol is not held up) and reads the client's: each read is
 * one FLOW_DATA carrying the bytes that came since the previous one.  Answer
 * a FLOW_DATA with PEEK to read on (no complete first message yet), or with
 * the final verdict.  Bounds: at most 16 KiB in all, and peek_timeout_ms from
 * the first byte; when either runs out, or the client closes its side, the
 * FLOW_DATA carries CORRAL_FLAG_LAST and PEEK to it is a deny.  No client byte
 * reaches the upstream before the final verdict: ALLOW writes every byte read
 * upstream, in order, and splices, DENY resets both sides; no answer within
 * policy_timeout_ms = deny. */
#define CORRAL_VERDICT_PEEK 2
/* OBSERVE (TCP; UDP/ICMP take it as ALLOW): allow now, and report the client's
 * first bytes without waiting for anything: the stack dials and splices as for
 * ALLOW, and queues one FLOW_DATA with the first bytes the client sends (at most
 * 16 KiB; empty if none came within peek_timeout_ms).  That FLOW_DATA needs no
 * verdict.  For flows whose names cannot change the decision: it names them in
 * the events at no cost in latency. */
#define CORRAL_VERDICT_OBSERVE 3

/* Transport of a DNS_QUERY (in corral_event.proto). */
/* CORRAL_PROTO_UDP or CORRAL_PROTO_TCP */

typedef struct corral_config {
    int32_t mode;                 /* CORRAL_MODE_* */
    int32_t tap_fd;               /* direct: Go dups it; pump: ignored (use -1) */
    uint32_t mtu;                 /* 0 = 65520 */
    uint32_t policy_timeout_ms;   /* 0 = 2000; no verdict by then = deny */
    uint32_t max_pending;         /* 0 = 256 decisions in flight; more = deny */
    uint32_t udp_idle_timeout_ms; /* 0 = 60000 (UDP and ICMP flows) */
    uint32_t dial_timeout_ms;     /* 0 = 10000; upstream connect timeout */
    uint32_t peek_timeout_ms;     /* 0 = 300; PEEK: the first message is complete within
                                     this long of its first byte; OBSERVE: an empty
                                     FLOW_DATA after this long without bytes */
    uint32_t flags;               /* CORRAL_CONFIG_* */
    int32_t pcap_fd;              /* CORRAL_CONFIG_PCAP: pcap file (libpcap 2.4, ethernet,
                                     both directions, both modes); Go dups it, the
                                     caller closes its own.  A failed write stops the
                                     capture (stats.pcap_errors), not the network. */
} corral_config;

typedef struct corral_event {
    uint64_t id;          /* flow id (NEW_FLOW/FLOW_CLOSED) or query id (DNS_QUERY) */
    int32_t kind;         /* CORRAL_EV_* */
    int32_t proto;        /* CORRAL_PROTO_* (DNS: the transport) */
    uint32_t flags;       /* CORRAL_FLAG_* */
    int32_t reason;       /* CORRAL_REASON_* (FLOW_CLOSED, DECIDED NEW_FLOW) */
    uint8_t family;       /* 4 or 6 */
    uint8_t pad[3];
    uint16_t src_port;    /* sandbox side for outbound flows */
    uint16_t dst_port;
    uint8_t src_ip[16];
    uint8_t dst_ip[16];
    uint64_t bytes_out;   /* sandbox -> world payload bytes */
    uint64_t bytes_in;    /* world -> sandbox payload bytes */
    uint64_t duration_ns; /* FLOW_CLOSED: since NEW_FLOW */
    uint32_t payload_off; /* DNS_QUERY, FLOW_DATA: bytes at payload[off:off+len] */
    uint32_t payload_len;
} corral_event;

typedef struct corral_verdict {
    uint64_t id;          /* flow id from NEW_FLOW / FLOW_DATA */
    int32_t action;       /* CORRAL_VERDICT_* */
    uint16_t dial_port;   /* allow/peek: 0 = the original port */
    uint8_t dial_family;  /* allow: 0 = dial the original address, else 4/6 */
    uint8_t pad;
    uint8_t dial_ip[16];  /* allow with dial_family != 0: dial this instead */
} corral_verdict;

typedef struct corral_stats {
    uint64_t flows_total;   /* flows seen (NEW_FLOW events) */
    uint64_t flows_open;    /* NEW_FLOW without FLOW_CLOSED yet */
    uint64_t pending;       /* decisions waiting for a verdict */
    uint64_t dns_queries;   /* DNS messages delivered */
    uint64_t frames_in;     /* frames sandbox -> stack */
    uint64_t frames_out;    /* frames stack -> sandbox */
    uint64_t drops;         /* frames dropped (queue full, malformed, stack drops) */
    uint64_t events_queued; /* events waiting for poll_events */
    uint64_t goroutines;    /* runtime.NumGoroutine() (whole library) */
    uint64_t pcap_frames;   /* frames written to the pcap file */
    uint64_t pcap_errors;   /* 1 once a pcap write failed (capture stopped) */
    uint64_t log_lines;     /* lines gVisor logged (dropped, never printed; whole library) */
    uint64_t refused;       /* new flows / DNS queries / DNS-TCP connections a bound refused (in drops too) */
} corral_stats;

/* ABI version the library was compiled with. */
int corral_abi_version(void);

/* Create a stack; returns a handle > 0. */
int corral_stack_new(corral_config *cfg);

/* End every flow (each queues its FLOW_CLOSED: reason SHUTDOWN, with its byte
 * counts), stop the link, wait for the flows' goroutines.  No new flow starts;
 * poll_events still works until corral_stack_close.  Idempotent. */
int corral_stack_shutdown(int h);

/* Shut down (if not done yet), free the stack, close the eventfd.
 * Idempotent: closing a closed or unknown handle returns CORRAL_OK. */
int corral_stack_close(int h);

/* The stack's eventfd (non-blocking; owned by the stack, do not close). */
int corral_stack_eventfd(int h);

/* Move up to cap events into evs; DNS_QUERY and FLOW_DATA payloads are packed into payload
 * (payload_cap bytes).  Returns the number of events (< cap = drained). */
int corral_stack_poll_events(int h, corral_event *evs, int cap,
                             uint8_t *payload, uint32_t payload_cap);

/* Apply n verdicts.  Returns how many matched a pending flow; ids that
 * already timed out are skipped silently (their FLOW_CLOSED says so). */
int corral_stack_set_verdicts(int h, corral_verdict *v, int n);

/* Answer DNS query qid with one DNS message (len 0 = drop the query).
 * CORRAL_EUNKNOWN if the query expired or was answered. */
int corral_stack_dns_reply(int h, uint64_t qid, uint8_t *buf, uint32_t len);

/* Pump mode: inject n ethernet frames packed back to back in buf, lens[i]
 * bytes each.  Returns the number injected. */
int corral_stack_inject(int h, uint8_t *buf, uint32_t *lens, int n);

/* Pump mode: move up to max outbound frames, packed into buf (cap bytes),
 * lengths in lens.  Returns the count; CORRAL_ENOSPC if the next frame does
 * not fit an empty buf (give it mtu + 14 bytes at least). */
int corral_stack_read_frames(int h, uint8_t *buf, uint32_t cap, uint32_t *lens, int max);

/* Listen on host_ip:host_port (a literal IP; port 0 = pick one) in the
 * caller's network namespace and forward each connection (TCP) or each
 * client address (UDP) to the sandbox's port.  Returns the bound host port. */
int corral_stack_publish(int h, int proto, char *host_ip, int host_port, int sandbox_port);

/* Counters, see corral_stats. */
int corral_stack_stats(int h, corral_stats *out);

/* Process attribution (issue 13): one flow's addresses as the sandbox sees them. */
typedef struct corral_flow_addr {
    uint8_t proto;     /* CORRAL_PROTO_TCP or CORRAL_PROTO_UDP */
    uint8_t family;    /* 4 or 6 */
    uint16_t src_port; /* the sandbox's end */
    uint16_t dst_port;
    uint8_t src[16];
    uint8_t dst[16];
} corral_flow_addr;

/* The socket inode of each of n flows (inodes[i]; 0: no socket has those
 * addresses), asked over diag_fd, a NETLINK_SOCK_DIAG socket opened in the
 * sandbox's network namespace; a v4 flow not found is asked again as a
 * v4-mapped address (dual-stack AF_INET6 socket).  Waits at most timeout_ms
 * for the kernel.  Returns CORRAL_OK, or CORRAL_EINTERNAL with the errno in
 * *err (no stack handle: nothing in corral_last_error). */
int corral_socket_inodes(int diag_fd, corral_flow_addr *flows, int n, uint32_t *inodes,
                         int timeout_ms, int32_t *err);

/* Which of n_pids processes (host pids) hold each of n socket inodes, from
 * their /proc/PID/fd links: holders[i*max_holders + j] for j < counts[i], in
 * the order of pids.  A process that ended is skipped.  Returns CORRAL_OK. */
int corral_socket_holders(uint32_t *inodes, int n, int32_t *pids, int n_pids,
                          int32_t *holders, int max_holders, int32_t *counts);

/* Text of the last error on this handle (h = 0: errors of corral_stack_new),
 * NUL-terminated, truncated to cap.  Returns the full length. */
int corral_last_error(int h, char *buf, int cap);

#endif
