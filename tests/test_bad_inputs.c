/* Bad inputs to convert / logits / run: each must end with exit status 1 (or 2 for usage) and one
 * clear line on stderr naming what is wrong — never a crash, never a model that looks complete. */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "test.h"

#define SRC_MODEL "tests/fixtures/qwen35_moe_f32/model"

/* A fresh copy of the f32 fixture checkpoint in a scratch dir; returns its path in buf. */
static const char *copy_checkpoint(const char *name, char *buf, size_t cap) {
    char cmd[2048], out[256];
    fm_test_tmpdir(name, buf, cap);
    snprintf(cmd, sizeof cmd, "cp %s/config.json %s/model.safetensors '%s/'", SRC_MODEL, SRC_MODEL, buf);
    fm_test_run_cmd(cmd, out, sizeof out);
    return buf;
}

/* Rewrites dir/model.safetensors: the header goes through edit() (jansson object), the data
 * section is kept byte for byte. */
static bool edit_header(const char *dir, void (*edit)(json_t *hdr)) {
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    FILE *f = fopen(path, "rb");
    if (!f) return false;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)size);
    bool ok = b && fread(b, 1, (size_t)size, f) == (size_t)size;
    fclose(f);
    if (!ok) {
        free(b);
        return false;
    }
    uint64_t n;
    memcpy(&n, b, 8);
    json_t *hdr = json_loadb((const char *)b + 8, n, 0, NULL);
    if (!hdr) {
        free(b);
        return false;
    }
    edit(hdr);
    char *text = json_dumps(hdr, JSON_COMPACT);
    json_decref(hdr);
    size_t len = strlen(text), padded = (len + 7) / 8 * 8;
    f = fopen(path, "wb");
    uint64_t nn = padded;
    ok = f && fwrite(&nn, 8, 1, f) == 1 && fwrite(text, 1, len, f) == len;
    for (size_t i = len; ok && i < padded; i++) ok = fputc(' ', f) != EOF;
    ok = ok && fwrite(b + 8 + n, 1, (size_t)size - 8 - n, f) == (size_t)size - 8 - n;
    if (f) fclose(f);
    free(text);
    free(b);
    return ok;
}

/* Rewrites dir/config.json through edit(). */
static bool edit_config(const char *dir, void (*edit)(json_t *cfg)) {
    char path[1024];
    snprintf(path, sizeof path, "%s/config.json", dir);
    json_t *cfg = json_load_file(path, 0, NULL);
    if (!cfg) return false;
    edit(cfg);
    int rc = json_dump_file(cfg, path, JSON_INDENT(1));
    json_decref(cfg);
    return rc == 0;
}

/* Runs `flashmoe convert DIR DIR/out` and checks: exit status 1, the message mentions `needle`,
 * stderr is one line, and no output model directory was left behind. */
static void expect_convert_error(fm_test_ctx *t, const char *dir, const char *needle) {
    char cmd[2048], out[4096], outdir[1100];
    snprintf(outdir, sizeof outdir, "%s/out", dir);
    snprintf(cmd, sizeof cmd, "%s convert --no-progress '%s' '%s'", fm_test_bin(), dir, outdir);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 1, "exit status %d, output: %s", rc, out);
    CHECK_MSG(strstr(out, needle) != NULL, "message lacks \"%s\": %s", needle, out);
    CHECK_MSG(strncmp(out, "flashmoe convert: ", 18) == 0, "not one clear line: %s", out);
    struct stat sb;
    CHECK_MSG(stat(outdir, &sb) != 0, "an output directory was left behind");
    char partial[1200];
    snprintf(partial, sizeof partial, "%s.partial", outdir);
    CHECK_MSG(stat(partial, &sb) != 0, "a partial output directory was left behind");
}

FM_TEST(bad_truncated_safetensors) {
    char dir[512], cmd[1200], out[256];
    copy_checkpoint("bad_trunc", dir, sizeof dir);
    snprintf(cmd, sizeof cmd, "truncate -s 5000 '%s/model.safetensors'", dir);
    CHECK(fm_test_run_cmd(cmd, out, sizeof out) == 0);
    expect_convert_error(t, dir, "model.safetensors");
}

