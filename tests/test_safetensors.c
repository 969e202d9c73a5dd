/* Tests for the safetensors reader (src/formats/safetensors.c). All test names start with "st_". */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "formats/safetensors.h"
#include "test.h"
#include "util/half.h"

/* ---- helpers ---------------------------------------------------------------------------------- */

/* Writes raw bytes to path; false on failure. */
static bool st_write_raw(const char *path, const void *bytes, size_t len) {
    FILE *fp = fopen(path, "wb");
    if (!fp) return false;
    bool ok = len == 0 || fwrite(bytes, 1, len, fp) == len;
    return fclose(fp) == 0 && ok;
}

/* Writes a safetensors file: u64 LE length (given explicitly), header bytes, data blob. */
static bool st_write_parts(const char *path, uint64_t n_header, const char *header, size_t header_len,
                           const void *blob, size_t blob_len) {
    FILE *fp = fopen(path, "wb");
    if (!fp) return false;
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)(n_header >> (8 * i));
    bool ok = fwrite(len8, 1, 8, fp) == 8;
    if (header_len) ok = ok && fwrite(header, 1, header_len, fp) == header_len;
    if (blob_len) ok = ok && fwrite(blob, 1, blob_len, fp) == blob_len;
    return fclose(fp) == 0 && ok;
}

/* Writes a well-framed safetensors file from a header JSON string (padded with spaces to a multiple
 * of 8 bytes, as the reference writer does) and a data blob. blob NULL = blob_len zero bytes. */
static bool st_write_file(const char *path, const char *header, const void *blob, size_t blob_len) {
    size_t n = strlen(header), padded = (n + 7) / 8 * 8;
    char *h = malloc(padded ? padded : 1);
    void *zeros = NULL;
    if (!h) return false;
    memcpy(h, header, n);
    memset(h + n, ' ', padded - n);
    if (!blob && blob_len) blob = zeros = calloc(1, blob_len);
    bool ok = st_write_parts(path, padded, h, padded, blob, blob_len);
    free(h);
    free(zeros);
    return ok;
}

static char *st_path(char *buf, size_t cap, const char *dir, const char *name) {
    snprintf(buf, cap, "%s/%s", dir, name);
    return buf;
}

static bool st_contains(const char *hay, const char *needle) { return !needle || strstr(hay, needle); }

/* Opens path, expects `want` and an error line containing s1 and s2 (either may be NULL). */
static bool st_expect_fail(const char *path, fm_status want, const char *s1, const char *s2) {
    fm_st_set *set = (fm_st_set *)(uintptr_t)1;
    fm_status st = fm_st_open(path, &set);
    const char *msg = fm_last_error();
    bool ok = st == want && set == NULL && st_contains(msg, s1) && st_contains(msg, s2) &&
              !strchr(msg, '\n') && msg[0];
    if (!ok)
        fprintf(stderr, "    %s: got status %d (want %d), set %p, message \"%s\" (want \"%s\", \"%s\")\n",
                path, (int)st, (int)want, (void *)set, msg, s1 ? s1 : "", s2 ? s2 : "");
    if (st == FM_OK) fm_st_close(set);
    return ok;
}

/* Writes dir/<file> from header + blob_len zero bytes and expects fm_st_open to fail with `want`,
 * the message naming the file and containing `s1` (the tensor or field at fault). */
static bool st_bad_header(const char *dir, const char *file, const char *header, size_t blob_len,
                          fm_status want, const char *s1) {
    char path[512];
    st_path(path, sizeof path, dir, file);
    if (!st_write_file(path, header, NULL, blob_len)) {
        fprintf(stderr, "    cannot write %s\n", path);
        return false;
    }
    return st_expect_fail(path, want, file, s1);
}

static float st_f32_at(const void *p, int64_t i) {
    float f;
    memcpy(&f, (const uint8_t *)p + 4 * i, 4);
    return f;
}
static uint16_t st_u16_at(const void *p, int64_t i) {
    uint16_t v;
    memcpy(&v, (const uint8_t *)p + 2 * i, 2);
    return v;
}

static bool st_ends_with(const char *s, const char *suffix) {
    size_t a = s ? strlen(s) : 0, b = strlen(suffix);
    return s && a >= b && strcmp(s + a - b, suffix) == 0;
}

/* ---- good files ------------------------------------------------------------------------------- */

/* A file with F32 [2,3] @0, BF16 [4] @24, F16 [2,2] @32, F32 [0,4] (empty) @40, I32 scalar @40. */
static const char *GOOD_HEADER =
    "{\"__metadata__\": {\"format\": \"pt\", \"note\": \"ignored\"},"
    " \"s\": {\"dtype\": \"I32\", \"shape\": [], \"data_offsets\": [40, 44]},"
    " \"c\": {\"dtype\": \"F16\", \"shape\": [2, 2], \"data_offsets\": [32, 40]},"
    " \"a.weight\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, 24]},"
    " \"empty\": {\"dtype\": \"F32\", \"shape\": [0, 4], \"data_offsets\": [40, 40]},"
    " \"b.bias\": {\"dtype\": \"BF16\", \"shape\": [4], \"data_offsets\": [24, 32]}}";

static size_t st_good_blob(uint8_t blob[44]) {
    for (int i = 0; i < 6; i++) {
        float f = (float)i * 1.5f - 2.0f;
        memcpy(blob + 4 * i, &f, 4);
    }
    const float bf[4] = {1.0f, 2.0f, -3.0f, 0.5f};
    for (int i = 0; i < 4; i++) {
        uint16_t h = fm_f32_to_bf16(bf[i]);
        memcpy(blob + 24 + 2 * i, &h, 2);
    }
    const uint16_t hf[4] = {0x3c00, 0xc000, 0x3800, 0x7bff}; /* 1, -2, 0.5, 65504 */
    memcpy(blob + 32, hf, 8);
    int32_t s = 7;
    memcpy(blob + 40, &s, 4);
    return 44;
}

