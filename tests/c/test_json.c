/* test_json.c — ml_json_parse (host/json_config.h): Python's bare NaN,
 * Infinity and -Infinity read as marked strings that ml_json_nonfinite
 * turns into numbers, strings spelled like them left alone, the marker
 * chosen among the control characters no string uses, error columns of the
 * text as given, and the C readers refusing the tokens with their place. */
#include "check.h"
#include "error.h"
#include "json_config.h"
#include <jansson.h>
#include <math.h>
#include <string.h>

static int has(const char *s, const char *part) { return s && strstr(s, part) != NULL; }

static json_t *parse(const char *text, int *marker) {
    return ml_json_parse(text, strlen(text), JSON_DECODE_ANY, "t.json", marker, NULL, NULL);
}

/* The number a member holds: a real, or a rewritten token. */
static int number_of(const json_t *v, int marker, double *out) {
    if (json_is_number(v)) { *out = json_number_value(v); return 1; }
    return json_is_string(v) && ml_json_nonfinite(json_string_value(v), json_string_length(v), marker, out);
}

static void test_tokens_become_numbers(void) {
    int m = -1;
    json_t *j = parse("{\"lambda_min_clipped\": -Infinity, \"a\": NaN, \"b\": [Infinity, 1.5],\n"
                      " \"s\": \"NaN\", \"t\": \"-Infinity\", \"u\": \"x NaN, Infinity\"}", &m);
    CHECK(j && m >= 1 && m < 32, "parsed with a marker: %s (marker %d)", j ? "" : ml_last_error(), m);
    if (!j) return;
    double d;
    CHECK(number_of(json_object_get(j, "lambda_min_clipped"), m, &d) && isinf(d) && d < 0, "-Infinity");
    CHECK(number_of(json_object_get(j, "a"), m, &d) && isnan(d), "NaN");
    CHECK(number_of(json_array_get(json_object_get(j, "b"), 0), m, &d) && isinf(d) && d > 0, "Infinity");
    CHECK(number_of(json_array_get(json_object_get(j, "b"), 1), m, &d) && d == 1.5, "1.5 beside it");
    /* the same words inside strings stay strings */
    const char *keys[] = {"s", "t", "u"}, *want[] = {"NaN", "-Infinity", "x NaN, Infinity"};
    for (int i = 0; i < 3; i++) {
        json_t *v = json_object_get(j, keys[i]);
        CHECK(json_is_string(v) && strcmp(json_string_value(v), want[i]) == 0 &&
              !ml_json_nonfinite(json_string_value(v), json_string_length(v), m, &d),
              "string %s kept", keys[i]);
    }
    json_decref(j);
    /* a top-level token, and tokens before each delimiter JSON allows */
    j = parse("NaN", &m);
    CHECK(j && number_of(j, m, &d) && isnan(d), "top-level NaN");
    json_decref(j);
    j = parse("[-Infinity\t,Infinity\r\n,NaN ]", &m);
    CHECK(j && json_array_size(j) == 3, "delimiters: %s", j ? "" : ml_last_error());
    json_decref(j);
}

static void test_standard_json_is_untouched(void) {
    int m = -1;
    /* an escaped quote before a word, numbers with '-' and 'e', escapes of
     * control characters: no token, no marker, the text given as it is */
    json_t *j = parse("{\"k\": \"a\\\"NaN\", \"n\": -1e-5, \"c\": \"\\u0001Infinity\", \"x\": [true, false, null]}",
                      &m);
    CHECK(j && m == 0, "no marker without tokens: %s", j ? "" : ml_last_error());
    json_t *c = json_object_get(j, "c");
    CHECK(json_is_string(c) && json_string_length(c) == 9 && json_string_value(c)[0] == 1, "\\u0001Infinity kept");
    CHECK(json_is_real(json_object_get(j, "n")) && json_real_value(json_object_get(j, "n")) == -1e-5, "-1e-5");
    json_decref(j);
}

static void test_marker_avoids_used_control_characters(void) {
    int m = -1;
    /* \u0001 and \u0002 (and \b = 8) are in use: the marker is 3, and the
     * string "\u0001NaN" is still a string */
    json_t *j = parse("[\"\\u0001NaN\", \"\\u0002\", \"\\b\", NaN]", &m);
    CHECK(j && m == 3, "marker 3: %d %s", m, j ? "" : ml_last_error());
    double d;
    json_t *s = j ? json_array_get(j, 0) : NULL;
    CHECK(s && json_is_string(s) && !ml_json_nonfinite(json_string_value(s), json_string_length(s), m, &d),
          "\\u0001NaN is a string");
    CHECK(j && number_of(json_array_get(j, 3), m, &d) && isnan(d), "the bare NaN is a number");
    json_decref(j);
    /* every control character in use: refused, naming the token's place */
    char text[2048];
    size_t n = 0;
    n += (size_t)snprintf(text + n, sizeof text - n, "[\"");
    for (int c = 1; c < 32; c++) n += (size_t)snprintf(text + n, sizeof text - n, "\\u%04x", c);
    snprintf(text + n, sizeof text - n, "\",\n  NaN]");
    j = parse(text, &m);
    CHECK(!j && has(ml_last_error(), "t.json:2:3") && has(ml_last_error(), "every control character"), "%s",
          ml_last_error());
}

static void test_errors_keep_the_columns_of_the_text(void) {
    int m;
    /* jansson reads the rewritten text; the column is the original's */
    CHECK(!parse("[1, 2 3]", &m) && has(ml_last_error(), "t.json:1:7"), "plain: %s", ml_last_error());
    CHECK(!parse("[1, NaN, 2 3]", &m) && has(ml_last_error(), "t.json:1:12"), "after NaN: %s", ml_last_error());
    CHECK(!parse("[NaN,\n -Infinity, 2 3]", &m) && has(ml_last_error(), "t.json:2:15"), "second line: %s",
          ml_last_error());
    /* not tokens: left for jansson, which refuses them */
    CHECK(!parse("[NaNx]", &m) && has(ml_last_error(), "invalid token"), "NaNx: %s", ml_last_error());
    CHECK(!parse("[-NaN]", &m), "-NaN is not Python's either");
    CHECK(!parse("[nan]", &m) && !parse("[inf]", &m), "lowercase spellings");
}

static void test_c_readers_refuse_them(void) {
    /* a raw two-byte character before the token counts as one column */
    const char *text = "{\"weight_map\": {},\n \"metadata\": {\"x\": \"\xc3\xa9\", \"y\": Infinity}}";
    json_t *j = ml_json_load_buffer(text, strlen(text), "m.index.json");
    CHECK(!j && has(ml_last_error(), "m.index.json:2:30") && has(ml_last_error(), "NaN/Infinity"), "%s",
          ml_last_error());
    text = "{\"weight_map\": {}}";
    j = ml_json_load_buffer(text, strlen(text), "m.index.json");
    CHECK(j != NULL, "standard JSON still reads: %s", ml_last_error());
    json_decref(j);
}

int main(void) {
    test_tokens_become_numbers();
    test_standard_json_is_untouched();
    test_marker_avoids_used_control_characters();
    test_errors_keep_the_columns_of_the_text();
    test_c_readers_refuse_them();
    return check_summary();
}
