/* Owns the userfaultfd plumbing and the FASTSNAP_LOADER_INJECT knob reader
 * (see mr_uffd.h). */
#define _GNU_SOURCE
#include "mr_uffd.h"

#include "mr_errors.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

uint64_t mr_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int mr_uffd_open(void)
{
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        int fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        close(dev);
        if (fd >= 0)
            return fd;
    }
    return (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
}

int mr_inject(const char *what)
{
    const char *v = getenv("FASTSNAP_LOADER_INJECT");
    size_t n = strlen(what);
    while (v && *v) {
        const char *end = strchr(v, ',');
        size_t len = end ? (size_t)(end - v) : strlen(v);
        if (len == n && strncmp(v, what, n) == 0)
            return 1;
        v = end ? end + 1 : NULL;
    }
    return 0;
}

int mr_uffd_setup(int *out, mr_error *err)
{
    uint64_t got;
    return mr_uffd_setup_features(out, 0, &got, err);
}

int mr_uffd_setup_features(int *out, uint64_t features, uint64_t *got, mr_error *err)
{
    int fd = mr_uffd_open();
    if (fd < 0) {
        mr_error_set(err, E_UFFD, "userfaultfd: %s (neither /dev/userfaultfd nor the syscall "
                 "worked; check vm.unprivileged_userfaultfd or CAP_SYS_PTRACE)", strerror(errno));
        return -1;
    }
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (features) {
        /* Ask what this kernel offers first (a probe fd: UFFDIO_API can be
         * called once per fd), then request only those. */
        int probe = mr_uffd_open();
        struct uffdio_api q = {.api = UFFD_API, .features = 0};
        if (probe >= 0 && ioctl(probe, UFFDIO_API, &q) == 0)
            api.features = features & q.features;
        else
            api.features = 0;
        if (probe >= 0)
            close(probe);
    }
    uint64_t asked = api.features;
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        mr_error_set(err, E_UFFD, "UFFDIO_API: %s", strerror(errno));
        close(fd);
        return -1;
    }
    uint64_t need = (1ull << _UFFDIO_REGISTER) | (1ull << _UFFDIO_UNREGISTER);
    if ((api.ioctls & need) != need) {
        mr_error_set(err, E_UFFD, "UFFDIO_API: REGISTER/UNREGISTER not offered");
        close(fd);
        return -1;
    }
    *got = asked;
    *out = fd;
    return 0;
}

int mr_uffd_register(int uffd, void *addr, uint64_t len, int need_zeropage, mr_error *err)
{
    struct uffdio_register reg = {.range = {.start = (uintptr_t)addr, .len = len},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
        mr_error_set(err, E_UFFD, "UFFDIO_REGISTER: %s", strerror(errno));
        return -1;
    }
    uint64_t need = (1ull << _UFFDIO_COPY) | (1ull << _UFFDIO_WAKE) |
                    (need_zeropage ? 1ull << _UFFDIO_ZEROPAGE : 0);
    if ((reg.ioctls & need) != need) {
        mr_error_set(err, E_UFFD, "UFFDIO_REGISTER: COPY/WAKE%s not offered on the range",
                     need_zeropage ? "/ZEROPAGE" : "");
        return -1;
    }
    return 0;
}

int mr_uffd_wake(int uffd, void *addr, uint64_t len)
{
    struct uffdio_range r = {.start = (uintptr_t)addr, .len = len};
    return ioctl(uffd, UFFDIO_WAKE, &r);
}
