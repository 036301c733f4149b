"""The registry's decisions, as pure functions of versions and their metrics: which way a metric
is better, whether a candidate passes the promotion gate against the active version, whether a
rollback may go ahead, whether a version may be pointed at or archived, what a tag edit changes,
and metrics side by side. No SQL and no I/O: the facade
(:class:`itera.registry.Registry`) reads the rows, asks here, and writes what was decided."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from itera.errors import IteraError, UsageError
from itera.registry.provenance import evaluation_protocol
from itera.registry.refs import ALIAS_COMMANDS, MAX_VERSION

# Metric leaf names whose direction is known: promote compares on the right side.
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss", "kl", "latency", "_ms", "seconds", "j_per_token",
                   "joules", "energy_j", "bytes", "bits_per_weight", "rss", "ttft", "error")
HIGHER_IS_BETTER = ("tokens_per_s", "tokens_per_j", "accuracy", "agreement", "reward_margin", "reward_accuracy",
                    "compression_ratio", "size_ratio")
KEY_METRICS = ("perplexity", "bits_per_byte", "decode_tokens_per_s", "j_per_token", "bits_per_weight",
               "kl_to_source", "top1_agreement", "peak_rss_bytes")


class RefusedError(IteraError):
    """A gate or a safety check said no (promote regression, rollback to a changed artifact)."""

    exit_code = 3


def metric_direction(key: str) -> str:
    """'lower' or 'higher' is better, from the metric's last name component."""
    leaf = key.rsplit(".", 1)[-1]
    if any(leaf == h or leaf.endswith(h) or leaf.startswith(h) for h in HIGHER_IS_BETTER):
        return "higher"
    if any(leaf == lo or leaf.endswith(lo) or leaf.startswith(lo) for lo in LOWER_IS_BETTER):
        return "lower"
    raise UsageError(f"itera does not know whether higher or lower {leaf!r} is better; "
                     "pass --higher-is-better or --lower-is-better")


_CONTENT_HASH = re.compile(r"#[0-9a-f]{8}$")


def plain_metric(key: str) -> str:
    """A metric key with each file named by its name alone, as a person types it:
    ``datasets.notes.txt#3f2a9c1b.perplexity`` and an older record's path-keyed
    ``datasets./home/me/notes.txt.perplexity`` are both ``datasets.notes.txt.perplexity``;
    ``compare.a.gguf#9e1c04d2.decode_tokens_per_s`` is ``compare.a.gguf.decode_tokens_per_s``.
    Other keys (``pydocs@test``, hub names, flat metrics) are themselves."""
    head, _, rest = key.partition(".")
    if head not in ("datasets", "compare") or "." not in rest:
        return key
    name, leaf = rest.rsplit(".", 1)
    if name.startswith("/") or (head == "compare" and "/" in name):  # an older record: a path
        name = name.rstrip("/").rsplit("/", 1)[-1]
    else:
        name = _CONTENT_HASH.sub("", name)
    return f"{head}.{name}.{leaf}"


def is_path_keyed(key: str) -> bool:
    """Whether ``key`` names a file by where it sat (records before content-named files)."""
    head, _, rest = key.partition(".")
    return head in ("datasets", "compare") and rest.startswith("/")


def metric_key(metrics: dict[str, float], metric: str, where: str) -> str:
    """The full key of ``metric`` in ``metrics``: itself, or the one key ending in ``.metric``;
    failing those, the one key whose :func:`plain_metric` is or ends with it (``notes.txt.perplexity``
    for ``datasets.notes.txt#3f2a9c1b.perplexity``). Two contents of one file name are refused."""
    if metric in metrics:
        return metric
    matches = sorted(k for k in metrics if k.endswith("." + metric))
    if not matches:
        matches = sorted(k for k in metrics
                         if (p := plain_metric(k)) == metric or p.endswith("." + metric))
        if len(matches) > 1 and len({plain_metric(k) for k in matches}) == 1:
            raise UsageError(f"metric {metric!r} names {len(matches)} different contents of one file in {where}; "
                             f"pass one in full: {', '.join(matches)}")
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(f"{where} has no metric {metric!r}; it has: {', '.join(sorted(metrics)) or 'none'}")
    raise UsageError(f"metric {metric!r} is ambiguous in {where}; pass one of: {', '.join(matches)}")


