-- moonlit.options — strict option tables: a misspelt option name or an
-- unknown choice is an error naming it and listing what is accepted, never
-- silently ignored.
--   local options = require "moonlit.options"
--   options.check_options("sd.generate", opts, {"prompt", "seed", ...})
--   options.check_choice("sd.load", "components", "bogus", {"unet", "vae"})
local M = {}

-- Levenshtein distance, for the "did you mean" hint on short names.
local function distance(a, b)
    local prev = {}
    for j = 0, #b do prev[j] = j end
    for i = 1, #a do
        local cur = {[0] = i}
        for j = 1, #b do
            local cost = a:sub(i, i) == b:sub(j, j) and 0 or 1
            cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
        end
        prev = cur
    end
    return prev[#b]
end

local function sorted_names(allowed)
    local list = {}
    if allowed[1] ~= nil then
        for _, v in ipairs(allowed) do list[#list + 1] = tostring(v) end
    else
        for k in pairs(allowed) do list[#list + 1] = tostring(k) end
    end
    table.sort(list)
    return list
end

local function closest(name, list)
    local best, best_d
    for _, v in ipairs(list) do
        local d = distance(name, v)
        if not best_d or d < best_d then best, best_d = v, d end
    end
    if best and best_d <= math.max(1, #name // 3) then return best end
    return nil
end

local function as_set(allowed)
    if allowed[1] == nil then return allowed end
    local set = {}
    for _, v in ipairs(allowed) do set[v] = true end
    return set
end

-- check_options(fn_name, opts, allowed [, level]): opts is nil or a table
-- whose keys are all in allowed (a list of names, or a set name -> true).
-- Returns opts (or an empty table for nil).  level is passed to error()
-- (default 3: the caller of the function that checks its options).
function M.check_options(fn_name, opts, allowed, level)
    level = level or 3
    if opts == nil then return {} end
    if type(opts) ~= "table" then
        error(string.format("%s: options must be a table (got %s)", fn_name, type(opts)), level)
    end
    local set = as_set(allowed)
    local unknown = {}
    for k in pairs(opts) do
        if type(k) ~= "string" or not set[k] then unknown[#unknown + 1] = k end
    end
    if #unknown == 0 then return opts end
    table.sort(unknown, function(a, b) return tostring(a) < tostring(b) end)
    local list = sorted_names(allowed)
    local parts = {}
    for _, k in ipairs(unknown) do
        local s = type(k) == "string" and "'" .. k .. "'" or "[" .. tostring(k) .. "]"
        local near = type(k) == "string" and closest(k, list)
        parts[#parts + 1] = near and s .. " (did you mean '" .. near .. "'?)" or s
    end
    error(string.format("%s: unknown option%s %s (accepted: %s)", fn_name, #unknown > 1 and "s" or "",
                        table.concat(parts, ", "), table.concat(list, ", ")), level)
end

-- check_choice(fn_name, option, value, allowed [, level]): value must be
-- one of allowed (a list).  Returns value.
function M.check_choice(fn_name, option, value, allowed, level)
    for _, v in ipairs(allowed) do
        if v == value then return value end
    end
    error(string.format("%s: option '%s' must be one of %s (got %s)", fn_name, option,
                        table.concat(sorted_names(allowed), ", "),
                        type(value) == "string" and "'" .. value .. "'" or tostring(value)), level or 3)
end

return M