FM_TEST(st_single_file_good) {
    char dir[512], path[600];
    fm_test_tmpdir("st_single_file_good", dir, sizeof dir);
    st_path(path, sizeof path, dir, "m.safetensors");
    uint8_t blob[44];
    REQUIRE(st_write_file(path, GOOD_HEADER, blob, st_good_blob(blob)));

    fm_st_set *set = NULL;
    CHECK_OK(fm_st_open(path, &set));
    REQUIRE(set);
    CHECK(fm_st_count(set) == 5); /* __metadata__ is not a tensor */
    CHECK(fm_st_file_count(set) == 1);
    CHECK(strcmp(fm_st_file_path(set, 0), path) == 0);
    CHECK(fm_st_file_path(set, 1) == NULL && fm_st_file_path(set, -1) == NULL);
    CHECK(fm_st_get(set, 5) == NULL);
    CHECK(fm_st_find(set, "__metadata__") == NULL);
    CHECK(fm_st_find(set, "missing") == NULL);
    CHECK(fm_st_find(set, "a.weigh") == NULL);

    /* Sorted by name. */
    const char *order[5] = {"a.weight", "b.bias", "c", "empty", "s"};
    for (size_t i = 0; i < 5; i++) {
        const fm_st_tensor *tt = fm_st_get(set, i);
        REQUIRE(tt);
        CHECK_MSG(strcmp(tt->name, order[i]) == 0, "get(%zu) = %s", i, tt->name);
        CHECK(fm_st_find(set, order[i]) == tt);
        CHECK(tt->file_index == 0);
    }

    /* The data points into the file's mapping: compare with the bytes on disk. */
    FILE *fp = fopen(path, "rb");
    REQUIRE(fp);
    static uint8_t file[1024];
    size_t file_len = fread(file, 1, sizeof file, fp);
    fclose(fp);
    uint64_t n_header = 0;
    for (int i = 7; i >= 0; i--) n_header = n_header << 8 | file[i];
    REQUIRE(8 + n_header + 44 == file_len);
    const fm_st_tensor *a = fm_st_find(set, "a.weight");
    REQUIRE(a);
    const uint8_t *data_start = a->data;
    CHECK(a->dtype == FM_DTYPE_F32 && a->n_dims == 2 && a->shape[0] == 2 && a->shape[1] == 3);
    CHECK(a->n_elements == 6 && a->n_bytes == 24);
    CHECK(memcmp(a->data, file + 8 + n_header, 24) == 0);
    for (int i = 0; i < 6; i++) CHECK(st_f32_at(a->data, i) == (float)i * 1.5f - 2.0f);

    const fm_st_tensor *b = fm_st_find(set, "b.bias");
    REQUIRE(b);
    CHECK(b->dtype == FM_DTYPE_BF16 && b->n_dims == 1 && b->shape[0] == 4 && b->n_elements == 4);
    CHECK(b->n_bytes == 8 && (const uint8_t *)b->data == data_start + 24);
    CHECK(fm_bf16_to_f32(st_u16_at(b->data, 0)) == 1.0f);
    CHECK(fm_bf16_to_f32(st_u16_at(b->data, 2)) == -3.0f);
    CHECK(fm_bf16_to_f32(st_u16_at(b->data, 3)) == 0.5f);

    const fm_st_tensor *c = fm_st_find(set, "c");
    REQUIRE(c);
    CHECK(c->dtype == FM_DTYPE_F16 && c->n_dims == 2 && c->n_elements == 4 && c->n_bytes == 8);
    CHECK((const uint8_t *)c->data == data_start + 32);
    CHECK(fm_f16_to_f32(st_u16_at(c->data, 0)) == 1.0f);
    CHECK(fm_f16_to_f32(st_u16_at(c->data, 1)) == -2.0f);
    CHECK(fm_f16_to_f32(st_u16_at(c->data, 2)) == 0.5f);
    CHECK(fm_f16_to_f32(st_u16_at(c->data, 3)) == 65504.0f);

    const fm_st_tensor *e = fm_st_find(set, "empty");
    REQUIRE(e);
    CHECK(e->n_dims == 2 && e->shape[0] == 0 && e->shape[1] == 4 && e->n_elements == 0);
    CHECK(e->n_bytes == 0);

    const fm_st_tensor *s = fm_st_find(set, "s");
    REQUIRE(s);
    CHECK(s->dtype == FM_DTYPE_I32 && s->n_dims == 0 && s->n_elements == 1 && s->n_bytes == 4);
    int32_t sv;
    memcpy(&sv, s->data, 4);
    CHECK(sv == 7);

    fm_st_close(set);
    fm_st_close(NULL);
    CHECK(fm_st_count(NULL) == 0 && fm_st_get(NULL, 0) == NULL && fm_st_find(NULL, "a") == NULL);
}

