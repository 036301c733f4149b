"""itera report: tables equal the records' numbers, charts are real PNGs, and the README and
docs' example commands exist in the CLI as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO, file_key, make_record, run_itera
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
    from itera.cli import COMMANDS, GROUPS, SUBCOMMANDS

    cmds = _readme_commands()
    assert len(cmds) > 20
    helps: dict[str, str] = {}
    for line in cmds:
        words = shlex.split(line.replace("[", " ").replace("]", " ").replace('"$(', '"').replace(')"', '"'))
        words = words[1:]
        name = words[0]
        assert name in COMMANDS or name in GROUPS, line
        sub = len(words) > 1 and f"{name} {words[1]}" in SUBCOMMANDS  # `itera distill cache`
        cmd = [name] + ([words[1]] if name in GROUPS or sub else [])
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
    # one line on stderr, which names the file once, by its name
    assert res.stderr == (f"wrote {tmp_path / 'rep' / 'report.md'}: 2 artifacts from 2 records; left out 1 file "
                          "without a record: compare.json (registry compare output)\n")
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = {r["artifact"]: r for r in _md_table(md)}
    assert set(rows) == {"a/model.gguf", "m@2 (b/model.gguf)"}
    head = list(next(iter(rows.values())))
    ppl_cols = [h for h in head if h.startswith("ppl ")]
    assert ppl_cols == ["ppl notes.txt (protocol 1)", "ppl notes.txt (protocol 2)"]  # the protocol in a note
    assert "- ppl/bpb notes.txt (protocol 1): window 64, stride 32, BOS off; 500 tokens scored." in md
    assert "- ppl/bpb notes.txt (protocol 2): window 128, stride 64, BOS off; 500 tokens scored." in md
    assert rows["a/model.gguf"]["ppl notes.txt (protocol 1)"] == "10.000"
    assert rows["m@2 (b/model.gguf)"]["ppl notes.txt (protocol 2)"] == "11.000"
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
    # from the directory the benchmark ran in, and from another: the relative path names one file
    for out, cwd in (("rep", tmp_path), ("elsewhere", None)):
        run_itera("report", *files, "--out", tmp_path / out, cwd=cwd)
        rows = {r["artifact"]: r for r in _md_table((tmp_path / out / "report.md").read_text())}
        assert set(rows) == {"teacher.gguf", "student.gguf"}
        assert rows["student.gguf"]["decode tok/s"] == "9347.5" and rows["student.gguf"]["made by"] == "export gguf Q4_0"
        assert rows["teacher.gguf"]["decode tok/s"] == "3579.1"


def test_dataset_headers_from_content_keys_and_older_path_keys(tmp_path):
    """A file recorded by name and content heads its column by its name alone; two contents of one
    name keep their keys; an older record's absolute path still shows as the file's name."""
    recs = []
    for d, ds in (("a", "/old/checkout/notes.txt"), ("b", "notes.txt#11111111"), ("c", "notes.txt#22222222"),
                  ("e", "other.txt#33333333")):
        ex = _rec("export", f"runs/{d}/model.gguf", "gguf", d, {}, {"format": "gguf", "gguf_type": "Q4_0"})
        recs.append(_rec("evaluate", f"runs/{d}/model.gguf", "gguf", d, {"datasets": {ds: {
            "perplexity": 10.0, "bits_per_byte": 1.0, "tokens": 500, "bytes": 2000, "tokens_per_s": 1.0}}},
            {"window": 64, "stride": 32, "bos": False, "runtime": "llama.cpp"}, ex))
    files = []
    for i, r in enumerate(recs):
        (tmp_path / f"{i}.json").write_text(dumps(r) + "\n")
        files.append(tmp_path / f"{i}.json")
    run_itera("report", *files, "--out", tmp_path / "rep").record
    head = list(_md_table((tmp_path / "rep" / "report.md").read_text())[0])
    assert [h for h in head if h.startswith("ppl ")] == [
        "ppl notes.txt", "ppl notes.txt#11111111", "ppl notes.txt#22222222", "ppl other.txt"]


# ------------------------------------------------------------------ readability (issue 28, item 10)


def _demo_like(tmp_path, data_file):
    """The demo's lineages with its figures: teacher float -> F16 GGUF, student float -> GPTQ ->
    Q4_0 GGUF, every one scored on one text file with one protocol (the GGUFs' tokenizer cutting
    it into fewer tokens), the two GGUFs benchmarked in one run on a busy machine and registered.
    Plus a DPO checkpoint nobody scored. Returns the record files and the records by name."""
    key = file_key(data_file)  # evaluate records a file by its name and content: notes.txt#<sha256[:8]>
    proto = {"window": 128, "stride": 64, "bos": True, "runtime": "torch", "datasets_typed": {key: "data/notes.txt"},
             "datasets_paths": {key: str(data_file)}}

    def ev(parent, ppl, tokens):
        a = parent["artifact"]
        return make_record("evaluate", a, {"datasets": {key: {"perplexity": ppl, "bits_per_byte": ppl / 50,
                                                             "tokens": tokens, "bytes": 72243, "tokens_per_s": 1.0}}},
                           proto, parent)

    def art(path, fmt, sha, size, kind="file"):
        return {"path": str(tmp_path / path), "kind": kind, "format": fmt, "bytes": size, "sha256": sha * 64}

    r = {}
    r["teacher"] = make_record("distill", art("teacher", "safetensors", "a", 7_970_000, "checkpoint"), {}, {})
    r["teacher-eval"] = ev(r["teacher"], 107.38, 20000)
    r["teacher-f16"] = make_record("export", art("teacher-f16.gguf", "gguf", "b", 3_990_000), {
        "max_abs_logit_diff": 0.0025, "top1_agreement": 1.0, "bits_per_weight": 16.0},
        {"format": "gguf", "gguf_type": "F16"}, r["teacher-eval"])
    r["teacher-f16-eval"] = ev(r["teacher-f16"], 107.38, 19874)
    r["student"] = make_record("distill", art("student", "safetensors", "c", 1_680_000, "checkpoint"), {}, {})
    r["student-eval"] = ev(r["student"], 123.34, 20000)
    r["student-q4"] = make_record("quantize", art("student-q4", "itera-quant", "d", 635_000, "checkpoint"),
                                  {"bits_per_weight": 4.5}, {"method": "gptq"}, r["student-eval"])
    r["student-q4-eval"] = ev(r["student-q4"], 123.44, 20000)
    r["student-q4.gguf"] = make_record("export", art("student-q4.gguf", "gguf", "e", 567_000), {
        "max_abs_logit_diff": 0.04, "top1_agreement": 0.99, "bits_per_weight": 4.51},
        {"format": "gguf", "gguf_type": "Q4_0"}, r["student-q4-eval"])
    r["student-q4-gguf-eval"] = ev(r["student-q4.gguf"], 123.46, 19874)

    def bench(rate, wall, reason):
        return make_record("benchmark-power", art("x", "gguf", "f", 1), {
            "decode_tokens_per_s": rate, "decode_tokens_per_s_iqr": rate / 10, "decode_tokens_per_s_wall": wall,
            "decode_tokens_per_s_wall_iqr": wall / 5, "runtime": "llama.cpp", "stable": False,
            "stability_reason": reason, "j_per_token": None, "energy_method": "unavailable",
            "energy_reason": "no meter requested (--meter none)"}, {})["metrics"]

    t = bench(2029.0, 10.4, "decode steps were delayed: tokens over wall time (10.4/s) are 195.1x below the rate "
              "of a median step (2029.0/s)")
    s = bench(9347.5, 2.7, "load average 3.10 at the start is at or above the 2 usable cores")
    ta, sa = r["teacher-f16"]["artifact"], r["student-q4.gguf"]["artifact"]
    tp, sp = ta["path"], sa["path"]
    # each compared artifact keyed by its name and sha256, with its path and sha256 inside
    compared = {f"{Path(a['path']).name}#{a['sha256'][:8]}": {**m, "path": a["path"], "sha256": a["sha256"]}
                for a, m in ((ta, t), (sa, s))}
    r["compare-power"] = make_record("benchmark-power", r["teacher-f16"]["artifact"], {
        **t, "stable": False, "stability_reason": f"{tp}: ... | {sp}: ...", "compare": compared}, {},
        r["teacher-f16-eval"])
    r["teacher-register"] = make_record("registry register", r["teacher-f16"]["artifact"], {},
                                        {"name": "pydocs-demo", "version": 1}, r["compare-power"])
    r["student-register"] = make_record("registry register", r["student-q4.gguf"]["artifact"], {},
                                        {"name": "pydocs-demo", "version": 2}, r["student-q4-gguf-eval"])
    r["dpo"] = make_record("dpo-train", art("dpo/merged", "safetensors", "9", 1_700_000, "checkpoint"), {}, {},
                           r["student"])
    d = tmp_path / "records"
    d.mkdir()
    names = ["teacher-register", "student-register", "teacher-eval", "student-eval", "student-q4-eval", "dpo"]
    for name in names:
        (d / f"{name}.json").write_text(dumps(r[name]) + "\n")
    return [d / f"{n}.json" for n in names], r


@pytest.fixture
def data_file(tmp_path):
    f = tmp_path / "data" / "notes.txt"
    f.parent.mkdir()
    f.write_text("some text\n")
    return f


def test_dataset_columns_are_short_and_one_per_dataset(tmp_path, data_file):
    """The file's name heads its columns (its path and the protocol go in a note); the GGUFs scored
    fewer tokens of the same text with the same protocol: the same column, the cell marked and
    the note giving each count."""
    files, r = _demo_like(tmp_path, data_file)
    run_itera("report", *files, "--out", tmp_path / "rep").record
    md = (tmp_path / "rep" / "report.md").read_text()
    table = _md_table(md)
    head = list(table[0])
    assert [h for h in head if h.startswith(("ppl", "bpb"))] == ["ppl notes.txt", "bpb notes.txt"]
    assert not any("/" in h or "window" in h for h in head if h.startswith(("ppl", "bpb"))), head
    rows = {row["artifact"]: row for row in table}
    assert rows["teacher"]["ppl notes.txt"] == "107.380" and rows["student-q4"]["ppl notes.txt"] == "123.440"
    assert rows["pydocs-demo@1 (teacher-f16.gguf)"]["ppl notes.txt"] == "107.380 †"
    assert rows["pydocs-demo@2 (student-q4.gguf)"]["bpb notes.txt"] == f"{123.46 / 50:.4f} †"
    note = next(line for line in md.splitlines() if line.startswith("- ppl/bpb notes.txt"))
    assert note == (f"- ppl/bpb notes.txt: {file_key(data_file)}, window 128, stride 64, BOS on; 20,000 tokens scored († "
                    "pydocs-demo@1 (teacher-f16.gguf): 19,874, † pydocs-demo@2 (student-q4.gguf): 19,874; another "
                    "tokenizer cuts the same text differently, so compare bits per byte).")


def test_demo_outputs_that_are_not_records_are_left_out_in_one_line(tmp_path, data_file):
    """`report runs/demo/*.json` after the demo: a refused promote's empty file, `registry compare`'s
    and `history`'s JSON and the first report's own record sit beside the records. One line on
    stderr, no `skipped`; the report's record adds no row."""
    files, _ = _demo_like(tmp_path, data_file)
    d = files[0].parent
    first = run_itera("report", *files, "--out", tmp_path / "rep", "--metrics-out", d / "report.json")
    assert first.stderr == f"wrote {tmp_path / 'rep' / 'report.md'}: 6 artifacts from 6 records\n"
    (d / "promote.json").write_text("")
    (d / "compare.json").write_text('{"versions": ["pydocs-demo@1", "pydocs-demo@2"], "metrics": {}}\n')
    (d / "history.json").write_text('{"name": "pydocs-demo", "events": []}\n')
    res = run_itera("report", *sorted(d.glob("*.json")), "--out", tmp_path / "all", "--format", "html")
    assert res.returncode == 0 and "skipped" not in res.stderr
    assert res.stderr == (f"wrote {tmp_path / 'all' / 'report.html'}: 6 artifacts from 7 records; left out 3 files "
                          "without a record: compare.json (registry compare output), history.json (registry history "
                          "output), promote.json (empty)\n")
    assert res.record["metrics"]["artifacts"] == 6 and len(res.record["params"]["skipped"]) == 3


