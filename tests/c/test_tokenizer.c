/* test_tokenizer.c — the CLIP tokenizer against Hugging Face's output.
 *
 * tests/fixtures/sd1-tiny/tokenizer.json holds prompts (unicode, overlong,
 * literal special tokens) with the ids HF's CLIPTokenizer gave, unpadded and
 * padded to 77; every one must match exactly, whichever file format the
 * vocabulary is read from; sd2-tiny's (pad token "!") too.  Then edge cases checked against HF by hand,
 * decoding, errors, and a throughput figure (printed, not asserted).
 *
 * The vocabulary itself is not in the repository: `make fixtures` rebuilds
 * it into tests/fixtures/sd{1,2}-tiny/pipeline/tokenizer/. */
#include "check.h"
#include "tokenizer.h"
#include "error.h"

#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define TOK_DIR "tests/fixtures/sd1-tiny/pipeline/tokenizer"
#define FIXTURE "tests/fixtures/sd1-tiny/tokenizer.json"
#define SD2_DIR "tests/fixtures/sd2-tiny/pipeline/tokenizer"
#define SD2_FIXTURE "tests/fixtures/sd2-tiny/tokenizer.json"
#define MAXLEN 77
#define CAP 512

typedef struct {
    int n;
    const char **text;
    size_t *len;
    int32_t **ids, *n_ids;     /* unpadded */
    int32_t (*padded)[MAXLEN];
} fixture;

static int32_t *int_array(json_t *a, int *n) {
    *n = (int)json_array_size(a);
    int32_t *v = malloc((size_t)(*n ? *n : 1) * sizeof *v);
    for (int i = 0; i < *n; i++) v[i] = (int32_t)json_integer_value(json_array_get(a, (size_t)i));
    return v;
}

static json_t *load_fixture(fixture *f, const char *path) {
    json_error_t err;
    json_t *root = json_load_file(path, 0, &err);
    if (!root) { CHECK(0, "%s: %s", path, err.text); return NULL; }
    json_t *prompts = json_object_get(root, "prompts"), *ids = json_object_get(root, "ids"),
           *padded = json_object_get(root, "padded_ids");
    f->n = (int)json_array_size(prompts);
    CHECK(f->n > 0 && json_array_size(ids) == (size_t)f->n && json_array_size(padded) == (size_t)f->n,
          "fixture has prompts, ids, padded_ids of one length");
    f->text = calloc((size_t)f->n, sizeof *f->text);
    f->len = calloc((size_t)f->n, sizeof *f->len);
    f->ids = calloc((size_t)f->n, sizeof *f->ids);
    f->n_ids = calloc((size_t)f->n, sizeof *f->n_ids);
    f->padded = calloc((size_t)f->n, sizeof *f->padded);
    for (int i = 0; i < f->n; i++) {
        json_t *p = json_array_get(prompts, (size_t)i);
        f->text[i] = json_string_value(p);
        f->len[i] = json_string_length(p);
        int n;
        f->ids[i] = int_array(json_array_get(ids, (size_t)i), &n);
        f->n_ids[i] = n;
        int32_t *pad = int_array(json_array_get(padded, (size_t)i), &n);
        CHECK(n == MAXLEN, "fixture padded_ids[%d] has %d ids", i, n);
        memcpy(f->padded[i], pad, sizeof f->padded[i]);
        free(pad);
    }
    return root;
}

static void free_fixture(fixture *f) {
    for (int i = 0; i < f->n; i++) free(f->ids[i]);
    free(f->text); free(f->len); free(f->ids); free(f->n_ids); free(f->padded);
}

static bool same(const int32_t *a, const int32_t *b, int n) {
    return memcmp(a, b, (size_t)n * sizeof *a) == 0;
}

static void print_ids(const char *what, const int32_t *v, int n) {
    printf("  %s:", what);
    for (int i = 0; i < n; i++) printf(" %d", v[i]);
    printf("\n");
}

