/* Postcopy recovery for the bridge (`serve --resume`): the source side of
 * QEMU's recovery handshake after a destination paused on a lost source.
 *
 *   source -> dest   CMD_RECV_BITMAP (str8 idstr), one per RAMBlock
 *   dest -> source   RP RECV_BITMAP frame (str8 idstr), then outside the
 *                    frame: be64 size, `size` bytes LE bitmap (bit i = page
 *                    i received), be64 end mark 0x0123456789abcdef
 *   source -> dest   CMD_POSTCOPY_RESUME
 *   dest -> source   RP RESUME_ACK (be32 1), then it re-sends every page
 *                    request still pending
 *
 * (QEMU 10.0 migration/ram.c ramblock_recv_bitmap_send and
 * ram_dirty_bitmap_reload: size = ROUND_UP(DIV_ROUND_UP(pages, 8), 8).)
 * Every page the bitmap says the destination has is *claimed* in the
 * block's core bitmap, so neither a request nor the eager stream sends it
 * again (a second placement is EEXIST and pauses postcopy again).
 *
 * Everything from the peer is hostile: an unknown or unrequested block, a
 * second bitmap for a block, a wrong size, a missing end mark, a message
 * cut short, an ACK other than 1 or before RESUME give E_DEST_PROTOCOL. */
#ifndef FASTSNAP_BRIDGE_RESUME_H
#define FASTSNAP_BRIDGE_RESUME_H

#include <stddef.h>
#include <stdint.h>

#include "bridge_snap.h"
#include "mr_errors.h"

struct br_rbuf;     /* bridge_net.h */

#define BR_CMD_POSTCOPY_RESUME 9
#define BR_CMD_RECV_BITMAP 10
#define BR_RP_RECV_BITMAP 5
#define BR_RP_RESUME_ACK 6
#define BR_RECV_BITMAP_END 0x0123456789abcdefull
#define BR_RESUME_ACK_VALUE 1u

struct br_resume {
    int active;             /* --resume given */
    uint8_t *got;           /* per block: its RECV_BITMAP arrived */
    size_t nblocks, ngot;
    int resume_sent, acked;
    uint64_t pages_present; /* pages the destination already had */
    uint64_t pages_present_zero;  /* ... of them clear in the file */
};

/* 0, or -1 (out of memory) with err set. */
int br_resume_init(struct br_resume *r, size_t nblocks, mr_error *err);
void br_resume_free(struct br_resume *r);

/* CMD_RECV_BITMAP payload for blk into out (>= 256 bytes); its length. */
size_t br_resume_bitmap_cmd(const struct br_block *blk, uint8_t *out);

/* One block's bitmap, read and applied to its core; committed into the
 * br_resume (under the caller's lock) by br_resume_commit. */
struct br_bitmap_got {
    size_t block;
    uint64_t present, present_zero;
};

/* Return-path thread, without the lock the waiter holds (it blocks on rb):
 * a RECV_BITMAP frame's payload (len bytes, already read) arrived on rb;
 * reads the rest of the message from rb and claims every page it marks
 * received.  0, or -1 with err set (E_DEST_PROTOCOL; E_DEST_GONE if the
 * connection ends inside it).  Only this thread writes r->got. */
int br_resume_read_bitmap(struct br_resume *r, struct br_snap *snap, struct br_rbuf *rb,
                          const uint8_t *payload, uint16_t len, struct br_bitmap_got *got,
                          mr_error *err);
void br_resume_commit(struct br_resume *r, const struct br_bitmap_got *got);

/* Return-path thread, under the lock that guards resume_sent: a RESUME_ACK
 * frame.  0, or -1 with err set. */
int br_resume_ack(struct br_resume *r, const uint8_t *payload, uint16_t len, mr_error *err);

#endif
