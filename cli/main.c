/* main.c — the moonlit executable: command-line options, the script runner
 * and the interactive prompt (REPL).
 *
 * This is the embedder, which is why it lives in cli/ and not in host/
 * (host/ includes no Lua header; bindings/ is the Lua glue): it creates the
 * Lua state, registers the `moonlit.core` C module, points package.path at
 * the bundled Lua library and runs what the command line asks for.  Every
 * chunk runs under lua_pcall with a traceback handler, so an
 * error is reported and the REPL goes on, and Ctrl-C while a chunk runs stops
 * it with an "interrupted!" error instead of killing the process.
 * docs/cli.md is the user's description of all of this. */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <unistd.h>

#include <readline/readline.h>
#include <readline/history.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "bindings/mlua.h"
#include "version.h"

#define PROGNAME "moonlit"
#define PROMPT1 "> "
#define PROMPT2 ">> "
#define HISTORY_FILE ".moonlit_history"
#define HISTORY_MAX 1000
/* The REPL's chunk name: errors read "stdin:1: ...". */
#define REPL_CHUNKNAME "=stdin"
/* How the compiler ends a syntax error caused by input that stops early; such
 * a chunk is incomplete, so the REPL reads another line. */
#define EOF_MARK "<eof>"

#ifdef ML_WITH_CUDA
#define BUILD_KIND "CUDA"
#else
#define BUILD_KIND "CPU only, built without CUDA"
#endif
#define VERSION_LINE PROGNAME " " ML_VERSION " (" LUA_RELEASE ", " BUILD_KIND ")"

/* ---- Ctrl-C --------------------------------------------------------------
 *
 * A signal handler may not touch a running Lua state except through
 * lua_sethook, so Ctrl-C during a chunk installs a hook that raises
 * "interrupted!" at the next call, return or instruction.  The handler is
 * one-shot (SA_RESETHAND): a second Ctrl-C kills the process, the way out of
 * a long C call that never reaches the hook.  At the REPL's prompt Ctrl-C
 * only sets a flag, which the line reader turns into "discard this input".
 * Outside chunks and the REPL, Ctrl-C keeps its default action. */

static lua_State *volatile running_state;
static volatile sig_atomic_t prompt_interrupted;
/* sigaction flags of the prompt handler while a REPL is active, -1 if none:
 * the terminal reader wants pselect interrupted (0), the pipe reader wants
 * its read restarted (SA_RESTART) since it ignores Ctrl-C. */
static int repl_sigint_flags = -1;

static void stop_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    luaL_error(L, "interrupted!");
}

static void on_sigint_running(int sig)
{
    (void)sig;
    lua_sethook(running_state, stop_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

static void on_sigint_prompt(int sig)
{
    (void)sig;
    prompt_interrupted = 1;
}

static void set_sigint(void (*handler)(int), int flags)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
}

/* The handler for when no chunk runs. */
static void set_sigint_at_rest(void)
{
    if (repl_sigint_flags >= 0)
        set_sigint(on_sigint_prompt, repl_sigint_flags);
    else
        set_sigint(SIG_DFL, 0);
}

/* ---- running chunks ------------------------------------------------------ */

/* Message handler: turn the error into a string and append a traceback. */
static int traceback_handler(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
            msg = lua_tostring(L, -1);
        else
            msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/* Call the function below the nargs arguments on the top of the stack, with
 * the traceback handler and Ctrl-C turned into an error. */
static int docall(lua_State *L, int nargs, int nresults)
{
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, traceback_handler);
    lua_insert(L, base);
    running_state = L;
    set_sigint(on_sigint_running, SA_RESETHAND | SA_RESTART);
    int status = lua_pcall(L, nargs, nresults, base);
    set_sigint_at_rest();
    /* A Ctrl-C that came as the chunk ended leaves its hook behind; drop it
     * (after the handler is back at rest, so it cannot be set again) or the
     * next chunk would stop at once. */
    if (lua_gethook(L) == stop_hook)
        lua_sethook(L, NULL, 0, 0);
    lua_remove(L, base);
    return status;
}

/* Print the error message on the top of the stack to stderr and pop it. */
static void report_error(lua_State *L, int with_progname)
{
    const char *msg = lua_tostring(L, -1);
    if (msg == NULL)
        msg = "(error object is not a string)";
    fflush(stdout);
    fprintf(stderr, "%s%s\n", with_progname ? PROGNAME ": " : "", msg);
    fflush(stderr);
    lua_pop(L, 1);
}

/* ---- module search path ------------------------------------------------- */

/* The bundled Lua library: lua/ beside the folder of the executable (the
 * binary is build/moonlit), found through /proc/self/exe so it does not
 * depend on the working directory.  out has PATH_MAX bytes. */
static int bundled_lua_dir(char *out)
{
    char exe[PATH_MAX], candidate[PATH_MAX + 8];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0)
        return -1;
    exe[len] = '\0';
    char *slash = strrchr(exe, '/');
    if (slash == NULL)
        return -1;
    *slash = '\0';
    snprintf(candidate, sizeof candidate, "%s/../lua", exe);
    return realpath(candidate, out) ? 0 : -1;
}