FM_TEST(st_single_file_edge_cases) {
    char dir[512], path[600];
    fm_test_tmpdir("st_single_file_edge_cases", dir, sizeof dir);
    fm_st_set *set = NULL;

    /* No tensors at all, only metadata; no data section. */
    st_path(path, sizeof path, dir, "meta_only.safetensors");
    REQUIRE(st_write_file(path, "{\"__metadata__\": {}}", NULL, 0));
    CHECK_OK(fm_st_open(path, &set));
    CHECK(fm_st_count(set) == 0 && fm_st_get(set, 0) == NULL && fm_st_find(set, "x") == NULL);
    fm_st_close(set);

    /* Only zero-size tensors, all at the end of an empty data section, plus one at offset 0 of a
     * non-empty section and one in the middle of another tensor (empty ranges overlap nothing). */
    st_path(path, sizeof path, dir, "zeros.safetensors");
    REQUIRE(st_write_file(path,
                          "{\"z0\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [0, 0]},"
                          " \"z1\": {\"dtype\": \"BF16\", \"shape\": [3, 0, 2], \"data_offsets\": [4, 4]},"
                          " \"z2\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": [8, 8]},"
                          " \"w\": {\"dtype\": \"I64\", \"shape\": [1], \"data_offsets\": [0, 8]}}",
                          NULL, 8));
    CHECK_OK(fm_st_open(path, &set));
    CHECK(fm_st_count(set) == 4);
    const fm_st_tensor *z1 = fm_st_find(set, "z1");
    REQUIRE(z1);
    CHECK(z1->n_dims == 3 && z1->n_elements == 0 && z1->n_bytes == 0);
    CHECK(fm_st_find(set, "w")->dtype == FM_DTYPE_I64);
    fm_st_close(set);

    /* 8 dims is the maximum; names with unicode escapes and odd characters; an unpadded header. */
    st_path(path, sizeof path, dir, "dims8.safetensors");
    const char *h = "{\"t\\u00e9/x y\": {\"dtype\": \"U8\", \"shape\": [1,1,1,1,1,1,1,2],"
                    " \"data_offsets\": [0, 2]}}";
    REQUIRE(st_write_parts(path, strlen(h), h, strlen(h), "\x01\x02", 2));
    CHECK_OK(fm_st_open(path, &set));
    const fm_st_tensor *t8 = fm_st_find(set, "t\xc3\xa9/x y");
    REQUIRE(t8);
    CHECK(t8->n_dims == 8 && t8->n_elements == 2 && ((const uint8_t *)t8->data)[1] == 2);
    fm_st_close(set);

    /* Every dtype of the table. */
    st_path(path, sizeof path, dir, "dtypes.safetensors");
    const char *names[] = {"F32", "F16", "BF16", "F8_E4M3", "I64", "I32", "U32", "I16", "U16",
                           "I8",  "U8",  "BOOL"};
    char hdr[2048];
    size_t n = 0, off = 0;
    n += (size_t)snprintf(hdr + n, sizeof hdr - n, "{");
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        fm_dtype dt = fm_dtype_from_name(names[i]);
        size_t sz = fm_dtype_size(dt);
        n += (size_t)snprintf(hdr + n, sizeof hdr - n,
                              "%s\"%s\": {\"dtype\": \"%s\", \"shape\": [3], \"data_offsets\": [%zu, %zu]}",
                              i ? ", " : "", names[i], names[i], off, off + 3 * sz);
        off += 3 * sz;
    }
    snprintf(hdr + n, sizeof hdr - n, "}");
    REQUIRE(st_write_file(path, hdr, NULL, off));
    CHECK_OK(fm_st_open(path, &set));
    CHECK(fm_st_count(set) == sizeof names / sizeof names[0]);
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const fm_st_tensor *tt = fm_st_find(set, names[i]);
        CHECK_MSG(tt && tt->dtype == fm_dtype_from_name(names[i]) && tt->n_elements == 3, "%s", names[i]);
    }
    fm_st_close(set);

    /* Holes in the data section and trailing bytes are tolerated. */
    st_path(path, sizeof path, dir, "holes.safetensors");
    REQUIRE(st_write_file(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}",
                          NULL, 16));
    CHECK_OK(fm_st_open(path, &set));
    CHECK(fm_st_count(set) == 1);
    fm_st_close(set);
}

FM_TEST(st_dir_model_safetensors) {
    char dir[512], path[600];
    fm_test_tmpdir("st_dir_model_safetensors", dir, sizeof dir);
    uint8_t blob[44];
    REQUIRE(st_write_file(st_path(path, sizeof path, dir, "model.safetensors"), GOOD_HEADER, blob,
                          st_good_blob(blob)));
    /* Another (broken) safetensors file next to it is not opened: model.safetensors wins. */
    REQUIRE(st_write_raw(st_path(path, sizeof path, dir, "other.safetensors"), "junk", 4));
    fm_st_set *set = NULL;
    CHECK_OK(fm_st_open(dir, &set));
    CHECK(fm_st_count(set) == 5);
    CHECK(fm_st_file_count(set) == 1);
    CHECK(st_ends_with(fm_st_file_path(set, 0), "/model.safetensors"));
    CHECK(fm_st_find(set, "c") && fm_st_find(set, "c")->file_index == 0);
    fm_st_close(set);

    /* A trailing slash on the directory works too. */
    char slash[600];
    snprintf(slash, sizeof slash, "%s/", dir);
    CHECK_OK(fm_st_open(slash, &set));
    CHECK(fm_st_count(set) == 5);
    fm_st_close(set);
}

FM_TEST(st_dir_without_index) {
    char dir[512], path[600];
    fm_test_tmpdir("st_dir_without_index", dir, sizeof dir);
    float vb[2] = {3.0f, 4.0f}, va[1] = {9.0f};
    REQUIRE(st_write_file(st_path(path, sizeof path, dir, "b.safetensors"),
                          "{\"tb\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
                          " \"shared.z\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [8, 8]}}",
                          vb, 8));
    REQUIRE(st_write_file(st_path(path, sizeof path, dir, "a.safetensors"),
                          "{\"ta\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", va, 4));
    /* Not safetensors / hidden files are skipped. */
    REQUIRE(st_write_raw(st_path(path, sizeof path, dir, "notes.txt"), "hello", 5));
    REQUIRE(st_write_raw(st_path(path, sizeof path, dir, ".hidden.safetensors"), "junk", 4));
    REQUIRE(st_write_raw(st_path(path, sizeof path, dir, "x.safetensors.bak"), "junk", 4));

    fm_st_set *set = NULL;
    CHECK_OK(fm_st_open(dir, &set));
    CHECK(fm_st_file_count(set) == 2);
    CHECK(st_ends_with(fm_st_file_path(set, 0), "/a.safetensors"));
    CHECK(st_ends_with(fm_st_file_path(set, 1), "/b.safetensors"));
    CHECK(fm_st_count(set) == 3);
    const fm_st_tensor *ta = fm_st_find(set, "ta"), *tb = fm_st_find(set, "tb");
    REQUIRE(ta && tb);
    CHECK(ta->file_index == 0 && tb->file_index == 1);
    CHECK(st_f32_at(ta->data, 0) == 9.0f);
    CHECK(st_f32_at(tb->data, 0) == 3.0f && st_f32_at(tb->data, 1) == 4.0f);
    CHECK(strcmp(fm_st_get(set, 0)->name, "shared.z") == 0);
    CHECK(strcmp(fm_st_get(set, 1)->name, "ta") == 0);
    fm_st_close(set);
}

