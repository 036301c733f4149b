"""Intermediate-layer (hidden-state) supervision for distillation: ``itera distill --hidden-weight``.

The term pairs student layer i with teacher layer keep[i] through one learned linear map
(:class:`itera.losses.HiddenProjection`); it is off by default, and then the loss path is the
one it always was. Every model here is tiny and made by the test.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from conftest import assert_usage_error, run_itera, save_tiny
from itera.errors import UsageError
from itera.losses import DistillLoss, HiddenProjection, hidden_state_loss
from itera.model.config import ModelConfig
from itera.model.llama import LlamaForCausalLM
from itera.prune import evenly_spaced, init_from_layers, init_from_pruning
from itera.train import Trainer, TrainOptions

VOCAB = 61


@pytest.fixture(autouse=True)
def _one_thread():
    """Models this small train fastest on one thread, and far slower on two when the machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _teacher(layers: int = 4, hidden: int = 32, seed: int = 1) -> LlamaForCausalLM:
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    t = LlamaForCausalLM(cfg)
    t.init_weights(seed=seed, std=0.1)
    return t.requires_grad_(False)


def _student_cfg(layers: int, hidden: int) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)


def _ids(n: int = 3000, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _pruned(teacher: LlamaForCausalLM) -> tuple[LlamaForCausalLM, list[int]]:
    """A narrower (16 of 32) and shallower (2 of 4 layers) student cut out of ``teacher``."""
    keep = evenly_spaced(teacher.config.num_hidden_layers, 2)
    student, _ = init_from_pruning(teacher, _student_cfg(2, 16), keep, [_ids(256).view(4, 64)])
    return student, keep


# --------------------------------------------------------------------------- the model's per-layer states


def test_layers_out_gives_each_layer_output_without_changing_the_result():
    t = _teacher()
    x = _ids(40)[None]
    states: list = []
    with torch.no_grad():
        h = t(x, return_hidden=True, layers_out=states)
        plain = t(x, return_hidden=True)
        logits = t(x)
    assert torch.equal(h, plain) and torch.equal(t.lm_head(h), logits)
    assert len(states) == 4 and all(s.shape == (1, 40, 32) for s in states)
    assert torch.equal(t.model.norm(states[-1]), h)  # the last one is the final norm's input


# --------------------------------------------------------------------------- the loss itself


def test_a_full_layer_copy_with_the_identity_projection_has_zero_hidden_loss():
    t = _teacher()
    keep = [0, 1, 2, 3]
    s = init_from_layers(t, dataclasses.replace(t.config), keep)
    loss = DistillLoss(t, 0.5, 2.0, hidden_weight=1.0, student=s, keep=keep)
    assert torch.equal(loss.projection.weight, torch.eye(32))  # equal embeddings: exactly the identity
    _, logs = loss(s, _ids(4 * 33).view(4, 33))
    assert logs["hidden"] == 0.0
    # a depth-reduced copy: its first layer is still the teacher's first, so that pair is exactly 0
    half = init_from_layers(t, dataclasses.replace(t.config, num_hidden_layers=2), [0, 3])
    s_states, t_states = [], []
    x = _ids(33)[None]
    with torch.no_grad():
        half(x, layers_out=s_states)
        t(x, layers_out=t_states)
    assert hidden_state_loss(s_states[:1], t_states[:1], HiddenProjection.from_embeddings(
        half.model.embed_tokens.weight, t.model.embed_tokens.weight)).item() == 0.0
    assert hidden_state_loss(s_states[1:], t_states[3:], loss.projection).item() > 0


def test_hand_checked_value():
    proj = HiddenProjection(2, 3)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    # pair 1, position 1: P s = (1, 2, 3) against t = (1, 2, 5): squared error 4, |t|^2 30 -> 2/15
    #         position 2: P s = (1, 0, 1) against t = (2, 0, 1): squared error 1, |t|^2 5 -> 1/5; mean 1/6
    # pair 2: s = 0, so the error is t itself at each position -> 1
    s = [torch.tensor([[[1.0, 2.0], [1.0, 0.0]]]), torch.zeros(1, 2, 2)]
    t = [torch.tensor([[[1.0, 2.0, 5.0], [2.0, 0.0, 1.0]]]), torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]]])]
    assert hidden_state_loss(s, t, proj).item() == pytest.approx((1 / 6 + 1) / 2, rel=1e-6)
    # a batch split in two gives the same term (a mean over positions): micro-batches and processes agree
    halves = [hidden_state_loss([x[:, i:i + 1] for x in s], [x[:, i:i + 1] for x in t], proj) for i in (0, 1)]
    assert (halves[0] + halves[1]).item() / 2 == pytest.approx(7 / 12, rel=1e-6)