def test_one_of_each_is_singular(tmp_path, data_file):
    _, r = _demo_like(tmp_path, data_file)
    f = tmp_path / "one.json"
    f.write_text(dumps(r["teacher-eval"]) + "\n")
    res = run_itera("report", f, "--out", tmp_path / "rep")
    assert res.stderr == f"wrote {tmp_path / 'rep' / 'report.md'}: 1 artifact from 1 record\n"
    assert "\n1 artifact from 1 record.\n" in (tmp_path / "rep" / "report.md").read_text()


def _boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_frontier_is_in_mib_labels_apart_and_says_what_it_leaves_out(tmp_path, data_file):
    """Every artifact with a perplexity on the column's dataset is a point at its size in MiB; the
    others are named in a note on the chart and under it in report.md; labels overlap neither
    each other nor a point and stay inside the axes; the y label is inside the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from itera.jobs.report import collect, frontier

    files, r = _demo_like(tmp_path, data_file)
    rows = collect([read(f) for f in files])
    chart = frontier(rows)
    ax = chart.fig.axes[0]
    pts = ax.collections[0].get_offsets()
    scored = {"teacher": 7_970_000, "teacher-f16.gguf": 3_990_000, "student": 1_680_000, "student-q4": 635_000,
              "student-q4.gguf": 567_000}
    assert len(pts) == 5 and sorted(x for x, _ in pts) == pytest.approx(sorted(b / 2**20 for b in scored.values()))
    assert ax.get_xlabel() == "artifact size (MiB, log scale)" and ax.get_ylabel() == "perplexity on notes.txt"
    assert ax.get_title() == "Size–quality frontier (5 artifacts)"
    assert chart.note == "5 of 6 artifacts plotted; not plotted: no perplexity on notes.txt (merged)."
    assert any(t.get_text().replace("\n", " ") == chart.note for t in chart.fig.texts)
    chart.fig.canvas.draw()
    renderer = chart.fig.canvas.get_renderer()
    fig_box, ax_box = chart.fig.bbox, ax.get_window_extent(renderer)
    y_label = ax.yaxis.label.get_window_extent(renderer)
    assert y_label.x0 >= fig_box.x0 and y_label.y0 >= fig_box.y0 and y_label.y1 <= fig_box.y1
    labels = [t for t in ax.texts]
    assert sorted(t.get_text() for t in labels) == sorted(
        ["teacher", "pydocs-demo@1 (teacher-f16.gguf)", "student", "student-q4", "pydocs-demo@2 (student-q4.gguf)"])
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i, a in enumerate(boxes):
        assert ax_box.x0 <= a.x0 and a.x1 <= ax_box.x1 and ax_box.y0 <= a.y0 and a.y1 <= ax_box.y1, labels[i]
        for b in boxes[i + 1:]:
            assert not _boxes_overlap(a, b)
        for x, y in ax.transData.transform(pts):
            assert not (a.x0 < x < a.x1 and a.y0 < y < a.y1), (labels[i].get_text(), x, y)
    plt.close(chart.fig)
    run_itera("report", *files, "--out", tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"![frontier](frontier.png)\n\n{chart.note}\n" in md
    assert (tmp_path / "rep" / "frontier.png").stat().st_size > 0


def test_throughput_shows_both_rates_with_their_values(tmp_path, data_file):
    """Each benchmarked artifact has two bars, the median step's rate and wall-time tokens/s, each
    with its value written above it (a 2.7 tokens/s bar beside a 9,347.5 one is read, not
    guessed); the table has both rates; the notes say why a run is unstable and claim no ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from itera.jobs.report import collect, throughput

    files, _ = _demo_like(tmp_path, data_file)
    chart = throughput(collect([read(f) for f in files]))
    ax = chart.fig.axes[0]
    from matplotlib.container import BarContainer

    step, wall = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_height() for b in step] == [2029.0, 9347.5] and [b.get_height() for b in wall] == [10.4, 2.7]
    values = [t.get_text() for t in ax.texts]
    assert sorted(values) == sorted(["2,029.0", "9,347.5", "10.4", "2.7"])
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "pydocs-demo@1 (teacher-f16.gguf)\n(llama.cpp, UNSTABLE)", "pydocs-demo@2 (student-q4.gguf)\n(llama.cpp, UNSTABLE)"]
    plt.close(chart.fig)
    run_itera("report", *files, "--out", tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = {row["artifact"]: row for row in _md_table(md)}
    t = rows["pydocs-demo@1 (teacher-f16.gguf)"]
    assert t["decode tok/s"] == "2029.0 ± 101.5" and t["wall tok/s"] == "10.4 ± 1.0" and t["stable"] == "no"
    assert rows["pydocs-demo@2 (student-q4.gguf)"]["wall tok/s"] == "2.7 ± 0.3"
    assert ("- pydocs-demo@1 (teacher-f16.gguf): benchmark not stable, so no speed-up against another artifact is "
            "claimed (decode steps were delayed: tokens over wall time (10.4/s) are 195.1x below the rate of a median "
            "step (2029.0/s)).") in md
    assert not re.search(r"\d\.\d+x (faster|the)", md)


def read(path):
    from itera.record import read_record_file

    return read_record_file(path)


def test_a_real_pipeline_reports_both_rates_under_the_file_name(tiny_ckpt, corpus_file, tmp_path):
    """Real records: a checkpoint and its GGUF scored on a text file and benchmarked side by side.
    The column is the file's name, the table's rates are the benchmark record's, and stderr is the
    one summary line."""
    gguf = tmp_path / "m.gguf"
    run_itera("export", "--model", tiny_ckpt, "--format", "gguf", "--out", gguf).record
    files = []
    for name, model in (("ckpt", tiny_ckpt), ("gguf", gguf)):
        run_itera("evaluate", "--model", model, "-d", corpus_file, "--max-tokens", "200", "--metrics-out",
                  tmp_path / f"{name}-eval.json").record
        files.append(tmp_path / f"{name}-eval.json")
    bench = run_itera("benchmark-power", "--model", tiny_ckpt, "--compare", gguf, "--prompt-tokens", "8",
                      "--gen-tokens", "8", "--runs", "3", "--meter", "none", "--metrics-out",
                      tmp_path / "bench.json").record
    res = run_itera("report", *files, tmp_path / "bench.json", "--out", tmp_path / "rep")
    assert res.stderr == f"wrote {tmp_path / 'rep' / 'report.md'}: 2 artifacts from 3 records\n"
    md = (tmp_path / "rep" / "report.md").read_text()
    table = _md_table(md)
    assert [h for h in table[0] if h.startswith("ppl ")] == [f"ppl {corpus_file.name}"]
    rows = {row["artifact"]: row for row in table}
    for m in bench["metrics"]["compare"].values():
        row = rows[Path(m["path"]).name]
        assert row["decode tok/s"].startswith(f"{m['decode_tokens_per_s']:.1f} ± ")
        assert row["wall tok/s"].startswith(f"{m['decode_tokens_per_s_wall']:.1f} ± ")
        assert row["stable"] == ("yes" if m["stable"] else "no")
        assert (f"- {row['artifact']}: benchmark not stable" in md) is (not m["stable"])
    assert f"ppl/bpb {corpus_file.name}: {file_key(corpus_file)}, window " in md
