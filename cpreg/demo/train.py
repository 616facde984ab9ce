"""Train the demo model and its classifier, deterministically, on the CPU (or a GPU).

    python -m cpreg.demo.train                                  # all stages, writes cpreg/demo/model and classifier
    python -m cpreg.demo.train --stage vae --work runs/demo     # one stage: vae, unet, classifier, assemble
    dvc repro benchmarks/demo/dvc.yaml                          # the same as a DVC stage (docs/erasure.md)

Stages keep their checkpoints in ``--work`` so a stage can be rerun alone (``--stage all`` without
``--work`` uses a temporary folder). Fixed seeds: the same arguments give the same bytes on one
machine and torch build, whatever ``--work`` is (tested with few steps). One thread by default
(``--threads``): two threads were ~6x *slower* per step on the shared 2-core machine the shipped
model was trained on.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from . import CLASSIFIER_FILE, MODEL_DIR, build
from .data import captions_for, render_batch, to_tensor
from .vocabulary import BASE_SHAPES, SHAPES


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur half of the images a little and add noise: generated images are softer than renders."""
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(x.shape[0], 1, 1, 1, generator=generator) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    return x + 0.05 * torch.randn(x.shape, generator=generator)


def train_vae(work: Path, steps: int, batch: int, seed: int) -> None:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = build.vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * (1 - s / steps)))
    start = time.time()
    for step in range(steps):
        images, _ = render_batch(rng, batch, SHAPES)
        x = to_tensor(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = F.mse_loss(recon, x) + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae {step}/{steps} mse {F.mse_loss(recon, x).item():.4f} kl {kl.item():.3f} ({time.time() - start:.0f}s)")
    vae.eval()
    with torch.no_grad():
        images, _ = render_batch(np.random.default_rng(seed + 1), 256, SHAPES)
        std = vae.encode(to_tensor(images)).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(work / "vae", safe_serialization=True)
    log(f"vae done in {time.time() - start:.0f}s, latent std {std:.3f}")


def train_classifier(work: Path, steps: int, batch: int, seed: int) -> None:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed + 100)
    model = build.ShapeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    start = time.time()
    for step in range(steps):
        images, labels = render_batch(rng, batch, SHAPES)
        x = augment(to_tensor(images), generator)
        shape_logits, colour_logits = model(x)
        loss = F.cross_entropy(shape_logits, torch.from_numpy(labels["shape"])) + F.cross_entropy(
            colour_logits, torch.from_numpy(labels["colour"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "classifier.safetensors"))
    log(f"classifier done in {time.time() - start:.0f}s")


def _load(model_class, work: Path, component: str):
    """A trained component from ``work``, named independently of where ``work`` is."""
    model = model_class.from_pretrained(work / component, use_safetensors=True).eval()
    if hasattr(model, "register_to_config"):  # diffusers models keep the load path in their saved config
        model.register_to_config(_name_or_path=f"cpreg-demo/{component}")
    return model


def _load_vae(work: Path):
    from diffusers import AutoencoderKL

    return _load(AutoencoderKL, work, "vae")


def encode_pool(vae, n: int, seed: int, shapes=BASE_SHAPES) -> tuple[torch.Tensor, dict]:
    """``n`` rendered images of ``shapes`` as scaled latent means, with their labels."""
    rng = np.random.default_rng(seed)
    images, labels = render_batch(rng, n, shapes)
    latents = []
    with torch.no_grad():
        for i in range(0, n, 256):
            latents.append(vae.encode(to_tensor(images[i : i + 256])).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(latents), labels


def train_unet(work: Path, steps: int, batch: int, seed: int, pool: int, lr: float) -> None:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 200)
    vae = _load_vae(work)
    start = time.time()
    latents, labels = encode_pool(vae, pool, seed + 300)
    log(f"encoded {pool} images in {time.time() - start:.0f}s, latent std {latents.std().item():.3f}")
    tokenizer = build.write_tokenizer(work / "tokenizer")
    text_encoder, unet, scheduler = build.text_encoder(tokenizer), build.unet((32, 64)), build.scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    alphas = scheduler.alphas_cumprod
    for step in range(steps):
        index = torch.from_numpy(rng.integers(0, pool, batch))
        x0 = latents[index]
        captions = captions_for({k: v[index.numpy()] for k, v in labels.items()}, rng)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn(x0.shape)
        t = torch.from_numpy(rng.integers(0, scheduler.config.num_train_timesteps, batch))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        if step % 50 == 0 or step == steps - 1:
            log(f"unet {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
        if (step + 1) % 500 == 0 or step == steps - 1:
            _save_unet(work, unet, text_encoder, params, ema)
    log(f"unet done in {time.time() - start:.0f}s")


def _save_unet(work: Path, unet, text_encoder, params, ema) -> None:
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.save_pretrained(work / "unet", safe_serialization=True)
    text_encoder.save_pretrained(work / "text_encoder", safe_serialization=True)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)


def assemble(work: Path, out: Path, classifier_out: Path) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build.write_tokenizer(work / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=_load_vae(work),
        text_encoder=_load(CLIPTextModel, work, "text_encoder"),
        tokenizer=tokenizer,
        unet=_load(UNet2DConditionModel, work, "unet"),
        scheduler=build.scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    classifier_out.write_bytes((work / "classifier.safetensors").read_bytes())
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"wrote {out} ({size / 1e6:.1f} MB) and {classifier_out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cpreg.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["all", "vae", "unet", "classifier", "assemble"], default="all")
    parser.add_argument("--work", type=Path, default=None, help="checkpoint folder (required unless --stage all)")
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--classifier-out", type=Path, default=CLASSIFIER_FILE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vae-steps", type=int, default=700)
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--pool", type=int, default=30000)
    parser.add_argument("--classifier-steps", type=int, default=1500)
    args = parser.parse_args(argv)
    if args.work is None and args.stage != "all":
        parser.error(f"--stage {args.stage} needs --work (the folder of the other stages' checkpoints)")
    torch.set_num_threads(args.threads)
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="cpreg-demo-train-") as work:
            args.work = Path(work)
            run(args)
    else:
        run(args)


def run(args: argparse.Namespace) -> None:
    """The stages ``args.stage`` selects, in order: vae, classifier, unet, assemble."""
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    if args.stage in ("all", "vae"):
        train_vae(args.work, args.vae_steps, 32, args.seed)
    if args.stage in ("all", "classifier"):
        train_classifier(args.work, args.classifier_steps, 64, args.seed)
    if args.stage in ("all", "unet"):
        train_unet(args.work, args.unet_steps, args.unet_batch, args.seed, args.pool, args.unet_lr)
    if args.stage in ("all", "assemble"):
        args.out.mkdir(parents=True, exist_ok=True)
        assemble(args.work, args.out, args.classifier_out)


if __name__ == "__main__":
    main()
