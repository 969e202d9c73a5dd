/* Tests for the .npy reader / writer (src/formats/npy.c). All test names start with "npy_". */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "formats/npy.h"
#include "test.h"

static char *npy_path(char *buf, size_t cap, const char *dir, const char *name) {
    snprintf(buf, cap, "%s/%s", dir, name);
    return buf;
}

/* Reads a whole (small) file; returns its length or 0 on failure. */
static size_t npy_slurp(const char *path, uint8_t *buf, size_t cap) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return 0;
    size_t n = fread(buf, 1, cap, fp);
    fclose(fp);
    return n;
}

/* Offset of the data in a v1.0 file (checks the 64-byte alignment numpy uses); 0 if malformed. */
static size_t npy_data_offset(const uint8_t *file, size_t len) {
    if (len < 10 || memcmp(file, "\x93NUMPY\x01\x00", 8) != 0) return 0;
    size_t off = 10 + ((size_t)file[8] | (size_t)file[9] << 8);
    return off % 64 == 0 && off <= len && file[off - 1] == '\n' ? off : 0;
}

static bool npy_write_raw(const char *path, const void *bytes, size_t len) {
    FILE *fp = fopen(path, "wb");
    if (!fp) return false;
    bool ok = len == 0 || fwrite(bytes, 1, len, fp) == len;
    return fclose(fp) == 0 && ok;
}

/* Writes a .npy file by hand: version major.0, the dict text (padded with spaces + '\n' to a
 * multiple of 64, as numpy does), then data_len bytes of data. */
static bool npy_write_custom(const char *path, int major, const char *dict, const void *data,
                             size_t data_len) {
    uint8_t buf[4096];
    size_t pre = major == 1 ? 10 : 12, n = strlen(dict);
    size_t total = (pre + n + 1 + 63) / 64 * 64, hlen = total - pre;
    if (total + data_len > sizeof buf) return false;
    memcpy(buf, "\x93NUMPY", 6);
    buf[6] = (uint8_t)major;
    buf[7] = 0;
    for (size_t i = 0; i < pre - 8; i++) buf[8 + i] = (uint8_t)(hlen >> (8 * i));
    memcpy(buf + pre, dict, n);
    memset(buf + pre + n, ' ', hlen - n - 1);
    buf[total - 1] = '\n';
    if (data_len) memcpy(buf + total, data, data_len);
    return npy_write_raw(path, buf, total + data_len);
}

/* Reads path, expects `want`, a zeroed output and a one-line message with the file name and s1. */
static bool npy_expect_fail(const char *path, fm_status want, const char *s1) {
    fm_npy a;
    memset(&a, 0x5a, sizeof a);
    fm_status st = fm_npy_read(path, &a);
    const char *msg = fm_last_error();
    const char *base = strrchr(path, '/');
    bool ok = st == want && a.data == NULL && a.n_dims == 0 && strstr(msg, base ? base + 1 : path) &&
              (!s1 || strstr(msg, s1)) && !strchr(msg, '\n');
    if (!ok)
        fprintf(stderr, "    %s: got status %d (want %d), message \"%s\" (want \"%s\")\n", path, (int)st,
                (int)want, msg, s1 ? s1 : "");
    if (st == FM_OK) fm_npy_free(&a);
    return ok;
}

FM_TEST(npy_roundtrip_f32_2d) {
    char dir[512], path[600];
    fm_test_tmpdir("npy_roundtrip_f32_2d", dir, sizeof dir);
    npy_path(path, sizeof path, dir, "a.npy");
    enum { R = 96, C = 160 };
    float *v = malloc(sizeof(float) * R * C);
    REQUIRE(v);
    for (int i = 0; i < R * C; i++) v[i] = (float)i * 0.25f - 100.0f;
    const int64_t shape[2] = {R, C};
    fm_status wst = fm_npy_write_f32(path, v, 2, shape);
    if (wst != FM_OK) free(v);
    CHECK_OK(wst);

    /* The header is exactly what numpy writes. */
    static uint8_t file[R * C * 4 + 256];
    size_t len = npy_slurp(path, file, sizeof file);
    const char *expect = "{'descr': '<f4', 'fortran_order': False, 'shape': (96, 160), }";
    size_t hlen = (size_t)file[8] | (size_t)file[9] << 8;
    CHECK(memcmp(file, "\x93NUMPY\x01\x00", 8) == 0);
    CHECK((10 + hlen) % 64 == 0);
    CHECK(memcmp(file + 10, expect, strlen(expect)) == 0);
    CHECK(file[10 + hlen - 1] == '\n');
    for (size_t i = 10 + strlen(expect); i < 10 + hlen - 1; i++) CHECK(file[i] == ' ');
    CHECK(len == 10 + hlen + sizeof(float) * R * C);

    fm_npy a;
    fm_status rst = fm_npy_read(path, &a);
    if (rst != FM_OK) free(v);
    CHECK_OK(rst);
    CHECK(strcmp(a.descr, "<f4") == 0);
    CHECK(a.n_dims == 2 && a.shape[0] == R && a.shape[1] == C && a.n_elements == R * C);
    CHECK(a.data && memcmp(a.data, v, sizeof(float) * R * C) == 0);
    fm_npy_free(&a);
    CHECK(a.data == NULL && a.n_dims == 0);
    fm_npy_free(&a); /* twice is harmless */
    fm_npy_free(NULL);
    free(v);
}

