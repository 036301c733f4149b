"""Files on disk: atomic writes and content digests."""

from __future__ import annotations

import pytest

from itera import fsio


def test_atomic_dir_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with fsio.atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with fsio.atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with fsio.atomic_dir(final) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_file_failure_keeps_old_content(tmp_path):
    f = tmp_path / "f.json"
    f.write_text("old")
    with pytest.raises(KeyError):
        with fsio.atomic_file(f) as tmp:
            tmp.write_text("new")
            raise KeyError
    assert f.read_text() == "old" and list(tmp_path.iterdir()) == [f]


def test_directory_digest_tracks_content_and_names(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("hello")
    size, h1 = fsio.artifact_digest(d)
    assert size == 5
    (d / "a.txt").write_text("hellp")
    h2 = fsio.artifact_digest(d)[1]
    assert h2 != h1
    (d / "a.txt").rename(d / "b.txt")  # the same bytes under another name
    assert fsio.artifact_digest(d)[1] not in (h1, h2)
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    assert fsio.artifact_digest(f) == (3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def test_check_input_file_refuses_all_but_a_regular_file_without_opening_it(tmp_path):
    """A FIFO would block the read forever: refused by stat alone, named, with the fix."""
    import os

    from itera.errors import InputError, UsageError

    f = tmp_path / "ok.yaml"
    f.write_text("a: 1\n")
    assert fsio.check_input_file(f).st_size == 5
    os.mkfifo(tmp_path / "pipe")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    cases = [(tmp_path / "pipe", "is a FIFO (named pipe), not a regular file"),
             (tmp_path / "missing", "does not exist"),
             (tmp_path, "is a directory, not a file"),
             (tmp_path / "dangling", "is a symbolic link to a file that does not exist"),
             ("/dev/null", "is a device, not a regular file")]
    for path, words in cases:
        with pytest.raises(InputError) as e:
            fsio.check_input_file(path, "--config", "pass a YAML file")
        assert str(e.value) == f"--config {path} {words}; pass a YAML file", str(e.value)
    with pytest.raises(UsageError, match=r"^f .*pipe \(included at x:1\) is a FIFO"):
        fsio.check_input_file(tmp_path / "pipe", "f", error=UsageError, where="included at x:1")