def test_projection_of_a_pruned_student_starts_as_the_selection_of_its_channels():
    torch.manual_seed(0)
    e_t = torch.randn(VOCAB, 12)
    kept = [1, 4, 6, 11]
    proj = HiddenProjection.from_embeddings(e_t[:, kept].clone(), e_t)
    assert torch.allclose(proj.weight[kept], torch.eye(4), atol=1e-4)
    # and in the loss: a pruned student's embedding-level states are reproduced on the kept channels
    assert torch.allclose(proj(e_t[:, kept])[:, kept], e_t[:, kept], atol=1e-4)


def test_bad_layer_map_and_missing_teacher_are_refused():
    t = _teacher()
    s, _ = _pruned(t)
    with pytest.raises(UsageError, match="--layer-ids"):
        DistillLoss(t, 0.5, 2.0, hidden_weight=1.0, student=s, keep=[0, 1, 2])
    with pytest.raises(UsageError, match="--layer-ids"):
        DistillLoss(t, 0.5, 2.0, hidden_weight=1.0, student=s, keep=[0, 9])
    with pytest.raises(UsageError, match="teacher"):
        DistillLoss(None, 0.0, 2.0, hidden_weight=1.0, student=s, keep=[0, 3])


# --------------------------------------------------------------------------- training


OPTS = dict(steps=4, batch_size=4, seq_len=32, lr=1e-3, warmup_steps=1)


def _state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_hidden_weight_zero_is_the_plain_loss_bit_for_bit_and_captures_nothing(monkeypatch):
    t = _teacher()
    ids = _ids()
    runs = []
    for kwargs in ({}, {"hidden_weight": 0.0}):
        s, keep = _pruned(t)
        loss = DistillLoss(t, 0.5, 2.0, **({**kwargs, "student": s, "keep": keep} if kwargs else {}))
        assert loss.projection is None
        seen = []
        real = LlamaForCausalLM.hidden

        def spy(self, input_ids, cache=None, attention_mask=None, layers_out=None):
            seen.append(layers_out)
            return real(self, input_ids, cache, attention_mask, layers_out)

        monkeypatch.setattr(LlamaForCausalLM, "hidden", spy)
        tr = Trainer(s, loss, ids, TrainOptions(**OPTS), extra=loss.projection)
        tr.run()
        monkeypatch.setattr(LlamaForCausalLM, "hidden", real)
        assert seen and all(x is None for x in seen)  # no per-layer state was asked for
        assert len(tr.optim.param_groups) == 2
        runs.append((_state(s), tr.losses))
    (a, la), (b, lb) = runs
    assert la == lb and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hidden_term_is_trained_and_logged():
    t = _teacher()
    s, keep = _pruned(t)
    loss = DistillLoss(t, 0.5, 2.0, hidden_weight=1.0, student=s, keep=keep)
    w0 = loss.projection.weight.detach().clone()
    logs_seen = []
    tr = Trainer(s, loss, _ids(), TrainOptions(**{**OPTS, "steps": 6}), extra=loss.projection,
                 on_step=lambda step, logs: logs_seen.append(logs))
    tr.run()
    assert len(tr.optim.param_groups) == 3 and tr.optim.param_groups[2]["weight_decay"] == 0.0
    assert not torch.equal(loss.projection.weight, w0)  # the projection learns with the student
    hidden = [g["hidden"] for g in logs_seen]
    assert all(math.isfinite(h) and h > 0 for h in hidden)
    assert hidden[-1] < hidden[0]


def _interrupt_at(step: int):
    def on_step(s, _logs):
        if s == step:
            raise KeyboardInterrupt

    return on_step