/* Add the search templates of one directory: dir/?.lua and dir/?/init.lua
 * (Lua modules) or dir/?.so (C modules).  An entry that already holds a '?'
 * is a template and goes, as it is, to the list its ending names: ".so" to
 * the C modules', anything else to the Lua modules'. */
static void add_search_dir(luaL_Buffer *b, const char *dir, size_t len, bool c_modules)
{
    if (memchr(dir, '?', len)) {
        bool so = len >= 3 && memcmp(dir + len - 3, ".so", 3) == 0;
        if (so == c_modules) {
            luaL_addlstring(b, dir, len);
            luaL_addchar(b, ';');
        }
        return;
    }
    while (len > 1 && dir[len - 1] == '/')
        len--;
    if (c_modules) {
        luaL_addlstring(b, dir, len);
        luaL_addstring(b, "/?.so;");
        return;
    }
    luaL_addlstring(b, dir, len);
    luaL_addstring(b, "/?.lua;");
    luaL_addlstring(b, dir, len);
    luaL_addstring(b, "/?/init.lua;");
}

/* Prefix package[field] with the MOONLIT_PATH entries (and, for Lua
 * modules, the bundled lua/), keeping Lua's own entries after them. */
static void prefix_search_path(lua_State *L, const char *field, bool c_modules)
{
    lua_getfield(L, -1, field);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    const char *env = getenv("MOONLIT_PATH");
    while (env && *env) {
        size_t len = strcspn(env, ";");
        if (len > 0)
            add_search_dir(&b, env, len, c_modules);
        env += len;
        if (*env == ';')
            env++;
    }
    char dir[PATH_MAX];
    if (!c_modules && bundled_lua_dir(dir) == 0)
        add_search_dir(&b, dir, strlen(dir), false);
    luaL_pushresult(&b);          /* package, old path, prefix */
    lua_insert(L, -2);
    lua_concat(L, 2);
    lua_setfield(L, -2, field);
}

/* package.path = MOONLIT_PATH entries, then the bundled lua/, then Lua's
 * own entries (LUA_PATH or the default, which ends with ./?.lua).
 * package.cpath = dir/?.so of each MOONLIT_PATH directory, then Lua's own
 * (LUA_CPATH or the default: /usr/local/lib/lua/5.4/?.so, where LuaRocks
 * installs, and the system's).  C modules link against the Lua API this
 * binary exports (see the Makefile), not against a shared liblua. */
static void setup_package_path(lua_State *L)
{
    lua_getglobal(L, "package");
    prefix_search_path(L, "path", false);
    prefix_search_path(L, "cpath", true);
    lua_pop(L, 1);
}

/* require "moonlit.core" opens the C module linked into this binary. */
static void preload_core(lua_State *L)
{
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
    lua_pushcfunction(L, luaopen_moonlit_core);
    lua_setfield(L, -2, "moonlit.core");
    lua_pop(L, 1);
}

/* ---- REPL input ----------------------------------------------------------
 *
 * From a terminal, lines come from GNU readline through its callback
 * interface: our own pselect loop sees Ctrl-C (EINTR) and can abandon the
 * line, which readline's blocking call would not let us do.  From a pipe,
 * lines are read plainly and no prompt is shown, so piped sessions print
 * only what the chunks print. */

enum { LINE_OK, LINE_EOF, LINE_CANCELLED };

static char *tty_line;
static int tty_line_done;

static void on_tty_line(char *line)
{
    tty_line = line;
    tty_line_done = 1;
    /* Give the terminal back before the chunk runs and prints. */
    rl_callback_handler_remove();
}

