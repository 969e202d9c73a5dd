#include "gen/generate.h"

#include <stdlib.h>
#include <string.h>

#include "util/error.h"
#include "util/progress.h"

int fm_gen_default_stop_ids(const fm_tokenizer *tok, int32_t *out) {
    static const char *names[] = {"<|im_end|>", "<|endoftext|>"};
    int n = 0;
    for (int i = 0; i < 2 && tok; i++) {
        int32_t id = fm_tokenizer_find(tok, names[i]);
        if (id >= 0) out[n++] = id;
    }
    return n;
}

fm_status fm_generate(fm_session *s, const fm_tokenizer *tok, const int32_t *prompt, int64_t n_prompt,
                      const fm_gen_params *gp, fm_gen_text_fn on_text, void *user, fm_gen_result *res) {
    memset(res, 0, sizeof *res);
    int64_t V = fm_model_n_vocab(fm_session_model(s));
    float *logits = malloc(sizeof(float) * (size_t)V);
    res->ids = malloc(sizeof(int32_t) * (size_t)(gp->max_tokens > 0 ? gp->max_tokens : 1));
    fm_sampler *smp = NULL;
    fm_stop *stop = NULL;
    fm_status st = FM_OK;
    if (!logits || !res->ids) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto done;
    }
    if ((st = fm_sampler_new(&gp->sampling, V, &smp)) != FM_OK) goto done;
    if ((st = fm_stop_new(gp->stop_ids, gp->n_stop_ids, gp->stop_strings, gp->n_stop_strings, &stop)) != FM_OK) goto done;
    for (int64_t i = 0; i < n_prompt; i++) /* penalties see the prompt too */
        if ((st = fm_sampler_accept(smp, prompt[i])) != FM_OK) goto done;
    double t0 = fm_time_now();
    if (n_prompt < 1) {
        st = fm_error_set(FM_ERR_ARG, "nothing to generate from: the prompt is empty");
        goto done;
    }
    /* plain greedy: each step's argmax is taken where the logits are (on the GPU in resident mode) */
    const bool greedy = fm_sampler_params_greedy(&gp->sampling);
    int32_t next = -1;
    if ((st = greedy ? fm_session_eval_greedy(s, prompt, n_prompt, &next)
                     : fm_session_eval(s, prompt, n_prompt, logits, false)) != FM_OK)
        goto done;
    res->n_prompt = n_prompt;
    double t1 = fm_time_now();
    res->prefill_seconds = t1 - t0;
    fm_detok dt;
    if (tok) fm_detok_init(&dt, tok);
    char text[4096];
    res->finish = FM_FINISH_LENGTH;
    for (int64_t i = 0; i < gp->max_tokens; i++) {
        if (gp->cancel && *gp->cancel) {
            res->finish = FM_FINISH_CANCELLED;
            break;
        }
        int32_t id = next;
        if (greedy && id < 0) {
            st = fm_error_set(FM_ERR_ARG, "sampler: a logit is NaN");
            goto done;
        }
        if (!greedy && (st = fm_sampler_sample(smp, logits, &id)) != FM_OK) goto done;
        if ((st = fm_sampler_accept(smp, id)) != FM_OK) goto done;
        res->ids[res->n_generated++] = id;
        size_t n_text = tok ? fm_detok_push(&dt, id, text, sizeof text) : 0;
        fm_stop_reason why;
        const char *emit;
        size_t emit_len;
        if ((st = fm_stop_push(stop, id, text, n_text, &why, &emit, &emit_len)) != FM_OK) goto done;
        if (emit_len && on_text && !on_text(user, emit, emit_len)) {
            res->finish = FM_FINISH_CANCELLED;
            break;
        }
        if (why != FM_STOP_NONE) {
            res->finish = FM_FINISH_STOP;
            break;
        }
        if (i + 1 == gp->max_tokens) break;
        if ((st = greedy ? fm_session_eval_greedy(s, &id, 1, &next) : fm_session_eval(s, &id, 1, logits, false)) != FM_OK)
            goto done;
    }
    if (res->finish != FM_FINISH_STOP) { /* show what was held back */
        size_t n_text = tok ? fm_detok_flush(&dt, text, sizeof text) : 0;
        fm_stop_reason why;
        const char *emit;
        size_t emit_len;
        if (n_text && fm_stop_push(stop, -1, text, n_text, &why, &emit, &emit_len) == FM_OK && emit_len && on_text)
            on_text(user, emit, emit_len);
        if (fm_stop_matched(stop) < 0) {
            const char *tail = fm_stop_flush(stop, &emit_len);
            if (emit_len && on_text) on_text(user, tail, emit_len);
        }
    }
    res->decode_seconds = fm_time_now() - t1;
done:
    if (st != FM_OK) {
        free(res->ids);
        res->ids = NULL;
    }
    fm_sampler_free(smp);
    fm_stop_free(stop);
    free(logits);
    return st;
}
