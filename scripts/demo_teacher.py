"""Train the demo model from scratch on the built-in corpus and save it as a checkpoint.

    python scripts/demo_teacher.py [--config configs/demo.yaml] --out runs/demo/teacher

Prints progress on stderr and the checkpoint path on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

from itera.data import load_text
from itera.model.checkpoint import save_model
from itera.model.config import ModelConfig
from itera.model.llama import LlamaForCausalLM
from itera.tokenizer import train_bpe
from itera.train import TrainOptions, train_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    spec = yaml.safe_load(args.config.read_text())
    torch.manual_seed(spec["train"].get("seed", 0))

    t0 = time.perf_counter()
    src = load_text(spec["data"], purpose="train")
    tok = train_bpe(src.rows, vocab_size=spec["tokenizer"]["vocab_size"])
    ids = torch.tensor(tok.encode(src.text, add_bos=False), dtype=torch.long)
    print(f"corpus: {src.description}: {len(src.text.encode()):,} bytes, {ids.numel():,} tokens "
          f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)

    cfg = ModelConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **spec["model"])
    model = LlamaForCausalLM(cfg)
    model.init_weights(seed=spec["train"].get("seed", 0))
    opts = TrainOptions(**spec["train"])

    def show(step: int, loss: float) -> None:
        if step % 25 == 0 or step == opts.steps:
            print(f"step {step}/{opts.steps} loss {loss:.3f}", file=sys.stderr)

    stats = train_lm(model, ids, opts, progress=show)
    print(f"trained {model.num_parameters():,} parameters on {stats['tokens_seen']:,} tokens in "
          f"{stats['seconds']:.0f}s ({stats['tokens_per_s']:.0f} tokens/s), loss {stats['first_loss']:.2f} -> "
          f"{stats['final_loss']:.2f}", file=sys.stderr)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok.save(Path(tmp))
        save_model(model, args.out, tokenizer_from=Path(tmp))
    print(args.out)


if __name__ == "__main__":
    main()
