/* launcher.c — process plumbing of the data-parallel launcher (see
 * launcher.h).  Workers are started with fork + execve rather than
 * posix_spawn because the child must ask for PR_SET_PDEATHSIG before exec;
 * everything the child touches between fork and exec (argv, the merged
 * environment) is built before fork, so the child calls only
 * async-signal-safe functions even though the parent has threads (BLAS,
 * data loaders).  All pipe ends are O_CLOEXEC, so a worker never holds
 * another worker's pipe open (that would hide its end-of-file). */
#include "launcher.h"
#include "checked_math.h"
#include "error.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

extern char **environ;

/* Length of the "KEY" part of "KEY=VALUE" (the whole string without '='). */
static size_t key_len(const char *kv) {
    const char *eq = strchr(kv, '=');
    return eq ? (size_t)(eq - kv) : strlen(kv);
}

static bool overridden(const char *kv, const char *const set_env[], size_t n) {
    size_t k = key_len(kv);
    for (size_t i = 0; i < n; i++)
        if (key_len(set_env[i]) == k && strncmp(kv, set_env[i], k) == 0) return true;
    return false;
}

/* environ minus the overridden keys, plus set_env; NULL-terminated. */
static char **merged_env(const char *const set_env[], size_t n) {
    size_t have = 0;
    while (environ && environ[have]) have++;
    size_t total, bytes;
    if (!ml_add_size(have, n, &total) || !ml_add_size(total, 1, &total) ||
        !ml_mul_size(total, sizeof(char *), &bytes))
        return ml_error_null("spawn: environment too large");
    char **env = malloc(bytes);
    if (!env) return ml_error_null("spawn: out of memory");
    size_t k = 0;
    for (size_t i = 0; i < have; i++)
        if (!overridden(environ[i], set_env, n)) env[k++] = environ[i];
    for (size_t i = 0; i < n; i++) env[k++] = (char *)set_env[i];
    env[k] = NULL;
    return env;
}

int ml_spawn(const char *path, char *const argv[], const char *const set_env[], size_t n, ml_child *out) {
    for (size_t i = 0; i < n; i++)
        if (!strchr(set_env[i], '=')) return ml_error("spawn: environment entry '%s' is not KEY=VALUE", set_env[i]);
    char **env = merged_env(set_env, n);
    if (!env) return -1;
    int po[2], pe[2];
    if (pipe2(po, O_CLOEXEC) < 0) { free(env); return ml_error("spawn: pipe: %s", strerror(errno)); }
    if (pipe2(pe, O_CLOEXEC) < 0) {
        int e = errno;
        close(po[0]); close(po[1]); free(env);
        return ml_error("spawn: pipe: %s", strerror(e));
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(po[0]); close(po[1]); close(pe[0]); close(pe[1]); free(env);
        return ml_error("spawn: fork: %s", strerror(e));
    }
    if (pid == 0) {
#ifdef __linux__
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent) _exit(127); /* the launcher died before prctl */
#endif
        (void)parent;
        if (dup2(po[1], 1) < 0 || dup2(pe[1], 2) < 0) _exit(127);
        execve(path, argv, env);
        static const char msg[] = "spawn: execve failed\n";
        ssize_t w = write(2, msg, sizeof msg - 1);
        (void)w;
        _exit(127);
    }
    free(env);
    close(po[1]);
    close(pe[1]);
    out->pid = pid;
    out->out_fd = po[0];
    out->err_fd = pe[0];
    return 0;
}

int ml_poll_readable(const int *fds, int n, int timeout_ms, unsigned char *ready) {
    if (n < 0 || n > 4096) return ml_error("poll: %d descriptors (at most 4096)", n);
    struct pollfd *pf = calloc(n > 0 ? (size_t)n : 1, sizeof *pf);
    if (!pf) return ml_error("poll: out of memory");
    for (int i = 0; i < n; i++) { pf[i].fd = fds[i]; pf[i].events = POLLIN; ready[i] = 0; }
    int rc = poll(pf, (nfds_t)n, timeout_ms);
    int e = errno;
    int k = 0;
    for (int i = 0; rc > 0 && i < n; i++)
        if (pf[i].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL)) { ready[i] = 1; k++; }
    free(pf);
    if (rc < 0 && e != EINTR) return ml_error("poll: %s", strerror(e));
    return k;
}

int ml_try_wait(pid_t pid, int *code, int *signo) {
    int st;
    pid_t r;
    do r = waitpid(pid, &st, WNOHANG); while (r < 0 && errno == EINTR);
    if (r < 0) return ml_error("wait: pid %d: %s", (int)pid, strerror(errno));
    if (r == 0) return 0;
    *code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    *signo = WIFSIGNALED(st) ? WTERMSIG(st) : 0;
    return 1;
}

static const struct { int no; const char *name; } SIGNALS[] = {
    {SIGHUP, "SIGHUP"}, {SIGINT, "SIGINT"}, {SIGQUIT, "SIGQUIT"}, {SIGILL, "SIGILL"}, {SIGTRAP, "SIGTRAP"},
    {SIGABRT, "SIGABRT"}, {SIGBUS, "SIGBUS"}, {SIGFPE, "SIGFPE"}, {SIGKILL, "SIGKILL"}, {SIGUSR1, "SIGUSR1"},
    {SIGSEGV, "SIGSEGV"}, {SIGUSR2, "SIGUSR2"}, {SIGPIPE, "SIGPIPE"}, {SIGALRM, "SIGALRM"}, {SIGTERM, "SIGTERM"},
    {SIGCONT, "SIGCONT"}, {SIGSTOP, "SIGSTOP"}, {SIGXCPU, "SIGXCPU"}, {SIGXFSZ, "SIGXFSZ"},
};

const char *ml_signal_name(int signo) {
    for (size_t i = 0; i < sizeof SIGNALS / sizeof SIGNALS[0]; i++)
        if (SIGNALS[i].no == signo) return SIGNALS[i].name;
    return NULL;
}

int ml_signal_number(const char *name) {
    for (size_t i = 0; i < sizeof SIGNALS / sizeof SIGNALS[0]; i++)
        if (strcmp(SIGNALS[i].name, name) == 0) return SIGNALS[i].no;
    return -1;
}

int ml_free_tcp_port(void) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return ml_error("free port: socket: %s", strerror(errno));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || getsockname(s, (struct sockaddr *)&a, &len) < 0) {
        int e = errno;
        close(s);
        return ml_error("free port: %s", strerror(e));
    }
    close(s);
    return ntohs(a.sin_port);
}

static volatile sig_atomic_t g_caught;

static void on_stop_signal(int signo) { g_caught = signo; }

void ml_trap_stop_signals(bool on) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = on ? on_stop_signal : SIG_DFL;
    g_caught = 0;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

int ml_stop_signal_caught(void) { return g_caught; }

int ml_self_exe(char *buf, size_t n) {
    if (n < 2) return -1;
    ssize_t k = readlink("/proc/self/exe", buf, n - 1);
    if (k <= 0) return -1;
    buf[k] = 0;
    return 0;
}
