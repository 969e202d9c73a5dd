/* flashmoe serve: the OpenAI-compatible HTTP server (src/server/, docs/SERVER.md). */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "flashmoe.h"
#include "gen/generate.h"
#include "server/server.h"
#include "text/chat.h"
#include "text/tokenizer.h"
#include "util/error.h"

static void help(void) {
    printf("usage: flashmoe serve -m MODEL [options]\n\n"
           "An OpenAI-compatible HTTP API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,\n"
           "GET /health, GET /metrics (Prometheus). One thread runs the model; --parallel sessions take turns\n"
           "token by token, each keeping its last conversation as a prompt cache. Stops on SIGINT / SIGTERM.\n"
           "See docs/SERVER.md.\n\n"
           "options:\n"
           "  -m, --model DIR       packed model directory (tokenizer.json and chat_template.jinja in it)\n"
           "  --host ADDR           address to listen on (default 127.0.0.1: this machine only). Anything else\n"
           "                        exposes the model to the network: use --api-key\n"
           "  --port N              TCP port (default 8080; 0 = any free port, printed at start)\n"
           "  --api-key KEY         require \"Authorization: Bearer KEY\" (all endpoints but /health); the\n"
           "                        environment variable FLASHMOE_API_KEY does the same without showing in ps\n"
           "  --parallel N          sessions generating in turn (default 1); each holds --ctx tokens\n"
           "  -c, --ctx N           context size of each session in tokens (default 4096)\n"
           "  --queue N             requests that may wait for a session; more get 503 (default 16)\n"
           "  -n, --n-predict N     most tokens of one answer (default: what the context leaves)\n"
           "  --alias NAME          model name in /v1/models and answers (default: the directory's name)\n"
           "  --max-body SIZE       largest request body (default 8M)\n"
           "  --max-connections N   open connections (default 128)\n"
           "  --timeout SECONDS     a request must arrive in full within this (default 30)\n" FM_CLI_MODEL_HELP
           "sampling defaults for requests that leave a field out (else the model's generation_config.json,\n"
           "else greedy); --stop strings are added to every request:\n"
           "  --temp T, --top-k K, --top-p P, --min-p P, --repeat-penalty R, --presence-penalty P,\n"
           "  --frequency-penalty F, --seed S (default: a random seed per request), --stop TEXT\n\n"
           "example:\n"
           "  flashmoe serve -m ~/models/q35 --port 8080 --parallel 2\n"
           "  curl http://127.0.0.1:8080/v1/chat/completions -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'\n");
}

enum { OPT_HOST = 256, OPT_PORT, OPT_KEY, OPT_PARALLEL, OPT_QUEUE, OPT_ALIAS, OPT_MAX_BODY, OPT_MAX_CONN, OPT_TIMEOUT };

