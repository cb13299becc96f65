/* Owns main(): argument parsing and the inspect/verify/load/uffd-bench
 * front-ends; `serve` belongs to the bridge (bridge.h).  Exit status per
 * mr_errors.h: 0 ok, 2 invalid or unusable input, 1 internal/run-time failure. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bridge.h"
#include "mr_core.h"
#include "mr_errors.h"
#include "mr_format.h"
#include "mr_libvirt.h"
#include "mr_local.h"
#include "mr_num.h"

static const char USAGE[] =
    "usage: fastsnap-loader COMMAND ...\n"
    "  inspect FILE [--offset N] [--json]\n"
    "  verify FILE [--offset N] [--max-length ID=SIZE]... [--json]\n"
    "  load FILE [--offset N] [--max-length ID=SIZE]... --mode lazy|fault-only|eager|sync\n"
    "       [--access none|seq|random|all] [--threads N] [--fault-threads N]\n"
    "       [--fault-spin-us N] [--seed N] [--hugepages] [--baseline] [--json]\n"
    "  uffd-bench FILE [--pages N] [--threads N] [--json]\n"
    "  serve FILE [--offset N] --to unix:PATH|tcp:HOST:PORT|fd:N ...   (postcopy bridge,\n"
    "       see bridge.h)\n"
    "SIZE: bytes, or with a K/M/G/T suffix (powers of 1024): pc.ram=64M\n"
    "exit status: 0 ok, 2 invalid snapshot, missing file or bad usage, 1 run-time failure\n";

typedef struct cli {
    const char *cmd;
    const char *file;
    uint64_t offset;
    int have_offset;        /* else: libvirt save image header, or 0 */
    mr_libvirt *lv;         /* what that header said */
    int json;
    mr_limits limits;
    mr_load_opts load;
    int have_mode;
    unsigned long pages;
} cli;

__attribute__((format(printf, 1, 2)))
static int usage_error(const char *fmt, ...)
{
    va_list ap;
    fputs("fastsnap-loader: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs(" (fastsnap-loader --help shows the usage)\n", stderr);
    return 2;
}

static int parse_args(int argc, char **argv, cli *c)
{
    c->load.threads = 1;
    c->load.fault_threads = 1;
    c->load.fault_spin_us = MR_FAULT_SPIN_US;
    c->load.access = MR_ACCESS_NONE;
    c->pages = 4096;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        uint64_t n;
        if (strcmp(a, "--json") == 0) {
            c->json = 1;
        } else if (strcmp(a, "--offset") == 0) {
            if (mr_parse_u64(v, &c->offset) < 0)
                return usage_error("--offset needs a number, not %s", v ? v : "nothing");
            c->have_offset = 1;
            i++;
        } else if (strcmp(a, "--max-length") == 0) {
            const char *eq = v ? strrchr(v, '=') : NULL;
            if (!eq || eq == v || eq - v > 255 || mr_parse_size(eq + 1, &n) < 0)
                return usage_error("--max-length needs ID=SIZE (bytes, or 64M, 1G ...), not %s",
                                   v ? v : "nothing");
            if (c->limits.count >= MR_MAX_LIMITS)
                return usage_error("more than %u --max-length options", MR_MAX_LIMITS);
            mr_limit *l = &c->limits.item[c->limits.count++];
            memcpy(l->id, v, (size_t)(eq - v));
            l->id[eq - v] = 0;
            l->max_length = n;
            i++;
        } else if (strcmp(a, "--mode") == 0) {
            static const char *m[] = {"lazy", "fault-only", "eager", "sync"};
            int k = -1;
            for (int j = 0; v && j < 4; j++)
                if (strcmp(v, m[j]) == 0)
                    k = j;
            if (k < 0)
                return usage_error("--mode must be lazy, fault-only, eager or sync, not %s",
                                   v ? v : "nothing");
            c->load.mode = (mr_mode)k;
            c->have_mode = 1;
            i++;
        } else if (strcmp(a, "--access") == 0) {
            static const char *m[] = {"none", "seq", "random", "all"};
            int k = -1;
            for (int j = 0; v && j < 4; j++)
                if (strcmp(v, m[j]) == 0)
                    k = j;
            if (k < 0)
                return usage_error("--access must be none, seq, random or all, not %s",
                                   v ? v : "nothing");
            c->load.access = (mr_access)k;
            i++;
        } else if (strcmp(a, "--threads") == 0) {
            if (mr_parse_u64(v, &n) < 0 || n < 1 || n > 256)
                return usage_error("--threads must be 1..256");
            c->load.threads = (unsigned)n;
            i++;
        } else if (strcmp(a, "--fault-threads") == 0) {
            if (mr_parse_u64(v, &n) < 0 || n < 1 || n > 16)
                return usage_error("--fault-threads must be 1..16");
            c->load.fault_threads = (unsigned)n;
            i++;
        } else if (strcmp(a, "--fault-spin-us") == 0) {
            if (mr_parse_u64(v, &n) < 0 || n > 1000)
                return usage_error("--fault-spin-us must be 0..1000");
            c->load.fault_spin_us = (unsigned)n;
            i++;
        } else if (strcmp(a, "--hugepages") == 0) {
            c->load.hugepages = 1;
        } else if (strcmp(a, "--baseline") == 0) {
            c->load.baseline_pages = 2048;
        } else if (strcmp(a, "--seed") == 0) {
            if (mr_parse_u64(v, &n) < 0)
                return usage_error("--seed needs a number");
            c->load.seed = n;
            i++;
        } else if (strcmp(a, "--pages") == 0) {
            if (mr_parse_u64(v, &n) < 0 || n < 1 || n > (1u << 20))
                return usage_error("--pages must be 1..1048576");
            c->pages = (unsigned long)n;
            i++;
        } else if (a[0] == '-' && a[1]) {
            return usage_error("unknown option %s for %s", a, c->cmd);
        } else if (!c->file) {
            c->file = a;
        } else {
            return usage_error("unexpected argument %s", a);
        }
    }
    if (!c->file)
        return usage_error("%s needs a FILE", c->cmd);
    return 0;
}