/* Writes a 2-shard model into dir (index optional): shard 1 holds x.a, x.b; shard 2 holds y.a. */
static bool st_write_sharded(const char *dir, const char *index) {
    char path[600];
    float v1[3] = {1, 2, 3}, v2[2] = {5, 6};
    return st_write_file(st_path(path, sizeof path, dir, "model-00001-of-00002.safetensors"),
                         "{\"x.a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
                         " \"x.b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 12]}}",
                         v1, 12) &&
           st_write_file(st_path(path, sizeof path, dir, "model-00002-of-00002.safetensors"),
                         "{\"__metadata__\": {\"format\": \"pt\"},"
                         " \"y.a\": {\"dtype\": \"F32\", \"shape\": [1, 2], \"data_offsets\": [0, 8]}}",
                         v2, 8) &&
           (!index || st_write_raw(st_path(path, sizeof path, dir, FM_ST_INDEX_NAME), index, strlen(index)));
}

static const char *GOOD_INDEX =
    "{\"metadata\": {\"total_size\": 20},"
    " \"weight_map\": {\"y.a\": \"model-00002-of-00002.safetensors\","
    " \"x.a\": \"model-00001-of-00002.safetensors\", \"x.b\": \"model-00001-of-00002.safetensors\"}}";

FM_TEST(st_sharded_index) {
    char dir[512], path[600];
    fm_test_tmpdir("st_sharded_index", dir, sizeof dir);
    REQUIRE(st_write_sharded(dir, GOOD_INDEX));
    /* A stray safetensors file the index does not name is not opened. */
    REQUIRE(st_write_raw(st_path(path, sizeof path, dir, "consolidated.safetensors"), "junk", 4));

    fm_st_set *set = NULL;
    CHECK_OK(fm_st_open(dir, &set));
    CHECK(fm_st_file_count(set) == 2);
    CHECK(st_ends_with(fm_st_file_path(set, 0), "/model-00001-of-00002.safetensors"));
    CHECK(st_ends_with(fm_st_file_path(set, 1), "/model-00002-of-00002.safetensors"));
    CHECK(fm_st_count(set) == 3);
    const fm_st_tensor *xa = fm_st_find(set, "x.a"), *xb = fm_st_find(set, "x.b"),
                       *ya = fm_st_find(set, "y.a");
    REQUIRE(xa && xb && ya);
    CHECK(xa->file_index == 0 && xb->file_index == 0 && ya->file_index == 1);
    CHECK(st_f32_at(xa->data, 0) == 1 && st_f32_at(xa->data, 1) == 2 && st_f32_at(xb->data, 0) == 3);
    CHECK(ya->n_dims == 2 && ya->shape[0] == 1 && ya->shape[1] == 2);
    CHECK(st_f32_at(ya->data, 0) == 5 && st_f32_at(ya->data, 1) == 6);
    CHECK(fm_st_get(set, 0) == xa && fm_st_get(set, 1) == xb && fm_st_get(set, 2) == ya);
    fm_st_close(set);

    /* Without the index, the same directory opens both shards by listing. */
    char dir2[512];
    fm_test_tmpdir("st_sharded_index_noindex", dir2, sizeof dir2);
    REQUIRE(st_write_sharded(dir2, NULL));
    CHECK_OK(fm_st_open(dir2, &set));
    CHECK(fm_st_count(set) == 3 && fm_st_file_count(set) == 2);
    fm_st_close(set);
}

/* ---- bad files -------------------------------------------------------------------------------- */

FM_TEST(st_bad_missing_path) {
    char dir[512], path[600];
    fm_test_tmpdir("st_bad_missing_path", dir, sizeof dir);
    CHECK(st_expect_fail(st_path(path, sizeof path, dir, "nope.safetensors"), FM_ERR_IO,
                         "nope.safetensors", NULL));
    /* An empty directory holds nothing to open. */
    CHECK(st_expect_fail(dir, FM_ERR_IO, "st_bad_missing_path", "safetensors"));
    fm_st_set *set = NULL;
    CHECK(fm_st_open(NULL, &set) == FM_ERR_ARG && set == NULL);
    CHECK(fm_st_open(dir, NULL) == FM_ERR_ARG);
}

FM_TEST(st_bad_not_regular_file) {
    char dir[512], path[600];
    fm_test_tmpdir("st_bad_not_regular_file", dir, sizeof dir);
    /* A FIFO must be refused without blocking, both named directly and inside a directory. */
    REQUIRE(mkfifo(st_path(path, sizeof path, dir, "pipe.safetensors"), 0600) == 0);
    CHECK(st_expect_fail(path, FM_ERR_IO, "pipe.safetensors", "not a regular file"));
    REQUIRE(st_write_file(st_path(path, sizeof path, dir, "real.safetensors"),
                          "{\"r\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]}}", NULL, 1));
    fm_st_set *set = NULL;
    CHECK_OK(fm_st_open(dir, &set)); /* the listing skips what is not a regular file */
    CHECK(fm_st_count(set) == 1 && fm_st_file_count(set) == 1);
    fm_st_close(set);
    /* A shard named by an index that is a FIFO. */
    const char *index = "{\"weight_map\": {\"r\": \"pipe.safetensors\"}}";
    REQUIRE(st_write_raw(st_path(path, sizeof path, dir, FM_ST_INDEX_NAME), index, strlen(index)));
    CHECK(st_expect_fail(dir, FM_ERR_IO, "pipe.safetensors", "not a regular file"));
}

FM_TEST(st_bad_short_file) {
    char dir[512], path[600];
    fm_test_tmpdir("st_bad_short_file", dir, sizeof dir);
    REQUIRE(st_write_raw(st_path(path, sizeof path, dir, "empty.safetensors"), "", 0));
    CHECK(st_expect_fail(path, FM_ERR_FORMAT, "empty.safetensors", "shorter"));
    REQUIRE(st_write_raw(st_path(path, sizeof path, dir, "five.safetensors"), "\x05\0\0\0\0", 5));
    CHECK(st_expect_fail(path, FM_ERR_FORMAT, "five.safetensors", "5 bytes"));
}

