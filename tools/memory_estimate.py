"""Per-GPU memory of Diffusion-DPO training of Wan 2.1 T2V under ZeRO-3: ARITHMETIC, not a measurement.

No GPU was available to measure these figures; they follow from the public model configs and the
assumptions below, so treat them as a planning estimate (allow a few GB for the CUDA context, the
allocator's fragmentation and NCCL buffers, none of which are counted).

Model (Wan 2.1's diffusers configs): 1.3B: dim 1536, 30 layers, ffn 8960, 12 heads; 14B: dim 5120, 40
layers, ffn 13824, 40 heads; both 16 latent channels, patch 1x2x2, text_dim 4096 (UMT5), freq_dim 256.
The parameter count P is computed from the architecture of diffusers' WanTransformer3DModel, per block
8·dim² + 2·dim·ffn + 21·dim + ffn (self- and cross-attention q, k, v, o with biases and RMS q/k norms,
the cross-attention LayerNorm, the FFN, the block's modulation table), plus the patch embedding, the
time and text embedders and the output head. 1.3B has P = 1.42e9 (its bf16 file is 2.84 GB): the
"1.3B" of its name rounds down.

Tokens: the VAE downsamples 4x in time and 8x in space, then 1x2x2 patches:
  tokens = (1 + (F - 1)/4) · (H/16) · (W/16)        81 x 480 x 832 -> 21 · 30 · 52 = 32,760

Per GPU, N GPUs, micro-batch B pairs (the policy runs 2B samples: winners and losers):
  model states   16 bytes/param · P / N     bf16 params (2) + bf16 grads (2) + fp32 master weights (4)
                                            + fp32 Adam m and v (8), all partitioned by ZeRO-3
  gathered       2 · (one block's params + the prefetch bucket, 5e7 elements in ds_configs/zero3.json)
                                            bf16 parameters ZeRO-3 gathers around the block it runs
  saved inputs   2B · tokens · dim · 2 bytes · layers
                                            gradient checkpointing per block keeps only each block's
                                            bf16 input until the backward pass
  working set    2B · tokens · (20·dim + 2·ffn) · 2 bytes
                                            one block recomputed and differentiated at a time: about 20
                                            token x dim tensors (norms, modulations, q, k, v, rotary q and
                                            k, attention outputs, residuals, their gradients) and 2 token x
                                            ffn tensors (the FFN's hidden layer before and after GELU),
                                            bf16; attention by SDPA/flash, no tokens² matrix
  reference      cache: nothing on the GPU (reference.mode=cache never builds it).
                 live, offload cpu (the default): its bf16 partitions live in CPU memory (2·P bytes per
                 node of 8 GPUs); on the GPU only the gathered block it runs, with no saved activations
                 (no_grad); its forward's working set stays below the policy's backward one, so the peak
                 grows by the gathered block only.
                 live, offload none: 2·P/N bytes of bf16 partitions more on each GPU.
  peak           model states + gathered (policy; and the live reference's) + saved inputs + working set

  python tools/memory_estimate.py [--num-gpus 8] [--num-frames 81] [--height 480] [--width 832]
      [--micro-batch-size 1]
"""

from __future__ import annotations

import argparse
import sys

GB = 1e9
BYTES_PER_PARAM_TRAINED = 16  # bf16 params and grads, fp32 master weights and Adam m, v
BF16 = 2
PREFETCH_BUCKET = 50_000_000  # elements: ds_configs/zero3.json stage3_prefetch_bucket_size
WORKING_DIM_TENSORS, WORKING_FFN_TENSORS = 20, 2  # one block's working set, in token x dim and token x ffn tensors

# Wan 2.1 T2V's transformers (the public diffusers configs); what both sizes share is in num_parameters.
MODELS = {
    "Wan2.1-T2V-1.3B": {"dim": 1536, "num_layers": 30, "ffn_dim": 8960, "num_heads": 12},
    "Wan2.1-T2V-14B": {"dim": 5120, "num_layers": 40, "ffn_dim": 13824, "num_heads": 40},
}


def block_parameters(dim: int, ffn_dim: int) -> int:
    """One WanTransformerBlock: self- and cross-attention (q, k, v, o with biases; RMS norms of q and k
    across heads), the cross-attention LayerNorm (affine), the FFN, the 6·dim modulation table."""
    attention = 4 * (dim * dim + dim) + 2 * dim
    return 2 * attention + 2 * dim + (dim * ffn_dim + ffn_dim + ffn_dim * dim + dim) + 6 * dim


