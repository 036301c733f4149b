"""The teacher cache (itera distill cache / --teacher-cache): the sparse top-K loss against the
dense one, a cached student against one taught by the live teacher cut to the same K, a GGUF
teacher through llama.cpp, and refusals of a cache that does not belong to the run."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import SMALL, assert_usage_error, run_itera
from itera.losses import REST_FLOOR, DistillLoss, SparseDistillLoss, bucket_logp, divergence, kl_div, student_bucket_logp
from itera.model.config import ModelConfig
from itera.model.llama import LlamaForCausalLM
from itera.teacher_cache import REST_BETAS, Targets, top_k, torch_teacher, window_grid

K = 8


def _tiny(seed: int, vocab: int = 50, layers: int = 2) -> LlamaForCausalLM:
    m = LlamaForCausalLM(ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    m.init_weights(seed=seed, std=0.2)
    return m


# ------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_loss_with_every_token_kept_is_the_dense_loss(kind, temperature):
    """K = the vocabulary: the rest bucket is empty, so the sparse loss (tempering included) must be
    the dense one on the same windows, to float precision."""
    teacher, student = _tiny(1), _tiny(2)
    ids = torch.randint(0, 50, (400,), generator=torch.Generator().manual_seed(0))
    windows = window_grid(ids, 16)
    rows = torch.tensor([0, 3, 5, 7])
    live = torch_teacher(teacher, 50, 50)
    sparse = SparseDistillLoss(windows, lambda r, x: Targets(*live(x)), 50, 0.5, temperature, kind, 0.3, chunk=5)
    dense = DistillLoss(teacher, 0.5, temperature, kind, 0.3, chunk=7)
    a, logs_a = sparse(student, rows)
    b, logs_b = dense(student, windows[rows])
    assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)
    assert logs_a["kl"] == pytest.approx(logs_b["kl"], rel=1e-4, abs=1e-7)


def test_top_k_ignores_padded_rows_and_keeps_the_rest_mass():
    """Rows past the tokenizer (a padded embedding table) are not tokens, however large their
    logits; the K ids' probabilities plus the rest's mass are 1."""
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    logits[:, 8:] = 50.0  # padding rows the tokenizer never produces
    ids, logp, rest, powers = top_k(logits, 3, 8)
    assert int(ids.max()) < 8
    total = torch.logsumexp(torch.cat([logp, rest[:, None]], -1), -1)
    assert torch.allclose(total, torch.zeros(3), atol=1e-5)
    full = torch.log_softmax(logits[:, :8], -1)
    assert torch.allclose(logp, full.gather(-1, ids))
    others = full.scatter(-1, ids, float("-inf"))
    for g, b in enumerate(REST_BETAS):  # the rest's power sums, log sum_rest p^b
        assert torch.allclose(powers[:, g], (others * b).logsumexp(-1), atol=1e-5)


@pytest.mark.parametrize("temperature", [2.0, 4.0, 1.5, 2.5, 6.0])
def test_tempering_with_the_rest_power_sums_is_exact_on_the_grid_and_tight_between(temperature):
    """A peaked teacher whose rest is far from flat: with the cached power sums the tempered rest
    is exact at T = 4, 3, 2, 1.5 and between them an upper bound much closer than the flat
    assumption's."""
    logits = torch.randn(4, 200, generator=torch.Generator().manual_seed(3)) * 4
    ids, logp, rest, powers = top_k(logits, 8, 200)
    dense = torch.log_softmax(torch.log_softmax(logits, -1) / temperature, -1)
    want = torch.cat([dense.gather(-1, ids), dense.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)], -1)
    got = bucket_logp(logp, rest, 192, temperature, powers)
    flat = bucket_logp(logp, rest, 192, temperature)
    err, err_flat = (got - want)[..., -1], (flat - want)[..., -1]
    if 1 / temperature in [pytest.approx(b) for b in REST_BETAS]:
        assert torch.allclose(got, want, atol=1e-5)
    else:
        assert (err >= -1e-5).all()  # an upper bound on the rest's tempered share
    assert (err_flat > 0.02).all() and (err.abs() < 0.5 * err_flat).all()
    assert torch.allclose(got.exp().sum(-1), torch.ones(4), atol=1e-5)


