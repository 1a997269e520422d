"""Opt-in official weights: download table, cache, sha256 record, errors, CLI, Kinetics-400 names.

Every download goes to a local HTTP server on 127.0.0.1 that serves a checkpoint-like file the test
writes; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import struct
import threading
from pathlib import Path

import pytest
import torch

from hiera_perception import cli, weights
from hiera_perception.config import CONFIGS

NAME = "hiera_base_16x224"  # default tag -> file hiera_base_16x224.pth
FILENAME = "hiera_base_16x224.pth"


def _checkpoint_bytes() -> bytes:
    gen = torch.Generator().manual_seed(0)
    # ~1.2 MB: more than one 1 MiB read, so streaming, hashing and the size check span several chunks
    state = {
        "model_state": {
            "head.projection.weight": torch.randn(400, 768, generator=gen),
            "pos_embed": torch.zeros(1, 64, 96),
        }
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class _Server:
    """Serves `payload` at any path; `mode` picks the behaviour, `requests` counts GETs."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.mode = "ok"
        self.requests = 0
        self.release = threading.Event()  # ends a "stall"
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                owner.requests += 1
                if owner.mode == "missing":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(owner.payload)))
                self.end_headers()
                if owner.mode == "ok":
                    self.wfile.write(owner.payload)
                    return
                # fewer bytes than announced
                self.wfile.write(owner.payload[: len(owner.payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                if owner.mode == "reset":
                    # linger 0: close sends a TCP reset instead of a clean end of stream
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                if owner.mode == "stall":  # then silence, until the test is over
                    owner.release.wait(30)
                # mode "short": the server closes the connection cleanly after the handler

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{FILENAME}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def payload() -> bytes:
    return _checkpoint_bytes()


@pytest.fixture
def server(payload):
    srv = _Server(payload)
    yield srv
    srv.close()


def _fetch(server: _Server, cache: Path, name: str = NAME) -> Path:
    return weights.fetch(name, accept_license=True, cache_dir=cache, url=server.url, progress=False, timeout=10)


def test_table_covers_the_official_video_models():
    assert len(weights.WEIGHTS) == 8
    for arch in ("hiera_base_16x224", "hiera_base_plus_16x224", "hiera_large_16x224", "hiera_huge_16x224"):
        ft = weights.get_entry(arch)
        assert ft is weights.WEIGHTS[f"{arch}.mae_k400_ft_k400"]
        assert ft.url == f"https://dl.fbaipublicfiles.com/hiera/{arch}.pth"
        assert (ft.kind, ft.num_classes, ft.config, ft.license) == ("encoder", 400, arch, "CC BY-NC 4.0")
        mae = weights.get_entry(f"{arch}.mae_k400")
        assert mae.url == f"https://dl.fbaipublicfiles.com/hiera/mae_{arch}.pth"
        assert (mae.kind, mae.num_classes, mae.filename) == ("mae", 0, f"mae_{arch}.pth")
        assert arch in CONFIGS
        assert weights.entry_for_path(f"/somewhere/mae_{arch}.pth") is mae
    with pytest.raises(ValueError, match="hiera_base_16x224.mae_k400"):
        weights.get_entry("hiera_tiny_224")  # an image model: not in our (video) table
    assert weights.find_entry("hiera_base_16x224.in1k") is None


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HIERA_PERCEPTION_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert weights.default_cache_dir() == tmp_path / "home" / ".cache" / "hiera_perception"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.default_cache_dir() == tmp_path / "xdg" / "hiera_perception"
    monkeypatch.setenv("HIERA_PERCEPTION_CACHE", str(tmp_path / "mine"))
    assert weights.default_cache_dir() == tmp_path / "mine"


def test_fetch_downloads_records_and_reuses(server, payload, tmp_path):
    cache = tmp_path / "cache"
    path = _fetch(server, cache)
    assert path == cache / FILENAME
    assert path.read_bytes() == payload
    record = json.loads((cache / "sha256.json").read_text())
    assert set(record) == {FILENAME}
    assert record[FILENAME]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert record[FILENAME]["size"] == len(payload)
    assert record[FILENAME]["url"] == server.url
    assert record[FILENAME]["date"]
    assert sorted(p.name for p in cache.iterdir()) == [FILENAME, "sha256.json"]
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["model_state"]["head.projection.weight"].shape == (400, 768)
    weights.verify(path)
    assert weights.resolve(NAME, cache_dir=cache) == path
    assert weights.resolve("hiera_base_16x224.mae_k400_ft_k400", cache_dir=cache) == path
    assert weights.resolve("hiera_base_16x224.mae_k400", cache_dir=cache) is None  # not fetched
    assert weights.resolve(str(path), cache_dir=cache) is None  # a path, not a table name
    assert server.requests == 1

    again = _fetch(server, cache)
    assert again == path
    assert server.requests == 1  # cached and verified: no second download

    mae = _fetch(server, cache, "hiera_base_16x224.mae_k400")
    assert mae == cache / "mae_hiera_base_16x224.pth"
    assert set(json.loads((cache / "sha256.json").read_text())) == {FILENAME, "mae_hiera_base_16x224.pth"}
    assert server.requests == 2


def test_refuses_without_license(server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(weights.LicenseNotAccepted) as info:
        weights.fetch(NAME, accept_license=False, cache_dir=cache, url=server.url, progress=False)
    message = str(info.value)
    assert "CC BY-NC 4.0" in message
    assert "https://creativecommons.org/licenses/by-nc/4.0/" in message
    assert "--accept-license" in message
    assert "NON-COMMERCIAL" in message
    assert not cache.exists()
    assert server.requests == 0


@pytest.mark.parametrize("mode", ["short", "reset"])
def test_interrupted_download_leaves_nothing(server, payload, tmp_path, mode):
    cache = tmp_path / "cache"
    _fetch(server, cache, "hiera_base_16x224.mae_k400")  # an earlier, complete download
    record_before = (cache / "sha256.json").read_bytes()
    server.mode = mode
    with pytest.raises(weights.DownloadError) as info:
        _fetch(server, cache)
    message = str(info.value)
    assert server.url in message
    if mode == "short":  # clean close: caught by the Content-Length check
        assert f"expected {len(payload)} bytes" in message
        assert f"got {len(payload) // 2}" in message
    else:
        assert "interrupted" in message or "expected" in message
    assert sorted(p.name for p in cache.iterdir()) == ["mae_hiera_base_16x224.pth", "sha256.json"]
    assert (cache / "sha256.json").read_bytes() == record_before
    assert weights.resolve(NAME, cache_dir=cache) is None

    server.mode = "ok"  # the next try succeeds
    assert _fetch(server, cache).read_bytes() == payload


def test_stalled_download_times_out(server, payload, tmp_path):
    server.mode = "stall"
    cache = tmp_path / "cache"
    with pytest.raises(weights.DownloadError, match=rf"timed out after {len(payload) // 2} of {len(payload)} bytes"):
        weights.fetch(NAME, accept_license=True, cache_dir=cache, url=server.url, progress=False, timeout=0.3)
    assert list(cache.iterdir()) == []


def test_http_error_is_clear(server, tmp_path):
    server.mode = "missing"
    with pytest.raises(weights.DownloadError, match="HTTP 404"):
        _fetch(server, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_wrong_size_against_content_length(server, payload, tmp_path):
    # the server announces the true size but the file it holds has changed (shorter): wrong size
    server.payload = payload + b"tail"
    server.mode = "short"
    with pytest.raises(weights.DownloadError, match=rf"wrong size: expected {len(payload) + 4} bytes"):
        _fetch(server, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_corrupt_file_is_caught_and_refetched(server, payload, tmp_path):
    cache = tmp_path / "cache"
    path = _fetch(server, cache)
    data = bytearray(path.read_bytes())
    data[100:104] = bytes(b ^ 0xFF for b in data[100:104])  # same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(weights.ChecksumError) as info:
        weights.verify(path)
    message = str(info.value)
    actual = hashlib.sha256(bytes(data)).hexdigest()
    assert str(path) in message
    assert hashlib.sha256(payload).hexdigest() in message and actual in message
    assert f"fetch-weights {weights.get_entry(NAME).name} --accept-license" in message

    path.write_bytes(bytes(data[:-10]))  # truncated on disk: caught by the size before hashing
    with pytest.raises(weights.ChecksumError, match=rf"expected {len(payload)} bytes, found {len(payload) - 10}"):
        weights.verify(path)

    assert _fetch(server, cache) == path  # fetch repairs it
    assert server.requests == 2
    assert path.read_bytes() == payload
    weights.verify(path)


def test_a_page_that_is_not_a_checkpoint_is_not_cached(server, tmp_path):
    # a mirror's error or login page sent with 200 OK was cached, recorded and then "verified" on every load
    server.payload = b"<!DOCTYPE html><html>Not here</html>"
    with pytest.raises(weights.DownloadError, match=r"did not send a PyTorch checkpoint .*b'<!DO'"):
        _fetch(server, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_leftovers_of_a_killed_download_are_removed(server, payload, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f".{FILENAME}.k1ll3d.tmp").write_bytes(payload[:1000])  # SIGKILL mid-download: no cleanup ran
    (cache / ".other.pth.x.tmp").write_bytes(b"another file's download: not this fetch's to remove")
    assert _fetch(server, cache).read_bytes() == payload
    assert sorted(p.name for p in cache.iterdir()) == [".other.pth.x.tmp", FILENAME, "sha256.json"]


def test_a_record_entry_of_the_wrong_shape_is_a_checksum_error(server, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "sha256.json").write_text(json.dumps({FILENAME: "abc"}))
    with pytest.raises(weights.ChecksumError, match=f"entry '{FILENAME}' is not .*delete it and fetch again"):
        _fetch(server, cache)


def test_sigterm_during_a_download_leaves_nothing(server, tmp_path):
    # `timeout`, systemd or `docker stop` sends SIGTERM: the temporary file was left in the cache for good
    import os
    import signal
    import subprocess
    import sys
    import time

    server.mode = "stall"  # half the file, then silence
    cache = tmp_path / "cache"
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "hiera_perception", "fetch-weights", NAME, "--accept-license",
                             "--cache-dir", str(cache), "--url", server.url], cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(cache.glob(f".{FILENAME}.*.tmp")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(cache.glob(f".{FILENAME}.*.tmp")), "the download never started"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert list(cache.iterdir()) == [], "nothing left in the cache"


def test_files_without_record_pass_verify(tmp_path):
    own = tmp_path / "my_model.pth"
    own.write_bytes(b"anything")
    weights.verify(own)


def test_cli_fetch_weights(server, payload, tmp_path, capsys, caplog, monkeypatch, request):
    monkeypatch.delenv("HIERA_PERCEPTION_CACHE", raising=False)
    weights.logger.addHandler(caplog.handler)  # launch_testing's logger class does not propagate to caplog's root
    request.addfinalizer(lambda: weights.logger.removeHandler(caplog.handler))
    cache = tmp_path / "cache"
    rc = cli.main(["fetch-weights", NAME, "--cache-dir", str(cache), "--url", server.url])
    assert rc == 1
    assert not cache.exists()
    assert server.requests == 0

    rc = cli.main(["fetch-weights", NAME, "--accept-license", "--cache-dir", str(cache), "--url", server.url])
    assert rc == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(cache / FILENAME)
    assert (cache / FILENAME).read_bytes() == payload
    # outside the default cache a name does not find the file: the user is told how to serve it
    assert f"HIERA_PERCEPTION_CACHE={cache} so that the name {NAME} finds it" in caplog.text
    caplog.clear()
    monkeypatch.setenv("HIERA_PERCEPTION_CACHE", str(cache))
    assert cli.main(["fetch-weights", NAME, "--accept-license", "--url", server.url]) == 0
    assert weights.resolve(NAME) == cache / FILENAME and "outside the default cache" not in caplog.text
    capsys.readouterr()

    assert cli.main(["fetch-weights", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "hiera_huge_16x224.mae_k400" in listing and "mae_hiera_huge_16x224.pth" in listing
    assert len(listing.strip().splitlines()) == 8


def test_kinetics400_labels():
    labels = weights.kinetics400_labels()
    assert len(labels) == 400 and len(set(labels)) == 400
    assert labels[0] == "abseiling"
    assert labels[1] == "air drumming"
    assert labels[208] == "passing American football (in game)"
    assert labels[209] == "passing American football (not in game)"
    assert labels[399] == "zumba"
    assert labels == sorted(labels)  # the annotation files' alphabetical order
    labels.append("mutated")  # callers get a copy
    assert len(weights.kinetics400_labels()) == 400
