"""itera dpo-train: the loss by hand, a learnable preference, PEFT-compatible adapters, merge,
the reference cache, feedback conversion and bad input."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from conftest import _ADJS, _NOUNS, _PLACES, _VERBS, assert_usage_error, run_itera
from itera.losses import dpo_loss, reward_accuracy
from itera.preference import EOS, Pair, Single, examples_from_events, pairs_from_events, pairs_from_feedback, read_pairs
from itera.record import validate


def test_loss_matches_the_formulas_by_hand():
    pi_c, pi_r = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    ref_c, ref_r = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -3.5])
    beta, eps = 0.5, 0.1
    h = [(-10 + 11) - (-12 + 11.5), (-4 + 4.5) - (-3 + 3.5)]  # 1.5, 0.0

    def logsig(x):
        return -math.log1p(math.exp(-x))

    sig = sum(-logsig(beta * x) for x in h) / 2
    smooth = sum(-(1 - eps) * logsig(beta * x) - eps * logsig(-beta * x) for x in h) / 2
    ipo = sum((x - 1 / (2 * beta)) ** 2 for x in h) / 2
    assert dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)[0].item() == pytest.approx(sig, rel=1e-6)
    assert dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "sigmoid", eps)[0].item() == pytest.approx(smooth, rel=1e-6)
    assert dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "ipo")[0].item() == pytest.approx(ipo, rel=1e-6)
    _, f = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    assert f["chosen_rewards"].tolist() == pytest.approx([0.5, 0.25])
    assert reward_accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0])) == pytest.approx(0.625)


def _pairs_file(path, n=240, seed=0):
    """A learnable preference: chosen answers call everyone happy, rejected ones lonely."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = (f"The {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the "
                      f"{rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_PLACES)}.")
            n3, v, n4 = rng.choice(_NOUNS), rng.choice(_VERBS), rng.choice(_NOUNS)
            f.write(json.dumps({"prompt": prompt, "chosen": f" The happy {n3} {v} the happy {n4}.",
                                "rejected": f" The lonely {n3} {v} the lonely {n4}."}) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(teacher, tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    pairs = _pairs_file(d / "pairs.jsonl")
    home = d / "home"
    args = ["dpo-train", "--model", teacher, "--pairs", pairs, "--steps", "40", "--batch-size", "8", "--lr", "1e-3", "--beta", "0.5",
            "--merge"]
    first = run_itera(*args, "--out", d / "adapter", env={"ITERA_HOME": str(home)}).record
    second = run_itera(*args, "--out", d / "adapter2", "--steps", "2", env={"ITERA_HOME": str(home)}).record
    return {"dir": d, "rec": first, "again": second, "pairs": pairs}


def test_heldout_reward_accuracy_rises_and_generations_move(trained, teacher):
    rec = trained["rec"]
    validate(rec)
    m = rec["metrics"]
    assert abs(m["heldout_before"]["reward_accuracy"] - 0.5) < 0.05  # policy == reference at the start
    assert m["heldout"]["reward_accuracy"] > 0.9 and m["heldout"]["reward_margin"] > 0
    assert m["heldout"]["chosen_reward"] > m["heldout"]["rejected_reward"]
    assert m["kl_to_reference"] > 0 and m["pairs_used"] + m["pairs_heldout"] == 240
    # on new prompts of the same style, the merged model gives the preferred answer's start more
    # probability against the rejected one's than the base does: log P(" The happy") - log P(" The
    # lonely") rises by over 1 nat on every prompt (about 0.16 -> 3.3 measured). A count of words in
    # greedy continuations said nothing where neither model's continuation named either.
    from itera.model.checkpoint import load_model
    from itera.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(teacher)
    rng = random.Random(123)
    prompts = [f"The {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_ADJS)} "
               f"{rng.choice(_NOUNS)} {rng.choice(_PLACES)}." for _ in range(8)]

    def log_ratios(path):
        model, _ = load_model(path)

        def logp(prompt, cont):
            p, c = tok.encode(prompt), tok.encode(cont, add_bos=False)
            with torch.no_grad():
                lp = model(torch.tensor([p + c]))[0].log_softmax(-1)
            return sum(float(lp[len(p) - 1 + i, t]) for i, t in enumerate(c))

        return [logp(q, " The happy") - logp(q, " The lonely") for q in prompts]

    before, after = log_ratios(teacher), log_ratios(trained["dir"] / "adapter" / "merged")
    assert all(a > b + 1.0 for a, b in zip(after, before)), (before, after)


def test_reference_log_probs_are_cached(trained):
    assert trained["rec"]["metrics"]["reference_cache_hit"] is False
    assert trained["again"]["metrics"]["reference_cache_hit"] is True


def _policy_with_adapter(base, adapter_dir):
    from safetensors.torch import load_file

    from itera.lora import add_lora, lora_modules
    from itera.model.checkpoint import load_model

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    model, _ = load_model(base)
    short = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
             "down_proj": "down"}
    add_lora(model, [short[t] for t in cfg["target_modules"]], cfg["r"], cfg["lora_alpha"], 0.0)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for name, m in lora_modules(model).items():
        m.lora_A.weight.data.copy_(weights[f"base_model.model.{name}.lora_A.weight"])
        m.lora_B.weight.data.copy_(weights[f"base_model.model.{name}.lora_B.weight"])
    return model.eval()


def test_merged_checkpoint_equals_base_plus_adapter(trained, teacher):
    from itera.model.checkpoint import load_model

    adapter = trained["dir"] / "adapter"
    policy = _policy_with_adapter(teacher, adapter)
    merged, cfg = load_model(adapter / "merged")
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (policy(x) - merged(x)).abs().max() < 1e-5


def test_peft_loads_the_adapter_with_the_same_logits(trained, teacher):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    adapter = trained["dir"] / "adapter"
    base = transformers.LlamaForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    ours = _policy_with_adapter(teacher, adapter)
    x = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (peft_model(input_ids=x).logits - ours(x)).abs().max().item()
    assert diff < 1e-4, diff


def test_feedback_events_become_pairs_with_reasons_for_drops(tmp_path):
    events = [
        {"type": "thumbs", "prompt": "P1", "response": "good", "vote": "up"},
        {"type": "thumbs", "prompt": "P1", "response": "bad", "vote": "down"},
        {"type": "thumbs", "prompt": "P1", "response": "worse", "vote": "down"},
        {"type": "thumbs", "prompt": "P2", "response": "lonely up", "vote": "up"},  # nothing to pair with
        {"type": "ab", "prompt": "P3", "a": "x", "b": "y", "winner": "b"},
        {"type": "ab", "prompt": "P3", "a": "x", "b": "y", "winner": "a"},  # contradicts the one above
        {"type": "ab", "prompt": "P4", "a": "m", "b": "n", "winner": "a"},
        {"type": "ab", "prompt": "P4", "a": "m", "b": "n", "winner": "a"},  # duplicate
        {"type": "correction", "prompt": "P5", "response": "teh cat", "corrected": "the cat"},
        {"type": "correction", "prompt": "P5", "response": "same", "corrected": "same"},
        {"type": "rating", "prompt": "P6", "response": "r5", "rating": 5},
        {"type": "rating", "prompt": "P6", "response": "r4", "rating": 4.5},
        {"type": "rating", "prompt": "P6", "response": "r2", "rating": 2},
        {"type": "ab", "prompt": "P7", "a": "q"},
        {"type": "emoji", "prompt": "P8"},
        {"type": "ab", "prompt": "P9", "a": "u", "b": "v", "winner": "a", "chat": "yes"},
        {"type": "ab", "prompt": "P10", "a": "u", "b": "v", "winner": "a", "chat": True},
    ]
    f = tmp_path / "feedback.jsonl"
    f.write_text("".join(json.dumps(e) + "\n" for e in events))
    pairs, dropped = pairs_from_feedback(f, min_rating_gap=1.0)
    assert set(pairs) == {Pair("P1", "good", "bad"), Pair("P1", "good", "worse"), Pair("P4", "m", "n"),
                          Pair("P5", "the cat", "teh cat", chosen_end=EOS), Pair("P6", "r5", "r2"), Pair("P6", "r4", "r2"),
                          Pair("P10", "u", "v", chat=True)}
    assert dropped == {"thumbs: no opposite vote for the same prompt": 1, "contradicts another event": 2,
                       "duplicate": 1, "chosen and rejected identical": 1, "ab: missing field": 1,
                       "unknown event type": 1, "chat is not true or false": 1}


def test_a_chat_prompt_is_tokenized_as_the_server_tokenized_it(tokenizer_dir, tmp_path):
    """A pair marked "chat" holds a rendered template: its special-token strings are the special
    tokens (as transformers tokenizes the text, and as itera serve did); unmarked, they are text."""
    from transformers import PreTrainedTokenizerFast

    from itera.jobs.dpo import encode_pairs
    from itera.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    prompt = "<s>[user] the fox sees the owl</s><s>[assistant]"
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": prompt, "chosen": " yes", "rejected": " no", "chat": True}) + "\n"
                 + json.dumps({"prompt": prompt, "chosen": " yes", "rejected": " no"}) + "\n")
    chat, plain = read_pairs(f)
    assert chat == Pair(prompt, " yes", " no", True) and plain == Pair(prompt, " yes", " no")
    enc, drops = encode_pairs(tok, [chat, plain], max_len=256)
    assert drops == []
    prompts = [enc.ids[i, 0, : int(enc.mask[i, 0].nonzero()[0])].tolist() for i in range(2)]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    assert prompts[0] == hf(prompt, add_special_tokens=False).input_ids  # the template's own <s>, no second
    assert prompts[0].count(tok.bos_id) == 2 and prompts[0].count(tok.eos_id) == 1
    assert tok.eos_id not in prompts[1] and len(prompts[1]) > len(prompts[0])  # "</s>" spelled out as text


