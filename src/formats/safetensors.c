#include "formats/safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/error.h"

#define ST_MAX_HEADER ((uint64_t)100 << 20)    /* 100 MiB, as the reference implementation */
#define ST_MAX_INDEX ((int64_t)256 << 20)      /* generous cap on model.safetensors.index.json */
#define ST_METADATA_KEY "__metadata__"

typedef struct st_file {
    char *path;
    void *map;
    size_t map_size;
} st_file;

struct fm_st_set {
    st_file *files;
    int n_files, cap_files;
    fm_st_tensor *tensors; /* sorted by name once open */
    size_t n_tensors, cap_tensors;
    uint32_t *hash; /* open addressing, linear probing: tensor index + 1, 0 = empty */
    size_t hash_mask;
};

/* ---- small helpers ---------------------------------------------------------------------------- */

static char *st_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

static char *st_join(const char *dir, const char *name) {
    size_t nd = strlen(dir), nn = strlen(name);
    while (nd > 1 && dir[nd - 1] == '/') nd--;
    char *p = malloc(nd + 1 + nn + 1);
    if (!p) return NULL;
    memcpy(p, dir, nd);
    p[nd] = '/';
    memcpy(p + nd + 1, name, nn + 1);
    return p;
}

static uint64_t st_hash_name(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
    return h ^ (h >> 29);
}

/* `s` made safe for a one-line message: control bytes become '?', long names are cut with "...". */
static const char *st_show(const char *s, char *buf, size_t cap) {
    size_t n = 0;
    for (; s[n] && n + 1 < cap; n++) buf[n] = ((uint8_t)s[n] < 0x20 || s[n] == 0x7f) ? '?' : s[n];
    buf[n] = '\0';
    if (s[n] && cap > 4) memcpy(buf + cap - 4, "...", 4);
    return buf;
}

