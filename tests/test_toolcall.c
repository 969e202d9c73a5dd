/* Tool-call parser tests (tool_*): both body forms, schema typing, malformed blocks, streaming in
 * any split, agreement with the chat renderer's own tool-call text, and a bounded mutation fuzz. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "test.h"
#include "text/chat.h"
#include "text/toolcall.h"

static json_t *J(const char *text) {
    json_error_t err;
    json_t *v = json_loads(text, JSON_DECODE_ANY, &err);
    if (!v) fprintf(stderr, "  bad test JSON: %s: %s\n", err.text, text);
    return v;
}

static const char TOOLS[] =
    "[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"parameters\":{\"type\":\"object\",\"properties\":{"
    "\"city\":{\"type\":\"string\"},\"days\":{\"type\":\"integer\"},\"unit\":{\"enum\":[\"c\",\"f\"]},"
    "\"exact\":{\"type\":\"boolean\"},\"opts\":{\"type\":\"object\"},\"tags\":{\"type\":\"array\"},"
    "\"ratio\":{\"type\":\"number\"},\"maybe\":{\"type\":[\"integer\",\"null\"]},\"code\":{\"type\":\"string\"},"
    "\"either\":{\"anyOf\":[{\"type\":\"integer\"},{\"type\":\"string\"}]}}}}},"
    "{\"name\":\"ping\",\"parameters\":{\"type\":\"object\",\"properties\":{}}}]";

/* Parses text in one shot and checks the result has n calls. */
static bool parse1(fm_test_ctx *t, fm_toolcall_format fmt, const json_t *tools, const char *text,
                   fm_toolcall_result *r, size_t n_calls) {
    fm_status st = fm_toolcall_parse(fmt, tools, text, strlen(text), r);
    CHECK_MSG(st == FM_OK, "%s", fm_last_error());
    if (st != FM_OK) return false;
    CHECK_MSG(r->n_calls == n_calls, "%zu calls, want %zu, in: %s", r->n_calls, n_calls, text);
    return r->n_calls == n_calls;
}