/* Every fixture prompt, unpadded and padded, single and batched. */
static void check_fixture(ml_tokenizer *tok, const fixture *f, const char *how) {
    int32_t ids[CAP];
    for (int i = 0; i < f->n; i++) {
        int n = -1;
        int rc = ml_tokenizer_encode(tok, f->text[i], f->len[i], ids, CAP, &n);
        bool ok = rc == 0 && n == f->n_ids[i] && same(ids, f->ids[i], n);
        CHECK(ok, "%s: prompt %d \"%s\" (rc %d, %d ids, expected %d)", how, i, f->text[i], rc, n,
              f->n_ids[i]);
        if (!ok && rc == 0) { print_ids("got", ids, n); print_ids("want", f->ids[i], f->n_ids[i]); }
        rc = ml_tokenizer_encode_padded(tok, f->text[i], f->len[i], ids, MAXLEN);
        CHECK(rc == 0 && same(ids, f->padded[i], MAXLEN), "%s: padded prompt %d \"%s\"", how, i,
              f->text[i]);
    }
    int32_t *batch = malloc((size_t)f->n * MAXLEN * sizeof *batch);
    int rc = ml_tokenizer_encode_batch(tok, f->text, f->len, f->n, batch, MAXLEN, true);
    CHECK(rc == 0 && same(batch, &f->padded[0][0], f->n * MAXLEN), "%s: batch of all prompts", how);
    free(batch);
}

typedef struct { const char *why, *text; size_t len; int n; int32_t ids[40]; } edge_case;

/* Expected ids from HF's CLIPTokenizer (transformers 5, tokenizers 0.23). */
static const edge_case EDGE[] = {
    {"uppercase special tokens are ordinary text", "<|STARTOFTEXT|>x", 16, 10, {49406, 27, 347, 993, 6659, 4160, 91, 285, 343, 49407}},
    {"full lowercase of U+0130", "\304\260i", 3, 5, {49406, 328, 16384, 328, 49407}},
    {"sigma lowercased without the final-sigma rule", "\316\243\316\221\316\243 \317\203\316\261\317\202", 13, 14, {49406, 139, 225, 138, 109, 139, 481, 139, 225, 138, 109, 139, 480, 49407}},
    {"Unicode White_Space separates, ZWSP/BOM/U+180E do not", "a\302\240b\343\200\200c\342\200\213d\357\273\277e\341\240\216f\342\200\250g\302\205h\034i", 29, 19, {49406, 320, 321, 322, 9844, 323, 171, 119, 379, 324, 157, 254, 492, 325, 326, 327, 472, 328, 49407}},
    {"contractions and punctuation runs", "dog''s \077's 'S 'LL 'same", 23, 11, {49406, 1929, 8445, 338, 13610, 338, 568, 1342, 568, 780, 49407}},
    {"added tokens are cut from the raw text", "<|startoftext|>>x<|endoftext|>y", 31, 7, {49406, 49406, 285, 343, 49407, 344, 49407}},
    {"a special name after normalisation is re-split", "!<|ENDOFTEXT|>!", 15, 10, {49406, 0, 27, 347, 40786, 4160, 91, 29, 256, 49407}},
    {"controls, NUL and DEL are byte tokens", "\000\001 \177", 4, 5, {49406, 188, 445, 477, 49407}},
    {"numbers one by one", "\342\221\240\342\221\241\342\205\223 \331\243 \302\262 2024", 20, 18, {49406, 158, 239, 510, 158, 239, 350, 158, 227, 497, 149, 352, 41175, 273, 271, 273, 275, 49407}},
    {"combining mark composed by NFC", "cafe\314\201 e\314\201", 10, 4, {49406, 15304, 4166, 49407}},
    {"U+11A7 after a Hangul syllable stays (utf8proc 2.8 drops it in NFC)", "\352\260\200\341\206\247\040\341\204\200\341\205\241\341\206\247\040\341\204\200\341\205\241\341\206\250", 26, 14, {49406, 21122, 222, 157, 228, 356, 21122, 222, 157, 228, 356, 21122, 479, 49407}},
    {"letters of every script in one word", "\307\205\307\204 \307\210 \341\272\236 \357\274\241\357\274\242\357\274\243 \342\205\253 \346\235\261\344\272\254\343\201\256\347\212\254", 38, 29, {49406, 131, 228, 131, 484, 131, 487, 127, 509, 171, 121, 223, 171, 121, 224, 171, 121, 481, 158, 227, 375, 48338, 21078, 105, 21575, 163, 232, 361, 49407}},
};

