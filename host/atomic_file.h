/* atomic_file.h — write a file so that readers see the old or the new
 * contents, never a half-written mix.
 *
 * Data goes to a temporary file in the target's directory (rename only works
 * within one filesystem); commit fsyncs it, renames it over the target and
 * fsyncs the directory.  Any failure (or ml_atomic_abort) removes the
 * temporary and leaves an existing target untouched.  A file that readers
 * still have mmap'd (a safetensors checkpoint being overwritten) stays valid
 * for them: rename replaces the directory entry, not the old inode. */
#ifndef ML_ATOMIC_FILE_H
#define ML_ATOMIC_FILE_H

#include <stddef.h>

typedef struct {
    int fd;
    char *path;        /* the target */
    char *tmp_path;    /* the temporary, removed on failure */
} ml_atomic_file;

/* Create the temporary (mode 0666 less the umask, like fopen). */
int ml_atomic_open(ml_atomic_file *f, const char *path);
/* Write all of buf (retries short writes); on error the caller must abort. */
int ml_atomic_write(ml_atomic_file *f, const void *buf, size_t n);
/* fsync + rename + fsync(dir).  On failure the temporary is removed.  The
 * handle is finished either way. */
int ml_atomic_commit(ml_atomic_file *f);
/* Drop the temporary; safe after a failed open/commit and safe twice. */
void ml_atomic_abort(ml_atomic_file *f);

/* The whole buffer as one atomic file (json_save, small files). */
int ml_write_file_atomic(const char *path, const void *buf, size_t n);

#endif
