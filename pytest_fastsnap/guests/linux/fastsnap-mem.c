/*
 * Memory workload of the fastsnap Linux guest: fills MIB mebibytes of
 * anonymous memory with the tiny guest's pattern (pattern.py: page index as
 * pfn, generation 0 unless rewritten), announces itself on its stdout (ttyS0)
 * and answers line commands on stdin:
 *   ping        -> "pong <counter>"
 *   check       -> "CHECK OK pages=N" | "CHECK FAIL page=<index> gen=G"
 *   touch <k>   -> rewrite page k at generation+1 -> "TOUCHED <k> gen=G"
 *   info        -> the READY line again
 * Usage: fastsnap-mem MIB SEED
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <termios.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8)

static uint64_t seed, table[WORDS];
static uint64_t *mem;
static size_t npages;

static uint64_t mix(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void fill(size_t pfn, uint64_t gen)
{
    uint64_t h = mix(mix(seed ^ pfn) + gen), *p = mem + pfn * WORDS;
    for (unsigned i = 1; i < WORDS; i++)
        p[i] = table[i] ^ h;
    p[0] = gen;
}

static long check(uint64_t *badgen)
{
    for (size_t pfn = 0; pfn < npages; pfn++) {
        const uint64_t *p = mem + pfn * WORDS;
        uint64_t h = mix(mix(seed ^ pfn) + p[0]);
        for (unsigned i = 1; i < WORDS; i++)
            if (p[i] != (table[i] ^ h)) {
                *badgen = p[0];
                return (long)pfn;
            }
    }
    return -1;
}

static void ready(size_t mib)
{
    printf("FASTSNAP-LINUX READY mem=%zu pages=%zu seed=0x%llx\n", mib, npages,
           (unsigned long long)seed);
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 0) : 16;
    seed = argc > 2 ? strtoull(argv[2], 0, 0) : 1;
    struct termios t;
    if (tcgetattr(0, &t) == 0) {
        t.c_lflag &= ~(tcflag_t)(ECHO | ECHONL);
        t.c_oflag |= OPOST | ONLCR;
        tcsetattr(0, TCSANOW, &t);
    }
    setvbuf(stdout, 0, _IOLBF, 0);
    npages = mib * 1024 * 1024 / PAGE;
    mem = mmap(0, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        printf("FASTSNAP-LINUX ERROR cannot map %zu MiB\n", mib);
        for (;;)
            pause();
    }
    for (unsigned i = 0; i < WORDS; i++)
        table[i] = mix(seed + (uint64_t)i * 0xD1B54A32D192ED03ull);
    for (size_t pfn = 0; pfn < npages; pfn++)
        fill(pfn, 0);
    ready(mib);

    char line[256];
    unsigned long pings = 0;
    while (fgets(line, sizeof(line), stdin)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!strcmp(line, "ping")) {
            printf("pong %lu\n", ++pings);
        } else if (!strcmp(line, "check")) {
            uint64_t gen = 0;
            long bad = check(&gen);
            if (bad < 0)
                printf("CHECK OK pages=%zu\n", npages);
            else
                printf("CHECK FAIL page=%ld gen=%llu\n", bad, (unsigned long long)gen);
        } else if (!strncmp(line, "touch ", 6)) {
            size_t k = strtoul(line + 6, 0, 0);
            if (k < npages) {
                uint64_t gen = mem[k * WORDS] + 1;
                fill(k, gen);
                printf("TOUCHED %zu gen=%llu\n", k, (unsigned long long)gen);
            } else {
                printf("ERROR page out of range\n");
            }
        } else if (!strcmp(line, "info")) {
            ready(mib);
        } else if (line[0]) {
            printf("ERROR unknown command: %s\n", line);
        }
    }
    return 0;
}
