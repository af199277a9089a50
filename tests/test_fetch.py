"""Downloads of AMD checkpoints, against a loopback HTTP server (never the internet)."""

import http.server
import os
import subprocess
import sys
import threading

import pytest
import torch

from tmad_ray.models import amd


class Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    hits: list = []

    def do_GET(self):
        self.hits.append(self.path)
        name = self.path.strip("/").split("?")[0]
        if name not in self.files:
            self.send_error(404)
            return
        body, mode = self.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/html" if mode == "html" else "application/octet-stream")
        self.end_headers()
        # "truncated": promise the whole file, send half, hang up.
        self.wfile.write(body[: len(body) // 2] if mode == "truncated" else body)
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("srv") / "c.pth"
    torch.save({"module": {"head.weight": torch.randn(64, 64), "head.bias": torch.zeros(64)}}, ckpt)
    body = ckpt.read_bytes()
    Handler.files = {
        "good.pth": (body, "ok"),
        "truncated.pth": (body, "truncated"),
        "page.pth": (b"<html>Google Drive - quota exceeded</html>", "html"),
        amd.zoo_entry("vit-s", "ssv2").filename: (body, "ok"),
    }
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", body
    httpd.shutdown()


def leftovers(d):
    return sorted(p.name for p in d.iterdir())


def test_good_download_is_recorded_and_reused(server, tmp_path):
    url, body = server
    dest = tmp_path / "a.pth"
    assert amd.fetch(f"{url}/good.pth", dest) == dest
    assert dest.read_bytes() == body
    sha = amd.sha256_file(dest)
    assert (tmp_path / "a.pth.sha256").read_text().split()[0] == sha
    n = len(Handler.hits)
    amd.fetch(f"{url}/good.pth", dest, sha256=sha)  # complete and verified: no new request
    assert len(Handler.hits) == n
    assert leftovers(tmp_path) == ["a.pth", "a.pth.sha256"]


@pytest.mark.parametrize("name, words", [
    ("truncated.pth", "failed"),
    ("missing.pth", "404"),
    ("page.pth", "not a PyTorch checkpoint"),
])
def test_failed_downloads_leave_nothing_and_say_how_to_fetch_by_hand(server, tmp_path, name, words):
    url, _ = server
    dest = tmp_path / "x.pth"
    with pytest.raises(amd.FetchError) as e:
        amd.fetch(f"{url}/{name}", dest, file_id="FILEID")
    msg = str(e.value)
    assert words in msg, msg
    assert "file id:     FILEID" in msg and f"URL:         {url}/{name}" in msg and f"destination: {dest}" in msg
    assert leftovers(tmp_path) == []


def test_checksum_mismatch_on_download_and_on_later_use(server, tmp_path):
    url, _ = server
    dest = tmp_path / "a.pth"
    with pytest.raises(amd.FetchError, match="expected 0000"):
        amd.fetch(f"{url}/good.pth", dest, sha256="0" * 64)
    assert leftovers(tmp_path) == []
    amd.fetch(f"{url}/good.pth", dest)
    with open(dest, "r+b") as f:  # the file changes after it was recorded
        f.seek(100)
        f.write(b"corrupt")
    with pytest.raises(amd.FetchError, match="corrupt or not the one that was downloaded"):
        amd.fetch(f"{url}/good.pth", dest)


def test_fetch_assistant_cli_through_a_mirror(server, tmp_path):
    url, body = server
    env = {**os.environ, "TMAD_RAY_ZOO_MIRROR": url}
    cmd = [sys.executable, "-m", "tmad_ray", "fetch-assistant", "--arch", "vit-s", "--dataset", "ssv2",
           "--dest", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    dest = tmp_path / amd.zoo_entry("vit-s", "ssv2").filename
    assert dest.read_bytes() == body and "models.assistant.path=" in r.stdout
    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "other")], capture_output=True, text=True,
                         env={**env, "TMAD_RAY_ZOO_MIRROR": f"{url}/nowhere"})
    assert bad.returncode == 1 and "1ynDyu3K_INoZjaNLzFIaYCo6kjBOwG__" in bad.stderr
    assert not (tmp_path / "other").exists() or leftovers(tmp_path / "other") == []