FM_TEST(bad_header_length_past_eof) {
    char dir[512], path[600];
    copy_checkpoint("bad_hdrlen", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    FILE *f = fopen(path, "r+b");
    REQUIRE(f);
    uint64_t n = 1u << 20; /* 1 MiB: more than the file holds */
    fwrite(&n, 8, 1, f);
    fclose(f);
    expect_convert_error(t, dir, "header");
}

FM_TEST(bad_header_json) {
    char dir[512], path[600];
    copy_checkpoint("bad_json", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    FILE *f = fopen(path, "r+b");
    REQUIRE(f);
    fseek(f, 8, SEEK_SET);
    fputs("{\"model.norm.weight\": {\"dtype\": [", f); /* cuts the JSON short */
    fclose(f);
    expect_convert_error(t, dir, "JSON");
}

static void set_offsets_past_end(json_t *h) {
    json_t *e = json_object_get(h, "model.norm.weight");
    json_object_set_new(e, "data_offsets", json_pack("[I, I]", (json_int_t)100000000, (json_int_t)100000128));
}
FM_TEST(bad_offsets_out_of_range) {
    char dir[512];
    copy_checkpoint("bad_offsets", dir, sizeof dir);
    REQUIRE(edit_header(dir, set_offsets_past_end));
    expect_convert_error(t, dir, "model.norm.weight");
}

static void make_overlap(json_t *h) {
    json_t *a = json_object_get(h, "model.layers.0.input_layernorm.weight");
    json_t *b = json_object_get(h, "model.layers.0.post_attention_layernorm.weight");
    json_object_set(b, "data_offsets", json_object_get(a, "data_offsets"));
}
FM_TEST(bad_overlapping_tensors) {
    char dir[512];
    copy_checkpoint("bad_overlap", dir, sizeof dir);
    REQUIRE(edit_header(dir, make_overlap));
    expect_convert_error(t, dir, "overlap");
}

static void transpose_shape(json_t *h) { /* [8, 32] -> [32, 8]: same bytes, wrong for the config */
    json_t *e = json_object_get(h, "model.layers.0.mlp.experts.2.gate_proj.weight");
    json_object_set_new(e, "shape", json_pack("[i, i]", 32, 8));
}
FM_TEST(bad_shape_mismatch_with_config) {
    char dir[512];
    copy_checkpoint("bad_shape", dir, sizeof dir);
    REQUIRE(edit_header(dir, transpose_shape));
    expect_convert_error(t, dir, "experts.2.gate_proj.weight has shape [32, 8]");
}

static void int_dtype(json_t *h) { /* F32 -> I32: same size, not a float */
    json_object_set_new(json_object_get(h, "model.layers.1.linear_attn.dt_bias"), "dtype", json_string("I32"));
}
FM_TEST(bad_dtype_mismatch) {
    char dir[512];
    copy_checkpoint("bad_dtype", dir, sizeof dir);
    REQUIRE(edit_header(dir, int_dtype));
    expect_convert_error(t, dir, "dt_bias: dtype I32 is not supported");
}

static void unknown_dtype(json_t *h) {
    json_object_set_new(json_object_get(h, "model.norm.weight"), "dtype", json_string("Q9_K"));
}
FM_TEST(bad_unknown_dtype) {
    char dir[512];
    copy_checkpoint("bad_unk_dtype", dir, sizeof dir);
    REQUIRE(edit_header(dir, unknown_dtype));
    expect_convert_error(t, dir, "Q9_K");
}

static void drop_tensor(json_t *h) { json_object_del(h, "model.layers.2.linear_attn.A_log"); }
FM_TEST(bad_missing_tensor) {
    char dir[512];
    copy_checkpoint("bad_missing", dir, sizeof dir);
    REQUIRE(edit_header(dir, drop_tensor));
    expect_convert_error(t, dir, "missing tensor model.layers.2.linear_attn.A_log");
}

static void drop_field(json_t *c) { json_object_del(c, "linear_num_key_heads"); }
FM_TEST(bad_config_missing_field) {
    char dir[512];
    copy_checkpoint("bad_cfg_missing", dir, sizeof dir);
    REQUIRE(edit_config(dir, drop_field));
    expect_convert_error(t, dir, "missing field \"linear_num_key_heads\"");
}

static void contradict_layers(json_t *c) { json_object_set_new(c, "num_hidden_layers", json_integer(6)); }
FM_TEST(bad_config_contradictory_layers) {
    char dir[512];
    copy_checkpoint("bad_cfg_layers", dir, sizeof dir);
    REQUIRE(edit_config(dir, contradict_layers));
    expect_convert_error(t, dir, "\"layer_types\" has 4 entries but num_hidden_layers is 6");
}

static void contradict_heads(json_t *c) { json_object_set_new(c, "num_key_value_heads", json_integer(3)); }
FM_TEST(bad_config_heads_not_divisible) {
    char dir[512];
    copy_checkpoint("bad_cfg_heads", dir, sizeof dir);
    REQUIRE(edit_config(dir, contradict_heads));
    expect_convert_error(t, dir, "not a multiple of num_key_value_heads");
}

static void wrong_type(json_t *c) { json_object_set_new(c, "hidden_size", json_string("32")); }
FM_TEST(bad_config_wrong_type) {
    char dir[512];
    copy_checkpoint("bad_cfg_type", dir, sizeof dir);
    REQUIRE(edit_config(dir, wrong_type));
    expect_convert_error(t, dir, "\"hidden_size\" must be an integer");
}

static void other_arch(json_t *c) { json_object_set_new(c, "model_type", json_string("llama")); }
FM_TEST(bad_config_unsupported_architecture) {
    char dir[512];
    copy_checkpoint("bad_cfg_arch", dir, sizeof dir);
    REQUIRE(edit_config(dir, other_arch));
    expect_convert_error(t, dir, "model_type \"llama\" is not supported");
}

FM_TEST(bad_config_not_json) {
    char dir[512], path[600];
    copy_checkpoint("bad_cfg_json", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    REQUIRE(f);
    fputs("{\"hidden_size\": 32,", f);
    fclose(f);
    expect_convert_error(t, dir, "config.json: invalid JSON");
}

/* A packed model converted once, shared by the run-time bad-input tests. */
static const char *packed_model(char *buf, size_t cap) {
    char cmd[2048], out[1024];
    fm_test_tmpdir("bad_packed_src", buf, cap);
    strcat(buf, "/m");
    snprintf(cmd, sizeof cmd, "%s convert --no-progress %s '%s'", fm_test_bin(), SRC_MODEL, buf);
    fm_test_run_cmd(cmd, out, sizeof out);
    return buf;
}

FM_TEST(bad_token_ids_out_of_range) {
    char m[512], cmd[2048], out[2048];
    packed_model(m, sizeof m);
    snprintf(cmd, sizeof cmd, "%s logits -m '%s' --ids 1,2,160 --out %s.npy", fm_test_bin(), m, m);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 1 && strstr(out, "token id 160 at position 2 is out of range [0, 160)"), "rc %d: %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s run -m '%s' --prompt-ids 5,-1", fm_test_bin(), m);
    rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 2 && strstr(out, "bad token id list"), "rc %d: %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s run -m '%s' --prompt-ids 5,x", fm_test_bin(), m);
    rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 2 && strstr(out, "bad token id list"), "rc %d: %s", rc, out);
}

