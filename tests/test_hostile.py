"""Hostile input, table-driven: every command, the real CLI in a subprocess.

Each case builds its hostile input inside its own tmp directory and runs ``python -m itera``
once. Whatever the input, the run must:

1. exit 2 (bad input or usage) or 3 (a registry gate refused: promote, rollback);
2. print exactly one line on stderr, without a traceback and without the word "unexpected"
   (the last-resort message of an unforeseen crash), naming the problem (and the fix where
   the message gives one);
3. print nothing on stdout;
4. leave nothing new on disk: no output, no ``.NAME.tmp-*``/``.NAME.old-*`` leftover, in the
   case's directory, beside the inputs, or in the directory the CLI ran in;
5. leave the registry database byte-for-byte unchanged (every case has one, via ``--registry``
   or ``ITERA_REGISTRY``; ``ITERA_HOME`` is in the case's tmp directory too, where only files
   under ``cache/`` may appear) — except that a refused promotion or rollback appends exactly
   its one documented audit event (docs/commands.md: "recorded in the history") and changes nothing else;
6. leave every input file unchanged (sha256 of every file, before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import struct
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, run_itera, save_tiny

PWNED = Path("/tmp/itera-pwned")
MALICIOUS_PICKLE = b"\x80\x04cos\nsystem\n(S'touch /tmp/itera-pwned'\ntR."
NAN_TENSOR = "model.layers.0.mlp.down_proj.weight"


# --------------------------------------------------------------------------- snapshots


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (not following links): relative path -> what it is. Regular
    files by size, mode and sha256; directories by mode; links by target; FIFOs, sockets and
    devices by type. Nothing but regular files is ever opened (a FIFO would block)."""
    root = Path(root)
    out: dict[str, tuple] = {}

    def entry(p: Path) -> tuple:
        st = os.lstat(p)
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            return ("symlink", os.readlink(p))
        if stat.S_ISDIR(mode):
            return ("dir", stat.S_IMODE(mode))
        if stat.S_ISREG(mode):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            return ("file", stat.S_IMODE(mode), st.st_size, h.hexdigest())
        if stat.S_ISFIFO(mode):
            return ("fifo", stat.S_IMODE(mode))
        if stat.S_ISSOCK(mode):
            return ("socket",)
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            return ("device", st.st_rdev)
        return ("other", mode)

    if not os.path.lexists(root):
        return out
    out["."] = entry(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            out[p.relative_to(root).as_posix()] = entry(p)
    return out


def diff_snapshots(before: dict, after: dict) -> list[str]:
    problems = []
    for k in sorted(set(after) - set(before)):
        problems.append(f"new: {k} {after[k][0]}")
    for k in sorted(set(before) - set(after)):
        problems.append(f"removed: {k}")
    for k in sorted(set(before) & set(after)):
        if before[k] != after[k]:
            problems.append(f"changed: {k} {before[k]} -> {after[k]}")
    return problems


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _temp_names(directory: Path) -> set[str]:
    """Names in ``directory`` that look like itera's temporaries (.NAME.tmp-*, .old-*, .probe-*)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return set()
    return {n for n in names if n.startswith(".") and any(s in n for s in (".tmp-", ".old-", ".probe-"))}


def _stat_or_none(path: Path):
    """(inode, mtime) of ``path``, or None: a ``touch`` by a pickle that ran would change either."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def registry_tables(db: Path, scratch: Path) -> dict[str, list]:
    """Every row of every registry table, read from a copy (so the case's file is never opened)."""
    scratch.mkdir(parents=True, exist_ok=True)
    copy = scratch / "copy.db"
    for suffix in ("", "-wal", "-shm"):
        p = scratch / ("copy.db" + suffix)
        if p.exists():
            p.unlink()
    shutil.copyfile(db, copy)
    con = sqlite3.connect(str(copy))
    try:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()
                for t in ("versions", "tags", "aliases", "events")}
    finally:
        con.close()


# --------------------------------------------------------------------------- shared artifacts


@dataclass
class Fixtures:
    """Cheap artifacts shared by the cases (made once per module)."""

    ckpt: Path  # tiny_ckpt (session): never written to by a case
    tokenizer: Path
    corpus: Path
    dcorpus: Path
    dir: Path  # module directory holding what follows
    gguf: Path  # tiny_ckpt as GGUF F32
    onnx: Path  # tiny_ckpt as ONNX (plus its .kv.onnx)
    record: dict  # the export record of ``gguf``
    record_file: Path
    registry: Path  # tiny@1 (bare gguf); good@1 (tiny.gguf, perplexity 10, active), good@2 (candidate.gguf,
    #                 perplexity 20); no last-good

    def roots(self) -> list[Path]:
        """Directories whose every file is an input of some case."""
        return [self.ckpt.parent, self.tokenizer, self.corpus.parent, self.dcorpus.parent, self.dir]


def _ok(res) -> dict:
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def with_perplexity(rec: dict, perplexity: float, artifact: Path | None = None) -> dict:
    """A copy of an evaluate record claiming another perplexity (a candidate that regressed),
    optionally about another file (the registry keeps one version per distinct content)."""
    rec = json.loads(json.dumps(rec))
    for m in rec["metrics"]["datasets"].values():
        m["perplexity"] = perplexity
    if artifact is not None:
        rec["artifact"].update(path=str(artifact), bytes=artifact.stat().st_size, sha256=sha256_of(artifact))
    return rec


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tiny_ckpt, tokenizer_dir, corpus_file, distill_corpus) -> Fixtures:
    d = tmp_path_factory.mktemp("hostile-fixtures")
    gguf = d / "tiny.gguf"
    rec_file = d / "export-record.json"
    res = run_itera("export", "--model", tiny_ckpt, "--format", "gguf", "--gguf-type", "F32", "--out", gguf,
                    "--metrics-out", rec_file)
    record = _ok(res)
    onnx = d / "tiny.onnx"
    _ok(run_itera("export", "--model", tiny_ckpt, "--format", "onnx", "--out", onnx))
    evaluated = _ok(run_itera("evaluate", "--model", gguf, "-d", corpus_file, "--max-tokens", "256"))
    reg = d / "registry.db"
    _ok(run_itera("registry", "register", "--registry", reg, "--name", "tiny", "--path", gguf))
    candidate = d / "candidate.gguf"  # other bytes than tiny.gguf, so that it is a version of its own
    candidate.write_bytes(gguf.read_bytes() + b"\0" * 32)
    for ppl, artifact in ((10.0, None), (20.0, candidate)):
        _ok(run_itera("registry", "register", "--registry", reg, "--name", "good",
                      stdin=json.dumps(with_perplexity(evaluated, ppl, artifact))))
    _ok(run_itera("registry", "activate", "--registry", reg, "good@1"))
    listed = _ok(run_itera("registry", "list", "--registry", reg, "--name", "good"))
    assert [v["version"] for v in listed["versions"]] == [1, 2], listed
    leftovers = sorted(p.name for p in d.iterdir() if p.name.startswith("registry.db-"))
    assert not leftovers, leftovers  # a closed registry is one file: the cases copy just that
    return Fixtures(tiny_ckpt, tokenizer_dir, corpus_file, distill_corpus, d, gguf, onnx, record, rec_file, reg)


# --------------------------------------------------------------------------- the case context