def test_a_resumed_run_continues_the_projection_too(tmp_path):
    t = _teacher()
    ids = _ids()
    opts = TrainOptions(**OPTS, save_every=2)

    def trainer(state_dir, on_step=None):
        s, keep = _pruned(t)
        loss = DistillLoss(t, 0.5, 2.0, hidden_weight=1.0, student=s, keep=keep)
        return Trainer(s, loss, ids, opts, state_dir=state_dir, extra=loss.projection, on_step=on_step), s, loss

    whole, s_whole, l_whole = trainer(tmp_path / "whole")
    whole.run()
    first, _, _ = trainer(tmp_path / "cut", _interrupt_at(3))
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert first.saved_step == 2
    again, s_again, l_again = trainer(tmp_path / "cut")
    assert again.load_state() and again.step == 2
    again.run()
    assert torch.equal(l_again.projection.weight, l_whole.projection.weight)
    a, b = s_whole.state_dict(), s_again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_across_hidden_on_and_off_is_refused_in_one_line(tmp_path):
    t = _teacher()
    ids = _ids()
    opts = TrainOptions(**{**OPTS, "steps": 2})
    s, keep = _pruned(t)
    Trainer(s, DistillLoss(t, 0.5, 2.0), ids, opts, state_dir=tmp_path / "plain").run()
    s, keep = _pruned(t)
    loss = DistillLoss(t, 0.5, 2.0, hidden_weight=1.0, student=s, keep=keep)
    tr = Trainer(s, loss, ids, opts, state_dir=tmp_path / "plain", extra=loss.projection,
                 extra_name="the hidden-state projection (--hidden-weight > 0)")
    with pytest.raises(UsageError) as e:
        tr.load_state()
    assert "saved without the hidden-state projection (--hidden-weight > 0)" in str(e.value)
    assert "\n" not in str(e.value)
    Trainer(s, loss, ids, opts, state_dir=tmp_path / "hidden", extra=loss.projection).run()
    s, _ = _pruned(t)
    with pytest.raises(UsageError, match="saved with "):
        Trainer(s, DistillLoss(t, 0.5, 2.0), ids, opts, state_dir=tmp_path / "hidden").load_state()


# --------------------------------------------------------------------------- the command


def _distill(teacher, data, out, *extra):
    return run_itera("distill", "--teacher", teacher, "--data", data, "--out", out, "--layers", "2", "--hidden", "16",
                     "--heads", "2", "--kv-heads", "1", "--ffn", "32", "--steps", "3", "--batch-size", "4",
                     "--seq-len", "32", "--warmup-steps", "1", "--eval-tokens", "128", "--calib-batches", "1",
                     "--device", "cpu", "--threads", "1", *extra, timeout=300)


def _keys_and_shapes(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_cli_run_with_hidden_weight_saves_the_same_student_shape_and_records_the_term(
        tmp_path, tokenizer_dir, corpus_file):
    from itera.record import validate

    teacher = save_tiny(tmp_path / "teacher", tokenizer_dir, num_hidden_layers=4, hidden_size=32,
                        intermediate_size=64)
    plain = _distill(teacher, corpus_file, tmp_path / "plain").record
    hidden = _distill(teacher, corpus_file, tmp_path / "hidden", "--hidden-weight", "1.0").record
    validate(plain), validate(hidden)
    assert _keys_and_shapes(tmp_path / "plain") == _keys_and_shapes(tmp_path / "hidden")
    assert hidden["params"]["hidden_weight"] == 1.0 and plain["params"]["hidden_weight"] == 0.0
    assert hidden["params"]["init"] == "prune"
    m = hidden["metrics"]
    assert math.isfinite(m["final_hidden_loss"]) and m["final_hidden_loss"] > 0
    assert "final_hidden_loss" not in plain["metrics"]
    saved = json.loads((tmp_path / "hidden" / "distill_config.json").read_text())
    assert saved["hidden_weight"] == 1.0


@pytest.mark.parametrize("fields, needle", [
    ({"hidden_weight": -1.0}, "--hidden-weight must be 0 or more"),
    ({"hidden_weight": float("nan")}, "--hidden-weight must be 0 or more"),
    ({"hidden_weight": 1.0, "teacher": None, "alpha": 0.0, "tokenizer": "bpe:300"}, "needs a --teacher"),
])
def test_bad_hidden_weight_is_refused(tmp_path, fields, needle):
    from itera.jobs.distill import DistillOptions

    opts = DistillOptions(data="x.txt", out=tmp_path / "o", teacher=tmp_path / "t", layers=2, hidden=16, heads=2)
    for k, v in fields.items():
        setattr(opts, k, v)
    with pytest.raises(UsageError, match=needle):
        opts.validate()
    opts.hidden_weight = 0.5
    if opts.teacher is not None:
        opts.validate()  # a teacher is all it needs, whatever the init


def test_bad_hidden_weight_on_the_command_line_is_one_line(tmp_path, corpus_file):
    res = run_itera("distill", "--data", corpus_file, "--out", tmp_path / "o", "--teacher", tmp_path / "none",
                    "--layers", "2", "--hidden", "16", "--heads", "2", "--hidden-weight", "-1")
    assert_usage_error(res, "--hidden-weight must be 0 or more")
