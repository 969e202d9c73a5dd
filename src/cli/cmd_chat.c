/* flashmoe chat: an interactive conversation in the terminal, with the model's own chat template,
 * streamed answers, tool calls, and the prompt cache of the session (a turn only evaluates what is
 * new since the last one). */
#include <editline/readline.h>
#include <getopt.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "flashmoe.h"
#include "gen/generate.h"
#include "model/model.h"
#include "store/expert_store.h"
#include "text/chat.h"
#include "text/toolcall.h"
#include "text/tokenizer.h"
#include "util/error.h"

#define TOOL_OUTPUT_LIMIT 16384 /* bytes of a tool's output fed back to the model */
#define MAX_TOOL_ROUNDS 8

static void help(void) {
    printf("usage: flashmoe chat -m MODEL [options]\n\n"
           "An interactive chat using the model's chat template (chat_template.jinja in the model directory).\n"
           "Answers stream as they are generated; Ctrl-C stops the answer, Ctrl-D or /exit leaves.\n\n"
           "commands: /reset  /system TEXT  /save FILE  /load FILE  /stats  /help  /exit\n\n"
           "options:\n"
           "  -m, --model DIR       packed model directory\n"
           "  --system TEXT         system message\n"
           "  --think, --no-think   thinking on / off (default: the template's)\n"
           "  --tools FILE          tools the model may call: an OpenAI-style JSON array of\n"
           "                        {\"type\": \"function\", \"function\": {name, description, parameters}}; each call\n"
           "                        is shown and you type its result\n"
           "  --allow-shell         offer a built-in tool \"shell\" that runs a command after you confirm it\n"
           "                        (y/N for every call); its output (at most 16 KB) goes back to the model\n"
           "  -n, --n-predict N     most tokens per answer (default 2048)\n"
           "  -c, --ctx N           context size in tokens (default 8192)\n" FM_CLI_MODEL_HELP FM_CLI_SAMPLING_HELP);
}

static volatile sig_atomic_t interrupted;
static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
}

typedef struct chat_state {
    fm_model *model;
    fm_session *session;
    fm_tokenizer *tok;
    fm_chat_template kind;
    json_t *messages, *tools;
    fm_chat_thinking think;
    fm_gen_params gp;
    int32_t *history; /* ids the session holds */
    int64_t n_history, n_ctx;
    bool interactive, allow_shell;
    double last_tok_s;
    int64_t last_tokens, last_prefill;
    char *answer; /* text of the answer being generated */
    size_t answer_len, answer_cap;
} chat_state;

static bool on_text(void *user, const char *text, size_t len) {
    chat_state *c = user;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    if (c->answer_len + len + 1 > c->answer_cap) {
        size_t cap = (c->answer_len + len + 1) * 2;
        char *b = realloc(c->answer, cap);
        if (!b) return false;
        c->answer = b;
        c->answer_cap = cap;
    }
    memcpy(c->answer + c->answer_len, text, len);
    c->answer_len += len;
    c->answer[c->answer_len] = 0;
    return true;
}

static char *read_line(chat_state *c, const char *prompt) {
    if (c->interactive) {
        char *l = readline(prompt);
        if (l && *l) add_history(l);
        return l;
    }
    fputs(prompt, stdout);
    fflush(stdout);
    size_t cap = 0;
    char *l = NULL;
    ssize_t n = getline(&l, &cap, stdin);
    if (n < 0) {
        free(l);
        return NULL;
    }
    if (n && l[n - 1] == '\n') l[n - 1] = 0;
    return l;
}

/* One model turn: render the conversation, evaluate only what the session does not hold yet,
 * generate, and append the answer (and its tool calls) to the conversation. */
