from __future__ import annotations

import torch

from itera.model.config import ModelConfig
from itera.model.llama import LlamaForCausalLM
from itera.tokenizer import Tokenizer
from itera.losses import DistillLoss
from itera.train import TrainOptions, Trainer, lr_at


def test_lr_schedule_warms_up_then_decays_to_floor():
    o = TrainOptions(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, o) == 0.1 and lr_at(9, o) == 1.0
    assert abs(lr_at(10, o) - 1.0) < 1e-12 and abs(lr_at(100, o) - 0.1) < 1e-12
    assert all(lr_at(s, o) >= lr_at(s + 1, o) for s in range(10, 100))


def _train(tokenizer_dir, corpus_file, seed):
    tok = Tokenizer.from_dir(tokenizer_dir)
    ids = torch.tensor(tok.encode(corpus_file.read_text(), add_bos=False))
    m = LlamaForCausalLM(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4))
    m.init_weights(seed=0)
    opts = TrainOptions(steps=30, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=3, seed=seed)
    stats = Trainer(m, DistillLoss(None, 0.0, 1.0), ids, opts).run()
    return m, stats


def test_training_lowers_loss_and_is_deterministic(tokenizer_dir, corpus_file):
    a, sa = _train(tokenizer_dir, corpus_file, seed=0)
    b, _ = _train(tokenizer_dir, corpus_file, seed=0)
    assert sa["final_loss"] < 0.7 * sa["first_loss"]
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