def missing_metric(name: str, active_version: int, active_metrics: dict[str, float], key: str) -> str:
    """Why the active version has no figure ``key`` to compare with, in one line: the same file
    name measured on other text, an older record that keyed it by path, or no such figure."""
    label = f"the active version {name}@{active_version}"
    kin = sorted(k for k in active_metrics if plain_metric(k) == plain_metric(key))
    hashed = [k for k in kin if not is_path_keyed(k)]
    if hashed:
        return (f"{label} has no metric {key!r}: its {plain_metric(key)!r} was measured on other contents of that "
                f"file ({', '.join(hashed)}); evaluate both on the same text, or activate the candidate by hand")
    if kin:
        return (f"{label} has no metric {key!r}: its figure {kin[0]!r} comes from an older record that named the file "
                "by its path, not its content, so the two cannot be matched; activate the candidate by hand")
    return f"{label} has no metric {key!r}; evaluate it the same way, or activate the candidate by hand"


def protocol_difference(cand: dict, cur: dict, key: str) -> str | None:
    """Which evaluation setting differs between two versions' figures for ``key`` (None: same)."""
    if not key.startswith("datasets."):
        return None
    pc = evaluation_protocol(cand["record"], cand["sha256"], key)
    pa = evaluation_protocol(cur["record"], cur["sha256"], key)
    if pc is None or pa is None:
        return "no evaluate record says how " + ("the candidate's" if pc is None else "the active one's") + \
            " figure was measured"
    diff = [f"{k} {pc[k]!r} vs {pa[k]!r}" for k in pc if pc[k] != pa.get(k)]
    return ", ".join(diff) or None


@dataclass(frozen=True)
class Promotion:
    """What the gate decided about version ``version`` of ``name``. ``detail`` goes into the audit
    event either way, and is the ``gate`` of the promoted version; ``refusal`` says why not."""

    name: str
    version: int
    active_version: int | None
    detail: dict[str, Any] = field(default_factory=dict)
    refusal: str | None = None

    @property
    def passed(self) -> bool:
        return self.refusal is None

    def gate(self) -> dict[str, Any]:
        return {**self.detail, "passed": True}

    def error(self) -> RefusedError:
        return RefusedError(f"promotion refused: {self.refusal}; {self.name}@active stays at version "
                            f"{self.active_version}")


def promotion_gate(name: str, version: int, candidate: dict, active_version: int | None, active: dict | None,
                   metric: str, max_regression: float, direction: str | None = None,
                   baseline: tuple[int, dict] | None = None) -> Promotion:
    """May ``candidate`` (version ``version`` of ``name``) replace ``active`` (version ``active_version``,
    None when no version is active)? Only if its ``metric`` is no worse than the active one's by
    more than ``max_regression`` (a fraction), both figures measured the same way. ``direction``
    ('lower' or 'higher' is better) defaults to what the metric's name says. ``baseline``
    (version, row): compare with that version instead of the active one (``--baseline``), so that
    regressions within the margin do not compound over promotions.

    Raises UsageError when the two cannot be compared: no such metric, or an ambiguous one, a
    direction itera does not know, an active version without the metric."""
    key = metric_key(candidate["metrics"], metric, f"{name}@{version}")
    direction = direction or metric_direction(key)
    detail: dict[str, Any] = {"metric": key, "direction": direction, "max_regression": max_regression,
                              "candidate": candidate["metrics"][key]}
    role, other_version, other = ("baseline", *baseline) if baseline is not None else ("active", active_version, active)
    if other_version is None:
        return Promotion(name, version, None, {**detail, "reason": "no active version to compare with"})
    if key not in other["metrics"]:
        raise UsageError(missing_metric(name, other_version, other["metrics"], key))
    differs = protocol_difference(candidate, other, key)
    if differs:
        reason = (f"{key} of {name}@{version} and of {role} {name}@{other_version} were measured differently "
                  f"({differs}); evaluate both the same way")
        return Promotion(name, version, active_version, detail, reason)
    a, c = other["metrics"][key], candidate["metrics"][key]
    worse = (c - a) if direction == "lower" else (a - c)
    regression = worse / abs(a) if a != 0 else (0.0 if worse <= 0 else math.inf)
    detail.update({role: a, f"{role}_version": other_version, "regression": regression})
    if regression > max_regression:
        reason = (f"{key} of {name}@{version} is {c:.6g} against {a:.6g} for {role} {name}@{other_version}: "
                  f"{regression:+.2%} worse, more than the allowed {max_regression:.2%}")
        return Promotion(name, version, active_version, detail, reason)
    return Promotion(name, version, active_version, detail)


