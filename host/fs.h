/* fs.h — the few filesystem operations the library needs beyond stdio
 * (creating model folders, copying tokenizer files, atomic replacement). */
#ifndef ML_FS_H
#define ML_FS_H
#include <stdbool.h>

int ml_mkdir_p(const char *path);                 /* like `mkdir -p`; 0 / -1 */
bool ml_is_dir(const char *path);
bool ml_is_file(const char *path);
/* 0 if path names a regular file (after following links), else -1 with
 * "<what> '<path>': <why>" (missing, a folder, a FIFO or device...).  Call
 * it before opening a file to read it whole: opening a FIFO blocks until
 * a writer appears, and reading a device may never end. */
int ml_require_regular_file(const char *path, const char *what);
/* Copy a file atomically (temp file in the destination folder, then rename). */
int ml_copy_file(const char *src, const char *dst);
/* Sorted list of entries of a folder (malloc'd, NULL-terminated). */
char **ml_list_dir(const char *path, int *n);
void ml_free_list(char **list);

#endif