static int read_line_tty(lua_State *L, const char *prompt)
{
    /* SIGINT stays blocked except inside pselect, so a Ctrl-C cannot slip
     * between the flag test and the wait. */
    sigset_t block, oldmask, waitmask;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &oldmask);
    waitmask = oldmask;
    sigdelset(&waitmask, SIGINT);

    prompt_interrupted = 0;
    tty_line = NULL;
    tty_line_done = 0;
    rl_callback_handler_install(prompt, on_tty_line);
    int failed = 0;
    while (!tty_line_done && !prompt_interrupted) {
        fd_set fds;
        FD_ZERO(&fds);
        FD_SET(STDIN_FILENO, &fds);
        int n = pselect(STDIN_FILENO + 1, &fds, NULL, NULL, NULL, &waitmask);
        if (n > 0)
            rl_callback_read_char();
        else if (n < 0 && errno != EINTR) {
            failed = 1;
            break;
        }
    }
    int result;
    if (tty_line_done) {
        if (tty_line) {
            lua_pushstring(L, tty_line);
            free(tty_line);
            result = LINE_OK;
        } else {
            result = LINE_EOF;     /* Ctrl-D; readline has ended the line */
        }
    } else {
        rl_free_line_state();
        rl_callback_sigcleanup();
        rl_callback_handler_remove();
        fputc('\n', stdout);
        result = failed ? LINE_EOF : LINE_CANCELLED;
    }
    sigprocmask(SIG_SETMASK, &oldmask, NULL);
    return result;
}

static int read_line_pipe(lua_State *L)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t n = getline(&line, &cap, stdin);
    if (n < 0) {
        free(line);
        return LINE_EOF;
    }
    if (n > 0 && line[n - 1] == '\n')
        n--;
    lua_pushlstring(L, line, (size_t)n);
    free(line);
    return LINE_OK;
}

/* Push the next line (without its newline) and return LINE_OK, or return
 * LINE_EOF / LINE_CANCELLED pushing nothing. */
static int read_line(lua_State *L, int tty, const char *prompt)
{
    return tty ? read_line_tty(L, prompt) : read_line_pipe(L);
}

/* ~/.moonlit_history, "" when HOME is unset. */
static char history_path[PATH_MAX];

/* Add a chunk typed at the terminal to the history, and save it at once so
 * a session that ends in os.exit or a crash keeps it. */
static void remember(const char *chunk)
{
    if (chunk[strspn(chunk, " \t")] == '\0')
        return;
    add_history(chunk);
    /* append_history does not create the file; write_history does.  A
     * history that cannot be saved is not worth an error. */
    if (history_path[0] && append_history(1, history_path) != 0)
        write_history(history_path);
}

/* ---- REPL ----------------------------------------------------------------- */

enum { CHUNK_EOF = -1, CHUNK_CANCELLED = -2 };

static int incomplete(lua_State *L, int status)
{
    if (status != LUA_ERRSYNTAX)
        return 0;
    size_t len, mark = sizeof EOF_MARK - 1;
    const char *msg = lua_tolstring(L, -1, &len);
    return len >= mark && strcmp(msg + len - mark, EOF_MARK) == 0;
}

/* Read and compile one chunk: its first line is tried as `return <line>`
 * so that expressions print their value, else compiled as statements, with
 * more lines read while the compiler stops at <eof>.  Leaves the function
 * (LUA_OK) or the syntax error on the stack and returns the status, or
 * returns CHUNK_EOF / CHUNK_CANCELLED leaving nothing. */
static int load_chunk(lua_State *L, int tty)
{
    int got = read_line(L, tty, PROMPT1);
    if (got != LINE_OK)
        return got == LINE_EOF ? CHUNK_EOF : CHUNK_CANCELLED;

    const char *expr = lua_pushfstring(L, "return %s", lua_tostring(L, -1));
    int status = luaL_loadbuffer(L, expr, strlen(expr), REPL_CHUNKNAME);
    lua_remove(L, -2);                         /* line, function or error */
    if (status != LUA_OK) {
        lua_pop(L, 1);
        for (;;) {
            size_t len;
            const char *code = lua_tolstring(L, -1, &len);
            status = luaL_loadbuffer(L, code, len, REPL_CHUNKNAME);
            if (!incomplete(L, status))
                break;
            got = read_line(L, tty, PROMPT2);  /* code, error, line */
            if (got == LINE_CANCELLED) {
                lua_pop(L, 2);
                return CHUNK_CANCELLED;
            }
            if (got == LINE_EOF)
                break;                         /* report the incomplete chunk */
            lua_remove(L, -2);
            lua_pushliteral(L, "\n");
            lua_insert(L, -2);
            lua_concat(L, 3);
        }
    }
    if (tty)
        remember(lua_tostring(L, -2));
    lua_remove(L, -2);
    return status;
}

