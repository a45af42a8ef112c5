/* tokenizer.h — CLIP's byte-level BPE tokenizer (the text side of Stable
 * Diffusion), id for id what Hugging Face's CLIPTokenizer (the `tokenizers`
 * backed one, transformers >= 5 / CLIPTokenizerFast before) produces.
 *
 * Text -> ids, in HF's order:
 *   1. added tokens (bos/eos/pad/unk, tokenizer.json's added_tokens,
 *      tokenizer_config.json's added_tokens_decoder) are cut out of the raw
 *      text, longest first; so is SD 2's pad token "!", as in HF;
 *   2. every other stretch is NFC-normalised and lowercased (full Unicode
 *      lowercase, so U+0130 becomes "i" + U+0307); no accent stripping, no
 *      ftfy;
 *   3. it is split into words like the regex
 *        <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
 *      (whitespace = Unicode White_Space, dropped; a special-token name
 *      made by normalising, e.g. from "<|ENDOFTEXT|>", becomes the words
 *      "<|", "endoftext", "|>" as HF's byte-level stage re-splits it);
 *   4. each word's UTF-8 bytes become GPT-2 byte characters, the last one
 *      carrying "</w>", and are merged pair by pair in merges order;
 *   5. BOS ... EOS around the whole.
 * ids are the vocabulary's (0-based) token ids, e.g. 49406 = <|startoftext|>.
 *
 * Unicode properties (categories, lowercase, NFC) come from utf8proc, whose
 * Debian 12 build knows Unicode 15.0; HF's tokenizers 0.23 knows Unicode 16.
 * Code points assigned since 15.0 (new scripts, CJK extension J, more
 * hieroglyphs: about 5000) therefore split and lowercase differently; every
 * other code point tokenizes as HF's does.
 *
 * A tokenizer may be shared between threads: its only mutable state, the
 * word -> BPE cache, is locked. */
#ifndef ML_TOKENIZER_H
#define ML_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct ml_tokenizer ml_tokenizer;

typedef struct {
    int32_t bos_id, eos_id, pad_id, unk_id;
    int max_length;     /* model_max_length of tokenizer_config.json (77 if absent) */
    int vocab_size;     /* highest id + 1, added tokens included */
} ml_tokenizer_info;

/* A diffusers `tokenizer/` folder: vocab.json + merges.txt when both are
 * there, else tokenizer.json; tokenizer_config.json and
 * special_tokens_map.json (optional) name the bos/eos/pad/unk tokens and
 * model_max_length (defaults: <|startoftext|>, <|endoftext|> for the other
 * three, 77).  NULL + error naming the file on failure; a merges.txt or
 * model.merges without a single merge is one (BPE without merges would
 * silently split every word into single characters). */
ml_tokenizer *ml_tokenizer_load(const char *dir);
/* The two files alone, default special tokens. */
ml_tokenizer *ml_tokenizer_load_files(const char *vocab_path, const char *merges_path);
/* An HF tokenizer.json alone (model.vocab, model.merges as "a b" strings or
 * [a, b] pairs, added_tokens), default special tokens. */
ml_tokenizer *ml_tokenizer_load_json(const char *path);
void ml_tokenizer_free(ml_tokenizer *tok);   /* NULL-safe */

ml_tokenizer_info ml_tokenizer_get_info(const ml_tokenizer *tok);

/* Encode len bytes of UTF-8 text (NUL bytes allowed) to BOS, ids..., EOS,
 * neither truncated nor padded.  Writes at most cap ids to ids; *n_out gets
 * the full count, which may exceed cap (as snprintf does).  -1 + error on
 * invalid UTF-8 (the byte offset is named). */
int ml_tokenizer_encode(ml_tokenizer *tok, const char *text, size_t len,
                        int32_t *ids, int cap, int *n_out);
/* Make an encoded sequence of n ids exactly `length` long, as HF's
 * padding="max_length": pad with pad_id, or when n > length and truncate is
 * set keep the first length-1 ids and end with EOS (when truncate is not set,
 * that is an error).  ids holds the first min(n, length) ids of the sequence
 * and has room for `length`.  length >= 2. */
int ml_tokenizer_fit(const ml_tokenizer *tok, int32_t *ids, int n, int length, bool truncate);
/* encode + fit, truncating: exactly `length` ids (77 for SD). */
int ml_tokenizer_encode_padded(ml_tokenizer *tok, const char *text, size_t len,
                               int32_t *ids, int length);
/* n texts (lens[i] bytes each; lens NULL means NUL-terminated) into the
 * row-major [n, length] ids, each row fitted as ml_tokenizer_fit does. */
int ml_tokenizer_encode_batch(ml_tokenizer *tok, const char *const *texts, const size_t *lens,
                              int n, int32_t *ids, int length, bool truncate);

/* ids -> text as HF decodes: tokens joined, byte characters turned back into
 * bytes (invalid UTF-8 becomes U+FFFD), every "</w>" a space, whitespace
 * stripped at both ends.  Special tokens are kept unless skip_special.
 * Returns a malloc'd NUL-terminated string, its length in *len_out (if not
 * NULL; the text itself may hold NUL bytes); NULL + error on an id outside
 * the vocabulary. */
char *ml_tokenizer_decode(const ml_tokenizer *tok, const int32_t *ids, int n, bool skip_special,
                          size_t *len_out);

/* Vocabulary lookups (tokens as stored, i.e. in byte characters: "dog</w>").
 * token_to_id returns -1 (no error recorded) for an unknown token;
 * id_to_token NULL + error for an id outside the vocabulary. */
int32_t ml_tokenizer_token_to_id(const ml_tokenizer *tok, const char *token, size_t len);
const char *ml_tokenizer_id_to_token(const ml_tokenizer *tok, int32_t id);
bool ml_tokenizer_is_special(const ml_tokenizer *tok, int32_t id);

/* Drop the word -> BPE cache (memory, or timing a cold start). */
void ml_tokenizer_clear_cache(ml_tokenizer *tok);

#endif