static fm_status model_turn(chat_state *c, fm_toolcall_result *calls) {
    fm_chat_flags fl = {.add_generation_prompt = true, .enable_thinking = c->think};
    fm_chat_prompt cp = {0};
    int32_t *ids = NULL;
    size_t n = 0;
    fm_status st = fm_chat_render(c->kind, c->messages, c->tools, &fl, &cp);
    if (st == FM_OK) st = fm_chat_tokenize(c->tok, &cp, &ids, &n);
    fm_chat_prompt_free(&cp);
    if (st != FM_OK) return st;
    int64_t lcp = 0;
    while (lcp < c->n_history && lcp < (int64_t)n && c->history[lcp] == ids[lcp]) lcp++;
    if (lcp < c->n_history || lcp == (int64_t)n) { /* the cached state diverges: start over */
        fm_session_reset(c->session);
        c->n_history = lcp = 0;
    }
    if ((int64_t)n + c->gp.max_tokens > c->n_ctx) {
        free(ids);
        return fm_error_set(FM_ERR_ARG, "the conversation (%zu tokens) and an answer of up to %lld would not fit the "
                                        "context of %lld tokens: /reset, or start with a larger --ctx",
                            n, (long long)c->gp.max_tokens, (long long)c->n_ctx);
    }
    c->answer_len = 0;
    if (c->answer) c->answer[0] = 0;
    interrupted = 0;
    fm_gen_result res;
    st = fm_generate(c->session, c->tok, ids + lcp, (int64_t)n - lcp, &c->gp, on_text, c, &res);
    if (st != FM_OK) {
        free(ids);
        fm_session_reset(c->session); /* its state is unknown now */
        c->n_history = 0;
        return st;
    }
    printf("\n");
    if (res.finish == FM_FINISH_CANCELLED) printf("[stopped]\n");
    /* the session now holds the prompt and every generated id but the last (never evaluated) */
    int64_t keep = (int64_t)n + (res.n_generated > 0 ? res.n_generated - 1 : 0);
    int32_t *h = realloc(c->history, sizeof(int32_t) * (size_t)(keep + 1));
    if (h) {
        c->history = h;
        memcpy(h, ids, sizeof(int32_t) * n);
        if (res.n_generated > 1) memcpy(h + n, res.ids, sizeof(int32_t) * (size_t)(res.n_generated - 1));
        c->n_history = keep;
    }
    c->last_tokens = res.n_generated;
    c->last_prefill = (int64_t)n - lcp;
    c->last_tok_s = res.decode_seconds > 0 ? (double)(res.n_generated - 1) / res.decode_seconds : 0;
    free(res.ids);
    free(ids);
    /* the answer joins the conversation; tool calls are parsed out of it */
    const char *text = c->answer ? c->answer : "";
    json_t *msg = json_pack("{s:s}", "role", "assistant");
    memset(calls, 0, sizeof *calls);
    if (c->tools && fm_toolcall_parse(fm_toolcall_format_for(c->kind), c->tools, text, c->answer_len, calls) == FM_OK &&
        calls->n_calls) {
        json_object_set_new(msg, "content", json_stringn(calls->content, calls->content_len));
        json_t *tc = json_array();
        for (size_t i = 0; i < calls->n_calls; i++)
            if (calls->calls[i].ok)
                json_array_append_new(tc, json_pack("{s:s, s:{s:s, s:O}}", "type", "function", "function", "name",
                                                    calls->calls[i].name, "arguments", calls->calls[i].arguments));
        json_object_set_new(msg, "tool_calls", tc);
    } else {
        json_object_set_new(msg, "content", json_stringn(text, c->answer_len));
    }
    json_array_append_new(c->messages, msg);
    return FM_OK;
}

