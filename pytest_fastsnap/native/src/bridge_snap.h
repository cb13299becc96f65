/* What the bridge needs from a mapped-ram snapshot: the configuration to
 * regenerate, the early-setup and device-state byte ranges to replay
 * verbatim, and per RAM block its id, length, file bitmap and page region.
 *
 * The strict parser (mr_format.c) validates the file; bridge_snap.c adds
 * the bridge's extras (configuration bytes to replay, early-setup range,
 * bitmaps in memory).  Allocations are bounded by the file size.
 */
#ifndef FASTSNAP_BRIDGE_SNAP_H
#define FASTSNAP_BRIDGE_SNAP_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "mr_core.h"
#include "mr_format.h"

#define BR_MAX_BLOCKS 1024

struct br_block {
    char id[256];
    uint8_t idlen;
    uint64_t length;        /* used_length, bytes */
    uint64_t npages;        /* length / tps */
    uint64_t bitmap_offset; /* absolute file offsets */
    uint64_t pages_offset;
    mr_core_block *core;    /* page state: file bitmap; claimed = (being) put on the wire */
    uint64_t set_pages;     /* pages with data in the file */
    uint64_t host_pages;    /* target pages per destination host page (1; 512 for 2 MiB) */
};

struct br_snap {
    int fd;
    uint64_t file_size;
    uint64_t base;          /* stream start (file:...,offset=N) */
    char machine[256];
    uint32_t machine_len;
    uint32_t tps;
    /* Raw bytes of the configuration subsections worth keeping
     * (target-page-bits, uuid); capabilities are dropped. */
    uint8_t cfg_keep[64];
    size_t cfg_keep_len;
    uint64_t early_off, early_len;  /* early_setup FULL sections */
    uint32_t ram_sid;
    uint64_t ram_total;
    size_t nblocks;
    struct br_block *blocks;
    uint64_t dev_off, dev_len;      /* device-state run, without EOF */
    int has_vmdesc;
    mr_error err;                   /* E_* name (mr_errors.h) and message on failure */
    mr_snapshot ms;                 /* strict parse, kept for core->meta */
    mr_core_block *core;            /* ms.nblocks entries */
};

/* 0 on success; -1 with snap->err set (exit status: mr_error_exit(err.name)). */
int br_snap_open(struct br_snap *snap, const char *path, uint64_t offset);
void br_snap_close(struct br_snap *snap);

#endif