FM_TEST(bad_packed_expert_file_truncated) {
    char m[512], cmd[2048], out[2048];
    packed_model(m, sizeof m);
    snprintf(cmd, sizeof cmd, "truncate -s 4096 '%s/experts/L002.bin' && %s run -m '%s' --prompt-ids 1,2 -n 2", m,
             fm_test_bin(), m);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 1 && strstr(out, "L002.bin: expert file of layer 2 is 4096 bytes"), "rc %d: %s", rc, out);
}

FM_TEST(bad_packed_missing_expert_file) {
    char m[512], cmd[2048], out[2048];
    packed_model(m, sizeof m);
    snprintf(cmd, sizeof cmd, "rm '%s/experts/L001.bin' && %s run -m '%s' --prompt-ids 1,2 -n 2", m, fm_test_bin(), m);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 1 && strstr(out, "expert file of layer 1") && strstr(out, "No such file"), "rc %d: %s", rc, out);
}

FM_TEST(bad_packed_dense_truncated) {
    char m[512], cmd[2048], out[2048];
    packed_model(m, sizeof m);
    snprintf(cmd, sizeof cmd, "truncate -s 1000 '%s/dense.bin' && %s info -m '%s'", m, fm_test_bin(), m);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 1 && strstr(out, "past the end of the file"), "rc %d: %s", rc, out);
}

