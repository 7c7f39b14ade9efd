"""Tests for fastlm.data.corpus: default corpus selection, text reading, train/val split."""

import json
import sysconfig
from pathlib import Path

import pytest

from fastlm.data import corpus
from fastlm.data.corpus import (  
    DataError,
    default_corpus_files,
    default_corpus_texts,
    read_texts,
    split_train_val,
)

EXCLUDED_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_bytes(data.encode("utf-8"))
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch) -> Path:
    """A small stand-in for the standard library, pointed to by sysconfig."""
    root = tmp_path / "lib" / "python3.x"
    _write(root / "abc.py", "a" * 100)
    _write(root / "json" / "__init__.py", "b" * 200)
    _write(root / "json" / "decoder.py", "c" * 300)
    _write(root / "zipfile.py", "d" * 50)
    _write(root / "empty.py", "")
    _write(root / "latin1.py", b"# caf\xe9\n")  # not UTF-8
    _write(root / "notes.txt", "not python")
    _write(root / "site-packages" / "numpy" / "core.py", "x" * 10)
    _write(root / "test" / "test_abc.py", "x" * 10)
    _write(root / "unittest" / "test" / "test_case.py", "x" * 10)
    _write(root / "idlelib" / "idle_test" / "test_run.py", "x" * 10)
    _write(root / "idlelib" / "run.py", "e" * 20)
    _write(root / "lib2to3" / "tests" / "data" / "bom.py", "x" * 10)
    _write(root / "__pycache__" / "abc.cpython-311.py", "x" * 10)
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(root)})
    return root


def test_default_corpus_files_selection(fake_stdlib):
    files = default_corpus_files()
    rel = [f.relative_to(fake_stdlib).as_posix() for f in files]
    # Sorted by relative path; tests, site-packages, caches, empty, non-UTF-8 and non-.py files skipped.
    assert rel == ["abc.py", "idlelib/run.py", "json/__init__.py", "json/decoder.py", "zipfile.py"]
    assert default_corpus_texts() == ["a" * 100, "e" * 20, "b" * 200, "c" * 300, "d" * 50]


def test_default_corpus_files_max_bytes(fake_stdlib):
    # 100 + 20 + 200 fit in 330; decoder.py (300) would overflow and is skipped; zipfile.py (50) does not fit either.
    files = default_corpus_files(max_bytes=330)
    assert [f.name for f in files] == ["abc.py", "run.py", "__init__.py"]
    assert sum(f.stat().st_size for f in files) <= 330
    # Files that fit after a skipped one are still taken.
    assert [f.name for f in default_corpus_files(max_bytes=170)] == ["abc.py", "run.py", "zipfile.py"]
    assert [len(t) for t in default_corpus_texts(max_bytes=170)] == [100, 20, 50]


def test_default_corpus_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(tmp_path)})
    _write(tmp_path / "test" / "test_only.py", "x")
    with pytest.raises(RuntimeError, match="no Python standard-library sources found .* pass your own text files"):
        default_corpus_files()
    _write(tmp_path / "big.py", "x" * 1000)
    with pytest.raises(RuntimeError, match="fits in max_bytes=10"):
        default_corpus_files(max_bytes=10)
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        default_corpus_files(max_bytes=0)


def test_default_corpus_real_stdlib():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = default_corpus_files(max_bytes=300_000)
    assert files, "this interpreter ships its standard library sources"
    assert files == default_corpus_files(max_bytes=300_000)  # deterministic
    rel = [f.relative_to(stdlib) for f in files]  # raises if a file is outside the stdlib
    assert [r.as_posix() for r in rel] == sorted(r.as_posix() for r in rel)
    for r in rel:
        assert r.suffix == ".py"
        assert not EXCLUDED_PARTS & set(r.parts[:-1]), r
    sizes = [f.stat().st_size for f in files]
    assert 200_000 < sum(sizes) <= 300_000
    texts = default_corpus_texts(max_bytes=300_000)
    assert texts == [f.read_bytes().decode("utf-8") for f in files]
    assert any("def " in t for t in texts)


def test_default_corpus_real_stdlib_default_budget():
    files = default_corpus_files()
    total = sum(f.stat().st_size for f in files)
    assert 7_000_000 < total <= 8_000_000
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(f.parts) for f in files)


# --------------------------------------------------------------------------- read_texts