int fm_cli_serve(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},         {"host", required_argument, 0, OPT_HOST},
        {"port", required_argument, 0, OPT_PORT},     {"api-key", required_argument, 0, OPT_KEY},
        {"parallel", required_argument, 0, OPT_PARALLEL}, {"ctx", required_argument, 0, 'c'},
        {"queue", required_argument, 0, OPT_QUEUE},   {"n-predict", required_argument, 0, 'n'},
        {"alias", required_argument, 0, OPT_ALIAS},   {"max-body", required_argument, 0, OPT_MAX_BODY},
        {"max-connections", required_argument, 0, OPT_MAX_CONN}, {"timeout", required_argument, 0, OPT_TIMEOUT},
        FM_CLI_MODEL_OPTIONS,                         FM_CLI_SAMPLING_OPTIONS,
        {"help", no_argument, 0, 'h'},                {0, 0, 0, 0}};
    fm_model_params mp = fm_model_default_params();
    fm_cli_sampling sp;
    fm_cli_sampling_init(&sp);
    fm_server_config cfg = {.host = "127.0.0.1", .port = 8080, .n_parallel = 1, .queue_size = 16, .n_ctx = 4096};
    const char *model_dir = NULL, *alias = NULL;
    int64_t v;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "m:c:n:t:h", opts, NULL)) != -1) {
        int mo = fm_cli_model_option("serve", ch, optarg, &mp);
        if (!mo) mo = fm_cli_sampling_option("serve", ch, optarg, &sp);
        if (mo < 0) return FM_EXIT_USAGE;
        if (mo) continue;
        switch (ch) {
        case 'm': model_dir = optarg; break;
        case OPT_HOST: cfg.host = optarg; break;
        case OPT_PORT:
            if (!fm_cli_parse_i64(optarg, 0, 65535, &v)) return fm_cli_usage_error("serve", "--port needs an integer in [0, 65535]");
            cfg.port = (int)v;
            break;
        case OPT_KEY: cfg.api_key = optarg; break;
        case OPT_PARALLEL:
            if (!fm_cli_parse_i64(optarg, 1, 256, &v)) return fm_cli_usage_error("serve", "--parallel needs an integer in [1, 256]");
            cfg.n_parallel = (int)v;
            break;
        case 'c':
            if (!fm_cli_parse_i64(optarg, 16, INT32_MAX, &cfg.n_ctx)) return fm_cli_usage_error("serve", "--ctx needs an integer >= 16");
            break;
        case OPT_QUEUE:
            if (!fm_cli_parse_i64(optarg, 1, 100000, &v)) return fm_cli_usage_error("serve", "--queue needs an integer in [1, 100000]");
            cfg.queue_size = (int)v;
            break;
        case 'n':
            if (!fm_cli_parse_i64(optarg, 1, INT32_MAX, &cfg.max_tokens_cap)) return fm_cli_usage_error("serve", "-n needs a positive integer");
            break;
        case OPT_ALIAS: alias = optarg; break;
        case OPT_MAX_BODY: {
            uint64_t b;
            if (!fm_cli_parse_size(optarg, &b) || b < 1024 || b > (1ull << 32))
                return fm_cli_usage_error("serve", "--max-body needs a size between 1K and 4G");
            cfg.max_body_bytes = (size_t)b;
            break;
        }
        case OPT_MAX_CONN:
            if (!fm_cli_parse_i64(optarg, 1, 65536, &v)) return fm_cli_usage_error("serve", "--max-connections needs an integer in [1, 65536]");
            cfg.max_connections = (int)v;
            break;
        case OPT_TIMEOUT: {
            char *end;
            double sec = strtod(optarg, &end);
            if (*end || !(sec >= 0.05 && sec <= 3600)) return fm_cli_usage_error("serve", "--timeout needs seconds in [0.05, 3600]");
            cfg.request_timeout_ms = (int)(sec * 1000);
            break;
        }
        case 'h': help(); return FM_EXIT_OK;
        default: return fm_cli_usage_error("serve", "bad option");
        }
    }
    if (!model_dir) return fm_cli_usage_error("serve", "-m MODEL is required");
    if (optind != argc) return fm_cli_usage_error("serve", "unexpected argument \"%s\"", argv[optind]);
    if (!cfg.api_key) cfg.api_key = getenv("FLASHMOE_API_KEY");
    const char *hooks = getenv("FLASHMOE_TEST_HOOKS");
    cfg.test_hooks = hooks && !strcmp(hooks, "1");

    /* the model name: --alias, else the directory's last component */
    char name[256];
    if (alias) {
        snprintf(name, sizeof name, "%s", alias);
    } else {
        size_t n = strlen(model_dir);
        while (n > 1 && model_dir[n - 1] == '/') n--;
        size_t b = n;
        while (b && model_dir[b - 1] != '/') b--;
        snprintf(name, sizeof name, "%.*s", (int)(n - b), model_dir + b);
    }
    cfg.model_id = name;

    int rc = FM_EXIT_OK;
    fm_tokenizer *tok = NULL;
    fm_model *model = NULL;
    fm_server *srv = NULL;
    fm_chat_template kind = FM_CHAT_UNKNOWN;
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", model_dir);
    if (fm_tokenizer_load(path, &tok) != FM_OK) return fm_cli_fail("serve");
    if (fm_chat_template_detect_dir(model_dir, &kind) != FM_OK) {
        fprintf(stderr, "flashmoe serve: warning: %s; /v1/chat/completions will answer 400\n", fm_last_error());
        kind = FM_CHAT_UNKNOWN;
    }
    int32_t stop_ids[8];
    size_t n_stop = (size_t)fm_gen_default_stop_ids(tok, stop_ids);
    fm_cli_sampling_finish(model_dir, &sp, stop_ids, &n_stop);
    cfg.sampling = sp.p;
    cfg.seed_set = sp.set & (1u << (FM_OPT_SEED - FM_OPT_TEMP));
    cfg.stop_ids = stop_ids;
    cfg.n_stop_ids = n_stop;
    cfg.stop_strings = sp.stops;
    cfg.n_stop_strings = sp.n_stops;

    /* SIGINT / SIGTERM are taken by sigwait below: block them before any thread starts */
    sigset_t sigs, old;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, &old);
    signal(SIGPIPE, SIG_IGN);
    if (fm_model_open(model_dir, &mp, &model) != FM_OK || fm_server_start(model, tok, kind, &cfg, &srv) != FM_OK) {
        rc = fm_cli_fail("serve");
        goto done;
    }
    bool v6 = strchr(cfg.host, ':') != NULL;
    fprintf(stderr, "flashmoe serve: listening on http://%s%s%s:%d (model \"%s\", %s template, %d session%s of %lld tokens, queue %d%s)\n",
            v6 ? "[" : "", cfg.host, v6 ? "]" : "", fm_server_port(srv), name, fm_chat_template_name(kind), cfg.n_parallel,
            cfg.n_parallel == 1 ? "" : "s", (long long)cfg.n_ctx, cfg.queue_size, cfg.api_key && cfg.api_key[0] ? ", API key required" : "");
    if (cfg.test_hooks) fprintf(stderr, "flashmoe serve: warning: FLASHMOE_TEST_HOOKS=1: test-only request fields are accepted\n");
    if (strcmp(cfg.host, "127.0.0.1") && strcmp(cfg.host, "::1") && strcmp(cfg.host, "localhost") && !(cfg.api_key && cfg.api_key[0]))
        fprintf(stderr, "flashmoe serve: warning: listening beyond this machine without --api-key\n");
    fflush(stderr);
    int sig = 0;
    sigwait(&sigs, &sig);
    fprintf(stderr, "flashmoe serve: %s: stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
done:
    fm_server_stop(srv);
    fm_model_free(model);
    fm_tokenizer_free(tok);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}
