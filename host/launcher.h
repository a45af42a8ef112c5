/* launcher.h — what the data-parallel launcher needs from the OS: start a
 * worker process with its stdout/stderr on pipes, wait for output on many
 * pipes at once, reap and signal workers, pick a free TCP port, and turn
 * SIGINT/SIGTERM into a flag the launcher's loop polls.  POSIX only; no
 * Lua here (bindings/lua_launcher.c is the glue). */
#ifndef ML_LAUNCHER_H
#define ML_LAUNCHER_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

typedef struct {
    pid_t pid;
    int out_fd; /* read end of the worker's stdout */
    int err_fd; /* read end of the worker's stderr */
} ml_child;

/* Starts `path` with argv (NULL-terminated) and this process's environment
 * with the n "KEY=VALUE" entries of set_env added or replacing the same
 * keys.  The child dies with SIGTERM if the launcher dies first (Linux), so
 * a killed launcher leaves no orphans.  -1 with ml_error on failure. */
int ml_spawn(const char *path, char *const argv[], const char *const set_env[], size_t n, ml_child *out);

/* Waits up to timeout_ms for any of fds to be readable or closed; ready[i]
 * is set to 1 for those.  Returns how many are ready (0 on timeout or when
 * a signal interrupted the wait), -1 with ml_error on failure. */
int ml_poll_readable(const int *fds, int n, int timeout_ms, unsigned char *ready);

/* Non-blocking reap.  Returns 0 while pid runs; 1 when it ended, with
 * *signo 0 and *code its exit status, or *signo the signal that killed it;
 * -1 with ml_error (e.g. not our child). */
int ml_try_wait(pid_t pid, int *code, int *signo);

/* "SIGKILL", "SIGSEGV", ... or NULL for a number this file does not name. */
const char *ml_signal_name(int signo);
/* The number of a name ml_signal_name returns, or -1. */
int ml_signal_number(const char *name);

/* A TCP port on 127.0.0.1 nobody listens on now (bind to port 0), or -1. */
int ml_free_tcp_port(void);

/* on: SIGINT and SIGTERM set a flag instead of ending the process (the
 * launcher then stops its workers itself); off: default behaviour back. */
void ml_trap_stop_signals(bool on);
/* The signal caught since the trap was set (0: none). */
int ml_stop_signal_caught(void);

/* The running executable's path (Linux /proc/self/exe); -1 if unknown. */
int ml_self_exe(char *buf, size_t n);

#endif
