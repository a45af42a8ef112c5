/* atomic_file.c — temp file + fsync + rename, and folder saves made of
 * many files committed together (see atomic_file.h). */
#include "atomic_file.h"
#include "error.h"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static atomic_uint g_counter;

/* ---- who owns a temporary ----------------------------------------------- */

/* Temporaries carry "<host>.<pid>.<counter>": one left by a process of this
 * host that no longer runs is stale (its writer was killed) and is removed
 * by the next save into the same place.  A reused pid only delays that;
 * another host's temporaries on a shared filesystem are never touched. */
static const char *host_name(void) {
    static char name[65];
    if (!name[0]) {
        char buf[256];
        if (gethostname(buf, sizeof buf) != 0) snprintf(buf, sizeof buf, "localhost");
        buf[sizeof buf - 1] = 0;
        size_t k = 0;
        for (const char *c = buf; *c && k < sizeof name - 1; c++)
            name[k++] = (*c == '/' || *c == '.') ? '-' : *c;
        name[k] = 0;
        if (!k) snprintf(name, sizeof name, "localhost");
    }
    return name;
}

/* tag is "<host>.<pid>.<counter>" (what follows a temporary's prefix): true
 * when it names a process of this host that has exited. */
static int tag_is_stale(const char *tag) {
    const char *host = host_name();
    size_t hl = strlen(host);
    if (strncmp(tag, host, hl) != 0 || tag[hl] != '.') return 0;
    char *end;
    long pid = strtol(tag + hl + 1, &end, 10);
    if (pid <= 0 || *end != '.' || pid == (long)getpid()) return 0;
    return kill((pid_t)pid, 0) != 0 && errno == ESRCH;
}

static char *join2(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 2;
    char *s = malloc(n);
    if (s) snprintf(s, n, "%s/%s", a, b);
    return s;
}

/* `rm -r` that never follows links; 0 when path is gone. */
static int remove_tree(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) return errno == ENOENT ? 0 : -1;
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        if (!d) return -1;
        for (struct dirent *e; (e = readdir(d));) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            char *c = join2(path, e->d_name);
            if (c) remove_tree(c);
            free(c);
        }
        closedir(d);
        return rmdir(path);
    }
    return unlink(path);
}

static void fsync_path(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);   /* filesystems that refuse fsync on folders still keep the entries */
        close(fd);
    }
}

