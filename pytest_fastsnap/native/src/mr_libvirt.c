/* libvirt save image header: see mr_libvirt.h and snapshot/libvirt.py. */
#define _GNU_SOURCE
#include "mr_libvirt.h"

#include "mr_errors.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define LV_MAGIC "LibvirtQemudSave"
#define LV_PARTIAL "LibvirtQemudPart"
#define LV_VERSION 2u
#define LV_XML_MAX (16u << 20)
#define LV_NAME_MAX 255u

static const char *const FORMATS[] = {"raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse"};
#define NFORMATS (sizeof FORMATS / sizeof FORMATS[0])

const char *mr_libvirt_format_name(uint32_t format)
{
    return format < NFORMATS ? FORMATS[format] : "unknown";
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The <name> of the XML (bytes [0, n), no NUL inside) into out; 0 or -1. */
static int domain_name(const char *xml, size_t n, char *out)
{
    const char *open = memmem(xml, n, "<name>", 6);
    if (!open)
        return -1;
    const char *start = open + 6;
    const char *close = memmem(start, n - (size_t)(start - xml), "</name>", 7);
    size_t len = close ? (size_t)(close - start) : 0;
    if (!close || len == 0 || len > LV_NAME_MAX)
        return -1;
    memcpy(out, start, len);
    out[len] = 0;
    return 0;
}

int mr_libvirt_read(int fd, mr_libvirt *out, mr_error *err)
{
    memset(out, 0, sizeof *out);
    memset(err, 0, sizeof *err);
    struct stat st;
    if (fstat(fd, &st) < 0)
        return mr_error_set(err, E_INTERNAL, "fstat: %s", strerror(errno));
    uint64_t size = (uint64_t)st.st_size;
    unsigned char h[MR_LV_HEADER_SIZE];
    ssize_t got = mr_pread_upto(fd, h, sizeof h, 0);
    if (got < 0)
        return mr_error_set(err, E_INTERNAL, "pread: %s", strerror(errno));
    if (got < 16 || (memcmp(h, LV_MAGIC, 16) && memcmp(h, LV_PARTIAL, 16)))
        return 0;
    out->present = 1;
    if (!memcmp(h, LV_PARTIAL, 16))
        return mr_error_set(err, E_LIBVIRT_PARTIAL, "libvirt save image is incomplete "
                       "(magic LibvirtQemudPart: the save never finished)");
    if ((size_t)got < sizeof h)
        return mr_error_set(err, E_LIBVIRT_HEADER, "libvirt save image header needs %u "
                       "bytes but the file ends at %#" PRIx64, MR_LV_HEADER_SIZE, size);
    out->version = le32(h + 16);
    out->data_len = le32(h + 20);
    out->was_running = le32(h + 24);
    out->format = le32(h + 28);
    out->cookie_offset = le32(h + 32);
    out->stream_offset = MR_LV_HEADER_SIZE + (uint64_t)out->data_len;
    if (out->version != LV_VERSION)
        return mr_error_set(err, E_LIBVIRT_VERSION, "libvirt save image version %" PRIu32
                       " != %u%s", out->version, LV_VERSION,
                       __builtin_bswap32(out->version) == LV_VERSION ? " (byte-swapped: an image "
                       "from a host of the other byte order)" : "");
    if (out->data_len == 0)
        return mr_error_set(err, E_LIBVIRT_DATA_LEN, "libvirt save image data_len is 0 "
                       "(no domain XML)");
    if (out->stream_offset > size)
        return mr_error_set(err, E_LIBVIRT_DATA_LEN, "libvirt save image data_len %#"
                       PRIx32 " runs to %#" PRIx64 ", past the end of the file at %#" PRIx64
                       " (file ends inside the domain XML)", out->data_len, out->stream_offset,
                       size);
    if (out->was_running > 1)
        return mr_error_set(err, E_LIBVIRT_HEADER, "libvirt save image was_running %"
                       PRIu32 " is not 0 or 1", out->was_running);
    if (out->format >= NFORMATS)
        return mr_error_set(err, E_LIBVIRT_FORMAT, "libvirt save image format %" PRIu32
                       " is unknown (0..%zu: raw, gzip, bzip2, xz, lzop, zstd, sparse)",
                       out->format, NFORMATS - 1);
    if (out->cookie_offset && out->cookie_offset >= out->data_len)
        return mr_error_set(err, E_LIBVIRT_COOKIE, "libvirt save image cookie offset %#"
                       PRIx32 " is not inside the data (%#" PRIx32 " bytes)", out->cookie_offset,
                       out->data_len);
    uint32_t xml_len = out->cookie_offset ? out->cookie_offset : out->data_len;
    if (xml_len > LV_XML_MAX)
        return mr_error_set(err, E_LIBVIRT_XML, "libvirt save image domain XML of %"
                       PRIu32 " bytes is longer than %u", xml_len, LV_XML_MAX);
    char *xml = malloc(xml_len);  /* <= 16 MiB, and inside the file (checked above) */
    if (!xml)
        return mr_error_set(err, E_INTERNAL, "out of memory (%" PRIu32 " bytes)",
                       xml_len);
    got = mr_pread_upto(fd, xml, xml_len, MR_LV_HEADER_SIZE);
    if (got != (ssize_t)xml_len) {
        free(xml);
        return mr_error_set(err, E_INTERNAL, "reading the domain XML: %s",
                       got < 0 ? strerror(errno) : "the file shrank");
    }
    const char *nul = memchr(xml, 0, xml_len);
    int named = nul ? domain_name(xml, (size_t)(nul - xml), out->domain_name) : -1;
    out->xml_len = nul ? (uint64_t)(nul - xml) : 0;
    free(xml);
    if (!nul)
        return mr_error_set(err, E_LIBVIRT_XML, "libvirt save image domain XML is not "
                       "NUL-terminated within its %" PRIu32 " bytes", xml_len);
    if (named < 0)
        return mr_error_set(err, E_LIBVIRT_XML, "libvirt save image domain XML has no "
                       "<name> of 1..%u bytes", LV_NAME_MAX);
    if (out->format != MR_LV_SPARSE)
        return mr_error_set(err, E_LIBVIRT_NOT_SPARSE, "libvirt save image in format %s, "
                       "not mapped-ram (only --image-format sparse writes mapped-ram)",
                       mr_libvirt_format_name(out->format));
    return 0;
}

int mr_parse_auto(int fd, const uint64_t *offset, const mr_limits *limits, mr_snapshot *out,
                  mr_libvirt *lv, mr_error *err)
{
    mr_libvirt local;
    if (!lv)
        lv = &local;
    memset(lv, 0, sizeof *lv);
    if (offset)
        return mr_parse(fd, *offset, limits, out, err);
    if (mr_libvirt_read(fd, lv, err) < 0) {
        memset(out, 0, sizeof *out);
        return -1;
    }
    return mr_parse(fd, lv->present ? lv->stream_offset : 0, limits, out, err);
}