FM_TEST(npy_roundtrip_i32_1d) {
    char dir[512], path[600];
    fm_test_tmpdir("npy_roundtrip_i32_1d", dir, sizeof dir);
    npy_path(path, sizeof path, dir, "ids.npy");
    const int32_t v[7] = {0, -1, 2147483647, -2147483647 - 1, 42, 7, 151643};
    const int64_t shape[1] = {7};
    CHECK_OK(fm_npy_write_i32(path, v, 1, shape));
    uint8_t file[512];
    size_t len = npy_slurp(path, file, sizeof file);
    size_t hdr_end = npy_data_offset(file, len);
    REQUIRE(hdr_end > 0 && len == hdr_end + 28);
    CHECK(memmem(file, hdr_end, "'descr': '<i4'", 14) != NULL);
    CHECK(memmem(file, hdr_end, "'shape': (7,), }", 16) != NULL);

    fm_npy a;
    CHECK_OK(fm_npy_read(path, &a));
    CHECK(strcmp(a.descr, "<i4") == 0 && a.n_dims == 1 && a.shape[0] == 7 && a.n_elements == 7);
    CHECK(memcmp(a.data, v, sizeof v) == 0);
    fm_npy_free(&a);
}

FM_TEST(npy_roundtrip_scalar_and_empty) {
    char dir[512], path[600];
    fm_test_tmpdir("npy_roundtrip_scalar_and_empty", dir, sizeof dir);
    fm_npy a;

    /* 0-D: "()" */
    npy_path(path, sizeof path, dir, "scalar.npy");
    const float x = 3.5f;
    CHECK_OK(fm_npy_write_f32(path, &x, 0, NULL));
    uint8_t file[512];
    size_t len = npy_slurp(path, file, sizeof file);
    size_t hdr_end = npy_data_offset(file, len);
    REQUIRE(hdr_end > 0 && len == hdr_end + 4);
    CHECK(memmem(file, hdr_end, "'shape': (), }", 14) != NULL);
    CHECK_OK(fm_npy_read(path, &a));
    CHECK(a.n_dims == 0 && a.n_elements == 1 && ((const float *)a.data)[0] == 3.5f);
    fm_npy_free(&a);

    /* Zero elements, data NULL. */
    npy_path(path, sizeof path, dir, "empty.npy");
    const int64_t shape[3] = {2, 0, 5};
    CHECK_OK(fm_npy_write_i32(path, NULL, 3, shape));
    CHECK_OK(fm_npy_read(path, &a));
    CHECK(a.n_dims == 3 && a.shape[1] == 0 && a.n_elements == 0 && a.data != NULL);
    fm_npy_free(&a);

    /* 8 dims, the maximum. */
    npy_path(path, sizeof path, dir, "dims8.npy");
    const int64_t s8[8] = {1, 2, 1, 2, 1, 2, 1, 2};
    float v8[16];
    for (int i = 0; i < 16; i++) v8[i] = (float)i;
    CHECK_OK(fm_npy_write_f32(path, v8, 8, s8));
    CHECK_OK(fm_npy_read(path, &a));
    CHECK(a.n_dims == 8 && a.n_elements == 16 && memcmp(a.data, v8, sizeof v8) == 0);
    fm_npy_free(&a);
}