FM_TEST(st_bad_header_length) {
    char dir[512], path[600];
    fm_test_tmpdir("st_bad_header_length", dir, sizeof dir);
    /* 0 */
    REQUIRE(st_write_parts(st_path(path, sizeof path, dir, "zero.safetensors"), 0, "", 0, "{}", 2));
    CHECK(st_expect_fail(path, FM_ERR_FORMAT, "zero.safetensors", "header length is 0"));
    /* larger than 100 MiB (but the file is small) */
    REQUIRE(st_write_parts(st_path(path, sizeof path, dir, "huge.safetensors"), (100u << 20) + 1, "{}",
                           2, NULL, 0));
    CHECK(st_expect_fail(path, FM_ERR_FORMAT, "huge.safetensors", "limit"));
    REQUIRE(st_write_parts(st_path(path, sizeof path, dir, "u64max.safetensors"), UINT64_MAX, "{}", 2,
                           NULL, 0));
    CHECK(st_expect_fail(path, FM_ERR_FORMAT, "u64max.safetensors", "limit"));
    /* past the end of the file */
    REQUIRE(st_write_parts(st_path(path, sizeof path, dir, "past.safetensors"), 3, "{}", 2, NULL, 0));
    CHECK(st_expect_fail(path, FM_ERR_FORMAT, "past.safetensors", "past the end"));
    REQUIRE(st_write_parts(st_path(path, sizeof path, dir, "past2.safetensors"), 1000, "{}", 2, NULL, 0));
    CHECK(st_expect_fail(path, FM_ERR_FORMAT, "past2.safetensors", "past the end"));
    /* exactly to the end of the file is fine */
    REQUIRE(st_write_parts(st_path(path, sizeof path, dir, "exact.safetensors"), 2, "{}", 2, NULL, 0));
    fm_st_set *set = NULL;
    CHECK_OK(fm_st_open(path, &set));
    CHECK(fm_st_count(set) == 0);
    fm_st_close(set);
}

FM_TEST(st_bad_header_json) {
    char dir[512];
    fm_test_tmpdir("st_bad_header_json", dir, sizeof dir);
    CHECK(st_bad_header(dir, "trunc.safetensors", "{\"a\": {\"dtype\": ", 0, FM_ERR_FORMAT, "not valid JSON"));
    CHECK(st_bad_header(dir, "garbage.safetensors", "hello", 0, FM_ERR_FORMAT, "line 1"));
    CHECK(st_bad_header(dir, "trailing.safetensors", "{} x", 0, FM_ERR_FORMAT, "not valid JSON"));
    CHECK(st_bad_header(dir, "nul.safetensors", "{\"a\\u0000b\": 1}", 0, FM_ERR_FORMAT, "JSON"));
    /* A NUL byte inside the header region. */
    char path[600];
    REQUIRE(st_write_parts(st_path(path, sizeof path, dir, "rawnul.safetensors"), 4, "{\0}}", 4, NULL, 0));
    CHECK(st_expect_fail(path, FM_ERR_FORMAT, "rawnul.safetensors", "JSON"));
    /* Duplicate keys are rejected (the same tensor twice in one file). */
    CHECK(st_bad_header(dir, "dupkey.safetensors",
                        "{\"w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]},"
                        " \"w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [1, 2]}}",
                        2, FM_ERR_FORMAT, "duplicate"));
}

FM_TEST(st_bad_header_not_object) {
    char dir[512];
    fm_test_tmpdir("st_bad_header_not_object", dir, sizeof dir);
    CHECK(st_bad_header(dir, "array.safetensors", "[1, 2]", 0, FM_ERR_FORMAT, "header is not a JSON object"));
    CHECK(st_bad_header(dir, "num.safetensors", "42", 0, FM_ERR_FORMAT, "header"));
    CHECK(st_bad_header(dir, "str.safetensors", "\"x\"", 0, FM_ERR_FORMAT, "header"));
}

FM_TEST(st_bad_entry_not_object) {
    char dir[512];
    fm_test_tmpdir("st_bad_entry_not_object", dir, sizeof dir);
    CHECK(st_bad_header(dir, "e1.safetensors", "{\"layer.0.w\": 5}", 0, FM_ERR_FORMAT, "'layer.0.w'"));
    CHECK(st_bad_header(dir, "e2.safetensors", "{\"layer.1.w\": [\"F32\", [1], [0, 4]]}", 4, FM_ERR_FORMAT,
                        "'layer.1.w'"));
    CHECK(st_bad_header(dir, "e3.safetensors", "{\"n\": null}", 0, FM_ERR_FORMAT, "not a JSON object"));
    /* Control characters in a name do not break the one-line message (st_expect_fail checks '\n'). */
    CHECK(st_bad_header(dir, "e4.safetensors", "{\"bad\\nname\\t\": 5}", 0, FM_ERR_FORMAT, "'bad?name?'"));
}

FM_TEST(st_bad_dtype) {
    char dir[512];
    fm_test_tmpdir("st_bad_dtype", dir, sizeof dir);
    CHECK(st_bad_header(dir, "missing.safetensors", "{\"w1\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
                        FM_ERR_FORMAT, "'w1': missing \"dtype\""));
    CHECK(st_bad_header(dir, "number.safetensors",
                        "{\"w2\": {\"dtype\": 4, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, FM_ERR_FORMAT,
                        "'w2': \"dtype\" is not a string"));
    CHECK(st_bad_header(dir, "f4.safetensors",
                        "{\"w3\": {\"dtype\": \"F4\", \"shape\": [1], \"data_offsets\": [0, 1]}}", 4,
                        FM_ERR_UNSUPPORTED, "'w3': unsupported dtype \"F4\""));
    CHECK(st_bad_header(dir, "xyz.safetensors",
                        "{\"w4\": {\"dtype\": \"XYZ\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
                        FM_ERR_UNSUPPORTED, "\"XYZ\""));
    CHECK(st_bad_header(dir, "lower.safetensors",
                        "{\"w5\": {\"dtype\": \"f32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
                        FM_ERR_UNSUPPORTED, "'w5'"));
}

