/* fs.c — mkdir -p, file tests, atomic copy, directory listing. */
#include "fs.h"
#include "error.h"
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int ml_mkdir_p(const char *path) {
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) return ml_error("mkdir: bad path '%s'", path);
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] == '/' || buf[i] == 0) {
            char c = buf[i];
            buf[i] = 0;
            if (mkdir(buf, 0777) != 0 && errno != EEXIST)
                return ml_error("cannot create folder '%s': %s", buf, strerror(errno));
            buf[i] = c;
        }
    }
    if (!ml_is_dir(path)) return ml_error("'%s' exists and is not a folder", path);
    return 0;
}

bool ml_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

bool ml_is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

int ml_require_regular_file(const char *path, const char *what) {
    struct stat st;
    if (!path || !*path) return ml_error("%s '': empty file name", what);
    if (stat(path, &st) != 0) return ml_error("%s '%s': cannot open: %s", what, path, strerror(errno));
    if (S_ISREG(st.st_mode)) return 0;
    const char *kind = S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO (named pipe)"
                     : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device"
                     : S_ISSOCK(st.st_mode) ? "a socket" : "a special file";
    return ml_error("%s '%s': it is %s, not a regular file", what, path, kind);
}

int ml_copy_file(const char *src, const char *dst) {
    FILE *in = fopen(src, "rb");
    if (!in) return ml_error("cannot read '%s': %s", src, strerror(errno));
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", dst, (int)getpid());
    FILE *out = fopen(tmp, "wb");
    if (!out) { fclose(in); return ml_error("cannot write '%s': %s", dst, strerror(errno)); }
    char buf[1 << 16];
    size_t k;
    int rc = 0;
    while ((k = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, k, out) != k) { rc = ml_error("write error on '%s': %s", dst, strerror(errno)); break; }
    if (ferror(in)) rc = ml_error("read error on '%s'", src);
    fclose(in);
    if (fclose(out) != 0 && rc == 0) rc = ml_error("write error on '%s': %s", dst, strerror(errno));
    if (rc == 0 && rename(tmp, dst) != 0) rc = ml_error("cannot rename to '%s': %s", dst, strerror(errno));
    if (rc != 0) unlink(tmp);
    return rc;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

char **ml_list_dir(const char *path, int *n) {
    DIR *d = opendir(path);
    if (!d) return ml_error_null("cannot list folder '%s': %s", path, strerror(errno));
    int cap = 16, cnt = 0;
    char **out = malloc(cap * sizeof *out);
    struct dirent *e;
    while (out && (e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if (cnt + 1 >= cap) {
            char **no = realloc(out, (cap *= 2) * sizeof *out);
            if (!no) { ml_free_list(out); out = NULL; break; }
            out = no;
        }
        out[cnt++] = strdup(e->d_name);
        out[cnt] = NULL;
    }
    closedir(d);
    if (!out) return ml_error_null("out of memory listing '%s'", path);
    out[cnt] = NULL;
    qsort(out, cnt, sizeof *out, cmp_str);
    if (n) *n = cnt;
    return out;
}

void ml_free_list(char **list) {
    if (!list) return;
    for (char **p = list; *p; p++) free(*p);
    free(list);
}