/* Sets "<path>: tensor '<name>': <detail>" and returns status. */
__attribute__((format(printf, 4, 5))) static fm_status st_entry_error(fm_status status, const char *path,
                                                                     const char *name, const char *fmt,
                                                                     ...) {
    char detail[512], shown[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    return fm_error_set(status, "%s: tensor '%s': %s", path, st_show(name, shown, sizeof shown), detail);
}

static bool st_mul_i64(int64_t a, int64_t b, int64_t *out) { return !__builtin_mul_overflow(a, b, out); }

static int st_cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int st_cmp_tensor(const void *a, const void *b) {
    const fm_st_tensor *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    if (c) return c;
    return (x->file_index > y->file_index) - (x->file_index < y->file_index);
}

/* ---- one file --------------------------------------------------------------------------------- */

typedef struct st_range {
    uint64_t begin, end;
    const char *name;
} st_range;

static int st_cmp_range(const void *a, const void *b) {
    const st_range *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return (x->end > y->end) - (x->end < y->end);
}

static fm_status st_push_tensor(fm_st_set *set, const fm_st_tensor *t) {
    if (set->n_tensors == set->cap_tensors) {
        size_t cap = set->cap_tensors ? set->cap_tensors * 2 : 64;
        fm_st_tensor *p = realloc(set->tensors, cap * sizeof *p);
        if (!p) return fm_error_set(FM_ERR_NOMEM, "out of memory for %zu tensors", cap);
        set->tensors = p;
        set->cap_tensors = cap;
    }
    set->tensors[set->n_tensors++] = *t;
    return FM_OK;
}

/* Validates one header entry and fills *t (name not set) and *range. */
static fm_status st_parse_entry(const char *path, const char *name, json_t *entry,
                                uint64_t data_size, fm_st_tensor *t, st_range *range) {
    if (!json_is_object(entry))
        return st_entry_error(FM_ERR_FORMAT, path, name, "header entry is not a JSON object");

    json_t *jd = json_object_get(entry, "dtype");
    if (!jd) return st_entry_error(FM_ERR_FORMAT, path, name, "missing \"dtype\"");
    if (!json_is_string(jd))
        return st_entry_error(FM_ERR_FORMAT, path, name, "\"dtype\" is not a string");
    t->dtype = fm_dtype_from_name(json_string_value(jd));
    if (fm_dtype_size(t->dtype) == 0) { /* unknown, or one of our own quantized types */
        char shown[64];
        return st_entry_error(FM_ERR_UNSUPPORTED, path, name, "unsupported dtype \"%s\"",
                              st_show(json_string_value(jd), shown, sizeof shown));
    }

    json_t *js = json_object_get(entry, "shape");
    if (!js) return st_entry_error(FM_ERR_FORMAT, path, name, "missing \"shape\"");
    if (!json_is_array(js))
        return st_entry_error(FM_ERR_FORMAT, path, name, "\"shape\" is not an array");
    size_t nd = json_array_size(js);
    if (nd > FM_ST_MAX_DIMS)
        return st_entry_error(FM_ERR_FORMAT, path, name, "\"shape\" has %zu dims (at most %d)", nd,
                              FM_ST_MAX_DIMS);
    t->n_dims = (int)nd;
    t->n_elements = 1;
    for (size_t i = 0; i < nd; i++) {
        json_t *v = json_array_get(js, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0)
            return st_entry_error(FM_ERR_FORMAT, path, name, "\"shape\"[%zu] is not an integer >= 0",
                                  i);
        t->shape[i] = (int64_t)json_integer_value(v);
        if (!st_mul_i64(t->n_elements, t->shape[i], &t->n_elements))
            return st_entry_error(FM_ERR_FORMAT, path, name, "element count overflows");
    }

    json_t *jo = json_object_get(entry, "data_offsets");
    if (!jo) return st_entry_error(FM_ERR_FORMAT, path, name, "missing \"data_offsets\"");
    if (!json_is_array(jo) || json_array_size(jo) != 2 || !json_is_integer(json_array_get(jo, 0)) ||
        !json_is_integer(json_array_get(jo, 1)))
        return st_entry_error(FM_ERR_FORMAT, path, name,
                              "\"data_offsets\" is not an array of two integers");
    int64_t begin = (int64_t)json_integer_value(json_array_get(jo, 0));
    int64_t end = (int64_t)json_integer_value(json_array_get(jo, 1));
    if (begin < 0 || end < begin || (uint64_t)end > data_size)
        return st_entry_error(FM_ERR_FORMAT, path, name,
                              "\"data_offsets\" [%" PRId64 ", %" PRId64
                              "] out of range (data section is %" PRIu64 " bytes)",
                              begin, end, data_size);

    int64_t n_bytes;
    if (!st_mul_i64(t->n_elements, (int64_t)fm_dtype_size(t->dtype), &n_bytes))
        return st_entry_error(FM_ERR_FORMAT, path, name, "byte size overflows");
    if (end - begin != n_bytes)
        return st_entry_error(FM_ERR_FORMAT, path, name,
                              "\"data_offsets\" span %" PRId64 " bytes, but %" PRId64
                              " elements of %s need %" PRId64,
                              end - begin, t->n_elements, fm_dtype_name(t->dtype), n_bytes);
    t->n_bytes = (uint64_t)n_bytes;
    range->begin = (uint64_t)begin;
    range->end = (uint64_t)end;
    return FM_OK;
}

/* Checks that no two non-empty ranges of one file overlap (sorts `r`). */
static fm_status st_check_overlap(const char *path, st_range *r, size_t n) {
    qsort(r, n, sizeof *r, st_cmp_range);
    const st_range *prev = NULL; /* the non-empty range reaching furthest so far */
    for (size_t i = 0; i < n; i++) {
        if (r[i].begin == r[i].end) continue;
        if (prev && r[i].begin < prev->end) {
            char a[200], b[200];
            return fm_error_set(FM_ERR_FORMAT,
                                "%s: tensors '%s' [%" PRIu64 ", %" PRIu64 ") and '%s' [%" PRIu64
                                ", %" PRIu64 ") overlap",
                                path, st_show(prev->name, a, sizeof a), prev->begin, prev->end,
                                st_show(r[i].name, b, sizeof b), r[i].begin, r[i].end);
        }
        if (!prev || r[i].end > prev->end) prev = &r[i];
    }
    return FM_OK;
}

/* Maps `path` (taking ownership of the string), validates its header and appends its tensors. */
static fm_status st_add_file(fm_st_set *set, char *path) {
    fm_status st;
    json_t *root = NULL;
    st_range *ranges = NULL;
    int fd = -1;

    if (set->n_files == set->cap_files) {
        int cap = set->cap_files ? set->cap_files * 2 : 4;
        st_file *p = realloc(set->files, (size_t)cap * sizeof *p);
        if (!p) {
            free(path);
            return fm_error_set(FM_ERR_NOMEM, "out of memory");
        }
        set->files = p;
        set->cap_files = cap;
    }
    int file_index = set->n_files++;
    st_file *f = &set->files[file_index];
    *f = (st_file){.path = path, .map = NULL, .map_size = 0};

    fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* O_NONBLOCK: a FIFO must not block us */
    if (fd < 0) {
        st = fm_error_set(FM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        st = fm_error_set(FM_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = fm_error_set(FM_ERR_IO, "%s: not a regular file", path);
        goto fail;
    }
    uint64_t file_size = (uint64_t)sb.st_size;
    if (file_size < 8) {
        st = fm_error_set(FM_ERR_FORMAT,
                          "%s: file is %" PRIu64 " bytes, shorter than the 8-byte header length", path,
                          file_size);
        goto fail;
    }
    void *map = mmap(NULL, (size_t)file_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
        st = fm_error_set(FM_ERR_IO, "%s: cannot mmap %" PRIu64 " bytes: %s", path, file_size,
                          strerror(errno));
        goto fail;
    }
    f->map = map;
    f->map_size = (size_t)file_size;
    close(fd);
    fd = -1;

    const uint8_t *base = map;
    uint64_t n_header = 0;
    for (int i = 7; i >= 0; i--) n_header = (n_header << 8) | base[i];
    if (n_header == 0) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: header length is 0", path);
        goto fail;
    }
    if (n_header > ST_MAX_HEADER) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: header length %" PRIu64 " exceeds the %" PRIu64
                          "-byte limit", path, n_header, ST_MAX_HEADER);
        goto fail;
    }
    if (n_header > file_size - 8) {
        st = fm_error_set(FM_ERR_FORMAT,
                          "%s: header length %" PRIu64 " runs past the end of the file (%" PRIu64
                          " bytes)", path, n_header, file_size);
        goto fail;
    }
    const uint8_t *data = base + 8 + n_header;
    uint64_t data_size = file_size - 8 - n_header;

    json_error_t jerr;
    root = json_loadb((const char *)base + 8, (size_t)n_header, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: header is not valid JSON: %s (line %d, column %d, byte %d)",
                          path, jerr.text, jerr.line, jerr.column, jerr.position);
        goto fail;
    }
    if (!json_is_object(root)) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: header is not a JSON object", path);
        goto fail;
    }

    size_t n_entries = json_object_size(root);
    ranges = malloc((n_entries ? n_entries : 1) * sizeof *ranges);
    if (!ranges) {
        st = fm_error_set(FM_ERR_NOMEM, "%s: out of memory for %zu header entries", path, n_entries);
        goto fail;
    }
    size_t n_ranges = 0;
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value) {
        if (strcmp(key, ST_METADATA_KEY) == 0) continue;
        fm_st_tensor t = {0};
        st_range r = {0};
        st = st_parse_entry(path, key, value, data_size, &t, &r);
        if (st != FM_OK) goto fail;
        t.data = data + r.begin;
        t.file_index = file_index;
        char *name = st_strdup(key);
        if (!name) {
            st = fm_error_set(FM_ERR_NOMEM, "%s: out of memory", path);
            goto fail;
        }
        t.name = name;
        st = st_push_tensor(set, &t);
        if (st != FM_OK) {
            free(name);
            goto fail;
        }
        r.name = name;
        ranges[n_ranges++] = r;
    }
    st = st_check_overlap(path, ranges, n_ranges);
    if (st != FM_OK) goto fail;

    free(ranges);
    json_decref(root);
    return FM_OK;