FM_TEST(st_bad_shape) {
    char dir[512];
    fm_test_tmpdir("st_bad_shape", dir, sizeof dir);
    CHECK(st_bad_header(dir, "missing.safetensors", "{\"s1\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}",
                        4, FM_ERR_FORMAT, "'s1': missing \"shape\""));
    CHECK(st_bad_header(dir, "notarray.safetensors",
                        "{\"s2\": {\"dtype\": \"F32\", \"shape\": 1, \"data_offsets\": [0, 4]}}", 4,
                        FM_ERR_FORMAT, "'s2': \"shape\" is not an array"));
    CHECK(st_bad_header(dir, "negative.safetensors",
                        "{\"s3\": {\"dtype\": \"F32\", \"shape\": [2, -1], \"data_offsets\": [0, 4]}}", 4,
                        FM_ERR_FORMAT, "'s3': \"shape\"[1]"));
    CHECK(st_bad_header(dir, "real.safetensors",
                        "{\"s4\": {\"dtype\": \"F32\", \"shape\": [1.0], \"data_offsets\": [0, 4]}}", 4,
                        FM_ERR_FORMAT, "'s4': \"shape\"[0] is not an integer"));
    CHECK(st_bad_header(dir, "string.safetensors",
                        "{\"s5\": {\"dtype\": \"F32\", \"shape\": [\"1\"], \"data_offsets\": [0, 4]}}", 4,
                        FM_ERR_FORMAT, "'s5'"));
    CHECK(st_bad_header(dir, "ninedims.safetensors",
                        "{\"s6\": {\"dtype\": \"U8\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 1]}}",
                        1, FM_ERR_FORMAT, "'s6': \"shape\" has 9 dims"));
    CHECK(st_bad_header(dir, "bigint.safetensors",
                        "{\"s7\": {\"dtype\": \"U8\", \"shape\": [99999999999999999999], \"data_offsets\": [0, 1]}}",
                        1, FM_ERR_FORMAT, "JSON"));
}

FM_TEST(st_bad_data_offsets) {
    char dir[512];
    fm_test_tmpdir("st_bad_data_offsets", dir, sizeof dir);
    CHECK(st_bad_header(dir, "missing.safetensors", "{\"d1\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4,
                        FM_ERR_FORMAT, "'d1': missing \"data_offsets\""));
    CHECK(st_bad_header(dir, "notarray.safetensors",
                        "{\"d2\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": 0}}", 4, FM_ERR_FORMAT,
                        "'d2': \"data_offsets\" is not an array of two integers"));
    CHECK(st_bad_header(dir, "one.safetensors",
                        "{\"d3\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0]}}", 4, FM_ERR_FORMAT,
                        "'d3'"));
    CHECK(st_bad_header(dir, "three.safetensors",
                        "{\"d4\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4, 8]}}", 8,
                        FM_ERR_FORMAT, "'d4'"));
    CHECK(st_bad_header(dir, "real.safetensors",
                        "{\"d5\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4.0]}}", 4,
                        FM_ERR_FORMAT, "'d5'"));
    CHECK(st_bad_header(dir, "negative.safetensors",
                        "{\"d6\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-4, 0]}}", 4,
                        FM_ERR_FORMAT, "'d6': \"data_offsets\" [-4, 0] out of range"));
    CHECK(st_bad_header(dir, "reversed.safetensors",
                        "{\"d7\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}", 8,
                        FM_ERR_FORMAT, "'d7': \"data_offsets\" [8, 4]"));
    CHECK(st_bad_header(dir, "pastend.safetensors",
                        "{\"d8\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", 7,
                        FM_ERR_FORMAT, "'d8': \"data_offsets\" [0, 8] out of range (data section is 7 bytes)"));
    CHECK(st_bad_header(dir, "huge.safetensors",
                        "{\"d9\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": "
                        "[9223372036854775807, 9223372036854775807]}}",
                        4, FM_ERR_FORMAT, "'d9'"));
    CHECK(st_bad_header(dir, "strings.safetensors",
                        "{\"d10\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [\"0\", \"1\"]}}", 4,
                        FM_ERR_FORMAT, "'d10'"));
}

FM_TEST(st_bad_size_mismatch) {
    char dir[512];
    fm_test_tmpdir("st_bad_size_mismatch", dir, sizeof dir);
    CHECK(st_bad_header(dir, "short.safetensors",
                        "{\"m1\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, 20]}}", 24,
                        FM_ERR_FORMAT, "'m1': \"data_offsets\" span 20 bytes, but 6 elements of F32 need 24"));
    CHECK(st_bad_header(dir, "long.safetensors",
                        "{\"m2\": {\"dtype\": \"BF16\", \"shape\": [2], \"data_offsets\": [0, 8]}}", 8,
                        FM_ERR_FORMAT, "'m2'"));
    CHECK(st_bad_header(dir, "zero.safetensors",
                        "{\"m3\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [0, 4]}}", 4,
                        FM_ERR_FORMAT, "'m3'"));
    /* Element count overflows int64: 2^40 * 2^40. */
    CHECK(st_bad_header(dir, "elem_overflow.safetensors",
                        "{\"m4\": {\"dtype\": \"U8\", \"shape\": [1099511627776, 1099511627776],"
                        " \"data_offsets\": [0, 0]}}",
                        0, FM_ERR_FORMAT, "'m4': element count overflows"));
    /* Elements fit, bytes do not: 2^31 * 2^31 * 8. */
    CHECK(st_bad_header(dir, "byte_overflow.safetensors",
                        "{\"m5\": {\"dtype\": \"I64\", \"shape\": [2147483648, 2147483648],"
                        " \"data_offsets\": [0, 0]}}",
                        0, FM_ERR_FORMAT, "'m5': byte size overflows"));
    /* A zero dim makes the product 0 even with a huge other dim. */
    char path[600];
    REQUIRE(st_write_file(st_path(path, sizeof path, dir, "zero_huge.safetensors"),
                          "{\"m6\": {\"dtype\": \"I64\", \"shape\": [0, 9223372036854775807],"
                          " \"data_offsets\": [0, 0]}}",
                          NULL, 0));
    fm_st_set *set = NULL;
    CHECK_OK(fm_st_open(path, &set));
    fm_st_close(set);
}

