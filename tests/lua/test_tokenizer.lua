-- test_tokenizer.lua — the Lua face of the CLIP tokenizer: encode / batch /
-- decode against the ids Hugging Face's CLIPTokenizer gave for the fixture
-- prompts, the HF-style options, lookups and argument errors.  The
-- vocabulary comes from `make fixtures`.
local core = require "moonlit.core"
local util = require "testutil"

local DIR = "tests/fixtures/sd1-tiny/pipeline/tokenizer"
local FIXTURE = "tests/fixtures/sd1-tiny/tokenizer.json"
local PAD = {padding = "max_length", max_length = 77, truncation = true}

local function load()
    local f = io.open(DIR .. "/vocab.json", "rb")
    if not f then error(DIR .. "/vocab.json is missing: run `make fixtures`") end
    f:close()
    return core.tokenizer_load(DIR)
end

local function fixture() return core.json_load(FIXTURE) end

local tests = {}

function tests.fields_and_lookups(t)
    local tok = load()
    t:assertEq(tok.bos, 49406)
    t:assertEq(tok.eos, 49407)
    t:assertEq(tok.pad, 49407)
    t:assertEq(tok.unk, 49407)
    t:assertEq(tok.max_length, 77)
    t:assertEq(tok:vocab_size(), 49408)
    t:assertEq(tok:token_to_id("dog</w>"), 1929)
    t:assertEq(tok:token_to_id("<|endoftext|>"), 49407)
    t:assertEq(tok:token_to_id("not a token"), nil)
    t:assertEq(tok:id_to_token(1929), "dog</w>")
    t:assertEq(tok:id_to_token(0), "!")
    t:assertError(function() tok:id_to_token(49408) end, "49408")
    t:assertError(function() tok:id_to_token(-1) end, "not in the vocabulary")
    t:assert(tostring(tok):find("vocab_size=49408", 1, true), tostring(tok))
end

