"""Fetching WikiText-2 and SQuAD v1.1 from their public origins, verified by SHA-256.

Origins: WikiText-2 from pytorch/examples (``word_language_model/data/wikitext-2/{train,valid,
test}.txt``, saved as ``wiki.*.tokens``); SQuAD from rajpurkar/SQuAD-explorer (the official
dataset URLs). Checksums are those of shared/data/README.md (SQuAD train: the published value).

A mirror (argument, else ``$MOE_LENS_MIRROR``) replaces the origins: file ``<local path>`` is
fetched from ``<mirror>/<local path>``, e.g. ``<mirror>/wikitext-2/wiki.train.tokens``, so any
static server over a data directory is a mirror. Each file streams into a temporary file beside
its target, hashed as it arrives, and is renamed into place only when complete and correct; a
short read or a checksum mismatch deletes it and raises `MoeLensError`. Present files are never
downloaded again. CoNLL-2003 cannot be redistributed: `CONLL_HELP` says how to get it.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moe_lens.data.paths import resolve_data_dir
from moe_lens.errors import MoeLensError

_PYTORCH = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2"
_SQUAD = "https://rajpurkar.github.io/SQuAD-explorer/dataset"


@dataclass(frozen=True)
class RemoteFile:
    local: str  # path under the data directory (also the path under a mirror)
    origin: str  # URL at the dataset's public origin
    sha256: str


REMOTE: dict[str, tuple[RemoteFile, ...]] = {
    "wikitext2": tuple(RemoteFile(f"wikitext-2/wiki.{s}.tokens", f"{_PYTORCH}/{s}.txt", h) for s, h in (
        ("train", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
        ("valid", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
        ("test", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"))),
    "squad": (
        RemoteFile("squad-v1.1/train-v1.1.json", f"{_SQUAD}/train-v1.1.json",
                   "3527663986b8295af4f7fcdff1ba1ff3f72d07d61a20f487cb238a6ef92fd955"),
        RemoteFile("squad-v1.1/dev-v1.1.json", f"{_SQUAD}/dev-v1.1.json",
                   "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9")),
}

CONLL_HELP = """\
CoNLL-2003 cannot be downloaded automatically: the Reuters text may not be redistributed.
To obtain it:
  1. Request the Reuters Corpus (RCV1) from NIST: https://trec.nist.gov/data/reuters/reuters.html
  2. Build eng.train / eng.testa / eng.testb with the CoNLL-2003 scripts:
     https://www.clips.uantwerpen.be/conll2003/ner/
  3. Put them (or train.txt / valid.txt / test.txt, 4 columns: token POS chunk NER) in
     {dir}
Research copies that carry the same files may also be used under the corpus terms."""


def fetch(url: str, dest: Path, sha256: str, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` atomically, checking length and SHA-256; `MoeLensError` otherwise."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        digest, got, total = hashlib.sha256(), 0, None
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                while chunk := resp.read(1 << 16):
                    f.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if total is not None and got != total:
            raise MoeLensError(f"download of {url} was cut after {got} of {total} bytes; partial file deleted")
        if digest.hexdigest() != sha256:
            raise MoeLensError(f"download of {url}: sha256 {digest.hexdigest()} != expected {sha256}; "
                               "file deleted")
        os.replace(tmp, dest)
        return dest
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise MoeLensError(f"download of {url} failed ({type(e).__name__}: {reason}); nothing written") from None
    finally:
        tmp.unlink(missing_ok=True)


def download(dataset: str, data_dir: str | Path | None = None, *, mirror: str | None = None,
             progress: bool = True, log: Callable[[str], None] = print) -> list[Path]:
    """Fetch every missing file of `dataset` ('wikitext2' or 'squad') into the data directory."""
    if dataset == "conll2003":
        raise MoeLensError(CONLL_HELP.format(dir=resolve_data_dir(data_dir) / "conll2003").replace("\n", " "))
    if dataset not in REMOTE:
        raise MoeLensError(f"unknown dataset {dataset!r} to download; allowed: {', '.join(REMOTE)}, conll2003")
    d = resolve_data_dir(data_dir)
    mirror = mirror or os.environ.get("MOE_LENS_MIRROR") or None
    out = []
    for rf in REMOTE[dataset]:
        dest = d / rf.local
        if dest.is_file():
            log(f"present   {dest}")
        else:
            url = f"{mirror.rstrip('/')}/{rf.local}" if mirror else rf.origin
            log(f"fetching  {url}")
            fetch(url, dest, rf.sha256, progress=progress)
            log(f"saved     {dest} (sha256 ok)")
        out.append(dest)
    return out