def combined(decisions: list[Promotion]) -> Promotion:
    """Several gates as one: the first gate's detail with the others' under ``also``; refused with
    the first refusal."""
    first = decisions[0]
    detail = {**first.detail, "also": [d.detail for d in decisions[1:]]} if len(decisions) > 1 else first.detail
    refusal = next((d.refusal for d in decisions if not d.passed), None)
    return Promotion(first.name, first.version, first.active_version, detail, refusal)


def check_rollback_to(to: int | None) -> None:
    """``--to`` must be a version number SQLite can hold."""
    if to is not None and not 1 <= to <= MAX_VERSION:
        raise UsageError(f"--to {to} is not a version number; pass N between 1 and {MAX_VERSION}")


def rollback_problem(name: str, target: int | None, row: dict | None, integrity: str | None) -> str | None:
    """Why ``active`` may not move to version ``target`` of ``name`` (None: it may). ``target`` is
    ``--to`` or the last-good version (None when there is none), ``row`` that version (None when it
    does not exist) and ``integrity`` what is wrong with its artifact now
    (:func:`itera.registry.integrity.integrity_problem`)."""
    if target is None:
        return f"{name} has no last-good version; mark one with `itera registry mark-good {name}@N` or pass --to N"
    if row is None:
        return f"{name} has no version {target} to roll back to"
    if row.get("archived"):
        return f"{name}@{target} is archived; bring it back first with `itera registry unarchive {name}@{target}`"
    return integrity


def rollback_refused(problem: str) -> RefusedError:
    return RefusedError(f"rollback refused: {problem}; aliases unchanged")


def use_problem(label: str, row: dict, integrity: str | None, fix: str) -> str | None:
    """Why an alias may not point at ``row`` (version ``label``) now, with what to do: it is
    archived, or its artifact cannot be trusted (``integrity``, from
    :func:`itera.registry.integrity.integrity_problem`; the fix is to register it again and
    ``fix``, e.g. 'activate the new version'). None: it may."""
    if row.get("archived"):
        return f"{label} is archived; bring it back first with `itera registry unarchive {label}`; aliases unchanged"
    if integrity is not None:
        return f"{integrity}; put it back, or register it again and {fix}; aliases unchanged"
    return None


def archive_problem(label: str, row: dict) -> str | None:
    """Why version ``label`` may not be archived (None: it may): it already is, or an alias points
    at it (``active`` above all: the version being served; an archived version carries no alias)."""
    if row.get("archived"):
        return f"{label} is already archived (since {row['archived']['at']})"
    name = row["name"]
    for alias in row.get("aliases") or ():
        if alias == "active":
            return (f"{label} is active: activate (or promote, or roll back to) another version of {name} "
                    "before archiving it")
        if alias in ALIAS_COMMANDS:
            return (f"{label} is {alias}, the version rollback returns to: mark another version good with "
                    f"`itera registry mark-good {name}@N` before archiving it")
        return (f"{label} is {name}@{alias}: point the alias elsewhere or remove it "
                f"(`itera registry unalias {name} {alias}`) before archiving it")
    return None


def unarchive_problem(label: str, row: dict) -> str | None:
    return None if row.get("archived") else f"{label} is not archived"


def tag_edit(label: str, current: dict[str, str], set_: dict[str, str], remove: list[str]) -> dict[str, Any]:
    """What ``itera registry tag`` changes on a version with tags ``current``: the event's detail
    (``set``: the new values, ``removed``: the keys that go, ``previous``: each touched key's value
    before, None where it had none). Raises UsageError for nothing to do, a key both set and
    removed, or the removal of a tag the version does not have."""
    if not set_ and not remove:
        raise UsageError("nothing to change: pass KEY=VALUE to set a tag, or --remove KEY")
    both = sorted(set(set_) & set(remove))
    if both:
        raise UsageError(f"tag {both[0]!r} is both set and removed; pass one or the other")
    missing = sorted(k for k in remove if k not in current)
    if missing:
        raise UsageError(f"{label} has no tag {missing[0]!r}; its tags: "
                         f"{', '.join(sorted(current)) or 'none'}")
    touched = sorted(set(set_) | set(remove))
    return {"set": dict(sorted(set_.items())), "removed": sorted(set(remove)),
            "previous": {k: current.get(k) for k in touched}}


