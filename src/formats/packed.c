#include "formats/packed.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "quant/quant.h"
#include "util/error.h"
#include "util/mapguard.h"

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        fm_status st_ = (expr);                                                                    \
        if (st_ != FM_OK) return st_;                                                              \
    } while (0)

static uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

/* Checked element count x dtype size; 0 on overflow or a bad shape. */
static uint64_t plain_bytes(fm_dtype dt, int n_dims, const int64_t *shape) {
    uint64_t n = fm_dtype_size(dt);
    for (int i = 0; i < n_dims && n; i++) {
        if (shape[i] < 0 || (shape[i] > 0 && n > UINT64_MAX / (uint64_t)shape[i])) return 0;
        n *= (uint64_t)shape[i];
    }
    return n;
}

uint64_t fm_packed_tensor_nbytes(const fm_packed_tensor *t) {
    if (t->n_dims < 1 || t->n_dims > FM_PACKED_MAX_DIMS) return 0;
    if (fm_dtype_is_quant(t->dtype)) {
        if (t->n_dims != 2) return 0;
        return fm_quant_nbytes(t->dtype, t->shape[0], t->shape[1], t->group_size, t->scale_dtype);
    }
    bool empty = false;
    for (int i = 0; i < t->n_dims; i++) empty |= t->shape[i] == 0;
    return empty ? 0 : plain_bytes(t->dtype, t->n_dims, t->shape);
}

fm_weight fm_packed_weight(const fm_packed_tensor *t, const void *base) {
    fm_weight w = {.dtype = t->dtype,
                   .rows = t->shape[0],
                   .cols = t->n_dims > 1 ? t->shape[1] : 1,
                   .data = (const char *)base + t->offset,
                   .group_size = t->group_size,
                   .scale_dtype = t->scale_dtype};
    return w;
}

static void part_shape(const fm_config *c, fm_expert_part_id p, int64_t shape[2]) {
    if (p == FM_PART_DOWN) {
        shape[0] = c->n_embd;
        shape[1] = c->n_ff_expert;
    } else {
        shape[0] = c->n_ff_expert;
        shape[1] = c->n_embd;
    }
}

static const char *part_names[FM_PART_COUNT] = {"gate", "up", "down"};

/* ======================================================================= writer */

struct fm_packed_writer {
    char *final_dir; /* where the model appears when finished */
    char *dir;       /* final_dir + ".partial" while writing */
    bool force, finished;
    fm_config cfg;
    int dense_fd;
    uint64_t dense_size;
    json_t *dense_tensors;           /* name -> entry */
    fm_packed_expert_layer *layouts; /* [n_layers]; stride 0 until declared */
    int *expert_fds;                 /* [n_layers], -1 until opened */
    int64_t *experts_written;        /* [n_layers] */
    unsigned char *block;            /* one expert block, zero padded */
    uint64_t block_cap;
};

static fm_status write_all(int fd, const void *buf, size_t n, uint64_t off, const char *path) {
    const char *p = buf;
    while (n > 0) {
        ssize_t r = pwrite(fd, p, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) continue;
            return fm_error_set(FM_ERR_IO, "%s: write failed: %s", path, strerror(errno));
        }
        p += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return FM_OK;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static int remove_tree(const char *path) { return nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

/* mkdir -p of the directory that will hold `path`. */
static void make_parent_dirs(const char *path) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        mkdir(buf, 0755); /* existing components are fine; a real failure shows at the next mkdir */
        *p = '/';
    }
}

