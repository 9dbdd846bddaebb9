/* netbench: the small, fast server and clients the network benchmark needs.
 *
 * A Python server or client would be the bottleneck of a connection-rate or latency
 * measurement on 2 vCPUs, so these are plain C (built by benchmarks/network.py with
 * `cc -O2 -pthread`).  Every mode is bounded in count and time.
 *
 *   netbench server ADDR PORT          one thread per connection.  A connection whose
 *                                      first byte is 'G' is HTTP/1.1 (keep-alive, fixed
 *                                      2-byte body); any other connection is echoed.
 *   netbench connrate ADDR PORT N C    N connections, C at a time: connect, GET, read
 *                                      exactly the response (stops at Content-Length,
 *                                      does not wait for the server's FIN), close.
 *                                      Prints {"conns_per_s":..,"errors":..}.
 *   netbench rr ADDR PORT N            one connection, TCP_NODELAY, N 1-byte round trips
 *                                      after N/10 warm-up ones.  Prints median/p99 in us.
 *   netbench hold ADDR PORT N SECONDS  open N connections, print "ready", keep them
 *                                      open SECONDS, then exit.
 *   netbench spin                      SCHED_IDLE busy loop (keeps a vCPU awake) for at
 *                                      most 600 s.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static const char RESPONSE[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
static const char REQUEST[] = "GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

static struct sockaddr_storage target;
static socklen_t target_len;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "netbench: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void resolve(const char *addr, const char *port) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST}, *res;
    int rc = getaddrinfo(addr, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "netbench: bad address %s: %s\n", addr, gai_strerror(rc));
        exit(2);
    }
    memcpy(&target, res->ai_addr, res->ai_addrlen);
    target_len = res->ai_addrlen;
    freeaddrinfo(res);
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static int dial(void) {
    int fd = socket(target.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* A lost reply must not hang the benchmark: it becomes an error after 10 s. */
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&target, target_len) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n <= 0) return -1;
        buf += n;
        len -= n;
    }
    return 0;
}

/* ------------------------------------------------------------------ server */

static void *serve_conn(void *arg) {
    int fd = (int)(long)arg;
    char buf[65536];
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    ssize_t n = read(fd, buf, sizeof buf);
    if (n > 0 && buf[0] == 'G') {
        size_t have = n;
        for (;;) {
            /* Answer each complete request head in the buffer. */
            char *end;
            while ((end = memmem(buf, have, "\r\n\r\n", 4)) != NULL) {
                if (write_all(fd, RESPONSE, sizeof RESPONSE - 1) != 0) goto out;
                size_t used = end + 4 - buf;
                memmove(buf, buf + used, have - used);
                have -= used;
            }
            if (have == sizeof buf) goto out;
            n = read(fd, buf + have, sizeof buf - have);
            if (n <= 0) goto out;
            have += n;
        }
    }
    while (n > 0) {
        if (write_all(fd, buf, n) != 0) break;
        n = read(fd, buf, sizeof buf);
    }
out:
    close(fd);
    return NULL;
}

static _Noreturn void run_server(void) {
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(target.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&target, target_len) != 0) die("bind");
    if (listen(ls, 4096) != 0) die("listen");
    printf("listening\n");
    fflush(stdout);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (;;) {
        int fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE) continue;
            die("accept");
        }
        pthread_t t;
        if (pthread_create(&t, &attr, serve_conn, (void *)(long)fd) != 0) close(fd);
    }
}

/* ------------------------------------------------------------------ connrate */

static atomic_int tickets, errors;

static void *connrate_worker(void *arg) {
    (void)arg;
    char buf[4096];
    while (atomic_fetch_sub(&tickets, 1) > 0) {
        int fd = dial();
        if (fd < 0) {
            atomic_fetch_add(&errors, 1);
            continue;
        }
        int ok = write_all(fd, REQUEST, sizeof REQUEST - 1) == 0;
        size_t have = 0, want = sizeof RESPONSE - 1;
        while (ok && have < want) {
            ssize_t n = read(fd, buf + have, sizeof buf - have);
            if (n <= 0) ok = 0;
            else have += n;
        }
        if (!ok) atomic_fetch_add(&errors, 1);
        close(fd);
    }
    return NULL;
}

static int run_connrate(int n, int c) {
    raise_nofile();
    atomic_store(&tickets, n);
    pthread_t *ts = calloc(c, sizeof *ts);
    double t0 = now();
    for (int i = 0; i < c; i++) pthread_create(&ts[i], NULL, connrate_worker, NULL);
    for (int i = 0; i < c; i++) pthread_join(ts[i], NULL);
    double dt = now() - t0;
    int errs = atomic_load(&errors);
    printf("{\"conns_per_s\": %.1f, \"errors\": %d, \"seconds\": %.4f}\n", (n - errs) / dt, errs, dt);
    return errs ? 1 : 0;
}

/* ------------------------------------------------------------------ rr */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int run_rr(int n) {
    int fd = dial();
    if (fd < 0) die("connect");
    char c = 'x';
    double *lat = calloc(n, sizeof *lat);
    int warm = n / 10;
    for (int i = -warm; i < n; i++) {
        double t0 = now();
        if (write(fd, &c, 1) != 1 || read(fd, &c, 1) != 1) die("round trip");
        if (i >= 0) lat[i] = (now() - t0) * 1e6;
    }
    qsort(lat, n, sizeof *lat, cmp_double);
    printf("{\"median_us\": %.2f, \"p99_us\": %.2f, \"min_us\": %.2f}\n", lat[n / 2], lat[n * 99 / 100], lat[0]);
    return 0;
}

/* ------------------------------------------------------------------ hold / spin */

static int run_hold(int n, int seconds) {
    raise_nofile();
    int *fds = calloc(n, sizeof *fds);
    for (int i = 0; i < n; i++) {
        fds[i] = dial();
        if (fds[i] < 0) die("connect");
        if (write(fds[i], "h", 1) != 1 || read(fds[i], &(char){0}, 1) != 1) die("echo");
    }
    printf("ready\n");
    fflush(stdout);
    sleep(seconds);
    return 0;
}

static int run_spin(void) {
    struct sched_param p = {0};
    sched_setscheduler(0, SCHED_IDLE, &p);
    double end = now() + 600;
    volatile unsigned long x = 0;
    while (now() < end)
        for (int i = 0; i < 1000000; i++) x++;
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "spin") == 0) return run_spin();
    if (argc < 4) {
        fprintf(stderr, "usage: netbench server|connrate|rr|hold ADDR PORT ... | spin\n");
        return 2;
    }
    resolve(argv[2], argv[3]);
    if (strcmp(argv[1], "server") == 0) run_server();
    if (strcmp(argv[1], "connrate") == 0 && argc == 6) return run_connrate(atoi(argv[4]), atoi(argv[5]));
    if (strcmp(argv[1], "rr") == 0 && argc == 5) return run_rr(atoi(argv[4]));
    if (strcmp(argv[1], "hold") == 0 && argc == 6) return run_hold(atoi(argv[4]), atoi(argv[5]));
    fprintf(stderr, "netbench: bad arguments\n");
    return 2;
}