static bool args_equal(const fm_toolcall *c, const char *want_json) {
    json_t *w = J(want_json);
    bool eq = c->arguments && json_equal(c->arguments, w);
    if (!eq) {
        char *g = c->arguments ? json_dumps(c->arguments, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
        fprintf(stderr, "  arguments %s, want %s\n", g ? g : "(none)", want_json);
        free(g);
    }
    json_decref(w);
    return eq;
}

FM_TEST(tool_json_form) {
    fm_toolcall_result r;
    const char *text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", "
                       "\"days\": 3, \"opts\": {\"a\": [1, null]}}}\n</tool_call>\n<tool_call>\n{\"name\": \"ping\", "
                       "\"arguments\": {}}\n</tool_call>";
    if (parse1(t, FM_TOOLCALL_JSON, NULL, text, &r, 2)) {
        CHECK(!strcmp(r.content, "Let me check.\n\n") && r.content_len == 15);
        CHECK(r.calls[0].ok && !strcmp(r.calls[0].name, "get_weather"));
        CHECK(args_equal(&r.calls[0], "{\"city\":\"Paris\",\"days\":3,\"opts\":{\"a\":[1,null]}}"));
        CHECK(r.calls[1].ok && !strcmp(r.calls[1].name, "ping") && args_equal(&r.calls[1], "{}"));
        CHECK(r.calls[0].content_offset == 14 && r.calls[1].content_offset == 15);
        CHECK(r.calls[0].raw_len == strlen(r.calls[0].raw) && !strncmp(r.calls[0].raw, "<tool_call>\n{", 13));
    }
    fm_toolcall_result_free(&r);
    /* arguments given as a JSON string, or missing; a string argument holding the closing tag */
    text = "<tool_call>{\"name\":\"f\",\"arguments\":\"{\\\"x\\\":1}\"}</tool_call><tool_call>{\"name\":\"g\"}</tool_call>"
           "<tool_call>{\"name\":\"h\",\"arguments\":{\"code\":\"print('</tool_call>')\"}}</tool_call>";
    if (parse1(t, FM_TOOLCALL_ANY, NULL, text, &r, 3)) {
        CHECK(r.calls[0].ok && args_equal(&r.calls[0], "{\"x\":1}"));
        CHECK(r.calls[1].ok && args_equal(&r.calls[1], "{}"));
        CHECK(r.calls[2].ok && args_equal(&r.calls[2], "{\"code\":\"print('</tool_call>')\"}"));
        CHECK(r.content_len == 0);
    }
    fm_toolcall_result_free(&r);
}

FM_TEST(tool_xml_form_with_schema) {
    json_t *tools = J(TOOLS);
    REQUIRE(tools);
    fm_toolcall_result r;
    const char *text =
        "I'll check the weather.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n<parameter=unit>\nc\n</parameter>\n<parameter=exact>\nTrue\n</parameter>\n"
        "<parameter=opts>\n{\"a\": [1, 2]}\n</parameter>\n<parameter=tags>\n[\"x\"]\n</parameter>\n"
        "<parameter=ratio>\n2.5\n</parameter>\n<parameter=maybe>\nNone\n</parameter>\n<parameter=code>\n\ndef f():\n"
        "    return \"</tool_call>\"\n\n</parameter>\n<parameter=either>\n7\n</parameter>\n</function>\n</tool_call>";
    if (parse1(t, FM_TOOLCALL_XML, tools, text, &r, 1)) {
        CHECK_MSG(r.calls[0].ok, "%s", r.calls[0].error);
        CHECK(!strcmp(r.content, "I'll check the weather.\n\n"));
        CHECK(r.calls[0].ok && !strcmp(r.calls[0].name, "get_weather"));
        CHECK(args_equal(&r.calls[0],
                         "{\"city\":\"New York\",\"days\":3,\"unit\":\"c\",\"exact\":true,\"opts\":{\"a\":[1,2]},"
                         "\"tags\":[\"x\"],\"ratio\":2.5,\"maybe\":null,\"code\":\"\\ndef f():\\n    return "
                         "\\\"</tool_call>\\\"\\n\",\"either\":7}"));
    }
    fm_toolcall_result_free(&r);
    /* integral numbers for integers; strings stay raw text even when they look like JSON */
    text = "<tool_call>\n<function=get_weather>\n<parameter=days>\n3.0\n</parameter>\n<parameter=city>\n\"42\"\n"
           "</parameter>\n<parameter=either>\nseven\n</parameter>\n</function>\n</tool_call>";
    if (parse1(t, FM_TOOLCALL_XML, tools, text, &r, 1))
        CHECK(r.calls[0].ok && args_equal(&r.calls[0], "{\"days\":3,\"city\":\"\\\"42\\\"\",\"either\":\"seven\"}"));
    fm_toolcall_result_free(&r);
    /* values that do not fit their schema type make the call malformed, never a guessed value */
    const char *wrong[] = {"<parameter=days>\nthree\n</parameter>", "<parameter=days>\n2.5\n</parameter>",
                           "<parameter=exact>\nyes\n</parameter>", "<parameter=opts>\n[1]\n</parameter>",
                           "<parameter=tags>\n{}\n</parameter>",   "<parameter=ratio>\n\"2\"\n</parameter>",
                           "<parameter=maybe>\nnil\n</parameter>"};
    for (size_t i = 0; i < sizeof wrong / sizeof *wrong; i++) {
        char buf[512];
        snprintf(buf, sizeof buf, "<tool_call>\n<function=get_weather>\n%s\n</function>\n</tool_call>", wrong[i]);
        if (parse1(t, FM_TOOLCALL_XML, tools, buf, &r, 1)) {
            CHECK_MSG(!r.calls[0].ok && !r.calls[0].name && !r.calls[0].arguments, "case %zu parsed", i);
            CHECK_MSG(strstr(r.calls[0].error, "is not"), "case %zu: %s", i, r.calls[0].error);
            CHECK(r.calls[0].raw_len == strlen(buf) && !strcmp(r.calls[0].raw, buf));
        }
        fm_toolcall_result_free(&r);
    }
    /* a function that is not among the tools */
    if (parse1(t, FM_TOOLCALL_XML, tools, "<tool_call>\n<function=rm_rf>\n</function>\n</tool_call>", &r, 1))
        CHECK(!r.calls[0].ok && strstr(r.calls[0].error, "unknown function \"rm_rf\""));
    fm_toolcall_result_free(&r);
    if (parse1(t, FM_TOOLCALL_JSON, tools, "<tool_call>{\"name\":\"rm_rf\",\"arguments\":{}}</tool_call>", &r, 1))
        CHECK(!r.calls[0].ok && strstr(r.calls[0].error, "unknown function"));
    fm_toolcall_result_free(&r);
    json_decref(tools);
}

FM_TEST(tool_xml_without_schema) {
    fm_toolcall_result r;
    const char *text = "<tool_call>\n<function=anything>\n<parameter=n>\n20\n</parameter>\n<parameter=s>\nParis\n"
                       "</parameter>\n<parameter=l>\n[1, 2]\n</parameter>\n<parameter=b>\nTrue\n</parameter>\n"
                       "<parameter=q>\n\"quoted\"\n</parameter>\n<parameter=z>\n007\n</parameter>\n<parameter=e>\n"
                       "</parameter>\n<parameter=nl>\n\n\n</parameter>\n</function>\n</tool_call>";
    if (parse1(t, FM_TOOLCALL_ANY, NULL, text, &r, 1)) {
        CHECK_MSG(r.calls[0].ok, "%s", r.calls[0].error);
        CHECK(args_equal(&r.calls[0], "{\"n\":20,\"s\":\"Paris\",\"l\":[1,2],\"b\":\"True\",\"q\":\"quoted\","
                                      "\"z\":\"007\",\"e\":\"\",\"nl\":\"\\n\"}"));
    }
    fm_toolcall_result_free(&r);
}

FM_TEST(tool_malformed_blocks) {
    const char *bodies[] = {
        "",
        "\n\n",
        "{\"name\": \"f\", \"arguments\": {}",                   /* bad JSON */
        "{\"name\": \"f\", \"parameters\": {\"a\": 1}}",         /* unknown key: would drop arguments */
        "{\"arguments\": {}}",                                   /* no name */
        "{\"name\": \"\", \"arguments\": {}}",                   /* empty name */
        "{\"name\": 5}",                                         /* name not a string */
        "{\"name\": \"f\", \"arguments\": [1]}",                 /* arguments not an object */
        "{\"name\": \"f\", \"arguments\": \"[1]\"}",             /* string arguments not an object */
        "{\"name\": \"f\", \"name\": \"g\"}",                    /* duplicate key */
        "[\"f\"]",                                               /* not an object */
        "<function=f>\n<parameter=a>\n1\n</parameter>\n",        /* missing </function> */
        "<function=f>\n</function>\ntrailing",                   /* text after </function> */
        "<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=a>\n2\n</parameter>\n</function>", /* dup */
        "<function=>\n</function>",                              /* empty name */
        "<function=f\n>\n</function>",                           /* newline in name */
        "<function=f>\n<parameter=>\n1\n</parameter>\n</function>",
        "<function=f>\ntext\n</function>",                       /* stray text */
        "<function=f>\n</function>\n<function=g>\n</function>",  /* two functions in one block */
        "just words",
        "<tool_call><function=f></function>",                    /* nested opening tag */
    };
    for (size_t i = 0; i < sizeof bodies / sizeof *bodies; i++) {
        char buf[512];
        snprintf(buf, sizeof buf, "before<tool_call>%s</tool_call>after", bodies[i]);
        fm_toolcall_result r;
        if (parse1(t, FM_TOOLCALL_ANY, NULL, buf, &r, 1)) {
            CHECK_MSG(!r.calls[0].ok && r.calls[0].error[0] && !r.calls[0].name && !r.calls[0].arguments,
                      "body %zu parsed as a call: %s", i, bodies[i]);
            CHECK_MSG(!strcmp(r.content, "beforeafter"), "body %zu: content %s", i, r.content);
            CHECK(strlen(r.calls[0].raw) == r.calls[0].raw_len && r.calls[0].raw_len == strlen(buf) - 11);
        }
        fm_toolcall_result_free(&r);
    }
    /* inside a parameter value </tool_call> is value text (code may hold it), so a value without
     * </parameter> runs to the end of the stream: one unterminated, malformed block */
    fm_toolcall_result r;
    if (parse1(t, FM_TOOLCALL_ANY, NULL, "before<tool_call><function=f>\n<parameter=a>\n1\n</function></tool_call>after",
               &r, 1)) {
        CHECK(!r.calls[0].ok && strstr(r.calls[0].error, "unterminated") && !strcmp(r.content, "before"));
        CHECK(!strcmp(r.calls[0].raw, "<tool_call><function=f>\n<parameter=a>\n1\n</function></tool_call>after"));
    }
    fm_toolcall_result_free(&r);
    /* fixed formats do not accept the other form */
    if (parse1(t, FM_TOOLCALL_JSON, NULL, "<tool_call>\n<function=f>\n</function>\n</tool_call>", &r, 1))
        CHECK(!r.calls[0].ok);
    fm_toolcall_result_free(&r);
    if (parse1(t, FM_TOOLCALL_XML, NULL, "<tool_call>{\"name\":\"f\"}</tool_call>", &r, 1)) CHECK(!r.calls[0].ok);
    fm_toolcall_result_free(&r);
    /* unterminated at the end of the stream: malformed, with everything after the tag as raw */
    if (parse1(t, FM_TOOLCALL_ANY, NULL, "ok <tool_call>{\"name\": \"f\", \"argu", &r, 1)) {
        CHECK(!r.calls[0].ok && strstr(r.calls[0].error, "unterminated"));
        CHECK(!strcmp(r.calls[0].raw, "<tool_call>{\"name\": \"f\", \"argu") && !strcmp(r.content, "ok "));
    }
    fm_toolcall_result_free(&r);
    /* text that only looks like the start of a tag is content */
    if (parse1(t, FM_TOOLCALL_ANY, NULL, "a <tool_cal> b </tool_call> c <tool_call", &r, 0))
        CHECK(!strcmp(r.content, "a <tool_cal> b </tool_call> c <tool_call"));
    fm_toolcall_result_free(&r);
}

FM_TEST(tool_api_contract) {
    fm_toolcall_parser *p;
    CHECK(fm_toolcall_parser_new((fm_toolcall_format)7, NULL, &p) == FM_ERR_ARG);
    json_t *obj = J("{}");
    CHECK(fm_toolcall_parser_new(FM_TOOLCALL_ANY, obj, &p) == FM_ERR_ARG && strstr(fm_last_error(), "tools"));
    json_decref(obj);
    CHECK_OK(fm_toolcall_parser_new(FM_TOOLCALL_ANY, NULL, &p));
    CHECK(!fm_toolcall_pending(p) && fm_toolcall_count(p) == 0 && fm_toolcall_get(p, 0) == NULL);
    CHECK_OK(fm_toolcall_finish(p));
    CHECK(fm_toolcall_feed(p, "x", 1) == FM_ERR_ARG);
    fm_toolcall_parser_free(p);
    fm_toolcall_parser_free(NULL);
    fm_toolcall_result_free(NULL);
    CHECK(fm_toolcall_format_for(FM_CHAT_QWEN3) == FM_TOOLCALL_JSON);
    CHECK(fm_toolcall_format_for(FM_CHAT_QWEN35) == FM_TOOLCALL_XML);
    CHECK(fm_toolcall_format_for(FM_CHAT_QWEN3_CODER) == FM_TOOLCALL_XML);
}

/* ================================ streaming =============================== */

typedef struct streamed {
    char content[8192];
    size_t content_len;
    bool held_inside_call; /* pending was true at some point */
} streamed;

/* Feeds text in pieces of the given sizes (cycled), collecting content after every feed. */
static fm_toolcall_parser *stream(fm_test_ctx *t, fm_toolcall_format fmt, const json_t *tools, const char *text,
                                  size_t len, const size_t *sizes, size_t n_sizes, streamed *s) {
    fm_toolcall_parser *p;
    if (fm_toolcall_parser_new(fmt, tools, &p) != FM_OK) return NULL;
    s->content_len = 0;
    s->held_inside_call = false;
    size_t off = 0, k = 0;
    while (off < len) {
        size_t n = sizes[k++ % n_sizes];
        if (n > len - off) n = len - off;
        CHECK(fm_toolcall_feed(p, text + off, n) == FM_OK);
        off += n;
        s->held_inside_call |= fm_toolcall_pending(p);
        size_t cl;
        const char *c = fm_toolcall_take_content(p, &cl);
        if (s->content_len + cl < sizeof s->content) memcpy(s->content + s->content_len, c, cl);
        s->content_len += cl;
    }
    CHECK(fm_toolcall_finish(p) == FM_OK);
    CHECK(!fm_toolcall_pending(p));
    size_t cl;
    const char *c = fm_toolcall_take_content(p, &cl);
    if (s->content_len + cl < sizeof s->content) memcpy(s->content + s->content_len, c, cl);
    s->content_len += cl;
    return p;
}

static bool same_call(const fm_toolcall *a, const fm_toolcall *b) {
    if (a->ok != b->ok || a->raw_len != b->raw_len || memcmp(a->raw, b->raw, a->raw_len) ||
        a->content_offset != b->content_offset)
        return false;
    if (!a->ok) return !strcmp(a->error, b->error);
    return !strcmp(a->name, b->name) && json_equal(a->arguments, b->arguments);
}

FM_TEST(tool_streaming_any_split) {
    json_t *tools = J(TOOLS);
    const char *text = "Sure. <tool_ca <tool_call>\n<function=get_weather>\n<parameter=city>\nOslo </parameter \n"
                       "</parameter>\n</function>\n</tool_call> mid <tool_call>{\"name\": \"ping\", \"arguments\": "
                       "{\"s\": \"a\\\"</tool_call>\"}}</tool_call>tail <";
    size_t len = strlen(text);
    fm_toolcall_result ref;
    REQUIRE(parse1(t, FM_TOOLCALL_ANY, tools, text, &ref, 2));
    CHECK(ref.calls[0].ok && ref.calls[1].ok);
    CHECK(!strcmp(ref.content, "Sure. <tool_ca  mid tail <"));
    const size_t sizes[][3] = {{1, 1, 1}, {2, 3, 5}, {7, 1, 13}, {1000, 1, 1}, {11, 12, 1}};
    for (size_t v = 0; v < 5; v++) {
        streamed s;
        fm_toolcall_parser *p = stream(t, FM_TOOLCALL_ANY, tools, text, len, sizes[v], 3, &s);
        REQUIRE(p);
        CHECK_MSG(s.content_len == ref.content_len && !memcmp(s.content, ref.content, s.content_len),
                  "split %zu: content \"%.*s\"", v, (int)s.content_len, s.content);
        CHECK(fm_toolcall_count(p) == 2);
        for (size_t i = 0; i < 2 && i < fm_toolcall_count(p); i++)
            CHECK_MSG(same_call(fm_toolcall_get(p, i), &ref.calls[i]), "split %zu call %zu", v, i);
        CHECK(s.held_inside_call);
        fm_toolcall_parser_free(p);
    }
    /* byte by byte: no piece of a tag ever reaches the content, and pending covers the call */
    fm_toolcall_parser *p;
    CHECK_OK(fm_toolcall_parser_new(FM_TOOLCALL_XML, NULL, &p));
    const char *t2 = "Hi<tool_call>\n<function=f>\n</function>\n</tool_call>!";
    bool pending_seen = false;
    for (size_t i = 0; t2[i]; i++) {
        CHECK_OK(fm_toolcall_feed(p, t2 + i, 1));
        size_t cl;
        const char *c = fm_toolcall_take_content(p, &cl);
        CHECK_MSG(memchr(c, '<', cl) == NULL, "tag text leaked at byte %zu", i);
        if (i >= 2 && i < strlen(t2) - 2) CHECK_MSG(fm_toolcall_pending(p), "not pending at byte %zu", i);
        pending_seen |= fm_toolcall_pending(p);
    }
    CHECK(!fm_toolcall_pending(p) && pending_seen);
    CHECK(fm_toolcall_count(p) == 1 && fm_toolcall_get(p, 0)->ok);
    fm_toolcall_parser_free(p);
    fm_toolcall_result_free(&ref);
    json_decref(tools);
}

/* ============================ renderer agreement ========================== */

/* The tool calls the chat renderer writes for an assistant turn parse back to the same calls. */
FM_TEST(tool_roundtrip_through_renderer) {
    json_t *tools = J(TOOLS);
    json_t *calls = J("[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":{\"city\":"
                      "\"\\nSão Paulo\\n\\n\",\"days\":10,\"exact\":false,\"opts\":{\"k\":[1.5,\"v\"]},\"tags\":[],"
                      "\"ratio\":1e-07,\"maybe\":null,\"code\":\"a</parameter\\n>b\",\"either\":\"x\"}}},"
                      "{\"function\":{\"name\":\"ping\",\"arguments\":{}}}]");
    REQUIRE(tools && calls);
    const fm_chat_template kinds[] = {FM_CHAT_QWEN3, FM_CHAT_QWEN35, FM_CHAT_QWEN3_CODER};
    for (size_t k = 0; k < 3; k++) {
        json_t *msgs = json_pack("[{s:s,s:s},{s:s,s:s,s:O}]", "role", "user", "content", "q", "role", "assistant",
                                 "content", "Checking.", "tool_calls", calls);
        fm_chat_prompt p;
        CHECK_OK(fm_chat_render(kinds[k], msgs, tools, NULL, &p));
        /* the assistant turn's text, as the model would have generated it */
        const char *a = strstr(p.text, "<|im_start|>assistant\n");
        REQUIRE(a);
        a += strlen("<|im_start|>assistant\n");
        const char *e = strstr(a, "<|im_end|>");
        REQUIRE(e);
        fm_toolcall_result r;
        CHECK_OK(fm_toolcall_parse(fm_toolcall_format_for(kinds[k]), tools, a, (size_t)(e - a), &r));
        CHECK_MSG(r.n_calls == 2, "%s: %zu calls", fm_chat_template_name(kinds[k]), r.n_calls);
        for (size_t i = 0; i < r.n_calls && i < 2; i++) {
            const json_t *fn = json_object_get(json_array_get(calls, i), "function");
            CHECK_MSG(r.calls[i].ok, "%s call %zu: %s", fm_chat_template_name(kinds[k]), i, r.calls[i].error);
            if (!r.calls[i].ok) continue;
            CHECK(!strcmp(r.calls[i].name, json_string_value(json_object_get(fn, "name"))));
            CHECK_MSG(json_equal(r.calls[i].arguments, json_object_get(fn, "arguments")), "%s call %zu arguments",
                      fm_chat_template_name(kinds[k]), i);
        }
        CHECK(strstr(r.content, "Checking.") != NULL);
        fm_toolcall_result_free(&r);
        fm_chat_prompt_free(&p);
        json_decref(msgs);
    }
    json_decref(calls);
    json_decref(tools);
}

/* ================================== fuzz ================================== */

static uint64_t rng_state;
static uint32_t rnd(uint32_t n) {
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)((rng_state >> 33) % n);
}

/* content + raw blocks, interleaved by content_offset, give back the input exactly. */
static bool partition_ok(const char *text, size_t len, const char *content, size_t clen, const fm_toolcall *calls,
                         size_t n) {
    size_t pos = 0, cpos = 0;
    for (size_t i = 0; i < n; i++) {
        size_t take = calls[i].content_offset - cpos;
        if (calls[i].content_offset < cpos || pos + take > len || memcmp(text + pos, content + cpos, take)) return false;
        pos += take;
        cpos += take;
        if (pos + calls[i].raw_len > len || memcmp(text + pos, calls[i].raw, calls[i].raw_len)) return false;
        pos += calls[i].raw_len;
    }
    return clen - cpos == len - pos && !memcmp(text + pos, content + cpos, len - pos);
}

FM_TEST(tool_fuzz_mutations) {
    json_t *tools = J(TOOLS);
    const char *seeds[] = {
        "Sure.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
        "</parameter>\n<parameter=opts>\n{\"a\": [1, \"<\"]}\n</parameter>\n</function>\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Ro\\\"me\", \"tags\": [\"</tool_call>\"]}}"
        "\n</tool_call>\n<tool_call>\n{\"name\": \"ping\", \"arguments\": {}}\n</tool_call>",
        "a<tool_call>\n<function=ping>\n</function>\n</tool_call>b<tool_call>\n<function=get_weather>\n"
        "<parameter=exact>\nTrue\n</parameter>\n<parameter=maybe>\nNone\n</parameter>\n</function>\n</tool_call>c",
    };
    const char *frags[] = {"<tool_call>", "</tool_call>", "<parameter=", "</parameter>", "<function=", "</function>",
                           "\"",          "\\",           "{",           "}",            "\n",         ">",
                           "<",           "=",            "é",           "\xff",         "ping",       "null"};
    const char alphabet[] = "<>/=\"\\{}[]\n ,:abcdefnptuxl0123456789";
    rng_state = 2024;
    size_t n_valid = 0, n_bad = 0, iters = 100000;
    char text[1024];
    for (size_t it = 0; it < iters; it++) {
        const char *seed = seeds[rnd(3)];
        size_t len = strlen(seed);
        memcpy(text, seed, len);
        int muts = 1 + (int)rnd(3);
        for (int m = 0; m < muts; m++) {
            uint32_t op = rnd(5), pos = rnd((uint32_t)len + 1);
            if (op == 0 && len > 0) { /* delete a range */
                uint32_t l = 1 + rnd(8);
                if (pos + l > len) l = (uint32_t)len - pos;
                memmove(text + pos, text + pos + l, len - pos - l);
                len -= l;
            } else if (op == 1 && len + 1 < sizeof text) { /* insert a byte */
                memmove(text + pos + 1, text + pos, len - pos);
                text[pos] = alphabet[rnd(sizeof alphabet - 1)];
                len++;
            } else if (op == 2) { /* insert a fragment */
                const char *f = frags[rnd(sizeof frags / sizeof *frags)];
                size_t fl = strlen(f);
                if (len + fl < sizeof text) {
                    memmove(text + pos + fl, text + pos, len - pos);
                    memcpy(text + pos, f, fl);
                    len += fl;
                }
            } else if (op == 3 && len > 0) { /* replace a byte */
                text[rnd((uint32_t)len)] = alphabet[rnd(sizeof alphabet - 1)];
            } else { /* truncate */
                len = pos;
            }
        }
        const json_t *tl = (it & 1) ? tools : NULL;
        fm_toolcall_format fmt = (fm_toolcall_format)rnd(3);
        fm_toolcall_result r;
        fm_status st = fm_toolcall_parse(fmt, tl, text, len, &r);
        if (st != FM_OK) {
            CHECK_MSG(0, "iteration %zu: %s", it, fm_last_error());
            break;
        }
        bool ok = partition_ok(text, len, r.content, r.content_len, r.calls, r.n_calls);
        for (size_t i = 0; i < r.n_calls; i++) {
            const fm_toolcall *c = &r.calls[i];
            if (c->ok) {
                n_valid++;
                ok &= c->name && c->name[0] && json_is_object(c->arguments) && !c->error[0];
                ok &= c->raw_len >= 23 && !memcmp(c->raw + c->raw_len - 12, "</tool_call>", 12);
            } else {
                n_bad++;
                ok &= !c->name && !c->arguments && c->error[0];
            }
        }
        /* the same text fed in random pieces gives the same result */
        if (it % 4 == 0) {
            size_t sizes[3] = {1 + rnd(16), 1 + rnd(4), 1 + rnd(64)};
            streamed s;
            fm_toolcall_parser *p = stream(t, fmt, tl, text, len, sizes, 3, &s);
            ok &= p && s.content_len == r.content_len && !memcmp(s.content, r.content, s.content_len) &&
                  fm_toolcall_count(p) == r.n_calls;
            for (size_t i = 0; ok && i < r.n_calls; i++) ok &= same_call(fm_toolcall_get(p, i), &r.calls[i]);
            fm_toolcall_parser_free(p);
        }
        fm_toolcall_result_free(&r);
        if (!ok) {
            CHECK_MSG(0, "iteration %zu broke an invariant on: %.*s", it, (int)len, text);
            break;
        }
    }
    fprintf(stderr, "  %zu mutations: %zu valid calls, %zu malformed\n", iters, n_valid, n_bad);
    CHECK(n_valid > 10000 && n_bad > 10000);
    json_decref(tools);
}