/* The one error report: one line on stderr (`what` prefixes the message,
 * e.g. "load"), and with --json the error object on stdout.  Returns the
 * exit status for e's name. */
static int report_error(const cli *c, const char *what, const mr_error *e)
{
    fprintf(stderr, "fastsnap-loader: %s: %s%s%s\n", e->name, what ? what : "", what ? ": " : "",
            e->msg);
    if (c->json) {
        char msg[sizeof e->msg + 32];
        snprintf(msg, sizeof msg, "%s%s%s", what ? what : "", what ? ": " : "", e->msg);
        printf("{\"valid\":false,\"error\":");
        mr_json_string(stdout, e->name);
        printf(",\"message\":");
        mr_json_string(stdout, msg);
        printf("}\n");
    }
    return mr_error_exit(e->name);
}

/* 0 with *fd open and *snap parsed, or the reported error's exit status. */
static int open_and_parse(const cli *c, int *fd, mr_snapshot *snap)
{
    mr_error e;
    if (mr_open(c->file, fd, &e) < 0) {
        char msg[128];
        snprintf(msg, sizeof msg, "%.100s", e.msg);
        snprintf(e.msg, sizeof e.msg, "%.300s: %.100s", c->file, msg);
        return report_error(c, NULL, &e);
    }
    if (mr_parse_auto(*fd, c->have_offset ? &c->offset : NULL, &c->limits, snap, c->lv,
                      &e) < 0) {
        close(*fd);
        *fd = -1;
        return report_error(c, NULL, &e);
    }
    return 0;
}

static int cmd_verify(const cli *c)
{
    int fd;
    mr_snapshot snap;
    int rc = open_and_parse(c, &fd, &snap);
    if (rc)
        return rc;
    if (c->json)
        printf("{\"valid\":true,\"blocks\":%zu,\"stream_offset\":%" PRIu64 "}\n",
               snap.nblocks, snap.stream_offset);
    else
        printf("%s: valid mapped-ram snapshot (%zu blocks)%s\n", c->file, snap.nblocks,
               c->lv->present ? " in a libvirt save image" : "");
    mr_snapshot_free(&snap);
    close(fd);
    return 0;
}

