"""Tiny models built from config for tests of the tools, nothing downloaded.

build_tiny_sdxl / build_tiny_sd15: an SDXL- / SD 1.5-layout model folder (vae/, text_encoder(_2)/, tokenizer(_2)/, unet/, scheduler/)
whose UNet is tools/make_synthetic.py's (SDXL.TINY_DENOISER_CONFIG, seed 0), the same weights the `tiny`
fixture trains from. build_tiny_wan: a Wan 2.1-layout folder (causal 3D VAE, UMT5 encoder, a word-level
tokenizer over WORDS, make_synthetic's tiny transformer, the family's scheduler). build_tiny_clip: a
CLIPModel folder with its tokenizer and image processor, the layout of PickScore-style preference models.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 64  # latents 8 x 8 with the 4-level tiny VAE, as SDXL.TINY_DENOISER_CONFIG expects
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789!,."
# The tiny Wan VAE's per-channel latent statistics (Wan normalises latents by them) and its tokenizer's words.
LATENTS_MEAN, LATENTS_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.8, 1.2, 2.0]
WORDS = "the a video of number moving red square on blue".split()


def _make_synthetic():
    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "tools" / "make_synthetic.py")
    make_synthetic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_synthetic)
    return make_synthetic


def write_tokenizer(folder: Path) -> dict[str, int]:
    """A CLIP BPE tokenizer over single characters (plus 'the'), saved to `folder`; returns its vocabulary."""
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab.update({c + "</w>": len(CHARS) + i for i, c in enumerate(CHARS)})
    for token in ("th", "the</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[("t", "h"), ("th", "e</w>")], model_max_length=77)
    tokenizer.save_pretrained(str(folder))
    return vocab


def _text_config(vocab: dict[str, int], **sizes) -> dict:
    return dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **sizes)


def build_tiny_sdxl(root: Path) -> Path:
    """vae/, text_encoder(_2)/, tokenizer(_2)/, unet/, scheduler/: SDXL's layout at toy sizes.

    Text hidden sizes 32 + 32 = the tiny UNet's cross_attention_dim 64; the pooled projection (32)
    plus 6 time ids x 8 = its projection_class_embeddings_input_dim 80.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _make_synthetic().write_model(str(root), seed=0)

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[8, 8, 16, 16], norm_num_groups=8, latent_channels=4,
                        sample_size=RESOLUTION, scaling_factor=0.13025)
    vae.save_pretrained(str(root / "vae"), safe_serialization=True)
    for suffix, cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        vocab = write_tokenizer(root / f"tokenizer{suffix}")
        cls(CLIPTextConfig(**_text_config(vocab, projection_dim=32))).save_pretrained(
            str(root / f"text_encoder{suffix}"), safe_serialization=True)
    return root


def build_tiny_sd15(root: Path) -> Path:
    """vae/, text_encoder/, tokenizer/, unet/, scheduler/: SD 1.5's layout at toy sizes; the UNet is
    tools/make_synthetic.py's for --family sd15 (SD15.TINY_DENOISER_CONFIG, seed 0), its text width 32."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    _make_synthetic().write_model(str(root), seed=0, family="sd15")

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[8, 8, 16, 16], norm_num_groups=8, latent_channels=4,
                        sample_size=RESOLUTION, scaling_factor=0.18215)
    vae.save_pretrained(str(root / "vae"), safe_serialization=True)
    vocab = write_tokenizer(root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(**_text_config(vocab))).save_pretrained(str(root / "text_encoder"),
                                                                        safe_serialization=True)
    return root


def build_tiny_wan(root: Path) -> Path:
    """vae/ (AutoencoderKLWan), text_encoder/ (UMT5EncoderModel), tokenizer/, transformer/, scheduler/: Wan 2.1's
    layout at toy sizes. The transformer is tools/make_synthetic.py's for --family wan (seed 0); the VAE's 4
    latent channels and the encoder's width 32 are its in_channels and text_dim."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    _make_synthetic().write_model(str(root), seed=0, family="wan")
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN,
                           latents_std=LATENTS_STD)
    vae.save_pretrained(str(root / "vae"), safe_serialization=True)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    for i in range(10):
        vocab[str(i)] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=512).save_pretrained(str(root / "tokenizer"))
    config = UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(config).save_pretrained(str(root / "text_encoder"), safe_serialization=True)
    return root


def build_tiny_clip(root: Path, seed: int = 0) -> Path:
    """A CLIPModel (32-pixel images, 8-pixel patches, 16-d embeddings), tokenizer and image processor in `root`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    vocab = write_tokenizer(root)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    config = CLIPConfig(text_config=_text_config(vocab), vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(str(root), safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(root))
    return root
