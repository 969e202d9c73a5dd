#include "store/expert_store.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util/error.h"
#include "util/progress.h"

struct fm_expert_store {
    const fm_packed_model *pm;
    int n_layers;
    int *fds;        /* [n_layers] */
    int capacity;
    uint8_t *slots;  /* capacity x max_expert_stride, 4 KiB aligned */
    fm_store_stats stats;
};

fm_status fm_store_open(const fm_packed_model *pm, int capacity, fm_expert_store **out) {
    *out = NULL;
    fm_status st;
    fm_expert_store *s = calloc(1, sizeof *s);
    if (!s) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    s->pm = pm;
    s->n_layers = pm->config.n_layers;
    s->capacity = capacity;
    s->fds = malloc(sizeof(int) * (size_t)s->n_layers);
    if (!s->fds) {
        free(s);
        return fm_error_set(FM_ERR_NOMEM, "out of memory");
    }
    for (int l = 0; l < s->n_layers; l++) s->fds[l] = -1;
    if (posix_memalign((void **)&s->slots, 4096, (size_t)capacity * pm->max_expert_stride) != 0) {
        s->slots = NULL;
        st = fm_error_set(FM_ERR_NOMEM, "out of memory for %d expert buffers of %llu bytes", capacity,
                          (unsigned long long)pm->max_expert_stride);
        goto fail;
    }
    for (int l = 0; l < s->n_layers; l++) {
        s->fds[l] = open(pm->experts[l].file, O_RDONLY | O_CLOEXEC);
        if (s->fds[l] < 0) {
            st = fm_error_set(FM_ERR_IO, "%s: cannot open the expert file of layer %d: %s", pm->experts[l].file, l,
                              strerror(errno));
            goto fail;
        }
        posix_fadvise(s->fds[l], 0, 0, POSIX_FADV_RANDOM); /* one expert = one contiguous read */
    }
    *out = s;
    return FM_OK;
fail:
    fm_store_free(s);
    return st;
}

void fm_store_free(fm_expert_store *s) {
    if (!s) return;
    for (int l = 0; l < s->n_layers; l++)
        if (s->fds[l] >= 0) close(s->fds[l]);
    free(s->fds);
    free(s->slots);
    free(s);
}

int fm_store_capacity(const fm_expert_store *s) { return s->capacity; }

static fm_status read_block(fm_expert_store *s, int layer, int32_t expert, uint8_t *dst) {
    uint64_t stride = s->pm->experts[layer].stride, off = (uint64_t)expert * stride, got = 0;
    while (got < stride) {
        ssize_t r = pread(s->fds[layer], dst + got, stride - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0)
            return fm_error_set(FM_ERR_IO, "%s: reading expert %d of layer %d failed: %s", s->pm->experts[layer].file,
                                expert, layer, strerror(errno));
        if (r == 0)
            return fm_error_set(FM_ERR_IO, "%s: short read of expert %d of layer %d (%llu of %llu bytes; file truncated?)",
                                s->pm->experts[layer].file, expert, layer, (unsigned long long)got,
                                (unsigned long long)stride);
        got += (uint64_t)r;
    }
    return FM_OK;
}

fm_status fm_store_fetch(fm_expert_store *s, int layer, const int32_t *ids, int n, const uint8_t **blocks) {
    if (layer < 0 || layer >= s->n_layers || n < 0 || n > s->capacity)
        return fm_error_set(FM_ERR_ARG, "expert store: bad fetch (layer %d, %d experts, capacity %d)", layer, n,
                            s->capacity);
    double t0 = fm_time_now();
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= s->pm->config.n_experts)
            return fm_error_set(FM_ERR_ARG, "expert store: expert %d of layer %d out of range", ids[i], layer);
        uint8_t *dst = s->slots + (size_t)i * s->pm->max_expert_stride;
        fm_status st = read_block(s, layer, ids[i], dst);
        if (st != FM_OK) return st;
        blocks[i] = dst;
        s->stats.experts_read++;
        s->stats.bytes_read += s->pm->experts[layer].stride;
    }
    s->stats.read_seconds += fm_time_now() - t0;
    return FM_OK;
}

fm_store_stats fm_store_get_stats(const fm_expert_store *s) { return s->stats; }