def test_tempered_buckets_are_exact_when_the_rest_is_flat():
    """A distribution whose tokens outside the top K share their mass evenly: the tempered buckets
    equal the dense tempered distribution gathered into the same buckets."""
    p = torch.tensor([0.5, 0.3, 0.05, 0.05, 0.05, 0.05])
    logp = p.log()
    tempered = torch.log_softmax(logp / 2.0, -1)
    want = torch.cat([tempered[:2], tempered[2:].logsumexp(-1, keepdim=True)])
    rest = p[2:].sum().log()
    got = bucket_logp(logp[:2], rest, 4, 2.0)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_student_buckets_agree_with_the_dense_distribution(temperature):
    """The student's rest bucket, taken as 1 - (the K ids' mass), is the dense tempered
    distribution's mass outside the K ids (to float32's precision), never below the floor; a padded head's
    extra rows are not part of the distribution."""
    z = torch.randn(3, 5, 60, generator=torch.Generator().manual_seed(0)) * 3
    ids = z[..., :50].topk(8, -1).indices
    dense = torch.log_softmax(z[..., :50] / temperature, -1)
    want = torch.cat([dense.gather(-1, ids), dense.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)], -1)
    got = student_bucket_logp(z, ids, 50, temperature)
    assert torch.allclose(got[..., :-1], want[..., :-1], atol=1e-5)
    # the rest's mass, to float32's absolute precision on 1 - sum; never below the floor
    assert torch.allclose(got[..., -1].exp(), want[..., -1].exp().clamp(min=REST_FLOOR), atol=2e-6)
    assert (got[..., -1] >= math.log(REST_FLOOR) - 1e-6).all()
    assert torch.allclose(got.exp().sum(-1), torch.ones(3, 5), atol=1e-5)


def test_jsd_against_a_hand_computed_value():
    """JSD(beta) on two-point distributions, computed by hand: p = (0.9, 0.1), q = (0.5, 0.5),
    beta = 0.5: m = (0.7, 0.3); 0.5 KL(p||m) + 0.5 KL(q||m)."""
    p, q = torch.tensor([0.9, 0.1]).log(), torch.tensor([0.5, 0.5]).log()
    kl_pm = 0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)
    kl_qm = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    assert divergence(p, q, "jsd", 0.5).item() == pytest.approx(0.5 * kl_pm + 0.5 * kl_qm, rel=1e-6)
    assert divergence(p, q, "forward").item() == pytest.approx(kl_div(p, q).item())
    assert divergence(p, q, "reverse").item() == pytest.approx(kl_div(q, p).item())


# ------------------------------------------------------------------------------- the CLI


def _cache(teacher, corpus, out, *args):
    return run_itera("distill", "cache", "--teacher", teacher, "--data", corpus, "--out", out,
                     "--seq-len", "48", "--top-k", str(K), *args)


def _student(corpus, out, *args):
    return run_itera("distill", "--data", corpus, "--out", out, "--student", "quarter", "--steps", "12",
                     "--eval-tokens", "1024", *SMALL, *args)