fail:
    free(ranges);
    json_decref(root);
    if (fd >= 0) close(fd);
    return st; /* the file and any tensors already pushed are released by fm_st_close */
}

/* ---- the set ---------------------------------------------------------------------------------- */

/* Sorts tensors by name, rejects names present in two files and builds the hash table. */
static fm_status st_finish(fm_st_set *set) {
    if (set->n_tensors >= UINT32_MAX)
        return fm_error_set(FM_ERR_FORMAT, "too many tensors (%zu)", set->n_tensors);
    if (set->n_tensors > 1) qsort(set->tensors, set->n_tensors, sizeof *set->tensors, st_cmp_tensor);
    for (size_t i = 1; i < set->n_tensors; i++) {
        const fm_st_tensor *a = &set->tensors[i - 1], *b = &set->tensors[i];
        if (strcmp(a->name, b->name) == 0) {
            char shown[200];
            return fm_error_set(FM_ERR_FORMAT, "tensor '%s' appears in both %s and %s",
                                st_show(a->name, shown, sizeof shown), set->files[a->file_index].path,
                                set->files[b->file_index].path);
        }
    }
    size_t cap = 16;
    while (cap < 2 * set->n_tensors) cap *= 2;
    set->hash = calloc(cap, sizeof *set->hash);
    if (!set->hash) return fm_error_set(FM_ERR_NOMEM, "out of memory for the tensor index");
    set->hash_mask = cap - 1;
    for (size_t i = 0; i < set->n_tensors; i++) {
        size_t h = (size_t)st_hash_name(set->tensors[i].name) & set->hash_mask;
        while (set->hash[h]) h = (h + 1) & set->hash_mask;
        set->hash[h] = (uint32_t)(i + 1);
    }
    return FM_OK;
}