FM_TEST(npy_read_i8_and_v2) {
    char dir[512], path[600];
    fm_test_tmpdir("npy_read_i8_and_v2", dir, sizeof dir);
    fm_npy a;
    const int64_t v[3] = {-5, 1LL << 40, 9};

    npy_path(path, sizeof path, dir, "i8.npy");
    REQUIRE(npy_write_custom(path, 1, "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", v, sizeof v));
    CHECK_OK(fm_npy_read(path, &a));
    CHECK(strcmp(a.descr, "<i8") == 0 && a.n_elements == 3 && memcmp(a.data, v, sizeof v) == 0);
    fm_npy_free(&a);

    /* v2.0 (u32 header length), keys in another order, double quotes, no trailing comma. */
    npy_path(path, sizeof path, dir, "v2.npy");
    REQUIRE(npy_write_custom(path, 2, "{\"shape\": (1, 3), \"fortran_order\": False, \"descr\": \"<i8\"}", v,
                             sizeof v));
    CHECK_OK(fm_npy_read(path, &a));
    CHECK(a.n_dims == 2 && a.shape[0] == 1 && a.shape[1] == 3 && memcmp(a.data, v, sizeof v) == 0);
    fm_npy_free(&a);

    /* Python 2 style long dims. */
    npy_path(path, sizeof path, dir, "long.npy");
    REQUIRE(npy_write_custom(path, 1, "{'descr': '<i8', 'fortran_order': False, 'shape': (3L,), }", v, sizeof v));
    CHECK_OK(fm_npy_read(path, &a));
    CHECK(a.n_dims == 1 && a.shape[0] == 3);
    fm_npy_free(&a);
}

FM_TEST(npy_bad_magic_and_version) {
    char dir[512], path[600];
    fm_test_tmpdir("npy_bad_magic_and_version", dir, sizeof dir);
    uint8_t file[128] = "\x93NUMPX\x01\x00\x76\x00";
    REQUIRE(npy_write_raw(npy_path(path, sizeof path, dir, "magic.npy"), file, sizeof file));
    CHECK(npy_expect_fail(path, FM_ERR_FORMAT, "bad magic"));
    REQUIRE(npy_write_raw(npy_path(path, sizeof path, dir, "tiny.npy"), "\x93NUM", 4));
    CHECK(npy_expect_fail(path, FM_ERR_FORMAT, "too short"));
    REQUIRE(npy_write_raw(npy_path(path, sizeof path, dir, "zero.npy"), "", 0));
    CHECK(npy_expect_fail(path, FM_ERR_FORMAT, "too short"));
    REQUIRE(npy_write_custom(npy_path(path, sizeof path, dir, "v3.npy"), 3,
                             "{'descr': '<f4', 'fortran_order': False, 'shape': (), }", "\0\0\0\0", 4));
    CHECK(npy_expect_fail(path, FM_ERR_UNSUPPORTED, "version 3.0"));
    CHECK(npy_expect_fail(npy_path(path, sizeof path, dir, "absent.npy"), FM_ERR_IO, "cannot open"));
    fm_npy a;
    CHECK(fm_npy_read(dir, &a) == FM_ERR_IO && a.data == NULL); /* a directory */
    REQUIRE(mkfifo(npy_path(path, sizeof path, dir, "pipe.npy"), 0600) == 0);
    CHECK(npy_expect_fail(path, FM_ERR_IO, "not a readable regular file")); /* and does not block */
}

FM_TEST(npy_bad_truncated) {
    char dir[512], path[600];
    fm_test_tmpdir("npy_bad_truncated", dir, sizeof dir);
    const float v[6] = {1, 2, 3, 4, 5, 6};
    const int64_t shape[2] = {2, 3};
    REQUIRE(fm_npy_write_f32(npy_path(path, sizeof path, dir, "good.npy"), v, 2, shape) == FM_OK);
    uint8_t file[256];
    size_t len = npy_slurp(path, file, sizeof file);
    size_t hdr_end = npy_data_offset(file, len);
    REQUIRE(hdr_end > 0 && len == hdr_end + 24);

    REQUIRE(npy_write_raw(npy_path(path, sizeof path, dir, "data.npy"), file, len - 1));
    CHECK(npy_expect_fail(path, FM_ERR_FORMAT, "data truncated: 6 elements need 24 bytes, the file has 23"));
    REQUIRE(npy_write_raw(npy_path(path, sizeof path, dir, "nodata.npy"), file, hdr_end));
    CHECK(npy_expect_fail(path, FM_ERR_FORMAT, "truncated"));
    REQUIRE(npy_write_raw(npy_path(path, sizeof path, dir, "header.npy"), file, 40));
    CHECK(npy_expect_fail(path, FM_ERR_FORMAT, "past the end"));
    /* Extra bytes after the data are rejected too. */
    uint8_t longer[256];
    memcpy(longer, file, len);
    memset(longer + len, 0, 8);
    REQUIRE(npy_write_raw(npy_path(path, sizeof path, dir, "extra.npy"), longer, len + 8));
    CHECK(npy_expect_fail(path, FM_ERR_FORMAT, "8 unexpected bytes"));

    /* Every truncation fails cleanly. */
    for (size_t cut = 0; cut < len; cut++) {
        REQUIRE(npy_write_raw(npy_path(path, sizeof path, dir, "cut.npy"), file, cut));
        fm_npy a;
        fm_status st = fm_npy_read(path, &a);
        CHECK_MSG(st == FM_ERR_FORMAT && a.data == NULL, "cut at %zu -> %d", cut, (int)st);
    }
}