fm_status fm_packed_writer_init(const char *dir, const fm_config *cfg, bool force, fm_packed_writer **out) {
    *out = NULL;
    fm_status st;
    char path[4096];
    struct stat sb;
    if (stat(dir, &sb) == 0 && !force) return fm_error_set(FM_ERR_ARG, "%s already exists (remove it or pass --force)", dir);
    fm_packed_writer *w = calloc(1, sizeof *w);
    if (!w) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    w->dense_fd = -1;
    w->cfg = *cfg;
    w->force = force;
    w->final_dir = strdup(dir);
    snprintf(path, sizeof path, "%s.partial", dir);
    w->dir = strdup(path);
    w->dense_tensors = json_object();
    w->layouts = calloc((size_t)cfg->n_layers, sizeof *w->layouts);
    w->expert_fds = malloc(sizeof(int) * (size_t)cfg->n_layers);
    w->experts_written = calloc((size_t)cfg->n_layers, sizeof(int64_t));
    if (!w->final_dir || !w->dir || !w->dense_tensors || !w->layouts || !w->expert_fds || !w->experts_written) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    for (int l = 0; l < cfg->n_layers; l++) w->expert_fds[l] = -1;
    make_parent_dirs(w->dir);
    if (stat(w->dir, &sb) == 0 && remove_tree(w->dir) != 0) { /* left by an interrupted run */
        st = fm_error_set(FM_ERR_IO, "%s: cannot remove a stale partial model: %s", w->dir, strerror(errno));
        goto fail;
    }
    if (mkdir(w->dir, 0755) != 0) {
        st = fm_error_set(FM_ERR_IO, "%s: cannot create directory: %s", w->dir, strerror(errno));
        goto fail;
    }
    snprintf(path, sizeof path, "%s/experts", w->dir);
    if (mkdir(path, 0755) != 0) {
        st = fm_error_set(FM_ERR_IO, "%s: cannot create directory: %s", path, strerror(errno));
        goto fail;
    }
    snprintf(path, sizeof path, "%s/dense.bin", w->dir);
    w->dense_fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (w->dense_fd < 0) {
        st = fm_error_set(FM_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
        goto fail;
    }
    *out = w;
    return FM_OK;
fail:
    fm_packed_writer_free(w);
    return st;
}

/* Moves the finished DIR.partial to DIR (an existing DIR, with --force, is moved aside first). */
static fm_status publish(fm_packed_writer *w) {
    char old[4200];
    struct stat sb;
    if (stat(w->final_dir, &sb) == 0) {
        snprintf(old, sizeof old, "%s.old", w->final_dir);
        if (stat(old, &sb) == 0) remove_tree(old);
        if (rename(w->final_dir, old) != 0)
            return fm_error_set(FM_ERR_IO, "%s: cannot move aside: %s", w->final_dir, strerror(errno));
        if (rename(w->dir, w->final_dir) != 0)
            return fm_error_set(FM_ERR_IO, "%s: cannot rename to %s: %s", w->dir, w->final_dir, strerror(errno));
        remove_tree(old);
        return FM_OK;
    }
    if (rename(w->dir, w->final_dir) != 0)
        return fm_error_set(FM_ERR_IO, "%s: cannot rename to %s: %s", w->dir, w->final_dir, strerror(errno));
    return FM_OK;
}

static json_t *tensor_entry(const fm_packed_tensor *t) {
    json_t *sh = json_array();
    for (int i = 0; i < t->n_dims; i++) json_array_append_new(sh, json_integer(t->shape[i]));
    json_t *e = json_pack("{s:s, s:o, s:I, s:I}", "dtype", fm_dtype_name(t->dtype), "shape", sh, "offset",
                          (json_int_t)t->offset, "size", (json_int_t)t->n_bytes);
    if (e && fm_dtype_is_quant(t->dtype)) {
        json_object_set_new(e, "group_size", json_integer(t->group_size));
        json_object_set_new(e, "scale_dtype", json_string(fm_dtype_name(t->scale_dtype)));
    }
    return e;
}

fm_status fm_packed_writer_add_dense(fm_packed_writer *w, const fm_packed_tensor *t) {
    uint64_t want = fm_packed_tensor_nbytes(t);
    if (want == 0 || want != t->n_bytes)
        return fm_error_set(FM_ERR_ARG, "packed writer: tensor %s: %llu bytes do not match its dtype and shape", t->name,
                            (unsigned long long)t->n_bytes);
    if (json_object_get(w->dense_tensors, t->name))
        return fm_error_set(FM_ERR_ARG, "packed writer: tensor %s written twice", t->name);
    fm_packed_tensor placed = *t;
    placed.offset = align_up(w->dense_size, FM_PACKED_DENSE_ALIGN);
    char path[4096];
    snprintf(path, sizeof path, "%s/dense.bin", w->dir);
    TRY(write_all(w->dense_fd, t->data, t->n_bytes, placed.offset, path));
    w->dense_size = placed.offset + t->n_bytes;
    json_object_set_new(w->dense_tensors, t->name, tensor_entry(&placed));
    return FM_OK;
}

fm_status fm_packed_writer_set_expert_layout(fm_packed_writer *w, int layer, const fm_packed_tensor parts[FM_PART_COUNT]) {
    if (layer < 0 || layer >= w->cfg.n_layers) return fm_error_set(FM_ERR_ARG, "packed writer: layer %d out of range", layer);
    fm_packed_expert_layer *L = &w->layouts[layer];
    if (L->stride) return fm_error_set(FM_ERR_ARG, "packed writer: expert layout of layer %d declared twice", layer);
    uint64_t off = 0;
    for (int p = 0; p < FM_PART_COUNT; p++) {
        fm_packed_tensor *t = &L->parts[p];
        *t = parts[p];
        t->name = part_names[p];
        t->data = NULL;
        int64_t want[2];
        part_shape(&w->cfg, (fm_expert_part_id)p, want);
        t->n_bytes = fm_packed_tensor_nbytes(t);
        if (t->n_dims != 2 || t->shape[0] != want[0] || t->shape[1] != want[1] || t->n_bytes == 0)
            return fm_error_set(FM_ERR_ARG, "packed writer: bad %s layout for layer %d", part_names[p], layer);
        t->offset = off;
        off = align_up(off + t->n_bytes, FM_PACKED_DENSE_ALIGN);
    }
    L->stride = align_up(off, FM_PACKED_EXPERT_ALIGN);
    if (L->stride > w->block_cap) {
        free(w->block);
        w->block = malloc(L->stride);
        w->block_cap = w->block ? L->stride : 0;
        if (!w->block) return fm_error_set(FM_ERR_NOMEM, "out of memory for an expert block");
    }
    return FM_OK;
}

const fm_packed_expert_layer *fm_packed_writer_expert_layout(const fm_packed_writer *w, int layer) {
    if (layer < 0 || layer >= w->cfg.n_layers || !w->layouts[layer].stride) return NULL;
    return &w->layouts[layer];
}

static void expert_file_name(char *buf, size_t cap, int layer) { snprintf(buf, cap, "experts/L%03d.bin", layer); }

fm_status fm_packed_writer_put_expert(fm_packed_writer *w, int layer, int expert, const void *const parts[FM_PART_COUNT]) {
    if (layer < 0 || layer >= w->cfg.n_layers || expert < 0 || expert >= w->cfg.n_experts)
        return fm_error_set(FM_ERR_ARG, "packed writer: expert %d of layer %d out of range", expert, layer);
    const fm_packed_expert_layer *L = &w->layouts[layer];
    if (!L->stride) return fm_error_set(FM_ERR_ARG, "packed writer: expert layout of layer %d not declared", layer);
    char rel[64], path[4096];
    expert_file_name(rel, sizeof rel, layer);
    snprintf(path, sizeof path, "%s/%s", w->dir, rel);
    if (w->expert_fds[layer] < 0) {
        w->expert_fds[layer] = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (w->expert_fds[layer] < 0) return fm_error_set(FM_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
    }
    memset(w->block, 0, L->stride);
    for (int p = 0; p < FM_PART_COUNT; p++) memcpy(w->block + L->parts[p].offset, parts[p], L->parts[p].n_bytes);
    TRY(write_all(w->expert_fds[layer], w->block, L->stride, (uint64_t)expert * L->stride, path));
    w->experts_written[layer]++;
    return FM_OK;
}

fm_status fm_packed_writer_copy_file(fm_packed_writer *w, const char *src_path, const char *name) {
    char dst[4200];
    if (strchr(name, '/') || !strcmp(name, "model.json") || !strcmp(name, "dense.bin"))
        return fm_error_set(FM_ERR_ARG, "packed writer: cannot copy a file named %s", name);
    snprintf(dst, sizeof dst, "%s/%s", w->dir, name);
    int in = open(src_path, O_RDONLY | O_CLOEXEC);
    if (in < 0) return fm_error_set(FM_ERR_IO, "%s: cannot open: %s", src_path, strerror(errno));
    int out = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (out < 0) {
        close(in);
        return fm_error_set(FM_ERR_IO, "%s: cannot create: %s", dst, strerror(errno));
    }
    char buf[1 << 16];
    uint64_t off = 0;
    fm_status st = FM_OK;
    for (;;) {
        ssize_t r = read(in, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            st = fm_error_set(FM_ERR_IO, "%s: read failed: %s", src_path, strerror(errno));
            break;
        }
        if (r == 0) break;
        st = write_all(out, buf, (size_t)r, off, dst);
        if (st != FM_OK) break;
        off += (uint64_t)r;
    }
    close(in);
    if (close(out) != 0 && st == FM_OK) st = fm_error_set(FM_ERR_IO, "%s: close failed: %s", dst, strerror(errno));
    return st;
}

fm_status fm_packed_writer_finish(fm_packed_writer *w, json_t *source) {
    char path[4096], rel[64];
    fm_status st = FM_OK;
    json_t *layers = json_array();
    for (int l = 0; l < w->cfg.n_layers; l++) {
        if (w->experts_written[l] != w->cfg.n_experts) {
            st = fm_error_set(FM_ERR_ARG, "packed writer: layer %d has %lld of %d experts", l,
                              (long long)w->experts_written[l], w->cfg.n_experts);
            goto done;
        }
        expert_file_name(rel, sizeof rel, l);
        if (fsync(w->expert_fds[l]) != 0 || close(w->expert_fds[l]) != 0) {
            w->expert_fds[l] = -1;
            st = fm_error_set(FM_ERR_IO, "%s/%s: flush failed: %s", w->dir, rel, strerror(errno));
            goto done;
        }
        w->expert_fds[l] = -1;
        json_t *parts = json_object();
        for (int p = 0; p < FM_PART_COUNT; p++) json_object_set_new(parts, part_names[p], tensor_entry(&w->layouts[l].parts[p]));
        json_array_append_new(layers, json_pack("{s:s, s:I, s:o}", "file", rel, "stride", (json_int_t)w->layouts[l].stride,
                                                "parts", parts));
    }
    snprintf(path, sizeof path, "%s/dense.bin", w->dir);
    if (fsync(w->dense_fd) != 0 || close(w->dense_fd) != 0) {
        w->dense_fd = -1;
        st = fm_error_set(FM_ERR_IO, "%s: flush failed: %s", path, strerror(errno));
        goto done;
    }
    w->dense_fd = -1;
    json_t *manifest = json_pack("{s:s, s:i, s:o, s:{s:s, s:I, s:O}, s:{s:i, s:O}, s:o}", "format", FM_PACKED_FORMAT_NAME,
                                 "version", FM_PACKED_VERSION, "config", fm_config_to_json(&w->cfg), "dense", "file",
                                 "dense.bin", "size", (json_int_t)w->dense_size, "tensors", w->dense_tensors, "experts",
                                 "count", w->cfg.n_experts, "layers", layers, "source", source ? source : json_object());
    source = NULL;
    if (!manifest) {
        st = fm_error_set(FM_ERR_NOMEM, "cannot build model.json");
        goto done;
    }
    snprintf(path, sizeof path, "%s/model.json", w->dir);
    if (json_dump_file(manifest, path, JSON_INDENT(1)) != 0) st = fm_error_set(FM_ERR_IO, "%s: cannot write", path);
    json_decref(manifest);
    if (st == FM_OK) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || fsync(fd) != 0) st = fm_error_set(FM_ERR_IO, "%s: flush failed", path);
        if (fd >= 0) close(fd);
    }
    if (st == FM_OK) st = publish(w);
    if (st == FM_OK) w->finished = true;
done:
    json_decref(source);
    json_decref(layers);
    return st;
}