static bool st_valid_shard_name(const char *s) {
    return s[0] != '\0' && !strchr(s, '/') && !strstr(s, "..");
}

/* Reads a whole small file into a malloc'd buffer. */
static fm_status st_read_file(const char *path, char **out, size_t *out_len) {
    fm_status st;
    char *buf = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return fm_error_set(FM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return fm_error_set(FM_ERR_IO, "%s: not a readable regular file", path);
    }
    FILE *fp = fdopen(fd, "rb");
    if (!fp) {
        close(fd);
        return fm_error_set(FM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    }
    if ((int64_t)sb.st_size > ST_MAX_INDEX) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: %" PRId64 " bytes, larger than the %" PRId64 "-byte limit",
                          path, (int64_t)sb.st_size, ST_MAX_INDEX);
        goto fail;
    }
    size_t n = (size_t)sb.st_size;
    buf = malloc(n ? n : 1);
    if (!buf) {
        st = fm_error_set(FM_ERR_NOMEM, "%s: out of memory", path);
        goto fail;
    }
    if (fread(buf, 1, n, fp) != n) {
        st = fm_error_set(FM_ERR_IO, "%s: read failed", path);
        goto fail;
    }
    fclose(fp);
    *out = buf;
    *out_len = n;
    return FM_OK;
fail:
    free(buf);
    fclose(fp);
    return st;
}

