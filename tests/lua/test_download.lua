-- test_download.lua — scripts/download_model.sh against a fake hub
-- (tests/support/fake_hub.py on a free local port; no network): the cache
-- layout and contents, a second run that fetches nothing, resuming with a
-- Range request after an interrupted download, corrupt files detected and
-- deleted, the gated-model (401) message, HTTP errors, the include filter.
local U = require "testutil"
local tests = {}

local SCRIPT = "scripts/download_model.sh"
local REPO = "org/tiny-sd"
local COMMIT = "0123456789abcdef0123456789abcdef01234567"

local q = U.shell_quote

-- The binary running this suite (the parser of the hub's JSON).
local moonlit_bin = U.moonlit_bin

-- Deterministic bytes, different for each seed (xorshift32).
local function bytes(n, seed)
    local x = seed * 2654435761 % 4294967296
    if x == 0 then x = 1 end
    local out, chunk = {}, {}
    for i = 1, n do
        x = x ~ ((x << 13) & 0xffffffff)
        x = x ~ (x >> 17)
        x = x ~ ((x << 5) & 0xffffffff)
        chunk[#chunk + 1] = x & 0xff
        if #chunk == 4096 or i == n then
            out[#out + 1] = string.char(table.unpack(chunk))
            chunk = {}
        end
    end
    return table.concat(out)
end

-- The repository the fake hub serves: what a diffusers SD repo holds,
-- including the files the default filter must skip.
local function repo_files()
    return {
        ["model_index.json"] = '{"_class_name": "StableDiffusionPipeline"}\n',
        ["scheduler/scheduler_config.json"] = '{"beta_start": 0.00085}\n',
        ["tokenizer/vocab.json"] = '{"a</w>": 0}\n',
        ["tokenizer/merges.txt"] = "#version: 0.2\n",
        ["text_encoder/config.json"] = '{"hidden_size": 32}\n',
        ["text_encoder/model.safetensors"] = bytes(40000, 1),
        ["unet/config.json"] = '{"sample_size": 32}\n',
        ["unet/diffusion_pytorch_model.safetensors"] = bytes(200000, 2),
        ["vae/config.json"] = '{"latent_channels": 4}\n',
        ["vae/diffusion_pytorch_model.safetensors"] = bytes(60000, 3),
        -- not for moonlit:
        ["unet/diffusion_pytorch_model.bin"] = bytes(5000, 4),
        ["unet/diffusion_pytorch_model.fp16.safetensors"] = bytes(5000, 5),
        ["vae/diffusion_pytorch_model.msgpack"] = bytes(3000, 6),
        ["safety_checker/config.json"] = '{"x": 1}\n',
        ["safety_checker/model.safetensors"] = bytes(3000, 7),
        ["feature_extractor/preprocessor_config.json"] = '{"crop_size": 224}\n',
        ["sd-v1-4.ckpt"] = bytes(4000, 8),
        ["README.md"] = "# tiny\n",
    }
end

local WANTED = {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                "tokenizer/merges.txt", "text_encoder/config.json", "text_encoder/model.safetensors",
                "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors"}
local SKIPPED = {"unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
                 "vae/diffusion_pytorch_model.msgpack", "safety_checker/config.json",
                 "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json",
                 "sd-v1-4.ckpt", "README.md"}

local function exists(path)
    local f = io.open(path, "rb")
    if f then f:close() return true end
    return false
end

local function sleep(s) os.execute("sleep " .. s) end

-- Runs body(hub) with a fake hub serving `files`, and always stops the
-- server and removes its folders, also when body fails.
local function with_hub(t, files, body)
    local bin = moonlit_bin()
    if not t:assert(bin, "no moonlit binary known (set MOONLIT_BIN)") then return end
    if not t:assert(os.execute("command -v python3 >/dev/null && command -v curl >/dev/null"),
                    "the download tests need python3 and curl") then return end
    local dir = U.temp_dir()
    local hub = {dir = dir, root = dir .. "/hub", cache = dir .. "/cache", files = files, bin = bin}
    local repo_dir = hub.root .. "/repos/" .. REPO
    for name, data in pairs(files) do
        local sub = (repo_dir .. "/" .. name):match("^(.*)/[^/]*$")
        os.execute("mkdir -p " .. q(sub))
        U.write_file(repo_dir .. "/" .. name, data)
    end
    U.write_file(repo_dir .. ".sha", COMMIT .. "\n")
    local ok, err = pcall(function()
        assert(os.execute(string.format(
            "python3 tests/support/fake_hub.py --root %s --port-file %s --idle 30 >%s 2>&1 & echo $! >%s",
            q(hub.root), q(dir .. "/port"), q(dir .. "/server.log"), q(dir .. "/pid"))), "could not start the fake hub")
        hub.pid = assert(U.read_file(dir .. "/pid"):match("%d+"), "no pid for the fake hub")
        for _ = 1, 200 do
            if exists(dir .. "/port") then break end
            sleep(0.05)
        end
        assert(exists(dir .. "/port"), "the fake hub did not start: " ..
               (exists(dir .. "/server.log") and U.read_file(dir .. "/server.log") or ""))
        hub.server_pid = U.read_file(dir .. "/port.pid"):match("%d+")
        hub.port = U.read_file(dir .. "/port"):match("%d+")
        hub.endpoint = "http://127.0.0.1:" .. hub.port
        body(hub)
    end)
    -- The server itself, then the shell or wrapper that started it.
    for _, pid in ipairs({hub.server_pid, hub.pid}) do
        if pid then os.execute("kill " .. pid .. " 2>/dev/null") end
    end
    U.remove_tree(dir)
    if not ok then error(err, 0) end
end

-- Runs the script; returns (exit ok, output). extra: more arguments; env:
-- more variables. No retries and a time limit on every request, and
-- `timeout` around the whole run, so a broken server cannot hang the suite.
local function download(hub, opts)
    opts = opts or {}
    local env = {"MOONLIT=" .. q(hub.bin), "DOWNLOAD_RETRIES=0", "DOWNLOAD_MAX_TIME=20", "HF_TOKEN="}
    for k, v in pairs(opts.env or {}) do env[#env + 1] = k .. "=" .. q(v) end
    local cmd = string.format("env %s timeout 60 %s %s %s %s --endpoint %s %s 2>&1", table.concat(env, " "),
                              SCRIPT, q(REPO), q(opts.revision or COMMIT), q(hub.cache), q(hub.endpoint),
                              opts.args or "")
    local p = io.popen(cmd)
    local out = p:read("a")
    local ok = p:close()
    return ok == true, out
end

local function control(hub, tbl)
    local core = require "moonlit.core"
    if tbl then core.json_save(hub.root .. "/control.json", tbl)
    else os.remove(hub.root .. "/control.json") end
end

local function requests(hub)
    if not exists(hub.root .. "/requests.log") then return {} end
    local lines = {}
    for l in U.read_file(hub.root .. "/requests.log"):gmatch("[^\n]+") do lines[#lines + 1] = l end
    return lines
end

local function count_file_requests(hub)
    local n = 0
    for _, l in ipairs(requests(hub)) do if l:find("/resolve/", 1, true) then n = n + 1 end end
    return n
end

local function snapshot(hub) return hub.cache .. "/models--org--tiny-sd/snapshots/" .. COMMIT end

local function shell_out(cmd)
    local p = io.popen(cmd)
    local s = p:read("a")
    p:close()
    return s
end

-- Reference hashes from the coreutils tools over bytes written here.
local function sha256_of(dir, data)
    U.write_file(dir .. "/hash.in", data)
    return shell_out("sha256sum " .. q(dir .. "/hash.in")):match("^(%x+)")
end
local function git_blob_of(dir, data)
    U.write_file(dir .. "/hash.in", "blob " .. #data .. "\0" .. data)
    return shell_out("sha1sum " .. q(dir .. "/hash.in")):match("^(%x+)")
end

local function invert(data) return (data:gsub(".", function(c) return string.char(255 - c:byte()) end)) end

function tests.full_download_lands_in_the_cache_layout_and_a_second_run_fetches_nothing(t)
    with_hub(t, repo_files(), function(hub)
        local ok, out = download(hub)
        if not t:assert(ok, "first run failed:\n" .. out) then return end
        for _, name in ipairs(WANTED) do
            local path = snapshot(hub) .. "/" .. name
            if t:assert(exists(path), "missing " .. name) then
                t:assert(U.read_file(path) == hub.files[name], name .. ": contents differ from the hub's")
            end
            t:assert(not exists(path .. ".incomplete"), name .. ".incomplete left behind")
            t:assert(U.has(out, name), "no progress line for " .. name)
        end
        t:assert(U.has(out, "10 downloaded"), "summary counts 10 files:\n" .. out)
        t:assertEq(count_file_requests(hub), #WANTED, "one request per wanted file")

        local n_before = count_file_requests(hub)
        ok, out = download(hub)
        t:assert(ok, "second run failed:\n" .. out)
        t:assertEq(count_file_requests(hub), n_before, "the second run fetched files")
        t:assert(U.has(out, "nothing to download"), "the second run says it fetched nothing:\n" .. out)

        -- A copy changed in place is fetched again (only that one).
        local changed = snapshot(hub) .. "/unet/config.json"
        U.write_file(changed, '{"sample_size": 64}\n')
        ok, out = download(hub)
        t:assert(ok, "third run failed:\n" .. out)
        t:assertEq(U.read_file(changed), hub.files["unet/config.json"], "the changed copy is restored")
        t:assertEq(count_file_requests(hub), n_before + 1, "only the changed file is fetched again")
    end)
end

function tests.default_filter_skips_bin_ckpt_fp16_and_safety_checker_and_include_overrides(t)
    with_hub(t, repo_files(), function(hub)
        local ok, out = download(hub, {revision = "main"})
        if not t:assert(ok, "run failed:\n" .. out) then return end
        for _, name in ipairs(SKIPPED) do
            t:assert(not exists(snapshot(hub) .. "/" .. name), "fetched " .. name .. " though not wanted")
        end
        -- A branch maps to its commit in refs/, as in the hub's cache.
        t:assertEq(U.read_file(hub.cache .. "/models--org--tiny-sd/refs/main"), COMMIT, "refs/main")

        ok, out = download(hub, {args = "--include 'unet/*,*.ckpt'"})
        if not t:assert(ok, "run with --include failed:\n" .. out) then return end
        for _, name in ipairs({"unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
                               "sd-v1-4.ckpt"}) do
            local path = snapshot(hub) .. "/" .. name
            t:assert(exists(path) and U.read_file(path) == hub.files[name], "--include did not fetch " .. name)
        end
        t:assert(not exists(snapshot(hub) .. "/safety_checker"), "--include fetched the safety checker")

        ok, out = download(hub, {args = "--include 'nothing/*'"})
        t:assert(not ok and U.has(out, "no file") and U.has(out, "nothing/*"),
                 "an include matching nothing fails and names the pattern:\n" .. out)
    end)
end

function tests.revision_without_safetensors_weights_is_refused_before_downloading(t)
    local files = repo_files()
    files["unet/diffusion_pytorch_model.safetensors"] = nil
    with_hub(t, files, function(hub)
        local ok, out = download(hub)
        t:assert(not ok, "a revision moonlit cannot load must fail")
        t:assert(U.has(out, "lacks unet/diffusion_pytorch_model.safetensors") and
                 U.has(out, "unet/diffusion_pytorch_model.bin"), "names the missing file and the .bin found:\n" .. out)
        t:assertEq(count_file_requests(hub), 0, "nothing downloaded")
        ok, out = download(hub, {args = "--include 'unet/*'"})
        t:assert(ok, "an explicit --include takes what there is:\n" .. out)
    end)
end

function tests.interrupted_download_fails_then_resumes_with_a_range_request(t)
    with_hub(t, repo_files(), function(hub)
        local name = "unet/diffusion_pytorch_model.safetensors"
        control(hub, {truncate = {[name] = 70000}})
        local ok, out = download(hub)
        t:assert(not ok, "a truncated transfer must fail")
        t:assert(U.has(out, name) and U.has(out, "run again to resume"), "names the file and says to rerun:\n" .. out)
        local target = snapshot(hub) .. "/" .. name
        t:assert(not exists(target), "an incomplete file was renamed into place")
        t:assert(not exists(snapshot(hub) .. "/model_index.json"),
                 "model_index.json (fetched last) is absent while the folder is incomplete")
        if t:assert(exists(target .. ".incomplete"), "the partial file is kept") then
            t:assertEq(#U.read_file(target .. ".incomplete"), 70000, "partial size")
        end

        control(hub, nil)
        ok, out = download(hub)
        if not t:assert(ok, "the rerun failed:\n" .. out) then return end
        t:assert(U.read_file(target) == hub.files[name], "resumed file equals the hub's")
        t:assert(not exists(target .. ".incomplete"), "the partial file is gone")
        local ranged = false
        for _, l in ipairs(requests(hub)) do
            if U.has(l, name) and U.has(l, "range=bytes=70000-") then ranged = true end
        end
        t:assert(ranged, "the rerun asked for the rest with Range: bytes=70000-:\n" ..
                 table.concat(requests(hub), "\n"))
        t:assert(U.has(out, "resuming"), "the rerun says it resumes:\n" .. out)
    end)
end

function tests.server_without_range_support_restarts_the_file(t)
    with_hub(t, repo_files(), function(hub)
        local name = "vae/diffusion_pytorch_model.safetensors"
        local target = snapshot(hub) .. "/" .. name
        os.execute("mkdir -p " .. q(snapshot(hub) .. "/vae"))
        U.write_file(target .. ".incomplete", hub.files[name]:sub(1, 1000))
        control(hub, {no_range = true})
        local ok, out = download(hub)
        if not t:assert(ok, "run failed:\n" .. out) then return end
        t:assert(U.read_file(target) == hub.files[name], "file equals the hub's")
        t:assert(U.has(out, "cannot resume"), "says it starts afresh:\n" .. out)
    end)
end

function tests.corrupt_files_are_detected_deleted_and_named_with_both_hashes(t)
    with_hub(t, repo_files(), function(hub)
        local big, small = "vae/diffusion_pytorch_model.safetensors", "unet/config.json"
        control(hub, {corrupt = {big}})
        local ok, out = download(hub)
        t:assert(not ok, "a corrupt LFS file must fail")
        local want, got = sha256_of(hub.dir, hub.files[big]), sha256_of(hub.dir, invert(hub.files[big]))
        t:assert(U.has(out, big) and U.has(out, "sha256 mismatch"), "names the file and the check:\n" .. out)
        t:assert(U.has(out, want) and U.has(out, got), "names both hashes " .. want .. ", " .. got .. ":\n" .. out)
        t:assert(not exists(snapshot(hub) .. "/" .. big) and not exists(snapshot(hub) .. "/" .. big .. ".incomplete"),
                 "the bad file was deleted")

        U.remove_tree(hub.cache)            -- the first run fetched the small files intact
        control(hub, {corrupt = {small}})
        ok, out = download(hub)
        t:assert(not ok, "a corrupt small file must fail")
        want, got = git_blob_of(hub.dir, hub.files[small]), git_blob_of(hub.dir, invert(hub.files[small]))
        t:assert(U.has(out, small) and U.has(out, "git blob id mismatch"), "names the file and the check:\n" .. out)
        t:assert(U.has(out, want) and U.has(out, got), "names both blob ids " .. want .. ", " .. got .. ":\n" .. out)
        t:assert(not exists(snapshot(hub) .. "/" .. small), "the bad small file was deleted")

        control(hub, nil)
        ok, out = download(hub)
        t:assert(ok, "after the hub is fixed, a rerun completes:\n" .. out)
        t:assert(exists(snapshot(hub) .. "/" .. big) and U.read_file(snapshot(hub) .. "/" .. big) == hub.files[big],
                 "the good file replaces the bad one")
    end)
end

function tests.gated_model_401_says_to_accept_the_licence_and_set_hf_token(t)
    with_hub(t, repo_files(), function(hub)
        control(hub, {token = "hf_test_token"})
        local ok, out = download(hub)
        t:assert(not ok, "a 401 must fail")
        t:assert(U.has(out, "HTTP 401") and U.has(out, "licence") and U.has(out, "HF_TOKEN"),
                 "the 401 message names the status, the licence and HF_TOKEN:\n" .. out)
        ok, out = download(hub, {env = {HF_TOKEN = "hf_wrong"}})
        t:assert(not ok and U.has(out, "HF_TOKEN given was refused"), "a wrong token is called so:\n" .. out)
        ok, out = download(hub, {env = {HF_TOKEN = "hf_test_token"}})
        t:assert(ok, "with the token the download works:\n" .. out)
        t:assert(exists(snapshot(hub) .. "/unet/diffusion_pytorch_model.safetensors"), "files fetched with the token")
    end)
end

function tests.http_errors_name_the_status_and_the_file(t)
    with_hub(t, repo_files(), function(hub)
        control(hub, {status = {api = 500}})
        local ok, out = download(hub)
        t:assert(not ok and U.has(out, "HTTP 500") and U.has(out, "listing"), "API 500:\n" .. out)

        local name = "text_encoder/model.safetensors"
        control(hub, {status = {[name] = 503}})
        ok, out = download(hub)
        t:assert(not ok and U.has(out, "HTTP 503") and U.has(out, name), "file 503 names the file:\n" .. out)
        t:assert(not exists(snapshot(hub) .. "/" .. name), "nothing renamed into place")

        control(hub, nil)
        ok, out = download(hub, {revision = "no-such-branch"})
        t:assert(not ok and U.has(out, "HTTP 404") and U.has(out, "no-such-branch"), "unknown revision:\n" .. out)
    end)
end

function tests.bad_arguments_are_refused_with_usage(t)
    local function run(args)
        local p = io.popen("timeout 20 " .. SCRIPT .. " " .. args .. " 2>&1")
        local out = p:read("a")
        return p:close() == true, out
    end
    local ok, out = run("org/model")
    t:assert(not ok and U.has(out, "expected 3 arguments") and U.has(out, "usage:"), "too few arguments:\n" .. out)
    ok, out = run("'../etc' main /nonexistent-dest")
    t:assert(not ok and U.has(out, "not of the form owner/name"), "bad repo id:\n" .. out)
    ok, out = run("org/model main d --frobnicate")
    t:assert(not ok and U.has(out, "unknown option --frobnicate"), "unknown option:\n" .. out)
    ok, out = run("org/model main d --endpoint ftp://x")
    t:assert(not ok and U.has(out, "not an http(s) URL"), "bad endpoint:\n" .. out)
end

return tests
