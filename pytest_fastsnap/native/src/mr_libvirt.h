/* libvirt save images (`virsh save`, managed save): libvirt's 92-byte header
 * and domain XML in front of the QEMU stream.  Layout, rules and their order
 * mirror pytest_fastsnap/snapshot/libvirt.py; error names (README.md):
 * E_LIBVIRT_PARTIAL, E_LIBVIRT_HEADER, E_LIBVIRT_VERSION, E_LIBVIRT_DATA_LEN,
 * E_LIBVIRT_FORMAT, E_LIBVIRT_COOKIE, E_LIBVIRT_XML, E_LIBVIRT_NOT_SPARSE. */
#ifndef FASTSNAP_MR_LIBVIRT_H
#define FASTSNAP_MR_LIBVIRT_H

#include <stdint.h>
#include <stdio.h>

#include "mr_format.h"

#define MR_LV_HEADER_SIZE 92u
#define MR_LV_SPARSE 6u

typedef struct mr_libvirt {
    int present;            /* the file is a libvirt save image */
    uint32_t version, data_len, was_running, format, cookie_offset;
    uint64_t xml_len;       /* domain XML bytes before its NUL */
    uint64_t stream_offset; /* 92 + data_len */
    char domain_name[256];  /* as in the XML, entities not expanded */
} mr_libvirt;

/* Reads libvirt's header if the file starts with its magic.  0: not a
 * libvirt image (present = 0) or a valid sparse one (present = 1); -1 with
 * err filled (an E_LIBVIRT_* name, or E_INTERNAL for a read error). */
int mr_libvirt_read(int fd, mr_libvirt *out, mr_error *err);

/* mr_parse of the stream at *offset when given, else where mr_libvirt_read
 * says (0 for a plain QEMU file).  lv may be NULL.  0, or -1 with err. */
int mr_parse_auto(int fd, const uint64_t *offset, const mr_limits *limits, mr_snapshot *out,
                  mr_libvirt *lv, mr_error *err);

const char *mr_libvirt_format_name(uint32_t format);

/* The header as JSON ({"domain":..., "format":..., ...}, or null when absent). */
void mr_libvirt_json(FILE *out, const mr_libvirt *lv);

#endif
