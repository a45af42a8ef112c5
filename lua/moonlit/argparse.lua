-- moonlit.argparse (ml.argparse) — the command-line parser of every example
-- and script, so they all accept the same forms, print the same --help and
-- name the flag that was wrong.
--
--   local argparse = require "moonlit.argparse"
--   local p = argparse.new("generate.lua", "Text to image.")
--   p:option("steps", {type = "integer", default = 50, help = "denoising steps"})
--   p:positional("model", {required = false, help = "model folder"})
--   local args = p:parse(arg)              -- errors: message on stderr, exit 2
--   local args, msg, kind = p:parse(argv, {exit = false})
--       -- error: nil, message, "error";  --help: nil, help text, "help"
--
-- Rules (docs/cli.md has the user's side of them):
--   --name value and --name=value; "_" and "-" in a name are the same flag.
--   A value taken from the next argument must not look like a flag: it may
--   start with "-" only if it is a number (--lr -1) or "-" alone; otherwise
--   write --name=-value.
--   Types: string, number (finite), integer (64-bit, no fraction), boolean
--   (--flag, --flag=yes|no|true|false|on|off|1|0, --no_flag / --no-flag),
--   list (comma-separated, items trimmed, empty items dropped).
--   A flag given twice: the last one wins (as Python's argparse).
--   Flags are never abbreviated: --step is unknown even if --steps exists
--   (it is suggested instead).  "--" ends the flags; what follows is
--   positional.
local argparse = {}

local TYPES = {string = "STRING", number = "NUMBER", integer = "INT", boolean = "", list = "A,B,..."}

local TRUE_WORDS = {["true"] = true, ["1"] = true, yes = true, on = true}
local FALSE_WORDS = {["false"] = true, ["0"] = true, no = true, off = true}

local Parser = {}
Parser.__index = Parser

local function canonical(name) return (name:gsub("-", "_")) end

function argparse.new(prog, description)
    if type(prog) ~= "string" or prog == "" then error("argparse.new: prog must be a non-empty string", 2) end
    return setmetatable({prog = prog, description = description, options = {}, by_name = {}, positionals = {}},
                        Parser)
end

-- Converts the text `s` given for `what` (e.g. "--steps") to the option's
-- type; returns the value or nil, message.
local function convert(spec, s, what)
    local t = spec.type
    local v
    if t == "string" then
        v = s
    elseif t == "number" then
        v = tonumber(s)
        if v == nil or v ~= v or v == math.huge or v == -math.huge then
            return nil, string.format("%s expects a number, got '%s'", what, s)
        end
    elseif t == "integer" then
        local n = tonumber(s)
        v = n and math.tointeger(n)
        if v == nil then return nil, string.format("%s expects an integer, got '%s'", what, s) end
    elseif t == "boolean" then
        local w = s:lower()
        if TRUE_WORDS[w] then v = true
        elseif FALSE_WORDS[w] then v = false
        else return nil, string.format("%s expects true/false (yes/no, on/off, 1/0), got '%s'", what, s) end
    elseif t == "list" then
        v = {}
        for item in (s .. ","):gmatch("([^,]*),") do
            item = item:match("^%s*(.-)%s*$")
            if item ~= "" then v[#v + 1] = item end
        end
    end
    if spec.choices and t ~= "list" then
        local ok = false
        for _, c in ipairs(spec.choices) do if c == v then ok = true break end end
        if not ok then
            local names = {}
            for i, c in ipairs(spec.choices) do names[i] = tostring(c) end
            return nil, string.format("%s must be one of %s (got '%s')", what, table.concat(names, ", "), s)
        end
    end
    return v
end

local function check_spec(spec, where)
    spec = spec or {}
    if type(spec) ~= "table" then error(where .. ": the spec must be a table", 3) end
    local t = spec.type or "string"
    if TYPES[t] == nil then
        error(string.format("%s: unknown type '%s' (string, number, integer, boolean, list)", where, tostring(t)), 3)
    end
    if spec.choices ~= nil and (type(spec.choices) ~= "table" or #spec.choices == 0) then
        error(where .. ": choices must be a non-empty list", 3)
    end
    local s = {}
    for k, v in pairs(spec) do s[k] = v end
    s.type = t
    return s
end

-- option(name, {type = "string", default, required, choices, help, metavar}) -> self
function Parser:option(name, spec)
    if type(name) ~= "string" or not name:match("^[%a][%w_%-]*$") then
        error("argparse: bad option name '" .. tostring(name) .. "'", 2)
    end
    local key = canonical(name)
    if self.by_name[key] or key == "help" then error("argparse: option --" .. key .. " declared twice", 2) end
    for _, ps in ipairs(self.positionals) do
        if ps.name == key then error("argparse: option --" .. key .. " has the name of a positional", 2) end
    end
    local s = check_spec(spec, "argparse: option --" .. key)
    s.name = key
    if s.default ~= nil then
        local ok = s.type == "list" and type(s.default) == "table" or
                   s.type == "integer" and math.type(s.default) == "integer" or
                   s.type == "number" and type(s.default) == "number" or
                   s.type == "boolean" and type(s.default) == "boolean" or
                   s.type == "string" and type(s.default) == "string"
        if not ok then error("argparse: option --" .. key .. ": default does not have type " .. s.type, 2) end
        if s.choices and s.type ~= "list" then
            local _, msg = convert(s, tostring(s.default), "default of --" .. key)
            if msg then error("argparse: " .. msg, 2) end
        end
    end
    self.options[#self.options + 1] = s
    self.by_name[key] = s
    return self
end

-- positional(name, {type = "string", required = true, help}) -> self.
-- Positionals fill in declaration order; a required one cannot follow an
-- optional one.
function Parser:positional(name, spec)
    if type(name) ~= "string" or name == "" then error("argparse: bad positional name", 2) end
    local s = check_spec(spec, "argparse: positional <" .. name .. ">")
    s.name = canonical(name)
    if self.by_name[s.name] then error("argparse: positional <" .. name .. "> has the name of an option", 2) end
    if s.required == nil then s.required = true end
    local last = self.positionals[#self.positionals]
    if s.required and last and not last.required then
        error("argparse: required positional <" .. name .. "> after an optional one", 2)
    end
    self.positionals[#self.positionals + 1] = s
    return self
end

local function metavar(o)
    if o.metavar then return o.metavar end
    if o.choices and o.type ~= "list" then return "{" .. table.concat(o.choices, ",") .. "}" end
    return TYPES[o.type]
end

function Parser:usage()
    local parts = {"usage: " .. self.prog}
    for _, o in ipairs(self.options) do
        if o.required then parts[#parts + 1] = "--" .. o.name .. " " .. metavar(o) end
    end
    parts[#parts + 1] = "[options]"
    for _, ps in ipairs(self.positionals) do
        parts[#parts + 1] = ps.required and "<" .. ps.name .. ">" or "[" .. ps.name .. "]"
    end
    return table.concat(parts, " ")
end

local function show_default(o)
    local d = o.default
    if o.type == "list" then return table.concat(d, ",") end
    if o.type == "string" then return d == "" and '""' or d end
    return tostring(d)
end

-- Words of `text` in lines of at most `width` characters, each but the first
-- indented by `indent` spaces.
local function wrap(text, indent, width)
    local lines, line = {}, ""
    for word in text:gmatch("%S+") do
        if line ~= "" and #line + 1 + #word > width then
            lines[#lines + 1] = line
            line = word
        else
            line = line == "" and word or line .. " " .. word
        end
    end
    lines[#lines + 1] = line
    return table.concat(lines, "\n" .. string.rep(" ", indent))
end

local COL = 30
local function entry(left, text)
    local pad = #left + 2 <= COL and string.rep(" ", COL - #left) or "\n" .. string.rep(" ", COL)
    return left .. pad .. wrap(text, COL, 100 - COL)
end

function Parser:help()
    local out = {self:usage()}
    if self.description then out[#out + 1] = "\n" .. wrap(self.description, 0, 100) end
    if #self.positionals > 0 then
        out[#out + 1] = "\narguments:"
        for _, ps in ipairs(self.positionals) do
            local text = (ps.help or "") .. (ps.type ~= "string" and " (" .. ps.type .. ")" or "")
            if not ps.required then text = text .. " (optional)" end
            out[#out + 1] = entry("  " .. ps.name, text)
        end
    end
    out[#out + 1] = "\noptions:"
    for _, o in ipairs(self.options) do
        local left = o.type == "boolean" and "  --[no_]" .. o.name or "  --" .. o.name .. " " .. metavar(o)
        local notes = {}
        if o.type ~= "string" and not (o.choices and o.type ~= "list") then notes[#notes + 1] = o.type end
        if o.required then notes[#notes + 1] = "required"
        elseif o.default ~= nil then notes[#notes + 1] = "default: " .. show_default(o) end
        local text = o.help or ""
        if #notes > 0 then text = text .. (text ~= "" and " " or "") .. "(" .. table.concat(notes, "; ") .. ")" end
        out[#out + 1] = entry(left, text)
    end
    out[#out + 1] = entry("  -h, --help", "show this help and exit")
    return table.concat(out, "\n") .. "\n"
end

-- Levenshtein distance with adjacent transpositions (a typo's usual shapes).
local function distance(a, b)
    local prev2, prev, cur = nil, {}, nil
    for j = 0, #b do prev[j] = j end
    for i = 1, #a do
        cur = {[0] = i}
        for j = 1, #b do
            local cost = a:byte(i) == b:byte(j) and 0 or 1
            local v = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if prev2 and i > 1 and j > 1 and a:byte(i) == b:byte(j - 1) and a:byte(i - 1) == b:byte(j) then
                v = math.min(v, prev2[j - 2] + 1)
            end
            cur[j] = v
        end
        prev2, prev = prev, cur
    end
    return prev[#b]
end

-- The declared flag closest to the unknown `key`, if it is close enough to
-- be a typo (or `key` is a prefix of it).
function Parser:suggest(key)
    local best, best_d
    local names = {"help"}
    for _, o in ipairs(self.options) do names[#names + 1] = o.name end
    for _, n in ipairs(names) do
        local d = distance(key, n)
        if #key >= 3 and n:sub(1, #key) == key then d = math.min(d, 1) end
        if d <= math.max(2, #key // 3) and (best_d == nil or d < best_d) then best, best_d = n, d end
    end
    return best
end

-- A value taken from the next argument must not be another flag.
local function looks_like_value(s)
    if s == nil then return false end
    if s:sub(1, 1) ~= "-" or s == "-" then return true end
    return tonumber(s) ~= nil
end

-- parse(argv, {exit = true}): argv[1..#argv] (Lua's `arg`).  Returns the
-- args table: every option by its "_" name (default filled in, nil when
-- neither given nor defaulted), declared positionals by name, _positional
-- (every positional, in order) and _given (set of option names the user
-- passed).  See the file's first comment for what happens on errors.
function Parser:parse(argv, opts)
    opts = opts or {}
    local ok, res = pcall(self.parse_or_raise, self, argv or {})
    if ok then return res end
    if type(res) ~= "table" then error(res, 0) end     -- a bug in the parser, not a bad flag: raise it again
    if opts.exit == false then return nil, res.text, res.kind end
    if res.kind == "help" then
        io.stdout:write(res.text)
        io.stdout:flush()
        os.exit(0)
    end
    self:error(res.text)
end

local function fail(text) error({kind = "error", text = text}, 0) end

function Parser:parse_or_raise(argv)
    local args, given, positional = {}, {}, {}
    local function set(o, text, what)
        local v, msg = convert(o, text, what)
        if msg then fail(msg) end
        args[o.name] = v
        given[o.name] = true
    end
    local i, n, flags_done = 1, #argv, false
    while i <= n do
        local a = argv[i]
        if type(a) ~= "string" then fail("argument " .. i .. " is not a string") end
        if flags_done or a == "-" or a:sub(1, 1) ~= "-" or (a:sub(1, 2) ~= "--" and tonumber(a)) then
            positional[#positional + 1] = a
        elseif a == "--" then
            flags_done = true
        elseif a == "-h" or a == "--help" then
            error({kind = "help", text = self:help()}, 0)
        elseif a:sub(1, 2) ~= "--" then
            fail("unknown option " .. a .. " (flags are written --name)")
        else
            local body = a:sub(3)
            local name, value = body:match("^([^=]*)=(.*)$")
            name = canonical(name or body)
            local flag = "--" .. (a:match("^%-%-([^=]*)") or "")
            local o = self.by_name[name]
            local negated = false
            if not o and name:sub(1, 3) == "no_" and self.by_name[name:sub(4)] then
                o, negated = self.by_name[name:sub(4)], true
                if o.type ~= "boolean" then fail(flag .. ": --" .. o.name .. " is not a boolean flag") end
                if value ~= nil then fail(flag .. " takes no value (it sets --" .. o.name .. " to false)") end
            end
            if not o then
                local near = self:suggest(name)
                fail("unknown option " .. flag .. (near and " (did you mean --" .. near .. "?)" or ""))
            end
            if negated then
                args[o.name], given[o.name] = false, true
            elseif value ~= nil then
                set(o, value, flag)
            elseif o.type == "boolean" then
                args[o.name], given[o.name] = true, true
            else
                local v = argv[i + 1]
                if not looks_like_value(v) then
                    fail(flag .. " needs a value" .. (v and " (got the flag " .. v .. "; write " .. flag ..
                         "=VALUE for a value that starts with -)" or ""))
                end
                set(o, v, flag)
                i = i + 1
            end
        end
        i = i + 1
    end

    local missing = {}
    for _, o in ipairs(self.options) do
        if not given[o.name] then
            if o.required then missing[#missing + 1] = "--" .. o.name end
            local d = o.default
            if type(d) == "table" then
                local copy = {}
                for k, v in ipairs(d) do copy[k] = v end
                d = copy
            end
            args[o.name] = d
        end
    end
    if #missing > 0 then
        fail("missing required option" .. (#missing > 1 and "s " or " ") .. table.concat(missing, ", "))
    end
    local decl = self.positionals
    if #positional > #decl then
        fail("unexpected argument '" .. positional[#decl + 1] .. "'")
    end
    for k, ps in ipairs(decl) do
        local text = positional[k]
        if text == nil then
            if ps.required then fail("missing argument <" .. ps.name .. ">") end
            args[ps.name] = ps.default
        else
            local v, msg = convert(ps, text, "<" .. ps.name .. ">")
            if msg then fail(msg) end
            positional[k] = v
            args[ps.name] = v
        end
    end
    args._positional = positional
    args._given = given
    self.last_given = given
    return args
end

-- error(message): a check the script makes after parsing failed; reported
-- as parse reports its own errors ("<prog>: message", a hint, exit 2).
function Parser:error(message)
    io.stderr:write(self.prog .. ": " .. message .. "\nrun with --help for usage\n")
    io.stderr:flush()
    os.exit(2)
end

-- given(name): whether the last parse saw the flag (either spelling).
function Parser:given(name)
    return self.last_given ~= nil and self.last_given[canonical(name)] == true
end

return argparse