@pytest.fixture(scope="module")
def built(teacher, distill_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tcache") / "cache"
    rec = _cache(teacher, distill_corpus, out).record
    return out, rec


def test_cached_student_equals_the_live_top_k_student(built, teacher, distill_corpus, tmp_path):
    """The same init, windows and steps: a student taught from the cache and one taught by the live
    teacher cut to the same K end with the same weights, up to the cache's float16 log-probabilities
    (measured: max weight difference about 1e-4)."""
    cache, rec = built
    m = rec["metrics"]
    assert m["top_k"] == K and m["vocab"] == 400 and m["windows"] == m["tokens"] // 48
    assert rec["artifact"]["kind"] == "teacher-cache" and m["bytes"] == rec["artifact"]["bytes"] - sum(
        f.stat().st_size for f in cache.rglob("*") if f.is_file() and not f.name.startswith("shard-"))
    common = ["--teacher", teacher, "--init", "prune", "--alpha", "0.7", "--seed", "3"]
    a = _student(distill_corpus, tmp_path / "cached", *common, "--teacher-cache", cache).record
    b = _student(distill_corpus, tmp_path / "live", *common, "--top-k", str(K)).record
    assert a["metrics"]["teacher_cache"]["hit"] is True and "teacher_cache" not in b["metrics"]
    wa, wb = load_file(tmp_path / "cached" / "model.safetensors"), load_file(tmp_path / "live" / "model.safetensors")
    assert wa.keys() == wb.keys()
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert diff < 2e-3, diff
    pa, pb = a["metrics"]["student_perplexity"], b["metrics"]["student_perplexity"]
    assert pa == pytest.approx(pb, rel=2e-3)
    # and the teacher was needed for neither's loss: the cached run's training was faster
    assert a["metrics"]["final_loss"] == pytest.approx(b["metrics"]["final_loss"], rel=2e-3)


def test_a_student_of_the_cache_alone_takes_its_tokenizer(built, distill_corpus, teacher, tmp_path):
    """No --teacher: the student's shape comes from the cache's config (quarter of the teacher),
    its tokenizer is the cache's, and it learns."""
    cache, _ = built
    rec = _student(distill_corpus, tmp_path / "s", "--teacher-cache", cache, "--top-k", "4").record
    m = rec["metrics"]
    assert rec["params"]["init"] == "random" and m["teacher_cache"]["top_k_used"] == 4
    assert m["student_perplexity"] < m["init_student_perplexity"] / 2
    assert (tmp_path / "s" / "tokenizer.json").read_bytes() == (teacher / "tokenizer.json").read_bytes()
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["vocab_size"] == 400


def _other_tokenizer(src, dst):
    """A copy of the teacher whose tokenizer swaps two tokens' ids (same size, another tokenizer)."""
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


def test_a_cache_that_does_not_belong_to_the_run_is_refused(built, teacher, distill_corpus, tmp_path):
    cache, _ = built
    other_text = tmp_path / "other.txt"
    other_text.write_text(distill_corpus.read_text()[: -2000])
    other_teacher = tmp_path / "teacher2"
    shutil.copytree(teacher, other_teacher)
    w = load_file(other_teacher / "model.safetensors")
    from safetensors.torch import save_file

    w["model.norm.weight"] = w["model.norm.weight"] * 1.01
    save_file(w, other_teacher / "model.safetensors", metadata={"format": "pt"})
    cases = [
        (["--teacher", other_teacher], "was built with another teacher"),
        (["--teacher", _other_tokenizer(teacher, tmp_path / "teacher3")], "was built with another tokenizer"),
        (["--data", other_text], "was built with another training text"),
        (["--seq-len", "32"], "was built with another --seq-len (sequence layout) (48 here, 32 now)"),
        (["--holdout", "0.1"], "was built with another --holdout (0.05 here, 0.1 now)"),
        (["--top-k", "9"], f"--top-k 9 is more than the {K} ids per position"),
    ]
    for args, needle in cases:
        data = [] if "--data" in args else ["--data", distill_corpus]
        teach = [] if "--teacher" in args else ["--teacher", teacher]
        res = run_itera("distill", *teach, *data, "--out", tmp_path / "s", "--student", "quarter", "--steps", "2",
                        *SMALL, *args, "--teacher-cache", cache)
        assert_usage_error(res, needle)
        assert not (tmp_path / "s").exists()


def test_truncated_corrupt_or_unfinished_caches_are_refused(built, distill_corpus, tmp_path):
    cache, _ = built
    shard = sorted(cache.glob("shard-*.bin"))[0].name
    cases = {}
    t = shutil.copytree(cache, tmp_path / "truncated")
    (t / shard).write_bytes((t / shard).read_bytes()[:-10])
    cases[t] = f"has a truncated or altered shard {shard}"
    c = shutil.copytree(cache, tmp_path / "corrupt")
    raw = bytearray((c / shard).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (c / shard).write_bytes(bytes(raw))
    cases[c] = f"has a corrupt shard {shard}"
    u = shutil.copytree(cache, tmp_path / "unfinished")
    (u / "manifest.json").unlink()
    cases[u] = "holds no manifest.json"
    for path, needle in cases.items():
        res = run_itera("distill", "--teacher-cache", path, "--data", distill_corpus, "--out", tmp_path / "s",
                        "--student", "quarter", "--steps", "2", *SMALL)
        line = assert_usage_error(res, needle)
        assert "itera distill cache" in line
        assert not (tmp_path / "s").exists()
    res = run_itera("distill", "--teacher-cache", tmp_path / "none", "--data", distill_corpus, "--out",
                    tmp_path / "s", "--student", "quarter", *SMALL)
    assert_usage_error(res, "does not exist; build it with `itera distill cache`")


def test_an_existing_out_is_refused_and_a_failed_build_leaves_nothing(built, teacher, distill_corpus, tmp_path):
    cache, _ = built
    assert_usage_error(_cache(teacher, distill_corpus, cache), "already exists")
    assert_usage_error(_cache(teacher, distill_corpus, tmp_path / "c", "--top-k", "401"),
                       "--top-k 401 is more than the tokenizer's 400 tokens")
    assert list(tmp_path.iterdir()) == []


def test_a_gguf_teacher_through_llama_cpp_gives_the_same_cache(built, teacher, distill_corpus, tmp_path,
                                                                tokenizer_dir):
    """The teacher exported to GGUF F32 and run by llama.cpp: the same top-K ids at (nearly) every
    position, log-probabilities within float16 rounding plus the runtimes' difference; a GGUF
    with another tokenizer than --tokenizer is refused."""
    from itera.teacher_cache import TeacherCache

    gguf = tmp_path / "t.gguf"
    run_itera("export", "--model", teacher, "--format", "gguf", "--gguf-type", "F32", "--out", gguf).record
    rec = _cache(gguf, distill_corpus, tmp_path / "g", "--tokenizer", teacher).record
    assert rec["metrics"]["runtime"] == "llama.cpp"
    a, b = TeacherCache.open(built[0]).load(), TeacherCache.open(tmp_path / "g").load()
    assert a.ids.shape == b.ids.shape
    same_top1 = (a.ids[..., 0] == b.ids[..., 0]).mean()
    assert same_top1 > 0.99, same_top1
    agree = a.ids == b.ids
    assert agree.mean() > 0.95
    assert abs(a.logp.astype("f4")[agree] - b.logp.astype("f4")[agree]).max() < 0.02
    res = _cache(gguf, distill_corpus, tmp_path / "bad", "--tokenizer", tokenizer_dir)
    assert_usage_error(res, "does not share --tokenizer's vocabulary")
    assert not (tmp_path / "bad").exists()
    assert_usage_error(_cache(gguf, distill_corpus, tmp_path / "bad"), "a GGUF teacher", "needs --tokenizer")
