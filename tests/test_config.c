/* config.json parsing: the forms checkpoints use, and the errors for what the engine cannot run. */
#include <jansson.h>
#include <string.h>

#include "model/config.h"
#include "test.h"

#define BASE                                                                                       \
    "\"vocab_size\": 100, \"hidden_size\": 32, \"num_hidden_layers\": 6, \"rms_norm_eps\": 1e-6, "  \
    "\"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"head_dim\": 16, "                    \
    "\"linear_num_key_heads\": 2, \"linear_num_value_heads\": 4, \"linear_key_head_dim\": 8, "      \
    "\"linear_value_head_dim\": 8, \"linear_conv_kernel_dim\": 4, \"num_experts\": 6, "            \
    "\"num_experts_per_tok\": 2, \"moe_intermediate_size\": 8, \"shared_expert_intermediate_size\": 12"

static fm_status parse(const char *text, fm_config *c) {
    json_t *j = json_loads(text, 0, NULL);
    if (!j) return FM_ERR_FORMAT;
    fm_status st = fm_config_parse(j, "config.json", c);
    json_decref(j);
    return st;
}

FM_TEST(config_interval_and_top_level_rope) {
    fm_config c;
    CHECK_OK(parse("{\"model_type\": \"qwen3_next\", " BASE ", \"full_attention_interval\": 3, "
                   "\"rope_theta\": 5e6, \"partial_rotary_factor\": 0.5, \"norm_topk_prob\": false}",
                   &c));
    CHECK(c.arch == FM_ARCH_QWEN3_NEXT);
    for (int l = 0; l < 6; l++) CHECK(c.layer_kind[l] == ((l + 1) % 3 ? FM_LAYER_LINEAR : FM_LAYER_FULL));
    CHECK(c.rope_theta == 5e6 && c.rot_dim == 8 && !c.norm_topk_prob);
}

FM_TEST(config_default_interval_is_4_and_rope_parameters_win) {
    fm_config c;
    CHECK_OK(parse("{\"model_type\": \"qwen3_5_moe_text\", " BASE ", \"rope_theta\": 5e6, \"partial_rotary_factor\": 0.5, "
                   "\"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 1e7, \"partial_rotary_factor\": 0.25}}",
                   &c));
    CHECK(c.layer_kind[3] == FM_LAYER_FULL && c.layer_kind[2] == FM_LAYER_LINEAR && c.layer_kind[5] == FM_LAYER_LINEAR);
    CHECK(c.rope_theta == 1e7 && c.rot_dim == 4);
    CHECK(c.norm_topk_prob); /* Qwen3.5 always renormalises */
}

FM_TEST(config_nested_text_config) {
    fm_config c;
    CHECK_OK(parse("{\"model_type\": \"qwen3_5_moe\", \"tie_word_embeddings\": true, \"text_config\": {"
                   "\"model_type\": \"qwen3_5_moe_text\", " BASE ", \"rope_theta\": 1e7}}",
                   &c));
    CHECK(c.n_embd == 32 && c.tie_embeddings && c.rot_dim == 4);
}

static void expect_error(fm_test_ctx *t, const char *json, fm_status want, const char *needle) {
    fm_config c;
    fm_status st = parse(json, &c);
    CHECK_MSG(st == want, "status %d (want %d): %s", st, want, fm_last_error());
    CHECK_MSG(strstr(fm_last_error(), needle) != NULL, "message lacks \"%s\": %s", needle, fm_last_error());
}

FM_TEST(config_errors) {
    expect_error(t, "{\"model_type\": \"qwen3_next\", " BASE "}", FM_ERR_FORMAT, "missing field \"rope_theta\"");
    expect_error(t, "{\"model_type\": \"qwen3_next\", " BASE ", \"rope_theta\": 1e6, \"rope_scaling\": {\"rope_type\": \"yarn\"}}",
                 FM_ERR_UNSUPPORTED, "rope_scaling of type yarn");
    expect_error(t, "{\"model_type\": \"qwen3_next\", " BASE ", \"rope_theta\": 1e6, \"mlp_only_layers\": [1]}",
                 FM_ERR_UNSUPPORTED, "dense MLP layers");
    expect_error(t, "{\"model_type\": \"qwen3_next\", " BASE ", \"rope_theta\": 1e6, \"attention_bias\": true}",
                 FM_ERR_UNSUPPORTED, "attention_bias");
    expect_error(t, "{\"model_type\": \"qwen3_next\", " BASE ", \"rope_theta\": 1e6, \"partial_rotary_factor\": 0.3}",
                 FM_ERR_FORMAT, "not a positive even integer");
    expect_error(t, "{\"model_type\": \"qwen3_next\", " BASE ", \"rope_theta\": 1e6, \"layer_types\": [\"linear_attention\", "
                    "\"sliding_attention\", \"linear_attention\", \"full_attention\", \"linear_attention\", \"full_attention\"]}",
                 FM_ERR_UNSUPPORTED, "layer_types[1] = sliding_attention");
    expect_error(t, "{\"model_type\": \"qwen3_next\", \"text_config\": 5}", FM_ERR_FORMAT, "text_config");
    expect_error(t, "{\"model_type\": \"qwen3_next\", " BASE ", \"rope_theta\": 1e6, \"hidden_act\": \"gelu\"}",
                 FM_ERR_UNSUPPORTED, "hidden_act");
    expect_error(t, "[1, 2]", FM_ERR_FORMAT, "not a JSON object");
    expect_error(t, "{\"vocab_size\": 10}", FM_ERR_FORMAT, "missing field \"model_type\"");
}
