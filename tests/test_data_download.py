"""Downloads against a real http.server on 127.0.0.1: success, wrong checksum, cut connection."""
from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from moe_lens.cli import main
from moe_lens.data import download as dl
from moe_lens.errors import MoeLensError

FIX = Path(__file__).parent / "fixtures" / "data"


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/cut/"):
            body = b"x" * 1000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) * 10))  # promises more than it sends
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_fetch_ok_and_atomic(server, tmp_path):
    root, url = server
    (root / "f.bin").write_bytes(b"hello" * 1000)
    dest = tmp_path / "out" / "f.bin"
    dl.fetch(f"{url}/f.bin", dest, _sha(root / "f.bin"), progress=False)
    assert dest.read_bytes() == b"hello" * 1000
    assert [p.name for p in dest.parent.iterdir()] == ["f.bin"]  # no leftover temp file


def test_fetch_wrong_checksum_leaves_nothing(server, tmp_path):
    root, url = server
    (root / "f.bin").write_bytes(b"tampered")
    dest = tmp_path / "out" / "f.bin"
    with pytest.raises(MoeLensError, match="sha256 .* != expected"):
        dl.fetch(f"{url}/f.bin", dest, "0" * 64, progress=False)
    assert list(dest.parent.iterdir()) == []


def test_fetch_cut_connection_leaves_nothing(server, tmp_path):
    _, url = server
    dest = tmp_path / "out" / "f.bin"
    with pytest.raises(MoeLensError, match=r"cut after 1000 of 10000 bytes; partial file deleted"):
        dl.fetch(f"{url}/cut/f.bin", dest, "0" * 64, progress=False)
    assert list(dest.parent.iterdir()) == []


def test_fetch_404(server, tmp_path):
    _, url = server
    with pytest.raises(MoeLensError, match="HTTPError"):
        dl.fetch(f"{url}/missing.bin", tmp_path / "m.bin", "0" * 64, progress=False)
    assert not (tmp_path / "m.bin").exists()


def test_download_wikitext_from_mirror_and_skip_present(server, tmp_path, monkeypatch, capsys):
    root, url = server
    (root / "wikitext-2").mkdir()
    files = []
    for s in ("train", "valid", "test"):
        src = FIX / "wikitext-2" / f"wiki.{s}.tokens"
        (root / "wikitext-2" / src.name).write_bytes(src.read_bytes())
        files.append(dl.RemoteFile(f"wikitext-2/{src.name}", "https://invalid.example/x", _sha(src)))
    monkeypatch.setitem(dl.REMOTE, "wikitext2", tuple(files))
    monkeypatch.setenv("MOE_LENS_MIRROR", url)
    data = tmp_path / "data"
    assert main(["data", "download", "wikitext2", "--data-dir", str(data), "--no-progress"]) == 0
    for s in ("train", "valid", "test"):
        name = f"wiki.{s}.tokens"
        assert (data / "wikitext-2" / name).read_bytes() == (FIX / "wikitext-2" / name).read_bytes()
    (root / "wikitext-2" / "wiki.train.tokens").unlink()  # a second run must not fetch again
    assert main(["data", "download", "wikitext2", "--data-dir", str(data), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("present") == 3


def test_download_conll_explains(capsys, tmp_path):
    assert main(["data", "download", "conll2003", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cannot be downloaded" in out and str(tmp_path / "conll2003") in out
    with pytest.raises(MoeLensError, match="cannot be downloaded"):
        dl.download("conll2003", tmp_path)


def test_real_origins_are_the_documented_ones():
    urls = [f.origin for fs in dl.REMOTE.values() for f in fs]
    assert "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/train.txt" in urls
    assert "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json" in urls
