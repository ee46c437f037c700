"""ZeRO-3 and ZeRO++ on paper: bytes each GPU moves per micro-batch, and the step time they imply against
the compute time. ARITHMETIC, not a measurement (no multi-GPU machine was available).

Models (P parameters, all trained, bf16): SDXL base's UNet (P counted from its config on the meta
device, tools/bench_gpu.py's SDXL_BASE_UNET), Wan 2.1 T2V 1.3B and 14B (P from
tools/memory_estimate.py's num_parameters). FLOPs per pair: the policy's forward and backward on one
pair (2 samples), as dpo_ds.perf.pair_flops counts them on the meta device (FLOPS_PER_PAIR; the command
that counted them is beside it): SDXL at a 128x128 latent (1024 px), Wan at 81 frames of 480x832.

Bytes per GPU per micro-batch, on N GPUs in nodes of G, ring collectives ((N-1)/N of the volume):
  ZeRO-3   forward all-gather of the bf16 parameters 2P, backward all-gather again 2P (ZeRO-3 frees
           them after use), reduce-scatter of the bf16 gradients 2P: 6P·(N-1)/N, over the whole group
  ZeRO++   qwZ: the forward all-gather in int8 with block scales: P·(N-1)/N over the whole group;
           hpZ: a secondary bf16 partition inside each node, so the backward all-gather is intra-node only:
           2P·(G-1)/G (and 2P/G more bytes of memory per GPU);
           qgZ: the gradients reduce-scattered in int4 (hierarchically, all-to-all): 0.5P·(N-1)/N
  (the ZeRO++ paper's 3M -> 0.75M across nodes, M = 2P bytes)
Where the bytes travel: on one node, everything over NVLink; on several, a collective over the whole
group runs at the per-GPU InfiniBand bandwidth (the slowest link of the ring), an intra-node one over
NVLink. Times: bytes / (bandwidth · efficiency), the two kinds added.
Compute per micro-batch: pairs · FLOPs per pair / (peak · MFU). ZeRO-3 gathers and scatters every
micro-batch (gradient accumulation does not amortise it), so step time per micro-batch:
  overlapped = max(compute, communication)   (DeepSpeed's prefetch and overlap_comm at their best)
  exposed    = compute + communication       (no overlap at all)
and the scaling efficiency is compute / overlapped.

  python tools/scaling.py [--mfu 0.4] [--peak-tflops 989] [--nvlink-gbps 450] [--ib-gbps 50]
      [--efficiency 0.8] [--micro-batch-size 1] [--gpus-per-node 8]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memory_estimate import MODELS as WAN_MODELS  # noqa: E402
from memory_estimate import num_parameters  # noqa: E402

GB = 1e9
NODES = (1, 8, 64)

# Parameters of each model: SDXL base's UNet counted on the meta device from tools/bench_gpu.py's config;
# Wan from tools/memory_estimate.py's architecture count.
PARAMS = {"SDXL UNet": 2_567_463_684,
          **{name: num_parameters(m["dim"], m["num_layers"], m["ffn_dim"]) for name, m in WAN_MODELS.items()}}

# dpo_ds.perf.pair_flops on the meta device, bf16, all parameters trained, with the configs of
# tools/bench_gpu.py (the 14B: its WAN_1_3B with 40 heads, ffn 13824, 40 layers); docs/BENCHMARKS.md,
# "Scaling on paper", has the command. SDXL at latents 4x128x128, Wan at 16x21x60x104 (32,760 tokens).
FLOPS_PER_PAIR = {
    "SDXL UNet": 40_461_684_899_840,
    "Wan2.1-T2V-1.3B": 1_697_984_958_431_232,
    "Wan2.1-T2V-14B": 10_070_135_805_050_880,
}


@dataclass(frozen=True)
class Link:
    """Per-GPU bandwidths in GB/s per direction, and the fraction of them a collective reaches."""
    nvlink_gbps: float = 450.0  # H100 SXM, NVLink 4: 900 GB/s both directions
    ib_gbps: float = 50.0       # one 400 Gb/s NDR InfiniBand NIC per GPU
    efficiency: float = 0.8     # NCCL's bus bandwidth against the link's


def bytes_per_gpu(params: float, num_gpus: int, gpus_per_node: int, kind: str) -> dict[str, float]:
    """{"group": bytes through collectives over all GPUs, "node": bytes through intra-node ones} that one
    GPU sends per micro-batch under `kind` ("zero3" or "zero++"); see the module docstring."""
    ring = (num_gpus - 1) / num_gpus
    if kind == "zero3":
        return {"group": 6 * params * ring, "node": 0.0}
    if kind == "zero++":
        node_ring = (min(gpus_per_node, num_gpus) - 1) / min(gpus_per_node, num_gpus)
        return {"group": (1 + 0.5) * params * ring, "node": 2 * params * node_ring}
    raise ValueError(f"kind {kind!r}: zero3 or zero++")


def comm_seconds(volume: dict[str, float], num_nodes: int, link: Link) -> float:
    """Seconds to move `volume`: group collectives over InfiniBand once they span nodes, else NVLink."""
    group_gbps = link.ib_gbps if num_nodes > 1 else link.nvlink_gbps
    return (volume["group"] / group_gbps + volume["node"] / link.nvlink_gbps) / (GB * link.efficiency)


def compute_seconds(flops_per_pair: float, pairs: int, peak_tflops: float, mfu: float) -> float:
    return pairs * flops_per_pair / (peak_tflops * 1e12 * mfu)


def rows(args: argparse.Namespace) -> list[dict]:
    link = Link(args.nvlink_gbps, args.ib_gbps, args.efficiency)
    out = []
    for model, params in PARAMS.items():
        compute = compute_seconds(FLOPS_PER_PAIR[model], args.micro_batch_size, args.peak_tflops, args.mfu)
        for nodes in NODES:
            num_gpus = nodes * args.gpus_per_node
            for kind in ("zero3", "zero++"):
                volume = bytes_per_gpu(params, num_gpus, args.gpus_per_node, kind)
                comm = comm_seconds(volume, nodes, link)
                out.append({"model": model, "nodes": nodes, "gpus": num_gpus, "kind": kind, "params": params,
                            "group_gb": volume["group"] / GB, "node_gb": volume["node"] / GB,
                            "compute_s": compute, "comm_s": comm, "overlapped_s": max(compute, comm),
                            "exposed_s": compute + comm, "efficiency": compute / max(compute, comm)})
    return out


def table(args: argparse.Namespace) -> str:
    head = (f"ARITHMETIC, not measured: {args.micro_batch_size} pair(s) per GPU per micro-batch, MFU {args.mfu} of "
            f"{args.peak_tflops:g} TFLOP/s, NVLink {args.nvlink_gbps:g} GB/s, InfiniBand {args.ib_gbps:g} GB/s per "
            f"GPU, collectives at {args.efficiency:g} of the link; {args.gpus_per_node} GPUs a node; GB = 1e9 bytes")
    lines = [head, f"{'model':<16} {'nodes':>5} {'GPUs':>5} {'config':<7} {'group GB':>9} {'node GB':>8} "
             f"{'compute s':>9} {'comm s':>7} {'step s':>7} {'efficiency':>10}"]
    for r in rows(args):
        lines.append(f"{r['model']:<16} {r['nodes']:>5} {r['gpus']:>5} {r['kind']:<7} {r['group_gb']:>9.2f} "
                     f"{r['node_gb']:>8.2f} {r['compute_s']:>9.3f} {r['comm_s']:>7.3f} {r['overlapped_s']:>7.3f} "
                     f"{r['efficiency']:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the compute runs at")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU (H100: 989)")
    p.add_argument("--nvlink-gbps", type=float, default=Link.nvlink_gbps, help="GB/s per GPU per direction")
    p.add_argument("--ib-gbps", type=float, default=Link.ib_gbps, help="GB/s per GPU per direction")
    p.add_argument("--efficiency", type=float, default=Link.efficiency, help="fraction of a link a collective gets")
    p.add_argument("--micro-batch-size", type=int, default=1, help="pairs per GPU per micro-batch")
    p.add_argument("--gpus-per-node", type=int, default=8)
    args = p.parse_args(argv)
    print(table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
