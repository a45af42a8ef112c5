#!/usr/bin/env bash
# download_model.sh — fetch a model repository from the Hugging Face hub at a
# pinned revision with curl, into the hub cache's layout, so a folder fetched
# here and one fetched by the hub's Python tools have the same path:
#   <dest_dir>/models--<org>--<name>/snapshots/<commit>/<files>
#
#   scripts/download_model.sh <repo_id> <revision> <dest_dir>
#       [--include 'glob,glob'] [--endpoint URL]
#
# Every file is checked before it is renamed into place (sha256 for LFS files,
# the git blob id for the small ones), an interrupted file resumes with a Range
# request on the next run, and files already present and correct are skipped.
# The hub's JSON is read by the moonlit binary itself, so the script needs
# only bash, curl and coreutils. See docs/dreambooth_run.md.
#
# Environment: HF_ENDPOINT (default https://huggingface.co), HF_TOKEN (sent as
# a bearer token; gated models such as SD 1.4 need it), MOONLIT (the binary),
# DOWNLOAD_MAX_TIME (seconds one request may take; 0 = no limit, the
# default), DOWNLOAD_RETRIES (curl's retries on transient errors, default 3).
set -euo pipefail

prog=download_model.sh
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# What moonlit needs of a diffusers Stable Diffusion folder: the configs, the
# tokenizer and the f32 safetensors weights; not the .bin/.ckpt/.msgpack/.onnx
# copies, the fp16 variants, the safety checker or the feature extractor.
default_include="model_index.json,unet/config.json,vae/config.json,text_encoder/config.json"
default_include+=",scheduler/*.json,tokenizer/*"
default_include+=",unet/diffusion_pytorch_model.safetensors,vae/diffusion_pytorch_model.safetensors"
default_include+=",text_encoder/model.safetensors"

die() { printf '%s: %s\n' "$prog" "$*" >&2; exit 1; }

usage() {
    cat >&2 <<EOF
usage: $prog <repo_id> <revision> <dest_dir> [--include 'glob,glob'] [--endpoint URL]
  repo_id    e.g. CompVis/stable-diffusion-v1-4
  revision   a commit hash (best: reproducible), a branch or a tag
  dest_dir   the cache folder; files land in
             dest_dir/models--<org>--<name>/snapshots/<commit>/
  --include  comma-separated shell globs of the files to fetch ('*' also
             crosses '/'); default: $default_include
  --endpoint the hub's address (default \$HF_ENDPOINT or https://huggingface.co)
EOF
    exit "${1:-1}"
}

# ---- arguments ---------------------------------------------------------------
include=$default_include
include_given=0
endpoint=${HF_ENDPOINT:-https://huggingface.co}
positional=()
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage 0 ;;
        --include) [ $# -ge 2 ] || die "--include needs a value"; include=$2; include_given=1; shift 2 ;;
        --include=*) include=${1#--include=}; include_given=1; shift ;;
        --endpoint) [ $# -ge 2 ] || die "--endpoint needs a value"; endpoint=$2; shift 2 ;;
        --endpoint=*) endpoint=${1#--endpoint=}; shift ;;
        -*) printf '%s: unknown option %s\n' "$prog" "$1" >&2; usage ;;
        *) positional+=("$1"); shift ;;
    esac
