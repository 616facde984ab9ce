"""Architectures of the demo pipeline (Stable Diffusion classes, small) and of the demo classifier."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..tiny import write_tiny_tokenizer
from .vocabulary import COLOUR_NAMES, SHAPES, WORDS

MAX_TOKENS = 16


def write_tokenizer(folder: str | Path, words=WORDS) -> CLIPTokenizer:
    """A CLIP BPE tokenizer: single characters plus ``words`` as whole tokens (see ``cpreg.tiny``)."""
    return write_tiny_tokenizer(folder, words, model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")


def text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))


def vae() -> AutoencoderKL:
    """32x32x3 images <-> 4x8x8 latents."""
    return AutoencoderKL(
        block_out_channels=(16, 32, 32), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
    )


def unet(channels=(64, 128)) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


class ShapeClassifier(nn.Module):
    """Small CNN: 32x32 image in [-1, 1] -> logits over SHAPES and COLOUR_NAMES."""

    def __init__(self) -> None:
        super().__init__()
        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.shape_head = nn.Linear(64, len(SHAPES))
        self.colour_head = nn.Linear(64, len(COLOUR_NAMES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.shape_head(h), self.colour_head(h)
