/* Owns the bridge's transports (bridge_net.h): strict parsing of --to and
 * connecting to a unix or TCP destination; nothing else in the loader opens
 * a network socket. */
#define _GNU_SOURCE
#include "bridge_net.h"

#include "mr_errors.h"
#include "mr_num.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int valid_hostname(const char *h, size_t n)
{
    /* RFC 1123 labels: letters, digits, '-', separated by single dots. */
    if (n == 0 || n > 253)
        return 0;
    size_t label = 0;
    for (size_t i = 0; i < n; i++) {
        char c = h[i];
        if (c == '.') {
            if (label == 0 || h[i - 1] == '-')
                return 0;
            label = 0;
            continue;
        }
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 (c == '-' && label > 0);
        if (!ok || ++label > 63)
            return 0;
    }
    return h[n - 1] != '-' && h[n - 1] != '.';
}

static int parse_tcp(const char *to, struct br_net_addr *a, mr_error *err)
{
    const char *rest = to + 4, *host, *colon;
    size_t hlen;
    if (*rest == '[') {
        const char *close = strchr(rest, ']');
        if (!close)
            return mr_error_set(err, E_USAGE, "--to %s: '[' without ']' around the IPv6 "
                                "address (tcp:[::1]:PORT)", to);
        host = rest + 1;
        hlen = (size_t)(close - host);
        if (close[1] != ':')
            return mr_error_set(err, E_USAGE, "--to %s: expected ':PORT' after ']' "
                                "(tcp:[ADDR]:PORT)", to);
        colon = close + 1;
        char buf[64];
        struct in6_addr v6;
        if (hlen == 0 || hlen >= sizeof buf)
            return mr_error_set(err, E_USAGE, "--to %s: not an IPv6 address in brackets", to);
        memcpy(buf, host, hlen);
        buf[hlen] = 0;
        if (inet_pton(AF_INET6, buf, &v6) != 1)
            return mr_error_set(err, E_USAGE, "--to %s: '%s' is not an IPv6 address", to, buf);
    } else {
        colon = strrchr(rest, ':');
        if (!colon)
            return mr_error_set(err, E_USAGE, "--to %s: expected tcp:HOST:PORT", to);
        host = rest;
        hlen = (size_t)(colon - rest);
        if (memchr(host, ':', hlen))
            return mr_error_set(err, E_USAGE, "--to %s: an IPv6 address needs brackets: "
                                "tcp:[ADDR]:PORT", to);
        if (hlen == 0)
            return mr_error_set(err, E_USAGE, "--to %s: HOST is empty (tcp:HOST:PORT)", to);
        int dotted_digits = 1;
        for (size_t i = 0; i < hlen; i++)
            if (!(host[i] == '.' || (host[i] >= '0' && host[i] <= '9')))
                dotted_digits = 0;
        char buf[256];
        if (hlen >= sizeof buf)
            return mr_error_set(err, E_USAGE, "--to %s: HOST longer than 253 bytes", to);
        memcpy(buf, host, hlen);
        buf[hlen] = 0;
        struct in_addr v4;
        if (dotted_digits && inet_pton(AF_INET, buf, &v4) != 1)
            return mr_error_set(err, E_USAGE, "--to %s: '%s' is not an IPv4 address", to, buf);
        if (!dotted_digits && !valid_hostname(host, hlen))
            return mr_error_set(err, E_USAGE, "--to %s: '%s' is not a host name or address",
                                to, buf);
    }
    const char *port = colon + 1;
    uint64_t n;
    size_t plen = strlen(port);
    int digits = plen > 0 && plen <= 5 && !(plen > 1 && port[0] == '0');
    for (size_t i = 0; i < plen; i++)
        if (port[i] < '0' || port[i] > '9')
            digits = 0;
    if (!digits || mr_parse_u64(port, &n) != 0 || n < 1 || n > 65535)
        return mr_error_set(err, E_USAGE, "--to %s: port '%s' is not a decimal number 1..65535",
                            to, port);
    memcpy(a->host, host, hlen);
    a->host[hlen] = 0;
    snprintf(a->port, sizeof a->port, "%u", (unsigned)n);
    a->kind = BR_NET_TCP;
    return 0;
}