static void check_edges(ml_tokenizer *tok) {
    for (size_t c = 0; c < sizeof EDGE / sizeof *EDGE; c++) {
        const edge_case *e = &EDGE[c];
        int want = e->n;
        int32_t ids[CAP];
        int n = -1;
        int rc = ml_tokenizer_encode(tok, e->text, e->len, ids, CAP, &n);
        bool ok = rc == 0 && n == want && same(ids, e->ids, n);
        CHECK(ok, "edge case: %s (rc %d: %s)", e->why, rc, rc ? ml_last_error() : "");
        if (!ok && rc == 0) { print_ids("got", ids, n); print_ids("want", e->ids, want); }
    }
}

static void check_decode(ml_tokenizer *tok, const fixture *f) {
    struct { int32_t ids[8]; int n; bool skip; const char *want; size_t want_len; } cases[] = {
        {{139, 49407, 320}, 3, false, "\357\277\275<|endoftext|>a", 17},
        {{127, 320, 139}, 3, false, "\357\277\275a \357\277\275", 8},
        {{49406, 320, 49407, 49407, 49407}, 5, false,
         "<|startoftext|>a <|endoftext|><|endoftext|><|endoftext|>", 56},
        {{49406, 320, 49407, 49407, 49407}, 5, true, "a", 1},
        {{472, 320, 188}, 3, false, "a \000", 3},
        {{0}, 0, false, "", 0},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        size_t len = 0;
        char *s = ml_tokenizer_decode(tok, cases[c].ids, cases[c].n, cases[c].skip, &len);
        CHECK(s && len == cases[c].want_len && memcmp(s, cases[c].want, len) == 0,
              "decode case %zu: got \"%s\" (%zu bytes), want \"%s\"", c, s ? s : ml_last_error(),
              len, cases[c].want);
        free(s);
    }
    /* HF's decode of a fixture prompt, then ids -> text -> ids is the
     * identity for plain ASCII prompts. */
    int32_t ids[CAP], again[CAP];
    char *s = ml_tokenizer_decode(tok, f->ids[3], f->n_ids[3], true, NULL);
    CHECK(s && strcmp(s, "a photo of a unqtkn dog sleeping , 4 k , highly - detailed !!!") == 0,
          "decode of prompt 3: \"%s\"", s ? s : ml_last_error());
    free(s);
    s = ml_tokenizer_decode(tok, f->ids[0], f->n_ids[0], false, NULL);
    CHECK(s && strcmp(s, "<|startoftext|>photo of a unqtkn dog <|endoftext|>") == 0,
          "decode keeping special tokens: \"%s\"", s ? s : ml_last_error());
    free(s);
    int round_trips = 0;
    for (int i = 0; i < f->n; i++) {
        bool ascii = true;
        for (size_t k = 0; k < f->len[i]; k++) ascii &= (unsigned char)f->text[i][k] < 0x80;
        if (!ascii || strstr(f->text[i], "<|")) continue;
        int n, m;
        ml_tokenizer_encode(tok, f->text[i], f->len[i], ids, CAP, &n);
        char *text = ml_tokenizer_decode(tok, ids, n, true, NULL);
        CHECK(text && ml_tokenizer_encode(tok, text, strlen(text), again, CAP, &m) == 0 && m == n &&
              same(ids, again, n), "round trip of prompt %d via \"%s\"", i, text ? text : "");
        free(text);
        round_trips++;
    }
    CHECK(round_trips >= 8, "%d ASCII prompts round-tripped", round_trips);
    int32_t bad[] = {320, 49408};
    s = ml_tokenizer_decode(tok, bad, 2, false, NULL);
    CHECK(!s && strstr(ml_last_error(), "49408"), "decode of an unknown id: %s", ml_last_error());
}