static fm_status st_open_index(fm_st_set *set, const char *dir, const char *index_path) {
    fm_status st;
    char *text = NULL;
    size_t text_len = 0;
    json_t *root = NULL;
    const char **shards = NULL;

    st = st_read_file(index_path, &text, &text_len);
    if (st != FM_OK) return st;
    json_error_t jerr;
    root = json_loadb(text, text_len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: not valid JSON: %s (line %d, column %d, byte %d)",
                          index_path, jerr.text, jerr.line, jerr.column, jerr.position);
        goto fail;
    }
    if (!json_is_object(root)) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: not a JSON object", index_path);
        goto fail;
    }
    json_t *wm = json_object_get(root, "weight_map");
    if (!wm) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: missing \"weight_map\"", index_path);
        goto fail;
    }
    if (!json_is_object(wm)) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: \"weight_map\" is not an object", index_path);
        goto fail;
    }
    size_t n_map = json_object_size(wm);
    if (n_map == 0) {
        st = fm_error_set(FM_ERR_FORMAT, "%s: \"weight_map\" is empty", index_path);
        goto fail;
    }

    /* Distinct shard names, validated, in name order. */
    shards = malloc(n_map * sizeof *shards);
    if (!shards) {
        st = fm_error_set(FM_ERR_NOMEM, "%s: out of memory", index_path);
        goto fail;
    }
    size_t n_shards = 0;
    const char *key;
    json_t *value;
    char shown_key[200], shown_shard[200];
    json_object_foreach(wm, key, value) {
        if (!json_is_string(value)) {
            st = fm_error_set(FM_ERR_FORMAT, "%s: weight_map entry for tensor '%s' is not a string",
                              index_path, st_show(key, shown_key, sizeof shown_key));
            goto fail;
        }
        const char *shard = json_string_value(value);
        if (!st_valid_shard_name(shard)) {
            st = fm_error_set(FM_ERR_FORMAT,
                              "%s: tensor '%s': shard file name \"%s\" is not a plain file name",
                              index_path, st_show(key, shown_key, sizeof shown_key),
                              st_show(shard, shown_shard, sizeof shown_shard));
            goto fail;
        }
        shards[n_shards++] = shard;
    }
    qsort(shards, n_shards, sizeof *shards, st_cmp_str);
    size_t n_unique = 0;
    for (size_t i = 0; i < n_shards; i++)
        if (n_unique == 0 || strcmp(shards[n_unique - 1], shards[i]) != 0) shards[n_unique++] = shards[i];

    for (size_t i = 0; i < n_unique; i++) {
        char *p = st_join(dir, shards[i]);
        if (!p) {
            st = fm_error_set(FM_ERR_NOMEM, "out of memory");
            goto fail;
        }
        if (access(p, F_OK) != 0) {
            st = fm_error_set(FM_ERR_IO, "%s: names shard %s, which cannot be opened: %s", index_path,
                              p, strerror(errno));
            free(p);
            goto fail;
        }
        st = st_add_file(set, p);
        if (st != FM_OK) goto fail;
    }
    st = st_finish(set);
    if (st != FM_OK) goto fail;

    /* Every tensor the index names must be in the shard it names. */
    json_object_foreach(wm, key, value) {
        const char *shard = json_string_value(value);
        const fm_st_tensor *t = fm_st_find(set, key);
        if (!t) {
            st = fm_error_set(FM_ERR_FORMAT, "%s: tensor '%s' is mapped to %s, which does not contain it",
                              index_path, st_show(key, shown_key, sizeof shown_key),
                              st_show(shard, shown_shard, sizeof shown_shard));
            goto fail;
        }
        const char *found = set->files[t->file_index].path;
        const char *slash = strrchr(found, '/');
        if (strcmp(slash ? slash + 1 : found, shard) != 0) {
            st = fm_error_set(FM_ERR_FORMAT, "%s: tensor '%s' is mapped to %s but found in %s",
                              index_path, st_show(key, shown_key, sizeof shown_key),
                              st_show(shard, shown_shard, sizeof shown_shard), found);
            goto fail;
        }
    }
    st = FM_OK;
fail:
    free(shards);
    json_decref(root);
    free(text);
    return st;
}

/* Lists the *.safetensors regular files of `dir` (no dot-files), sorted by name. */
static fm_status st_list_dir(const char *dir, char ***out, size_t *out_n) {
    fm_status st = FM_OK;
    char **names = NULL;
    size_t n = 0, cap = 0;
    DIR *d = opendir(dir);
    if (!d) return fm_error_set(FM_ERR_IO, "%s: cannot open directory: %s", dir, strerror(errno));
    const char *suffix = ".safetensors";
    size_t ns = strlen(suffix);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (e->d_name[0] == '.' || len <= ns || strcmp(e->d_name + len - ns, suffix) != 0) continue;
        char *p = st_join(dir, e->d_name);
        if (!p) {
            st = fm_error_set(FM_ERR_NOMEM, "out of memory");
            goto fail;
        }
        struct stat sb;
        if (stat(p, &sb) != 0 || !S_ISREG(sb.st_mode)) {
            free(p);
            continue;
        }
        free(p);
        if (n == cap) {
            size_t c = cap ? cap * 2 : 8;
            char **q = realloc(names, c * sizeof *q);
            if (!q) {
                st = fm_error_set(FM_ERR_NOMEM, "out of memory");
                goto fail;
            }
            names = q;
            cap = c;
        }
        if (!(names[n] = st_strdup(e->d_name))) {
            st = fm_error_set(FM_ERR_NOMEM, "out of memory");
            goto fail;
        }
        n++;
    }
    closedir(d);
    if (n) qsort(names, n, sizeof *names, st_cmp_str);
    *out = names;
    *out_n = n;
    return FM_OK;