@pytest.fixture(params=["sqlite", "postgresql"])
def feedback_db(request, tmp_path):
    """Where a test's feedback store is: a SQLite file, or a new database on the suite's PostgreSQL
    server (what several `itera serve` replicas share)."""
    return tmp_path / "fb.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def test_the_feedback_store_marks_chat_prompts(feedback_db):
    from itera.feedback import FeedbackError, FeedbackStore

    with FeedbackStore(feedback_db) as store:
        for rid, endpoint, text in (("c1", "/v1/chat/completions", "a"), ("c2", "/v1/chat/completions", "b"),
                                    ("t1", "/v1/completions", "a"), ("t2", "/v1/completions", "b")):
            store.add_response({"id": rid, "endpoint": endpoint, "model": "m", "version": None, "sha256": "0" * 64,
                                "prompt": "<s>P", "response": text, "finish_reason": "stop", "prompt_tokens": 2,
                                "completion_tokens": 1, "request": {}})
        for a, b in (("c1", "c2"), ("t1", "t2")):
            store.add_feedback({"type": "ab", "a_id": a, "b_id": b, "winner": "a"})
        with pytest.raises(FeedbackError, match="a_id and b_id answer different prompts"):  # a chat against a
            store.add_feedback({"type": "ab", "a_id": "c1", "b_id": "t2", "winner": "a"})  # completion, same text
        with pytest.raises(FeedbackError, match="response_id 'nope' is not a response this server stored") as e:
            store.add_feedback({"type": "rating", "response_id": "nope", "rating": 3})
        assert e.value.status == 404
        stored = store.add_feedback({"type": "rating", "response_id": "t1", "rating": 4.5})
        assert stored["id"] == 3 and stored["rating"] == 4.5  # the refused ones took no id
        pairs, dropped = pairs_from_events(store.events())
        assert store.counts() == {"responses": 4, "feedback": 3} and store.integrity_ok()
        assert store.response("c1")["endpoint"] == "/v1/chat/completions"
    # stored as ended ("stop", no stop strings asked for, no end id kept): scored with EOS
    assert pairs == [Pair("<s>P", "a", "b", True, EOS, EOS), Pair("<s>P", "a", "b", False, EOS, EOS)]
    assert dropped == {"rating: no response to compare with by the rating gap": 1}