def compare_order(key: str) -> tuple[int, str]:
    """The artifact's size first, then the figures people compare on, then the rest by name."""
    if key == "bytes":
        return (-1, key)
    leaf = key.rsplit(".", 1)[-1]
    return (KEY_METRICS.index(leaf) if leaf in KEY_METRICS else len(KEY_METRICS), key)


def comparison(versions: list[dict]) -> dict:
    """Metrics of ``versions`` side by side with the size, each with its delta against the first:
    size first, then the figures people compare on (perplexity, bits per byte, speed, energy, bits
    per weight), then everything else alphabetically."""
    labels = [f"{v['name']}@{v['version']}" for v in versions]
    metrics = [{"bytes": v["bytes"], **v["metrics"]} for v in versions]
    keys = sorted(set().union(*metrics), key=compare_order)
    base = metrics[0]
    table = {}
    for k in keys:
        row = {}
        for i, (label, m) in enumerate(zip(labels, metrics)):
            val = m.get(k)
            entry: dict[str, Any] = {"value": val}
            if val is not None and k in base and i:
                entry["delta"] = val - base[k]
                entry["relative"] = (val - base[k]) / abs(base[k]) if base[k] else None
            row[label] = entry
        table[k] = row
    return {"versions": labels, "metrics": table}


# --------------------------------------------------------------------------- the preference gate
#
# ``promote --metric preference`` measures the candidate and the active version on held-out
# feedback (:mod:`itera.registry.preference`) and decides here, from these figures alone:
#
# - pairs (A/B votes, corrections, opposite votes on one prompt): the candidate's implicit reward
#   margin against the active version, (log πc − log πa)(chosen) − (log πc − log πa)(rejected);
#   the reward accuracy is the share of pairs where it is positive (a tie counts half), with a
#   Wilson 95% interval; chance is 0.5.
# - responses judged alone (thumbs, ratings): d = log πc − log πa of each; the margin is the mean d
#   of the desirable ones minus that of the undesirable ones (KTO's notion of better), with a 95%
#   interval from the two groups' variances; chance is 0.
#
# A statistic with too few examples (MIN_PAIRS, MIN_JUDGED of each kind) does not vote. The
# candidate passes when some statistic's interval lies above chance and none lies below it; it is
# refused as worse when one lies below, and as undecided otherwise, with how many held-out
# examples would decide at the effect seen.

Z95 = 1.959963984540054
MIN_PAIRS = 10  # held-out pairs below which reward accuracy does not vote (one pair moves it 10 points)
MIN_JUDGED = 5  # held-out responses judged alone, of each kind, below which the margin does not vote


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n``."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _verdict(lo: float, hi: float, chance: float, enough: bool) -> str:
    if not enough:
        return "too few"
    return "better" if lo > chance else ("worse" if hi < chance else "undecided")


def pair_statistic(margins: list[float]) -> dict[str, Any]:
    """Reward accuracy of the candidate against the active version on held-out pairs."""
    n = len(margins)
    wins = sum(m > 0 for m in margins) + 0.5 * sum(m == 0 for m in margins)
    acc = wins / n if n else None
    lo, hi = wilson(wins, n)
    out = {"n": n, "wins": wins, "reward_accuracy": acc, "ci95": [lo, hi],
           "mean_margin": math.fsum(margins) / n if n else None,
           "verdict": _verdict(lo, hi, 0.5, n >= MIN_PAIRS), "needed": None}
    if n < MIN_PAIRS:
        out["needed"] = MIN_PAIRS
    elif out["verdict"] == "undecided" and acc > 0.5:  # n where z·sqrt(p(1-p)/n) < p - 0.5
        out["needed"] = max(n + 1, math.ceil(Z95 ** 2 * acc * (1 - acc) / (acc - 0.5) ** 2))
    return out


def _mean_var(xs: list[float]) -> tuple[float, float]:
    m = math.fsum(xs) / len(xs)
    return m, (math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0)


