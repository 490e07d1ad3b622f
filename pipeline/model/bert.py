"""BERT for pretraining: stock transformers modules, plus an objective that decodes only masked positions.

The model is a stock `BertForMaskedLM` (or `BertForPreTraining` when the data has sentence
pairs) with SDPA attention, so `save_pretrained` output loads in stock transformers. The
objective runs the encoder, then applies the MLM head only to the ~15% of positions that
carry a label: the vocabulary projection (hidden x vocab per position) dominates small and
medium BERTs, so this is the largest single saving in pretraining, as in the fastest BERT
implementations. With `sparse=False` it computes the same loss over all positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

from pipeline.config import ModelConfig

IGNORE = -100

# hidden, layers, heads, intermediate (Google's BERT miniatures, BERT-base, BERT-large)
PRESETS = {
    "tiny": (128, 2, 2, 512),
    "mini": (256, 4, 4, 1024),
    "small": (512, 4, 8, 2048),
    "medium": (512, 8, 8, 2048),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}


def bert_config(cfg: ModelConfig, vocab_size: int, pad_id: int = 0) -> BertConfig:
    hidden, layers, heads, inner = PRESETS[cfg.preset]
    hidden = cfg.hidden_size or hidden
    heads = cfg.num_heads or heads
    if hidden % heads:
        raise ValueError(f"model.hidden_size {hidden} is not divisible by model.num_heads {heads}")
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=cfg.num_layers or layers,
                      num_attention_heads=heads, intermediate_size=cfg.intermediate_size or inner,
                      max_position_embeddings=cfg.max_position_embeddings, hidden_dropout_prob=cfg.dropout,
                      attention_probs_dropout_prob=cfg.dropout, initializer_range=cfg.init_std, pad_token_id=pad_id)


def build_model(config: BertConfig, pairs: bool) -> BertForMaskedLM | BertForPreTraining:
    cls = BertForPreTraining if pairs else BertForMaskedLM
    return cls._from_config(config, attn_implementation="sdpa")


@dataclass
class Output:
    loss: torch.Tensor
    mlm_loss: torch.Tensor
    correct: torch.Tensor  # masked positions predicted right (for accuracy), summed
    masked: torch.Tensor  # masked positions in the batch
    nsp_loss: torch.Tensor | None = None
    at_mask_loss_sum: torch.Tensor | None = None  # evaluation: summed over the positions whose input is [MASK]
    at_mask: torch.Tensor | None = None  # how many of those positions there were


class PretrainObjective(nn.Module):
    """MLM (+ NSP/SOP) loss of a stock HF BERT; the HF model is `self.hf`."""

    def __init__(self, hf: BertForMaskedLM | BertForPreTraining, sparse: bool = True):
        super().__init__()
        self.hf = hf
        self.sparse = sparse

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, *, labels: torch.Tensor,
                next_sentence_label: torch.Tensor | None = None,
                mlm_positions: torch.Tensor | None = None, at_mask: torch.Tensor | None = None) -> Output:
        """`mlm_positions` ([batch, k], from fixed-count masking): the positions to decode, so the head's
        input has a static shape and the step needs no `nonzero` (no host sync, no graph break).
        `at_mask` (bool, like `labels`; evaluation): the loss over these positions too, from the same logits."""
        out = self.hf.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        hidden = out.last_hidden_state
        flat_labels = labels.reshape(-1)
        if self.sparse and mlm_positions is not None:
            picked = hidden.gather(1, mlm_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            logits = self.hf.cls.predictions(picked.reshape(-1, hidden.shape[-1]))

            def select(t: torch.Tensor) -> torch.Tensor:  # a per-position tensor at the decoded positions
                return t.gather(1, mlm_positions).reshape(-1)
        elif self.sparse:
            where = torch.nonzero(flat_labels != IGNORE).squeeze(1)
            logits = self.hf.cls.predictions(hidden.reshape(-1, hidden.shape[-1]).index_select(0, where))

            def select(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(-1).index_select(0, where)
        else:
            logits = self.hf.cls.predictions(hidden).reshape(-1, self.hf.config.vocab_size)

            def select(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(-1)
        targets = select(labels)
        valid = targets != IGNORE
        at_mask_sum = at_mask_count = None
        if at_mask is None:
            mlm_loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)
        else:  # per-position losses once, summed two ways
            per = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="none")
            picked_mask = select(at_mask) & valid
            mlm_loss = per.sum() / valid.sum().clamp(min=1)
            at_mask_sum, at_mask_count = (per * picked_mask).sum().detach(), picked_mask.sum()
        correct = ((logits.argmax(-1) == targets) & valid).sum()
        loss, nsp_loss = mlm_loss, None
        if next_sentence_label is not None and isinstance(self.hf, BertForPreTraining):
            pooled = out.pooler_output
            nsp_loss = F.cross_entropy(self.hf.cls.seq_relationship(pooled).float(), next_sentence_label)
            loss = loss + nsp_loss
        return Output(loss=loss, mlm_loss=mlm_loss.detach(), correct=correct, masked=valid.sum(),
                      nsp_loss=None if nsp_loss is None else nsp_loss.detach(), at_mask_loss_sum=at_mask_sum,
                      at_mask=at_mask_count)


def compile_whole(objective: PretrainObjective, mode: str = "default") -> None:
    """Forward and loss as one graph (`fullgraph`: a graph break is an error), for static batches (fixed-count
    masking). The bound forward is compiled, not the module: `Module.compile` would trace the hooks a
    training engine puts on the module too (DeepSpeed's throughput timer cannot be traced). Parameter
    names, and so the export, stay stock. `mode="reduce-overhead"`: CUDA graphs on a GPU (none on CPU)."""
    compiled = torch.compile(objective.forward, fullgraph=True, mode=mode)
    if mode != "reduce-overhead":
        objective.forward = compiled
        return

    def forward(*args, **kwargs):
        # every call is a new step for the graphs' memory: the previous call's outputs (read into the
        # step's metric sums before this call) may be overwritten
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    objective.forward = forward


def layer_widths(hf: nn.Module) -> list[tuple[int, int]]:
    """Per encoder layer: (attention width = kept heads x head size, FFN width), read off the modules."""
    return [(layer.attention.output.dense.in_features, layer.intermediate.dense.out_features)
            for layer in hf.bert.encoder.layer]


def encoder_macs_per_token(config: BertConfig, seq_len: int, widths: list[tuple[int, int]] | None = None) -> float:
    """Multiply-adds of the encoder's forward pass per token, for full or pruned layer widths.

    Per layer of attention width a and FFN width f: Q, K, V and output projections 4·h·a, the two
    FFN matrices 2·h·f, attention scores and the weighted sum 2·seq·a (so heads pruned away, and a
    layer with none left, cost nothing there).
    """
    h = config.hidden_size
    if widths is None:
        widths = [(h, config.intermediate_size)] * config.num_hidden_layers
    return float(sum(4 * h * a + 2 * h * f + 2 * seq_len * a for a, f in widths))


def train_flops_per_token(config: BertConfig, seq_len: int, mask_fraction: float, sparse: bool,
                          widths: list[tuple[int, int]] | None = None) -> float:
    """Model FLOPs of one training step per token (forward + backward = 3x forward, 2 FLOPs a multiply-add)."""
    h, vocab = config.hidden_size, config.vocab_size
    head_fraction = mask_fraction if sparse else 1.0
    head = head_fraction * (h * h + h * vocab)  # transform + decoder where the head is applied
    return 6.0 * (encoder_macs_per_token(config, seq_len, widths) + head)


def count_parameters_of(config: BertConfig, widths: list[tuple[int, int]] | None = None) -> int:
    """Parameters of the MLM model from its shapes alone (the plan sizes models it never builds):
    embeddings, every layer at its (attention, FFN) width, the MLM head with its decoder tied."""
    h, v = config.hidden_size, config.vocab_size
    if widths is None:
        widths = [(h, config.intermediate_size)] * config.num_hidden_layers
    embeddings = (v + config.max_position_embeddings + config.type_vocab_size) * h + 2 * h
    layers = sum(3 * (h * a + a) + a * h + h + 2 * h + h * f + f + f * h + h + 2 * h for a, f in widths)
    head = h * h + h + 2 * h + v
    return embeddings + layers + head


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