class Ctx:
    """What a case's setup and argv see: its own directory and the shared fixtures."""

    def __init__(self, tmp: Path, fx: Fixtures):
        self.tmp, self.fx = tmp, fx
        self.reg = tmp / "registry.db"
        self.home = tmp.parent / "home"  # ITERA_HOME: beside the case's directory, checked on its own

    def p(self, *parts: str) -> Path:
        return self.tmp.joinpath(*parts)

    # shared fixtures, short names
    @property
    def ckpt(self) -> Path:
        return self.fx.ckpt

    @property
    def corpus(self) -> Path:
        return self.fx.corpus

    @property
    def dcorpus(self) -> Path:
        return self.fx.dcorpus

    @property
    def gguf(self) -> Path:
        return self.fx.gguf

    def copy_ckpt(self, name: str = "m") -> Path:
        dst = self.p(name)
        shutil.copytree(self.fx.ckpt, dst)
        return dst

    def edit_config(self, name: str = "m", raw: str | None = None, **changes) -> Path:
        """A copy of tiny_ckpt whose config.json has ``changes`` (or the text ``raw``)."""
        m = self.copy_ckpt(name)
        cfg = json.loads((m / "config.json").read_text())
        cfg.update(changes)
        text = json.dumps(cfg, indent=2) if raw is None else raw.replace("@CONFIG@", json.dumps(cfg)[1:-1])
        (m / "config.json").write_text(text)
        return m

    def write(self, name: str, data: str | bytes) -> Path:
        p = self.p(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            p.write_bytes(data)
        else:
            p.write_text(data, encoding="utf-8")
        return p

    def fifo(self, name: str) -> Path:
        p = self.p(name)
        os.mkfifo(p)
        return p

    def record(self, **artifact) -> dict:
        rec = json.loads(json.dumps(self.fx.record))
        rec["artifact"].update(artifact)
        return rec

    def pairs(self, name: str = "p.jsonl") -> Path:
        lines = [{"prompt": f"Q{i}", "chosen": "The small cat sees the dog.", "rejected": "cat cat cat"}
                 for i in range(4)]
        return self.write(name, "".join(json.dumps(x) + "\n" for x in lines))


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    """One hostile input: ``argv(ctx)`` after ``setup(ctx)``; the one stderr line must contain every
    needle (a needle that is a tuple: any one of its strings)."""

    id: str
    argv: Callable[[Ctx], Sequence]
    needles: tuple = ()
    code: int = 2
    setup: Callable[[Ctx], None] | None = None
    stdin: None | bytes | Callable[[Ctx], bytes] = None
    forbid: tuple = ()  # substrings the message must not contain
    timeout: float = 180
    registry_env: bool = True  # ITERA_REGISTRY points at the case's registry
    gate: bool = False  # exit 3 from a registry gate: exactly one refusal event may be appended
    xfail: str | None = None

    def param(self):
        marks = [pytest.mark.xfail(strict=True, reason=self.xfail)] if self.xfail else []
        return pytest.param(self, id=self.id, marks=marks)


def R(*args) -> Callable[[Ctx], list]:
    """argv for ``itera registry ...`` with the case's registry passed explicitly."""
    return lambda c: ["registry", *args[:1], "--registry", c.reg, *args[1:]]


def _deep(n: int) -> bytes:
    return b'{"itera": 1, "x": ' + b"[" * n + b"]" * n + b"}"


def _parent_chain(c: Ctx, depth: int) -> bytes:
    rec = None
    for _ in range(depth):
        node = json.loads(json.dumps(c.fx.record))
        node["parent"] = rec
        rec = node
    return json.dumps(rec).encode()


def _nan_weights(c: Ctx) -> None:
    from safetensors.torch import load_file, save_file

    m = c.copy_ckpt()
    f = m / "model.safetensors"
    tensors = load_file(str(f))
    tensors[NAN_TENSOR][0, 0] = float("nan")
    save_file(tensors, str(f), metadata={"format": "pt"})


def _malformed_shape(c: Ctx) -> None:
    m = c.copy_ckpt()
    p = m / "model.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["shape"] = "32"  # a string, not a list of sizes
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    new += b" " * (n - len(new))
    p.write_bytes(raw[:8] + new + raw[8 + n:])


def _gguf_context_1(c: Ctx) -> None:
    import gguf

    w = gguf.GGUFWriter(str(c.p("ctx1.gguf")), "llama")
    w.add_context_length(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _onnx_bad_context(c: Ctx) -> None:
    import onnx

    model = onnx.load(str(c.fx.onnx))
    for prop in model.metadata_props:
        if prop.key == "itera.max_position_embeddings":
            prop.value = "abc"
            break
    else:
        raise AssertionError("the ONNX export has no itera.max_position_embeddings metadata")
    onnx.save(model, str(c.p("bad.onnx")))
    shutil.copyfile(c.fx.onnx.with_name("tiny.kv.onnx"), c.p("bad.kv.onnx"))


def _small_vocab_ckpt(c: Ctx) -> None:
    save_tiny(c.p("m"), c.fx.tokenizer, vocab_size=100)


def _state(data: bytes):
    def setup(c: Ctx) -> None:
        c.write("out.train-state/state.pt", data)
    return setup


def _user_dir(c: Ctx, name: str) -> None:
    c.write(f"{name}/notes.txt", "the user's own notes; itera must not touch them\n")


def _not_sqlite(c: Ctx) -> None:
    c.write("bad.db", b"this is not a database, just some bytes the user keeps here\n" * 20)


def _newer_schema(c: Ctx) -> None:
    shutil.copyfile(c.fx.registry, c.p("new.db"))
    con = sqlite3.connect(str(c.p("new.db")))
    con.execute("PRAGMA user_version = 99")
    con.close()
    assert not os.path.exists(str(c.p("new.db")) + "-wal")


# --------------------------------------------------------------------------- round three (issue: a browser can poison the data)


def _register_then(c: Ctx, name: str, make, replace) -> None:
    """Register an artifact made by ``make(c)`` as NAME@1 in the case's registry, then let
    ``replace(c, path)`` turn it into something hostile (a FIFO, a link to /etc)."""
    path = make(c)
    res = run_itera("registry", "register", "--registry", c.reg, "--name", name, "--path", path,
                    env={"ITERA_HOME": str(c.home)})
    assert res.returncode == 0, res.stderr
    replace(c, path)


def _gguf_copy(c: Ctx) -> Path:
    return Path(shutil.copyfile(c.fx.gguf, c.p("a.gguf")))


def _to_fifo(c: Ctx, path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _to_etc(c: Ctx, path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.symlink_to("/etc")


def _gguf_context(c: Ctx, value: int) -> None:
    """A copy of the fixture GGUF whose llama.context_length says ``value``."""
    import gguf

    p = Path(shutil.copyfile(c.fx.gguf, c.p("c.gguf")))
    reader = gguf.GGUFReader(str(p), "r+")
    field = reader.fields["llama.context_length"]
    field.parts[field.data[0]][0] = value
    reader.data.flush()
    del reader


def _huge_weight(c: Ctx) -> None:
    from safetensors.torch import load_file, save_file

    m = c.copy_ckpt()
    f = m / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e30
    save_file(tensors, str(f), metadata={"format": "pt"})


def _feedback_store(c: Ctx) -> None:
    from itera.feedback import FeedbackStore

    with FeedbackStore(c.p("fb.db")):
        pass


def _bad_template(c: Ctx) -> None:
    c.write("t.jinja", b"\xff\xfe{{ messages }}")


def _symlink_loop(c: Ctx) -> None:
    os.symlink(c.p("b.txt"), c.p("a.txt"))
    os.symlink(c.p("a.txt"), c.p("b.txt"))


def _state_into_teacher(c: Ctx) -> None:
    c.copy_ckpt("t")
    os.symlink(c.p("t"), c.p("stu.train-state"))


DISTILL_SAVE = ["--student", "half", "--steps", "2", "--save-every", "1", "--batch-size", "2", "--seq-len", "16"]


EVAL = ["evaluate", "-d"]
QRTN = ["quantize", "--method", "rtn", "--bits", "8"]

CASES = [
    # ---------------------------------------------------------------- --out: never destroy what the user didn't name
    Case("quantize-out-existing-nonempty-dir", lambda c: [*QRTN, "--model", c.ckpt, "--out", c.p("out")],
         ("already exists", "--force"), setup=lambda c: _user_dir(c, "out")),
    Case("report-out-dir-with-user-file", lambda c: ["report", c.fx.record_file, "--out", c.p("rep")],
         ("already exists", "--force"), setup=lambda c: _user_dir(c, "rep")),
    Case("quantize-out-is-model", lambda c: [*QRTN, "--model", c.p("m"), "--out", c.p("m")],
         ("is the input", "refused even with --force"), setup=lambda c: c.copy_ckpt()),
    Case("dpo-out-is-model", lambda c: ["dpo-train", "--model", c.p("m"), "--out", c.p("m"), "--pairs", c.p("p.jsonl")],
         ("--out", "is the input", "write the output somewhere else"), setup=lambda c: (c.copy_ckpt(), c.pairs())),
    Case("distill-out-is-teacher", lambda c: ["distill", "--teacher", c.p("t"), "--out", c.p("t"), "--student", "half",
                                              "--data", c.dcorpus],
         ("--out", "is the input"), setup=lambda c: c.copy_ckpt("t")),
    Case("distill-out-is-teacher-force", lambda c: ["distill", "--teacher", c.p("t"), "--out", c.p("t"), "--student",
                                                    "half", "--data", c.dcorpus, "--force"],
         ("is the input", "refused even with --force"), setup=lambda c: c.copy_ckpt("t")),
    Case("distill-out-is-data-file", lambda c: ["distill", "--teacher", c.ckpt, "--out", c.p("d.txt"), "--student",
                                                "half", "--data", c.p("d.txt"), "--force"],
         ("--out", "is the input"), setup=lambda c: shutil.copyfile(c.dcorpus, c.p("d.txt"))),
    Case("export-out-inside-model", lambda c: ["export", "--model", c.p("m"), "--format", "gguf",
                                               "--out", c.p("m", "model.safetensors")],
         ("is inside the input", "refused even with --force"), setup=lambda c: c.copy_ckpt()),
    Case("export-out-inside-model-force", lambda c: ["export", "--model", c.p("m"), "--format", "gguf",
                                                     "--out", c.p("m", "model.safetensors"), "--force"],
         ("is inside the input", "refused even with --force"), setup=lambda c: c.copy_ckpt()),
    Case("quantize-out-contains-model", lambda c: [*QRTN, "--model", c.p("box", "m"), "--out", c.p("box"), "--force"],
         ("contains the input",), setup=lambda c: (c.p("box").mkdir(), shutil.copytree(c.ckpt, c.p("box", "m")))),
    Case("quantize-out-fifo", lambda c: [*QRTN, "--model", c.ckpt, "--out", c.p("fifo")],
         ("FIFO", "choose another path"), setup=lambda c: c.fifo("fifo"), timeout=60),
    Case("export-out-fifo-force", lambda c: ["export", "--model", c.ckpt, "--format", "gguf", "--out", c.p("x.gguf"),
                                             "--force"],
         ("FIFO", "choose another path"), setup=lambda c: c.fifo("x.gguf"), timeout=60),
    Case("quantize-out-symlink-to-user-dir", lambda c: [*QRTN, "--model", c.ckpt, "--out", c.p("link"), "--force"],
         ("symbolic link", "choose another path"),
         setup=lambda c: (_user_dir(c, "mine"), os.symlink(c.p("mine"), c.p("link")))),
    Case("export-out-symlink-to-user-file", lambda c: ["export", "--model", c.ckpt, "--format", "gguf",
                                                       "--out", c.p("link.gguf"), "--force"],
         ("symbolic link", "choose another path"),
         setup=lambda c: (c.write("precious.gguf", b"GGUF user bytes"), os.symlink(c.p("precious.gguf"),
                                                                                  c.p("link.gguf")))),
    Case("report-out-dangling-symlink", lambda c: ["report", c.fx.record_file, "--out", c.p("dangling")],
         ("symbolic link",), setup=lambda c: os.symlink(c.p("nowhere"), c.p("dangling"))),
    Case("quantize-out-under-regular-file", lambda c: [*QRTN, "--model", c.ckpt, "--out", c.p("afile", "sub", "x")],
         ("cannot be created", "not a directory"), setup=lambda c: c.write("afile", "plain file\n")),
    Case("export-out-under-regular-file", lambda c: ["export", "--model", c.ckpt, "--format", "gguf",
                                                     "--out", c.p("afile", "x.gguf")],
         (("not a directory", "does not exist"), "afile"), setup=lambda c: c.write("afile", "plain file\n")),
    Case("quantize-out-in-proc", lambda c: [*QRTN, "--model", c.ckpt, "--out", "/proc/itera-hostile-out"],
         ("/proc/itera-hostile-out", "cannot be written")),
    Case("evaluate-metrics-out-inside-model", lambda c: [*EVAL, c.corpus, "--model", c.p("m"),
                                                         "--metrics-out", c.p("m", "record.json")],
         ("--metrics-out", "inside, the input"), setup=lambda c: c.copy_ckpt()),
    Case("evaluate-metrics-out-under-regular-file", lambda c: [*EVAL, c.corpus, "--model", c.ckpt,
                                                               "--metrics-out", c.p("afile", "r.json")],
         ("--metrics-out", "cannot be created"), setup=lambda c: c.write("afile", "x\n")),
    Case("dpo-save-pairs-is-pairs", lambda c: ["dpo-train", "--model", c.ckpt, "--pairs", c.p("p.jsonl"),
                                               "--save-pairs", c.p("p.jsonl"), "--out", c.p("a"), "--force"],
         ("--save-pairs", "is the input"), setup=lambda c: c.pairs()),
    Case("discover-hostfile-is-hosts-file", lambda c: ["discover-cluster", "--hosts-file", c.p("hosts.txt"),
                                                       "--hostfile", c.p("hosts.txt"), "--force"],
         ("--hostfile", "is the input"), setup=lambda c: c.write("hosts.txt", "localhost\n")),
    Case("discover-out-fifo", lambda c: ["discover-cluster", "localhost", "--out", c.p("inv.json")],
         ("FIFO",), setup=lambda c: c.fifo("inv.json"), timeout=60),

    # ---------------------------------------------------------------- registry
    Case("registry-register-etc-shadow", R("register", "--name", "x", "--path", "/etc/shadow"),
         ("/etc/shadow", "not an artifact itera can read")),
    Case("registry-register-dotdot-passwd", R("register", "--name", "x", "--path",
                                              "../../../../../../../../etc/passwd"),
         ("etc/passwd", "not an artifact itera can read")),
    Case("registry-register-fifo", R("register", "--name", "x", "--path", "@FIFO"),
         ("FIFO", "not a regular file"), setup=lambda c: c.fifo("pipe.gguf"), timeout=30),
    Case("registry-register-dev-zero", R("register", "--name", "x", "--path", "/dev/zero"),
         ("/dev/zero", "device", "not a regular file"), timeout=30),
    Case("registry-register-proc-self", R("register", "--name", "x", "--path", "/proc/self"),
         ("/proc/self", "not an artifact itera can read"), timeout=30),
    Case("registry-register-directory-without-artifact", R("register", "--name", "x", "--path", "@TMP"),
         ("not an artifact itera can read",), setup=lambda c: c.write("stuff/a.txt", "hello\n")),
    Case("registry-register-gguf-with-wrong-magic", R("register", "--name", "x", "--path", "@FAKE"),
         ("does not start like a .gguf file",), setup=lambda c: c.write("fake.gguf", b"MZ\x90\x00 not gguf")),
    Case("registry-register-record-null-sha-etc-passwd", R("register", "--name", "x"),
         ("/etc/passwd", "not an artifact itera can read"),
         stdin=lambda c: json.dumps(c.record(path="/etc/passwd", sha256=None, kind="file", format="file")).encode()),
    Case("registry-register-symlink-loop", R("register", "--name", "x", "--path", "@LOOP"),
         ("loop-a", "cannot be read"),
         setup=lambda c: (os.symlink(c.p("loop-b"), c.p("loop-a")), os.symlink(c.p("loop-a"), c.p("loop-b")))),
    Case("registry-register-ckpt-holding-fifo", R("register", "--name", "x", "--path", "@CKPT"),
         ("FIFO", "not a regular file"), setup=lambda c: (c.copy_ckpt(), c.fifo("m/weights.pipe")), timeout=30),
    Case("registry-register-ckpt-dangling-link", R("register", "--name", "x", "--path", "@CKPT"),
         ("symbolic link", "does not exist"),
         setup=lambda c: (c.copy_ckpt(), os.symlink(c.p("nowhere"), c.p("m", "extra.json")))),
    Case("registry-register-record-file-is-fifo", R("register", "--name", "x", "--record", "@FIFO"),
         ("FIFO", "not a regular file"), setup=lambda c: c.fifo("pipe.gguf"), timeout=30),
    Case("registry-register-record-and-path", R("register", "--name", "x", "--record", "@REC", "--path", "@GGUF"),
         ("--record", "--path", "not both")),
    Case("registry-register-name-newline", R("register", "--name", "bad\nname", "--path", "@GGUF"),
         ("invalid model name", "bad\\nname")),
    Case("registry-register-name-tab", R("register", "--name", "tab\tname", "--path", "@GGUF"),
         ("invalid model name", "tab\\tname")),
    Case("registry-register-name-sql", R("register", "--name", "x'; DROP TABLE versions; --", "--path", "@GGUF"),
         ("invalid model name",)),
    Case("registry-register-bad-tag", R("register", "--name", "x", "--path", "@GGUF", "--tag", "no-equals-sign"),
         ("invalid tag", "key=value")),
    Case("registry-register-record-nan", R("register", "--name", "x"), ("NaN",),
         stdin=lambda c: json.dumps({**c.record(), "metrics": {"x": float("nan")}}).encode()),
    Case("registry-register-record-changed-artifact", R("register", "--name", "x"),
         ("changed since the record was written",),
         setup=lambda c: c.write("copy.gguf", c.gguf.read_bytes() + b"\0"),
         stdin=lambda c: json.dumps(c.record(path=str(c.p("copy.gguf")))).encode()),
    Case("registry-register-deep-parent-chain", R("register", "--name", "x"), ("nested", "deep"),
         stdin=lambda c: _parent_chain(c, 400)),
    Case("registry-show-arabic-indic-digit", R("show", "good@١"), ("invalid version", "NAME@N")),
    Case("registry-show-version-too-large", R("show", "good@99999999999999999999999"), ("invalid version",)),
    Case("registry-show-version-zero", R("show", "good@0"), ("invalid version", "N >= 1")),
    Case("registry-activate-version-negative", R("activate", "good@-1"), ("invalid version",)),
    Case("registry-resolve-version-fullwidth-digit", R("resolve", "good@１"), ("invalid version",)),
    Case("registry-show-unknown-name", R("show", "nosuch"), ("no model named 'nosuch'", "itera registry list")),
    Case("registry-resolve-unknown-name", R("resolve", "nosuch@active"), ("no model named 'nosuch'",)),
    Case("registry-activate-unknown-name", R("activate", "nosuch@1"), ("no model named 'nosuch'",)),
    Case("registry-history-bad-name", R("history", "../../etc"), ("invalid model name",)),
    Case("registry-compare-one-version", R("compare", "good@1"), ("at least two versions",)),
    Case("registry-promote-margin-nan", R("promote", "good@2", "--metric", "perplexity", "--max-regression", "nan"),
         ("--max-regression",)),
    Case("registry-rollback-bad-name", R("rollback", "good\x1b[2J"), ("invalid model name",)),
    Case("registry-show-unknown-version", R("show", "good@7"), ("good has no version 7",)),
    Case("registry-resolve-no-last-good", R("resolve", "good@last-good"), ("no 'last-good' version",)),
    Case("registry-list-name-with-newline-env", lambda c: ["registry", "list", "--name", "a\nb"],
         ("invalid model name",)),
    Case("registry-promote-regression", R("promote", "good@2", "--metric", "perplexity"),
         ("promotion refused", "good@active stays at version 1"), code=3, gate=True),
    Case("registry-rollback-no-last-good", R("rollback", "good"),
         ("rollback refused", "no last-good", "mark-good"), code=3, gate=True),
    Case("registry-rollback-to-missing-version", R("rollback", "good", "--to", "99"),
         ("good has no version 99", "itera registry list")),
    Case("registry-promote-negative-margin", R("promote", "good@2", "--metric", "perplexity",
                                               "--max-regression=-5%"),
         ("--max-regression", "non-negative")),
    Case("registry-promote-unknown-metric", R("promote", "good@2", "--metric", "joy"), ("has no metric 'joy'",)),
    Case("registry-not-sqlite", lambda c: ["registry", "list", "--registry", c.p("bad.db")],
         ("bad.db", "not a usable SQLite database"), setup=_not_sqlite),
    Case("registry-not-sqlite-register", lambda c: ["registry", "register", "--registry", c.p("bad.db"), "--name", "x",
                                                    "--path", c.gguf],
         ("bad.db", "not a usable SQLite database"), setup=_not_sqlite),
    Case("registry-newer-schema", lambda c: ["registry", "show", "good", "--registry", c.p("new.db")],
         ("created by a newer itera", "99"), setup=_newer_schema),
    Case("registry-newer-schema-via-env", lambda c: ["registry", "register", "--name", "x", "--path", c.gguf],
         ("created by a newer itera",), setup=_newer_schema, registry_env=False),
    Case("registry-path-is-directory", lambda c: ["registry", "list", "--registry", c.p("dbdir")],
         ("dbdir", "directory"), setup=lambda c: c.p("dbdir").mkdir()),

    # ---------------------------------------------------------------- records on stdin
    Case("stdin-json-nested-100k-deep", lambda c: [*EVAL, c.corpus], ("nested",), stdin=_deep(100_000)),
    Case("stdin-json-nested-5000-deep-registry", R("register", "--name", "x"), ("nested",), stdin=_deep(5000)),
    Case("stdin-nan", lambda c: [*EVAL, c.corpus], ("NaN",),
         stdin=lambda c: json.dumps({**c.record(), "metrics": {"m": float("nan")}}).encode()),
    Case("stdin-infinity", lambda c: [*QRTN, "--out", c.p("q")], ("Infinity",),
         stdin=lambda c: json.dumps({**c.record(), "duration_s": float("inf")}).encode()),
    Case("stdin-two-documents", lambda c: ["export", "--format", "gguf", "--out", c.p("x.gguf")],
         ("more than one JSON document",),
         stdin=lambda c: (json.dumps(c.fx.record) + "\n" + json.dumps(c.fx.record) + "\n").encode()),
    Case("stdin-not-utf8", lambda c: ["dpo-train", "--pairs", c.p("p.jsonl"), "--out", c.p("a")], ("not UTF-8",),
         setup=lambda c: c.pairs(), stdin=b'{"itera": 1, "command": "\xff\xfe"}'),
    Case("stdin-artifact-does-not-exist", lambda c: [*EVAL, c.corpus], ("gone.gguf", "does not exist"),
         stdin=lambda c: json.dumps(c.record(path=str(c.p("gone.gguf")))).encode()),
    Case("stdin-json-array", lambda c: ["benchmark-power", "--runs", "1"], ("not an itera record",),
         stdin=b"[1, 2, 3]"),
    Case("stdin-record-without-artifact", lambda c: [*EVAL, c.corpus], ("no artifact path", "--model"),
         stdin=lambda c: json.dumps({**c.fx.record, "artifact": None}).encode()),

    # ---------------------------------------------------------------- model configs and weights
    Case("config-num-hidden-layers-1e9", lambda c: [*EVAL, c.corpus, "--model", c.p("m")], ("num_hidden_layers",),
         setup=lambda c: c.edit_config(num_hidden_layers=1_000_000_000), timeout=60),
    Case("config-max-position-embeddings-0", lambda c: [*QRTN, "--model", c.p("m"), "--out", c.p("q")],
         ("max_position_embeddings",), setup=lambda c: c.edit_config(max_position_embeddings=0)),
    Case("config-max-position-embeddings-negative", lambda c: ["export", "--model", c.p("m"), "--format", "gguf",
                                                               "--out", c.p("x.gguf")],
         ("max_position_embeddings",), setup=lambda c: c.edit_config(max_position_embeddings=-1)),
    Case("config-max-position-embeddings-1e12", lambda c: [*EVAL, c.corpus, "--model", c.p("m")],
         ("max_position_embeddings",), setup=lambda c: c.edit_config(max_position_embeddings=1e12), timeout=60),
    Case("config-rope-theta-0", lambda c: [*EVAL, c.corpus, "--model", c.p("m")], ("rope_theta",),
         setup=lambda c: c.edit_config(rope_theta=0)),
    Case("config-rms-norm-eps-nan", lambda c: [*EVAL, c.corpus, "--model", c.p("m")], ("rms_norm_eps",),
         setup=lambda c: c.edit_config(raw='{@CONFIG@, "rms_norm_eps": NaN}')),
    Case("config-hidden-size-string", lambda c: [*EVAL, c.corpus, "--model", c.p("m")], ("hidden_size",),
         setup=lambda c: c.edit_config(hidden_size="abc")),
    Case("config-vocab-size-below-tokenizer", lambda c: [*EVAL, c.corpus, "--model", c.p("m")],
         (("vocab_size", "embed_tokens"),), setup=lambda c: c.edit_config(vocab_size=100)),
    Case("tokenizer-larger-than-embedding", lambda c: [*EVAL, c.corpus, "--model", c.p("m")],
         ("tokenizer", "100"), setup=_small_vocab_ckpt),
    Case("config-is-json-list", lambda c: ["registry", "register", "--registry", c.reg, "--name", "x",
                                           "--path", c.p("m")],
         ("config.json", "JSON object"), setup=lambda c: c.edit_config(raw="[1, 2, 3]")),
    Case("safetensors-shape-not-a-list", lambda c: [*EVAL, c.corpus, "--model", c.p("m")],
         ("model.norm.weight", "malformed shape"), setup=_malformed_shape),
    Case("nan-weights-evaluate", lambda c: [*EVAL, c.corpus, "--model", c.p("m")], (NAN_TENSOR, "NaN"),
         setup=_nan_weights),
    Case("nan-weights-quantize", lambda c: [*QRTN, "--model", c.p("m"), "--out", c.p("q")], (NAN_TENSOR, "NaN"),
         setup=_nan_weights),
    Case("nan-weights-export", lambda c: ["export", "--model", c.p("m"), "--format", "gguf", "--gguf-type", "F32",
                                          "--out", c.p("x.gguf")], (NAN_TENSOR, "NaN"), setup=_nan_weights),
    Case("pickled-weights-quantize", lambda c: [*QRTN, "--model", c.p("m"), "--out", c.p("q")],
         ("never unpickles",),
         setup=lambda c: (c.copy_ckpt(), os.unlink(c.p("m", "model.safetensors")),
                          c.write("m/pytorch_model.bin", MALICIOUS_PICKLE))),

    # ---------------------------------------------------------------- distill --resume
    Case("distill-resume-garbage-state", lambda c: ["distill", "--teacher", c.ckpt, "--student", "half", "--data",
                                                    c.dcorpus, "--out", c.p("out"), "--resume", "--steps", "2"],
         ("state.pt", "not a readable itera training state"), forbid=("weights_only=False",),
         setup=_state(b"\x00garbage, not a zip or a pickle" * 50)),
    Case("distill-resume-malicious-pickle", lambda c: ["distill", "--teacher", c.ckpt, "--student", "half", "--data",
                                                       c.dcorpus, "--out", c.p("out"), "--resume", "--steps", "2"],
         ("state.pt", "not a readable itera training state"), forbid=("weights_only=False", "weights_only"),
         setup=_state(MALICIOUS_PICKLE)),

    # ---------------------------------------------------------------- dpo-train pairs
    Case("dpo-pairs-lone-surrogate", lambda c: ["dpo-train", "--model", c.ckpt, "--pairs", c.p("s.jsonl"),
                                                "--out", c.p("a")],
         ("s.jsonl:1", "lone surrogate"),
         setup=lambda c: c.write("s.jsonl", json.dumps({"prompt": "\ud800", "chosen": "a", "rejected": "b"},
                                                       ensure_ascii=True) + "\n")),
    Case("dpo-pairs-bom", lambda c: ["dpo-train", "--model", c.ckpt, "--pairs", c.p("b.jsonl"), "--out", c.p("a")],
         ("b.jsonl:1", "byte-order mark"),
         setup=lambda c: c.write("b.jsonl", b"\xef\xbb\xbf" + json.dumps(
             {"prompt": "p", "chosen": "a", "rejected": "b"}).encode() + b"\n")),
    Case("dpo-pairs-missing-field-line-2", lambda c: ["dpo-train", "--model", c.ckpt, "--pairs", c.p("m.jsonl"),
                                                      "--out", c.p("a")],
         ("m.jsonl:2", "rejected"),
         setup=lambda c: c.write("m.jsonl", '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                                            '{"prompt": "p", "chosen": "a"}\n')),
    Case("dpo-feedback-rating-nan", lambda c: ["dpo-train", "--model", c.ckpt, "--feedback", c.p("fb.jsonl"),
                                               "--out", c.p("a")],
         ("fb.jsonl", ("NaN", "not a number")),
         setup=lambda c: c.write("fb.jsonl", '{"type": "rating", "prompt": "p", "response": "r", "rating": NaN}\n'
                                             '{"type": "rating", "prompt": "p", "response": "s", "rating": 1}\n')),
    Case("dpo-pairs-fifo", lambda c: ["dpo-train", "--model", c.ckpt, "--pairs", c.p("f.jsonl"), "--out", c.p("a")],
         ("f.jsonl", ("FIFO", "not a regular file")), setup=lambda c: c.fifo("f.jsonl"), timeout=60),

    # ---------------------------------------------------------------- runnable artifacts
    Case("gguf-context-length-1", lambda c: [*EVAL, c.corpus, "--model", c.p("ctx1.gguf")],
         ("ctx1.gguf", "context"), setup=_gguf_context_1),
    Case("onnx-max-position-embeddings-abc", lambda c: [*EVAL, c.corpus, "--model", c.p("bad.onnx")],
         ("bad.onnx", "max_position_embeddings", "re-export"), setup=_onnx_bad_context),
    Case("evaluate-model-fifo", lambda c: [*EVAL, c.corpus, "--model", c.p("m.gguf")],
         ("FIFO", "not a regular file"), setup=lambda c: c.fifo("m.gguf"), timeout=30),
    Case("evaluate-dataset-fifo", lambda c: [*EVAL, c.p("d.txt"), "--model", c.ckpt],
         ("d.txt", "FIFO", "not a regular file"), setup=lambda c: c.fifo("d.txt"), timeout=60),
    Case("evaluate-model-dev-zero", lambda c: [*EVAL, c.corpus, "--model", "/dev/zero"],
         ("/dev/zero", "device"), timeout=30),
    Case("evaluate-dataset-dev-zero", lambda c: [*EVAL, "/dev/zero", "--model", c.ckpt],
         ("/dev/zero", "device"), timeout=60),
    Case("evaluate-dir-without-config", lambda c: [*EVAL, c.corpus, "--model", c.p("empty")],
         ("has no config.json",), setup=lambda c: c.write("empty/readme.txt", "hi\n")),
    Case("evaluate-dataset-jsonl-lone-surrogate", lambda c: [*EVAL, c.p("s.jsonl"), "--model", c.ckpt],
         ("s.jsonl", "lone surrogate"),
         setup=lambda c: c.write("s.jsonl", json.dumps({"text": "ok \udfff"}, ensure_ascii=True) + "\n")),
    Case("evaluate-truncated-gguf", lambda c: [*EVAL, c.corpus, "--model", c.p("cut.gguf")],
         ("cut.gguf", "not a GGUF model file"), setup=lambda c: c.write("cut.gguf", c.gguf.read_bytes()[:300])),

    # ---------------------------------------------------------------- discover-cluster (nothing is contacted)
    Case("discover-policy-yaml-list", lambda c: ["discover-cluster", "localhost", "--config", c.p("p.yaml")],
         ("p.yaml", "must be a mapping"), setup=lambda c: c.write("p.yaml", "- 10.0.0.0/8\n- localhost\n")),
    Case("discover-policy-networks-int", lambda c: ["discover-cluster", "localhost", "--config", c.p("p.yaml")],
         ("networks", "list of strings"), setup=lambda c: c.write("p.yaml", "networks: 5\nnames: ['*']\n")),
    Case("discover-policy-names-null", lambda c: ["discover-cluster", "localhost", "--config", c.p("p.yaml")],
         ("names", "list of strings"), setup=lambda c: c.write("p.yaml", "networks: ['127.0.0.0/8']\nnames: null\n")),
    Case("discover-policy-not-utf8", lambda c: ["discover-cluster", "localhost", "--config", c.p("p.yaml")],
         ("p.yaml",), setup=lambda c: c.write("p.yaml", b"names: ['\xff\xfe']\n")),
    Case("discover-hosts-file-not-utf8", lambda c: ["discover-cluster", "--hosts-file", c.p("hosts.txt")],
         ("hosts.txt", "not UTF-8"), setup=lambda c: c.write("hosts.txt", b"localhost\n\xff\xfegpu-box\n")),
    Case("discover-hosts-file-fifo", lambda c: ["discover-cluster", "--hosts-file", c.p("hosts.txt")],
         ("hosts.txt", "FIFO"), setup=lambda c: c.fifo("hosts.txt"), timeout=30),
    Case("discover-policy-fifo", lambda c: ["discover-cluster", "localhost", "--config", c.p("p.yaml")],
         ("p.yaml", ("FIFO", "not a regular file")), setup=lambda c: c.fifo("p.yaml"), timeout=20),
    Case("discover-ssh-config-fifo", lambda c: ["discover-cluster", "localhost", "--ssh-config", c.p("ssh_config")],
         ("ssh_config", ("FIFO", "not a regular file")), setup=lambda c: c.fifo("ssh_config"), timeout=10),
    Case("discover-ssh-config-include-fifo", lambda c: ["discover-cluster", "localhost", "--ssh-config",
                                                        c.p("ssh_config")],
         ("included", ("FIFO", "not a regular file")),
         setup=lambda c: (c.fifo("included"), c.write("ssh_config", f"Include {c.p('included')}\n")), timeout=10),
    Case("discover-timeout-nan", lambda c: ["discover-cluster", "localhost", "--timeout", "nan"], ("--timeout",)),
    Case("discover-deadline-inf", lambda c: ["discover-cluster", "localhost", "--deadline", "inf"], ("--deadline",)),
    Case("discover-rdzv-port-99999", lambda c: ["discover-cluster", "localhost", "--rdzv-port", "99999"],
         ("--rdzv-port", "99999")),
    Case("discover-nproc-huge", lambda c: ["discover-cluster", "localhost", "--nproc-per-node",
                                           "100000000000000000000"], ("--nproc-per-node",)),
    Case("discover-host-ssh-option", lambda c: ["discover-cluster", "--", "-oProxyCommand=x"],
         ("refusing host spec", "-oProxyCommand=x")),
    Case("discover-host-ssh-option-unquoted", lambda c: ["discover-cluster", "-oProxyCommand=x"],
         ("-o",)),
    Case("discover-host-in-hosts-file-ssh-option", lambda c: ["discover-cluster", "--hosts-file", c.p("hosts.txt")],
         ("refusing host spec", "-oProxyCommand"), setup=lambda c: c.write("hosts.txt", "-oProxyCommand=touch /tmp/x\n")),
    Case("discover-host-shell-metachar", lambda c: ["discover-cluster", "a;touch${IFS}x"], ("refusing host spec",)),
    Case("discover-host-bad-port", lambda c: ["discover-cluster", "user@host:70000"], ("refusing host spec", "70000")),
    Case("discover-launch-unbalanced-quote", lambda c: ["discover-cluster", "localhost", "--launch", "distill 'x"],
         ("--launch", "not a command line")),

    # ---------------------------------------------------------------- report
    Case("report-format-pdf", lambda c: ["report", c.fx.record_file, "--out", c.p("rep"), "--format", "pdf"],
         ("unknown --format 'pdf'", "md or html")),
    Case("report-record-not-json", lambda c: ["report", c.p("r.json"), "--out", c.p("rep")],
         ("r.json", "not a JSON record"), setup=lambda c: c.write("r.json", "perplexity: 12.5\n")),
    Case("report-record-file-fifo", lambda c: ["report", c.p("r.json"), "--out", c.p("rep")],
         ("r.json", "FIFO"), setup=lambda c: c.fifo("r.json"), timeout=30),
    Case("report-stdin-not-utf8", lambda c: ["report", "--out", c.p("rep")], ("not UTF-8",),
         stdin=b'{"itera": 1, "command": "caf\xe9"}\n'),
    Case("report-record-with-wrong-types", lambda c: ["report", c.p("bench.json"), "--out", c.p("rep")],
         ("bench.json",),
         setup=lambda c: c.write("bench.json", json.dumps({**c.fx.record, "command": "benchmark-power", "metrics": {
             "decode_tokens_per_s": "fast", "runtime": 5, "j_per_token": {"a": 1}}}))),
    Case("report-missing-record-file", lambda c: ["report", c.p("nope.json"), "--out", c.p("rep")],
         ("nope.json", "does not exist")),

    # ---------------------------------------------------------------- benchmark-power
    Case("benchmark-runs-0", lambda c: ["benchmark-power", "--model", c.gguf, "--runs", "0"], ("--runs", "at least 1")),
    Case("benchmark-meter-geiger", lambda c: ["benchmark-power", "--model", c.gguf, "--runs", "1", "--meter", "geiger"],
         ("unknown --meter 'geiger'", "auto, rapl, nvml or none")),
    Case("benchmark-estimate-toaster", lambda c: ["benchmark-power", "--model", c.gguf, "--runs", "1",
                                                  "--estimate", "toaster"],
         ("toaster", "power profile")),
    Case("benchmark-estimate-yaml-list", lambda c: ["benchmark-power", "--model", c.gguf, "--runs", "1",
                                                    "--estimate", c.p("profile.yaml")],
         ("profile.yaml", "tdp_w"), setup=lambda c: c.write("profile.yaml", "- 15\n- 3\n")),
    Case("benchmark-estimate-nan-profile", lambda c: ["benchmark-power", "--model", c.gguf, "--runs", "1",
                                                      "--warmup", "0", "--prompt-tokens", "4", "--gen-tokens", "4",
                                                      "--estimate", c.p("nan.yaml")],
         ("nan.yaml", "tdp_w"), setup=lambda c: c.write("nan.yaml", "tdp_w: .nan\nidle_w: 1\ncores: 2\n")),
    Case("benchmark-compare-missing", lambda c: ["benchmark-power", "--model", c.gguf, "--runs", "1",
                                                 "--compare", c.p("nope.onnx")],
         ("nope.onnx", "does not exist")),

    # ---------------------------------------------------------------- quantize options
    Case("quantize-bits-5", lambda c: ["quantize", "--model", c.ckpt, "--method", "rtn", "--bits", "5",
                                       "--out", c.p("q")], ("--bits 5", "8, 4, 3 or 2")),
    Case("quantize-auto-without-target", lambda c: ["quantize", "--model", c.ckpt, "--method", "auto",
                                                    "--calib", c.corpus, "--out", c.p("q")],
         ("--method auto needs one of --target-bpw",)),
    Case("quantize-plan-not-json", lambda c: ["quantize", "--model", c.ckpt, "--method", "auto", "--plan",
                                              c.p("plan.json"), "--calib", c.corpus, "--out", c.p("q")],
         ("plan.json", "not a plan file"), setup=lambda c: c.write("plan.json", "bits: {all: 4}\n")),
    Case("quantize-plan-fifo", lambda c: ["quantize", "--model", c.ckpt, "--method", "auto", "--plan",
                                          c.p("plan.json"), "--calib", c.corpus, "--out", c.p("q")],
         ("plan.json", ("FIFO", "not a regular file")), setup=lambda c: c.fifo("plan.json"), timeout=25),
    Case("quantize-damp-nan", lambda c: ["quantize", "--model", c.ckpt, "--calib", c.corpus, "--damp", "nan",
                                         "--out", c.p("q")], ("--damp",)),
    Case("quantize-group-size-0", lambda c: [*QRTN, "--model", c.ckpt, "--group-size", "0", "--out", c.p("q")],
         ("--group-size must be positive",)),

    # ---------------------------------------------------------------- distill / export / evaluate options
    Case("distill-student-preset-path-traversal", lambda c: ["distill", "--teacher", c.ckpt, "--student",
                                                             "../../../../etc/passwd", "--data", c.dcorpus,
                                                             "--out", c.p("s")],
         ("unknown student", "../../../../etc/passwd")),
    Case("distill-student-yaml-scalar", lambda c: ["distill", "--teacher", c.ckpt, "--student", c.p("s.yaml"),
                                                   "--data", c.dcorpus, "--out", c.p("s")],
         ("s.yaml",), setup=lambda c: c.write("s.yaml", "42\n")),
    Case("distill-student-yaml-layers-string", lambda c: ["distill", "--teacher", c.ckpt, "--student", c.p("s.yaml"),
                                                          "--data", c.dcorpus, "--out", c.p("s")],
         ("layers",), setup=lambda c: c.write("s.yaml", "layers: abc\n")),
    Case("distill-tokenizer-fifo", lambda c: ["distill", "--alpha", "0", "--tokenizer", c.p("tok.json"), "--layers",
                                              "2", "--hidden", "32", "--heads", "4", "--data", c.dcorpus,
                                              "--out", c.p("s")],
         ("tok.json", ("FIFO", "not a regular file")), setup=lambda c: c.fifo("tok.json"), timeout=60),
    Case("distill-alpha-nan", lambda c: ["distill", "--teacher", c.ckpt, "--student", "half", "--data", c.dcorpus,
                                         "--out", c.p("s"), "--alpha", "nan"], ("--alpha",)),
    Case("export-max-logit-diff-nan", lambda c: ["export", "--model", c.ckpt, "--format", "gguf", "--gguf-type",
                                                 "F32", "--out", c.p("x.gguf"), "--max-logit-diff", "nan"],
         ("--max-logit-diff",)),
    Case("export-onnx-kv-graph-exists", lambda c: ["export", "--model", c.ckpt, "--format", "onnx",
                                                   "--out", c.p("m.onnx")],
         ("m.kv.onnx", "already exists", "--force"), setup=lambda c: c.write("m.kv.onnx", b"the user's own file")),
    Case("export-unknown-gguf-type", lambda c: ["export", "--model", c.ckpt, "--format", "gguf", "--gguf-type",
                                                "Q4_0; rm -rf /", "--out", c.p("x.gguf")],
         ("unknown --gguf-type",)),
    # ---------------------------------------------------------------- round three
    Case("distill-train-state-links-into-teacher", lambda c: ["distill", "--teacher", c.p("t"), "--out", c.p("stu"),
                                                              "--data", c.dcorpus, *DISTILL_SAVE],
         ("training state", "is the input", "refused even with --force"), setup=_state_into_teacher),
    Case("distill-train-state-is-a-file", lambda c: ["distill", "--teacher", c.ckpt, "--out", c.p("stu"),
                                                     "--data", c.dcorpus, *DISTILL_SAVE],
         ("training state", "stu.train-state is a file", "pass a directory path"),
         setup=lambda c: c.write("stu.train-state", "the user's own file")),
    Case("evaluate-dataset-symlink-loop", lambda c: [*EVAL, c.p("a.txt"), "--model", c.ckpt],
         ("a.txt", "cannot be read", "symbolic links"), setup=_symlink_loop),
    Case("evaluate-gguf-context-2-31", lambda c: [*EVAL, c.corpus, "--max-tokens", "200", "--model", c.p("c.gguf")],
         ("declares a context of 2147483647 tokens", "beyond any model itera supports"),
         setup=lambda c: _gguf_context(c, 2**31 - 1)),
    Case("evaluate-gguf-context-2-32-minus-1", lambda c: [*EVAL, c.corpus, "--model", c.p("c.gguf")],
         ("declares a context of",), setup=lambda c: _gguf_context(c, 2**32 - 1)),
    Case("rollback-target-became-fifo", R("rollback", "fifo", "--to", "1"),
         ("rollback refused", "no longer", "aliases unchanged"), code=3, gate=True,
         setup=lambda c: _register_then(c, "fifo", _gguf_copy, _to_fifo), timeout=60),
    Case("rollback-target-file-became-link-to-etc", R("rollback", "etc", "--to", "1"),
         ("rollback refused", "is no longer a file", "aliases unchanged"), code=3, gate=True,
         setup=lambda c: _register_then(c, "etc", _gguf_copy, _to_etc)),
    Case("rollback-target-dir-became-link-to-etc", R("rollback", "etcdir", "--to", "1"),
         ("rollback refused", "no longer one itera can read", "aliases unchanged"), code=3, gate=True,
         setup=lambda c: _register_then(c, "etcdir", lambda c: c.copy_ckpt(), _to_etc)),
    Case("rollback-to-huge-version", R("rollback", "good", "--to", "99999999999999999999"),
         ("--to 99999999999999999999 is not a version number",)),
    Case("discover-cluster-10000-character-label", lambda c: ["discover-cluster", "a" * 10000],
         ("refusing host spec", "(10000 characters)", "63 between dots")),
    Case("export-f16-overflow", lambda c: ["export", "--model", c.p("m"), "--format", "gguf", "--gguf-type", "F16",
                                           "--out", c.p("x.gguf")],
         ("model.layers.0.mlp.up_proj.weight", "beyond what F16 can hold", "--gguf-type F32 or BF16"),
         forbid=(".tmp-", "finite"), setup=_huge_weight),
    Case("registry-register-into-feedback-store", lambda c: ["registry", "register", "--registry", c.p("fb.db"),
                                                             "--name", "x", "--path", c.fx.gguf],
         ("fb.db is an itera feedback store, not an itera registry", "--feedback-db"), setup=_feedback_store),
    Case("registry-list-of-feedback-store", lambda c: ["registry", "list", "--registry", c.p("fb.db")],
         ("is an itera feedback store, not an itera registry",), setup=_feedback_store),
    Case("dpo-feedback-db-is-registry", lambda c: ["dpo-train", "--model", c.ckpt, "--feedback-db", c.reg,
                                                   "--out", c.p("a")],
         ("is an itera registry, not an itera feedback store", "--registry")),
    Case("serve-feedback-db-is-registry", lambda c: ["serve", "--model", c.fx.gguf, "--feedback-db", c.reg,
                                                     "--port", "0"],
         ("is an itera registry, not an itera feedback store",)),
    Case("serve-chat-template-not-utf8", lambda c: ["serve", "--model", c.fx.gguf, "--chat-template", c.p("t.jinja"),
                                                    "--port", "0"],
         ("t.jinja is not UTF-8 text", "save the template as UTF-8"), setup=_bad_template),
    Case("quantize-out-existing-empty-dir", lambda c: [*QRTN, "--model", c.ckpt, "--out", c.p("out")],
         ("already exists (empty)", "--force"), setup=lambda c: c.p("out").mkdir()),
    Case("registry-tag-value-with-newline", R("register", "--name", "x", "--path", "@GGUF", "--tag", "note=a\nb"),
         ("invalid tag value for 'note'", "no control characters")),
    Case("evaluate-metrics-out-dev-full", lambda c: [*EVAL, c.corpus, "--model", c.ckpt, "--metrics-out", "/dev/full"],
         ("--metrics-out /dev/full cannot be written", "No space left on device")),
    Case("export-out-is-directory", lambda c: ["export", "--model", c.ckpt, "--format", "onnx", "--out", c.p("d")],
         ("--out", "is a directory"), setup=lambda c: _user_dir(c, "d")),
]

CASE_IDS = [c.id for c in CASES]
assert len(CASE_IDS) == len(set(CASE_IDS)), "case ids must be unique"


def _resolve_tokens(c: Ctx, argv: Sequence) -> list[str]:
    """Placeholders the registry table uses for paths made by a case's setup."""
    subst = {"@FIFO": c.p("pipe.gguf"), "@LOOP": c.p("loop-a"), "@CKPT": c.p("m"), "@TMP": c.p("stuff"), "@FAKE": c.p("fake.gguf"), "@GGUF": c.fx.gguf,
             "@REC": c.fx.record_file}
    return [str(subst.get(a, a)) if isinstance(a, str) else str(a) for a in argv]


def test_every_command_has_cases():
    assert len(CASES) >= 60
    x = Path("/x")
    ctx = Ctx(x, Fixtures(x, x, x, x, x, x, x, {}, x, x))
    argvs = [" ".join(map(str, c.argv(ctx))) for c in CASES]
    for cmd in ("distill", "quantize", "export", "evaluate", "benchmark-power", "dpo-train", "discover-cluster",
                "report", "registry register", "registry activate", "registry promote", "registry rollback",
                "registry show", "registry resolve", "registry list"):
        assert any(a.startswith(cmd) for a in argvs), cmd


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_hostile(case: Case, fx: Fixtures, tmp_path: Path, tmp_path_factory):
    work = tmp_path / "case"
    work.mkdir()
    c = Ctx(work, fx)
    shutil.copyfile(fx.registry, c.reg)
    c.home.mkdir()
    if case.setup is not None:
        case.setup(c)
    argv = _resolve_tokens(c, case.argv(c))
    stdin = case.stdin(c) if callable(case.stdin) else case.stdin
    env = {"ITERA_HOME": str(c.home)}
    if case.registry_env:
        env["ITERA_REGISTRY"] = str(c.reg)
    else:  # the case's own (hostile) registry
        env["ITERA_REGISTRY"] = str(c.p("new.db"))

    roots = [work, *fx.roots()]
    before = {r: snapshot(r) for r in roots}
    home_before = snapshot(c.home)
    reg_hash = sha256_of(c.reg)
    scratch = tmp_path_factory.mktemp("regcopy")
    tables_before = registry_tables(c.reg, scratch) if case.gate else None
    repo_temps = _temp_names(REPO)
    pwned_before = _stat_or_none(PWNED)

    try:
        res = run_itera(*argv, stdin=stdin, env=env, timeout=case.timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"itera hung: no exit within {case.timeout:g} s (killed); argv={argv!r}")

    shown = f"argv={argv!r}\nexit={res.returncode}\nstdout={res.stdout[:2000]!r}\nstderr={res.stderr[-4000:]!r}"
    print(shown)  # shown by pytest -rP; on failure it is in the assertion too
    # 1. exit code
    assert res.returncode == case.code, shown
    # 2. one line on stderr naming the problem
    assert "Traceback" not in res.stderr, shown
    lines = res.stderr.splitlines()
    assert len(lines) == 1, shown
    line = lines[0]
    assert line.startswith("itera: error: "), shown
    assert "unexpected" not in line.lower(), shown
    for needle in case.needles:
        options = needle if isinstance(needle, tuple) else (needle,)
        assert any(n in line for n in options), (f"expected {needle!r} in the message", shown)
    for bad in case.forbid:
        assert bad not in line, (f"{bad!r} must not be in the message", shown)
    # 3. nothing on stdout
    assert res.stdout == "", shown
    # 4. and 6. nothing new on disk, inputs unchanged (the registry is checked below)
    for r in roots:
        after = snapshot(r)
        if case.gate and r == work:
            before[r].pop("registry.db", None)
            after.pop("registry.db", None)
        assert diff_snapshots(before[r], after) == [], (str(r), shown)
    # ITERA_HOME: a cache may appear under cache/ (complete files only); nothing else, and no registry
    home_diff = [d for d in diff_snapshots(home_before, snapshot(c.home))
                 if not (d.startswith("new: cache") and ".tmp-" not in d and ".old-" not in d)]
    assert home_diff == [], ("ITERA_HOME", shown)
    assert _temp_names(REPO) <= repo_temps, (sorted(_temp_names(REPO) - repo_temps), shown)
    assert _stat_or_none(PWNED) == pwned_before, (f"{PWNED} was created or touched: a pickle ran code", shown)
    # 5. the registry
    if case.gate:
        after_tables = registry_tables(c.reg, scratch)
        for t in ("versions", "tags", "aliases"):
            assert after_tables[t] == tables_before[t], (t, shown)
        new_events = after_tables["events"][len(tables_before["events"]):]
        assert after_tables["events"][:len(tables_before["events"])] == tables_before["events"], shown
        assert len(new_events) == 1, (new_events, shown)
        assert new_events[0][3].endswith("-refused") and new_events[0][4] == 0, (new_events, shown)
    else:
        assert sha256_of(c.reg) == reg_hash, ("the registry changed", shown)


# --------------------------------------------------------------------------- round three, outside the table


@pytest.mark.parametrize("out", [".", "..", "../.."])
def test_an_output_that_is_the_working_directory_or_above_is_refused(out, tiny_ckpt, tmp_path):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    (cwd / "keep.txt").write_text("the user's")
    before = snapshot(tmp_path)
    for force in ((), ("--force",)):
        res = run_itera(*QRTN, "--model", tiny_ckpt, "--out", out, *force, cwd=cwd)
        assert res.returncode == 2 and res.stdout == "" and len(res.stderr.splitlines()) == 1, res.stderr
        assert f"--out {out} is the working directory or one of its parents" in res.stderr, res.stderr
    assert diff_snapshots(before, snapshot(tmp_path)) == []


@pytest.mark.parametrize("home", ["file", "/proc/itera-home"])
def test_an_unusable_itera_home_is_one_line(home, tmp_path, fx):
    if home == "file":
        home = tmp_path / "home-is-a-file"
        home.write_text("x")
    env = {"ITERA_HOME": str(home)}  # no ITERA_REGISTRY: the registry is $ITERA_HOME/registry.db
    res = run_itera("registry", "register", "--name", "x", "--path", fx.gguf, env=env)
    assert res.returncode == 2 and res.stdout == "", res.stderr
    [line] = res.stderr.splitlines()
    assert line.startswith(f"itera: error: ITERA_HOME {home} cannot hold itera's files (") and \
        line.endswith("set ITERA_HOME to a writable directory"), line


def test_report_markdown_keeps_hostile_names_inside_their_cells(fx, tmp_path):
    data = tmp_path / "notes\n# Injected heading | a | b |.txt"
    shutil.copyfile(fx.corpus, data)
    f = tmp_path / "r.json"
    run_itera("evaluate", "--model", fx.gguf, "-d", data, "--max-tokens", "64", "--metrics-out", f).record
    run_itera("report", f, "--out", tmp_path / "rep").record
    md = (tmp_path / "rep" / "report.md").read_text()
    lines = md.splitlines()
    assert not any(ln.startswith("# Injected") for ln in lines), md
    assert "Injected heading" in md
    table = [ln for ln in lines if ln.startswith("|")]
    cells = {len(re.split(r"(?<!\\)\|", ln)) for ln in table}  # unescaped pipes: every row as wide as the header
    assert len(table) >= 3 and len(cells) == 1, md


def test_serve_says_when_the_registry_it_follows_disappears(tmp_path):
    from types import SimpleNamespace

    from itera.registry import Ref, Registry
    from itera.jobs.serve.engine import RegistryRef, Watcher

    reg = tmp_path / "r.db"
    with Registry(reg) as r:
        r._migrate()
    logged = []
    current = SimpleNamespace(source=SimpleNamespace(label="x@1", version=1, sha256="0" * 64))
    w = Watcher(RegistryRef(reg, Ref.parse("x@active")), SimpleNamespace(current=current), None, 1.0, logged.append)
    w.poll()  # no model x yet: said once
    w.poll()
    assert len(logged) == 1 and "cannot read x@active" in logged[0], logged
    reg.unlink()
    w.poll()
    assert len(logged) == 2 and "No such file or directory" in logged[1] and "still serving x@1" in logged[1], logged
    assert not reg.exists()  # not created again by the watcher