FM_TEST(npy_bad_descr) {
    char dir[512], path[600];
    fm_test_tmpdir("npy_bad_descr", dir, sizeof dir);
    const char zeros[64] = {0};
    REQUIRE(npy_write_custom(npy_path(path, sizeof path, dir, "f8be.npy"), 1,
                             "{'descr': '>f8', 'fortran_order': False, 'shape': (2,), }", zeros, 16));
    CHECK(npy_expect_fail(path, FM_ERR_UNSUPPORTED, "unsupported dtype '>f8'"));
    REQUIRE(npy_write_custom(npy_path(path, sizeof path, dir, "b1.npy"), 1,
                             "{'descr': '|b1', 'fortran_order': False, 'shape': (2,), }", zeros, 2));
    CHECK(npy_expect_fail(path, FM_ERR_UNSUPPORTED, "'|b1'"));
    REQUIRE(npy_write_custom(npy_path(path, sizeof path, dir, "f4be.npy"), 1,
                             "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", zeros, 8));
    CHECK(npy_expect_fail(path, FM_ERR_UNSUPPORTED, "'>f4'"));
    REQUIRE(npy_write_custom(npy_path(path, sizeof path, dir, "struct.npy"), 1,
                             "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", zeros, 8));
    CHECK(npy_expect_fail(path, FM_ERR_UNSUPPORTED, "structured"));
}

FM_TEST(npy_bad_fortran_order) {
    char dir[512], path[600];
    fm_test_tmpdir("npy_bad_fortran_order", dir, sizeof dir);
    const char zeros[64] = {0};
    REQUIRE(npy_write_custom(npy_path(path, sizeof path, dir, "fortran.npy"), 1,
                             "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", zeros, 24));
    CHECK(npy_expect_fail(path, FM_ERR_UNSUPPORTED, "fortran_order"));
}

FM_TEST(npy_bad_header) {
    char dir[512], path[600];
    fm_test_tmpdir("npy_bad_header", dir, sizeof dir);
    const char zeros[64] = {0};
    static const struct {
        const char *file, *dict, *msg;
        fm_status want;
    } cases[] = {
        {"noshape.npy", "{'descr': '<f4', 'fortran_order': False, }", "missing key 'shape'", FM_ERR_FORMAT},
        {"nodescr.npy", "{'fortran_order': False, 'shape': (2,), }", "missing key 'descr'", FM_ERR_FORMAT},
        {"extra.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1, }", "'x'", FM_ERR_FORMAT},
        {"repeat.npy", "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", "'descr'",
         FM_ERR_FORMAT},
        {"notdict.npy", "['descr', '<f4']", "expected '{'", FM_ERR_FORMAT},
        {"unclosed.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)", "malformed", FM_ERR_FORMAT},
        {"negdim.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", "integer", FM_ERR_FORMAT},
        {"baddim.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2,,), }", "malformed", FM_ERR_FORMAT},
        {"bigdim.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", "overflows",
         FM_ERR_FORMAT},
        {"prod.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }",
         "overflows", FM_ERR_FORMAT},
        {"bytes.npy", "{'descr': '<i8', 'fortran_order': False, 'shape': (2147483648, 2147483648), }",
         "overflows", FM_ERR_FORMAT},
        {"huge.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }", "truncated",
         FM_ERR_FORMAT},
        {"nine.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (1,1,1,1,1,1,1,1,1), }", "dimensions",
         FM_ERR_UNSUPPORTED},
        {"bool.npy", "{'descr': '<f4', 'fortran_order': false, 'shape': (2,), }", "True or False", FM_ERR_FORMAT},
        {"junk.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), } x", "padding", FM_ERR_FORMAT},
        {"quote.npy", "{'descr: '<f4', 'fortran_order': False, 'shape': (2,), }", "malformed", FM_ERR_FORMAT},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        REQUIRE(npy_write_custom(npy_path(path, sizeof path, dir, cases[i].file), 1, cases[i].dict, zeros, 8));
        CHECK_MSG(npy_expect_fail(path, cases[i].want, cases[i].msg), "%s", cases[i].file);
    }
    /* Header length field larger than the file. */
    uint8_t raw[16] = "\x93NUMPY\x01\x00\xff\xff{}";
    REQUIRE(npy_write_raw(npy_path(path, sizeof path, dir, "hlen.npy"), raw, 12));
    CHECK(npy_expect_fail(path, FM_ERR_FORMAT, "past the end"));
    uint8_t raw2[16] = "\x93NUMPY\x02\x00\xff\xff\xff\x7f{}";
    REQUIRE(npy_write_raw(npy_path(path, sizeof path, dir, "hlen2.npy"), raw2, 14));
    CHECK(npy_expect_fail(path, FM_ERR_FORMAT, "too large"));
}