FM_TEST(bad_packed_not_a_model) {
    char d[512], cmd[2048], out[2048];
    fm_test_tmpdir("bad_not_model", d, sizeof d);
    snprintf(cmd, sizeof cmd, "%s run -m '%s' --prompt-ids 1", fm_test_bin(), d);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 1 && strstr(out, "make one with flashmoe convert"), "rc %d: %s", rc, out);
}

FM_TEST(bad_usage_exit_2) {
    char out[2048], cmd[512];
    snprintf(cmd, sizeof cmd, "%s frobnicate", fm_test_bin());
    CHECK(fm_test_run_cmd(cmd, out, sizeof out) == 2 && strstr(out, "unknown command"));
    snprintf(cmd, sizeof cmd, "%s convert onlyone", fm_test_bin());
    CHECK(fm_test_run_cmd(cmd, out, sizeof out) == 2 && strstr(out, "expected HF_DIR and OUT_DIR"));
    snprintf(cmd, sizeof cmd, "%s convert a b --quant q7", fm_test_bin());
    CHECK(fm_test_run_cmd(cmd, out, sizeof out) == 2 && strstr(out, "unknown weight type \"q7\""));
    snprintf(cmd, sizeof cmd, "%s logits -m x --ids 1", fm_test_bin());
    CHECK(fm_test_run_cmd(cmd, out, sizeof out) == 2 && strstr(out, "required"));
    const char *bad_prefetch[] = {"--prefetch=-1", "--prefetch=65", "--prefetch=two", "--prefetch="};
    for (size_t i = 0; i < sizeof bad_prefetch / sizeof *bad_prefetch; i++) {
        snprintf(cmd, sizeof cmd, "%s run -m x --prompt-ids 1 %s", fm_test_bin(), bad_prefetch[i]);
        int rc = fm_test_run_cmd(cmd, out, sizeof out);
        CHECK_MSG(rc == 2 && strstr(out, "--prefetch=N needs N in 0..64"), "%s: rc %d: %s", bad_prefetch[i], rc, out);
    }
}

FM_TEST(cli_convert_refuses_existing_output) {
    char m[512], cmd[2048], out[2048];
    packed_model(m, sizeof m);
    snprintf(cmd, sizeof cmd, "%s convert --no-progress %s '%s'", fm_test_bin(), SRC_MODEL, m);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 1 && strstr(out, "already exists"), "rc %d: %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s convert --no-progress --force %s '%s' && %s info -m '%s'", fm_test_bin(), SRC_MODEL, m,
             fm_test_bin(), m);
    rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 0 && strstr(out, "qwen3_5_moe"), "rc %d: %s", rc, out);
}

/* info --json: one parseable object whose sizes add up (the dense tensors to dense_bytes, a token's
 * experts to layers x top-k x the expert's bytes), the model path escaped (a '"' in it); --tensors
 * lists every dense tensor and the expert parts; a bad option is a usage error. */
FM_TEST(cli_info_json_and_tensors) {
    char m[512], link[600], cmd[2048];
    static char out[1 << 16];
    packed_model(m, sizeof m);
    snprintf(link, sizeof link, "%s_q\"uote", m);
    snprintf(cmd, sizeof cmd, "rm -f '%s' && ln -s \"$(cd '%s' && pwd)\" '%s' && %s info -m '%s' --json --tensors", link,
             m, link, fm_test_bin(), link);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    json_error_t err;
    json_t *j = rc == 0 ? json_loads(out, 0, &err) : NULL;
    CHECK_MSG(j != NULL, "rc %d, not JSON: %s", rc, out);
    if (j) {
        CHECK(json_is_string(json_object_get(j, "model")) && !strcmp(json_string_value(json_object_get(j, "model")), link));
        CHECK(!strcmp(json_string_value(json_object_get(j, "architecture")), "qwen3_5_moe"));
        json_t *ts = json_object_get(j, "tensors");
        const json_int_t layers = json_integer_value(json_object_get(j, "layers")),
                         used = json_integer_value(json_object_get(j, "experts_used")),
                         per = json_integer_value(json_object_get(j, "expert_bytes"));
        json_int_t sum = 0;
        for (size_t i = 0; i < json_array_size(ts); i++) sum += json_integer_value(json_object_get(json_array_get(ts, i), "bytes"));
        CHECK(json_array_size(ts) > 0 && (json_int_t)json_array_size(ts) == json_integer_value(json_object_get(j, "dense_tensors")));
        CHECK_MSG(sum == json_integer_value(json_object_get(j, "dense_bytes")), "tensor bytes %lld", (long long)sum);
        CHECK(layers > 0 && used > 0 && per > 0 &&
              json_integer_value(json_object_get(j, "token_expert_bytes")) == layers * used * per);
        json_decref(j);
    }
    snprintf(cmd, sizeof cmd, "%s info -m '%s' --tensors", fm_test_bin(), m);
    rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 0 && strstr(out, "embed_tokens") && strstr(out, "layer 0 expert down"), "rc %d: %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s info -m '%s' --jsn", fm_test_bin(), m);
    rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 2 && strstr(out, "flashmoe info --help"), "rc %d: %s", rc, out);
}

