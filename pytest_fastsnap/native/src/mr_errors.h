/* The loader's one set of error names and its exit-code convention, for every
 * subcommand (inspect, verify, load, uffd-bench, serve).
 *
 * Exit status: 0 ok; 2 the input is invalid or unusable (bad usage, a file
 * that is missing, unreadable, not a regular file, not a valid mapped-ram
 * snapshot, or a valid one this command cannot serve); 1 an internal or
 * run-time failure (out of memory, I/O error, userfaultfd, a thread, the
 * destination).  mr_error_exit() maps a name to its exit status.
 *
 * Format names (E_MAGIC .. E_VMDESC) are mirrored without the E_ prefix by
 * pytest_fastsnap.snapshot.errors.ERROR_NAMES (tests/test_native_cli.py
 * compares the two lists); mr_format.c raises them. */
#ifndef FASTSNAP_MR_ERRORS_H
#define FASTSNAP_MR_ERRORS_H

#include <stdarg.h>
#include <string.h>

#include "mr_format.h" /* mr_error: the context that carries name + message */

/* Format rules and unreadable files (exit 2); README.md has the table.
 * E_MAX_LENGTH is the loader's own (--max-length), the others mirror the
 * Python reader (E_OPEN, E_NOT_FILE are raised by mr_open). */
#define E_OPEN "E_OPEN"           /* FILE cannot be opened (missing, no permission) */
#define E_NOT_FILE "E_NOT_FILE"   /* FILE is a directory or another non-regular file */
#define E_MAGIC "E_MAGIC"
#define E_VERSION "E_VERSION"
#define E_CONFIG "E_CONFIG"
#define E_RAM_SECTION "E_RAM_SECTION"
#define E_TOTAL "E_TOTAL"
#define E_BLOCK_ID "E_BLOCK_ID"
#define E_BLOCK_LENGTH "E_BLOCK_LENGTH"
#define E_HDR_VERSION "E_HDR_VERSION"
#define E_PAGE_SIZE "E_PAGE_SIZE"
#define E_BITMAP_OFFSET "E_BITMAP_OFFSET"
#define E_PAGES_OFFSET "E_PAGES_OFFSET"
#define E_PAGES_ALIGN "E_PAGES_ALIGN"
#define E_OVERLAP "E_OVERLAP"
#define E_TRUNCATED "E_TRUNCATED"
#define E_FOOTER "E_FOOTER"
#define E_RECORD "E_RECORD"
#define E_EOF "E_EOF"
#define E_VMDESC "E_VMDESC"
#define E_MAX_LENGTH "E_MAX_LENGTH"
/* libvirt save image header (mr_libvirt.c; snapshot/libvirt.py in Python) */
#define E_LIBVIRT_PARTIAL "E_LIBVIRT_PARTIAL"
#define E_LIBVIRT_HEADER "E_LIBVIRT_HEADER"
#define E_LIBVIRT_VERSION "E_LIBVIRT_VERSION"
#define E_LIBVIRT_DATA_LEN "E_LIBVIRT_DATA_LEN"
#define E_LIBVIRT_FORMAT "E_LIBVIRT_FORMAT"
#define E_LIBVIRT_COOKIE "E_LIBVIRT_COOKIE"
#define E_LIBVIRT_XML "E_LIBVIRT_XML"
#define E_LIBVIRT_NOT_SPARSE "E_LIBVIRT_NOT_SPARSE"
#define MR_FORMAT_ERROR_NAMES \
    E_OPEN, E_NOT_FILE, \
    E_MAGIC, E_VERSION, E_CONFIG, E_RAM_SECTION, E_TOTAL, E_BLOCK_ID, E_BLOCK_LENGTH, \
    E_HDR_VERSION, E_PAGE_SIZE, E_BITMAP_OFFSET, E_PAGES_OFFSET, E_PAGES_ALIGN, E_OVERLAP, \
    E_TRUNCATED, E_FOOTER, E_RECORD, E_EOF, E_VMDESC, E_MAX_LENGTH, \
    E_LIBVIRT_PARTIAL, E_LIBVIRT_HEADER, E_LIBVIRT_VERSION, E_LIBVIRT_DATA_LEN, \
    E_LIBVIRT_FORMAT, E_LIBVIRT_COOKIE, E_LIBVIRT_XML, E_LIBVIRT_NOT_SPARSE

/* Unusable input (exit 2). */
#define E_USAGE "E_USAGE"             /* bad option or argument */
#define E_UNSUPPORTED "E_UNSUPPORTED" /* valid snapshot this command cannot serve */
#define E_WS "E_WS"                   /* --ws file invalid or of another snapshot */

/* Run-time failures (exit 1). */
#define E_INTERNAL "E_INTERNAL"         /* out of memory, thread, inconsistency */
#define E_IO "E_IO"                     /* read/send error */
#define E_FILE_SHORT "E_FILE_SHORT"     /* file shrank after it was validated */
#define E_CONNECT "E_CONNECT"           /* cannot reach the destination */
#define E_DEST_GONE "E_DEST_GONE"       /* destination closed the connection */
#define E_DEST_FAILED "E_DEST_FAILED"   /* destination reported a failed migration */
#define E_DEST_STALLED "E_DEST_STALLED" /* destination stopped reading */
#define E_TIMEOUT "E_TIMEOUT"           /* a wait for the destination timed out */
#define E_DEST_PROTOCOL "E_DEST_PROTOCOL" /* destination sent a malformed or unexpected message */

#define E_UFFD "E_UFFD"                 /* userfaultfd unavailable or an ioctl failed */

/* The internal return convention, everywhere (the parser, the libvirt
 * header, the loader, the bridge): a function that fails fills an mr_error
 * (name + message) and returns -1; mr_error_set does both in one statement
 * (`return mr_error_set(err, E_IO, "...", ...);`). */
__attribute__((format(printf, 3, 4)))
int mr_error_set(mr_error *e, const char *name, const char *fmt, ...);
int mr_error_vset(mr_error *e, const char *name, const char *fmt, va_list ap);

/* Exit status for an error name (0 for none). */
static inline int mr_error_exit(const char *name)
{
    static const char *const input[] = {MR_FORMAT_ERROR_NAMES, E_USAGE, E_UNSUPPORTED,
                                        E_WS};
    if (!name)
        return 0;
    for (size_t i = 0; i < sizeof input / sizeof input[0]; i++)
        if (strcmp(name, input[i]) == 0)
            return 2;
    return 1;
}

#endif
