/* flashmoe run: generate from a prompt (text, a chat turn, or token ids), streaming the text. */
#include <getopt.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "flashmoe.h"
#include "gen/generate.h"
#include "model/model.h"
#include "store/expert_store.h"
#include "text/chat.h"
#include "text/tokenizer.h"

static void help(void) {
    printf("usage: flashmoe run -m MODEL (-p TEXT | -f FILE | --prompt-ids 1,2,3) [options]\n\n"
           "Evaluates the prompt and generates up to N tokens, printing the text as it is generated (whole\n"
           "UTF-8 characters; nothing that could still become a stop string). Stops at N tokens, an\n"
           "end-of-sequence token (<|im_end|>, <|endoftext|>, generation_config.json's eos_token_id) or a\n"
           "--stop string. Ctrl-C stops the generation.\n\n"
           "options:\n"
           "  -m, --model DIR       packed model directory (from flashmoe convert); its tokenizer.json is used\n"
           "  -p, --prompt TEXT     prompt text; raw (special tokens such as <|im_start|> are recognised)\n"
           "                        unless --chat\n"
           "  -f, --file FILE       read the prompt text from FILE\n"
           "  --prompt-ids LIST     comma-separated prompt token ids instead of text\n"
           "  --chat                wrap the prompt as a user turn in the model's chat template; the text is\n"
           "                        tokenized as plain text (it cannot inject control tokens)\n"
           "  --system TEXT         system message (with --chat)\n"
           "  --think, --no-think   thinking on / off (with --chat; default: the template's)\n"
           "  -n, --n-predict N     most tokens to generate (default 256)\n"
           "  --print-ids           print the generated ids (comma-separated) instead of text\n"
           "  --ignore-eos          do not stop at end-of-sequence tokens\n"
           "  --timing              prefill/decode speed and where the time went, on stderr\n"
           "  -c, --ctx N           context size (default: prompt + n)\n" FM_CLI_MODEL_HELP FM_CLI_SAMPLING_HELP
           "\nexamples:\n"
           "  flashmoe run -m ~/models/q35 -p 'The capital of France is' -n 16\n"
           "  flashmoe run -m ~/models/q35 --chat --no-think -p 'Write a haiku about SSDs' --temp 0.7 --seed 1\n"
           "  flashmoe run -m out/tiny-qwen35 --prompt-ids 1,2,3 -n 8 --print-ids\n");
}

static volatile sig_atomic_t interrupted;
static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
}


static bool print_text(void *user, const char *text, size_t len) {
    (void)user;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return true;
}

enum { OPT_IDS = 256, OPT_PRINT_IDS, OPT_TIMING, OPT_IGNORE_EOS, OPT_CHAT, OPT_SYSTEM, OPT_THINK, OPT_NO_THINK };

