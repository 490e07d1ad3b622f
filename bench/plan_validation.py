"""The plan against published BERT pretraining runs: prediction beside publication.

Each run is described the way a user would plan it: the flagship config with the publication's
recipe set over it (model, phases, batch, optimizer, precision, data-parallel fp16 all-reduce) and
a cluster of its hardware. The MFU a prediction needs comes from the same publication's
single-GPU throughput where it gives one (so what is tested is everything else: FLOPs per token,
phases, accumulation, the links and the overlap), else from this project's own GPU benchmark, and
the table says which. Nothing here is fitted to the number it is compared with.
usage: python bench/plan_validation.py      (seconds; writes bench/results/plan_validation.{json,md})
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import MaskingConfig, load_config  # noqa: E402
from pipeline.model.bert import bert_config, train_flops_per_token  # noqa: E402
from pipeline.plan.cluster import ClusterSpec, load_cluster  # noqa: E402
from pipeline.plan.costmodel import Options, plan_run  # noqa: E402

OUT = REPO / "bench" / "results"
FLAGSHIP = REPO / "configs" / "bert-base-academic.yaml"
DATA_PARALLEL = REPO / "bench" / "configs" / "published" / "ds_data_parallel_fp16.json"
V100 = {"name": "V100-SXM", "peak_tflops": {"fp16": 125.0, "fp32": 15.7}, "memory_gib": 32}
A100 = {"name": "A100-SXM4-80GB", "peak_tflops": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, "memory_gib": 80}


def cluster(name: str, nodes: int, gpus: int, gpu: dict, intra: float, inter: float | None = None,
            inter_latency_us: float = 5.0) -> ClusterSpec:
    spec = {"name": name, "nodes": nodes, "gpus_per_node": gpus, "gpu": gpu, "mfu": 0.5,
            "intra_node": {"bandwidth_gbit_s": intra, "latency_us": 5.0}}
    if inter is not None:
        spec["inter_node"] = {"bandwidth_gbit_s": inter, "latency_us": inter_latency_us}
    return ClusterSpec.model_validate(spec)


def recipe(preset: str, phases: list[dict], optimizer: str = "lamb", precision: str = "fp16"):
    flow = ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in p.items()) + "}" for p in phases)
    return load_config(FLAGSHIP, [f"model.preset={preset}", f"pretrain.phases=[{flow}]", f"optimizer.name={optimizer}",
                                  f"pretrain.precision={precision}", f"distributed.ds_config={DATA_PARALLEL}"])


def mfu_of(cfg, seq: int, samples_per_s: float, peak_tflops: float) -> float:
    """The MFU a published single-GPU throughput means under this project's FLOPs accounting."""
    model = bert_config(cfg.model, 30522)
    return samples_per_s * seq * train_flops_per_token(model, seq, MaskingConfig().probability, True) / (
        peak_tflops * 1e12)


def phase_seconds(cfg, spec: ClusterSpec, mfus: list[float], options: Options = Options()) -> list:
    """Each phase planned at its own MFU (publications give one per sequence length)."""
    return [plan_run(cfg, spec, mfu, options).phases[i] for i, mfu in enumerate(mfus)]


def nvidia_a100() -> list[dict]:
    """NVIDIA DeepLearningExamples PyTorch BERT-large, DGX A100 8x80GB, mixed precision (21.11 container)."""
    rows = []
    for seq, micro, global_batch, one, eight in ((128, 256, 65536, 580, 4591), (512, 32, 32768, 210, 1657)):
        cfg = recipe("large", [{"seq_len": seq, "steps": 1, "global_batch_size": global_batch,
                                "micro_batch_size": micro}])
        mfu = mfu_of(cfg, seq, one, 312.0)
        phase = plan_run(cfg, cluster("dgx-a100", 1, 8, A100, 2400), mfu).phases[0]
        rows.append({"run": f"NVIDIA BERT-large pretraining, 8x A100 80GB, seq {seq}", "unit": "sequences/s",
                     "published": eight, "predicted": global_batch / phase.step_seconds,
                     "mfu": f"{mfu:.1%} from the same table's 1-GPU row ({one} seq/s)",
                     "source": "NVIDIA/DeepLearningExamples PyTorch/LanguageModeling/BERT/README.md (DGX A100 80GB)"})
    return rows


