#include "model/config.h"

#include <math.h>
#include <string.h>

#include "util/error.h"

const char *fm_arch_name(fm_arch arch) {
    switch (arch) {
    case FM_ARCH_QWEN35_MOE: return "qwen3_5_moe";
    case FM_ARCH_QWEN3_NEXT: return "qwen3_next";
    }
    return "?";
}

/* Field readers: each returns FM_OK and stores the value, or an error naming `what` and `key`.
 * `required` = false leaves *out untouched when the key is absent (or null). */
static fm_status get_int(json_t *obj, const char *what, const char *key, bool required, int64_t lo,
                         int64_t hi, int64_t *out) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        if (!required) return FM_OK;
        return fm_error_set(FM_ERR_FORMAT, "%s: missing field \"%s\"", what, key);
    }
    if (!json_is_integer(v))
        return fm_error_set(FM_ERR_FORMAT, "%s: field \"%s\" must be an integer", what, key);
    int64_t x = (int64_t)json_integer_value(v);
    if (x < lo || x > hi)
        return fm_error_set(FM_ERR_FORMAT, "%s: field \"%s\" = %lld is out of range [%lld, %lld]", what,
                            key, (long long)x, (long long)lo, (long long)hi);
    *out = x;
    return FM_OK;
}

static fm_status get_num(json_t *obj, const char *what, const char *key, bool required, double lo,
                         double hi, double *out) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        if (!required) return FM_OK;
        return fm_error_set(FM_ERR_FORMAT, "%s: missing field \"%s\"", what, key);
    }
    if (!json_is_number(v))
        return fm_error_set(FM_ERR_FORMAT, "%s: field \"%s\" must be a number", what, key);
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi))
        return fm_error_set(FM_ERR_FORMAT, "%s: field \"%s\" = %g is out of range [%g, %g]", what, key, x,
                            lo, hi);
    *out = x;
    return FM_OK;
}

static fm_status get_bool(json_t *obj, const char *what, const char *key, bool *out) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return FM_OK;
    if (!json_is_boolean(v))
        return fm_error_set(FM_ERR_FORMAT, "%s: field \"%s\" must be true or false", what, key);
    *out = json_is_true(v);
    return FM_OK;
}

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        fm_status st_ = (expr);                                                                    \
        if (st_ != FM_OK) return st_;                                                              \
    } while (0)

#define BIG ((int64_t)1 << 40)

static fm_status parse_arch(json_t *root, json_t *text, const char *what, fm_arch *arch) {
    json_t *mt = json_object_get(text, "model_type");
    if (!mt) mt = json_object_get(root, "model_type");
    if (!mt || !json_is_string(mt))
        return fm_error_set(FM_ERR_FORMAT, "%s: missing field \"model_type\"", what);
    const char *s = json_string_value(mt);
    if (!strcmp(s, "qwen3_5_moe") || !strcmp(s, "qwen3_5_moe_text")) {
        *arch = FM_ARCH_QWEN35_MOE;
    } else if (!strcmp(s, "qwen3_next")) {
        *arch = FM_ARCH_QWEN3_NEXT;
    } else {
        return fm_error_set(FM_ERR_UNSUPPORTED,
                            "%s: model_type \"%s\" is not supported (supported: qwen3_5_moe, qwen3_next)",
                            what, s);
    }
    return FM_OK;
}

static fm_status parse_layer_types(json_t *text, const char *what, fm_config *c) {
    json_t *lt = json_object_get(text, "layer_types");
    if (lt && !json_is_null(lt)) {
        if (!json_is_array(lt))
            return fm_error_set(FM_ERR_FORMAT, "%s: field \"layer_types\" must be an array", what);
        if ((int64_t)json_array_size(lt) != c->n_layers)
            return fm_error_set(FM_ERR_FORMAT,
                                "%s: \"layer_types\" has %zu entries but num_hidden_layers is %d", what,
                                json_array_size(lt), c->n_layers);
        for (int i = 0; i < c->n_layers; i++) {
            const char *s = json_string_value(json_array_get(lt, (size_t)i));
            if (s && !strcmp(s, "linear_attention")) {
                c->layer_kind[i] = FM_LAYER_LINEAR;
            } else if (s && !strcmp(s, "full_attention")) {
                c->layer_kind[i] = FM_LAYER_FULL;
            } else {
                return fm_error_set(FM_ERR_UNSUPPORTED,
                                    "%s: layer_types[%d] = %s is not supported (linear_attention, "
                                    "full_attention)",
                                    what, i, s ? s : "(not a string)");
            }
        }
        return FM_OK;
    }
    int64_t interval = 4;
    TRY(get_int(text, what, "full_attention_interval", false, 1, FM_MAX_LAYERS, &interval));
    for (int i = 0; i < c->n_layers; i++)
        c->layer_kind[i] = ((i + 1) % interval) ? FM_LAYER_LINEAR : FM_LAYER_FULL;
    return FM_OK;
}