/* Run the compiled chunk on the top of the stack; print what it returns
 * with ml.repl_print when the library provides it (tables shown by value),
 * else the global print (tensors show through their __tostring). */
static int run_and_print(lua_State *L)
{
    int base = lua_gettop(L);
    int status = docall(L, 0, LUA_MULTRET);
    int n = lua_gettop(L) - base + 1;
    if (status != LUA_OK || n <= 0)
        return status;
    luaL_checkstack(L, LUA_MINSTACK, "too many results to print");
    if (lua_getglobal(L, "ml") == LUA_TTABLE && lua_getfield(L, -1, "repl_print") == LUA_TFUNCTION) {
        lua_remove(L, -2);
    } else {
        lua_pop(L, lua_gettop(L) - base - n + 1);
        lua_getglobal(L, "print");
    }
    lua_insert(L, -(n + 1));
    return docall(L, n, 0);
}

/* Make the library available as the global `ml`, unless a script already
 * set one; a library that fails to load costs a one-line warning only. */
static void preload_ml(lua_State *L)
{
    int have = lua_getglobal(L, "ml") != LUA_TNIL;
    lua_pop(L, 1);
    if (have)
        return;
    lua_getglobal(L, "require");
    lua_pushliteral(L, "moonlit");
    if (docall(L, 1, 1) == LUA_OK) {
        lua_setglobal(L, "ml");
        return;
    }
    const char *msg = lua_tostring(L, -1);
    if (msg == NULL)
        msg = "(error object is not a string)";
    fprintf(stderr, PROGNAME ": warning: `ml` is not set, require \"moonlit\" failed: %.*s\n",
            (int)strcspn(msg, "\n"), msg);
    lua_pop(L, 1);
}

/* The interactive loop.  Returns 0, or -1 if a chunk failed while reading
 * from a pipe (so a piped session reports failure by its exit status). */
static int run_repl(lua_State *L)
{
    int tty = isatty(STDIN_FILENO);
    repl_sigint_flags = tty ? 0 : SA_RESTART;
    set_sigint_at_rest();
    if (tty) {
        const char *home = getenv("HOME");
        rl_readline_name = PROGNAME;
        rl_instream = stdin;
        rl_outstream = stdout;
        /* Ctrl-C is ours: readline must neither catch it nor re-raise it. */
        rl_catch_signals = 0;
        using_history();
        stifle_history(HISTORY_MAX);
        if (home) {
            snprintf(history_path, sizeof history_path, "%s/" HISTORY_FILE, home);
            read_history(history_path);
        }
        printf("%s; `ml` is the library; Ctrl-D exits\n", VERSION_LINE);
        fflush(stdout);
    }
    preload_ml(L);

    int failed = 0;
    for (;;) {
        int status = load_chunk(L, tty);
        if (status == CHUNK_EOF)
            break;
        if (status == CHUNK_CANCELLED)
            continue;
        if (status == LUA_OK)
            status = run_and_print(L);
        if (status != LUA_OK) {
            report_error(L, 0);
            failed = 1;
        }
        fflush(stdout);
    }
    if (history_path[0])
        history_truncate_file(history_path, HISTORY_MAX);
    repl_sigint_flags = -1;
    set_sigint_at_rest();
    return failed && !tty ? -1 : 0;
}

/* ---- command line --------------------------------------------------------- */

typedef struct {
    int script;        /* argv index of the script ("-" = stdin), 0 if none */
    int exec;          /* some -e was given */
    int interactive;   /* -i */
    int version;
    int help;
} cli_options;

static void usage(FILE *f)
{
    fputs("usage: " PROGNAME " [options] [script [args...]]\n"
          "  -e code        run the Lua code (may be repeated; runs before the script)\n"
          "  -i             enter the interactive prompt after the script and -e code\n"
          "  -              read the script from standard input\n"
          "  --             stop handling options\n"
          "  -v, --version  print the version and exit\n"
          "  -h, --help     print this help and exit\n"
          "With no script and no -e, " PROGNAME " starts the interactive prompt.\n"
          "The script sees its arguments in the global table `arg` and as `...`.\n"
          "MOONLIT_PATH: directories (;-separated) searched for Lua modules first.\n",
          f);
}

/* Fill o from argv; on a bad option print why with the usage on stderr and
 * return -1. */
