"""pretrain: token shards -> a pretrained BERT (DeepSpeed checkpoints + a stock transformers export).

  1. read the prepare manifest; check the tokenizer files against the hash the data was made with;
  2. build the model (vocab size from the manifest) and the sparse-MLM objective;
  3. train every phase (pipeline.train), resuming from the newest checkpoint if there is one;
  4. rank 0 exports the final weights with `save_pretrained` (safetensors, fp32) + the tokenizer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from pipeline.config import RunConfig
from pipeline.data.loader import manifest_tokenizer, read_manifest
from pipeline.data.tokenizer import tokenizer_info
from pipeline.errors import ConfigError, StageInputError
from pipeline.model.bert import PretrainObjective, compile_whole, count_parameters, train_flops_per_token
from pipeline.model.init_from import checkpoint_fingerprint, starting_model
from pipeline.runner import StageContext, StageResult
from pipeline.train import Trainer

EXPORT = "export"


def input_fingerprints(cfg: RunConfig) -> dict[str, str]:
    return checkpoint_fingerprint(cfg)


def checked_tokenizer(prepare_dir: Path):
    """The tokenizer of the prepared data, verified against the manifest's hash."""
    manifest = read_manifest(prepare_dir)
    info = manifest_tokenizer(manifest)
    actual = tokenizer_info(prepare_dir / "tokenizer")
    if actual.sha256 != info.sha256:
        raise StageInputError(f"{prepare_dir / 'tokenizer'}: vocab hash {actual.sha256[:12]} does not match the "
                              f"manifest's {info.sha256[:12]}; rerun prepare")
    return manifest, info


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    prepare_dir = ctx.input_dir("prepare")
    manifest, info = checked_tokenizer(prepare_dir)
    longest = max(p.seq_len for p in cfg.pretrain.phases) if cfg.pretrain.phases else 0
    if cfg.pretrain.init_from is None and longest > cfg.model.max_position_embeddings:
        raise ConfigError(f"pretrain.phases: seq_len {longest} exceeds model.max_position_embeddings "
                          f"{cfg.model.max_position_embeddings}")
    config, hf = starting_model(cfg, info.vocab_size, info.pad_id, manifest["objective"] != "mlm",
                                prepare_dir / "tokenizer", ctx.log)
    objective = PretrainObjective(hf, sparse=cfg.model.sparse_mlm_head)
    compile_objective(objective, cfg)
    shape = f"from {cfg.pretrain.init_from}" if cfg.pretrain.init_from else cfg.model.preset
    ctx.log.info(f"model: {shape}, {count_parameters(objective) / 1e6:.1f}M parameters, "
                 f"vocab {info.vocab_size}, {'sparse' if cfg.model.sparse_mlm_head else 'dense'} MLM head")

    def flops(seq_len: int) -> float:
        return train_flops_per_token(config, seq_len, cfg.data.masking.probability, cfg.model.sparse_mlm_head)

    trainer = Trainer(ctx, objective, prepare_dir, flops)
    summary = trainer.run()
    outputs = export_model(ctx, trainer.engine.module.hf, prepare_dir / "tokenizer")
    return StageResult(outputs=outputs, metrics=_metrics(summary, objective))


def compile_objective(objective: PretrainObjective, cfg: RunConfig) -> None:
    """`pretrain.compile`: with static batches forward + loss as one graph, else the encoder alone (the
    sparse head's `nonzero` would break the graph)."""
    mode = cfg.pretrain.compile_mode
    if mode == "reduce-overhead" and not (cfg.pretrain.compile and cfg.data.masking.fixed_count):
        raise ConfigError("pretrain.compile_mode: reduce-overhead (CUDA graphs) needs pretrain.compile: true and "
                          "data.masking.fixed_count: true (static shapes, no host sync in the step)")
    if cfg.pretrain.compile and cfg.data.masking.fixed_count:
        compile_whole(objective, mode)
    elif cfg.pretrain.compile:
        objective.hf.bert.compile(mode=mode)


def export_model(ctx: StageContext, hf_model: torch.nn.Module, tokenizer_dir: Path) -> list[Path]:
    """`save_pretrained` (fp32 safetensors) + tokenizer files, written aside and renamed into place."""
    export = ctx.stage_dir / EXPORT
    if ctx.dist.is_main:
        tmp = ctx.stage_dir / f".{EXPORT}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        state = {k: v.detach().float().cpu() for k, v in hf_model.state_dict().items()}
        hf_model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, tmp / name)
        shutil.rmtree(export, ignore_errors=True)
        os.replace(tmp, export)
    ctx.dist.barrier()
    return sorted(p for p in export.iterdir() if p.is_file())


def _metrics(summary: dict, objective: torch.nn.Module) -> dict:
    metrics = {"parameters": count_parameters(objective)}
    for phase, values in summary.items():
        for key, value in values.items():
            metrics[f"{phase}_{key}"] = value
    return metrics
