"""Tiny pipelines with random weights, built from configs: for tests, benchmarks and an offline quickstart.

Nothing is downloaded: the CLIP tokenizer vocabulary is written by :func:`write_tiny_tokenizer`.

Example:
    >>> pipe = build_tiny_pipeline("sd", seed=0)
    >>> pipe.save_pretrained("tiny-sd")  # loads with DiffusionPipeline.from_pretrained("tiny-sd")
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import InvalidArgumentError

#: Whole-word tokens of the tiny vocabulary (other words fall back to single characters).
TINY_WORDS = (
    "a photo of the in style painting naked man woman person dog cat car church tree house red blue green "
    "circle square triangle star zorblat glimmer van gogh monet picasso headshot landscape city street"
).split()

ARCHITECTURES = ("sd", "sdxl", "sd3")


def write_tiny_tokenizer(
    folder: str | Path, words: Sequence[str] = TINY_WORDS, model_max_length: int = 77, **tokenizer_kwargs
) -> CLIPTokenizer:
    """Write a CLIP BPE vocabulary (characters plus ``words`` as whole tokens) and load it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[str] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for char in string.ascii_lowercase + string.digits + string.punctuation:
        add(char)
        add(char + "</w>")
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # build the word left to right, one merge at a time
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            add(pieces[0])
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length, **tokenizer_kwargs
    )


def _text_config(tokenizer: CLIPTokenizer, hidden: int = 32, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _vae(latent_channels: int = 4) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
    )


_UNET_COMMON = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "norm_num_groups": 16,
}


def _ddim() -> DDIMScheduler:
    return DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_tiny_pipeline(architecture: str = "sd", seed: int = 0):
    """A randomly initialised pipeline of ``architecture`` (``sd``, ``sdxl`` or ``sd3``) on the CPU."""
    if architecture not in ARCHITECTURES:
        raise InvalidArgumentError(f"unknown tiny architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_tiny_tokenizer(folder)
    if architecture == "sd":
        unet = UNet2DConditionModel(
            **_UNET_COMMON,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        return StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=CLIPTextModel(_text_config(tokenizer)),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_ddim(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if architecture == "sdxl":
        unet = UNet2DConditionModel(
            **_UNET_COMMON,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
            cross_attention_dim=64,
        )
        return StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=CLIPTextModel(_text_config(tokenizer)),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, projection=32)),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=_ddim(),
        )
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer)),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
