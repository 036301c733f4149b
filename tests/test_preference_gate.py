"""The preference gate (`registry promote --metric preference`): its statistics by hand, and on a
real registry a KTO-tuned candidate promoted over its base, the base refused as worse over the
tuned model, and a store too small to decide refused with how much more feedback it needs."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_itera
from itera.registry.policy import (MIN_JUDGED, MIN_PAIRS, judged_statistic, pair_statistic, preference_promotion,
                                   wilson)
from test_kto import _thumbs_store


def test_wilson_interval_and_pair_statistic_by_hand():
    # Wilson 95% for 8 of 10: centre (0.8 + z²/20) / (1 + z²/10), half-width z·sqrt(0.016 + z²/400) / (1 + z²/10)
    z = 1.959963984540054
    d = 1 + z * z / 10
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx((0.8 + z * z / 20 - z * math.sqrt(0.016 + z * z / 400)) / d, abs=1e-12)
    assert hi == pytest.approx((0.8 + z * z / 20 + z * math.sqrt(0.016 + z * z / 400)) / d, abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    s = pair_statistic([1.0] * 8 + [-1.0, 0.0])  # a tie counts half
    assert s["wins"] == 8.5 and s["reward_accuracy"] == 0.85 and s["verdict"] == "better"
    s = pair_statistic([1.0] * 6 + [-1.0] * 4)  # 0.6 on 10: undecided; n with z·sqrt(.24/n) < .1 is 93
    assert s["verdict"] == "undecided" and s["needed"] == 93
    assert pair_statistic([-1.0] * 9 + [1.0])["verdict"] == "worse"
    assert pair_statistic([1.0] * (MIN_PAIRS - 1))["verdict"] == "too few"


def test_judged_margin_by_hand_and_the_verdicts():
    des, und = [1.0, 2.0, 3.0, 2.0, 2.0], [0.0, -1.0, 1.0, 0.0, 0.0]
    s = judged_statistic(des, und)
    se = math.sqrt(0.5 / 5 + 0.5 / 5)  # both sample variances are 0.5
    assert s["margin"] == pytest.approx(2.0) and s["ci95"][0] == pytest.approx(2.0 - 1.959963984540054 * se)
    assert s["verdict"] == "better"
    assert judged_statistic(und, des)["verdict"] == "worse"
    assert judged_statistic(des[:MIN_JUDGED - 1], und)["verdict"] == "too few"
    # the decision over both: one better and none worse passes; one worse refuses; none voting refuses
    better, worse = pair_statistic([1.0] * 12), pair_statistic([-1.0] * 12)
    few = judged_statistic([1.0], [0.0])
    base = {"candidate_version": 2, "active_version": 1, "holdout": 0.2}
    assert preference_promotion("m", 2, 1, {**base, "pairs": better, "judged": few}).passed
    no = preference_promotion("m", 2, 1, {**base, "pairs": worse, "judged": s})
    assert not no.passed and no.refusal.startswith("m@2 is worse than active m@1 at what users preferred: "
                                                   "reward accuracy 0.00")
    few_pairs = pair_statistic([1.0] * 3)
    no = preference_promotion("m", 2, 1, {**base, "pairs": few_pairs, "judged": few})
    # 7 more held-out pairs, or 4 + 4 more judged responses: the pairs are closer; 7 / 0.2 events
    assert no.refusal == ("too little held-out feedback to decide between m@2 and active m@1: 3 held-out pairs "
                          "(at least 10 needed) and 1 desirable / 1 undesirable responses judged alone (at least 5 "
                          "of each needed); collect about 35 more feedback events (a 20% share of them is held out) "
                          "and promote again")
    assert preference_promotion("m", 2, None, None).passed  # nothing active: nothing to compare with


def _register(args: list, registry, stdin: str | None = None) -> int:
    rec = run_itera("registry", "register", "--name", "tuned", "--registry", registry, *args, stdin=stdin).record
    return rec["params"]["version"]


def test_the_gate_promotes_what_users_preferred_and_refuses_the_worse_and_the_undecidable(teacher, corpus_file,
                                                                                          tmp_path):
    from itera.tokenizer import Tokenizer, fingerprint

    fp = fingerprint(Tokenizer.from_dir(teacher))
    db, small = tmp_path / "fb.db", tmp_path / "small.db"
    _thumbs_store(db, fp, n=60)
    _thumbs_store(small, fp, n=6, seed=1)
    home = {"ITERA_HOME": str(tmp_path / "home")}
    dpo = run_itera("dpo-train", "--model", teacher, "--feedback-db", db, "--steps", "30", "--batch-size", "8",
                    "--lr", "2e-3", "--beta", "0.5", "--holdout", "0.5", "--merge", "--out", tmp_path / "dpo",
                    env=home).stdout
    reg = tmp_path / "registry.db"
    ev = ["evaluate", "-d", corpus_file, "--max-tokens", "300"]
    assert _register([], reg, run_itera(*ev, "--model", teacher).stdout) == 1
    assert _register([], reg, run_itera(*ev, stdin=dpo).stdout) == 2
    run_itera("registry", "activate", "tuned@1", "--registry", reg).record

    gate = ["--metric", "preference", "--registry", reg]
    rec = run_itera("registry", "promote", "tuned@2", "--feedback-db", db, *gate, "--metric", "perplexity",
                    "--max-regression", "50%", env=home).record
    g = rec["params"]["gate"]
    assert g["metric"] == "preference" and g["verdict"] == "better" and g["active_version"] == 1
    j = g["judged"]
    # the held-out half of the 60 thumbs: the tuned model's split redone, nothing it trained on
    assert g["trained_by"] == {"holdout": 0.5, "seed": 0, "loss": "auto"}
    assert 15 <= j["desirable"] + j["undesirable"] <= 45 and g["pairs"]["n"] == 0
    assert j["ci95"][0] > 0 and j["verdict"] == "better", j
    ppl = g["also"][0]  # the second gate: perplexity on generic text, within the 50% allowed
    assert ppl["metric"].endswith("perplexity") and ppl["regression"] <= 0.5 and ppl["active_version"] == 1
    assert "active" in rec["params"]["aliases"]

    # the base over the tuned model: every one of its 60 examples held out (the base trained on none)
    refused = run_itera("registry", "promote", "tuned@1", "--feedback-db", db, *gate, env=home)
    assert refused.returncode == 3, refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("itera: error: promotion refused: tuned@1 is worse than active tuned@2 at what users preferred: "
                           "desirable-minus-undesirable margin -"), line
    assert "on 30+30 held-out judged responses" in line and line.endswith("tuned@active stays at version 2")

    # six thumbs cannot decide: refused, saying how much more feedback it takes
    refused = run_itera("registry", "promote", "tuned@1", "--feedback-db", small, *gate, env=home)
    assert refused.returncode == 3
    assert "too little held-out feedback to decide between tuned@1 and active tuned@2: 0 held-out pairs" in \
        refused.stderr and "collect about" in refused.stderr, refused.stderr
    hist = json.loads(run_itera("registry", "history", "tuned", "--json", "--registry", reg).stdout)
    events = [e["event"] for e in (hist["events"] if isinstance(hist, dict) else hist)]
    assert events.count("promote-refused") == 2
    assert run_itera("registry", "resolve", "tuned@active", "--registry", reg).stdout.strip().endswith("merged")


def test_a_measurement_against_another_active_version_is_refused_and_nothing_moves(tmp_path, tokenizer_dir):
    from conftest import save_tiny
    from itera.errors import InputError
    from itera.registry import Ref, Registry

    reg = tmp_path / "registry.db"
    for i in (1, 2):
        ckpt = save_tiny(tmp_path / f"m{i}", tokenizer_dir, seed=i)
        run_itera("registry", "register", "--name", "m", "--path", ckpt, "--registry", reg).record
    run_itera("registry", "activate", "m@1", "--registry", reg).record
    stale = {"candidate_version": 2, "active_version": None, "holdout": 1.0,
             "pairs": pair_statistic([1.0] * 20), "judged": judged_statistic([], [])}
    with Registry(reg) as r:
        for measured in (stale, None):  # measured while nothing was active; or not measured at all
            with pytest.raises(InputError, match=r"^m@active is version 1, but the preference gate measured version 2 "
                                                 r"against no active version; nothing changed: promote again$"):
                r.promote(Ref("m", "2"), ["preference"], 0.0, preference=measured)
        assert r.alias("m", "active") == 1
        assert r.promote(Ref("m", "2"), ["preference"], 0.0, preference={**stale, "active_version": 1})["gate"][
            "verdict"] == "better"
        assert r.alias("m", "active") == 2
