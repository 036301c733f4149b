"""itera report: tables equal the records' numbers, charts are real PNGs, and the README and
docs' example commands exist in the CLI as written."""

from __future__ import annotations

import re
import shlex

import pytest

from conftest import REPO, make_record, run_itera
from itera.record import dumps
from itera.jobs.report import size


def _rec(command, path, fmt, sha, metrics, params, parent=None, kind="file"):
    art = {"path": path, "kind": kind, "format": fmt, "bytes": 1000 + len(path) * 37, "sha256": sha * 64}
    return make_record(command, art, metrics, params, parent)


@pytest.fixture
def records(tmp_path):
    """Two fixed lineages: distill -> quantize -> export -> evaluate -> benchmark-power, and a float GGUF."""
    d = _rec("distill", "runs/student", "safetensors", "a", {"student_params": 590304}, {}, kind="checkpoint")
    q = _rec("quantize", "runs/student-q4", "itera-quant", "b", {"bits_per_weight": 4.5}, {"method": "gptq"}, d,
             kind="checkpoint")
    e = _rec("export", "runs/student-q4.gguf", "gguf", "c", {"max_abs_logit_diff": 0.0474, "top1_agreement": 0.992},
             {"format": "gguf", "gguf_type": "Q4_0"}, q)
    ev = _rec("evaluate", "runs/student-q4.gguf", "gguf", "c", {"datasets": {"pydocs@test": {
        "perplexity": 230.734, "bits_per_byte": 2.1731, "tokens": 19999, "bytes": 72243, "tokens_per_s": 7063.0}}}, {}, e)
    bp = _rec("benchmark-power", "runs/student-q4.gguf", "gguf", "c", {"decode_tokens_per_s": 6081.9,
              "runtime": "llama.cpp", "j_per_token": 0.0123, "energy_method": "estimate-tdp"}, {}, ev)
    t = _rec("export", "runs/teacher-f16.gguf", "gguf", "d", {"max_abs_logit_diff": 0.00251, "top1_agreement": 1.0},
             {"format": "gguf", "gguf_type": "F16"})
    tev = _rec("evaluate", "runs/teacher-f16.gguf", "gguf", "d", {"datasets": {"pydocs@test": {
        "perplexity": 240.176, "bits_per_byte": 2.1892, "tokens": 19999, "bytes": 72243, "tokens_per_s": 2345.0}}}, {}, t)
    tbp = _rec("benchmark-power", "runs/teacher-f16.gguf", "gguf", "d", {"decode_tokens_per_s": 2745.5,
               "runtime": "llama.cpp", "j_per_token": 0.0456, "energy_method": "estimate-tdp"}, {}, tev)
    files = []
    for name, r in (("student.json", bp), ("teacher.json", tbp)):
        (tmp_path / name).write_text(dumps(r) + "\n")
        files.append(tmp_path / name)
    return files, (bp, tbp)


def _md_table(text):
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in rows[0].strip("|").split(" | ")]
    return [dict(zip(head, (c.strip() for c in r.strip("|").split(" | ")))) for r in rows[1:]]


def test_report_tables_equal_the_records(records, tmp_path):
    files, (bp, tbp) = records
    rec = run_itera("report", *files, "--out", tmp_path / "rep").record
    rows = {r["artifact"]: r for r in _md_table((tmp_path / "rep" / "report.md").read_text())}
    s = rows["student-q4.gguf"]
    assert s["ppl pydocs@test"] == "230.734" and s["bpb pydocs@test"] == "2.1731"
    assert s["bits/weight"] == "4.500" and s["decode tok/s"] == "6081.9" and s["J/token"] == "0.0123"
    assert s["energy method"] == "estimate-tdp" and s["max abs Δlogit"] == "0.0474" and s["top-1 agree"] == "0.992"
    assert s["size"] == size(bp["artifact"]["bytes"]) and s["made by"] == "export gguf Q4_0"
    t = rows["teacher-f16.gguf"]
    assert t["ppl pydocs@test"] == "240.176" and t["decode tok/s"] == "2745.5" and t["bits/weight"] == "–"
    assert rows["student-q4"]["bits/weight"] == "4.500" and rows["student-q4"]["made by"] == "quantize gptq"
    assert rec["metrics"]["artifacts"] == 4 and set(rec["params"]["charts"]) == {"frontier.png", "throughput.png",
                                                                                "energy.png"}


def test_charts_are_real_non_blank_pngs(records, tmp_path):
    from PIL import Image  # installed with matplotlib

    files, _ = records
    run_itera("report", *files, "--out", tmp_path / "rep").record
    for name in ("frontier.png", "throughput.png", "energy.png"):
        with Image.open(tmp_path / "rep" / name) as im:
            assert im.format == "PNG" and im.size == (700, 450)
            extrema = im.convert("L").getextrema()
            assert extrema[1] - extrema[0] > 100  # ink on the page, not a blank image


