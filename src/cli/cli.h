/* Shared helpers of the command-line subcommands (src/cli/cmd_*.c). Each subcommand is
 * `int fm_cli_NAME(int argc, char **argv)` with argv[0] = the subcommand's name, and returns the
 * process exit status: 0 success, 1 failure (one line on stderr), 2 bad usage. */
#ifndef FM_CLI_CLI_H
#define FM_CLI_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <getopt.h>

#include "flashmoe.h"
#include "text/sampler.h"

#define FM_EXIT_OK 0
#define FM_EXIT_FAIL 1
#define FM_EXIT_USAGE 2

int fm_cli_convert(int argc, char **argv);
int fm_cli_info(int argc, char **argv);
int fm_cli_logits(int argc, char **argv);
int fm_cli_run(int argc, char **argv);
int fm_cli_perplexity(int argc, char **argv);
int fm_cli_synth(int argc, char **argv);
int fm_cli_bench(int argc, char **argv);
int fm_cli_chat(int argc, char **argv);
int fm_cli_kernelbench(int argc, char **argv);
int fm_cli_tokenize(int argc, char **argv);
int fm_cli_detokenize(int argc, char **argv);
int fm_cli_serve(int argc, char **argv);

/* Options every command that opens a model shares (option codes 1000..1099). */
enum {
    FM_OPT_EXPERTS = 1000,
    FM_OPT_IO,
    FM_OPT_IO_THREADS,
    FM_OPT_CACHE,
    FM_OPT_BUDGET,
    FM_OPT_PREFETCH,
    FM_OPT_BACKEND,
    FM_OPT_VRAM_BUDGET,
    FM_OPT_VRAM_POLICY,
};
#define FM_CLI_MODEL_OPTIONS                                                                       \
    {"threads", required_argument, 0, 't'}, {"experts", required_argument, 0, FM_OPT_EXPERTS},      \
        {"io", required_argument, 0, FM_OPT_IO}, {"io-threads", required_argument, 0, FM_OPT_IO_THREADS}, \
        {"cache", required_argument, 0, FM_OPT_CACHE}, {"mem-budget", required_argument, 0, FM_OPT_BUDGET}, \
        {"prefetch", optional_argument, 0, FM_OPT_PREFETCH}, {"backend", required_argument, 0, FM_OPT_BACKEND}, \
        {"vram-budget", required_argument, 0, FM_OPT_VRAM_BUDGET},                                 \
        {"vram-policy", required_argument, 0, FM_OPT_VRAM_POLICY}
#define FM_CLI_MODEL_HELP                                                                          \
    "  -t, --threads N       compute threads (default: all CPUs)\n"                               \
    "  --experts K           routed experts per token (default: the model's; fewer lowers quality)\n" \
    "  --io ENGINE           how experts are read: pread (default; the page cache caches, and\n" \
    "                        without --cache experts already in it are used in place on the CPU),\n" \
    "                        direct (O_DIRECT, bypasses the page cache), uring (io_uring + O_DIRECT,\n" \
    "                        no reader threads), mmap (for comparison)\n"                       \
    "  --io-threads N        expert reader threads (default 4)\n"                                 \
    "  --cache SIZE          in-process RAM cache for experts, e.g. 8G (default none)\n"           \
    "  --mem-budget SIZE     everything the process may keep; the cache gets what the dense weights\n" \
    "                        and buffers leave (refused up front if the dense weights do not fit)\n" \
    "  --prefetch[=N]        decode: guess the next layer's experts (its router on this layer's\n"  \
    "                        output) and read the N likeliest (default 2) while its mixer runs,\n"  \
    "                        into the RAM cache; on by default when there is one (--cache or\n"  \
    "                        --mem-budget) on the CPU backend, --prefetch=0 turns it off; without\n" \
    "                        a cache a page-cache hint (pread); bench prints how often guesses\n" \
    "                        were right\n"                                                       \
    "  --backend cpu|cuda    where the forward pass runs (default cpu; cuda needs a CUDA=1 build\n" \
    "                        and a GPU: dense weights in VRAM, experts through a VRAM cache)\n"   \
    "  --vram-budget SIZE    cuda: device memory for dense weights, state and the expert cache\n"  \
    "                        (default: the free device memory less 1 GiB)\n"                      \
    "  --vram-policy P       cuda: the expert cache's replacement, lru (default) or flru\n"      \
    "                        (frequency-weighted LRU)\n"

