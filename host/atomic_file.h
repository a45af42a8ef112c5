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

/* Temporaries are named after their writer (host, pid): opening one removes
 * the stale temporaries of the same target left by killed writers of this
 * host, so an interrupted multi-GB save does not stay on disk.
 *
 * ---- several files of a folder replaced together ----
 * A model folder save writes many files; readers must find all of them old
 * or all new.  The new files are written under a staging folder inside the
 * target (same relative paths), then one rename turns the staging folder
 * into `.moonlit-save.commit`: from that moment the save counts.  The files
 * are then moved in, each old one first moved into `.moonlit-save.old`,
 * which is deleted at the end.  A kill before the rename leaves only a stale
 * staging folder (removed by the next begin); a kill after it leaves a
 * pending commit that ml_atomic_dir_recover finishes (every load should call
 * it first).  Only the files the save writes are replaced: anything else in
 * the folder, inside component subfolders too, stays as it was. */
/* Finish an interrupted commit in dir: 1 if there was one, 0 if not, -1. */
int ml_atomic_dir_recover(const char *dir);
/* Recover, remove stale staging folders, make a new one inside dir (which
 * must exist); returns its path (malloc'd) or NULL. */
char *ml_atomic_dir_begin(const char *dir);
/* Move everything under staging into dir as described above; on a failure
 * before the commit point the staging folder is removed. */
int ml_atomic_dir_commit(const char *dir, const char *staging);
/* Remove a staging folder and what was written in it. */
void ml_atomic_dir_abort(const char *staging);

#endif