/* Remove the entries of dir named <prefix><tag><suffix> whose tag is stale. */
static void remove_stale(const char *dir, const char *prefix, const char *suffix) {
    DIR *d = opendir(dir);
    if (!d) return;
    size_t pl = strlen(prefix), sl = strlen(suffix);
    for (struct dirent *e; (e = readdir(d));) {
        size_t n = strlen(e->d_name);
        if (n <= pl + sl || strncmp(e->d_name, prefix, pl) != 0 ||
            strcmp(e->d_name + n - sl, suffix) != 0)
            continue;
        char tag[320];
        if (n - pl - sl >= sizeof tag) continue;
        memcpy(tag, e->d_name + pl, n - pl - sl);
        tag[n - pl - sl] = 0;
        if (!tag_is_stale(tag)) continue;
        char *p = join2(dir, e->d_name);
        if (p) remove_tree(p);
        free(p);
    }
    closedir(d);
}

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
    size_t cap = strlen(path) + strlen(host_name()) + 64;
    f->path = strdup(path);
    f->tmp_path = malloc(cap);
    if (!f->path || !f->tmp_path) {
        ml_atomic_abort(f);
        return ml_error("out of memory writing '%s'", path);
    }
    /* A hidden name next to the target: same filesystem, so rename is atomic;
     * O_EXCL so two writers never share a temporary. */
    char *dir = dir_of(path), *prefix = malloc(strlen(base) + 8);
    if (dir && prefix) {
        snprintf(prefix, strlen(base) + 8, ".%s.tmp.", base);
        remove_stale(dir, prefix, "");
    }
    free(dir);
    free(prefix);
    for (int attempt = 0; attempt < 100; attempt++) {
        snprintf(f->tmp_path, cap, "%.*s.%s.tmp.%s.%ld.%u", (int)dirlen, path, base, host_name(),
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

/* ---- folder saves ------------------------------------------------------- */

#define SAVE_PREFIX ".moonlit-save."
#define SAVE_SUFFIX ".tmp"
#define SAVE_PENDING ".moonlit-save.commit"
#define SAVE_OLD ".moonlit-save.old"

/* Move dir/rel aside into old/rel (removing an earlier copy there). */
static int move_aside(const char *dir_path, const char *old, const char *rel) {
    char *src = join2(dir_path, rel), *dst = join2(old, rel);
    int rc = -1;
    if (!src || !dst) {
        ml_error("out of memory saving into '%s'", dir_path);
        goto done;
    }
    if (mkdir(old, 0777) != 0 && errno != EEXIST) {
        ml_error("cannot save into '%s': cannot create '%s': %s", dir_path, old, strerror(errno));
        goto done;
    }
    /* The parent folders of dst, one level at a time. */
    for (char *c = dst + strlen(old) + 1; (c = strchr(c, '/')); c++) {
        *c = 0;
        int e = mkdir(dst, 0777) == 0 ? 0 : errno;
        *c = '/';
        if (e && e != EEXIST) {
            ml_error("cannot save into '%s': cannot create '%s': %s", dir_path, old, strerror(e));
            goto done;
        }
    }
    remove_tree(dst);
    if (rename(src, dst) != 0) {
        ml_error("cannot save into '%s': cannot move the old '%s' aside: %s", dir_path, rel,
                 strerror(errno));
        goto done;
    }
    rc = 0;
done:
    free(src);
    free(dst);
    return rc;
}

/* Move every file under pending/rel into dir/rel, the old one aside first.
 * Idempotent: a file already moved is no longer in pending. */
static int roll_forward(const char *dir_path, const char *pending, const char *old,
                        const char *rel, int depth) {
    if (depth > 32) return ml_error("cannot save into '%s': folders nested too deep", dir_path);
    char *from = rel[0] ? join2(pending, rel) : strdup(pending);
    if (!from) return ml_error("out of memory saving into '%s'", dir_path);
    DIR *d = opendir(from);
    if (!d) {
        ml_error("cannot finish the save into '%s': cannot read '%s': %s", dir_path, from,
                 strerror(errno));
        free(from);
        return -1;
    }
    int rc = 0;
    for (struct dirent *e; rc == 0 && (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *r = rel[0] ? join2(rel, e->d_name) : strdup(e->d_name);
        char *src = join2(from, e->d_name), *dst = r ? join2(dir_path, r) : NULL;
        struct stat ss, ds;
        if (!r || !src || !dst) rc = ml_error("out of memory saving into '%s'", dir_path);
        else if (lstat(src, &ss) != 0)
            rc = ml_error("cannot finish the save into '%s': '%s': %s", dir_path, src, strerror(errno));
        else if (S_ISDIR(ss.st_mode)) {
            /* A folder is merged, not replaced: files of the old one that
             * this save does not write (another variant, notes) stay. */
            int have = lstat(dst, &ds) == 0;
            if (have && !S_ISDIR(ds.st_mode)) rc = move_aside(dir_path, old, r), have = 0;
            if (rc == 0 && !have && mkdir(dst, 0777) != 0 && errno != EEXIST)
                rc = ml_error("cannot save into '%s': cannot create '%s': %s", dir_path, dst,
                              strerror(errno));
            if (rc == 0) rc = roll_forward(dir_path, pending, old, r, depth + 1);
            if (rc == 0) fsync_path(dst);
        } else {
            if (lstat(dst, &ds) == 0) rc = move_aside(dir_path, old, r);
            if (rc == 0 && rename(src, dst) != 0)
                rc = ml_error("cannot save into '%s': cannot move '%s' in: %s", dir_path, r,
                              strerror(errno));
        }
        free(r);
        free(src);
        free(dst);
    }
    closedir(d);
    free(from);
    return rc;
}

int ml_atomic_dir_recover(const char *dir_path) {
    char *pending = join2(dir_path, SAVE_PENDING), *old = join2(dir_path, SAVE_OLD);
    int rc = 0;
    if (!pending || !old) {
        rc = ml_error("out of memory reading '%s'", dir_path);
        goto done;
    }
    struct stat st;
    if (lstat(pending, &st) == 0) {
        if (roll_forward(dir_path, pending, old, "", 0) < 0) {
            char why[1024];
            snprintf(why, sizeof why, "%s", ml_last_error());
            rc = ml_error("'%s' holds a save that was interrupted after it was complete; "
                          "finishing it failed: %s", dir_path, why);
            goto done;
        }
        fsync_path(dir_path);
        /* Only empty folders are left in pending; the new files are all in. */
        remove_tree(pending);
        rc = 1;
    }
    /* The old files of a finished save (also left when a kill came during
     * this cleanup). */
    remove_tree(old);
    fsync_path(dir_path);
done:
    free(pending);
    free(old);
    return rc;
}

char *ml_atomic_dir_begin(const char *dir_path) {
    if (!dir_path || !*dir_path) return ml_error_null("cannot save into a folder with an empty name");
    struct stat st;
    if (stat(dir_path, &st) != 0 || !S_ISDIR(st.st_mode))
        return ml_error_null("cannot save into '%s': not a folder", dir_path);
    if (ml_atomic_dir_recover(dir_path) < 0) return NULL;
    remove_stale(dir_path, SAVE_PREFIX, SAVE_SUFFIX);
    size_t cap = strlen(dir_path) + strlen(host_name()) + 80;
    char *staging = malloc(cap);
    if (!staging) return ml_error_null("out of memory saving into '%s'", dir_path);
    for (int attempt = 0; attempt < 100; attempt++) {
        snprintf(staging, cap, "%s/" SAVE_PREFIX "%s.%ld.%u" SAVE_SUFFIX, dir_path, host_name(),
                 (long)getpid(), atomic_fetch_add(&g_counter, 1));
        if (mkdir(staging, 0777) == 0) return staging;
        if (errno != EEXIST) break;
    }
    int e = errno;
    free(staging);
    return ml_error_null("cannot save into '%s': cannot create a staging folder in it: %s",
                         dir_path, strerror(e));
}

/* staging must be a folder ml_atomic_dir_begin made in dir_path. */
static int check_staging(const char *dir_path, const char *staging) {
    size_t n = strlen(dir_path);
    const char *base = staging + n + 1;
    if (strncmp(staging, dir_path, n) != 0 || staging[n] != '/' ||
        strncmp(base, SAVE_PREFIX, strlen(SAVE_PREFIX)) != 0 || strchr(base, '/') ||
        strlen(base) <= strlen(SAVE_SUFFIX) ||
        strcmp(base + strlen(base) - strlen(SAVE_SUFFIX), SAVE_SUFFIX) != 0)
        return ml_error("'%s' is not a staging folder of a save into '%s'", staging, dir_path);
    return 0;
}

int ml_atomic_dir_commit(const char *dir_path, const char *staging) {
    if (!dir_path || !staging) return ml_error("folder save: missing folder name");
    if (check_staging(dir_path, staging) < 0) return -1;
    char *pending = join2(dir_path, SAVE_PENDING);
    if (!pending) return ml_error("out of memory saving into '%s'", dir_path);
    /* Every file in staging was fsynced when written; its folders are too,
     * before the one rename that makes the whole save count. */
    fsync_path(staging);
    int rc = 0;
    if (rename(staging, pending) != 0) {
        int e = errno;
        rc = ml_error("cannot save into '%s': %s", dir_path,
                      e == EEXIST || e == ENOTEMPTY ? "another save into it is being committed"
                                                    : strerror(e));
        ml_atomic_dir_abort(staging);
    } else {
        fsync_path(dir_path);
        rc = ml_atomic_dir_recover(dir_path) < 0 ? -1 : 0;
    }
    free(pending);
    return rc;
}

void ml_atomic_dir_abort(const char *staging) {
    if (staging) remove_tree(staging);
}
