/* Mapped model files and SIGBUS. A read through a file mapping whose page cannot be brought in
 * (the file was truncated or rewritten while mapped, or the disk returned an error) raises
 * SIGBUS, which would end the process without a word. Mappings of model files are registered
 * here; a SIGBUS inside one prints the file, the layer and expert (expert files) or the offset
 * (other files) and the likely cause on stderr, then exits with status 1. A SIGBUS elsewhere gets
 * the handler that was installed before (the default: a core dump). */
#ifndef FM_UTIL_MAPGUARD_H
#define FM_UTIL_MAPGUARD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Registers [base, base + len) as a read-only mapping of `file` (the name is copied); stride > 0:
 * the file holds the experts of `layer`, expert e at e * stride. Installs the handler on first
 * use. Returns false when the table of mappings is full (the mapping then stays unguarded). */
bool fm_mapguard_add(const void *base, size_t len, const char *file, int layer, uint64_t stride);

/* Forgets the mapping at base (call before munmap; unknown or NULL base: nothing). */
void fm_mapguard_remove(const void *base);

#endif