def test_html_report_is_self_contained(records, tmp_path):
    files, _ = records
    run_itera("report", *files, "--out", tmp_path / "h", "--format", "html").record
    html = (tmp_path / "h" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "230.734" in html
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["report.html"]


def test_report_reads_records_from_stdin(records, tmp_path):
    files, _ = records
    rec = run_itera("report", "--out", tmp_path / "s", stdin=files[0].read_text()).record
    assert rec["metrics"]["artifacts"] == 3  # distill, quantize, and the exported GGUF


def _readme_commands():
    """The `itera ...` lines in the code blocks of README.md and every docs/**/*.md (each file's
    fences paired on their own, so one file's fence cannot shift the next file's)."""
    paths = [REPO / "README.md"] + sorted((REPO / "docs").glob("**/*.md"))
    blocks = [b for p in paths for b in re.findall(r"```\n(.*?)```", p.read_text(), flags=re.S)]
    cmds = []
    for block in blocks:
        for raw in block.replace("\\\n", " ").splitlines():
            for part in raw.split("|"):
                part = part.split("  #")[0].strip()
                m = re.search(r"(?:^|\s)itera\s+([a-z-]+(?:\s+[a-z-]+)?)(.*)$", part)
                if m and not part.startswith("#"):
                    cmds.append(part[m.start():].strip())
    return cmds


def test_readme_commands_use_real_commands_and_flags():
    """Every `itera ...` line in the README and docs' code blocks names a real command and real
    flags."""
    from itera.cli import COMMANDS, GROUPS

    cmds = _readme_commands()
    assert len(cmds) > 20
    helps: dict[str, str] = {}
    for line in cmds:
        words = shlex.split(line.replace("[", " ").replace("]", " ").replace('"$(', '"').replace(')"', '"'))
        words = words[1:]
        name = words[0]
        assert name in COMMANDS or name in GROUPS, line
        cmd = [name] + ([words[1]] if name in GROUPS else [])
        key = " ".join(cmd)
        if key not in helps:
            res = run_itera(*cmd, "--help", env={"COLUMNS": "200"})
            assert res.returncode == 0, (line, res.stderr)
            helps[key] = res.stdout
        for word in words:  # top-level flags only: a quoted --launch "..." belongs to another command
            if word.startswith("--") and len(word) > 2:
                flag = word.split("=")[0].split("/")[0]
                assert flag in helps[key], (line, flag)


def test_labels_protocols_and_non_records(tmp_path):
    """Two model.gguf files in different directories get different labels, a registered one its
    ref; perplexities measured with different protocols get separate, labelled columns; a JSON
    file that is not a record is skipped with a note, not an error."""
    recs = []
    for d, window, ppl in (("a", 64, 10.0), ("b", 128, 11.0)):
        ex = _rec("export", f"runs/{d}/model.gguf", "gguf", d, {"max_abs_logit_diff": 0.01, "top1_agreement": 1.0,
                                                              "bits_per_weight": 4.5}, {"format": "gguf", "gguf_type": "Q4_0"})
        ev = _rec("evaluate", f"runs/{d}/model.gguf", "gguf", d, {"datasets": {"notes.txt": {
            "perplexity": ppl, "bits_per_byte": 1.0, "tokens": 500, "bytes": 2000, "tokens_per_s": 1.0}}},
            {"window": window, "stride": window // 2, "bos": False, "runtime": "llama.cpp"}, ex)
        recs.append(ev)
    reg = make_record("registry register", recs[1]["artifact"], {}, {"name": "m", "version": 2}, recs[1])
    files = [tmp_path / "a.json", tmp_path / "b.json", tmp_path / "compare.json"]
    files[0].write_text(dumps(recs[0]))
    files[1].write_text(dumps(reg))
    files[2].write_text('{"versions": ["m@1", "m@2"], "metrics": {}}')
    res = run_itera("report", *files, "--out", tmp_path / "rep")
    rec = res.record
    why = f'{files[2]} is JSON but not an itera record (no "itera": 1)'
    assert rec["params"]["skipped"] == [why]
    assert f"skipped: {why}\n" in res.stderr  # the file named once
    rows = {r["artifact"]: r for r in _md_table((tmp_path / "rep" / "report.md").read_text())}
    assert set(rows) == {"a/model.gguf", "m@2 (b/model.gguf)"}
    head = list(next(iter(rows.values())))
    ppl_cols = [h for h in head if h.startswith("ppl ")]
    assert len(ppl_cols) == 2 and all("window" in h and "500 tokens" in h for h in ppl_cols)
    assert rows["a/model.gguf"]["bits/weight"] == "4.500"


def test_compared_figures_go_to_an_artifact_described_in_a_later_record(tmp_path):
    """`benchmark-power --compare` names the second file by the path it was given (relative); the
    record that describes that file comes later, with an absolute path. One row, with the speed."""
    t = _rec("export", str(tmp_path / "runs/teacher.gguf"), "gguf", "d", {}, {"format": "gguf", "gguf_type": "F16"})
    def result(tokens_per_s):  # one artifact's figures, every key the schema requires
        return _rec("benchmark-power", "x", "gguf", "f", {"decode_tokens_per_s": tokens_per_s,
                                                         "runtime": "llama.cpp"}, {})["metrics"]

    bp = _rec("benchmark-power", t["artifact"]["path"], "gguf", "d", {**result(3579.1), "compare": {
        t["artifact"]["path"]: result(3579.1), "runs/student.gguf": result(9347.5)}}, {}, t)
    s = _rec("export", str(tmp_path / "runs/student.gguf"), "gguf", "e", {}, {"format": "gguf", "gguf_type": "Q4_0"})
    files = []
    for name, r in (("bench.json", bp), ("student.json", s)):
        (tmp_path / name).write_text(dumps(r) + "\n")
        files.append(tmp_path / name)
    run_itera("report", *files, "--out", tmp_path / "rep", cwd=tmp_path)  # the relative path is from here
    rows = {r["artifact"]: r for r in _md_table((tmp_path / "rep" / "report.md").read_text())}
    assert set(rows) == {"teacher.gguf", "student.gguf"}
    assert rows["student.gguf"]["decode tok/s"] == "9347.5" and rows["student.gguf"]["made by"] == "export gguf Q4_0"
    assert rows["teacher.gguf"]["decode tok/s"] == "3579.1"