static void check_api(ml_tokenizer *tok) {
    ml_tokenizer_info info = ml_tokenizer_get_info(tok);
    CHECK(info.bos_id == 49406 && info.eos_id == 49407 && info.pad_id == 49407 &&
          info.unk_id == 49407 && info.max_length == 77 && info.vocab_size == 49408,
          "info: bos %d eos %d pad %d unk %d max_length %d vocab %d", info.bos_id, info.eos_id,
          info.pad_id, info.unk_id, info.max_length, info.vocab_size);
    CHECK(ml_tokenizer_token_to_id(tok, "dog</w>", 7) == 1929, "token_to_id(dog</w>)");
    CHECK(ml_tokenizer_token_to_id(tok, "no such token", 13) == -1, "token_to_id of unknown");
    const char *t = ml_tokenizer_id_to_token(tok, 1929);
    CHECK(t && strcmp(t, "dog</w>") == 0, "id_to_token(1929)");
    CHECK(!ml_tokenizer_id_to_token(tok, -1) && !ml_tokenizer_id_to_token(tok, 49408),
          "id_to_token out of range");
    CHECK(ml_tokenizer_is_special(tok, 49406) && !ml_tokenizer_is_special(tok, 320), "is_special");

    /* snprintf-like count when the buffer is short */
    int32_t ids[4];
    int n = 0;
    CHECK(ml_tokenizer_encode(tok, "photo of a dog", 14, ids, 3, &n) == 0 && n == 6 &&
          ids[0] == 49406 && ids[1] == 1125 && ids[2] == 539, "encode into a short buffer: n %d", n);
    int32_t fit[8] = {49406, 320, 49407};
    CHECK(ml_tokenizer_fit(tok, fit, 3, 5, false) == 0 && fit[3] == 49407 && fit[4] == 49407, "fit pads");
    int32_t longer[6] = {49406, 1, 2, 3, 4, 49407};
    CHECK(ml_tokenizer_fit(tok, longer, 6, 4, false) < 0 && strstr(ml_last_error(), "max_length 4"),
          "fit without truncation refuses: %s", ml_last_error());
    CHECK(ml_tokenizer_fit(tok, longer, 6, 4, true) == 0 && longer[2] == 2 && longer[3] == 49407,
          "fit truncates keeping EOS");
    CHECK(ml_tokenizer_encode_padded(tok, "a", 1, ids, 1) < 0, "max_length 1 refused");
    const char *texts[] = {"a", "photo of a dog"};
    int32_t rows[2 * 4];
    CHECK(ml_tokenizer_encode_batch(tok, texts, NULL, 2, rows, 4, false) < 0 &&
          strstr(ml_last_error(), "text 1"), "batch names the overlong text: %s", ml_last_error());
    CHECK(ml_tokenizer_encode(tok, "ok \xC3\x28", 5, ids, 4, &n) < 0 &&
          strstr(ml_last_error(), "UTF-8") && strstr(ml_last_error(), "byte 3"),
          "invalid UTF-8: %s", ml_last_error());
}

/* Two threads sharing one tokenizer (and its cache) agree with one. */
typedef struct { ml_tokenizer *tok; const fixture *f; int bad; } thread_arg;

static void *thread_main(void *p) {
    thread_arg *a = p;
    int32_t ids[CAP];
    for (int r = 0; r < 200; r++)
        for (int i = 0; i < a->f->n; i++) {
            int n;
            if (ml_tokenizer_encode(a->tok, a->f->text[i], a->f->len[i], ids, CAP, &n) < 0 ||
                n != a->f->n_ids[i] || !same(ids, a->f->ids[i], n))
                a->bad++;
            if (r % 50 == 0) ml_tokenizer_clear_cache(a->tok);
        }
    return NULL;
}

static void check_threads(ml_tokenizer *tok, const fixture *f) {
    pthread_t th[2];
    thread_arg args[2] = {{tok, f, 0}, {tok, f, 0}};
    for (int i = 0; i < 2; i++) pthread_create(&th[i], NULL, thread_main, &args[i]);
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    CHECK(args[0].bad == 0 && args[1].bad == 0, "threads: %d + %d mismatches", args[0].bad,
          args[1].bad);
}

static void write_file(const char *path, const char *text) {
    FILE *fp = fopen(path, "w");
    if (fp) { fputs(text, fp); fclose(fp); }
}

