-- testutil.lua — small helpers the Lua test files share.
local U = {}

-- The error message of f(...) as a string, or nil if it did not fail.
function U.error_of(f, ...)
    local ok, err = pcall(f, ...)
    if ok then return nil end
    return tostring(err)
end

-- Whether s contains pattern as plain text (nil-safe).
function U.has(s, pattern)
    return s ~= nil and s:find(pattern, 1, true) ~= nil
end

return U
