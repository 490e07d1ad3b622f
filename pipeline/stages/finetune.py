"""finetune: every configured model on every configured task, standard and (optionally) EarlyBERT, compared.

For each model (a stage's export, the pruned weights, `scratch` — the dense architecture from random
weights, the control — or an HF BERT directory) and task:
  standard    fine-tune all weights: AdamW, linear warmup/decay, dev evaluation every epoch,
              best epoch kept (`best/`), dev and test predictions written;
  earlybert   (finetune.earlybert.enabled, dense models only) search a ticket on the task,
              prune the rewound weights, fine-tune the ticket the same way.
Each (task, model, variant) directory gets a `result.json` when it is done, so a rerun after a
kill continues with the next one; a standard fine-tuning cut short resumes mid-epoch from its
own checkpoints (`<task>/<model>/checkpoints`, removed once it is done). The stage ends with
`comparison.md`: dense vs ticket, quality against pretraining and fine-tuning cost.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.table import Table
from transformers import BertConfig

from pipeline.config import FinetuneTaskConfig
from pipeline.console import print_table
from pipeline.errors import ConfigError
from pipeline.rundir import RunDir, atomic_write_json, atomic_write_text, sha256_json
from pipeline.runner import StageContext, StageResult
from pipeline.tasks.compare import comparison_rows, render
from pipeline.tasks.data import TaskData, describe, load_task, write_predictions
from pipeline.tasks.earlybert import Ticket, random_ticket, search_ticket
from pipeline.tasks.loop import FineTuner, FitPlan, TaskObjective
from pipeline.tasks.model import (
    STAGE_MODELS,
    ModelSource,
    build_task_model,
    count_encoder_parameters,
    load_tokenizer,
    resolve_source,
    save_task_model,
    train_flops,
)

TICKET_VARIANTS = {"searched": "earlybert", "random": "earlybert-random", "fixed": "earlybert-fixed"}


def input_fingerprints(cfg) -> dict[str, str]:
    """Task files and outside model directories (path, size, mtime): a changed file reruns the stage."""
    paths = [getattr(t, s) for t in cfg.finetune.tasks for s in ("train", "dev", "test") if getattr(t, s)]
    paths += [Path(m) / "model.safetensors" for m in cfg.finetune.models if m not in STAGE_MODELS]
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) if Path(p).exists() else (str(p), None, None)
             for p in map(Path, paths)]
    return {"finetune_files": sha256_json(stats)}


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.finetune
    if not cfg.tasks:
        raise ConfigError("finetune.tasks: no task configured")
    tuner = FineTuner(cfg, Path(ctx.cfg.distributed.ds_config), ctx.dist, ctx.log, ctx.cfg.run.seed,
                      ctx.stage_dir / "tensorboard", stop=ctx.stop, progress_seconds=ctx.cfg.run.progress_seconds)
    results = []
    for spec in cfg.models:
        source = resolve_source(spec, ctx.run_dir.stage_dir)
        tokenizer = load_tokenizer(source)
        for task in cfg.tasks:
            _check_length(task, source)
            data = load_task(task, tokenizer)
            ctx.log.info(f"{source.label}: {describe(data)}")
            if cfg.standard:
                results.append(_variant(ctx, tuner, source, data, tokenizer, "standard"))
            if cfg.earlybert.enabled and source.plan() is None and not source.random_init:
                results += [_variant(ctx, tuner, source, data, tokenizer, TICKET_VARIANTS[kind])
                            for kind in cfg.earlybert.tickets]
    rows = comparison_rows(results, ctx.run_dir.path)
    table, markdown = render(rows, [t.name for t in cfg.tasks], ctx.cfg.run.name)
    out = ctx.stage_dir
    if ctx.dist.is_main:
        atomic_write_json(out / "results.json", {"results": results, "comparison": rows})
        atomic_write_text(out / "comparison.md", markdown)
    print_table(ctx.dist.rank, table, min_width=180)
    ctx.dist.barrier()
    metrics = {f"{r['task']}/{r['model']}/{r['variant']}/{k}": v for r in results for k, v in r["metrics"].items()
               if k in ("accuracy", "f1", "mcc", "corr", "exact_match")}
    files = [out / "results.json", out / "comparison.md"]
    files += sorted(p for r in results for p in (out / r["dir"]).rglob("*") if p.is_file())
    return StageResult(outputs=files, metrics=metrics)


def comparison_table(cfg) -> Table:
    """The comparison of a finished finetune stage, for `run-all` to end with."""
    saved = json.loads((RunDir(cfg.run.root, cfg.run.name).stage_dir("finetune") / "results.json").read_text())
    return render(saved["comparison"], [t.name for t in cfg.finetune.tasks], cfg.run.name)[0]


def _check_length(task: FinetuneTaskConfig, source: ModelSource) -> None:
    limit = BertConfig.from_pretrained(str(source.weights)).max_position_embeddings
    if task.max_seq_len > limit:
        raise ConfigError(f"finetune.tasks[{task.name}].max_seq_len: {task.max_seq_len} exceeds {source.label}'s "
                          f"max_position_embeddings {limit}")


def _variant(ctx: StageContext, tuner: FineTuner, source: ModelSource, data: TaskData, tokenizer,
             variant: str) -> dict:
    cfg, task, seed = ctx.cfg.finetune, data.task, ctx.cfg.run.seed
    rel = f"{task.name}/{source.label}" + ("" if variant == "standard" else f"-{variant}")
    out = ctx.stage_dir / rel
    if (out / "result.json").exists():  # finished by an earlier, interrupted run of this same stage
        return json.loads((out / "result.json").read_text())
    if ctx.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    ctx.dist.barrier()
    ticket = _ticket_for(ctx, tuner, source, data, tokenizer.pad_token_id, variant, out)
    hf = build_task_model(source, task.kind, data.num_labels, seed, plan=ticket.plan if ticket else None,
                          labels=data.labels)
    epochs = cfg.earlybert.retrain_epochs if ticket else (task.epochs or cfg.epochs)
    lr = (cfg.earlybert.retrain_lr if ticket else None) or task.lr or cfg.lr
    # the ticket's fine-tuning starts over on a rerun (the search before it is rerun too)
    plan = FitPlan(epochs=epochs, lr=lr, best_dir=out / "best",
                   save_best=lambda model, where: save_task_model(model, source.tokenizer, where),
                   ckpt_dir=out / "checkpoints" if ticket is None else None)
    fit = tuner.fit(TaskObjective(hf), data, plan, tokenizer.pad_token_id, f"{task.name}/{source.label}/{variant}")
    _predict(ctx, tuner, hf, data, tokenizer.pad_token_id, out)
    result = {"task": task.name, "kind": task.kind, "model": source.label, "variant": variant, "dir": rel,
              "metrics": fit.best, "best_epoch": fit.best_epoch, "history": fit.history, "steps": fit.steps,
              "seconds": fit.seconds + (ticket.info["search_seconds"] if ticket else 0.0),
              "train_tokens": fit.train_tokens,
              "flops": train_flops(hf, fit.train_tokens) + (ticket.info["search_flops"] if ticket else 0.0),
              "parameters": count_encoder_parameters(hf), "fresh_weights": hf.fresh_weights,
              "ticket": ticket.info if ticket else None}
    ctx.log.info(f"{rel}: best epoch {fit.best_epoch}: " + "  ".join(
        f"{k} {v:.4f}" for k, v in fit.best.items() if isinstance(v, float)) + f"  ({result['seconds']:.0f} s)")
    if ctx.dist.is_main:
        atomic_write_json(out / "result.json", result)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # done: `best/` holds the weights that count
    ctx.dist.barrier()
    return result


def _ticket_for(ctx: StageContext, tuner: FineTuner, source: ModelSource, data: TaskData, pad_id: int, variant: str,
                out: Path) -> Ticket | None:
    """None for standard fine-tuning; else the variant's ticket: searched or fixed (a search on the task), or
    random (the searched ticket's sizes, read from its masks.json, which the searched variant wrote first)."""
    cfg, seed = ctx.cfg.finetune, ctx.cfg.run.seed
    if variant == "standard":
        return None
    if variant == TICKET_VARIANTS["random"]:
        searched_dir = out.with_name(f"{source.label}-{TICKET_VARIANTS['searched']}")
        searched = json.loads((searched_dir / "masks.json").read_text())
        return random_ticket(Ticket(searched["plan"], searched), BertConfig.from_pretrained(str(source.weights)), out,
                             tuner, seed)
    kind = "fixed" if variant == TICKET_VARIANTS["fixed"] else "searched"
    return search_ticket(tuner, cfg, source, data, out, pad_id, seed, kind)


def _predict(ctx: StageContext, tuner: FineTuner, hf, data: TaskData, pad_id: int, out: Path) -> None:
    for split in ("dev", "test"):
        if split not in data.splits:
            continue
        scores, predictions = tuner.evaluate(hf, data, split, pad_id)
        if ctx.dist.is_main:
            write_predictions(data, split, predictions, out / "predictions" / split)
            if split == "test" and scores:
                atomic_write_json(out / "test_metrics.json", scores)