def test_dpo_from_feedback_end_to_end(teacher, tmp_path):
    f = tmp_path / "feedback.jsonl"
    rng = random.Random(3)
    with open(f, "w") as out:
        for i in range(30):
            p = f"The {rng.choice(_NOUNS)} sees the {rng.choice(_NOUNS)}."
            out.write(json.dumps({"type": "ab", "prompt": p, "a": " The happy owl.", "b": " The lonely owl.",
                                  "winner": "a"}) + "\n")
            out.write(json.dumps({"type": "thumbs", "prompt": p, "response": " The happy fox.", "vote": "up"}) + "\n")
    rec = run_itera("dpo-train", "--model", teacher, "--feedback", f, "--out", tmp_path / "a", "--steps", "3",
                    "--save-pairs", tmp_path / "pairs.jsonl", "--holdout", "0").record
    m = rec["metrics"]
    saved = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    # --loss auto (the default): the A/B votes train as pairs, the lone thumbs-up as KTO singles; nothing dropped
    assert m["losses"] == {"pairs": "sigmoid", "singles": "kto"} and m["pairs_dropped"] == 0
    assert m["pairs_used"] == sum("chosen" in x for x in saved) > 0
    assert m["singles_used"] == sum("desirable" in x for x in saved) > 0
    # the saved file trains again as it is (pairs and judged responses)
    again = run_itera("dpo-train", "--model", teacher, "--pairs", tmp_path / "pairs.jsonl", "--out", tmp_path / "b",
                      "--steps", "1", "--holdout", "0").record["metrics"]
    assert (again["pairs_used"], again["singles_used"]) == (m["pairs_used"], m["singles_used"])
    # DPO alone drops what it cannot pair, and says so
    rec = run_itera("dpo-train", "--model", teacher, "--feedback", f, "--out", tmp_path / "c", "--steps", "1",
                    "--holdout", "0", "--loss", "sigmoid").record
    assert rec["metrics"]["dropped_reasons"].get("thumbs: no opposite vote for the same prompt", 0) > 0
    assert rec["metrics"]["singles_used"] == 0


