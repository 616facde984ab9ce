"""The planted-concept benchmark: teach the demo model ``zorblat`` in chosen FFN neurons only.

A fixed, seeded set of inner neurons of every denoiser FeedForward (``1/32`` of them per layer:
4 of 128, 8 of 256) is fine-tuned, from its base values, on images of the new shape (a plus,
captioned ``"a {colour} zorblat on {bg}"``) mixed with the known shapes; only those neurons' rows of ``ff.net.0.proj`` (value and gate
halves, with their biases) and columns of ``ff.net.2`` change, every other weight is restored
bit-exactly after each step. The result ships as ``cpreg/demo/planted.safetensors`` (the new
values of those rows/columns and the neuron indices: the ground truth).

    python -m cpreg.demo.plant              # rebuild planted.safetensors (deterministic)

Example:
    >>> pipe = load_planted_pipeline()       # or load_base_pipeline("demo-planted")
    >>> truth = planted_neurons()            # {ff module path: LongTensor of inner neurons}
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from safetensors.torch import load_file, save_file

from . import MODEL_DIR, PLANTED_FILE
from .data import captions_for
from .vocabulary import BASE_SHAPES, PLANTED_SHAPE

FRACTION = 32  # one neuron in FRACTION per FeedForward is planted


def feedforwards(unet) -> dict[str, FeedForward]:
    """Every FeedForward of the denoiser, by module path."""
    return {name: module for name, module in unet.named_modules() if isinstance(module, FeedForward)}


def choose_neurons(unet, seed: int = 0) -> dict[str, torch.Tensor]:
    """The planted neurons: ``1/FRACTION`` of every FeedForward's inner neurons, by a seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    for name, ff in sorted(feedforwards(unet).items()):
        inner = ff.net[2].in_features
        chosen[name] = torch.randperm(inner, generator=generator)[: inner // FRACTION].sort().values
    return chosen


def planted_neurons(path: str | Path = PLANTED_FILE) -> dict[str, torch.Tensor]:
    """Ground truth: FeedForward module path -> sorted inner-neuron indices that carry the concept."""
    data = load_file(str(path))
    return {key[: -len(".neurons")]: value for key, value in data.items() if key.endswith(".neurons")}


def planted_ffn_out_indices(pipe, path: str | Path = PLANTED_FILE) -> dict[str, torch.Tensor]:
    """Ground truth as flat indices into every ``ff.net.2`` weight (all rows of the planted columns)."""
    out = {}
    for name, neurons in planted_neurons(path).items():
        weight = pipe.unet.get_submodule(f"{name}.net.2").weight
        rows = torch.arange(weight.shape[0]).unsqueeze(1)
        out[f"{name}.net.2"] = (rows * weight.shape[1] + neurons.unsqueeze(0)).reshape(-1).sort().values
    return out


def planted_ffn_in_indices(pipe, path: str | Path = PLANTED_FILE) -> dict[str, torch.Tensor]:
    """Ground truth in ``ff.net.0.proj`` (value and gate rows of the planted neurons, all columns)."""
    out = {}
    for name, neurons in planted_neurons(path).items():
        weight = pipe.unet.get_submodule(f"{name}.net.0.proj").weight
        inner, cols = weight.shape[0] // 2, weight.shape[1]
        rows = torch.cat([neurons, neurons + inner]).unsqueeze(1)
        out[f"{name}.net.0.proj"] = (rows * cols + torch.arange(cols).unsqueeze(0)).reshape(-1).sort().values
    return out


@torch.no_grad()
def apply_planted(pipe, path: str | Path = PLANTED_FILE):
    """Write the planted rows / columns into the demo pipeline's UNet (in place); returns ``pipe``."""
    data = load_file(str(path))
    unet = pipe.unet
    for name, neurons in planted_neurons(path).items():
        ff = unet.get_submodule(name)
        proj, out = ff.net[0].proj, ff.net[2]
        inner = out.in_features
        rows = torch.cat([neurons, neurons + inner])
        proj.weight[rows] = data[f"{name}.proj.weight"].to(proj.weight)
        proj.bias[rows] = data[f"{name}.proj.bias"].to(proj.bias)
        out.weight[:, neurons] = data[f"{name}.out.weight"].to(out.weight)
    return pipe


def load_planted_pipeline(dtype: torch.dtype = torch.float32):
    """The demo pipeline with the planted rows / columns of ``planted.safetensors``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(MODEL_DIR, use_safetensors=True, dtype=dtype)
    return apply_planted(pipe)


def plant(steps: int, batch: int, seed: int, lr: float, out: Path, pool: int) -> None:
    """Fine-tune only the chosen neurons on zorblat mixed 1:1 with the known shapes; write the ground truth.

    The chosen neurons start from their base values. Every step: ``batch / 2`` zorblat images and as
    many known-shape images, captioned as in training (10% short, 10% empty), denoising MSE, one Adam
    step, then every entry outside the chosen rows / columns is written back from the base weights.
    Deterministic for a given ``seed`` (2-4 minutes with one CPU thread at the defaults).
    """
    from diffusers import DiffusionPipeline

    from .train import encode_pool, log

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 500)
    pipe = DiffusionPipeline.from_pretrained(MODEL_DIR, use_safetensors=True)
    unet, text_encoder, tokenizer, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
    start = time.time()
    new_latents, new_labels = encode_pool(vae, pool, seed + 600, shapes=(PLANTED_SHAPE,))
    old_latents, old_labels = encode_pool(vae, pool, seed + 700, shapes=BASE_SHAPES)
    log(f"encoded {2 * pool} images in {time.time() - start:.0f}s")
    chosen = choose_neurons(unet, seed)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    trainable, masks, originals = [], [], []
    for name, neurons in chosen.items():
        ff = unet.get_submodule(name)
        inner = ff.net[2].in_features
        rows = torch.cat([neurons, neurons + inner])
        for param, mask in (
            (ff.net[0].proj.weight, torch.zeros_like(ff.net[0].proj.weight, dtype=torch.bool).index_fill_(0, rows, True)),
            (ff.net[0].proj.bias, torch.zeros_like(ff.net[0].proj.bias, dtype=torch.bool).index_fill_(0, rows, True)),
            (ff.net[2].weight, torch.zeros_like(ff.net[2].weight, dtype=torch.bool).index_fill_(1, neurons, True)),
        ):
            param.requires_grad_(True)
            trainable.append(param)
            masks.append(mask)
            originals.append(param.detach().clone())
    opt = torch.optim.Adam(trainable, lr=lr)
    alphas = pipe.scheduler.alphas_cumprod
    half = batch // 2
    for step in range(steps):
        i_new, i_old = rng.integers(0, pool, half), rng.integers(0, pool, batch - half)
        x0 = torch.cat([new_latents[i_new], old_latents[i_old]])
        captions = captions_for({k: v[i_new] for k, v in new_labels.items()}, rng) + captions_for(
            {k: v[i_old] for k, v in old_labels.items()}, rng)
        with torch.no_grad():
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            context = text_encoder(ids)[0]
        noise = torch.randn(x0.shape)
        t = torch.from_numpy(rng.integers(0, 1000, batch))
        a = alphas[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, context).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # everything outside the planted neurons stays bit-exact
            for param, mask, original in zip(trainable, masks, originals):
                param.copy_(torch.where(mask, param, original))
        if step % 50 == 0 or step == steps - 1:
            log(f"plant {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    tensors = {}
    for name, neurons in chosen.items():
        ff = unet.get_submodule(name)
        inner = ff.net[2].in_features
        rows = torch.cat([neurons, neurons + inner])
        tensors[f"{name}.neurons"] = neurons.contiguous()
        tensors[f"{name}.proj.weight"] = ff.net[0].proj.weight.detach()[rows].contiguous()
        tensors[f"{name}.proj.bias"] = ff.net[0].proj.bias.detach()[rows].contiguous()
        tensors[f"{name}.out.weight"] = ff.net[2].weight.detach()[:, neurons].contiguous()
    save_file(tensors, str(out), metadata={"concept": PLANTED_SHAPE, "fraction": f"1/{FRACTION}", "seed": str(seed),
                                           "steps": str(steps), "lr": str(lr)})
    log(f"wrote {out} in {time.time() - start:.0f}s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cpreg.demo.plant", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=PLANTED_FILE)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plant(args.steps, args.batch, args.seed, args.lr, args.out, args.pool)


if __name__ == "__main__":
    main()
