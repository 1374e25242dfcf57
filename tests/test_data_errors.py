"""Bad input raises InputError naming file and line; the CLI prints it on one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moe_lens.cli import main
from moe_lens.data import load_split
from moe_lens.data.conll import read_conll
from moe_lens.data.squad import read_squad
from moe_lens.data.wikitext import read_wikitext
from moe_lens.errors import InputError, MoeLensError

FIX = Path(__file__).parent / "fixtures" / "data"


def test_conll_wrong_column_count(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text("EU NNP B-NP B-ORG\nrejects VBZ B-VP\n")
    with pytest.raises(InputError) as e:
        read_conll(f)
    assert e.value.line == 2 and str(f) in str(e.value) and "4 columns" in str(e.value)


def test_conll_unknown_tag(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text("EU NNP B-NP B-ORG\n\nX NN B-NP B-FOO\n")
    with pytest.raises(InputError, match=r"train.txt:3: unknown NER tag 'B-FOO'"):
        read_conll(f)


@pytest.mark.parametrize("reader,name", [(read_conll, "t.txt"), (read_wikitext, "w.tokens"), (read_squad, "s.json")])
def test_empty_file(tmp_path, reader, name):
    f = tmp_path / name
    f.write_text("\n\n")
    with pytest.raises(InputError, match="empty file"):
        reader(f)


def test_non_utf8(tmp_path):
    f = tmp_path / "wiki.train.tokens"
    f.write_bytes(" = A = \n \n caf\xe9 ok \n".encode("latin-1"))
    with pytest.raises(InputError) as e:
        read_wikitext(f)
    assert e.value.line == 3 and "not UTF-8" in str(e.value) and "0xe9" in str(e.value)


def test_bad_json_line(tmp_path):
    f = tmp_path / "dev-v1.1.json"
    f.write_text('{"data": [\n {"title": "x",\n  "paragraphs": [}\n]}\n')
    with pytest.raises(InputError) as e:
        read_squad(f)
    assert e.value.line == 3 and "bad JSON" in str(e.value)


def _squad_with(tmp_path: Path, start: int, text: str) -> Path:
    data = {"data": [{"title": "T", "paragraphs": [{"context": "short context", "qas": [
        {"id": "1", "question": "q?", "answers": [{"text": text, "answer_start": start}]}]}]}]}
    f = tmp_path / "dev-v1.1.json"
    f.write_text(json.dumps(data))
    return f


def test_answer_outside_context(tmp_path):
    with pytest.raises(InputError, match=r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\].*outside its context"):
        read_squad(_squad_with(tmp_path, 10, "context beyond"))
    with pytest.raises(InputError, match="outside"):
        read_squad(_squad_with(tmp_path, -1, "short"))


def test_missing_field_names_entry(tmp_path):
    f = tmp_path / "dev-v1.1.json"
    f.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"qas": []}]}]}))
    with pytest.raises(InputError, match=r"data\[0\]\.paragraphs\[0\].*'context'"):
        read_squad(f)


def test_missing_dataset_and_unknown_names(tmp_path):
    with pytest.raises(MoeLensError, match="moe-lens data download wikitext2"):
        load_split("wikitext2", "train", tmp_path, pos=False)
    with pytest.raises(MoeLensError, match="unknown dataset 'ptb'"):
        load_split("ptb", "train", tmp_path)
    with pytest.raises(MoeLensError, match="unknown split 'dev2'"):
        load_split("conll2003", "dev2", FIX, pos=False)


def test_cli_prints_one_line(tmp_path, capsys):
    shutil.copytree(FIX, tmp_path / "d")
    (tmp_path / "d/conll2003/train.txt").write_text("EU NNP B-NP\n")
    assert main(["data", "info", "--data-dir", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "train.txt" in out and "ERROR" in out and "expected 4 columns" in out
    with pytest.raises(SystemExit):  # argparse rejects an unknown dataset name
        main(["data", "download", "nope"])
    capsys.readouterr()
    (tmp_path / "d/squad-v1.1/dev-v1.1.json").unlink()
    assert main(["data", "download", "squad", "--data-dir", str(tmp_path / "d"),
                 "--mirror", "http://127.0.0.1:9", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moe-lens data: error: download of http://127.0.0.1:9/")
    assert not (tmp_path / "d/squad-v1.1/train-v1.1.json").exists()
