#include "util/mapguard.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

enum { GUARDS = 512 }; /* mappings at once: a model maps dense.bin and, for the mapping engines, one file per layer */

typedef struct guard {
    _Atomic uintptr_t base; /* 0: a free entry; set last, after the other fields */
    size_t len;
    int layer;
    uint64_t stride;
    char file[384];
} guard;

static guard guards[GUARDS];
static pthread_mutex_t guards_mu = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction previous;
static bool installed;

/* async-signal-safe string building */
static void put_str(char *buf, size_t cap, size_t *n, const char *s) {
    while (*s && *n + 1 < cap) buf[(*n)++] = *s++;
}

static void put_u64(char *buf, size_t cap, size_t *n, uint64_t v) {
    char digits[24];
    int k = 0;
    do digits[k++] = (char)('0' + v % 10);
    while ((v /= 10) && k < (int)sizeof digits);
    while (k > 0 && *n + 1 < cap) buf[(*n)++] = digits[--k];
}

static void on_sigbus(int sig, siginfo_t *si, void *ctx) {
    (void)sig;
    (void)ctx;
    uintptr_t a = (uintptr_t)si->si_addr;
    for (int i = 0; i < GUARDS; i++) {
        uintptr_t b = atomic_load_explicit(&guards[i].base, memory_order_acquire);
        if (!b || a < b || a - b >= guards[i].len) continue;
        const guard *g = &guards[i];
        char msg[1024];
        size_t n = 0;
        put_str(msg, sizeof msg, &n, "flashmoe: ");
        put_str(msg, sizeof msg, &n, g->file);
        if (g->stride) {
            put_str(msg, sizeof msg, &n, ": expert ");
            put_u64(msg, sizeof msg, &n, (uint64_t)(a - b) / g->stride);
            put_str(msg, sizeof msg, &n, " of layer ");
            put_u64(msg, sizeof msg, &n, (uint64_t)g->layer);
        } else {
            put_str(msg, sizeof msg, &n, ": offset ");
            put_u64(msg, sizeof msg, &n, (uint64_t)(a - b));
        }
        put_str(msg, sizeof msg, &n,
                " could not be read through its mapping (the file was truncated or rewritten while in use, or the "
                "disk returned an I/O error); stopping\n");
        ssize_t w = write(STDERR_FILENO, msg, n);
        (void)w;
        _exit(1);
    }
    /* not a model file: the previous disposition takes the retried access */
    sigaction(SIGBUS, &previous, NULL);
}

bool fm_mapguard_add(const void *base, size_t len, const char *file, int layer, uint64_t stride) {
    if (!base || !len) return false;
    bool ok = false;
    pthread_mutex_lock(&guards_mu);
    if (!installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO;
        sigemptyset(&sa.sa_mask);
        installed = sigaction(SIGBUS, &sa, &previous) == 0;
    }
    for (int i = 0; installed && i < GUARDS; i++) {
        guard *g = &guards[i];
        if (atomic_load_explicit(&g->base, memory_order_relaxed)) continue;
        g->len = len;
        g->layer = layer;
        g->stride = stride;
        size_t k = strlen(file);
        if (k >= sizeof g->file) k = sizeof g->file - 1;
        memcpy(g->file, file, k);
        g->file[k] = 0;
        atomic_store_explicit(&g->base, (uintptr_t)base, memory_order_release);
        ok = true;
        break;
    }
    pthread_mutex_unlock(&guards_mu);
    return ok;
}

void fm_mapguard_remove(const void *base) {
    if (!base) return;
    pthread_mutex_lock(&guards_mu);
    for (int i = 0; i < GUARDS; i++)
        if (atomic_load_explicit(&guards[i].base, memory_order_relaxed) == (uintptr_t)base) {
            atomic_store_explicit(&guards[i].base, 0, memory_order_release);
            break;
        }
    pthread_mutex_unlock(&guards_mu);
}