function tests.fixture_prompts(t)
    local tok, fx = load(), fixture()
    t:assert(#fx.prompts >= 16, "fixture prompts")
    for i, p in ipairs(fx.prompts) do
        t:assertEq(tok:encode(p), fx.ids[i], "prompt " .. i)
        t:assertEq(tok:encode(p, PAD), fx.padded_ids[i], "padded prompt " .. i)
    end
end

function tests.encode_batch_tensor(t)
    local tok, fx = load(), fixture()
    local ids = tok:encode_batch(fx.prompts, PAD)
    t:assertEq(ids:size(), {#fx.prompts, 77})
    t:assertEq(ids.dtype, "i64")
    t:assertEq(ids:totable(), fx.padded_ids)
    -- the pipeline's call: padding and an explicit max_length (truncation implied)
    local two = tok:encode_batch({"photo of a dog", ""}, {padding = "max_length", max_length = 77})
    t:assertEq(two:size(), {2, 77})
    t:assertEq(two:totable()[2][1], 49406)
end

function tests.encode_batch_unpadded_and_longest(t)
    local tok, fx = load(), fixture()
    t:assertEq(tok:encode_batch(fx.prompts), fx.ids)
    local ids = tok:encode_batch({"photo of a dog", "a photo of sks dog in a bucket"}, {padding = "longest"})
    t:assertEq(ids:totable(), {{49406, 1125, 539, 320, 1929, 49407, 49407, 49407, 49407, 49407},
                               {49406, 320, 1125, 539, 48136, 1929, 530, 320, 10498, 49407}})
    t:assertEq(tok:encode_batch({"a"}, {padding = true}):size(), {1, 3})
    t:assertEq(tok:encode_batch({}, {}), {})
end

function tests.options_follow_hf(t)
    local tok, fx = load(), fixture()
    local long = fx.prompts[14]
    t:assertEq(#tok:encode(long), 86, "no truncation by default")
    local cut = tok:encode(long, {max_length = 77})
    t:assertEq(#cut, 77, "a max_length turns truncation on")
    t:assertEq(cut[77], 49407, "EOS stays last")
    t:assertEq(#tok:encode(long, {padding = "max_length", truncation = false}), 86,
               "padding alone does not truncate")
    t:assertEq(#tok:encode("a", {padding = "max_length", max_length = 5}), 5)
    t:assertEq(tok:encode("a", {padding = "max_length", max_length = 5}), {49406, 320, 49407, 49407, 49407})
    t:assertEq(tok:encode("a", {padding = false, max_length = 5}), {49406, 320, 49407})
    t:assertError(function() tok:encode_batch({long}, {padding = "max_length", truncation = false}) end,
                  "86 tokens")
end

function tests.decode(t)
    local tok, fx = load(), fixture()
    t:assertEq(tok:decode(fx.ids[1]), "<|startoftext|>photo of a unqtkn dog <|endoftext|>")
    t:assertEq(tok:decode(fx.ids[1], {skip_special_tokens = true}), "photo of a unqtkn dog")
    t:assertEq(tok:decode(fx.ids[4], {skip_special_tokens = true}),
               "a photo of a unqtkn dog sleeping , 4 k , highly - detailed !!!")
    t:assertEq(tok:decode({139, 49407, 320}), "\u{FFFD}<|endoftext|>a", "broken UTF-8 becomes U+FFFD")
    t:assertEq(tok:decode({}), "")
    local batch = tok:encode_batch({"photo of a dog", "café"}, PAD)
    t:assertEq(tok:decode(batch, {skip_special_tokens = true}), {"photo of a dog", "café"})
    t:assertEq(tok:decode(batch:select(1, 1), {skip_special_tokens = true}), "photo of a dog")
    for i = 1, 5 do   -- ids -> text -> ids on plain ASCII prompts
        local text = tok:decode(fx.ids[i], {skip_special_tokens = true})
        t:assertEq(tok:encode(text), fx.ids[i], "round trip " .. i)
    end
end

function tests.bad_arguments(t)
    local tok = load()
    t:assertError(function() core.tokenizer_load("tests/fixtures/no-such-tokenizer") end, "no-such-tokenizer")
    t:assertError(function() tok:encode(nil) end, "string expected")
    t:assertError(function() tok:encode("a", {padding = "bogus"}) end, "option 'padding'")
    t:assertError(function() tok:encode("a", {max_length = 1}) end, "max_length")
    t:assertError(function() tok:encode("a", {truncation = "yes"}) end, "truncation")
    t:assertError(function() tok:encode("\xff") end, "UTF-8")
    t:assertError(function() tok:encode_batch("a") end, "table expected")
    t:assertError(function() tok:encode_batch({"a", 3}) end, "texts[2]")
    t:assertError(function() tok:decode({320, "x"}) end, "ids[2]")
    t:assertError(function() tok:decode({320, 99999}) end, "99999")
    t:assertError(function() tok:decode(core.zeros(2, 2, 2)) end, "1-D/2-D")
end

-- A tokenizer without merges would split every word into single characters:
-- an empty or header-only merges.txt, or an empty model.merges, is refused.
function tests.no_merges_refused(t)
    local dir = util.temp_dir()
    local vocab = '{"a": 0, "a</w>": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}'
    util.write_file(dir .. "/vocab.json", vocab)
    for _, text in ipairs({"", "#version: 0.2\n", "#version: 0.2\n\n"}) do
        util.write_file(dir .. "/merges.txt", text)
        t:assertError(function() core.tokenizer_load(dir) end, dir .. "/merges.txt holds no merges",
                      string.format("merges.txt %q", text))
    end
    os.remove(dir .. "/merges.txt")
    os.remove(dir .. "/vocab.json")
    util.write_file(dir .. "/tokenizer.json", '{"model": {"type": "BPE", "end_of_word_suffix": "</w>", '
                    .. '"vocab": ' .. vocab .. ', "merges": []}, "added_tokens": []}')
    t:assertError(function() core.tokenizer_load(dir) end,
                  dir .. "/tokenizer.json: model.merges holds no merges", "empty model.merges")
    -- one merge is enough
    util.write_file(dir .. "/tokenizer.json", '{"model": {"type": "BPE", "end_of_word_suffix": "</w>", '
                    .. '"vocab": {"a": 0, "a</w>": 1, "aa</w>": 4, "<|startoftext|>": 2, "<|endoftext|>": 3}, '
                    .. '"merges": ["a a</w>"]}, "added_tokens": []}')
    t:assertEq(core.tokenizer_load(dir):encode("aa"), {2, 4, 3})
    util.remove_tree(dir)
end

function tests.close(t)
    local tok = load()
    tok:close()
    tok:close()
    t:assertEq(tostring(tok), "Tokenizer(closed)")
    t:assertError(function() tok:encode("a") end, "closed tokenizer")
    t:assertError(function() return tok.bos end, "closed tokenizer")
    do
        local scoped <close> = load()
        t:assertEq(scoped:encode("dog"), {49406, 1929, 49407})
    end
end

return tests