/* Runs a confirmed shell command; returns its output (truncated), malloc'd. */
static char *run_shell(const char *cmd) {
    FILE *p = popen(cmd, "r");
    if (!p) return strdup("error: could not start the command");
    char *out = malloc(TOOL_OUTPUT_LIMIT + 64);
    size_t n = out ? fread(out, 1, TOOL_OUTPUT_LIMIT, p) : 0;
    char rest[4096];
    size_t dropped = 0, r;
    while ((r = fread(rest, 1, sizeof rest, p)) > 0) dropped += r;
    int status = pclose(p);
    if (!out) return NULL;
    out[n] = 0;
    if (dropped) snprintf(out + n, 64, "\n[output truncated: %zu more bytes]", dropped);
    if (status != 0 && n + 40 < TOOL_OUTPUT_LIMIT) snprintf(out + strlen(out), 40, "\n[exit status %d]", WEXITSTATUS(status));
    return out;
}

/* Shows each tool call, gets its result (the shell tool runs after a y/N; others: typed by the
 * user), and appends the tool messages. Returns true if the model should answer again. */
static bool handle_tool_calls(chat_state *c, const fm_toolcall_result *calls) {
    bool any = false;
    for (size_t i = 0; i < calls->n_calls; i++) {
        const fm_toolcall *tc = &calls->calls[i];
        if (!tc->ok) {
            printf("[malformed tool call: %s]\n%.*s\n", tc->error, (int)tc->raw_len, tc->raw);
            continue;
        }
        char *args = json_dumps(tc->arguments, JSON_COMPACT);
        printf("[tool call] %s(%s)\n", tc->name, args ? args : "");
        free(args);
        char *result = NULL;
        const char *cmd = json_string_value(json_object_get(tc->arguments, "command"));
        if (!strcmp(tc->name, "shell") && c->allow_shell && cmd) {
            printf("run `%s`? [y/N] ", cmd);
            fflush(stdout);
            char *ans = read_line(c, "");
            bool yes = ans && (ans[0] == 'y' || ans[0] == 'Y');
            free(ans);
            result = yes ? run_shell(cmd) : strdup("the user declined to run this command");
        } else {
            char *l = read_line(c, "result> ");
            result = l ? l : strdup("");
        }
        json_array_append_new(c->messages, json_pack("{s:s, s:s}", "role", "tool", "content", result ? result : ""));
        free(result);
        any = true;
    }
    return any;
}

static void command(chat_state *c, char *line, bool *quit) {
    char *arg = line + strcspn(line, " ");
    if (*arg) *arg++ = 0;
    if (!strcmp(line, "/exit") || !strcmp(line, "/quit")) {
        *quit = true;
    } else if (!strcmp(line, "/reset")) {
        json_t *keep = json_array();
        json_t *first = json_array_get(c->messages, 0);
        if (first && !strcmp(json_string_value(json_object_get(first, "role")), "system")) json_array_append(keep, first);
        json_decref(c->messages);
        c->messages = keep;
        fm_session_reset(c->session);
        c->n_history = 0;
        printf("[conversation cleared]\n");
    } else if (!strcmp(line, "/system")) {
        json_t *first = json_array_get(c->messages, 0);
        if (first && !strcmp(json_string_value(json_object_get(first, "role")), "system")) json_array_remove(c->messages, 0);
        if (*arg) json_array_insert_new(c->messages, 0, json_pack("{s:s, s:s}", "role", "system", "content", arg));
        printf(*arg ? "[system message set]\n" : "[system message removed]\n");
    } else if (!strcmp(line, "/save")) {
        if (!*arg || json_dump_file(c->messages, arg, JSON_INDENT(2)) != 0) printf("[cannot save to \"%s\"]\n", arg);
        else printf("[saved %zu messages to %s]\n", json_array_size(c->messages), arg);
    } else if (!strcmp(line, "/load")) {
        json_error_t err;
        json_t *m = *arg ? json_load_file(arg, 0, &err) : NULL;
        bool ok = json_is_array(m);
        for (size_t i = 0; ok && i < json_array_size(m); i++) {
            const char *role = json_string_value(json_object_get(json_array_get(m, i), "role"));
            ok = role && (!strcmp(role, "system") || !strcmp(role, "user") || !strcmp(role, "assistant") || !strcmp(role, "tool"));
        }
        if (!ok) {
            printf("[cannot load \"%s\": %s]\n", arg, m ? "not an array of messages with roles" : (*arg ? err.text : "no file given"));
            json_decref(m);
        } else {
            json_decref(c->messages);
            c->messages = m;
            printf("[loaded %zu messages]\n", json_array_size(m));
        }
    } else if (!strcmp(line, "/stats")) {
        uint64_t bytes = 0, hits = 0, req = 0;
        for (int l = 0; l < c->model->cfg.n_layers; l++) {
            fm_store_layer_stats st = fm_store_layer_stats_get(c->model->store, l);
            bytes += st.bytes_read, hits += st.hits, req += st.requested;
        }
        printf("[%zu messages, %lld tokens in context of %lld; last answer %lld tokens at %.2f tok/s after %lld new prompt "
               "tokens; experts: %.1f MB read, %.1f%% cache hits]\n",
               json_array_size(c->messages), (long long)c->n_history, (long long)c->n_ctx, (long long)c->last_tokens,
               c->last_tok_s, (long long)c->last_prefill, (double)bytes / 1e6, req ? 100.0 * (double)hits / (double)req : 0.0);
    } else if (!strcmp(line, "/help")) {
        printf("/reset  /system TEXT  /save FILE  /load FILE  /stats  /exit\n");
    } else {
        printf("[unknown command %s: /help lists them]\n", line);
    }
}