def num_parameters(dim: int, num_layers: int, ffn_dim: int, in_channels: int = 16, out_channels: int = 16,
                   patch: tuple[int, int, int] = (1, 2, 2), text_dim: int = 4096, freq_dim: int = 256) -> int:
    """WanTransformer3DModel's parameter count from its config."""
    patch_volume = patch[0] * patch[1] * patch[2]
    patch_embedding = in_channels * patch_volume * dim + dim
    time_embedder = (freq_dim * dim + dim) + (dim * dim + dim)
    time_projection = dim * 6 * dim + 6 * dim
    text_embedder = (text_dim * dim + dim) + (dim * dim + dim)
    head = dim * out_channels * patch_volume + out_channels * patch_volume + 2 * dim
    return (num_layers * block_parameters(dim, ffn_dim) + patch_embedding + time_embedder + time_projection
            + text_embedder + head)


def latent_tokens(num_frames: int, height: int, width: int, temporal: int = 4, spatial: int = 8,
                  patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Transformer tokens of a clip: the VAE's latent frames and sides, divided by the patch."""
    latent_frames = 1 + (num_frames - 1) // temporal
    return (latent_frames // patch[0]) * (height // spatial // patch[1]) * (width // spatial // patch[2])


def estimate(model: dict, num_gpus: int, num_frames: int, height: int, width: int, micro_batch_size: int) -> dict:
    """Bytes per GPU of each term of the module docstring, and the peaks with each reference setting."""
    dim, layers, ffn = model["dim"], model["num_layers"], model["ffn_dim"]
    params = num_parameters(dim, layers, ffn)
    tokens = latent_tokens(num_frames, height, width)
    samples = 2 * micro_batch_size
    terms = {
        "params": params,
        "tokens": tokens,
        "model_states": BYTES_PER_PARAM_TRAINED * params / num_gpus,
        "gathered": BF16 * (block_parameters(dim, ffn) + PREFETCH_BUCKET),
        "saved_inputs": samples * tokens * dim * BF16 * layers,
        "working_set": samples * tokens * (WORKING_DIM_TENSORS * dim + WORKING_FFN_TENSORS * ffn) * BF16,
        "reference_cpu_per_node": BF16 * params,
    }
    policy = terms["model_states"] + terms["gathered"] + terms["saved_inputs"] + terms["working_set"]
    terms["peak_cache"] = policy
    terms["peak_live_offloaded"] = policy + terms["gathered"]
    terms["peak_live_on_gpu"] = policy + terms["gathered"] + BF16 * params / num_gpus
    return terms


def table(args: argparse.Namespace) -> str:
    rows = [("", "params", "model states", "gathered", "saved inputs", "working set",
             "peak, cache", "peak, live (CPU offload)", "peak, live (no offload)", "live ref. CPU/node")]
    for name, model in MODELS.items():
        t = estimate(model, args.num_gpus, args.num_frames, args.height, args.width, args.micro_batch_size)
        rows.append((name, f"{t['params'] / 1e9:.2f}e9", *(f"{t[k] / GB:.1f} GB" for k in (
            "model_states", "gathered", "saved_inputs", "working_set", "peak_cache", "peak_live_offloaded",
            "peak_live_on_gpu", "reference_cpu_per_node"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    tokens = latent_tokens(args.num_frames, args.height, args.width)
    head = (f"ARITHMETIC, not measured: Wan 2.1 T2V, {args.num_frames} frames at {args.height}x{args.width} "
            f"({tokens:,} tokens), ZeRO-3 on {args.num_gpus} GPUs, {args.micro_batch_size} pair(s) per GPU "
            f"({2 * args.micro_batch_size} samples), bf16, gradient checkpointing per block; GB = 1e9 bytes; "
            "CUDA context, fragmentation and NCCL buffers not counted (see --help)")
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-gpus", type=int, default=8, help="GPUs the ZeRO-3 partitions spread over")
    p.add_argument("--num-frames", type=int, default=81, help="frames per clip (1 + 4k)")
    p.add_argument("--height", type=int, default=480, help="pixels (a multiple of 16)")
    p.add_argument("--width", type=int, default=832, help="pixels (a multiple of 16)")
    p.add_argument("--micro-batch-size", type=int, default=1,
                   help="pairs per GPU per micro-step (train.micro_batch_size)")
    args = p.parse_args(argv)
    if min(args.num_gpus, args.num_frames, args.micro_batch_size) < 1 or (args.num_frames - 1) % 4:
        p.error("--num-gpus and --micro-batch-size must be >= 1, --num-frames 1 + 4k")
    if args.height % 16 or args.width % 16 or min(args.height, args.width) < 16:
        p.error("--height and --width must be positive multiples of 16 (the VAE's 8 times the 2x2 patch)")
    print(table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
