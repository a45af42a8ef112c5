/* atomic_file.c — temp file + fsync + rename (see atomic_file.h). */
#include "atomic_file.h"
#include "error.h"
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static atomic_uint g_counter;

/* Directory part of path ("." when there is none), malloc'd. */
static char *dir_of(const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash) return strdup(".");
    if (slash == path) return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

int ml_atomic_open(ml_atomic_file *f, const char *path) {
    f->fd = -1;
    f->path = NULL;
    f->tmp_path = NULL;
    if (!path || !*path) return ml_error("cannot write a file with an empty name");
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    if (!*base) return ml_error("cannot write '%s': it names a directory", path);
    size_t dirlen = (size_t)(base - path);
    size_t cap = strlen(path) + 64;
    f->path = strdup(path);
    f->tmp_path = malloc(cap);
    if (!f->path || !f->tmp_path) {
        ml_atomic_abort(f);
        return ml_error("out of memory writing '%s'", path);
    }
    /* A hidden name next to the target: same filesystem, so rename is atomic;
     * O_EXCL so two writers never share a temporary. */
    for (int attempt = 0; attempt < 100; attempt++) {
        snprintf(f->tmp_path, cap, "%.*s.%s.tmp%ld.%u", (int)dirlen, path, base,
                 (long)getpid(), atomic_fetch_add(&g_counter, 1));
        f->fd = open(f->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (f->fd >= 0) return 0;
        if (errno != EEXIST) break;
    }
    int e = errno;
    free(f->tmp_path);
    f->tmp_path = NULL;   /* nothing was created: abort must not unlink */
    ml_atomic_abort(f);
    return ml_error("cannot write '%s': cannot create a temporary file in its directory: %s",
                    path, strerror(e));
}

int ml_atomic_write(ml_atomic_file *f, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        size_t chunk = n > (1u << 30) ? (1u << 30) : n;
        ssize_t w = write(f->fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR) continue;
            return ml_error("writing '%s' failed: %s", f->path, strerror(errno));
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int ml_atomic_commit(ml_atomic_file *f) {
    if (fsync(f->fd) != 0) {
        ml_error("writing '%s' failed (fsync): %s", f->path, strerror(errno));
        ml_atomic_abort(f);
        return -1;
    }
    int rc = close(f->fd);
    f->fd = -1;
    if (rc != 0) {
        ml_error("writing '%s' failed (close): %s", f->path, strerror(errno));
        ml_atomic_abort(f);
        return -1;
    }
    if (rename(f->tmp_path, f->path) != 0) {
        ml_error("cannot replace '%s': %s", f->path, strerror(errno));
        ml_atomic_abort(f);
        return -1;
    }
    /* The rename itself is durable only once the directory is synced;
     * filesystems that refuse fsync on directories still did the rename. */
    char *dir = dir_of(f->path);
    if (dir) {
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            fsync(dfd);
            close(dfd);
        }
        free(dir);
    }
    free(f->tmp_path);
    f->tmp_path = NULL;
    free(f->path);
    f->path = NULL;
    return 0;
}

void ml_atomic_abort(ml_atomic_file *f) {
    if (f->fd >= 0) close(f->fd);
    f->fd = -1;
    if (f->tmp_path) unlink(f->tmp_path);
    free(f->tmp_path);
    f->tmp_path = NULL;
    free(f->path);
    f->path = NULL;
}

int ml_write_file_atomic(const char *path, const void *buf, size_t n) {
    ml_atomic_file f;
    if (ml_atomic_open(&f, path) < 0) return -1;
    if (ml_atomic_write(&f, buf, n) < 0) {
        ml_atomic_abort(&f);
        return -1;
    }
    return ml_atomic_commit(&f);
}