fail:
    closedir(d);
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    return st;
}

fm_status fm_st_open(const char *path, fm_st_set **out) {
    if (!out) return fm_error_set(FM_ERR_ARG, "fm_st_open: out is NULL");
    *out = NULL;
    if (!path) return fm_error_set(FM_ERR_ARG, "fm_st_open: path is NULL");

    fm_status st;
    char *index_path = NULL;
    char **names = NULL;
    size_t n_names = 0;
    fm_st_set *set = calloc(1, sizeof *set);
    if (!set) return fm_error_set(FM_ERR_NOMEM, "out of memory");

    struct stat sb;
    if (stat(path, &sb) != 0) {
        st = fm_error_set(FM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISDIR(sb.st_mode)) {
        char *p = st_strdup(path);
        if (!p) {
            st = fm_error_set(FM_ERR_NOMEM, "out of memory");
            goto fail;
        }
        st = st_add_file(set, p);
        if (st == FM_OK) st = st_finish(set);
        if (st != FM_OK) goto fail;
    } else {
        index_path = st_join(path, FM_ST_INDEX_NAME);
        if (!index_path) {
            st = fm_error_set(FM_ERR_NOMEM, "out of memory");
            goto fail;
        }
        struct stat ib;
        if (stat(index_path, &ib) == 0) {
            st = st_open_index(set, path, index_path);
            if (st != FM_OK) goto fail;
        } else {
            char *single = st_join(path, "model.safetensors");
            if (!single) {
                st = fm_error_set(FM_ERR_NOMEM, "out of memory");
                goto fail;
            }
            if (stat(single, &ib) == 0) {
                st = st_add_file(set, single);
            } else {
                free(single);
                st = st_list_dir(path, &names, &n_names);
                if (st != FM_OK) goto fail;
                if (n_names == 0) {
                    st = fm_error_set(FM_ERR_IO, "%s: no " FM_ST_INDEX_NAME " and no *.safetensors files",
                                      path);
                    goto fail;
                }
                for (size_t i = 0; i < n_names && st == FM_OK; i++) {
                    char *p = st_join(path, names[i]);
                    st = p ? st_add_file(set, p) : fm_error_set(FM_ERR_NOMEM, "out of memory");
                }
            }
            if (st == FM_OK) st = st_finish(set);
            if (st != FM_OK) goto fail;
        }
    }

    for (size_t i = 0; i < n_names; i++) free(names[i]);
    free(names);
    free(index_path);
    *out = set;
    return FM_OK;

fail:
    for (size_t i = 0; i < n_names; i++) free(names[i]);
    free(names);
    free(index_path);
    fm_st_close(set);
    return st;
}

void fm_st_close(fm_st_set *set) {
    if (!set) return;
    for (size_t i = 0; i < set->n_tensors; i++) free((char *)set->tensors[i].name);
    for (int i = 0; i < set->n_files; i++) {
        if (set->files[i].map) munmap(set->files[i].map, set->files[i].map_size);
        free(set->files[i].path);
    }
    free(set->tensors);
    free(set->files);
    free(set->hash);
    free(set);
}

size_t fm_st_count(const fm_st_set *set) { return set ? set->n_tensors : 0; }

const fm_st_tensor *fm_st_get(const fm_st_set *set, size_t i) {
    return (set && i < set->n_tensors) ? &set->tensors[i] : NULL;
}

const fm_st_tensor *fm_st_find(const fm_st_set *set, const char *name) {
    if (!set || !name || !set->hash) return NULL;
    size_t h = (size_t)st_hash_name(name) & set->hash_mask;
    for (uint32_t slot; (slot = set->hash[h]) != 0; h = (h + 1) & set->hash_mask) {
        const fm_st_tensor *t = &set->tensors[slot - 1];
        if (strcmp(t->name, name) == 0) return t;
    }
    return NULL;
}

const char *fm_st_file_path(const fm_st_set *set, int file_index) {
    return (set && file_index >= 0 && file_index < set->n_files) ? set->files[file_index].path : NULL;
}

int fm_st_file_count(const fm_st_set *set) { return set ? set->n_files : 0; }
