"""itera distill: the loss, student construction, quality against a CE-only baseline,
exact resume after SIGKILL, torchrun with 2 processes, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import REPO, SMALL, assert_usage_error, run_itera
from itera.losses import DistillLoss
from itera.prune import evenly_spaced, init_from_pruning
from itera.student import StudentSpec
from itera.model.checkpoint import load_model
from itera.model.config import ModelConfig
from itera.model.llama import LlamaForCausalLM



def _distill(teacher, corpus, out, *args):
    return run_itera("distill", "--teacher", teacher, "--data", corpus, "--out", out, *SMALL, *args).record


# ------------------------------------------------------------------------------- quality

# Measured (quarter student, 60 steps, deterministic on one CPU, not across CPUs: the teacher is
# trained here too): perplexity 3.198 with the teacher against 3.241 without on seed 0, 3.205
# against 3.260 on seed 1 (1.3% and 1.7% lower; an Intel Xeon); 3.211 against 3.243 and 3.206
# against 3.252 (0.99% and 1.4% lower; a 2-core AMD EPYC). KL to the teacher 0.0019 against 0.0145
# and 0.0023 against 0.0163 (Intel), 0.0057 against 0.0139 and 0.0024 against 0.0149 (AMD).
PPL_MARGIN = 0.005


def test_distilled_student_beats_cross_entropy_only_student(teacher, distill_corpus, tmp_path):
    """On the same tokens (same seed, same batches), the student trained with the teacher's soft
    targets ends at least PPL_MARGIN lower in perplexity, and at half the KL to the teacher, than
    the one trained on the labels alone, on each of two seeds (one win could be luck)."""
    common = ["--student", "quarter", "--init", "prune", "--steps", "60"]
    for seed in ("0", "1"):
        kd = _distill(teacher, distill_corpus, tmp_path / f"kd{seed}", "--alpha", "0.7", "--seed", seed,
                      "--eval-every", "20", *common)["metrics"]
        ce = _distill(teacher, distill_corpus, tmp_path / f"ce{seed}", "--alpha", "0", "--seed", seed, *common)["metrics"]
        assert kd["tokens_seen"] == ce["tokens_seen"]
        # held-out perplexity along the way, timed apart from training; none asked of the CE run
        assert [h["step"] for h in kd["eval_history"]] == [0, 20, 40, 60] and kd["eval_seconds"] > 0
        assert [h["step"] for h in ce["eval_history"]] == [0, 60] and ce["eval_seconds"] == 0
        assert kd["student_perplexity"] < ce["student_perplexity"] * (1 - PPL_MARGIN), \
            (seed, kd["student_perplexity"], ce["student_perplexity"])
        assert kd["kl_to_teacher"] < ce["kl_to_teacher"] / 2, (seed, kd["kl_to_teacher"], ce["kl_to_teacher"])
    assert kd["compression_ratio"] > 2 and kd["compression_ratio_bytes"] > 2
    assert kd["teacher_perplexity"] > 1 and 0 <= kd["top1_agreement"] <= 1


def test_layer_and_prune_init_start_better_than_random(teacher, distill_corpus, tmp_path):
    step0 = {}
    for preset, init in (("half", "layers"), ("half", "random"), ("quarter", "prune"), ("quarter", "random")):
        rec = _distill(teacher, distill_corpus, tmp_path / f"{preset}-{init}", "--student", preset, "--init", init,
                       "--steps", "1")
        step0[preset, init] = rec["metrics"]["init_student_perplexity"]
    assert step0["half", "layers"] < step0["half", "random"]
    assert step0["quarter", "prune"] < step0["quarter", "random"]


def test_written_student_loads_in_transformers_with_same_logits(teacher, distill_corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    _distill(teacher, distill_corpus, tmp_path / "s", "--student", "quarter", "--steps", "2")
    ours, cfg = load_model(tmp_path / "s")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max() < 1e-4
    assert json.loads((tmp_path / "s" / "distill_config.json").read_text())["init"] == "prune"


# ------------------------------------------------------------------------------- resume and scale-out


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_killed_run_resumes_to_the_same_weights(teacher, distill_corpus, tmp_path):
    # Long enough after the first checkpoint (step 4) that the kill always lands mid-run.
    args = ["--student", "half", "--steps", "40", "--save-every", "4", "--alpha", "0.5"]
    _distill(teacher, distill_corpus, tmp_path / "whole", *args)
    out = tmp_path / "killed"
    state = tmp_path / "killed.train-state" / "state.pt"
    p = subprocess.Popen([sys.executable, "-m", "itera", "distill", "--teacher", str(teacher), "--data",
                          str(distill_corpus), "--out", str(out), *SMALL, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert state.exists(), "no checkpoint was written before the run ended"
    saved_step = torch.load(state, weights_only=True)["step"]
    assert 4 <= saved_step < 40 and not out.exists()  # killed mid-run: no partial student
    rec = _distill(teacher, distill_corpus, out, *args, "--resume")
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rec["metrics"]["tokens_seen"] == 40 * 8 * 48
    # the state stays, at the last step, so that --resume --steps N can extend the run; not past it
    assert torch.load(state, weights_only=True)["step"] == 40
    before = _weights(out)
    assert_usage_error(run_itera("distill", "--teacher", teacher, "--data", distill_corpus, "--out", out, *SMALL,
                                 *args, "--resume", "--force"),
                       "already reached step 40; pass --steps above 40 to extend it")
    after = _weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the refused run left the student alone


def test_resume_refuses_a_checkpoint_from_other_options(teacher, distill_corpus, tmp_path):
    args = ["--student", "half", "--steps", "6", "--save-every", "2"]
    out = tmp_path / "s"
    state_dir = tmp_path / "s.train-state"
    p = subprocess.Popen([sys.executable, "-m", "itera", "distill", "--teacher", str(teacher), "--data",
                          str(distill_corpus), "--out", str(out), *SMALL, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    while not (state_dir / "state.pt").exists() and p.poll() is None:
        time.sleep(0.02)
    p.kill()
    p.communicate()
    if not (state_dir / "state.pt").exists():
        pytest.skip("the run finished before it could be killed")
    res = run_itera("distill", "--teacher", teacher, "--data", distill_corpus, "--out", out, *SMALL, *args,
                    "--lr", "1e-4", "--resume")
    assert_usage_error(res, "from a run with other options or data")


def test_torchrun_two_processes_match_one_process(teacher, distill_corpus, tmp_path):
    args = ["--teacher", str(teacher), "--student", "half", "--alpha", "0.5", "--data", str(distill_corpus),
            "--steps", "4", *SMALL]
    one = run_itera("distill", *args, "--out", tmp_path / "one").record
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "itera", "distill", *args, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    records = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 1 and records[0]["params"]["processes"] == 2  # only rank 0 emits
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-4, diff
    assert one["params"]["processes"] == 1


# ------------------------------------------------------------------------------- components


def test_kd_loss_matches_the_formula_and_chunking_changes_nothing():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    s, t = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    s.init_weights(seed=1, std=0.2)
    t.init_weights(seed=2, std=0.2)
    batch = torch.randint(0, 50, (3, 11))
    alpha, T = 0.3, 2.5
    with torch.no_grad():
        sl, tl = s(batch[:, :-1]), t(batch[:, :-1])
    ce = F.cross_entropy(sl.flatten(0, 1), batch[:, 1:].flatten())
    p_t = F.softmax(tl / T, -1)
    fwd = (p_t * (F.log_softmax(tl / T, -1) - F.log_softmax(sl / T, -1))).sum(-1).mean()
    p_s = F.softmax(sl / T, -1)
    rev = (p_s * (F.log_softmax(sl / T, -1) - F.log_softmax(tl / T, -1))).sum(-1).mean()
    for chunk in (3, 10):
        loss, _ = DistillLoss(t, alpha, T, "forward", chunk=chunk)(s, batch)
        assert loss.item() == pytest.approx((alpha * T * T * fwd + (1 - alpha) * ce).item(), rel=1e-5)
        loss, _ = DistillLoss(t, alpha, T, "reverse", chunk=chunk)(s, batch)
        assert loss.item() == pytest.approx((alpha * T * T * rev + (1 - alpha) * ce).item(), rel=1e-5)
    loss, _ = DistillLoss(None, 0.0, T)(s, batch)
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6)


def test_pruning_everything_kept_is_the_teacher():
    """Full width and depth through the pruning path must reproduce the teacher exactly:
    this checks every slice (GQA groups, biases, tied head) lines up."""
    cfg = ModelConfig(vocab_size=40, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, tie_word_embeddings=True, model_type="qwen2", qkv_bias=True)
    t = LlamaForCausalLM(cfg)
    t.init_weights(seed=0, std=0.2)
    with torch.no_grad():
        for n, p in t.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    x = torch.randint(0, 40, (2, 9))
    s, plan = init_from_pruning(t, cfg, [0, 1], [x])
    with torch.no_grad():
        assert torch.allclose(s(x), t(x), atol=1e-6)
    # A narrower student keeps whole kv groups: its query heads map onto kept groups.
    small = StudentSpec(width=0.5).resolve(cfg, 40)
    s2, plan2 = init_from_pruning(t, small, [0, 1], [x])
    assert small.num_key_value_heads == 1 and small.num_attention_heads == 3
    assert all(len({h // 3 for h in heads}) == 1 for heads in plan2["heads"])
    assert s2(x).shape == (2, 9, 40)


def test_evenly_spaced_layers():
    assert evenly_spaced(8, 4) == [0, 2, 5, 7]
    assert evenly_spaced(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced(5, 1) == [0]


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args,needle", [
    (["--student", "half", "--init", "layers", "--layers", "9"], "student layers 9 is larger than the teacher's 4"),
    (["--init", "prune", "--layers", "2", "--hidden", "256", "--heads", "4"], "hidden 256 is larger than the teacher's 128"),
    (["--layers", "2", "--hidden", "60", "--heads", "8"], "--heads (8) must divide --hidden (60)"),
    (["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "3"], "--kv-heads (3) must divide --heads (4)"),
    (["--student", "tiny-nonexistent"], "unknown student preset 'tiny-nonexistent'"),
    (["--student", "quarter", "--init", "layers"], "--init layers copies whole layers"),
    (["--student", "half", "--alpha", "1.5"], "--alpha must be between 0 and 1"),
])
def test_bad_student_or_options_fail_before_training(teacher, distill_corpus, tmp_path, args, needle):
    res = run_itera("distill", "--teacher", teacher, "--data", distill_corpus, "--out", tmp_path / "s", *args)
    assert_usage_error(res, needle)
    assert not (tmp_path / "s").exists()


def test_empty_data_and_vocabulary_mismatch(teacher, tmp_path, tokenizer_dir, distill_corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert_usage_error(run_itera("distill", "--teacher", teacher, "--student", "half", "--data", empty,
                                 "--out", tmp_path / "s"), "holds no text")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("The fox.")
    assert_usage_error(run_itera("distill", "--teacher", teacher, "--student", "half", "--data", tiny,
                                 "--out", tmp_path / "s"), "training tokens; at least --seq-len + 2")
    res = run_itera("distill", "--teacher", teacher, "--student", "half", "--data", distill_corpus,
                    "--tokenizer", tokenizer_dir / "tokenizer.json", "--out", tmp_path / "s")
    assert_usage_error(res, "the tokenizer has 300 tokens but the teacher's vocabulary has 400")


def test_no_teacher_needs_alpha_zero_and_a_tokenizer(distill_corpus, tmp_path):
    base = ["distill", "--data", distill_corpus, "--out", tmp_path / "s", "--layers", "1", "--hidden", "16", "--heads", "2"]
    assert_usage_error(run_itera(*base), "--alpha > 0 needs a --teacher")
    assert_usage_error(run_itera(*base, "--alpha", "0"), "needs --tokenizer FILE or --tokenizer bpe:VOCAB_SIZE")
    assert_usage_error(run_itera(*base, "--alpha", "0", "--tokenizer", "bpe:10"), "bpe:N needs N >= 260")


# ------------------------------------------------------------------------------- Ctrl-C, sizes, held-out tokens

SCRATCH = ["--alpha", "0", "--tokenizer", "bpe:300", "--layers", "1", "--hidden", "32", "--heads", "2",
           "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "2"]


def test_ctrl_c_says_what_was_kept_and_the_resume_command_resumes(distill_corpus, tmp_path):
    """SIGINT mid-run: exit 130, nothing on stdout, no partial student or temporary file, and two
    stderr lines: the step of the checkpoint kept and where, then a command that really resumes."""
    import shlex

    out, state = tmp_path / "s", tmp_path / "s.train-state" / "state.pt"
    p = subprocess.Popen([sys.executable, "-m", "itera", "distill", "--data", str(distill_corpus), "--out", "s",
                          *SCRATCH, "--steps", "5000", "--save-every", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                         # as from a terminal: a shell that ran this suite in the background (`make test &`)
                         # ignores SIGINT, and an ignored signal stays ignored across exec
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600  # a run that never writes its checkpoint fails, rather than hangs
    while not state.exists() and p.poll() is None and time.monotonic() < deadline:  # however fast this machine is
        time.sleep(0.02)
    if not state.exists():
        p.kill()
    assert p.poll() is None, p.communicate()[1].decode()
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 130, stderr.decode()
    assert stdout == b"" and "Traceback" not in stderr.decode()
    saved = torch.load(state, weights_only=True)["step"]
    lines = stderr.decode().strip().splitlines()
    kept, how = lines[-2], lines[-1]
    assert kept.startswith("itera: error: interrupted at step ") and " of 5000" in kept
    assert f"kept the checkpoint of step {saved} in {os.path.join('s.train-state', 'state.pt')}" in kept
    prefix = f"itera: to resume from step {saved}: "
    assert how.startswith(prefix), how
    words = shlex.split(how[len(prefix):])
    assert words[:2] == ["itera", "distill"] and "--resume" in words and "--save-every" in words
    assert not out.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["s.train-state"]
    assert [x.name for x in state.parent.iterdir()] == ["state.pt"]  # no half-written state.pt.tmp
    # the command as printed (run in the same directory), taken a couple of steps past the checkpoint
    words[words.index("--steps") + 1] = str(saved + 2)
    res = run_itera(*words[1:], cwd=tmp_path)
    assert f"resumed from step {saved} of {saved + 2}" in res.stderr
    m = res.record["metrics"]
    assert m["tokens_seen"] == (saved + 2) * 4 * 32 and len(res.record["metrics"]["eval_history"]) == 2


def test_interrupt_messages_before_any_checkpoint(distill_corpus, tmp_path):
    """Without --save-every, or before the first checkpoint, nothing is kept and the message says so,
    with the command to start again; a piped teacher is named by path in it."""
    from types import SimpleNamespace

    from itera.jobs.distill import DistillOptions, command_line, interrupted
    from itera.train import Dist, TrainOptions

    opts = DistillOptions(data=str(distill_corpus), out=tmp_path / "my out", teacher=tmp_path / "t", student="half",
                          train=TrainOptions(steps=200, lr=1e-3, warmup_steps=10))
    e = interrupted(opts, SimpleNamespace(step=7, saved_step=None), Dist())
    assert e.exit_code == 130
    first, second = str(e).splitlines()
    assert first == ("interrupted at step 7 of 200; nothing was kept: without --save-every no checkpoint is written "
                     "(pass --save-every N to be able to resume)")
    assert second == f"itera: to start again: itera distill --data {distill_corpus} --out '{tmp_path / 'my out'}' " \
                     f"--teacher {tmp_path / 't'} --student half"
    opts.train.save_every = 5
    assert "before the first checkpoint (step 5); nothing was kept" in str(
        interrupted(opts, SimpleNamespace(step=3, saved_step=None), Dist()))
    assert command_line(opts, world=2).startswith("torchrun --nproc-per-node 2 -m itera distill ")


def test_scratch_model_is_called_a_model_and_the_record_names_its_held_out_tokens(distill_corpus, tmp_path):
    """Training from scratch says 'model: ... trained from scratch' (it is nobody's student), stays
    float32, and the record and stderr say which tokens the held-out perplexity stood on."""
    from itera.data import split_heldout
    from itera.model.checkpoint import read_headers

    res = run_itera("distill", "--data", distill_corpus, "--out", tmp_path / "m", *SCRATCH, "--steps", "2")
    m = res.record["metrics"]
    assert "\nmodel: " in "\n" + res.stderr and "trained from scratch" in res.stderr and "student:" not in res.stderr
    assert m["student_dtype"] == "float32" and "from scratch" in m["student_dtype_reason"]
    assert {i["dtype"] for _, i in read_headers(tmp_path / "m").values()} == {"F32"}
    h = m["heldout_split"]
    text = distill_corpus.read_text()
    head, tail = split_heldout(text, 0.05)
    assert h["source"] == os.path.realpath(distill_corpus) and h["fraction"] == 0.05 and h["rule"] == "tail"
    assert h["chars"] == [len(head), len(text)] and h["excluded_from"] == "training"
    assert h["tokens_scored"] == m["heldout_tokens"] and h["tokens"][1] - h["tokens"][0] >= m["heldout_tokens"]
    assert (f"on the last 5% of {h['source']} (characters {len(head):,}–{len(text):,}, "
            f"tokens {h['tokens'][0]:,}–{h['tokens'][1]:,}; {m['heldout_tokens']:,} scored; not used for training)"
            in res.stderr)


@pytest.fixture(scope="module")
def fp16_teacher(tmp_path_factory, tokenizer_dir):
    """A tiny teacher stored in float16, as Hub checkpoints usually are."""
    from conftest import save_tiny
    from itera.model.checkpoint import load_model, save_model

    d = tmp_path_factory.mktemp("fp16-teacher")
    model, _ = load_model(save_tiny(d / "fp32", tokenizer_dir, seed=3))
    return save_model(model, d / "fp16", tokenizer_from=tokenizer_dir, dtype="float16")


def test_a_float16_teacher_gives_a_float16_student(fp16_teacher, corpus_file, tmp_path):
    """--save-dtype auto keeps the teacher's stored dtype: the student is float16 on disk (smaller
    than the teacher, not larger), loads in transformers, and its held-out perplexity is measured
    on the float16 weights as saved; --save-dtype float32 still gives full precision."""
    from itera.model.checkpoint import read_headers
    from itera.tokenizer import Tokenizer

    args = ["--teacher", fp16_teacher, "--data", corpus_file, "--layers", "1", "--batch-size", "4", "--seq-len",
            "32", "--steps", "3", "--warmup-steps", "1", "--eval-tokens", "256"]
    rec = run_itera("distill", *args, "--out", tmp_path / "s").record
    m = rec["metrics"]
    assert {i["dtype"] for _, i in read_headers(tmp_path / "s").values()} == {"F16"}
    assert json.loads((tmp_path / "s" / "config.json").read_text())["torch_dtype"] == "float16"
    assert m["student_dtype"] == "float16" and "teacher's stored dtype" in m["student_dtype_reason"]
    assert rec["params"]["save_dtype"] == "auto"
    assert m["student_bytes"] < m["teacher_bytes"] and m["compression_ratio_bytes"] > 1
    # the record's figure is the saved student's: re-measured from disk, it is the same
    from itera.jobs.distill import heldout_metrics

    ours, cfg = load_model(tmp_path / "s")
    tok = Tokenizer.from_dir(tmp_path / "s")
    text = corpus_file.read_text()
    held = torch.tensor(tok.encode(text[m["heldout_split"]["chars"][0]:], add_bos=False))
    again = heldout_metrics(ours, None, held, 32, 256)["student_perplexity"]
    assert again == pytest.approx(m["student_perplexity"], rel=1e-6)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "s")
    assert theirs.dtype == torch.float16
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert (ours(x) - theirs.float()(x).logits).abs().max() < 1e-4
    full = run_itera("distill", *args, "--save-dtype", "float32", "--out", tmp_path / "f").record["metrics"]
    assert {i["dtype"] for _, i in read_headers(tmp_path / "f").values()} == {"F32"}
    assert full["student_dtype"] == "float32" and full["student_bytes"] > 1.9 * m["student_bytes"]
    assert_usage_error(run_itera("distill", *args, "--save-dtype", "int8", "--out", tmp_path / "x"),
                       "--save-dtype 'int8' is not a dtype to save in")