enum { OPT_SYSTEM = 256, OPT_THINK, OPT_NO_THINK, OPT_TOOLS, OPT_SHELL };

int fm_cli_chat(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},     {"system", required_argument, 0, OPT_SYSTEM},
        {"think", no_argument, 0, OPT_THINK},     {"no-think", no_argument, 0, OPT_NO_THINK},
        {"tools", required_argument, 0, OPT_TOOLS}, {"allow-shell", no_argument, 0, OPT_SHELL},
        {"n-predict", required_argument, 0, 'n'}, {"ctx", required_argument, 0, 'c'},
        FM_CLI_MODEL_OPTIONS,                     FM_CLI_SAMPLING_OPTIONS,
        {"help", no_argument, 0, 'h'},            {0, 0, 0, 0}};
    fm_model_params p = fm_model_default_params();
    fm_cli_sampling sp;
    fm_cli_sampling_init(&sp);
    chat_state c = {.think = FM_CHAT_THINKING_UNSET, .n_ctx = 8192};
    const char *model = NULL, *system = NULL, *tools_path = NULL;
    int64_t n_predict = 2048;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "m:n:c:t:h", opts, NULL)) != -1) {
        int mo = fm_cli_model_option("chat", ch, optarg, &p);
        if (!mo) mo = fm_cli_sampling_option("chat", ch, optarg, &sp);
        if (mo < 0) return FM_EXIT_USAGE;
        if (mo) continue;
        switch (ch) {
        case 'm': model = optarg; break;
        case OPT_SYSTEM: system = optarg; break;
        case OPT_THINK: c.think = FM_CHAT_THINKING_ON; break;
        case OPT_NO_THINK: c.think = FM_CHAT_THINKING_OFF; break;
        case OPT_TOOLS: tools_path = optarg; break;
        case OPT_SHELL: c.allow_shell = true; break;
        case 'n':
            if (!fm_cli_parse_i64(optarg, 1, INT32_MAX, &n_predict)) return fm_cli_usage_error("chat", "-n needs a positive integer");
            break;
        case 'c':
            if (!fm_cli_parse_i64(optarg, 16, INT32_MAX, &c.n_ctx)) return fm_cli_usage_error("chat", "--ctx needs an integer >= 16");
            break;
        case 'h': help(); return FM_EXIT_OK;
        default: return fm_cli_usage_error("chat", "bad option");
        }
    }
    if (!model) return fm_cli_usage_error("chat", "-m MODEL is required");
    if (optind != argc) return fm_cli_usage_error("chat", "unexpected argument \"%s\"", argv[optind]);
    int rc = FM_EXIT_OK;
    char path[4096];
    if (tools_path) {
        json_error_t err;
        c.tools = json_load_file(tools_path, 0, &err);
        if (!c.tools) {
            fprintf(stderr, "flashmoe chat: %s: not valid JSON (line %d: %s)\n", tools_path, err.line, err.text);
            return FM_EXIT_FAIL;
        }
        if (!json_is_array(c.tools)) {
            fprintf(stderr, "flashmoe chat: %s: expected a JSON array of tools\n", tools_path);
            json_decref(c.tools);
            return FM_EXIT_FAIL;
        }
    }
    if (c.allow_shell) {
        if (!c.tools) c.tools = json_array();
        json_array_append_new(c.tools, json_pack("{s:s, s:{s:s, s:s, s:{s:s, s:{s:{s:s, s:s}}, s:[s]}}}", "type", "function",
                                                 "function", "name", "shell", "description",
                                                 "Run a shell command on the user's machine (after the user confirms) and return its output",
                                                 "parameters", "type", "object", "properties", "command", "type", "string",
                                                 "description", "the command line", "required", "command"));
    }
    snprintf(path, sizeof path, "%s/tokenizer.json", model);
    if (fm_tokenizer_load(path, &c.tok) != FM_OK || fm_chat_template_detect_dir(model, &c.kind) != FM_OK ||
        fm_model_open(model, &p, &c.model) != FM_OK || fm_session_init(c.model, c.n_ctx, &c.session) != FM_OK) {
        rc = fm_cli_fail("chat");
        goto done;
    }
    int32_t stop_ids[8];
    size_t n_stop = (size_t)fm_gen_default_stop_ids(c.tok, stop_ids);
    fm_cli_sampling_finish(model, &sp, stop_ids, &n_stop);
    c.gp = (fm_gen_params){.max_tokens = n_predict, .sampling = sp.p, .stop_ids = stop_ids, .n_stop_ids = n_stop,
                           .stop_strings = sp.stops, .n_stop_strings = sp.n_stops, .cancel = &interrupted};
    c.messages = json_array();
    if (system) json_array_append_new(c.messages, json_pack("{s:s, s:s}", "role", "system", "content", system));
    c.interactive = isatty(STDIN_FILENO) && isatty(STDOUT_FILENO);
    struct sigaction sa = {.sa_handler = on_sigint}, old;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old);
    printf("flashmoe chat — %s template, %d layers; /help for commands, Ctrl-C stops an answer, Ctrl-D leaves\n",
           fm_chat_template_name(c.kind), c.model->cfg.n_layers);
    bool quit = false;
    while (!quit) {
        char *line = read_line(&c, "> ");
        if (!line) break;
        char *s = line;
        while (*s == ' ' || *s == '\t') s++;
        if (!*s) {
            free(line);
            continue;
        }
        if (*s == '/') {
            command(&c, s, &quit);
            free(line);
            continue;
        }
        json_array_append_new(c.messages, json_pack("{s:s, s:s}", "role", "user", "content", s));
        free(line);
        for (int round = 0; round <= MAX_TOOL_ROUNDS; round++) {
            fm_toolcall_result calls;
            fm_status st = model_turn(&c, &calls);
            if (st != FM_OK) {
                printf("[error: %s]\n", fm_last_error());
                json_array_remove(c.messages, json_array_size(c.messages) - 1); /* the message that did not fit */
                break;
            }
            bool again = calls.n_calls && !interrupted && handle_tool_calls(&c, &calls);
            fm_toolcall_result_free(&calls);
            if (!again) break;
        }
    }
    sigaction(SIGINT, &old, NULL);
done:
    free(c.history);
    free(c.answer);
    json_decref(c.messages);
    json_decref(c.tools);
    fm_session_free(c.session);
    fm_model_free(c.model);
    fm_tokenizer_free(c.tok);
    return rc;
}
