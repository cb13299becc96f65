/* Owns the bridge's transports: parsing `--to unix:PATH|fd:N|tcp:HOST:PORT`
 * strictly, and opening a connection to the destination (retrying while the
 * destination is not listening yet).  bridge.c (main channel) and
 * bridge_preempt.c (postcopy-preempt channel) connect through here.
 *
 * tcp:HOST:PORT: HOST is an IPv4 address (a.b.c.d), an IPv6 address in
 * brackets ([::1], as QEMU's own URIs write it) or a host name; PORT is a
 * number 1..65535.  Names resolve with getaddrinfo (every address is tried).
 * TCP connections get TCP_NODELAY: the destination places a requested page
 * only once its whole record has arrived, so it must not wait for Nagle.
 */
#ifndef FASTSNAP_BRIDGE_NET_H
#define FASTSNAP_BRIDGE_NET_H

#include "mr_format.h"  /* mr_error */

#include <stddef.h>
#include <stdint.h>

enum br_net_kind { BR_NET_UNIX = 1, BR_NET_FD, BR_NET_TCP };

struct br_net_addr {
    enum br_net_kind kind;
    char path[108];     /* unix: sun_path */
    int fd;             /* fd: */
    char host[256];     /* tcp: without brackets */
    char port[6];       /* tcp: decimal 1..65535 */
};

/* Parses --to; 0, or -1 with err = E_USAGE naming what is wrong. */
int br_net_parse(const char *to, struct br_net_addr *a, mr_error *err);

/* Connects to a (unix, tcp; an fd is returned as is), retrying refused /
 * not-yet-existing endpoints for up to timeout seconds.  Returns the socket,
 * or -1 with err (E_CONNECT; E_USAGE for a host name that does not resolve). */
int br_net_connect(const struct br_net_addr *a, double timeout, mr_error *err);

/* Can this transport carry a second (preempt) connection?  fd: cannot. */
int br_net_can_reconnect(const struct br_net_addr *a);

/* Read exactly n bytes from a socket (EINTR retried): 1 all read, 0 the peer
 * closed first, -1 error (errno). */
int br_recv_all(int fd, uint8_t *buf, size_t n);

/* A buffered reader for the return path: one recv() usually brings a whole
 * message (header and payload) or several, where reading them exactly took
 * two recv() calls each; a page request's path is that much shorter. */
struct br_rbuf {
    int fd;
    size_t head, tail;
    uint8_t buf[4096];
};

void br_rbuf_init(struct br_rbuf *rb, int fd);

/* Like br_recv_all, from the buffer first: 1 all read, 0 the peer closed
 * first, -1 error (errno). */
int br_rbuf_read(struct br_rbuf *rb, uint8_t *dst, size_t n);

#endif
