"""Unpaired feedback (KTO), end-of-turn scoring and feedback provenance in dpo-train: the loss by
hand, no usable event dropped under --loss auto, the end token scored only for responses that
ended, an older store migrated, and feedback from another tokenizer's model refused."""

from __future__ import annotations

import json
import math
import random
import sqlite3

import pytest
import torch

from conftest import _NOUNS, _VERBS, assert_usage_error, run_itera
from itera.losses import kto_loss
from itera.preference import EOS, Pair, Single, examples_from_events


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_loss_against_a_hand_computed_value():
    """Two responses, one desirable (r = 1.0), one undesirable (r = -0.5); the mismatched pairs'
    mean log-ratio 0.3 is the reference point; beta 0.1, weights 1 and 1.5."""
    pi, ref = torch.tensor([-9.0, -6.5]), torch.tensor([-10.0, -6.0])
    good = torch.tensor([True, False])
    loss, f = kto_loss(pi, ref, good, torch.tensor(0.3), 0.1, 1.0, 1.5)
    want = ((1 - _sig(0.1 * (1.0 - 0.3))) + 1.5 * (1 - _sig(0.1 * (0.3 + 0.5)))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert f["z0"].item() == pytest.approx(0.3)
    # a negative estimate is clamped to 0: z0 = max(0, KL)
    loss0, f0 = kto_loss(pi, ref, good, torch.tensor(-2.0), 0.1, 1.0, 1.5)
    assert f0["z0"].item() == 0.0
    assert loss0.item() == pytest.approx(((1 - _sig(0.1)) + 1.5 * (1 - _sig(0.05))) / 2, rel=1e-6)
    # the reference point carries no gradient; the rewards do
    p = pi.clone().requires_grad_()
    kl = torch.tensor(0.3, requires_grad=True)
    kto_loss(p, ref, good, kl, 0.1)[0].backward()
    assert kl.grad is None and p.grad[0] < 0 < p.grad[1]


EVENTS = [
    {"type": "thumbs", "prompt": "P1", "response": "good", "vote": "up"},       # a lone vote
    {"type": "thumbs", "prompt": "P2", "response": "bad", "vote": "down"},      # a lone vote
    {"type": "thumbs", "prompt": "P3", "response": "x", "vote": "up"},          # these two pair up
    {"type": "thumbs", "prompt": "P3", "response": "y", "vote": "down"},
    {"type": "ab", "prompt": "P4", "a": "m", "b": "n", "winner": "b"},
    {"type": "rating", "prompt": "P5", "response": "five", "rating": 5},        # above the threshold 3
    {"type": "rating", "prompt": "P6", "response": "one", "rating": 1},         # below it
    {"type": "correction", "prompt": "P7", "response": "teh", "corrected": "the"},
]


def test_auto_trains_every_usable_event_and_pairs_stay_pairs():
    pairs, singles, dropped = examples_from_events(EVENTS, "auto", rating_threshold=None)
    assert dropped == {}
    assert set(pairs) == {Pair("P3", "x", "y"), Pair("P4", "n", "m"), Pair("P7", "the", "teh", chosen_end=EOS)}
    assert set(singles) == {Single("P1", "good", True), Single("P2", "bad", False), Single("P5", "five", True),
                            Single("P6", "one", False)}
    # DPO alone drops the lone votes and ratings, as before
    p2, s2, d2 = examples_from_events(EVENTS, "pairs")
    assert set(p2) == set(pairs) and s2 == []
    assert d2 == {"thumbs: no opposite vote for the same prompt": 2,
                  "rating: no response to compare with by the rating gap": 2}
    # KTO alone: every event a single, a pair's winner desirable and its loser not
    p3, s3, d3 = examples_from_events(EVENTS, "kto")
    assert p3 == [] and d3 == {}
    assert {(x.prompt, x.response, x.desirable) for x in s3} == {
        ("P1", "good", True), ("P2", "bad", False), ("P3", "x", True), ("P3", "y", False), ("P4", "n", True),
        ("P4", "m", False), ("P5", "five", True), ("P6", "one", False), ("P7", "the", True), ("P7", "teh", False)}
    # a rating at the threshold says nothing: dropped, counted
    _, s4, d4 = examples_from_events(EVENTS, "auto", rating_threshold=5)
    assert d4 == {"rating: at the threshold (neutral)": 1} and Single("P6", "one", False) in s4
    # one response judged both ways contradicts itself: both dropped
    _, s5, d5 = examples_from_events([EVENTS[0], {**EVENTS[0], "vote": "down"}, EVENTS[1]], "kto")
    assert d5 == {"thumbs: same response voted up and down": 1} or d5 == {"contradicts another event": 2}
    assert [x.response for x in s5] == ["bad"]


def test_an_ended_response_is_scored_with_its_end_token_and_a_cut_one_is_not(tokenizer_dir):
    from itera.jobs.dpo import encode_pairs, encode_singles
    from itera.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    assert tok.eos_id is not None
    body = tok.encode(" the fox sees the owl", add_bos=False)
    enc, drops = encode_pairs(tok, [Pair("The owl", " the fox sees the owl", " the fox sees the owl!",
                                         chosen_end=EOS, rejected_end=None)], 256)
    assert drops == []

    def scored(ids, mask):
        return [int(t) for t, m in zip(ids, mask) if m]

    chosen, rejected = scored(enc.ids[0, 0], enc.mask[0, 0]), scored(enc.ids[0, 1], enc.mask[0, 1])
    assert chosen == body + [tok.eos_id]
    assert tok.eos_id not in rejected and rejected[: len(body)] == body
    # an explicit end id (a chat model's end of turn) is scored as given
    s, _ = encode_singles(tok, [Single("The owl", " the fox sees the owl", True, end=7),
                                Single("The owl", " the fox sees the owl", False)], 256)
    assert scored(s.enc.ids[0, 0], s.enc.mask[0, 0]) == body + [7]
    assert scored(s.enc.ids[1, 0], s.enc.mask[1, 0]) == body
    # the mismatched pairs KTO's reference point uses: each prompt with the next example's response
    mm = s.mismatched(torch.tensor([0, 1]))
    assert scored(mm.ids[0, 0], mm.mask[0, 0]) == body and scored(mm.ids[1, 0], mm.mask[1, 0]) == body + [7]
    # a response a stop string ended is scored with the string after it, tokenized as one text with it
    ended = tok.encode(" the fox sees the owl.\n\n", add_bos=False)
    assert len(ended) > len(tok.encode(" the fox sees the owl.", add_bos=False))
    s2, _ = encode_singles(tok, [Single("The owl", " the fox sees the owl.", True, end="\n\n"),
                                 Single("The owl", " the fox sees the owl.", False)], 256)
    assert scored(s2.enc.ids[0, 0], s2.enc.mask[0, 0]) == ended
    assert scored(s2.enc.ids[1, 0], s2.enc.mask[1, 0]) == tok.encode(" the fox sees the owl.", add_bos=False)


def _response(rid, finish, request=None, **kw):
    return {"id": rid, "endpoint": "/v1/completions", "model": kw.pop("model", "m"), "version": kw.pop("version", 1),
            "sha256": "0" * 64, "prompt": kw.pop("prompt", "P"), "response": kw.pop("response", rid),
            "finish_reason": finish, "prompt_tokens": 1, "completion_tokens": 1, "request": request or {}, **kw}


def test_an_older_store_migrates_and_its_ended_responses_keep_their_end(tmp_path):
    """A store written before end tokens were kept: "stop" with no stop strings asked for ended on
    EOS; "stop" with stop strings, or "length", has no end token. New rows keep the id."""
    from itera import sqlite as isqlite
    from itera.feedback import MIGRATIONS, FeedbackStore

    path = tmp_path / "old.db"
    db = isqlite.connect(path, "feedback", MIGRATIONS[:1], timeout_s=5, synchronous="FULL",
                         newer=lambda f, k: "newer")
    rows = [("r1", "stop", "{}"), ("r2", "stop", json.dumps({"stop": ["\n"]})), ("r3", "length", "{}")]
    for rid, finish, request in rows:
        db.execute("INSERT INTO responses VALUES (?, 't', '/v1/completions', 'm', 1, ?, 'P', ?, ?, 1, 1, ?)",
                   (rid, "0" * 64, rid, finish, request))
        db.execute("INSERT INTO feedback (created_at, type, response_id, vote) VALUES ('2026-01-01T00:00:00Z', "
                   "'thumbs', ?, 'up')", (rid,))
    db.commit()
    db.close()
    with FeedbackStore(path) as store:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 3
        store.add_response(_response("r4", "stop", end_token=2, tokenizer="abc"))
        store.add_response(_response("r5", "stop", tokenizer="abc"))  # a stop string ended it, not known which
        store.add_response(_response("r6", "stop", end_text="\n\n", tokenizer="abc",
                                     request={"stop": ["\n\n", "END"]}))  # this one
        # stored with a fingerprint before the stop string was kept: the request asked for only one
        store.add_response(_response("r7", "stop", tokenizer="abc", request={"stop": ["END"]}))
        for rid in ("r4", "r5", "r6", "r7"):
            store.add_feedback({"type": "thumbs", "response_id": rid, "vote": "up"})
        events = store.events()
    assert [(e["response"], e["end_token"], e["end_text"]) for e in events] == [
        ("r1", -1, None), ("r2", None, None), ("r3", None, None), ("r4", 2, None), ("r5", None, None),
        ("r6", None, "\n\n"), ("r7", None, "END")]
    _, singles, _ = examples_from_events(events, "kto")
    assert [(x.response, x.end) for x in singles] == [("r1", EOS), ("r2", None), ("r3", None), ("r4", 2),
                                                      ("r5", None), ("r6", "\n\n"), ("r7", "END")]
    assert [e["tokenizer"] for e in events] == [None, None, None, "abc", "abc", "abc", "abc"]
    # a --feedback file's event may name its stop string with or without "end_token": null
    _, s2, _ = examples_from_events([{"type": "thumbs", "prompt": "Q", "response": " a", "vote": "up",
                                      "finish_reason": "stop", "end_text": "\n\n"},
                                     {"type": "thumbs", "prompt": "Q2", "response": " b", "vote": "down",
                                      "finish_reason": "stop", "end_token": None, "end_text": "END"},
                                     {"type": "thumbs", "prompt": "Q3", "response": " c", "vote": "down",
                                      "finish_reason": "stop"}], "kto")
    assert [x.end for x in s2] == ["\n\n", "END", EOS]
    # the file is a valid SQLite store after the migration
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _thumbs_store(path, tok_fp, n=40, seed=0, other=None):
    """Unpaired thumbs on a learnable preference (up: happy answers, down: lonely ones), each prompt
    voted once; ``other`` (fingerprint) adds votes served by a version 2 with another tokenizer."""
    from itera.feedback import FeedbackStore

    rng = random.Random(seed)
    with FeedbackStore(path) as store:
        for i in range(n):
            good = i % 2 == 0
            p = f"Story {i}. The {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}."
            text = f" The {'happy' if good else 'lonely'} {rng.choice(_NOUNS)}."
            store.add_response(_response(f"r{i}", "stop", prompt=p, response=text, end_token=None, tokenizer=tok_fp,
                                         version=1, model="demo"))
            store.add_feedback({"type": "thumbs", "response_id": f"r{i}", "vote": "up" if good else "down"})
        if other:
            for i in range(3):
                store.add_response(_response(f"o{i}", "length", prompt=f"Q{i}", response=" hm", tokenizer=other,
                                             version=2, model="other"))
                store.add_feedback({"type": "thumbs", "response_id": f"o{i}", "vote": "down"})


def test_kto_learns_from_unpaired_thumbs_and_the_record_names_their_versions(teacher, tmp_path):
    from itera.tokenizer import Tokenizer, fingerprint

    fp = fingerprint(Tokenizer.from_dir(teacher))
    db = tmp_path / "fb.db"
    _thumbs_store(db, fp, n=60, other="f" * 16)
    base = ["dpo-train", "--model", teacher, "--feedback-db", db, "--steps", "30", "--batch-size", "8",
            "--lr", "2e-3", "--beta", "0.5", "--holdout", "0.25"]
    # feedback served by a model with another tokenizer is refused, naming where it came from
    refused = run_itera(*base, "--out", tmp_path / "no", env={"ITERA_HOME": str(tmp_path / "home")})
    assert_usage_error(refused, "3 feedback events in", "another tokenizer (3 from version 2 of other)",
                       "--from-version")
    assert not (tmp_path / "no").exists()
    rec = run_itera(*base, "--from-version", "1", "--out", tmp_path / "a",
                    env={"ITERA_HOME": str(tmp_path / "home")}).record
    m = rec["metrics"]
    assert m["losses"] == {"pairs": None, "singles": "kto"} and m["pairs_used"] == 0
    assert m["singles_used"] + m["singles_heldout"] == 60 and m["pairs_dropped"] == 0
    prov = m["feedback_provenance"]
    assert prov["events"] == 60 and prov["events_in_store"] == 63 and prov["tokenizer_unchecked"] == 0
    assert prov["versions"] == [{"model": "demo", "version": 1, "sha256": "0" * 64, "events": 60}]
    before, after = m["heldout_singles_before"], m["heldout_singles"]
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # the adapters start as the reference
    assert after["reward_margin"] > 0.5, after  # desirable answers gained on undesirable ones, held out
    assert after["desirable"] > 0 and after["undesirable"] > 0


def test_kto_needs_a_batch_to_estimate_its_reference_point(teacher, tmp_path):
    from itera.tokenizer import Tokenizer, fingerprint

    db = tmp_path / "fb.db"
    _thumbs_store(db, fingerprint(Tokenizer.from_dir(teacher)), n=6)
    base = ["dpo-train", "--model", teacher, "--feedback-db", db, "--out", tmp_path / "a"]
    assert_usage_error(run_itera(*base, "--loss", "kto", "--batch-size", "1"), "--loss kto needs --batch-size 2")
    assert_usage_error(run_itera(*base, "--batch-size", "1"), "KTO, which cannot run on --batch-size 1")
    assert_usage_error(run_itera(*base, "--since", "yesterday"), "--since 'yesterday' is not a time")
    assert_usage_error(run_itera(*base, "--since", "2999-01-01"), "no feedback in", "after --from-version/--since")
    assert_usage_error(run_itera(*base, "--desirable-weight", "0"), "--desirable-weight must be a positive number")
    assert not (tmp_path / "a").exists()
