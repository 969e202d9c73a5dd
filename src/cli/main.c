/* flashmoe: the command-line entry point; dispatches to one file per subcommand. */
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *summary;
} commands[] = {
    {"convert", fm_cli_convert, "convert a Hugging Face checkpoint into a packed model"},
    {"info", fm_cli_info, "print a packed model's architecture, shapes and sizes"},
    {"run", fm_cli_run, "generate text from a prompt"},
    {"chat", fm_cli_chat, "an interactive chat (streaming, tool calls, /reset /save /load /stats)"},
    {"serve", fm_cli_serve, "an OpenAI-compatible HTTP server (chat, completions, streaming, tools, metrics)"},
    {"logits", fm_cli_logits, "write the logits of a token sequence to a .npy file"},
    {"perplexity", fm_cli_perplexity, "perplexity, and KL divergence against reference logits"},
    {"tokenize", fm_cli_tokenize, "encode text to token ids with a tokenizer.json"},
    {"detokenize", fm_cli_detokenize, "decode token ids to text"},
    {"bench", fm_cli_bench, "decode/prefill speed, time per layer, and the disk and RAM floors"},
    {"kernelbench", fm_cli_kernelbench, "throughput of the matmul kernels and the RAM bandwidth"},
    {"synth", fm_cli_synth, "write a random-weight model at a real model's geometry (for benchmarks)"},
};

static void usage(FILE *f) {
    fprintf(f, "flashmoe — run Mixture-of-Experts language models larger than memory, streaming experts from disk\n\n"
               "usage: flashmoe COMMAND [options]   (flashmoe COMMAND --help for its options)\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
        fprintf(f, "  %-11s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\nexamples:\n"
               "  flashmoe convert ~/models/Qwen3.5-35B-A3B ~/models/q35-packed\n"
               "  flashmoe run -m ~/models/q35-packed -p 'The capital of France is' -n 16\n"
               "  flashmoe chat -m ~/models/q35-packed\n");
}

/* A crash (a bug) says so and where, then ends as the signal would: the backtrace's addresses
 * (binary+offset) resolve with addr2line against the unstripped build. */
static void on_crash(int sig) {
    static const char msg[] = "flashmoe: crashed (a bug; please report it with this backtrace):\n";
    ssize_t w = write(STDERR_FILENO, msg, sizeof msg - 1);
    (void)w;
    void *frames[48];
    backtrace_symbols_fd(frames, backtrace(frames, 48), STDERR_FILENO);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void catch_crashes(void) {
    void *warm[1];
    backtrace(warm, 1); /* loads the unwinder now, not inside the handler */
    static const int sigs[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++) signal(sigs[i], on_crash);
}

int main(int argc, char **argv) {
    catch_crashes();
    if (argc < 2) {
        usage(stderr);
        return FM_EXIT_USAGE;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return FM_EXIT_OK;
    }
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
        if (!strcmp(argv[1], commands[i].name)) return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "flashmoe: unknown command \"%s\" (see flashmoe --help)\n", argv[1]);
    return FM_EXIT_USAGE;
}