/* Sampling options of run / chat (codes 1100..1199). */
enum {
    FM_OPT_TEMP = 1100,
    FM_OPT_TOP_K,
    FM_OPT_TOP_P,
    FM_OPT_MIN_P,
    FM_OPT_REPEAT,
    FM_OPT_PRESENCE,
    FM_OPT_FREQUENCY,
    FM_OPT_SEED,
    FM_OPT_STOP,
};
#define FM_CLI_SAMPLING_OPTIONS                                                                    \
    {"temp", required_argument, 0, FM_OPT_TEMP}, {"top-k", required_argument, 0, FM_OPT_TOP_K},      \
        {"top-p", required_argument, 0, FM_OPT_TOP_P}, {"min-p", required_argument, 0, FM_OPT_MIN_P}, \
        {"repeat-penalty", required_argument, 0, FM_OPT_REPEAT},                                   \
        {"presence-penalty", required_argument, 0, FM_OPT_PRESENCE},                               \
        {"frequency-penalty", required_argument, 0, FM_OPT_FREQUENCY},                             \
        {"seed", required_argument, 0, FM_OPT_SEED}, {"stop", required_argument, 0, FM_OPT_STOP}
#define FM_CLI_SAMPLING_HELP                                                                       \
    "sampling (defaults: the model's generation_config.json, else greedy):\n"                     \
    "  --temp T              temperature; 0 = greedy\n"                                            \
    "  --top-k K, --top-p P, --min-p P   keep the K most likely / the smallest set reaching P /\n"  \
    "                        those at least P times the most likely\n"                              \
    "  --repeat-penalty R, --presence-penalty P, --frequency-penalty F\n"                          \
    "  --seed S              random seed (same seed, same tokens)\n"                                \
    "  --stop TEXT           stop when TEXT appears (repeatable, up to 8)\n"

#define FM_CLI_MAX_STOPS 8

typedef struct fm_cli_sampling {
    fm_sampler_params p;
    unsigned set;           /* bit (code - FM_OPT_TEMP) when given on the command line */
    const char *stops[FM_CLI_MAX_STOPS];
    size_t n_stops;
} fm_cli_sampling;

/* Neutral sampling options (to be completed by fm_cli_sampling_finish). */
void fm_cli_sampling_init(fm_cli_sampling *o);

/* Handles one of FM_CLI_SAMPLING_OPTIONS (1 handled, 0 not one, -1 bad value, message printed). */
int fm_cli_sampling_option(const char *cmd, int c, const char *arg, fm_cli_sampling *o);

/* Fills the options not given on the command line from MODEL_DIR/generation_config.json (greedy
 * when there is none), and appends its eos_token_id ids to stop_ids (room for 8; *n_stop_ids in/out). */
void fm_cli_sampling_finish(const char *model_dir, fm_cli_sampling *o, int32_t *stop_ids, size_t *n_stop_ids);

/* Handles one of FM_CLI_MODEL_OPTIONS: 1 if it was one (stored in *p), 0 if `c` is not a model
 * option, -1 if its value is bad (the message is printed). */
int fm_cli_model_option(const char *cmd, int c, const char *arg, fm_model_params *p);

/* Reads a stream to its end: a malloc'd, NUL-terminated buffer (caller frees) and its length in *n
 * (n may be NULL); NULL on a read error or out of memory. */
char *fm_cli_read_stream(FILE *f, size_t *n);

/* fm_cli_read_stream of the file at `path`; NULL if it cannot be opened or read. */
char *fm_cli_read_file(const char *path, size_t *n);

/* Writes s to f as a JSON string literal, quotes included: '"', '\\' and control characters
 * escaped, other bytes as they are. */
void fm_cli_json_string(FILE *f, const char *s);

/* Parses a size with an optional K/M/G/T suffix (powers of 1024; "1.5G" allowed). */
bool fm_cli_parse_size(const char *s, uint64_t *out);

/* Prints "flashmoe CMD: <message>" to stderr and returns FM_EXIT_USAGE. */
int fm_cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prints "flashmoe CMD: <fm_last_error()>" to stderr and returns FM_EXIT_FAIL. */
int fm_cli_fail(const char *cmd);

/* Parses a decimal integer in [lo, hi] (the whole string); false if it is not one. */
bool fm_cli_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out);

/* Parses a comma-separated list of token ids ("1,2,3"; spaces allowed) into a malloc'd array.
 * Returns false (and prints why, for `cmd`) on an empty list, a non-number or a negative id. */
bool fm_cli_parse_ids(const char *cmd, const char *s, int32_t **ids, int64_t *n);

#endif
