from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from itera.cli._options import Device, Force, MetricsOut, ModelPath, TrainDtype, execute, model_input


def dpo_train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the adapter (and merged/ with --merge).")],
    model: ModelPath = None,
    pairs: Annotated[Optional[Path], typer.Option(help="JSONL of {prompt, chosen, rejected}.")] = None,
    feedback: Annotated[Optional[Path], typer.Option(help="JSONL of feedback events (thumbs, ab, correction, "
                                                     "rating) to turn into pairs.")] = None,
    feedback_db: Annotated[Optional[str], typer.Option(
        metavar="PATH|URL", help="The store `itera serve` writes (responses and the feedback posted on them) to turn "
        "into pairs: a SQLite file, or postgresql://USER@HOST:PORT/DB where several servers write; `default` reads "
        "the server's default, $ITERA_HOME/feedback.db.")] = None,
    from_version: Annotated[Optional[int], typer.Option(help="With --feedback-db: only the feedback on responses "
                                                        "registry version N served.")] = None,
    since: Annotated[Optional[str], typer.Option(help="With --feedback-db: only the feedback posted since this "
                                                 "time (ISO 8601, UTC unless it says; e.g. 2026-12-01).")] = None,
    beta: Annotated[float, typer.Option(help="DPO temperature on the reward margin.")] = 0.1,
    loss: Annotated[str, typer.Option(help="auto: pairs with DPO (sigmoid) and responses judged alone (a thumbs "
                                      "with no opposite vote, a rating) with KTO, in one run; sigmoid (DPO) or ipo: "
                                      "pairs only; kto: every example alone (a pair's winner desirable, its loser "
                                      "not).")] = "auto",
    desirable_weight: Annotated[float, typer.Option(help="KTO's weight on desirable responses (raise it when "
                                                    "they are fewer).")] = 1.0,
    undesirable_weight: Annotated[float, typer.Option(help="KTO's weight on undesirable responses.")] = 1.0,
    rating_threshold: Annotated[Optional[float], typer.Option(help="A rating no pair uses is desirable above this, "
                                                              "undesirable below (default: the middle of the "
                                                              "ratings seen).")] = None,
    label_smoothing: Annotated[float, typer.Option(help="Conservative DPO: assumed label noise.")] = 0.0,
    lm_data: Annotated[Optional[str], typer.Option(
        metavar="DATA", help="Mix language modelling on this text into every step (a file, pydocs@train, or a hub "
        "name): the text the model was trained on keeps its perplexity while the preferences move it.")] = None,
    lm_weight: Annotated[float, typer.Option(help="With --lm-data: the weight of its next-token loss.")] = 1.0,
    lm_seq_len: Annotated[int, typer.Option(help="With --lm-data: tokens per window of its text.")] = 128,
    lora_rank: Annotated[int, typer.Option()] = 8,
    lora_alpha: Annotated[float, typer.Option()] = 16.0,
    lora_dropout: Annotated[float, typer.Option()] = 0.0,
    lora_targets: Annotated[str, typer.Option(help="Projections to adapt: q,k,v,o,gate,up,down (or PEFT's "
                                              "names, q_proj to down_proj).")] = "q,k,v,o,gate,up,down",
    steps: Annotated[int, typer.Option()] = 100,
    batch_size: Annotated[int, typer.Option(help="Pairs (and responses judged alone) per step.")] = 8,
    lr: Annotated[float, typer.Option()] = 1e-3,
    warmup_steps: Annotated[int, typer.Option()] = 5,
    seed: Annotated[int, typer.Option()] = 0,
    holdout: Annotated[float, typer.Option(help="Share of pairs held out for evaluation.")] = 0.1,
    min_rating_gap: Annotated[float, typer.Option(help="Ratings this far apart make a pair.")] = 1.0,
    save_pairs: Annotated[Optional[Path], typer.Option(help="Write the pairs used (e.g. derived from feedback).")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Also write the base with the adapter folded in.")] = False,
    save_dtype: Annotated[str, typer.Option("--save-dtype", help="dtype of merged/: auto (the base's stored dtype), "
                                            "float32, float16 or bfloat16. Training runs in float32 (--dtype) "
                                            "either way.")] = "auto",
    device: Device = "auto",
    dtype: TrainDtype = "auto",
    force: Force = False,
    metrics_out: MetricsOut = None,
) -> None:
    """Preference-tune a model with DPO (or IPO) and KTO on LoRA adapters, from pairs or user feedback.

    Runs unchanged, with the same flags, under `torchrun --nproc-per-node N -m itera dpo-train`
    (pairs of each step split across processes; only rank 0 writes). The reference policy is the base model with
    adapters off; its log-probabilities are cached by model and data hash. Writes a
    PEFT-compatible adapter (adapter_config.json, adapter_model.safetensors) and, with --merge, a
    merged checkpoint in OUT/merged.

    Examples:

      itera dpo-train --model runs/teacher --pairs prefs.jsonl --out runs/dpo

      itera dpo-train --model runs/teacher --feedback events.jsonl \\
        --save-pairs pairs.jsonl --out runs/dpo --merge

      # from what `itera serve` collected
      itera dpo-train --model runs/teacher --feedback-db default --out runs/dpo

      # keep the perplexity of the text it was trained on
      itera dpo-train --model runs/teacher --feedback-db default \\
        --lm-data pydocs@train --out runs/dpo
    """
    from itera.jobs.dpo import DPOOptions, run_dpo
    from itera.runtime import resolve_device
    from itera.train import init_distributed

    if feedback_db is not None and str(feedback_db) == "default":
        from itera.feedback import default_path

        feedback_db = default_path()
    elif feedback_db is not None:
        from itera import pg
        from itera.errors import UsageError

        pg.check_location(feedback_db, "feedback store", "--feedback-db")
        if not pg.is_url(feedback_db):
            if Path(feedback_db).is_dir():
                raise UsageError(f"--feedback-db {feedback_db} is a directory; pass a file path")
            feedback_db = Path(feedback_db)
    path, parent = model_input(model)
    opts = DPOOptions(model=path, out=out, pairs=pairs, feedback=feedback, feedback_db=feedback_db,
                      from_version=from_version, since=since, beta=beta,
                      loss=loss, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                      rating_threshold=rating_threshold, label_smoothing=label_smoothing, lm_data=lm_data,
                      lm_weight=lm_weight, lm_seq_len=lm_seq_len, lora_rank=lora_rank, lora_alpha=lora_alpha,
                      lora_dropout=lora_dropout, lora_targets=lora_targets, holdout=holdout,
                      min_rating_gap=min_rating_gap, merge=merge, save_pairs=save_pairs, force=force,
                      save_dtype=save_dtype)
    # the flags over DPOOptions' own training settings (seq_len, weight_decay, ... have no flag)
    opts.train = replace(opts.train, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, seed=seed,
                         dtype=dtype)
    dist = init_distributed(resolve_device(device))
    opts.device = dist.device
    execute("dpo-train", run_dpo, opts.validate(), parent, metrics_out, summary=_summary, dist=dist)


def _summary(console, m: dict) -> None:
    hs, hb = m.get("heldout_singles"), m.get("heldout_singles_before")
    if hs and hb and hs["reward_margin"] is not None:
        console.log(f"held-out desirable-undesirable reward margin {hb['reward_margin']:.3f} -> "
                    f"{hs['reward_margin']:.3f} ({m['singles_heldout']} held-out responses judged alone)")
    lm = m.get("lm_anchor")
    if lm:
        console.log(f"--lm-data {lm['data']}: NLL {lm['nll_before']:.4f} -> {lm['nll_after']:.4f} nats/token "
                    f"({lm['measured_on']})")
    if m["heldout"]:
        console.log(f"held-out reward accuracy {m['heldout_before']['reward_accuracy']:.3f} -> "
                    f"{m['heldout']['reward_accuracy']:.3f}, margin {m['heldout']['reward_margin']:.3f}, "
                    f"KL to reference {m['kl_to_reference']:.4f} ({m['pairs_heldout']} held-out pairs)")