done
[ ${#positional[@]} -eq 3 ] || { printf '%s: expected 3 arguments, got %d\n' "$prog" ${#positional[@]} >&2; usage; }
repo_id=${positional[0]} revision=${positional[1]} dest_dir=${positional[2]}
endpoint=${endpoint%/}
[ -n "$include" ] || die "--include is empty"

# repo_id goes into URLs and a folder name: owner/name in the hub's alphabet.
[[ $repo_id =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
    die "repo_id '$repo_id' is not of the form owner/name"
[[ $revision =~ ^[A-Za-z0-9][A-Za-z0-9._/-]*$ && $revision != *..* ]] ||
    die "revision '$revision' is not a commit hash, branch or tag name"
[[ $endpoint =~ ^https?:// ]] || die "--endpoint '$endpoint' is not an http(s) URL"

max_time=${DOWNLOAD_MAX_TIME:-0}
retries=${DOWNLOAD_RETRIES:-3}
[[ $max_time =~ ^[0-9]+$ ]] || die "DOWNLOAD_MAX_TIME '$max_time' is not a whole number of seconds"
[[ $retries =~ ^[0-9]+$ ]] || die "DOWNLOAD_RETRIES '$retries' is not a whole number"

moonlit=${MOONLIT:-}
if [ -z "$moonlit" ]; then
    for candidate in "$root/build/moonlit" "$root/build-cpu/moonlit"; do
        if [ -x "$candidate" ]; then moonlit=$candidate; break; fi
    done
fi
{ [ -n "$moonlit" ] && [ -x "$moonlit" ]; } ||
    die "the moonlit binary (${moonlit:-$root/build/moonlit}) is missing: build it with make, or set MOONLIT"
command -v curl >/dev/null || die "curl is not installed"
{ command -v sha256sum >/dev/null && command -v sha1sum >/dev/null; } || die "sha256sum/sha1sum (coreutils) are not installed"

# ---- curl --------------------------------------------------------------------
curl_common=(--silent --show-error --location --fail --connect-timeout 30
             --speed-limit 1 --speed-time 120 --max-time "$max_time")
if [ "$retries" -gt 0 ]; then curl_common+=(--retry "$retries"); fi

# curl with the token in a config read from stdin, so it never shows in the
# process list. curl drops a custom Authorization header on a redirect to
# another host (the hub sends LFS files to a signed CDN address), as it should.
hub_curl() {
    if [ -n "${HF_TOKEN:-}" ]; then
        printf 'header = "Authorization: Bearer %s"\n' "$HF_TOKEN" | curl --config - "${curl_common[@]}" "$@"
    else
        curl "${curl_common[@]}" "$@"
    fi
}

# An HTTP failure in words; 401/403 mean a gated or private repository.
http_error() {  # what status
    local what=$1 status=$2
    case $status in
        401|403) die "$what: HTTP $status: access denied. $repo_id may be gated: accept its licence on" \
                     "$endpoint/$repo_id while logged in, then set HF_TOKEN to an access token" \
                     "(${endpoint}/settings/tokens)${HF_TOKEN:+; the HF_TOKEN given was refused}" ;;
        404) die "$what: HTTP 404: not found (check the repository name '$repo_id' and revision '$revision')" ;;
        000) die "$what: no HTTP answer from $endpoint (network down, or the address is wrong?)" ;;
        *) die "$what: HTTP $status" ;;
    esac
}

human_size() {  # bytes -> "3.44 GB"
    awk -v b="$1" 'BEGIN { split("B kB MB GB TB", u, " "); i = 1
                           while (b >= 1000 && i < 5) { b /= 1000; i++ }
                           printf(i == 1 ? "%d %s" : "%.2f %s", b, u[i]) }'
}

file_size() { stat -c %s -- "$1"; }

# The hash the hub lists for a file: sha256 for LFS files, the git blob id
# (sha1 of "blob <size>\0" + content, what `git hash-object` gives) otherwise.
file_hash() {  # path kind
    if [ "$2" = lfs ]; then
        sha256sum -- "$1" | cut -d' ' -f1
    else
        { printf 'blob %s\0' "$(file_size "$1")"; cat -- "$1"; } | sha1sum | cut -d' ' -f1
    fi
}

# ---- the file list ------------------------------------------------------------
repo_dir=$dest_dir/models--${repo_id//\//--}
mkdir -p -- "$repo_dir" || die "cannot create $repo_dir"
work=$(mktemp -d "${TMPDIR:-/tmp}/download_model.XXXXXX")
trap 'rm -rf -- "$work"' EXIT

api_url="$endpoint/api/models/$repo_id/revision/$revision?blobs=true"
echo "$prog: $repo_id at $revision from $endpoint"
set +e
status=$(hub_curl --output "$work/api.json" --write-out '%{http_code}' -- "$api_url")
rc=$?
set -e
if [ $rc -ne 0 ] || [ "$status" != 200 ]; then
    http_error "listing $repo_id at $revision ($api_url, curl exit $rc)" "${status:-000}"
fi

# The reply as lines "rfilename<TAB>size<TAB>hash<TAB>lfs|git" after a first
# line "sha<TAB><commit>". A file name that could leave the snapshot folder
# (absolute, "..", control characters) is refused.
read -r -d '' parse_lua <<'EOF' || true
local core = require "moonlit.core"
local path = os.getenv("DOWNLOAD_API_JSON")
local ok, info = pcall(core.json_load, path)
if not ok then error("the hub's reply is not JSON: " .. tostring(info), 0) end
if type(info) ~= "table" or type(info.sha) ~= "string" or not info.sha:match("^%x+$") then
    error("the hub's reply has no commit hash 'sha'", 0)
end
if type(info.siblings) ~= "table" then error("the hub's reply has no file list 'siblings'", 0) end
local out = {"sha\t" .. info.sha}
for i, s in ipairs(info.siblings) do
    local name = s.rfilename
    if type(name) ~= "string" or name == "" or name:find("[%c]") or name:sub(1, 1) == "/"
       or ("/" .. name .. "/"):find("/%.%.?/") then
        error(string.format("the hub's file %d has an unsafe name %q", i, tostring(name)), 0)
    end
    local size, hash, kind
    if type(s.lfs) == "table" then
        size, hash, kind = s.lfs.size, s.lfs.sha256, "lfs"
    else
        size, hash, kind = s.size, s.blobId, "git"
    end
    if math.type(size) ~= "integer" or size < 0 or type(hash) ~= "string" or not hash:match("^%x+$") then
        error(string.format("the hub's entry for %s lacks its size or hash (was ?blobs=true honoured?)", name), 0)
    end
    out[#out + 1] = string.format("%s\t%d\t%s\t%s", name, size, hash:lower(), kind)
end
io.write(table.concat(out, "\n"), "\n")
EOF
DOWNLOAD_API_JSON="$work/api.json" "$moonlit" -e "$parse_lua" >"$work/files.tsv" ||
    die "could not read the file list of $repo_id at $revision (see the message above)"

commit=$(sed -n '1s/^sha\t//p' "$work/files.tsv")
snapshot=$repo_dir/snapshots/$commit
mkdir -p -- "$snapshot"
# A branch or tag maps to its commit in refs/, as in the hub's own cache.
if [ "$revision" != "$commit" ]; then
    mkdir -p -- "$repo_dir/refs/$(dirname -- "$revision")"
    printf '%s' "$commit" >"$repo_dir/refs/$revision.tmp"
    mv -f -- "$repo_dir/refs/$revision.tmp" "$repo_dir/refs/$revision"
fi

IFS=, read -r -a patterns <<<"$include"
matches() {
    local p
    for p in "${patterns[@]}"; do
        # shellcheck disable=SC2254  # $p is a glob on purpose
        case $1 in $p) return 0 ;; esac
    done
    return 1
}

# model_index.json comes last: its presence then means the whole folder is
# there (scripts/dreambooth_run.sh skips the download on it), also after an
# interrupted run.
names=() sizes=() hashes=() kinds=()
while IFS=$'\t' read -r name size hash kind; do
    if matches "$name"; then
        names+=("$name") sizes+=("$size") hashes+=("$hash") kinds+=("$kind")
    fi
done < <(tail -n +2 "$work/files.tsv" | grep -v $'^model_index.json\t'; grep $'^model_index.json\t' "$work/files.tsv")
n=${#names[@]}
[ "$n" -gt 0 ] || die "no file of $repo_id at $revision matches --include '$include'"

# With the default filter the result must be a folder moonlit can load.
# Early revisions of some repositories hold only .bin weights, which moonlit
# does not read; say so now rather than after gigabytes of other files.
if [ "$include_given" = 0 ]; then
    missing=()
    for need in model_index.json unet/diffusion_pytorch_model.safetensors \
                vae/diffusion_pytorch_model.safetensors text_encoder/model.safetensors; do
        found=0
        for name in "${names[@]}"; do [ "$name" = "$need" ] && found=1; done
        [ "$found" = 1 ] || missing+=("$need")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        bins=$(cut -f1 "$work/files.tsv" | grep -E '^(unet|vae|text_encoder)/[^/]*\.bin$' | tr '\n' ' ' || true)
        die "$repo_id at $revision lacks ${missing[*]}, which moonlit needs (it reads .safetensors" \
            "weights only${bins:+; this revision has $bins}): choose a revision that has them"
    fi
fi

# ---- the files ---------------------------------------------------------------
downloaded=0 present=0 bytes_downloaded=0 bytes_total=0
for ((i = 0; i < n; i++)); do
    name=${names[i]} size=${sizes[i]} hash=${hashes[i]} kind=${kinds[i]}
    target=$snapshot/$name
    partial=$target.incomplete
    bytes_total=$((bytes_total + size))
    line=$(printf '[%d/%d] %s (%s)' $((i + 1)) "$n" "$name" "$(human_size "$size")")

    if [ -f "$target" ] && [ "$(file_size "$target")" = "$size" ] && [ "$(file_hash "$target" "$kind")" = "$hash" ]; then
        echo "$line: present"
        present=$((present + 1))
        continue
    fi
    if [ -e "$target" ]; then
        echo "$line: the copy present is wrong (size or hash); fetching it again"
        rm -f -- "$target"
    fi
    mkdir -p -- "$(dirname -- "$target")"
    have=0
    if [ -f "$partial" ]; then
        have=$(file_size "$partial")
        if [ "$have" -gt "$size" ]; then rm -f -- "$partial"; have=0; fi
    fi
    if [ "$have" -gt 0 ]; then
        echo "$line: resuming at $(human_size "$have")"
    else
        echo "$line: downloading"
    fi

    if [ "$have" -lt "$size" ] || [ ! -f "$partial" ]; then
        url="$endpoint/$repo_id/resolve/$commit/$name"
        progress=()
        if [ -t 2 ] && [ "$size" -gt 10000000 ]; then progress=(--progress-bar); fi
        set +e
        status=$(hub_curl "${progress[@]}" --continue-at - --output "$partial" --write-out '%{http_code}' -- "$url")
        rc=$?
        set -e
        if [ $rc -eq 33 ]; then
            # The server ignored the Range request: start this file afresh.
            echo "$line: the server cannot resume; downloading from the start"
            rm -f -- "$partial"
            set +e
            status=$(hub_curl "${progress[@]}" --output "$partial" --write-out '%{http_code}' -- "$url")
            rc=$?
            set -e
        fi
        # curl creates no output file for an empty body.
        if [ $rc -eq 0 ] && [ ! -f "$partial" ]; then : >"$partial"; fi
        if [ $rc -ne 0 ]; then
            got=0
            if [ -f "$partial" ]; then got=$(file_size "$partial"); fi
            case $status in
                2*|000) die "$name: download stopped at $got of $size bytes (HTTP ${status:-000}, curl exit $rc);" \
                            "run again to resume from $partial" ;;
                *) http_error "$name ($url, curl exit $rc)" "$status" ;;
            esac
        fi
    fi

    got=$(file_size "$partial")
    if [ "$got" != "$size" ]; then
        rm -f -- "$partial"
        die "$name: got $got bytes, the hub lists $size; the partial file was deleted"
    fi
    actual=$(file_hash "$partial" "$kind")
    if [ "$actual" != "$hash" ]; then
        rm -f -- "$partial"
        if [ "$kind" = lfs ]; then what=sha256; else what="git blob id"; fi
        die "$name: $what mismatch: expected $hash, got $actual; the bad file was deleted"
    fi
    mv -f -- "$partial" "$target"
    downloaded=$((downloaded + 1))
    bytes_downloaded=$((bytes_downloaded + got))
done

if [ "$downloaded" -eq 0 ]; then
    echo "$prog: nothing to download: all $n files present and verified ($(human_size "$bytes_total"))"
else
    echo "$prog: $downloaded downloaded ($(human_size "$bytes_downloaded")), $present already present; $n files verified"
fi
echo "$prog: snapshot at $snapshot"
