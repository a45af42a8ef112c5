#!/usr/bin/env python3
"""fake_hub.py — a small stand-in for the Hugging Face hub's file API, for the
tests of scripts/download_model.sh (no network in tests).

    python3 tests/support/fake_hub.py --root DIR --port-file FILE

Serves every repository found as DIR/repos/<owner>/<name>/ (its files, at
one commit whose hash is DIR/repos/<owner>/<name>.sha, default 40 'a's):

    GET /api/models/<owner>/<name>/revision/<rev>?blobs=true
        {"sha": ..., "siblings": [{"rfilename", "size", "blobId", "lfs"?}]}
        (<rev> is the commit or "main"; files ending in .safetensors, .bin,
        .ckpt, .msgpack, .onnx are LFS files, listed with lfs.sha256/size)
    GET /<owner>/<name>/resolve/<rev>/<path>
        the file, honouring "Range: bytes=N-" with 206.

Each request re-reads DIR/control.json (absent = behave), so a test changes
the behaviour between runs of the script:

    {"status": {"<path or 'api'>": 500},     answer that status instead
     "truncate": {"<path>": N},              send N bytes, then hang up
     "corrupt": ["<path>"],                  serve the file with every byte inverted
     "no_range": true,                       ignore Range (always 200, whole file)
     "token": "secret"}                      401 unless "Authorization: Bearer secret"

Every request is appended to DIR/requests.log as one line
"<METHOD> <path> range=<Range header or -> auth=<yes|no>".
The chosen port is written to FILE once listening, and the server's own
process id to FILE.pid (the process to stop: python3 may be started through
a wrapper whose pid is not the server's). The server exits by
itself after --idle seconds without a request (default 30), so it never
outlives a test that could not stop it.
"""
import argparse
import hashlib
import http.server
import json
import os
import re
import threading
import time
import urllib.parse

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".msgpack", ".onnx")


def git_blob_id(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Hub:
    def __init__(self, root):
        self.root = root
        self.lock = threading.Lock()
        self.last_request = time.monotonic()

    def control(self):
        try:
            with open(os.path.join(self.root, "control.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def repo_dir(self, repo):
        return os.path.join(self.root, "repos", repo)

    def commit(self, repo):
        try:
            with open(self.repo_dir(repo) + ".sha") as f:
                return f.read().strip()
        except FileNotFoundError:
            return "a" * 40

    def files(self, repo):
        base = self.repo_dir(repo)
        out = []
        for dirpath, _, names in os.walk(base):
            for n in names:
                full = os.path.join(dirpath, n)
                out.append(os.path.relpath(full, base).replace(os.sep, "/"))
        return sorted(out)

    def log(self, line):
        with self.lock, open(os.path.join(self.root, "requests.log"), "a") as f:
            f.write(line + "\n")


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "fake-hub/1"

    def log_message(self, *args):  # keep the test's output clean
        pass

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        hub = self.server.hub
        hub.last_request = time.monotonic()
        ctl = hub.control()
        auth = self.headers.get("Authorization")
        hub.log("GET %s range=%s auth=%s" % (self.path, self.headers.get("Range") or "-",
                                               "yes" if auth else "no"))
        if ctl.get("token") and auth != "Bearer " + ctl["token"]:
            return self.send_json(401, {"error": "Access to this model is restricted"})
        path = urllib.parse.urlsplit(self.path).path
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
        if m:
            return self.api(hub, ctl, m.group(1), m.group(2))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self.resolve(hub, ctl, m.group(1), m.group(2), urllib.parse.unquote(m.group(3)))
        self.send_json(404, {"error": "no such route"})

    def known(self, hub, repo, rev):
        return os.path.isdir(hub.repo_dir(repo)) and rev in (hub.commit(repo), "main")

    def api(self, hub, ctl, repo, rev):
        if "api" in ctl.get("status", {}):
            return self.send_json(ctl["status"]["api"], {"error": "told to fail"})
        if not self.known(hub, repo, rev):
            return self.send_json(404, {"error": "Repository or revision not found"})
        siblings = []
        for name in hub.files(repo):
            with open(os.path.join(hub.repo_dir(repo), name), "rb") as f:
                data = f.read()
            entry = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                "pointerSize": 134}
            siblings.append(entry)
        self.send_json(200, {"id": repo, "sha": hub.commit(repo), "siblings": siblings})

    def resolve(self, hub, ctl, repo, rev, name):
        if name in ctl.get("status", {}):
            return self.send_json(ctl["status"][name], {"error": "told to fail"})
        full = os.path.join(hub.repo_dir(repo), name)
        if not self.known(hub, repo, rev) or ".." in name.split("/") or not os.path.isfile(full):
            return self.send_json(404, {"error": "Entry not found"})
        with open(full, "rb") as f:
            data = f.read()
        if name in ctl.get("corrupt", []):
            data = bytes(b ^ 0xFF for b in data)
        start = 0
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not ctl.get("no_range"):
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", "bytes */%d" % len(data))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = ctl.get("truncate", {}).get(name)
        if cut is not None and cut < len(body):
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--idle", type=float, default=30.0)
    a = ap.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.hub = Hub(a.root)
    for path, value in ((a.port_file + ".pid", os.getpid()), (a.port_file, server.server_address[1])):
        with open(path + ".tmp", "w") as f:
            f.write("%d\n" % value)
        os.replace(path + ".tmp", path)

    def watchdog():
        while time.monotonic() - server.hub.last_request < a.idle:
            time.sleep(0.5)
        server.shutdown()

    threading.Thread(target=watchdog, daemon=True).start()
    server.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