/* Bad folders and files give messages naming the file, never a crash. */
static void check_errors(void) {
    ml_tokenizer *tok = ml_tokenizer_load("tests/fixtures/no-such-tokenizer");
    CHECK(!tok && strstr(ml_last_error(), "no-such-tokenizer"), "missing folder: %s", ml_last_error());

    char dir[] = "/tmp/moonlit-tok-XXXXXX";
    if (!mkdtemp(dir)) { CHECK(0, "mkdtemp"); return; }
    char vocab[64], merges[64], json[64], conf[64];
    snprintf(vocab, sizeof vocab, "%s/vocab.json", dir);
    snprintf(merges, sizeof merges, "%s/merges.txt", dir);
    snprintf(json, sizeof json, "%s/tokenizer.json", dir);
    snprintf(conf, sizeof conf, "%s/tokenizer_config.json", dir);

    tok = ml_tokenizer_load(dir);
    CHECK(!tok && strstr(ml_last_error(), "neither"), "empty folder: %s", ml_last_error());

    const char *good_vocab = "{\"a\": 0, \"b\": 1, \"ab\": 2, \"a</w>\": 3, \"b</w>\": 4, "
                             "\"ab</w>\": 5, \"<|startoftext|>\": 6, \"<|endoftext|>\": 7}";
    write_file(vocab, "{\"a\": 0, \"b\": ");
    write_file(merges, "#version: 0.2\na b\na b</w>\n");
    tok = ml_tokenizer_load(dir);
    CHECK(!tok && strstr(ml_last_error(), "vocab.json:"), "corrupt vocab.json: %s", ml_last_error());

    write_file(vocab, "{\"a\": \"zero\"}");
    tok = ml_tokenizer_load(dir);
    CHECK(!tok && strstr(ml_last_error(), "vocab.json") && strstr(ml_last_error(), "\"a\""),
          "non-integer id: %s", ml_last_error());

    write_file(vocab, good_vocab);
    write_file(merges, "#version: 0.2\na b\nab c\n");
    tok = ml_tokenizer_load(dir);
    CHECK(!tok && strstr(ml_last_error(), "merges.txt line 3") && strstr(ml_last_error(), "\"c\""),
          "merge of an unknown token: %s", ml_last_error());

    write_file(merges, "#version: 0.2\na b c\n");
    tok = ml_tokenizer_load(dir);
    CHECK(!tok && strstr(ml_last_error(), "merges.txt line 2"), "bad merge line: %s", ml_last_error());

    /* No merges at all: it would load and split every word into characters. */
    const char *no_merges[] = {"", "#version: 0.2\n", "#version: 0.2\n\n\r\n"};
    for (int i = 0; i < 3; i++) {
        write_file(merges, no_merges[i]);
        tok = ml_tokenizer_load(dir);
        CHECK(!tok && strstr(ml_last_error(), merges) && strstr(ml_last_error(), "holds no merges"),
              "merges.txt %d without merges: %s", i, tok ? "loaded" : ml_last_error());
        ml_tokenizer_free(tok);
        tok = ml_tokenizer_load_files(vocab, merges);
        CHECK(!tok && strstr(ml_last_error(), "merges.txt holds no merges"),
              "load_files, merges.txt %d without merges: %s", i, tok ? "loaded" : ml_last_error());
        ml_tokenizer_free(tok);
    }

    write_file(merges, "#version: 0.2\na b\na b</w>\n");
    write_file(conf, "{\"pad_token\": {\"content\": \"<pad>\"}}");
    tok = ml_tokenizer_load(dir);
    CHECK(!tok && strstr(ml_last_error(), "tokenizer_config.json") && strstr(ml_last_error(), "<pad>"),
          "pad token not in the vocabulary: %s", ml_last_error());

    /* A tiny working tokenizer: bytes missing from the vocabulary become
     * unk, and model_max_length / pad_token come from the config. */
    write_file(conf, "{\"pad_token\": \"a\", \"model_max_length\": 6}");
    tok = ml_tokenizer_load(dir);
    CHECK(tok != NULL, "tiny tokenizer loads: %s", tok ? "" : ml_last_error());
    if (tok) {
        int32_t ids[8], want[] = {6, 5, 0, 7, 7, 0};
        ml_tokenizer_info info = ml_tokenizer_get_info(tok);
        CHECK(info.max_length == 6 && info.pad_id == 0, "tiny config: max_length %d pad %d",
              info.max_length, info.pad_id);
        CHECK(ml_tokenizer_encode_padded(tok, "AB ac", 5, ids, 6) == 0 && same(ids, want, 6),
              "tiny encode: %d %d %d %d %d %d", ids[0], ids[1], ids[2], ids[3], ids[4], ids[5]);
        ml_tokenizer_free(tok);
    }
    remove(conf);

    /* tokenizer.json with merges as "a b" strings, used when merges.txt is absent */
    remove(merges);
    write_file(json, "{\"model\": {\"type\": \"BPE\", \"end_of_word_suffix\": \"</w>\", "
                     "\"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2, \"a</w>\": 3, \"b</w>\": 4, "
                     "\"ab</w>\": 5, \"<|startoftext|>\": 6, \"<|endoftext|>\": 7}, "
                     "\"merges\": [\"a b\", \"a b</w>\"]}, \"added_tokens\": []}");
    tok = ml_tokenizer_load(dir);
    CHECK(tok != NULL, "tokenizer.json with string merges: %s", tok ? "" : ml_last_error());
    if (tok) {
        int32_t ids[8], want[] = {6, 2, 5, 7};
        int n;
        CHECK(ml_tokenizer_encode(tok, "abab", 4, ids, 8, &n) == 0 && n == 4 && same(ids, want, 4),
              "string merges encode");
        ml_tokenizer_free(tok);
    }
    write_file(json, "{\"model\": {\"type\": \"BPE\", \"end_of_word_suffix\": \"</w>\", "
                     "\"vocab\": {\"a\": 0, \"a</w>\": 1, \"<|startoftext|>\": 2, "
                     "\"<|endoftext|>\": 3}, \"merges\": []}, \"added_tokens\": []}");
    tok = ml_tokenizer_load(dir);
    CHECK(!tok && strstr(ml_last_error(), json) && strstr(ml_last_error(), "holds no merges"),
          "tokenizer.json with no merges: %s", tok ? "loaded" : ml_last_error());
    ml_tokenizer_free(tok);
    tok = ml_tokenizer_load_json(json);
    CHECK(!tok && strstr(ml_last_error(), "tokenizer.json: model.merges holds no merges"),
          "load_json with no merges: %s", tok ? "loaded" : ml_last_error());
    ml_tokenizer_free(tok);
    write_file(json, "{\"model\": {\"type\": \"WordPiece\"}}");
    tok = ml_tokenizer_load(dir);
    CHECK(!tok && strstr(ml_last_error(), "tokenizer.json") && strstr(ml_last_error(), "WordPiece"),
          "non-BPE tokenizer.json: %s", ml_last_error());
    write_file(json, "{\"model\": ");
    tok = ml_tokenizer_load(dir);
    CHECK(!tok && strstr(ml_last_error(), "tokenizer.json:"), "corrupt tokenizer.json: %s",
          ml_last_error());
    remove(json);
    remove(vocab);
    rmdir(dir);
}

