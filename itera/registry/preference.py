"""What ``itera registry promote --metric preference`` measures: the candidate and the active
version, each in the runtime that ships it, on feedback the candidate did not train on.

Held out: the serving store's events become examples as ``dpo-train --loss auto`` makes them
(pairs, and responses judged alone). When the candidate's lineage holds the ``dpo-train`` run that
made it, that run's split is redone (its seed, ``--holdout``, ``--loss``, rating threshold and
``--min-rating-gap``: the split is a hash of each example's text) and every example with a
response the run could have trained on is left out; the rest, held-out examples and feedback that
arrived later, is what the gate judges. Without a ``dpo-train`` in the lineage every example is
held out. Only feedback on responses made with the candidate's tokenizer counts (others are
counted and skipped), and the two versions must share a tokenizer.

Each response is scored as training scores it: log π(response | prompt), the end-of-turn token
included when the response ended. :func:`itera.registry.policy.preference_promotion` decides.
"""

from __future__ import annotations

import math
from pathlib import Path

from itera.errors import InputError
from itera.record import ancestors


def training_run(record: dict | None) -> dict | None:
    """The nearest ``dpo-train`` record in a version's lineage (None: it was not tuned on feedback)."""
    return next((n for n in ancestors(record, include_self=True) if n.get("command") == "dpo-train"), None)


def trained_responses(events: list[dict], run: dict | None) -> set[tuple[str, str]]:
    """(prompt, response) of every example ``run`` could have trained on, redone from ``events``."""
    from itera.preference import examples_from_events, split_pairs, split_singles

    if run is None:
        return set()
    p, m = run.get("params") or {}, run.get("metrics") or {}
    loss = p.get("loss", "sigmoid")  # records older than --loss trained pairs with DPO
    mode = {"auto": "auto", "kto": "kto"}.get(loss, "pairs")
    seed = (p.get("train") or {}).get("seed", 0)
    pairs, singles, _ = examples_from_events(events, mode, p.get("min_rating_gap", 1.0), m.get("rating_threshold"))
    train_p, _ = split_pairs(pairs, p.get("holdout", 0.1), seed)
    train_s, _ = split_singles(singles, p.get("holdout", 0.1), seed)
    seen = {(x.prompt, x.response) for x in train_s}
    seen.update((x.prompt, r) for x in train_p for r in (x.chosen, x.rejected))
    return seen


def heldout_examples(events: list[dict], run: dict | None):
    """(pairs, singles, dropped) the gate judges: ``auto`` examples with no response ``run`` trained on."""
    from itera.preference import default_threshold, examples_from_events

    threshold = (run.get("metrics") or {}).get("rating_threshold") if run else None
    gap = (run.get("params") or {}).get("min_rating_gap", 1.0) if run else 1.0
    pairs, singles, dropped = examples_from_events(events, "auto", gap, default_threshold(events, threshold))
    seen = trained_responses(events, run)
    held_p = [x for x in pairs if (x.prompt, x.chosen) not in seen and (x.prompt, x.rejected) not in seen]
    held_s = [x for x in singles if (x.prompt, x.response) not in seen]
    return held_p, held_s, dropped


def _logps(runtime, seqs: list[tuple[list[int], int]]) -> list[float]:
    """log π of the last ``n`` tokens of each sequence."""
    return [-math.fsum(runtime.nll(ids, n)) for ids, n in seqs]


def _sequences(tok, pairs, singles) -> list[tuple[list[int], int]]:
    """(prompt + response ids, response length) of each pair's chosen and rejected response, then of
    each response judged alone."""
    from itera.preference import prompt_ids, response_ids

    sides = [(x.prompt, x.chat, r, e) for x in pairs for r, e in ((x.chosen, x.chosen_end),
                                                                  (x.rejected, x.rejected_end))]
    sides += [(x.prompt, x.chat, x.response, x.end) for x in singles]
    out = []
    for prompt, chat, response, end in sides:
        r = response_ids(tok, response, end)
        out.append((prompt_ids(tok, prompt, chat) + r, len(r)))
    return out


def measure(candidate: dict, candidate_path: Path, active: dict, active_path: Path, feedback_db,
            threads: int | None = None, progress=lambda msg: None) -> dict:
    """Score held-out feedback with both versions (rows of the registry, their local paths);
    returns the figures :func:`itera.registry.policy.preference_promotion` decides on."""
    from itera.feedback import read_events
    from itera.pg import mask
    from itera.registry.policy import judged_statistic, pair_statistic
    from itera.runtime import open_runtime
    from itera.tokenizer import fingerprint

    where = mask(feedback_db)
    events = read_events(feedback_db)
    run = training_run(candidate.get("record"))
    params = (run or {}).get("params") or {}
    label_c, label_a = f"{candidate['name']}@{candidate['version']}", f"{active['name']}@{active['version']}"
    with open_runtime(Path(candidate_path), threads=threads) as rt:
        fp = fingerprint(rt.tokenizer)
        ours = [ev for ev in events if all(f in (None, fp) for f in (ev.get("tokenizer"), ev.get("b_tokenizer")))]
        pairs, singles, dropped = heldout_examples(ours, run)
        seqs = _sequences(rt.tokenizer, pairs, singles)
        too_long = sum(len(ids) > rt.max_context for ids, _ in seqs)
        if too_long:
            raise InputError(f"{too_long} held-out feedback examples in {where} are longer than "
                             f"{label_c}'s context ({rt.max_context} tokens); they cannot be scored")
        progress(f"preference gate: scoring {len(seqs)} held-out responses with candidate {label_c}")
        cand = _logps(rt, seqs)
    with open_runtime(Path(active_path), threads=threads) as rt:
        if fingerprint(rt.tokenizer) != fp:
            raise InputError(f"{label_a} and {label_c} tokenize text differently; the preference gate compares "
                             "two versions of one model: promote with --metric perplexity instead")
        progress(f"preference gate: scoring {len(seqs)} held-out responses with active {label_a}")
        act = _logps(rt, seqs)
    d = [c - a for c, a in zip(cand, act)]
    margins = [d[2 * i] - d[2 * i + 1] for i in range(len(pairs))]
    rest = d[2 * len(pairs):]
    desirable = [x for x, s in zip(rest, singles) if s.desirable]
    undesirable = [x for x, s in zip(rest, singles) if not s.desirable]
    return {"store": where, "events": len(events), "events_other_tokenizer": len(events) - len(ours),
            "examples_dropped": dict(dropped), "tokenizer": fp,
            "candidate_version": candidate["version"], "active_version": active["version"],
            "trained_by": {"holdout": params.get("holdout"), "seed": (params.get("train") or {}).get("seed"),
                           "loss": params.get("loss")} if run else None,
            "holdout": params.get("holdout") if run else 1.0,
            "pairs": pair_statistic(margins), "judged": judged_statistic(desirable, undesirable)}
