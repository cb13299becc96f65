/* Working-set files of the bridge (`serve --record-ws FILE`, `--ws FILE`):
 * which pages a destination requested during one restore, in the order it
 * first asked for them, so the next restore of the same snapshot can send
 * them first.
 *
 * File format (all integers little-endian; version 1):
 *
 *   offset  size  field
 *   0       8     magic "FSNAPWS1"
 *   8       4     target page size of the snapshot (bytes)
 *   12      4     number of RAM blocks B (1..BR_MAX_BLOCKS)
 *   16      8     number of entries N
 *   24      ...   B blocks, in the snapshot's order: u8 id length L (1..255),
 *                 L bytes of id, u64 used length (bytes)
 *   ...     12*N  entries, in request order: u32 block index (< B),
 *                 u64 target page index within that block (< length / page size)
 *   end     8     u64 FNV-1a hash of every byte before it
 *
 * Reading treats the file as hostile: the size must be exactly what the
 * header says, the block list must be the snapshot's (same ids, lengths
 * and page size: a file recorded on another snapshot layout is refused),
 * every entry must name an existing page, no page may appear twice, N is
 * at most the snapshot's page count (so nothing allocated is larger than
 * the snapshot's own page bitmaps), and the hash must match.  Every
 * refusal is E_WS with one line naming the problem and the byte offset.
 *
 * Recording keeps a bitmap per block (a page is listed the first time it
 * is requested) and appends to a list bounded by the snapshot's page count;
 * the file is written to FILE.tmp and renamed, so a crash never leaves a
 * half-written working set behind.
 */
#ifndef FASTSNAP_BRIDGE_WS_H
#define FASTSNAP_BRIDGE_WS_H

#include <stdint.h>
#include <stdio.h>

#include "bridge_snap.h"

struct br_ws_entry {
    uint32_t block;
    uint64_t page;
};

struct br_ws {
    struct br_ws_entry *e;
    uint64_t n, cap;            /* cap: the snapshot's page count */
    uint64_t **seen;            /* recording: per block, pages already listed */
    size_t nblocks;
};

/* Reading --ws FILE for `snap`: 0, or -1 with err (E_WS, E_OPEN, E_INTERNAL). */
int br_ws_load(struct br_ws *ws, const struct br_snap *snap, const char *path, mr_error *err);
/* Start recording for `snap`: 0, or -1 with err (E_INTERNAL). */
int br_ws_record_init(struct br_ws *ws, const struct br_snap *snap, mr_error *err);
/* Note a request of `count` pages from `page` of block `block` (valid: the
 * return-path reader checked it).  Called by the sender thread only. */
void br_ws_note(struct br_ws *ws, uint32_t block, uint64_t page, uint64_t count);
/* Write the recorded list to path (via path.tmp + rename): 0, or -1 with err (E_IO). */
int br_ws_write(const struct br_ws *ws, const struct br_snap *snap, const char *path,
                mr_error *err);
void br_ws_free(struct br_ws *ws);
/* The file's trailing hash: 64-bit FNV-1a of n bytes. */
uint64_t br_ws_hash(const uint8_t *p, size_t n);

#endif