void fm_packed_writer_free(fm_packed_writer *w) {
    if (!w) return;
    if (w->dense_fd >= 0) close(w->dense_fd);
    if (w->expert_fds)
        for (int l = 0; l < w->cfg.n_layers; l++)
            if (w->expert_fds[l] >= 0) close(w->expert_fds[l]);
    struct stat sb;
    if (!w->finished && w->dir && stat(w->dir, &sb) == 0) remove_tree(w->dir); /* never leave half a model */
    free(w->final_dir);
    json_decref(w->dense_tensors);
    free(w->layouts);
    free(w->expert_fds);
    free(w->experts_written);
    free(w->block);
    free(w->dir);
    free(w);
}

/* ======================================================================= reader */

static fm_status parse_tensor(json_t *e, const char *what, const char *name, fm_packed_tensor *t) {
    memset(t, 0, sizeof *t);
    if (!json_is_object(e)) return fm_error_set(FM_ERR_FORMAT, "%s: tensor %s: entry is not an object", what, name);
    const char *dts = json_string_value(json_object_get(e, "dtype"));
    json_t *shape = json_object_get(e, "shape"), *off = json_object_get(e, "offset"), *sz = json_object_get(e, "size");
    if (!dts || !json_is_array(shape) || !json_is_integer(off) || !json_is_integer(sz))
        return fm_error_set(FM_ERR_FORMAT, "%s: tensor %s: needs dtype, shape, offset and size", what, name);
    t->name = name;
    t->dtype = fm_dtype_from_name(dts);
    if (t->dtype != FM_DTYPE_F32 && t->dtype != FM_DTYPE_BF16 && t->dtype != FM_DTYPE_F16 && !fm_dtype_is_quant(t->dtype))
        return fm_error_set(FM_ERR_UNSUPPORTED, "%s: tensor %s: dtype %s is not supported", what, name, dts);
    t->n_dims = (int)json_array_size(shape);
    if (t->n_dims < 1 || t->n_dims > FM_PACKED_MAX_DIMS)
        return fm_error_set(FM_ERR_FORMAT, "%s: tensor %s: %d dimensions", what, name, t->n_dims);
    for (int i = 0; i < t->n_dims; i++) {
        json_t *d = json_array_get(shape, (size_t)i);
        if (!json_is_integer(d) || json_integer_value(d) < 0)
            return fm_error_set(FM_ERR_FORMAT, "%s: tensor %s: bad shape", what, name);
        t->shape[i] = (int64_t)json_integer_value(d);
    }
    if (fm_dtype_is_quant(t->dtype)) {
        json_t *gs = json_object_get(e, "group_size");
        const char *sd = json_string_value(json_object_get(e, "scale_dtype"));
        if (!json_is_integer(gs) || !sd)
            return fm_error_set(FM_ERR_FORMAT, "%s: tensor %s: a quantized tensor needs group_size and scale_dtype", what,
                                name);
        t->group_size = (int)json_integer_value(gs);
        t->scale_dtype = fm_dtype_from_name(sd);
        fm_status st = fm_quant_check(name, t->dtype, t->n_dims == 2 ? t->shape[1] : -1, t->group_size, t->scale_dtype);
        if (st != FM_OK) return fm_error_wrap(st, "%s", what);
        if (t->n_dims != 2) return fm_error_set(FM_ERR_FORMAT, "%s: tensor %s: a quantized tensor must be 2-D", what, name);
    }
    if (json_integer_value(off) < 0 || json_integer_value(sz) < 0)
        return fm_error_set(FM_ERR_FORMAT, "%s: tensor %s: negative offset or size", what, name);
    t->offset = (uint64_t)json_integer_value(off);
    t->n_bytes = (uint64_t)json_integer_value(sz);
    uint64_t want = fm_packed_tensor_nbytes(t);
    if (want == 0 || want != t->n_bytes)
        return fm_error_set(FM_ERR_FORMAT, "%s: tensor %s: size %llu does not match its shape and dtype (%llu)", what, name,
                            (unsigned long long)t->n_bytes, (unsigned long long)want);
    return FM_OK;
}

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp(((const fm_packed_tensor *)a)->name, ((const fm_packed_tensor *)b)->name);
}
static int cmp_tensor_offset(const void *a, const void *b) {
    const fm_packed_tensor *x = *(fm_packed_tensor *const *)a, *y = *(fm_packed_tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static fm_status open_dense(fm_packed_model *m, json_t *dense, const char *what) {
    char path[4096];
    if (!json_is_object(dense)) return fm_error_set(FM_ERR_FORMAT, "%s: missing \"dense\" object", what);
    const char *file = json_string_value(json_object_get(dense, "file"));
    json_t *tensors = json_object_get(dense, "tensors");
    if (!file || !json_is_object(tensors) || strchr(file, '/'))
        return fm_error_set(FM_ERR_FORMAT, "%s: \"dense\" needs a plain file name and a tensors object", what);
    snprintf(path, sizeof path, "%s/%s", m->dir, file);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fm_error_set(FM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        close(fd);
        return fm_error_set(FM_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    }
    m->dense_size = (uint64_t)sb.st_size;
    if (m->dense_size > 0) {
        m->dense_map = mmap(NULL, m->dense_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m->dense_map == MAP_FAILED) {
            m->dense_map = NULL;
            close(fd);
            return fm_error_set(FM_ERR_IO, "%s: cannot map: %s", path, strerror(errno));
        }
        fm_mapguard_add(m->dense_map, m->dense_size, path, -1, 0); /* a truncated file: a clear error */
    }
    close(fd);
    size_t n = json_object_size(tensors);
    m->tensors = calloc(n ? n : 1, sizeof *m->tensors);
    fm_packed_tensor **by_off = calloc(n ? n : 1, sizeof *by_off);
    if (!m->tensors || !by_off) {
        free(by_off);
        return fm_error_set(FM_ERR_NOMEM, "out of memory");
    }
    const char *name;
    json_t *e;
    fm_status st = FM_OK;
    json_object_foreach(tensors, name, e) {
        fm_packed_tensor *t = &m->tensors[m->n_tensors];
        st = parse_tensor(e, path, name, t);
        if (st != FM_OK) break;
        if (t->offset > m->dense_size || t->n_bytes > m->dense_size - t->offset) {
            st = fm_error_set(FM_ERR_FORMAT, "%s: tensor %s: bytes [%llu, +%llu) lie past the end of the file (%llu bytes)",
                              path, name, (unsigned long long)t->offset, (unsigned long long)t->n_bytes,
                              (unsigned long long)m->dense_size);
            break;
        }
        if (t->offset % FM_PACKED_DENSE_ALIGN) {
            st = fm_error_set(FM_ERR_FORMAT, "%s: tensor %s: offset %llu is not %d-byte aligned", path, name,
                              (unsigned long long)t->offset, FM_PACKED_DENSE_ALIGN);
            break;
        }
        t->data = (const char *)m->dense_map + t->offset;
        by_off[m->n_tensors++] = t;
    }
    if (st == FM_OK) {
        qsort(by_off, m->n_tensors, sizeof *by_off, cmp_tensor_offset);
        for (size_t i = 1; i < m->n_tensors; i++)
            if (by_off[i - 1]->offset + by_off[i - 1]->n_bytes > by_off[i]->offset) {
                st = fm_error_set(FM_ERR_FORMAT, "%s: tensors %s and %s overlap", path, by_off[i - 1]->name,
                                  by_off[i]->name);
                break;
            }
    }
    free(by_off);
    if (st == FM_OK && m->n_tensors > 1) qsort(m->tensors, m->n_tensors, sizeof *m->tensors, cmp_tensor_name);
    return st;
}

static fm_status open_expert_layer(fm_packed_model *m, int l, json_t *e, const char *what) {
    const fm_config *c = &m->config;
    fm_packed_expert_layer *L = &m->experts[l];
    json_t *stride = json_object_get(e, "stride"), *parts = json_object_get(e, "parts");
    const char *rel = json_string_value(json_object_get(e, "file"));
    if (!json_is_object(e) || !json_is_integer(stride) || !json_is_object(parts) || !rel)
        return fm_error_set(FM_ERR_FORMAT, "%s: experts.layers[%d] needs file, stride and parts", what, l);
    if (json_integer_value(stride) <= 0 || json_integer_value(stride) % FM_PACKED_EXPERT_ALIGN)
        return fm_error_set(FM_ERR_FORMAT, "%s: experts.layers[%d].stride must be a positive multiple of %d", what, l,
                            FM_PACKED_EXPERT_ALIGN);
    L->stride = (uint64_t)json_integer_value(stride);
    if (L->stride > m->max_expert_stride) m->max_expert_stride = L->stride;
    for (int p = 0; p < FM_PART_COUNT; p++) {
        fm_packed_tensor *t = &L->parts[p];
        json_t *pe = json_object_get(parts, part_names[p]);
        if (!pe) return fm_error_set(FM_ERR_FORMAT, "%s: experts.layers[%d].parts lacks \"%s\"", what, l, part_names[p]);
        TRY(parse_tensor(pe, what, part_names[p], t));
        int64_t want[2];
        part_shape(c, (fm_expert_part_id)p, want);
        if (t->n_dims != 2 || t->shape[0] != want[0] || t->shape[1] != want[1])
            return fm_error_set(FM_ERR_FORMAT, "%s: expert part %s of layer %d has the wrong shape for the config", what,
                                part_names[p], l);
        if (t->offset > L->stride || t->n_bytes > L->stride - t->offset)
            return fm_error_set(FM_ERR_FORMAT, "%s: expert part %s of layer %d lies outside the expert block", what,
                                part_names[p], l);
    }
    if (strstr(rel, "..") || rel[0] == '/')
        return fm_error_set(FM_ERR_FORMAT, "%s: experts.layers[%d].file is not a relative file name", what, l);
    size_t len = strlen(m->dir) + strlen(rel) + 2;
    L->file = malloc(len);
    if (!L->file) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    snprintf(L->file, len, "%s/%s", m->dir, rel);
    struct stat sb;
    if (stat(L->file, &sb) != 0)
        return fm_error_set(FM_ERR_IO, "%s: expert file of layer %d: %s", L->file, l, strerror(errno));
    uint64_t want = L->stride * (uint64_t)c->n_experts;
    if ((uint64_t)sb.st_size != want)
        return fm_error_set(FM_ERR_FORMAT, "%s: expert file of layer %d is %llu bytes, expected %llu (%d experts x %llu)",
                            L->file, l, (unsigned long long)sb.st_size, (unsigned long long)want, c->n_experts,
                            (unsigned long long)L->stride);
    return FM_OK;
}

static fm_status open_experts(fm_packed_model *m, json_t *ex, const char *what) {
    const fm_config *c = &m->config;
    if (!json_is_object(ex)) return fm_error_set(FM_ERR_FORMAT, "%s: missing \"experts\" object", what);
    json_t *count = json_object_get(ex, "count"), *layers = json_object_get(ex, "layers");
    if (!json_is_integer(count) || !json_is_array(layers))
        return fm_error_set(FM_ERR_FORMAT, "%s: \"experts\" needs count and layers", what);
    if (json_integer_value(count) != c->n_experts)
        return fm_error_set(FM_ERR_FORMAT, "%s: experts.count %lld differs from num_experts %d", what,
                            (long long)json_integer_value(count), c->n_experts);
    if ((int)json_array_size(layers) != c->n_layers)
        return fm_error_set(FM_ERR_FORMAT, "%s: experts.layers has %zu entries for %d layers", what,
                            json_array_size(layers), c->n_layers);
    m->experts = calloc((size_t)c->n_layers, sizeof *m->experts);
    if (!m->experts) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    for (int l = 0; l < c->n_layers; l++) TRY(open_expert_layer(m, l, json_array_get(layers, (size_t)l), what));
    return FM_OK;
}

fm_status fm_packed_open(const char *dir, fm_packed_model **out) {
    *out = NULL;
    char path[4096];
    fm_status st;
    fm_packed_model *m = calloc(1, sizeof *m);
    if (!m) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    m->dir = strdup(dir);
    if (!m->dir) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    snprintf(path, sizeof path, "%s/model.json", dir);
    json_error_t jerr;
    m->manifest = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!m->manifest) {
        struct stat sb;
        if (stat(path, &sb) != 0)
            st = fm_error_set(FM_ERR_IO, "%s: cannot open: %s (is %s a packed model? make one with flashmoe convert)",
                              path, strerror(errno), dir);
        else
            st = fm_error_set(FM_ERR_FORMAT, "%s: invalid JSON at line %d column %d: %s", path, jerr.line,
                              jerr.column, jerr.text);
        goto fail;
    }
    const char *fmt = json_string_value(json_object_get(m->manifest, "format"));
    json_t *ver = json_object_get(m->manifest, "version");
    if (!fmt || strcmp(fmt, FM_PACKED_FORMAT_NAME) != 0) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: not a flashmoe packed model (\"format\" is not \"%s\")", path,
                          FM_PACKED_FORMAT_NAME);
        goto fail;
    }
    if (!json_is_integer(ver) || json_integer_value(ver) != FM_PACKED_VERSION) {
        st = fm_error_set(FM_ERR_UNSUPPORTED, "%s: format version %lld is not supported (this build reads %d)", path,
                          (long long)json_integer_value(ver), FM_PACKED_VERSION);
        goto fail;
    }
    st = fm_config_parse(json_object_get(m->manifest, "config"), path, &m->config);
    if (st != FM_OK) goto fail;
    st = open_dense(m, json_object_get(m->manifest, "dense"), path);
    if (st != FM_OK) goto fail;
    st = open_experts(m, json_object_get(m->manifest, "experts"), path);
    if (st != FM_OK) goto fail;
    *out = m;
    return FM_OK;
fail:
    fm_packed_close(m);
    return st;
}

void fm_packed_close(fm_packed_model *m) {
    if (!m) return;
    if (m->dense_map) {
        fm_mapguard_remove(m->dense_map);
        munmap(m->dense_map, m->dense_size);
    }
    if (m->experts)
        for (int l = 0; l < m->config.n_layers; l++) free(m->experts[l].file);
    free(m->experts);
    free(m->tensors);
    json_decref(m->manifest);
    free(m->dir);
    free(m);
}

const fm_packed_tensor *fm_packed_find(const fm_packed_model *m, const char *name) {
    if (!m->n_tensors) return NULL;
    fm_packed_tensor key = {.name = name};
    return bsearch(&key, m->tensors, m->n_tensors, sizeof *m->tensors, cmp_tensor_name);
}
