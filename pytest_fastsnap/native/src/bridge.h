/* Bridge front-end: the loader plays the *source* of a QEMU postcopy
 * migration and feeds a stock destination (-incoming defer, postcopy-ram)
 * from a mapped-ram snapshot file.  Pages the guest faults on are served
 * first (return-path requests), the rest stream eagerly, each page once.
 *
 *   fastsnap-loader serve FILE [--offset N] --to unix:PATH|fd:N
 *                   [--json] [--stats-file F] [--zero-pages requested|all]
 *                   [--io-timeout S] [--shut-timeout S] [--connect-timeout S]
 *                   [--max-bandwidth MIB_S]
 *   fastsnap-loader serve FILE [--offset N] --describe   (parse only, JSON)
 *
 * --zero-pages: clear-bit (zero) pages are sent only when requested by
 * default: ADVISE discards all guest RAM, so a page never placed reads as
 * zero once the destination unregisters userfaultfd at EOF; `all` sends a
 * ZERO record for every clear page too.  --max-bandwidth caps the eager
 * stream (requests are never throttled).
 *
 * Exit status: 0 migration completed (SHUT 0 received), 2 invalid snapshot
 * or arguments, 1 any run-time failure (destination died or reported an
 * error, file short, timeout).  Errors go to stderr, one line each.
 */
#ifndef FASTSNAP_BRIDGE_H
#define FASTSNAP_BRIDGE_H

int bridge_main(int argc, char **argv);

#endif
