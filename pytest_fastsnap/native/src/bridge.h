/* Bridge front-end: the loader plays the *source* of a QEMU postcopy
 * migration and feeds a stock destination (-incoming defer, postcopy-ram)
 * from a mapped-ram snapshot file.  Pages the guest faults on are served
 * first (return-path requests), the rest stream eagerly, each page once.
 *
 *   fastsnap-loader serve FILE [--offset N] --to unix:PATH|tcp:HOST:PORT|fd:N
 *                   [--preempt] [--json] [--stats-file F] [--zero-pages requested|all]
 *                   [--io-timeout S] [--shut-timeout S] [--connect-timeout S]
 *                   [--max-bandwidth MIB_S] [--sndbuf BYTES]
 *                   [--host-page-size ID=SIZE]... [--resume]
 *                   [--record-ws WSFILE] [--ws WSFILE [--ws-mode before-run|after-run]]
 *                   [--eager-delay S] [--eager-holdoff-us N] [--ready-fd N]
 *   fastsnap-loader serve FILE [--offset N] --describe   (parse only, JSON)
 *
 * --zero-pages: clear-bit (zero) pages are sent only when requested by
 * default: ADVISE discards all guest RAM, so a page never placed reads as
 * zero once the destination unregisters userfaultfd at EOF; `all` sends a
 * ZERO record for every clear page too.  --max-bandwidth caps the eager
 * stream (requests are never throttled).  --host-page-size names a
 * destination block backed by huge pages (hugetlbfs / memfd hugetlb=on; the
 * file does not record it): ADVISE carries the OR of all page sizes, RAM
 * START that block's page size, the discard covers a whole host page, and
 * every host page's target pages are sent consecutively (ZERO records
 * included), on request and eagerly, never interleaved with another.
 *
 * --resume: the destination is paused in postcopy after losing its source
 * and listens on --to (QMP migrate-recover); instead of the stream header
 * and package, ask for its received-page bitmaps, resume, and send every
 * page it still lacks, each once (bridge_resume.h).  With --preempt too,
 * the preempt channel is reopened after the bitmaps and before
 * POSTCOPY_RESUME (the sequence: bridge_resume.c).
 * --record-ws writes, after a completed migration, the pages the destination
 * requested in the order it first asked for them; --ws sends a file so
 * written first on a later restore of the same snapshot: `before-run`
 * between the discard and the package (the destination loads them through
 * its precopy path before any vCPU runs), `after-run` (default) at the head
 * of the eager stream.  bridge_ws.h has the file format; an invalid file or
 * one recorded on another snapshot layout is E_WS (exit 2), refused before
 * connecting (also with --describe).  --eager-delay S serves only requests
 * for S seconds after RUN (SIGUSR1 ends the wait early), so a recording run
 * sees every page the guest touches instead of racing the eager stream.
 * --ready-fd N (an inherited descriptor, >= 3) gets one byte "R" and is
 * closed once the file is parsed, just before connecting: a caller that
 * starts the loader first issues `migrate-incoming` then, so the loader's
 * start-up is not on the restore's clock.
 * --eager-holdoff-us N (0..100000, default 0): after each page request no
 * eager page goes out for N us (requests are served meanwhile), leaving the
 * cores to the request's path; stats eager_holdoff_total_s.
 * --to: the destination's incoming URI (`migrate-incoming unix:PATH` /
 * `tcp:HOST:PORT`; HOST an IPv4 address, [IPv6] or a name; strict syntax in
 * bridge_net.c, exit 2 naming the problem) or an inherited connected fd.
 * --preempt: the destination has the `postcopy-preempt` capability on; a
 * second connection (unix or tcp only) is opened once PONG 1 shows the
 * main one was taken, and page requests are answered on it by the
 * return-path thread while the eager stream keeps the main one
 * (bridge_preempt.c).  Both ends must agree: a destination with preempt
 * waits for the second connection, one without it refuses it.
 *
 * Exit status (mr_errors.h, the same for every subcommand): 0 migration
 * completed (SHUT 0 received) or --describe printed; 2 unusable input (bad
 * option or number, FILE missing/unreadable/not a regular file, invalid
 * snapshot, E_UNSUPPORTED); 1 run-time failure (destination died or
 * reported an error, file shrank, timeout, out of memory).  Errors go to
 * stderr as one line `fastsnap-loader serve: E_NAME: message`; --json also
 * carries the name in "error_name".
 */
#ifndef FASTSNAP_BRIDGE_H
#define FASTSNAP_BRIDGE_H

int bridge_main(int argc, char **argv);

#endif