int br_net_parse(const char *to, struct br_net_addr *a, mr_error *err)
{
    memset(a, 0, sizeof *a);
    a->fd = -1;
    if (strncmp(to, "fd:", 3) == 0) {
        uint64_t fd;
        const char *s = to + 3;
        int digits = *s != 0 && !(s[0] == '0' && s[1]);
        for (const char *p = s; *p; p++)
            if (*p < '0' || *p > '9')
                digits = 0;
        if (!digits || mr_parse_u64(s, &fd) != 0 || fd > 65535)
            return mr_error_set(err, E_USAGE, "--to %s: fd must be a decimal number 0..65535", to);
        a->kind = BR_NET_FD;
        a->fd = (int)fd;
        return 0;
    }
    if (strncmp(to, "unix:", 5) == 0) {
        size_t n = strlen(to + 5);
        if (n == 0)
            return mr_error_set(err, E_USAGE, "--to unix: needs a socket path");
        if (n >= sizeof a->path)
            return mr_error_set(err, E_USAGE, "socket path longer than %zu bytes: %s",
                                sizeof a->path - 1, to + 5);
        memcpy(a->path, to + 5, n + 1);
        a->kind = BR_NET_UNIX;
        return 0;
    }
    if (strncmp(to, "tcp:", 4) == 0)
        return parse_tcp(to, a, err);
    return mr_error_set(err, E_USAGE, "--to must be unix:PATH, tcp:HOST:PORT or fd:N, got %s",
                        to);
}

int br_net_can_reconnect(const struct br_net_addr *a) { return a->kind != BR_NET_FD; }

static double mono(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void pause_10ms(void)
{
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
}

/* Block until something is created in the socket's directory (inotify),
 * at most *wait_s*; without inotify, a 10 ms pause.  The caller retries. */
static void wait_for_entry(int ino, double wait_s)
{
    if (ino < 0) {
        pause_10ms();
        return;
    }
    struct pollfd p = {.fd = ino, .events = POLLIN};
    int ms = (int)(wait_s * 1000.0) + 1;
    if (poll(&p, 1, ms > 100 ? 100 : ms) > 0) {
        char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
        while (read(ino, buf, sizeof buf) > 0)
            ;       /* drained; what was created does not matter: retry */
    }
}

static void *close_fd_main(void *arg)
{
    close((int)(intptr_t)arg);
    return NULL;
}

/* Closing an inotify instance waits for an SRCU grace period (fsnotify's
 * mark reaper): 5-15 ms here, with the destination waiting for its first
 * byte (perf sched: the loader in D state right after connect() returned).
 * A detached thread closes it instead; without a thread, close() here. */
static void close_off_path(int fd)
{
    pthread_attr_t at;
    pthread_t t;
    int ok = pthread_attr_init(&at) == 0;
    if (ok) {
        ok = pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED) == 0 &&
             pthread_create(&t, &at, close_fd_main, (void *)(intptr_t)fd) == 0;
        pthread_attr_destroy(&at);
    }
    if (!ok)
        close(fd);
}

/* A loader started before the destination listens (the strategy starts it
 * first, so its start-up is not on the restore's clock) connects within
 * microseconds of QEMU's bind(): an inotify watch on the directory wakes it,
 * and between bind() and listen() (ECONNREFUSED) it retries every 100 us. */