static int parse_options(int argc, char **argv, cli_options *o)
{
    memset(o, 0, sizeof *o);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] != '-' || strcmp(a, "-") == 0) {
            o->script = i;
            return 0;
        }
        if (strcmp(a, "--") == 0) {
            if (i + 1 < argc)
                o->script = i + 1;
            return 0;
        }
        if (strcmp(a, "-v") == 0 || strcmp(a, "--version") == 0) {
            o->version = 1;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            o->help = 1;
        } else if (strcmp(a, "-i") == 0) {
            o->interactive = 1;
        } else if (strncmp(a, "-e", 2) == 0) {
            o->exec = 1;
            if (a[2] == '\0' && ++i >= argc) {
                fprintf(stderr, PROGNAME ": option '-e' needs an argument (the code to run)\n");
                usage(stderr);
                return -1;
            }
        } else {
            fprintf(stderr, PROGNAME ": unknown option '%s'\n", a);
            usage(stderr);
            return -1;
        }
    }
    return 0;
}

/* arg[0] is the script, arg[1..] its arguments and the interpreter's own
 * arguments go to negative indices; with no script arg[0] is the program. */
static void create_arg_table(lua_State *L, int argc, char **argv, int script)
{
    lua_createtable(L, argc - script - 1 > 0 ? argc - script - 1 : 0, script + 1);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - script);
    }
    lua_setglobal(L, "arg");
}

/* Run the -e options among argv[1..end-1], in order. */
static int run_exec_options(lua_State *L, char **argv, int end)
{
    for (int i = 1; i < end; i++) {
        if (strncmp(argv[i], "-e", 2) != 0)
            continue;
        const char *code = argv[i][2] ? argv[i] + 2 : argv[++i];
        int status = luaL_loadbuffer(L, code, strlen(code), "=(command line)");
        if (status == LUA_OK)
            status = docall(L, 0, 0);
        if (status != LUA_OK) {
            report_error(L, 1);
            return status;
        }
    }
    return LUA_OK;
}

static int run_script(lua_State *L, int argc, char **argv, int script)
{
    const char *name = argv[script];
    /* "-" is standard input, unless it follows "--" (then it is a file). */
    if (strcmp(name, "-") == 0 && strcmp(argv[script - 1], "--") != 0)
        name = NULL;
    int status = luaL_loadfile(L, name);
    if (status == LUA_OK) {
        int nargs = argc - script - 1;
        luaL_checkstack(L, nargs, "too many arguments to the script");
        for (int i = script + 1; i < argc; i++)
            lua_pushstring(L, argv[i]);
        status = docall(L, nargs, 0);
    }
    if (status != LUA_OK)
        report_error(L, 1);
    return status;
}

/* Everything after the state exists runs here, under lua_pcall, so even an
 * out-of-memory error while setting up is reported instead of aborting.
 * Returns a boolean: whether the process succeeded. */
static int cli_main(lua_State *L)
{
    int argc = (int)lua_tointeger(L, 1);
    char **argv = lua_touserdata(L, 2);
    cli_options o;
    if (parse_options(argc, argv, &o) < 0) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (o.help || o.version) {
        if (o.help)
            usage(stdout);
        else
            puts(VERSION_LINE);
        lua_pushboolean(L, 1);
        return 1;
    }
    luaL_openlibs(L);
    preload_core(L);
    setup_package_path(L);
    create_arg_table(L, argc, argv, o.script);
    int ok = run_exec_options(L, argv, o.script ? o.script : argc) == LUA_OK &&
             (o.script == 0 || run_script(L, argc, argv, o.script) == LUA_OK);
    if (ok && (o.interactive || (o.script == 0 && !o.exec)))
        ok = run_repl(L) == 0;
    lua_pushboolean(L, ok);
    return 1;
}

int main(int argc, char **argv)
{
    lua_State *L = luaL_newstate();
    if (L == NULL) {
        fprintf(stderr, PROGNAME ": cannot create the Lua state: not enough memory\n");
        return EXIT_FAILURE;
    }
    lua_pushcfunction(L, cli_main);
    lua_pushinteger(L, argc);
    lua_pushlightuserdata(L, argv);
    int status = lua_pcall(L, 2, 1, 0);
    int ok = status == LUA_OK && lua_toboolean(L, -1);
    if (status != LUA_OK)
        report_error(L, 1);
    /* A full collection first runs the finalizers of every unreachable
     * tensor in the ordinary way, so storage and device memory go back
     * before the state is torn down. */
    lua_gc(L, LUA_GCCOLLECT);
    lua_close(L);
    return ok ? EXIT_SUCCESS : EXIT_FAILURE;
}