int fm_cli_run(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},         {"prompt", required_argument, 0, 'p'},
        {"file", required_argument, 0, 'f'},          {"prompt-ids", required_argument, 0, OPT_IDS},
        {"n-predict", required_argument, 0, 'n'},     {"ctx", required_argument, 0, 'c'},
        {"print-ids", no_argument, 0, OPT_PRINT_IDS}, {"timing", no_argument, 0, OPT_TIMING},
        {"ignore-eos", no_argument, 0, OPT_IGNORE_EOS}, {"chat", no_argument, 0, OPT_CHAT},
        {"system", required_argument, 0, OPT_SYSTEM}, {"think", no_argument, 0, OPT_THINK},
        {"no-think", no_argument, 0, OPT_NO_THINK},   FM_CLI_MODEL_OPTIONS,
        FM_CLI_SAMPLING_OPTIONS,                      {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    fm_model_params p = fm_model_default_params();
    fm_cli_sampling sp;
    fm_cli_sampling_init(&sp);
    const char *model = NULL, *ids_s = NULL, *text = NULL, *file = NULL, *system = NULL;
    int64_t n_predict = 256, n_ctx = 0;
    bool timing = false, print_ids = false, ignore_eos = false, chat = false;
    fm_chat_thinking think = FM_CHAT_THINKING_UNSET;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:p:f:n:c:t:h", opts, NULL)) != -1) {
        int mo = fm_cli_model_option("run", c, optarg, &p);
        if (!mo) mo = fm_cli_sampling_option("run", c, optarg, &sp);
        if (mo < 0) return FM_EXIT_USAGE;
        if (mo) continue;
        switch (c) {
        case 'm': model = optarg; break;
        case 'p': text = optarg; break;
        case 'f': file = optarg; break;
        case OPT_IDS: ids_s = optarg; break;
        case 'n':
            if (!fm_cli_parse_i64(optarg, 0, INT32_MAX, &n_predict)) return fm_cli_usage_error("run", "-n needs a non-negative integer");
            break;
        case 'c':
            if (!fm_cli_parse_i64(optarg, 1, INT32_MAX, &n_ctx)) return fm_cli_usage_error("run", "--ctx needs a positive integer");
            break;
        case OPT_PRINT_IDS: print_ids = true; break;
        case OPT_TIMING: timing = true; break;
        case OPT_IGNORE_EOS: ignore_eos = true; break;
        case OPT_CHAT: chat = true; break;
        case OPT_SYSTEM: system = optarg; break;
        case OPT_THINK: think = FM_CHAT_THINKING_ON; break;
        case OPT_NO_THINK: think = FM_CHAT_THINKING_OFF; break;
        case 'h': help(); return FM_EXIT_OK;
        default: return fm_cli_usage_error("run", "bad option");
        }
    }
    if (!model) return fm_cli_usage_error("run", "-m MODEL is required");
    if (!!ids_s + !!text + !!file != 1) return fm_cli_usage_error("run", "give exactly one of -p TEXT, -f FILE, --prompt-ids");
    if (optind != argc) return fm_cli_usage_error("run", "unexpected argument \"%s\"", argv[optind]);
    if (chat && ids_s) return fm_cli_usage_error("run", "--chat needs a text prompt");
    if ((system || think != FM_CHAT_THINKING_UNSET) && !chat) return fm_cli_usage_error("run", "--system/--think/--no-think need --chat");

    int rc = FM_EXIT_OK;
    fm_model *m = NULL;
    fm_session *s = NULL;
    fm_tokenizer *tok = NULL;
    int32_t *ids = NULL;
    int64_t n = 0;
    char path[4096], *file_text = NULL;
    fm_gen_result res = {0};
    struct stat sb;
    snprintf(path, sizeof path, "%s/tokenizer.json", model);
    bool have_tok = stat(path, &sb) == 0;
    if ((text || file) && !have_tok) {
        fprintf(stderr, "flashmoe run: %s has no tokenizer.json: give --prompt-ids (or convert from a checkpoint "
                        "directory that has one)\n", model);
        return FM_EXIT_FAIL;
    }
    if (have_tok && fm_tokenizer_load(path, &tok) != FM_OK) return fm_cli_fail("run");
    if (ids_s) {
        if (!fm_cli_parse_ids("run", ids_s, &ids, &n)) {
            rc = FM_EXIT_USAGE;
            goto done;
        }
    } else {
        size_t len = file ? 0 : strlen(text), nn = 0;
        if (file && !(file_text = fm_cli_read_file(file, &len))) {
            fprintf(stderr, "flashmoe run: %s: cannot read\n", file);
            rc = FM_EXIT_FAIL;
            goto done;
        }
        const char *prompt = file ? file_text : text;
        if (chat) {
            fm_chat_template kind;
            if (fm_chat_template_detect_dir(model, &kind) != FM_OK) {
                rc = fm_cli_fail("run");
                goto done;
            }
            json_t *msgs = json_array();
            if (system) json_array_append_new(msgs, json_pack("{s:s, s:s}", "role", "system", "content", system));
            json_array_append_new(msgs, json_pack("{s:s, s:s%}", "role", "user", "content", prompt, len));
            fm_chat_flags fl = {.add_generation_prompt = true, .enable_thinking = think};
            fm_chat_prompt cp = {0};
            fm_status st = fm_chat_render(kind, msgs, NULL, &fl, &cp);
            if (st == FM_OK) st = fm_chat_tokenize(tok, &cp, &ids, &nn);
            fm_chat_prompt_free(&cp);
            json_decref(msgs);
            if (st != FM_OK) {
                rc = fm_cli_fail("run");
                goto done;
            }
        } else if (fm_tokenizer_encode(tok, prompt, len, true, &ids, &nn) != FM_OK) {
            rc = fm_cli_fail("run");
            goto done;
        }
        n = (int64_t)nn;
        if (n == 0) {
            fprintf(stderr, "flashmoe run: the prompt is empty\n");
            rc = FM_EXIT_USAGE;
            goto done;
        }
    }
    if (!n_ctx) n_ctx = n + n_predict;
    if (fm_model_open(model, &p, &m) != FM_OK) {
        rc = fm_cli_fail("run");
        goto done;
    }
    if (p.n_experts_used)
        fprintf(stderr, "run: using %d routed experts per token instead of the model's own (lower quality)\n",
                p.n_experts_used);
    if (fm_session_init(m, n_ctx, &s) != FM_OK) {
        rc = fm_cli_fail("run");
        goto done;
    }
    int32_t stop_ids[8];
    size_t n_stop = 0;
    if (!ignore_eos) n_stop = (size_t)fm_gen_default_stop_ids(tok, stop_ids);
    fm_cli_sampling_finish(model, &sp, stop_ids, ignore_eos ? &(size_t){0} : &n_stop);
    fm_gen_params gp = {.max_tokens = n_predict, .sampling = sp.p, .stop_ids = stop_ids, .n_stop_ids = n_stop,
                        .stop_strings = sp.stops, .n_stop_strings = sp.n_stops, .cancel = &interrupted};
    struct sigaction sa = {.sa_handler = on_sigint}, old;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old);
    fm_status st = n_predict > 0 ? fm_generate(s, print_ids ? NULL : tok, ids, n, &gp, print_text, NULL, &res)
                                 : fm_session_eval(s, ids, n, NULL, false);
    sigaction(SIGINT, &old, NULL);
    if (st != FM_OK) {
        printf("\n");
        rc = fm_cli_fail("run");
        goto done;
    }
    if (print_ids || !tok)
        for (int64_t i = 0; i < res.n_generated; i++) {
            bool is_stop = false;
            for (size_t k = 0; k < n_stop; k++) is_stop |= res.ids[i] == stop_ids[k];
            if (!(is_stop && i + 1 == res.n_generated && res.finish == FM_FINISH_STOP)) printf("%s%d", i ? "," : "", res.ids[i]);
        }
    printf("\n");
    if (res.finish == FM_FINISH_CANCELLED) fprintf(stderr, "run: interrupted\n");
    if (timing && n_predict > 0) {
        fprintf(stderr, "prefill: %lld tokens in %.3f s (%.2f tok/s)\n", (long long)res.n_prompt, res.prefill_seconds,
                (double)res.n_prompt / res.prefill_seconds);
        double steps = (double)(res.n_generated - 1);
        if (steps > 0) {
            double mixer = 0, route = 0, shared = 0, wait = 0, comp = 0;
            uint64_t bytes = 0, requested = 0, in_place = 0;
            for (int l = 0; l < m->cfg.n_layers; l++) {
                const fm_layer_timing *lt = fm_session_layer_timing(s, l);
                mixer += lt->mixer, route += lt->route, shared += lt->shared, wait += lt->expert_wait, comp += lt->expert_compute;
                const fm_store_layer_stats ls = fm_store_layer_stats_get(m->store, l);
                bytes += ls.bytes_read, requested += ls.requested, in_place += ls.mapped;
            }
            fprintf(stderr, "decode:  %lld tokens in %.3f s (%.2f tok/s)\n", (long long)steps, res.decode_seconds,
                    steps / res.decode_seconds);
            fprintf(stderr, "all evals: mixer %.2f s, routing %.2f, shared expert %.2f, expert I/O wait %.2f, expert "
                            "compute %.2f, lm_head %.2f; %.1f MB of experts read, %llu of %llu used in place from the "
                            "page cache\n",
                    mixer, route, shared, wait, comp, fm_session_head_seconds(s), (double)bytes / 1e6,
                    (unsigned long long)in_place, (unsigned long long)requested);
        }
    }
done:
    free(res.ids);
    fm_session_free(s);
    fm_model_free(m);
    fm_tokenizer_free(tok);
    free(ids);
    free(file_text);
    return rc;
}