def deepspeed_44_minutes() -> dict:
    """DeepSpeed BERT-large, 1,024 V100 (64 DGX-2), LAMB 64K then 32K; 403M + ~20M samples."""
    cfg = recipe("large", [{"seq_len": 128, "steps": round(403e6 / 65536), "global_batch_size": 65536,
                            "micro_batch_size": 64},
                           {"seq_len": 512, "steps": round(20e6 / 32768), "global_batch_size": 32768,
                            "micro_batch_size": 8}])
    mfus = [mfu_of(cfg, 128, 272, 125.0), mfu_of(cfg, 512, 52, 125.0)]
    # DGX-2: 16 V100 on NVSwitch (NVLink 2, 150 GB/s per direction), 8 x 100 Gb/s InfiniBand per node
    spec = cluster("64 x DGX-2", 64, 16, V100, 1200, 800)
    minutes = sum(p.step_seconds * p.steps for p in phase_seconds(cfg, spec, mfus)) / 60
    return {"run": "DeepSpeed BERT-large, 1,024 V100 (64 DGX-2)", "unit": "minutes", "published": 44,
            "predicted": minutes, "mfu": f"{mfus[0]:.1%} / {mfus[1]:.1%} from DeepSpeed's single-V100 272 / 52 "
            "samples/s at seq 128 / 512", "source": "deepspeed.ai 2020-05-27 fastest-bert-training; "
            "docs/_tutorials/bert-pretraining.md (recipe, sample counts)"}


def onebit_adam_ethernet() -> dict:
    """1-bit Adam vs Adam, BERT-large seq 128, batch 4096 (16 per GPU), 40 GbE measured at 4.1 Gbit/s."""
    steps = 125000
    cfg = recipe("large", [{"seq_len": 128, "steps": steps, "global_batch_size": 4096, "micro_batch_size": 16,
                            "freeze_step": 23000}], optimizer="adamw")
    mfu = mfu_of(cfg, 128, 272, 125.0)
    # 64 nodes x 4 V100 (PCIe 3.0 inside a node), 40 GbE at the blog's iperf-measured 4.1 Gbit/s
    spec = cluster("64 x 4 V100, 40 GbE", 64, 4, V100, 80, 4.1, inter_latency_us=50)
    dense = plan_run(cfg, spec, mfu).phases[0].step_seconds * steps
    onebit = plan_run(cfg, spec, mfu, Options(optimizer="onebit_adam")).phases[0]
    return {"run": "1-bit Adam end-to-end speed-up, BERT-large, 256 V100 on 40 GbE", "unit": "x",
            "published": 3.3, "predicted": dense / (onebit.step_seconds * steps),
            "mfu": f"{mfu:.1%} (DeepSpeed's single-V100 rate; the ratio depends on it only through compute share)",
            "source": "Tang et al. 2021 (ICML) abstract: up to 3.3x; deepspeed.ai 2020-09-08 blog: 3.5x, "
                      "4.1 Gbit/s effective, freeze_step 23000 of the example config"}


def google_tpu() -> dict:
    """Google BERT-base: 1M steps of 256, seq 128 for 90% then 512, on 16 TPU chips, 4 days."""
    cfg = recipe("base", [{"seq_len": 128, "steps": 900000, "global_batch_size": 256, "micro_batch_size": 16},
                          {"seq_len": 512, "steps": 100000, "global_batch_size": 256, "micro_batch_size": 16}],
                 optimizer="adamw", precision="bf16")
    _, mfu = load_cluster(REPO / "clusters" / "h100x8.yaml", REPO)  # no TPU anchor: this project's GPU MFU
    tpu = {"name": "TPU v2 chip", "peak_tflops": {"bf16": 45.0, "fp32": 11.0}, "memory_gib": 16}
    spec = cluster("4 Cloud TPU v2 (16 chips)", 4, 4, tpu, 2000, 2000)  # inter-chip links, not Ethernet
    days = plan_run(cfg, spec, mfu).seconds / 86400
    return {"run": "Google BERT-base, 16 TPU v2 chips", "unit": "days", "published": 4, "predicted": days,
            "mfu": f"{mfu:.1%}: no TPU measurement exists, this project's H100 MFU",
            "source": "Devlin et al. 2018, appendix A.2; google-research/bert README (90k + 10k recipe)"}


def academic() -> dict:
    cfg = load_config(FLAGSHIP)
    spec, mfu = load_cluster(REPO / "clusters" / "academic-2020.yaml", REPO)
    days = plan_run(cfg, spec, mfu).seconds / 86400
    return {"run": f"this flagship recipe on clusters/academic-2020.yaml ({spec.description})", "unit": "days",
            "published": 12, "predicted": days, "mfu": f"{mfu:.1%} (the cluster file's)",
            "source": "Lin, Li, Pekhimenko 2020, arXiv:2008.00177 (abstract: 12 days; hardware and recipe not "
                      "in the parts read)"}


def main() -> None:
    rows = [*nvidia_a100(), deepspeed_44_minutes(), onebit_adam_ethernet(), google_tpu(), academic()]
    for row in rows:
        row["ratio"] = row["predicted"] / row["published"]
        row["within_25_percent"] = abs(row["ratio"] - 1) <= 0.25
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "plan_validation.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["The plan's prediction beside each publication. Produced by `python bench/plan_validation.py`.", "",
             "| run | published | predicted | predicted / published | MFU used | source |",
             "|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['published']:,g} {r['unit']} | {r['predicted']:,.1f} {r['unit']} | "
                     f"{r['ratio']:.2f} | {r['mfu']} | {r['source']} |")
    (OUT / "plan_validation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