FM_TEST(npy_write_errors) {
    char dir[512], path[600];
    fm_test_tmpdir("npy_write_errors", dir, sizeof dir);
    const float v[4] = {0};
    const int64_t s9[9] = {1, 1, 1, 1, 1, 1, 1, 1, 4};
    npy_path(path, sizeof path, dir, "w.npy");
    CHECK(fm_npy_write_f32(path, v, 9, s9) == FM_ERR_ARG && strstr(fm_last_error(), "w.npy"));
    CHECK(fm_npy_write_f32(path, v, -1, s9) == FM_ERR_ARG);
    const int64_t neg[2] = {2, -2};
    CHECK(fm_npy_write_f32(path, v, 2, neg) == FM_ERR_ARG && strstr(fm_last_error(), "shape[1]"));
    const int64_t four[1] = {4};
    CHECK(fm_npy_write_i32(path, NULL, 1, four) == FM_ERR_ARG && strstr(fm_last_error(), "data"));
    CHECK(fm_npy_write_f32(path, v, 1, NULL) == FM_ERR_ARG);
    CHECK(fm_npy_write_f32(NULL, v, 1, four) == FM_ERR_ARG);
    const int64_t big[2] = {INT64_MAX, 2};
    CHECK(fm_npy_write_f32(path, v, 2, big) == FM_ERR_ARG && strstr(fm_last_error(), "overflows"));
    FILE *fp = fopen(path, "rb");
    CHECK(fp == NULL); /* nothing was written for bad arguments */
    if (fp) fclose(fp);

    npy_path(path, sizeof path, dir, "no/such/dir/w.npy");
    CHECK(fm_npy_write_f32(path, v, 1, four) == FM_ERR_IO && strstr(fm_last_error(), "no/such/dir/w.npy"));
    /* /dev/full: every write fails with ENOSPC; the error must surface (at fwrite or fclose).
     * Only where it really is the device (never create a file there). */
    struct stat sb;
    if (stat("/dev/full", &sb) == 0 && S_ISCHR(sb.st_mode)) {
        CHECK(fm_npy_write_f32("/dev/full", v, 1, four) == FM_ERR_IO);
        CHECK(strstr(fm_last_error(), "/dev/full: write failed"));
    }

    /* A write that fails part-way (file size limit -> EFBIG) is reported and the partial file removed. */
    struct rlimit old_lim;
    REQUIRE(getrlimit(RLIMIT_FSIZE, &old_lim) == 0);
    void (*old_sig)(int) = signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim = old_lim;
    lim.rlim_cur = 1000;
    bool limited = setrlimit(RLIMIT_FSIZE, &lim) == 0;
    static float many[4096];
    const int64_t n_many[1] = {4096};
    npy_path(path, sizeof path, dir, "big.npy");
    fm_status st = limited ? fm_npy_write_f32(path, many, 1, n_many) : FM_ERR_IO;
    setrlimit(RLIMIT_FSIZE, &old_lim);
    signal(SIGXFSZ, old_sig);
    if (limited) {
        CHECK(st == FM_ERR_IO && strstr(fm_last_error(), "big.npy: write failed"));
        CHECK(stat(path, &sb) != 0); /* removed */
    }
}