/* The sd2-tiny fixture: SD 2's tokenizer pads with "!" (id 0). */
static void check_sd2(void) {
    fixture f = {0};
    json_t *root = load_fixture(&f, SD2_FIXTURE);
    if (!root) return;
    ml_tokenizer *tok = ml_tokenizer_load(SD2_DIR);
    CHECK(tok != NULL, "load %s: %s", SD2_DIR, tok ? "" : ml_last_error());
    if (tok) {
        CHECK(ml_tokenizer_get_info(tok).pad_id == 0, "sd2 pad id");
        check_fixture(tok, &f, "sd2-tiny");
    }
    ml_tokenizer_free(tok);
    free_fixture(&f);
    json_decref(root);
}

/* SD 2.x pads with "!": as in HF, it is then a special token, cut out of
 * the text (id 0, not the word "!</w>") and dropped by skip_special. */
static void check_bang_pad(void) {
    char dir[] = "/tmp/moonlit-tok-XXXXXX", path[PATH_MAX + 64], real[PATH_MAX];
    if (!mkdtemp(dir)) { CHECK(0, "mkdtemp"); return; }
    const char *files[] = {"vocab.json", "merges.txt"};
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", TOK_DIR, files[i]);
        char *r = realpath(path, real);
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        CHECK(r && symlink(real, path) == 0, "link %s", files[i]);
    }
    snprintf(path, sizeof path, "%s/special_tokens_map.json", dir);
    write_file(path, "{\"pad_token\": \"!\"}");
    ml_tokenizer *tok = ml_tokenizer_load(dir);
    CHECK(tok != NULL, "tokenizer with pad \"!\": %s", tok ? "" : ml_last_error());
    if (tok) {
        int32_t ids[16], want[] = {49406, 3306, 0, 320, 0, 321, 0, 0, 0, 49407};
        int n;
        CHECK(ml_tokenizer_encode(tok, "hello! a!b !!!", 14, ids, 16, &n) == 0 && n == 10 &&
              same(ids, want, 10), "\"!\" is the pad token");
        char *s = ml_tokenizer_decode(tok, want, 10, true, NULL);
        CHECK(s && strcmp(s, "hello a b") == 0, "decode skips the pad \"!\": \"%s\"", s ? s : "");
        free(s);
        ml_tokenizer_free(tok);
    }
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        remove(path);
    }
    snprintf(path, sizeof path, "%s/special_tokens_map.json", dir);
    remove(path);
    rmdir(dir);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void throughput(ml_tokenizer *tok, const fixture *f) {
    int32_t ids[CAP];
    int n, reps = 300, count = 0;
    double t0 = now();
    for (int r = 0; r < reps; r++) {
        ml_tokenizer_clear_cache(tok);
        for (int i = 0; i < f->n; i++, count++) ml_tokenizer_encode(tok, f->text[i], f->len[i], ids, CAP, &n);
    }
    double cold = count / (now() - t0);
    count = 0;
    t0 = now();
    for (int r = 0; r < reps * 10; r++)
        for (int i = 0; i < f->n; i++, count++) ml_tokenizer_encode(tok, f->text[i], f->len[i], ids, CAP, &n);
    double warm = count / (now() - t0);
    printf("throughput: %.0f prompts/s with a cold cache, %.0f prompts/s warm (fixture prompts)\n",
           cold, warm);
}