static int cmd_inspect(const cli *c)
{
    int fd;
    mr_snapshot s;
    int rc = open_and_parse(c, &fd, &s);
    if (rc)
        return rc;
    mr_core_block *cb = calloc(s.nblocks ? s.nblocks : 1, sizeof *cb);
    if (!cb || mr_core_init(fd, &s, cb) < 0) {
        mr_error e;
        if (cb)
            mr_error_set(&e, E_IO, "reading bitmaps: %s", strerror(errno));
        else
            mr_error_set(&e, E_INTERNAL, "out of memory");
        rc = report_error(c, "inspect", &e);
        if (cb)
            mr_core_free(cb, s.nblocks);
        free(cb);
        mr_snapshot_free(&s);
        close(fd);
        return rc;
    }
    if (c->json) {
        printf("{\"valid\":true,\"libvirt\":");
        mr_libvirt_json(stdout, c->lv);
        printf(",\"machine\":");
        mr_json_string(stdout, s.machine);
        printf(",\"configuration\":{\"start\":%" PRIu64 ",\"end\":%" PRIu64
               ",\"capabilities\":[", s.config.start, s.config.end);
        for (unsigned i = 0; i < s.ncaps; i++) {
            printf("%s", i ? "," : "");
            mr_json_string(stdout, s.caps[i]);
        }
        printf("],\"target_page_bits\":");
        if (s.has_target_page_bits)
            printf("%u", s.target_page_bits);
        else
            printf("null");
        printf(",\"uuid\":");
        if (s.has_uuid) {
            printf("\"");
            for (int i = 0; i < 16; i++)
                printf("%02x", s.uuid[i]);
            printf("\"");
        } else {
            printf("null");
        }
        printf("},\"early_setup\":{\"start\":%" PRIu64 ",\"end\":%" PRIu64 "}",
               s.early_setup.start, s.early_setup.end);
        printf(",\"stream_offset\":%" PRIu64 ",\"file_size\":%" PRIu64 ",\"page_size\":%" PRIu64
               ",\"ram_section_id\":%u,\"ram_start\":%" PRIu64 ",\"total\":%" PRIu64 ",\"blocks\":[",
               s.stream_offset, s.file_size, s.page_size, s.ram_sid, s.ram_start, s.total);
        for (size_t i = 0; i < s.nblocks; i++) {
            const mr_block *b = &s.blocks[i];
            printf("%s{\"id\":", i ? "," : "");
            mr_json_string(stdout, b->id);
            printf(",\"length\":%" PRIu64 ",\"num_pages\":%" PRIu64 ",\"header_offset\":%" PRIu64
                   ",\"bitmap_offset\":%" PRIu64 ",\"bitmap_size\":%" PRIu64 ",\"pages_offset\":%"
                   PRIu64 ",\"pages_set\":%" PRIu64 ",\"ignored\":%s}", b->used_length,
                   b->num_pages, b->hdr_offset, b->bitmap_offset, b->bitmap_size, b->pages_offset,
                   mr_core_set_pages(&cb[i]), b->ignored ? "true" : "false");
        }
        printf("],\"device_state\":{\"start\":%" PRIu64 ",\"end\":%" PRIu64 "},\"eof_offset\":%"
               PRIu64 ",\"vmdesc\":", s.dev_start, s.eof_offset, s.eof_offset);
        if (s.has_vmdesc)
            printf("{\"offset\":%" PRIu64 ",\"length\":%" PRIu64 "}}\n", s.vmdesc_offset,
                   s.vmdesc_len);
        else
            printf("null}\n");
    } else {
        if (c->lv->present)
            printf("libvirt save image: domain %s, format %s, was_running %" PRIu32
                   ", domain XML %" PRIu64 " bytes, QEMU stream at %#" PRIx64 " (%" PRIu64 ")\n",
                   c->lv->domain_name, mr_libvirt_format_name(c->lv->format),
                   c->lv->was_running, c->lv->xml_len, c->lv->stream_offset,
                   c->lv->stream_offset);
        printf("machine %s, stream at %#" PRIx64 ", %zu blocks, total %#" PRIx64 "\n", s.machine,
               s.stream_offset, s.nblocks, s.total);
        for (size_t i = 0; i < s.nblocks; i++) {
            const mr_block *b = &s.blocks[i];
            printf("  %-28s length %#12" PRIx64 " bitmap %#10" PRIx64 " pages %#12" PRIx64
                   " set %" PRIu64 "/%" PRIu64 "\n", b->id, b->used_length, b->bitmap_offset,
                   b->pages_offset, mr_core_set_pages(&cb[i]), b->num_pages);
        }
        printf("device state [%#" PRIx64 ", %#" PRIx64 "), EOF at %#" PRIx64 ", vmdesc %s\n",
               s.dev_start, s.eof_offset, s.eof_offset, s.has_vmdesc ? "present" : "absent");
    }
    mr_core_free(cb, s.nblocks);
    free(cb);
    mr_snapshot_free(&s);
    close(fd);
    return 0;
}

static int cmd_load(cli *c)
{
    if (!c->have_mode)
        return usage_error("load needs --mode lazy|fault-only|eager|sync");
    int fd;
    mr_snapshot s;
    int rc = open_and_parse(c, &fd, &s);
    if (rc)
        return rc;
    mr_error e;
    c->load.json = c->json;
    rc = mr_local_load(fd, &s, &c->load, stdout, &e) < 0 ? report_error(c, "load", &e) : 0;
    mr_snapshot_free(&s);
    close(fd);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return usage_error("missing command");
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        fputs(USAGE, stdout);
        return 0;
    }
    if (strcmp(cmd, "serve") == 0)
        return bridge_main(argc - 1, argv + 1);
    cli c;
    mr_libvirt lv;
    memset(&c, 0, sizeof c);
    c.cmd = cmd;
    c.lv = &lv;
    if (strcmp(cmd, "inspect") && strcmp(cmd, "verify") && strcmp(cmd, "load") &&
        strcmp(cmd, "uffd-bench"))
        return usage_error("unknown command %s", cmd);
    for (int i = 2; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0) {
            fputs(USAGE, stdout);
            return 0;
        }
    int rc = parse_args(argc, argv, &c);
    if (rc)
        return rc;
    if (strcmp(cmd, "verify") == 0)
        return cmd_verify(&c);
    if (strcmp(cmd, "inspect") == 0)
        return cmd_inspect(&c);
    if (strcmp(cmd, "load") == 0)
        return cmd_load(&c);
    mr_error e;
    if (mr_uffd_bench(c.file, c.pages, c.load.threads, c.json, stdout, &e) == 0)
        return 0;
    return report_error(&c, "uffd-bench", &e);
}
