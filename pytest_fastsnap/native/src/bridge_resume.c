/* Owns the bridge's side of QEMU's postcopy recovery handshake (`serve
 * --resume`, see bridge_resume.h): the RECV_BITMAP command payload, reading
 * and checking the destination's received-page bitmaps (hostile input),
 * claiming the pages the destination already has, and the RESUME_ACK.
 * bridge.c sends the commands and waits; this file only parses and marks.
 *
 * The recovery sequence with and without the postcopy-preempt channel, as
 * QEMU 10.0/10.2 destinations run it (migration/savevm.c
 * postcopy_pause_incoming, loadvm_postcopy_handle_resume; migration.c
 * qmp_migrate_recover, migration_ioc_process_incoming,
 * postcopy_try_recover; postcopy-ram.c postcopy_preempt_new_channel,
 * postcopy_preempt_thread; the source side it mirrors: migration.c
 * postcopy_do_resume), checked against 10.0.2 and 10.2.2 by
 * tests/test_bridge_recovery.py:
 *
 *  0. Loss.  The destination closes the main channel, its return path and
 *     the preempt channel (the preempt thread, its read failed, waits on
 *     postcopy_pause_sem_fast_load), drops every partly assembled host page
 *     of every channel, and goes to `postcopy-paused`.  A page counts as
 *     received only once placed (receivedmap), so a page that was in flight
 *     on the old preempt (or main) channel and not placed is simply missing
 *     from the bitmaps below and is sent again, once.
 *  1. `migrate-recover URI` (only in postcopy-paused): the old listener is
 *     released, a new one made; the state stays `postcopy-paused` until a
 *     connection comes (`postcopy-recover-setup` is a *source* state, 9.1+;
 *     a destination never reports it).  So a resumed loader lost before it
 *     connects leaves the destination paused, and another migrate-recover is
 *     accepted.
 *  2. The first connection is the main channel (10.0: by order, the main
 *     file is unset; 10.1+: by peeking, where a paused destination takes a
 *     stream without the QEVM magic as main): return path re-opened, state
 *     `postcopy-recover`, only the main load thread woken.
 *  3. source -> CMD_RECV_BITMAP per block; dest -> RP RECV_BITMAP (format
 *     in bridge_resume.h).  The answers prove the main channel was taken.
 *  4. --preempt: now the second connection.  With the main channel set, a
 *     destination with postcopy-preempt takes any further connection as the
 *     new preempt channel (postcopy_preempt_new_channel, posting
 *     postcopy_qemufile_dst_done); QEMU's own source opens it exactly here
 *     (after resume_prepare, before the RESUME handshake).  Then PING 2 and
 *     its PONG, as at the first start (a destination without the capability
 *     drops the connection: E_CONNECT).
 *  5. source -> CMD_POSTCOPY_RESUME.  The destination: state
 *     `postcopy-active`, RESUME_ACK, then it re-sends every page request
 *     still pending (REQ_PAGES_ID first: its last block was reset) on the
 *     return path, wakes its fault thread, and, with preempt, *waits* for
 *     the new preempt channel before waking the preempt thread.  A RESUME
 *     sent before the preempt connection would leave the load thread
 *     blocked on that semaphore with no read to fail: `postcopy-active`
 *     with no source, never paused again (seen on 10.0.2 with the order
 *     reversed and that loader killed: `postcopy-active` for good,
 *     migrate-pause no help, migrate-recover refused: "can only be run
 *     when postcopy is paused").  Hence 4 before 5, always.
 *  6. Re-sent requests are answered first: without preempt by the main
 *     thread before any eager page; with preempt by the return-path thread
 *     directly on the new channel, as bare ram records whose first record
 *     names its block (the destination's per-channel last block is not
 *     reset by the pause, so a CONTINUE there would be read against the old
 *     channel's block).  Nothing else goes on that channel (no EOS).  The
 *     eager stream of the rest follows on the main channel; END, EOF, SHUT.
 *
 * Edge left to QEMU: a loader lost between 4 and 5 leaves one unconsumed
 * post of postcopy_qemufile_dst_done, so the next resume's wait returns at
 * once; the loader's PING/PONG after the preempt connect gives the main
 * loop time to accept it first (10.2.2 asserts the channel is there).
 * tests/test_bridge_recovery.py kills a resumed loader at 1 (before it
 * connects), between 3 and 4, and between 4 and 5: each is resumed again. */
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

int br_resume_read_bitmap(struct br_resume *r, struct br_snap *snap, struct br_rbuf *rb,
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
    int rc = br_rbuf_read(rb, w, 8);
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
        rc = br_rbuf_read(rb, buf, n);
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
    rc = br_rbuf_read(rb, w, 8);
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
