"""Downloads against a real http.server on 127.0.0.1: success, wrong checksum, cut connection."""
from __future__ import annotations

import functools
import shutil
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


def _serve_fixture_wikitext(root: Path, monkeypatch) -> None:
    """The fixture WikiText-2 on the local server, REMOTE pointed at it through $MOE_LENS_MIRROR."""
    (root / "wikitext-2").mkdir()
    files = []
    for s in ("train", "valid", "test"):
        src = FIX / "wikitext-2" / f"wiki.{s}.tokens"
        (root / "wikitext-2" / src.name).write_bytes(src.read_bytes())
        files.append(dl.RemoteFile(f"wikitext-2/{src.name}", "https://invalid.example/x", _sha(src)))
    monkeypatch.setitem(dl.REMOTE, "wikitext2", tuple(files))


def _tiny_train(tmp_path: Path, *extra: str) -> list[str]:
    from moe_lens import train

    train._load_data.cache_clear()  # per-process data cache: each run here must look at the disk
    return ["train", "--dataset", "wikitext2", "--mode", "naive_topk", "--max-steps", "1", "--max-eval-batches", "1",
            "--no-pos-tags", "--d-embed", "8", "--d-model", "8", "--expert-hidden", "8", "--bptt", "5",
            "--batch-size", "2", "--runs-dir", str(tmp_path / "runs"), "--no-progress", "--device", "cpu", *extra]


def test_train_without_a_data_dir_downloads_into_the_default_once(server, tmp_path, monkeypatch, capsys):
    root, url = server
    _serve_fixture_wikitext(root, monkeypatch)
    monkeypatch.setenv("MOE_LENS_MIRROR", url)
    monkeypatch.delenv("MOE_LENS_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MOE_LENS_CPU_EXT", "0")
    default = tmp_path / "home" / ".cache" / "moe-lens" / "data"
    assert main(_tiny_train(tmp_path, "--run-name", "a")) == 0
    out = capsys.readouterr().out
    notices = [ln for ln in out.splitlines() if "no data directory given" in ln]
    assert len(notices) == 1 and str(default) in notices[0]
    for s in ("train", "valid", "test"):
        name = f"wiki.{s}.tokens"
        assert (default / "wikitext-2" / name).read_bytes() == (FIX / "wikitext-2" / name).read_bytes()
    shutil.rmtree(root / "wikitext-2")  # a second run must not fetch again (the server has nothing now)
    assert main(_tiny_train(tmp_path, "--run-name", "b")) == 0
    assert "no data directory given" not in capsys.readouterr().out


@pytest.mark.parametrize("how", ["flag", "env"])
def test_train_with_a_given_data_dir_never_downloads(server, tmp_path, monkeypatch, capsys, how):
    root, url = server
    _serve_fixture_wikitext(root, monkeypatch)
    monkeypatch.setenv("MOE_LENS_MIRROR", url)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MOE_LENS_CPU_EXT", "0")
    empty = tmp_path / "empty"
    empty.mkdir()
    if how == "env":
        monkeypatch.setenv("MOE_LENS_DATA", str(empty))
    extra = ("--data-dir", str(empty)) if how == "flag" else ()
    assert main(_tiny_train(tmp_path, *extra)) == 2
    captured = capsys.readouterr()
    assert "moe-lens data download wikitext2" in captured.err and "no data directory given" not in captured.out
    assert list(empty.iterdir()) == [] and not (tmp_path / "home").exists()