static int connect_unix(const struct br_net_addr *a, double timeout, mr_error *err)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, a->path, strlen(a->path) + 1);
    char dir[sizeof sa.sun_path];
    memcpy(dir, a->path, strlen(a->path) + 1);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        slash[1] = 0;
    else if (slash)
        *slash = 0;
    else
        memcpy(dir, ".", 2);
    int ino = -1;
    double deadline = mono() + timeout;
    int rc = -1;
    for (;;) {
        int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0) {
            mr_error_set(err, E_CONNECT, "socket: %s", strerror(errno));
            break;
        }
        if (connect(s, (struct sockaddr *)&sa, sizeof sa) == 0) {
            rc = s;
            break;
        }
        int e = errno;
        close(s);
        double left = deadline - mono();
        if ((e != ENOENT && e != ECONNREFUSED) || left < 0) {
            mr_error_set(err, E_CONNECT, "connect %s: %s", a->path, strerror(e));
            break;
        }
        if (e == ENOENT && ino == -1) {
            /* Watch first, then retry once before waiting: a socket created
             * between the failed connect and the watch is not missed. */
            ino = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
            if (ino >= 0 && inotify_add_watch(ino, dir, IN_CREATE | IN_MOVED_TO) < 0) {
                close(ino);
                ino = -1;
            }
            if (ino < 0)
                ino = -2;       /* no watch possible (e.g. no directory yet): poll */
            continue;
        }
        if (e == ENOENT) {
            wait_for_entry(ino, left);
        } else {
            struct timespec ts = {0, 100 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    if (ino >= 0)
        close_off_path(ino);
    return rc;
}

/* connect() bounded by *deadline* (a filtered host would otherwise hold a
 * blocking connect for the kernel's SYN retries, minutes): 0, or -1 with
 * errno (ETIMEDOUT when the deadline passed).  The socket ends blocking. */
static int connect_until(int s, const struct sockaddr *sa, socklen_t len, double deadline)
{
    int flags = fcntl(s, F_GETFL);
    if (flags < 0 || fcntl(s, F_SETFL, flags | O_NONBLOCK) < 0)
        return -1;
    int rc = connect(s, sa, len);
    if (rc < 0 && errno == EINPROGRESS) {
        for (;;) {
            double left = deadline - mono();
            struct pollfd pfd = {.fd = s, .events = POLLOUT};
            int n = poll(&pfd, 1, left > 0 ? (int)(left * 1000) + 1 : 0);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                return -1;
            if (n == 0 && left <= 0) {
                errno = ETIMEDOUT;
                return -1;
            }
            if (n == 0)
                continue;
            int soerr = 0;
            socklen_t sl = sizeof soerr;
            if (getsockopt(s, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0)
                return -1;
            if (soerr != 0) {
                errno = soerr;
                return -1;
            }
            rc = 0;
            break;
        }
    }
    if (rc < 0)
        return -1;
    return fcntl(s, F_SETFL, flags);
}

static int connect_tcp(const struct br_net_addr *a, double timeout, mr_error *err)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV}, *res = NULL;
    int g = getaddrinfo(a->host, a->port, &hints, &res);
    if (g != 0)
        return mr_error_set(err, g == EAI_NONAME || g == EAI_FAIL || g == EAI_NODATA ? E_USAGE
                            : E_CONNECT, "--to tcp:%s:%s: cannot resolve '%s': %s", a->host,
                            a->port, a->host, gai_strerror(g));
    double deadline = mono() + timeout;
    int e = 0;
    for (;;) {
        for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
            int s = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (s < 0) {
                e = errno;
                continue;
            }
            if (connect_until(s, ai->ai_addr, ai->ai_addrlen, deadline) == 0) {
                int one = 1;
                if (setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) {
                    e = errno;
                    close(s);
                    freeaddrinfo(res);
                    return mr_error_set(err, E_CONNECT, "TCP_NODELAY: %s", strerror(e));
                }
                freeaddrinfo(res);
                return s;
            }
            e = errno;
            close(s);
        }
        if (e != ECONNREFUSED || mono() > deadline)
            break;
        pause_10ms();
    }
    freeaddrinfo(res);
    return mr_error_set(err, E_CONNECT, "connect tcp:%s:%s: %s", a->host, a->port, strerror(e));
}

int br_net_connect(const struct br_net_addr *a, double timeout, mr_error *err)
{
    switch (a->kind) {
    case BR_NET_FD: return a->fd;
    case BR_NET_UNIX: return connect_unix(a, timeout, err);
    case BR_NET_TCP: return connect_tcp(a, timeout, err);
    }
    return mr_error_set(err, E_INTERNAL, "no transport");
}

int br_recv_all(int fd, uint8_t *buf, size_t n)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = recv(fd, buf + done, n - done, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r == 0 ? 0 : -1;
        done += (size_t)r;
    }
    return 1;
}

void br_rbuf_init(struct br_rbuf *rb, int fd)
{
    rb->fd = fd;
    rb->head = rb->tail = 0;
}

int br_rbuf_read(struct br_rbuf *rb, uint8_t *dst, size_t n)
{
    for (;;) {
        size_t have = rb->tail - rb->head, take = have < n ? have : n;
        memcpy(dst, rb->buf + rb->head, take);
        rb->head += take;
        dst += take;
        n -= take;
        if (n == 0)
            return 1;
        rb->head = rb->tail = 0;
        if (n >= sizeof rb->buf)        /* a large read (a bitmap) goes straight */
            return br_recv_all(rb->fd, dst, n);
        ssize_t r = recv(rb->fd, rb->buf, sizeof rb->buf, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r == 0 ? 0 : -1;
        rb->tail = (size_t)r;
    }
}