int main(void) {
    struct stat st;
    if (stat(TOK_DIR "/vocab.json", &st) != 0 || stat(SD2_DIR "/vocab.json", &st) != 0) {
        CHECK(0, "%s/vocab.json or %s/vocab.json is missing: run `make fixtures` (it rebuilds "
              "CLIP's vocabulary)", TOK_DIR, SD2_DIR);
        return check_summary();
    }
    fixture f = {0};
    json_t *root = load_fixture(&f, FIXTURE);
    if (!root) return check_summary();

    double t0 = now();
    ml_tokenizer *from_dir = ml_tokenizer_load(TOK_DIR);
    double t_dir = now() - t0;
    CHECK(from_dir != NULL, "load %s: %s", TOK_DIR, from_dir ? "" : ml_last_error());
    ml_tokenizer *from_files = ml_tokenizer_load_files(TOK_DIR "/vocab.json", TOK_DIR "/merges.txt");
    CHECK(from_files != NULL, "load vocab.json + merges.txt: %s", from_files ? "" : ml_last_error());
    t0 = now();
    ml_tokenizer *from_json = ml_tokenizer_load_json(TOK_DIR "/tokenizer.json");
    double t_json = now() - t0;
    CHECK(from_json != NULL, "load tokenizer.json: %s", from_json ? "" : ml_last_error());
    printf("load: %.0f ms from vocab.json + merges.txt, %.0f ms from tokenizer.json\n",
           t_dir * 1e3, t_json * 1e3);

    if (from_dir) {
        check_fixture(from_dir, &f, "folder");
        check_edges(from_dir);
        check_decode(from_dir, &f);
        check_api(from_dir);
        check_threads(from_dir, &f);
        throughput(from_dir, &f);
    }
    if (from_files) check_fixture(from_files, &f, "vocab.json + merges.txt");
    if (from_json) {
        check_fixture(from_json, &f, "tokenizer.json");
        check_edges(from_json);
        check_api(from_json);
    }
    ml_tokenizer_free(from_dir);
    ml_tokenizer_free(from_files);
    ml_tokenizer_free(from_json);
    check_errors();
    check_bang_pad();
    check_sd2();
    free_fixture(&f);
    json_decref(root);
    return check_summary();
}