FM_TEST(st_bad_overlap) {
    char dir[512];
    fm_test_tmpdir("st_bad_overlap", dir, sizeof dir);
    CHECK(st_bad_header(dir, "partial.safetensors",
                        "{\"o1\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]},"
                        " \"o2\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [12, 28]}}",
                        28, FM_ERR_FORMAT, "'o1' [0, 16) and 'o2' [12, 28) overlap"));
    CHECK(st_bad_header(dir, "same.safetensors",
                        "{\"p1\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]},"
                        " \"p2\": {\"dtype\": \"I32\", \"shape\": [1], \"data_offsets\": [4, 8]}}",
                        8, FM_ERR_FORMAT, "overlap"));
    /* Containment, with a third tensor in between in sorted order: q1 [0,32) holds q3 [24,28). */
    CHECK(st_bad_header(dir, "contained.safetensors",
                        "{\"q3\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [24, 28]},"
                        " \"q2\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]},"
                        " \"q1\": {\"dtype\": \"F32\", \"shape\": [8], \"data_offsets\": [0, 32]}}",
                        32, FM_ERR_FORMAT, "'q1' [0, 32)"));
    /* Overlap is per file: the same ranges in two shards are fine (see st_dir_without_index). */
}

FM_TEST(st_bad_duplicate_across_shards) {
    char dir[512], path[600];
    fm_test_tmpdir("st_bad_duplicate_across_shards", dir, sizeof dir);
    REQUIRE(st_write_file(st_path(path, sizeof path, dir, "s1.safetensors"),
                          "{\"dup.w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]}}", NULL, 1));
    REQUIRE(st_write_file(st_path(path, sizeof path, dir, "s2.safetensors"),
                          "{\"other\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]},"
                          " \"dup.w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [1, 2]}}",
                          NULL, 2));
    CHECK(st_expect_fail(dir, FM_ERR_FORMAT, "'dup.w' appears in both", "s1.safetensors"));
    CHECK(strstr(fm_last_error(), "s2.safetensors"));

    /* The same through an index that maps it to one shard. */
    const char *index = "{\"weight_map\": {\"dup.w\": \"s1.safetensors\", \"other\": \"s2.safetensors\"}}";
    REQUIRE(st_write_raw(st_path(path, sizeof path, dir, FM_ST_INDEX_NAME), index, strlen(index)));
    CHECK(st_expect_fail(dir, FM_ERR_FORMAT, "'dup.w'", "s2.safetensors"));
}

/* Writes the two shards plus `index` into a fresh dir and expects fm_st_open(dir) to fail. */
static bool st_bad_index(const char *name, const char *index, fm_status want, const char *s1,
                         const char *s2) {
    char dir[512];
    fm_test_tmpdir(name, dir, sizeof dir);
    if (!st_write_sharded(dir, index)) return false;
    return st_expect_fail(dir, want, s1, s2);
}

FM_TEST(st_bad_index_json) {
    CHECK(st_bad_index("st_bad_index_json1", "{\"weight_map\": {", FM_ERR_FORMAT, FM_ST_INDEX_NAME,
                       "not valid JSON"));
    CHECK(st_bad_index("st_bad_index_json2", "", FM_ERR_FORMAT, FM_ST_INDEX_NAME, "JSON"));
    CHECK(st_bad_index("st_bad_index_json3", "[]", FM_ERR_FORMAT, FM_ST_INDEX_NAME, "not a JSON object"));
    CHECK(st_bad_index("st_bad_index_json4", "{\"metadata\": {}}", FM_ERR_FORMAT, FM_ST_INDEX_NAME,
                       "missing \"weight_map\""));
    CHECK(st_bad_index("st_bad_index_json5", "{\"weight_map\": [\"model-00001-of-00002.safetensors\"]}",
                       FM_ERR_FORMAT, FM_ST_INDEX_NAME, "\"weight_map\" is not an object"));
    CHECK(st_bad_index("st_bad_index_json6", "{\"weight_map\": {\"x.a\": 1}}", FM_ERR_FORMAT,
                       FM_ST_INDEX_NAME, "'x.a' is not a string"));
    CHECK(st_bad_index("st_bad_index_json7", "{\"weight_map\": {}}", FM_ERR_FORMAT, FM_ST_INDEX_NAME,
                       "empty"));
}

FM_TEST(st_bad_index_missing_shard) {
    CHECK(st_bad_index("st_bad_index_missing_shard",
                       "{\"weight_map\": {\"x.a\": \"model-00001-of-00002.safetensors\","
                       " \"z\": \"model-00003-of-00002.safetensors\"}}",
                       FM_ERR_IO, FM_ST_INDEX_NAME, "model-00003-of-00002.safetensors"));
}

FM_TEST(st_bad_index_tensor_not_in_shard) {
    CHECK(st_bad_index("st_bad_index_tensor_absent",
                       "{\"weight_map\": {\"x.a\": \"model-00001-of-00002.safetensors\","
                       " \"x.c\": \"model-00001-of-00002.safetensors\"}}",
                       FM_ERR_FORMAT, "'x.c'", "model-00001-of-00002.safetensors"));
    /* Named in the index under the wrong shard. */
    CHECK(st_bad_index("st_bad_index_tensor_elsewhere",
                       "{\"weight_map\": {\"x.a\": \"model-00001-of-00002.safetensors\","
                       " \"y.a\": \"model-00001-of-00002.safetensors\","
                       " \"x.b\": \"model-00002-of-00002.safetensors\"}}",
                       FM_ERR_FORMAT, "'", "found in"));
}

FM_TEST(st_bad_index_path_traversal) {
    CHECK(st_bad_index("st_bad_index_traversal1",
                       "{\"weight_map\": {\"x.a\": \"../st_bad_index_traversal1/model-00001-of-00002.safetensors\"}}",
                       FM_ERR_FORMAT, FM_ST_INDEX_NAME, "'x.a': shard file name"));
    CHECK(st_bad_index("st_bad_index_traversal2", "{\"weight_map\": {\"x.a\": \"/etc/passwd\"}}",
                       FM_ERR_FORMAT, "'x.a'", "/etc/passwd"));
    CHECK(st_bad_index("st_bad_index_traversal3", "{\"weight_map\": {\"x.a\": \"sub/x.safetensors\"}}",
                       FM_ERR_FORMAT, "'x.a'", "sub/x.safetensors"));
    CHECK(st_bad_index("st_bad_index_traversal4", "{\"weight_map\": {\"x.a\": \"..\"}}", FM_ERR_FORMAT,
                       "'x.a'", NULL));
    CHECK(st_bad_index("st_bad_index_traversal5", "{\"weight_map\": {\"x.a\": \"\"}}", FM_ERR_FORMAT,
                       "'x.a'", NULL));
}