@pytest.mark.parametrize("content,needle", [
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n', "pairs.jsonl:2: missing \"rejected\""),
    ('{"prompt": "p", "chosen": "same", "rejected": "same"}\n', "pairs.jsonl:1: chosen and rejected are identical"),
    ('\ufeff{"prompt": "p", "chosen": "a", "rejected": "b"}\n', "pairs.jsonl:1: the file starts with a UTF-8 byte-order mark"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chos', "pairs.jsonl:2: the line is truncated"),
    ("", "holds no lines"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "chat": "yes"}\n', 'pairs.jsonl:1: "chat" is "yes"; it must be'),
])
def test_bad_pairs_files(teacher, tmp_path, content, needle):
    f = tmp_path / "pairs.jsonl"
    f.write_text(content, encoding="utf-8")
    res = run_itera("dpo-train", "--model", teacher, "--pairs", f, "--out", tmp_path / "a")
    assert_usage_error(res, needle)
    assert not (tmp_path / "a").exists()


def test_bad_options(teacher, tmp_path):
    f = _pairs_file(tmp_path / "p.jsonl", n=4)
    base = ["dpo-train", "--model", teacher, "--out", tmp_path / "a"]
    assert_usage_error(run_itera(*base), "pass exactly one of --pairs FILE or --feedback FILE")
    assert_usage_error(run_itera(*base, "--pairs", f, "--loss", "hinge"), "unknown --loss 'hinge'")
    assert_usage_error(run_itera(*base, "--pairs", f, "--lora-targets", "q,zz"), "unknown --lora-targets")


def test_torchrun_two_processes_match_one(teacher, tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import REPO

    pairs = _pairs_file(tmp_path / "p.jsonl", n=40)
    args = ["--model", str(teacher), "--pairs", str(pairs), "--steps", "3", "--batch-size", "4", "--beta", "0.5"]
    run_itera("dpo-train", *args, "--out", tmp_path / "one").record
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "itera", "dpo-train", *args, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len([line for line in p.stdout.splitlines() if line.startswith("{")]) == 1
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_merged_model_keeps_the_base_dtype(tokenizer_dir, tmp_path):
    """A float16 base gives a float16 merged/ (not a float32 one twice the size), loadable by itera
    and transformers, with held-out figures measured on it as saved; --save-dtype float32 asks for
    full precision."""
    from conftest import save_tiny
    from itera.model.checkpoint import load_model, read_headers, save_model, weight_bytes

    model, _ = load_model(save_tiny(tmp_path / "fp32", tokenizer_dir, seed=4))
    base = save_model(model, tmp_path / "base", tokenizer_from=tokenizer_dir, dtype="float16")
    pairs = _pairs_file(tmp_path / "pairs.jsonl", n=60)
    args = ["dpo-train", "--model", base, "--pairs", pairs, "--steps", "2", "--batch-size", "4", "--merge",
            "--holdout", "0.3"]
    rec = run_itera(*args, "--out", tmp_path / "dpo", env={"ITERA_HOME": str(tmp_path / "home")}).record
    validate(rec)
    m, merged = rec["metrics"], tmp_path / "dpo" / "merged"
    assert {i["dtype"] for _, i in read_headers(merged).values()} == {"F16"}
    assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "float16"
    assert m["merged_dtype"] == "float16" and "base model's stored dtype" in m["merged_dtype_reason"]
    assert weight_bytes(merged) == weight_bytes(base) and rec["params"]["save_dtype"] == "auto"
    assert m["heldout_merged"]["pairs"] == m["heldout"]["pairs"] > 0 and "as saved" in m["heldout_measured_on"]
    ours, cfg = load_model(merged)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.LlamaForCausalLM.from_pretrained(merged)
    assert theirs.dtype == torch.float16
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert (ours(x) - theirs.float()(x).logits).abs().max() < 1e-4
    full = run_itera(*args, "--save-dtype", "float32", "--out", tmp_path / "dpo32",
                     env={"ITERA_HOME": str(tmp_path / "home")}).record
    assert {i["dtype"] for _, i in read_headers(tmp_path / "dpo32" / "merged").values()} == {"F32"}
    assert full["metrics"]["merged_dtype"] == "float32"


def test_lm_data_holds_the_perplexity_of_the_text_while_the_preference_moves(teacher, distill_corpus, tmp_path):
    """PPO-ptx: with --lm-data the text's NLL stays put while the preference is learned; without
    it (a weight too small to matter, so the same windows are measured) the preference costs NLL."""
    from conftest import file_key

    pairs = _pairs_file(tmp_path / "pairs.jsonl", n=120)
    args = ["dpo-train", "--model", teacher, "--pairs", pairs, "--steps", "25", "--lr", "1e-2", "--beta", "0.5",
            "--lm-data", distill_corpus, "--lm-seq-len", "32"]
    free = run_itera(*args, "--lm-weight", "1e-9", "--out", tmp_path / "free").record["metrics"]
    held = run_itera(*args, "--lm-weight", "2", "--out", tmp_path / "held").record
    validate(held)
    m = held["metrics"]
    a, b = free["lm_anchor"], m["lm_anchor"]
    assert b["data"] == file_key(distill_corpus) and b["seq_len"] == 32 and b["weight"] == 2
    assert a["nll_before"] == pytest.approx(b["nll_before"], abs=1e-6)  # the same windows, the same base
    drift_free, drift_held = a["nll_after"] - a["nll_before"], b["nll_after"] - b["nll_before"]
    assert drift_free > 0.05, a  # the preference alone moves the text's NLL up
    assert drift_held < drift_free / 3, (a, b)
    assert m["heldout"]["reward_accuracy"] > 0.9  # and the preference is learned all the same


def test_lm_data_bad_input(teacher, tmp_path):
    pairs = _pairs_file(tmp_path / "p.jsonl", n=8)
    base = ["dpo-train", "--model", teacher, "--pairs", pairs, "--out", tmp_path / "a", "--steps", "1"]
    assert_usage_error(run_itera(*base, "--lm-data", "pydocs@train", "--lm-weight", "0"),
                       "--lm-weight must be a positive number (got 0.0)")
    short = tmp_path / "short.txt"
    short.write_text("The owl.")
    assert_usage_error(run_itera(*base, "--lm-data", short), f"--lm-data {short} gives", "smaller --lm-seq-len")
    assert not (tmp_path / "a").exists()