/* ---- MLX-quantized checkpoints ---- */

#define MLX_MODEL "tests/fixtures/qwen35_moe_q64_mlx4/model"

static const char *copy_mlx_checkpoint(const char *name, char *buf, size_t cap) {
    char cmd[2048], out[256];
    fm_test_tmpdir(name, buf, cap);
    snprintf(cmd, sizeof cmd, "cp %s/config.json %s/model.safetensors '%s/'", MLX_MODEL, MLX_MODEL, buf);
    fm_test_run_cmd(cmd, out, sizeof out);
    return buf;
}

static void reshape_scales(json_t *h) { /* [8, 64, 2] -> [8, 32, 4]: same bytes, wrong grouping */
    json_t *e = json_object_get(h, "language_model.model.layers.0.mlp.switch_mlp.up_proj.scales");
    json_object_set_new(e, "shape", json_pack("[i, i, i]", 8, 32, 4));
}
FM_TEST(bad_mlx_scales_wrong_shape) {
    char dir[512];
    copy_mlx_checkpoint("bad_mlx_scales", dir, sizeof dir);
    REQUIRE(edit_header(dir, reshape_scales));
    expect_convert_error(t, dir, "switch_mlp.up_proj.scales has shape [8, 32, 4]");
}

static void declare_8_bits(json_t *c) { json_object_set_new(json_object_get(c, "quantization"), "bits", json_integer(8)); }
FM_TEST(bad_mlx_bits_not_declared) {
    char dir[512];
    copy_mlx_checkpoint("bad_mlx_bits", dir, sizeof dir);
    REQUIRE(edit_config(dir, declare_8_bits));
    expect_convert_error(t, dir, "at 8 bits (as config.json's quantization declares)");
}

static void unknown_mode(json_t *c) { json_object_set_new(json_object_get(c, "quantization"), "mode", json_string("mxfp4")); }
FM_TEST(bad_mlx_unknown_mode) {
    char dir[512];
    copy_mlx_checkpoint("bad_mlx_mode", dir, sizeof dir);
    REQUIRE(edit_config(dir, unknown_mode));
    expect_convert_error(t, dir, "quantization mode \"mxfp4\" is not supported");
}

static void drop_quantization(json_t *c) { json_object_del(c, "quantization"); }
FM_TEST(bad_mlx_no_quantization_block) {
    char dir[512];
    copy_mlx_checkpoint("bad_mlx_noq", dir, sizeof dir);
    REQUIRE(edit_config(dir, drop_quantization));
    expect_convert_error(t, dir, "config.json has no \"quantization\" block");
}

/* A crash ends with a backtrace on stderr and the signal's status: bench on a tiny model is sent
 * SIGSEGV while it runs (src/cli/main.c). */
FM_TEST(bad_crash_prints_a_backtrace) {
    char dir[512], cmd[4096], out[16384];
    fm_test_tmpdir("bad_crash", dir, sizeof dir);
    const char *bin = fm_test_bin();
    snprintf(cmd, sizeof cmd,
             "%s synth --preset tiny --force --no-progress '%s/m' >/dev/null 2>&1 && "
             "{ %s bench -m '%s/m' --prompt 4 --gen 20000 >/dev/null 2>'%s/err' & p=$!; sleep 1; kill -SEGV $p; "
             "wait $p; echo \"status $?\"; cat '%s/err'; }",
             bin, dir, bin, dir, dir, dir);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 0 && strstr(out, "status 139") && strstr(out, "flashmoe: crashed (a bug") && strstr(out, "flashmoe(+0x"),
              "rc %d: %.2000s", rc, out);
}