def test_read_texts_files_and_dirs(tmp_path):
    single = _write(tmp_path / "single.txt", "line one\r\nline two\n")
    d = tmp_path / "docs"
    _write(d / "b.md", "# Title\n")
    _write(d / "a.txt", "alpha")
    _write(d / "sub" / "c.py", "print('c')\n")
    _write(d / "sub" / "d.rst", "Heading\n=======\n")
    _write(d / "e.jsonl", json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two", "id": 2}) + "\n")
    _write(d / "image.bin", b"\x00\x01binary")
    _write(d / "data.csv", "x,y\n")
    _write(d / "latin1.txt", b"caf\xe9")  # not UTF-8: skipped inside a directory
    _write(d / "empty.txt", "")
    _write(d / ".git" / "HEAD.txt", "hidden")
    texts = read_texts([single, str(d)])
    assert texts == [
        "line one\r\nline two\n",  # line endings kept
        "alpha",
        "# Title\n",
        "json one",
        "json two",
        "print('c')\n",
        "Heading\n=======\n",
    ]
    # A single path (not in a list) is accepted too.
    assert read_texts(single) == ["line one\r\nline two\n"]


def test_read_texts_named_file_not_utf8_is_refused_or_skipped(tmp_path):
    path = _write(tmp_path / "legacy.dat", b"caf\xe9 \xef\xbb\xbfok")
    with pytest.raises(DataError, match=r"legacy.dat is not UTF-8 text \(byte 0xe9 at offset 3"):
        read_texts([path])
    binary = _write(tmp_path / "blob.txt", b"ab\x00cd")
    with pytest.raises(DataError, match=r"blob.txt is not UTF-8 text \(a NUL byte at offset 2"):
        read_texts([binary])
    good = _write(tmp_path / "good.txt", "fine")
    assert read_texts([path, good, binary], on_bad_file="skip") == ["fine"]
    with pytest.raises(DataError, match="every file was skipped"):
        read_texts([path], on_bad_file="skip")
    bom = _write(tmp_path / "bom.txt", b"\xef\xbb\xbfhello")
    assert read_texts([bom]) == ["hello"]


def test_read_texts_jsonl_errors(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        read_texts([bad])
    no_text = _write(tmp_path / "no_text.jsonl", '{"content": "x"}\n')
    with pytest.raises(ValueError, match=r'no_text.jsonl:1: expected an object with a string "text" field'):
        read_texts([no_text])


def test_read_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory: .*missing.txt"):
        read_texts([tmp_path / "missing.txt"])
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="directory .*empty_dir holds no readable text files"):
        read_texts([empty_dir])
    binary_dir = tmp_path / "binary_dir"
    _write(binary_dir / "x.bin", b"\x00")
    _write(binary_dir / "y.txt", b"\xff\xfe")
    with pytest.raises(ValueError, match="directory .*binary_dir holds no readable text files"):
        read_texts([binary_dir])
    empty_file = _write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match="file .*empty.txt holds no text"):
        read_texts([empty_file])


# --------------------------------------------------------------------------- split_train_val


def test_split_deterministic_by_document():
    texts = [f"doc {i}" for i in range(100)]
    train, val = split_train_val(texts, val_fraction=0.1, seed=3)
    assert (train, val) == split_train_val(list(texts), val_fraction=0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == sorted(texts)
    # Both halves keep the input order.
    assert train == [t for t in texts if t in set(train)]
    assert val == [t for t in texts if t in set(val)]
    assert split_train_val(texts, val_fraction=0.1, seed=4)[1] != val
    assert texts == [f"doc {i}" for i in range(100)]  # input untouched


def test_split_at_least_one_document_each_side():
    assert split_train_val(["a", "b"], val_fraction=0.01) in ((["a"], ["b"]), (["b"], ["a"]))
    train, val = split_train_val(["a", "b", "c"], val_fraction=0.99)
    assert len(train) == 1 and len(val) == 2


def test_split_single_document_by_characters():
    doc = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, val = split_train_val([doc], val_fraction=0.1)
    assert train == [doc[:900]] and val == [doc[900:]]
    assert split_train_val(["xy"], val_fraction=0.001) == (["x"], ["y"])
    with pytest.raises(ValueError, match="single document of 1 character"):
        split_train_val(["x"])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        split_train_val(["a", "b"], val_fraction=fraction)


def test_split_rejects_empty():
    with pytest.raises(ValueError, match="empty list of texts"):
        split_train_val([])


def test_module_exports():
    assert set(corpus.__all__) >= {"default_corpus_files", "default_corpus_texts", "read_texts", "split_train_val"}