static fm_status parse_rope(json_t *text, const char *what, fm_config *c) {
    json_t *rp = json_object_get(text, "rope_parameters");
    if (rp && !json_is_null(rp) && !json_is_object(rp))
        return fm_error_set(FM_ERR_FORMAT, "%s: field \"rope_parameters\" must be an object", what);
    if (rp && json_is_null(rp)) rp = NULL;
    json_t *rs = json_object_get(text, "rope_scaling");
    if (rs && !json_is_null(rs)) {
        json_t *type = json_is_object(rs) ? json_object_get(rs, "rope_type") : NULL;
        if (!type && json_is_object(rs)) type = json_object_get(rs, "type");
        const char *ts = json_string_value(type);
        if (!ts || strcmp(ts, "default") != 0)
            return fm_error_set(FM_ERR_UNSUPPORTED, "%s: rope_scaling of type %s is not supported", what,
                                ts ? ts : "(unknown)");
    }
    if (rp) {
        const char *ts = json_string_value(json_object_get(rp, "rope_type"));
        if (ts && strcmp(ts, "default") != 0)
            return fm_error_set(FM_ERR_UNSUPPORTED,
                                "%s: rope_parameters.rope_type \"%s\" is not supported (default only)", what,
                                ts);
    }
    double theta = -1, factor = 0.25;
    TRY(get_num(text, what, "rope_theta", false, 1.0, 1e12, &theta));
    TRY(get_num(text, what, "partial_rotary_factor", false, 0.0, 1.0, &factor));
    if (rp) { /* rope_parameters wins over the legacy top-level keys, as in transformers 5 */
        TRY(get_num(rp, what, "rope_theta", false, 1.0, 1e12, &theta));
        TRY(get_num(rp, what, "partial_rotary_factor", false, 0.0, 1.0, &factor));
    }
    if (theta < 0)
        return fm_error_set(FM_ERR_FORMAT,
                            "%s: missing field \"rope_theta\" (looked in rope_parameters and at top level)",
                            what);
    c->rope_theta = theta;
    double rd = c->head_dim * factor;
    c->rot_dim = (int)rd;
    if (rd != (double)c->rot_dim || c->rot_dim % 2 != 0 || c->rot_dim <= 0)
        return fm_error_set(FM_ERR_FORMAT,
                            "%s: head_dim %d x partial_rotary_factor %g = %g is not a positive even integer",
                            what, c->head_dim, factor, rd);
    return FM_OK;
}

