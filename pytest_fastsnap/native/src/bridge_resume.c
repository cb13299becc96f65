/* Owns the bridge's side of QEMU's postcopy recovery handshake (`serve
 * --resume`, see bridge_resume.h): the RECV_BITMAP command payload, reading
 * and checking the destination's received-page bitmaps (hostile input),
 * claiming the pages the destination already has, and the RESUME_ACK.
 * bridge.c sends the commands and waits; this file only parses and marks. */
#define _GNU_SOURCE
#include "bridge_resume.h"

#include "bridge_net.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int br_resume_init(struct br_resume *r, size_t nblocks, mr_error *err)
{
    r->got = calloc(nblocks ? nblocks : 1, 1);
    if (!r->got)
        return mr_error_set(err, E_INTERNAL, "out of memory");
    r->nblocks = nblocks;
    return 0;
}

void br_resume_free(struct br_resume *r)
{
    free(r->got);
    r->got = NULL;
}

size_t br_resume_bitmap_cmd(const struct br_block *blk, uint8_t *out)
{
    out[0] = blk->idlen;
    memcpy(out + 1, blk->id, blk->idlen);
    return (size_t)blk->idlen + 1;
}

static uint64_t be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static int cut_short(mr_error *err, const char *id, const char *where, int r)
{
    return mr_error_set(err, E_DEST_GONE, "return path ended inside the RECV_BITMAP of block "
                        "%s (%s)%s%s", id, where, r < 0 ? ": " : "",
                        r < 0 ? strerror(errno) : "");
}

int br_resume_read_bitmap(struct br_resume *r, struct br_snap *snap, int fd,
                          const uint8_t *payload, uint16_t len, struct br_bitmap_got *got,
                          mr_error *err)
{
    if (!r->active)
        return mr_error_set(err, E_DEST_PROTOCOL, "RECV_BITMAP from the destination, but "
                            "no bitmap was asked for (not a --resume run)");
    if (len < 1 || (size_t)payload[0] + 1 != len)
        return mr_error_set(err, E_DEST_PROTOCOL, "RECV_BITMAP frame of %u bytes does not "
                            "hold one block name (name length %u)", len, len ? payload[0] : 0);
    char id[256];
    memcpy(id, payload + 1, payload[0]);
    id[payload[0]] = 0;
    size_t bi = snap->nblocks;
    for (size_t i = 0; i < snap->nblocks; i++)
        if (snap->blocks[i].idlen == payload[0] &&
            memcmp(snap->blocks[i].id, payload + 1, payload[0]) == 0)
            bi = i;
    if (bi == snap->nblocks)
        return mr_error_set(err, E_DEST_PROTOCOL, "RECV_BITMAP for block \"%s\", which the "
                            "snapshot does not have", id);
    if (bi >= r->nblocks || r->got[bi])
        return mr_error_set(err, E_DEST_PROTOCOL, "second RECV_BITMAP for block %s", id);
    struct br_block *blk = &snap->blocks[bi];
    uint8_t w[8];
    int rc = br_recv_all(fd, w, 8);
    if (rc <= 0)
        return cut_short(err, id, "before its size", rc);
    uint64_t size = be64(w), want = (blk->npages + 7) / 8;
    want = (want + 7) / 8 * 8;
    if (size != want)
        return mr_error_set(err, E_DEST_PROTOCOL, "RECV_BITMAP for block %s says %llu bytes; "
                            "its %llu pages need %llu", id, (unsigned long long)size,
                            (unsigned long long)blk->npages, (unsigned long long)want);
    uint8_t buf[4096];
    uint64_t present = 0, present_zero = 0;
    for (uint64_t off = 0; off < size;) {
        size_t n = size - off > sizeof buf ? sizeof buf : (size_t)(size - off);
        rc = br_recv_all(fd, buf, n);
        if (rc <= 0)
            return cut_short(err, id, "inside the bitmap", rc);
        for (size_t i = 0; i < n; i++) {
            for (unsigned bit = 0; buf[i] >> bit; bit++) {
                uint64_t page = (off + i) * 8 + bit;
                if (!(buf[i] >> bit & 1) || page >= blk->npages)
                    continue;   /* bits past the block are padding */
                if (mr_core_claim(blk->core, page)) {
                    present++;
                    present_zero += !mr_core_bit(blk->core, page);
                }
            }
        }
        off += n;
    }
    rc = br_recv_all(fd, w, 8);
    if (rc <= 0)
        return cut_short(err, id, "before its end mark", rc);
    if (be64(w) != BR_RECV_BITMAP_END)
        return mr_error_set(err, E_DEST_PROTOCOL, "RECV_BITMAP for block %s ends in %#llx, "
                            "not the end mark %#llx", id, (unsigned long long)be64(w),
                            (unsigned long long)BR_RECV_BITMAP_END);
    r->got[bi] = 1;
    *got = (struct br_bitmap_got){.block = bi, .present = present, .present_zero = present_zero};
    return 0;
}

void br_resume_commit(struct br_resume *r, const struct br_bitmap_got *got)
{
    r->ngot++;
    r->pages_present += got->present;
    r->pages_present_zero += got->present_zero;
}

int br_resume_ack(struct br_resume *r, const uint8_t *payload, uint16_t len, mr_error *err)
{
    if (!r->active || !r->resume_sent)
        return mr_error_set(err, E_DEST_PROTOCOL, "RESUME_ACK before POSTCOPY_RESUME was sent");
    if (len != 4)
        return mr_error_set(err, E_DEST_PROTOCOL, "RESUME_ACK with length %u (4 expected)", len);
    uint32_t v = (uint32_t)payload[0] << 24 | (uint32_t)payload[1] << 16 |
                 (uint32_t)payload[2] << 8 | payload[3];
    if (v != BR_RESUME_ACK_VALUE)
        return mr_error_set(err, E_DEST_PROTOCOL, "RESUME_ACK value %u (1 expected)", v);
    if (r->acked)
        return mr_error_set(err, E_DEST_PROTOCOL, "second RESUME_ACK");
    r->acked = 1;
    return 0;
}