FM_TEST(st_bad_shard_header_names_shard) {
    /* A bad header inside a shard reports the shard's path and the tensor. */
    char dir[512], path[600];
    fm_test_tmpdir("st_bad_shard_header_names_shard", dir, sizeof dir);
    REQUIRE(st_write_sharded(dir, GOOD_INDEX));
    REQUIRE(st_write_file(st_path(path, sizeof path, dir, "model-00002-of-00002.safetensors"),
                          "{\"y.a\": {\"dtype\": \"F32\", \"shape\": [1, 3], \"data_offsets\": [0, 8]}}", NULL, 8));
    CHECK(st_expect_fail(dir, FM_ERR_FORMAT, "model-00002-of-00002.safetensors", "'y.a'"));
}

/* ---- robustness ------------------------------------------------------------------------------- */

/* Every truncation of a good file, and every single-byte corruption of its header, fails cleanly or
 * opens to something consistent (the sanitizers catch any out-of-bounds access). */
FM_TEST(st_fuzz_truncate_and_flip) {
    char dir[512], path[600];
    fm_test_tmpdir("st_fuzz_truncate_and_flip", dir, sizeof dir);
    st_path(path, sizeof path, dir, "f.safetensors");
    uint8_t blob[44];
    REQUIRE(st_write_file(path, GOOD_HEADER, blob, st_good_blob(blob)));
    FILE *fp = fopen(path, "rb");
    REQUIRE(fp);
    static uint8_t file[1024];
    size_t len = fread(file, 1, sizeof file, fp);
    fclose(fp);
    REQUIRE(len > 44 && len < sizeof file);

    int opened = 0, failed = 0;
    for (size_t cut = 0; cut < len; cut++) {
        REQUIRE(st_write_raw(path, file, cut));
        fm_st_set *set = NULL;
        fm_status st = fm_st_open(path, &set);
        CHECK_MSG(st != FM_OK, "truncated to %zu of %zu bytes opened", cut, len);
        if (st == FM_OK) fm_st_close(set);
        else CHECK(fm_last_error()[0] != 0);
    }
    static const uint8_t flips[] = {0x00, 0xff, '"', '[', ']', '{', '}', ',', ':', '-', '9', ' ', 0x80};
    static uint8_t mutated[1024];
    for (size_t pos = 0; pos < len - 44; pos++) {
        for (size_t k = 0; k < sizeof flips; k++) {
            memcpy(mutated, file, len);
            mutated[pos] = flips[k];
            REQUIRE(st_write_raw(path, mutated, len));
            fm_st_set *set = NULL;
            fm_status st = fm_st_open(path, &set);
            if (st == FM_OK) {
                opened++;
                /* Whatever opened must be self-consistent and inside the data section. */
                for (size_t i = 0; i < fm_st_count(set); i++) {
                    const fm_st_tensor *tt = fm_st_get(set, i);
                    CHECK(fm_st_find(set, tt->name) == tt);
                    CHECK(tt->n_bytes == (uint64_t)tt->n_elements * fm_dtype_size(tt->dtype));
                    volatile uint8_t sink = 0;
                    for (uint64_t b = 0; b < tt->n_bytes; b++) sink ^= ((const uint8_t *)tt->data)[b];
                    (void)sink;
                }
                fm_st_close(set);
            } else {
                failed++;
                CHECK(st == FM_ERR_FORMAT || st == FM_ERR_UNSUPPORTED);
            }
        }
    }
    CHECK(opened > 0 && failed > 0);
}

/* 100,000 tensors in one header: open and look every name up (checks nothing is quadratic). */
FM_TEST(st_scale_100k_tensors) {
    enum { N = 100000 };
    char dir[512], path[600];
    fm_test_tmpdir("st_scale_100k_tensors", dir, sizeof dir);
    st_path(path, sizeof path, dir, "big.safetensors");
    size_t cap = (size_t)N * 160 + 64, n = 0;
    char *hdr = malloc(cap);
    int32_t *blob = malloc(sizeof(int32_t) * N);
    REQUIRE(hdr && blob);
    n += (size_t)snprintf(hdr + n, cap - n, "{");
    for (int i = N - 1; i >= 0; i--) { /* reverse order, so sorting has work to do */
        n += (size_t)snprintf(hdr + n, cap - n,
                              "%s\"model.layers.%d.mlp.experts.%d.w\": {\"dtype\": \"I32\", \"shape\": [1],"
                              " \"data_offsets\": [%d, %d]}",
                              i == N - 1 ? "" : ",", i / 512, i % 512, 4 * i, 4 * i + 4);
        blob[i] = i;
    }
    snprintf(hdr + n, cap - n, "}");
    bool written = st_write_file(path, hdr, blob, sizeof(int32_t) * N);
    free(hdr);
    free(blob);
    REQUIRE(written);

    struct timespec t0, t1, t2;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    fm_st_set *set = NULL;
    CHECK_OK(fm_st_open(path, &set));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    CHECK(fm_st_count(set) == N);
    char name[96];
    int found = 0;
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof name, "model.layers.%d.mlp.experts.%d.w", i / 512, i % 512);
        const fm_st_tensor *tt = fm_st_find(set, name);
        if (tt && strcmp(tt->name, name) == 0) {
            int32_t v;
            memcpy(&v, tt->data, 4);
            found += v == i;
        }
    }
    CHECK(found == N);
    for (size_t i = 1; i < fm_st_count(set); i++)
        CHECK(strcmp(fm_st_get(set, i - 1)->name, fm_st_get(set, i)->name) < 0);
    CHECK(fm_st_find(set, "model.layers.0.mlp.experts.512.w") == NULL);
    clock_gettime(CLOCK_MONOTONIC, &t2);
    fprintf(stderr, "    100k tensors: open %.0f ms, %d finds %.0f ms\n",
            (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6, N,
            (double)(t2.tv_sec - t1.tv_sec) * 1e3 + (double)(t2.tv_nsec - t1.tv_nsec) / 1e6);
    fm_st_close(set);
}