def judged_statistic(desirable: list[float], undesirable: list[float]) -> dict[str, Any]:
    """The desirable-minus-undesirable margin of log πc − log πa on held-out responses judged alone."""
    nd, nu = len(desirable), len(undesirable)
    out: dict[str, Any] = {"desirable": nd, "undesirable": nu, "margin": None, "ci95": None,
                           "verdict": "too few", "needed": None}
    if nd and nu:
        (md, vd), (mu, vu) = _mean_var(desirable), _mean_var(undesirable)
        se = math.sqrt(vd / nd + vu / nu)
        margin = md - mu
        lo, hi = margin - Z95 * se, margin + Z95 * se
        out.update(margin=margin, ci95=[lo, hi], desirable_mean=md, undesirable_mean=mu,
                   verdict=_verdict(lo, hi, 0.0, min(nd, nu) >= MIN_JUDGED))
        if out["verdict"] == "undecided" and margin > 0:  # the standard error shrinks as 1/sqrt(n)
            out["needed"] = max(nd + nu + 1, math.ceil((nd + nu) * (Z95 * se / margin) ** 2))
    if min(nd, nu) < MIN_JUDGED:
        out["needed"] = 2 * MIN_JUDGED
    return out


def _pairs_text(s: dict) -> str:
    lo, hi = s["ci95"]
    return f"reward accuracy {s['reward_accuracy']:.2f} [{lo:.2f}, {hi:.2f}] on {s['n']} held-out pairs"


def _judged_text(s: dict) -> str:
    lo, hi = s["ci95"]
    return (f"desirable-minus-undesirable margin {s['margin']:+.3f} [{lo:+.3f}, {hi:+.3f}] nats on "
            f"{s['desirable']}+{s['undesirable']} held-out judged responses")


def preference_promotion(name: str, version: int, active_version: int | None, measured: dict | None) -> Promotion:
    """May version ``version`` of ``name`` replace the active one, judged by what users preferred?
    ``measured`` is :func:`itera.registry.preference.measure`'s result (None when no version is active)."""
    if active_version is None or measured is None:
        return Promotion(name, version, None, {"metric": "preference", "reason": "no active version to compare with",
                                               "summary": "no active version to compare with"})
    pairs, judged = measured.get("pairs"), measured.get("judged")
    shown = [(s, t) for s, t in ((pairs, _pairs_text), (judged, _judged_text)) if s and s["verdict"] != "too few"]
    voting, texts = [s for s, _ in shown], [t(s) for s, t in shown]
    detail = {"metric": "preference", **measured, "active_version": active_version,
              "summary": "; ".join(texts) or "too little held-out feedback"}
    cand, act = f"{name}@{version}", f"active {name}@{active_version}"
    if not voting:
        n_p = pairs["n"] if pairs else 0
        nd, nu = (judged["desirable"], judged["undesirable"]) if judged else (0, 0)
        share = measured.get("holdout") or 1.0
        short = min(MIN_PAIRS - n_p, max(0, MIN_JUDGED - nd) + max(0, MIN_JUDGED - nu))
        more = math.ceil(max(short, 1) / share)
        detail.update(verdict="too few", needed_events=more)
        return Promotion(name, version, active_version, detail,
                         f"too little held-out feedback to decide between {cand} and {act}: {n_p} held-out pairs "
                         f"(at least {MIN_PAIRS} needed) and {nd} desirable / {nu} undesirable responses judged alone "
                         f"(at least {MIN_JUDGED} of each needed); collect about {more} more feedback events "
                         f"(a {share:.0%} share of them is held out) and promote again")
    if any(s["verdict"] == "worse" for s in voting):
        detail["verdict"] = "worse"
        return Promotion(name, version, active_version, detail,
                         f"{cand} is worse than {act} at what users preferred: {detail['summary']}")
    if any(s["verdict"] == "better" for s in voting):
        detail["verdict"] = "better"
        return Promotion(name, version, active_version, detail)
    needed = [s["needed"] for s in voting if s.get("needed")]
    detail.update(verdict="undecided", needed_examples=min(needed) if needed else None)
    tail = (f"; about {min(needed)} held-out examples would decide at the effect seen" if needed
            else f"; {cand} shows no gain")
    return Promotion(name, version, active_version, detail,
                     f"held-out feedback does not show {cand} better than {act}: {detail['summary']}{tail}")
