/* Shared helpers of the command-line subcommands (src/cli/cmd_*.c). Each subcommand is
 * `int fm_cli_NAME(int argc, char **argv)` with argv[0] = the subcommand's name, and returns the
 * process exit status: 0 success, 1 failure (one line on stderr), 2 bad usage. */
#ifndef FM_CLI_CLI_H
#define FM_CLI_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define FM_EXIT_OK 0
#define FM_EXIT_FAIL 1
#define FM_EXIT_USAGE 2

int fm_cli_convert(int argc, char **argv);
int fm_cli_info(int argc, char **argv);
int fm_cli_logits(int argc, char **argv);
int fm_cli_run(int argc, char **argv);
int fm_cli_perplexity(int argc, char **argv);
int fm_cli_synth(int argc, char **argv);
int fm_cli_tokenize(int argc, char **argv);
int fm_cli_detokenize(int argc, char **argv);

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
