/* Owns the postcopy-preempt channel of the bridge: the second connection a
 * destination with the `postcopy-preempt` capability accepts (QEMU 10.0
 * migration_ioc_process_incoming: without multifd, the first connection is
 * the main stream and the next one the preempt channel; no magic, no
 * header).  Its destination thread (postcopy_preempt_thread) runs
 * ram_load_postcopy(RAM_CHANNEL_POSTCOPY) on it: bare `ram` records
 * (be64 offset|flags, str8 idstr unless CONTINUE, page data or a zero
 * byte), no section headers or footers, with its own "previous block" for
 * CONTINUE.  No RAM_SAVE_FLAG_EOS is sent on it: it would end that thread,
 * and a 10.0 destination's cleanup after EOF (postcopy_ram_incoming_cleanup)
 * waits for every page still requested to arrive on this channel (a zero
 * page the guest touches late is requested then); the cleanup shuts the
 * channel down itself (QEMU's own source sends EOS only to 7.1/7.2).
 *
 * The bridge's return-path thread serves each page request here directly
 * (as QEMU's own source does), so a requested page never queues behind the
 * eager stream on the main socket.  Pages are claimed in the shared atomic
 * bitmap, so each page still goes out exactly once, on one channel. */
#ifndef FASTSNAP_BRIDGE_PREEMPT_H
#define FASTSNAP_BRIDGE_PREEMPT_H

#include "bridge_snap.h"
#include "mr_stats.h"

#include <stdio.h>
#include <time.h>

struct br_preempt;

/* Takes ownership of sock; times are seconds since *t0 (the bridge's clock). */
struct br_preempt *br_preempt_new(struct br_snap *snap, int sock, const struct timespec *t0,
                                  double io_timeout);

/* Sends every unclaimed page of [start, start+len) of block bi (whole host
 * pages) and flushes.  1 some page was sent (latency from t_req recorded),
 * 0 all were claimed already (a duplicate), -1 failure (br_preempt_error). */
int br_preempt_serve(struct br_preempt *p, uint32_t bi, uint64_t start, uint32_t len,
                     double t_req);

/* 0 while the destination keeps the channel open (checked before every
 * request is answered, and by the bridge before EOF: pages answered on a
 * dropped channel are lost, and after EOF the destination would read them
 * as zeros); -1 with br_preempt_error set once it closed it. */
int br_preempt_check(struct br_preempt *p);

/* The main stream's EOF goes out now: from here on the destination closes
 * the channel itself (once no requested page is outstanding), so a closed
 * channel is no longer an error (requests then are late duplicates). */
void br_preempt_eof(struct br_preempt *p);

/* The channel's failure (name + message), or NULL. */
const mr_error *br_preempt_error(struct br_preempt *p);

/* Counters, merged into the bridge's totals once the channel is idle. */
struct br_preempt_counts {
    uint64_t requests_served, requests_duplicate, pages_on_request, pages_data, pages_zero;
    uint64_t bytes_sent, file_bytes_read, double_sends;
};
/* Copies the counters and moves the latency samples into *lat (request read
 * -> page sent), *read_lat (the request's pread()s) and *send_lat (its send()). */
void br_preempt_take(struct br_preempt *p, struct br_preempt_counts *c, mr_samples *lat,
                     mr_samples *read_lat, mr_samples *send_lat);

/* Shut the channel down (from any thread): a send blocked in the return-path
 * thread returns at once, so the bridge can join it when it stops. */
void br_preempt_shutdown(struct br_preempt *p);

void br_preempt_free(struct br_preempt *p);

#endif