fm_status fm_config_parse(json_t *root, const char *what, fm_config *c) {
    memset(c, 0, sizeof *c);
    if (!json_is_object(root)) return fm_error_set(FM_ERR_FORMAT, "%s: not a JSON object", what);
    json_t *text = json_object_get(root, "text_config");
    if (text && !json_is_null(text)) {
        if (!json_is_object(text))
            return fm_error_set(FM_ERR_FORMAT, "%s: field \"text_config\" must be an object", what);
    } else {
        text = root;
    }
    TRY(parse_arch(root, text, what, &c->arch));

    int64_t v;
    TRY(get_int(text, what, "vocab_size", true, 1, (int64_t)1 << 31, &c->n_vocab));
    TRY(get_int(text, what, "hidden_size", true, 1, 1 << 20, &c->n_embd));
    TRY(get_int(text, what, "num_hidden_layers", true, 1, FM_MAX_LAYERS, &v));
    c->n_layers = (int)v;
    double eps = 0;
    TRY(get_num(text, what, "rms_norm_eps", true, 0.0, 1.0, &eps));
    c->norm_eps = eps;
    TRY(get_int(text, what, "num_attention_heads", true, 1, 4096, &v));
    c->n_head = (int)v;
    TRY(get_int(text, what, "num_key_value_heads", true, 1, 4096, &v));
    c->n_head_kv = (int)v;
    if (c->n_head % c->n_head_kv)
        return fm_error_set(FM_ERR_FORMAT, "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d",
                            what, c->n_head, c->n_head_kv);
    v = c->n_embd / c->n_head;
    TRY(get_int(text, what, "head_dim", false, 1, 65536, &v));
    c->head_dim = (int)v;
    TRY(get_int(text, what, "linear_num_key_heads", true, 1, 4096, &v));
    c->lin_n_k_heads = (int)v;
    TRY(get_int(text, what, "linear_num_value_heads", true, 1, 4096, &v));
    c->lin_n_v_heads = (int)v;
    if (c->lin_n_v_heads % c->lin_n_k_heads)
        return fm_error_set(FM_ERR_FORMAT,
                            "%s: linear_num_value_heads %d is not a multiple of linear_num_key_heads %d", what,
                            c->lin_n_v_heads, c->lin_n_k_heads);
    TRY(get_int(text, what, "linear_key_head_dim", true, 1, 1024, &v));
    c->lin_k_dim = (int)v;
    TRY(get_int(text, what, "linear_value_head_dim", true, 1, 1024, &v));
    c->lin_v_dim = (int)v;
    TRY(get_int(text, what, "linear_conv_kernel_dim", true, 1, 64, &v));
    c->conv_kernel = (int)v;
    TRY(get_int(text, what, "num_experts", true, 1, 1 << 16, &v));
    c->n_experts = (int)v;
    TRY(get_int(text, what, "num_experts_per_tok", true, 1, c->n_experts, &v));
    c->n_experts_used = (int)v;
    TRY(get_int(text, what, "moe_intermediate_size", true, 1, 1 << 24, &c->n_ff_expert));
    TRY(get_int(text, what, "shared_expert_intermediate_size", true, 0, 1 << 24, &c->n_ff_shared));
    c->max_position = 262144;
    TRY(get_int(text, what, "max_position_embeddings", false, 1, BIG, &c->max_position));

    c->norm_topk_prob = true; /* Qwen3.5 always renormalises; Qwen3-Next when norm_topk_prob */
    if (c->arch == FM_ARCH_QWEN3_NEXT) TRY(get_bool(text, what, "norm_topk_prob", &c->norm_topk_prob));
    c->tie_embeddings = false;
    TRY(get_bool(text, what, "tie_word_embeddings", &c->tie_embeddings));
    if (text != root) TRY(get_bool(root, what, "tie_word_embeddings", &c->tie_embeddings));

    bool attn_bias = false;
    TRY(get_bool(text, what, "attention_bias", &attn_bias));
    if (attn_bias) return fm_error_set(FM_ERR_UNSUPPORTED, "%s: attention_bias = true is not supported", what);
    json_t *act = json_object_get(text, "hidden_act");
    if (act && (!json_is_string(act) || strcmp(json_string_value(act), "silu") != 0))
        return fm_error_set(FM_ERR_UNSUPPORTED, "%s: hidden_act must be \"silu\"", what);
    int64_t step = 1;
    TRY(get_int(text, what, "decoder_sparse_step", false, 1, FM_MAX_LAYERS, &step));
    json_t *mlp_only = json_object_get(text, "mlp_only_layers");
    if (step != 1 || (json_is_array(mlp_only) && json_array_size(mlp_only) > 0))
        return fm_error_set(FM_ERR_UNSUPPORTED,
                            "%s: dense MLP layers (decoder_sparse_step / mlp_only_layers) are not supported",
                            what);

    TRY(parse_layer_types(text, what, c));
    TRY(parse_rope(text, what, c));
    return FM_OK;
}

fm_status fm_config_load(const char *path, fm_config *cfg) {
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return fm_error_set(FM_ERR_FORMAT, "%s: invalid JSON at line %d column %d: %s", path, jerr.line,
                            jerr.column, jerr.text);
    fm_status st = fm_config_parse(root, path, cfg);
    json_decref(root);
    return st;
}

json_t *fm_config_to_json(const fm_config *c) {
    json_t *lt = json_array();
    for (int i = 0; i < c->n_layers; i++)
        json_array_append_new(lt, json_string(c->layer_kind[i] == FM_LAYER_FULL ? "full_attention"
                                                                                 : "linear_attention"));
    return json_pack("{s:s, s:I, s:I, s:i, s:o, s:f, s:b, s:i, s:i, s:i, s:f, s:f, s:i, s:i, s:i, s:i, "
                     "s:i, s:i, s:i, s:I, s:I, s:b, s:I}",
                     "model_type", fm_arch_name(c->arch), "vocab_size", (json_int_t)c->n_vocab,
                     "hidden_size", (json_int_t)c->n_embd, "num_hidden_layers", c->n_layers, "layer_types",
                     lt, "rms_norm_eps", c->norm_eps, "tie_word_embeddings", c->tie_embeddings,
                     "num_attention_heads", c->n_head, "num_key_value_heads", c->n_head_kv, "head_dim",
                     c->head_dim, "rope_theta", c->rope_theta, "partial_rotary_factor",
                     (double)c->rot_dim / c->head_dim, "linear_num_key_heads", c->lin_n_k_heads,
                     "linear_num_value_heads", c->lin_n_v_heads, "linear_key_head_dim", c->lin_k_dim,
                     "linear_value_head_dim", c->lin_v_dim, "linear_conv_kernel_dim", c->conv_kernel,
                     "num_experts", c->n_experts, "num_experts_per_tok", c->n_experts_used,
                     "moe_intermediate_size", (json_int_t)c->n_ff_expert, "shared_expert_intermediate_size",
                     (json_int_t)c->n_ff_shared, "norm_topk_prob", c->norm_topk_prob,
                     "max_position_embeddings", (json_int_t)c->max_position);
}
