"""Train the built-in model on the shapes world (`shapes.py` here): `python -m scripts.builtin.train`.

Four stages, each with the project's own modules, each resumable (run the same command again after a stop):

1. text   the built-in tokenizers and text encoders (CLIP-L, CLIP-G, T5: random, seeded) are written, and every
          caption of the world (1,464 of them, plus "" for classifier-free guidance) is encoded once through
          `loaders.text`, exactly as generation will encode it (the features the MM-DiT trains on with
          `--no-train-text`; by default the encoders start from these weights and train with it, stage 4).
          `--clip-length` sets the CLIP part of the text sequence (the tokenizers' model_max_length and the
          CLIPs' positions): 16 as shipped (every caption of the world fits), which makes the MM-DiT's text
          16 + 16 tokens; released models use 77.
2. vae    the 16-channel autoencoder (`mmdit.vae`) on random 64x64 crops of rendered scenes: L1 + L2
          reconstruction from the latent plus a noise of a tenth of its own spread (which the posterior's
          log-variance is trained to report, instead of a KL term), a penalty that keeps the latents as the
          MM-DiT sees them, (z - shift)·scale with SD3's constants (what a single file implies), at zero mean.
          The variance is not pushed to 1 during training: an encoder asked for that on mostly empty scenes
          paints a strong fixed pattern over the background (it still paints a weaker one: docs/builtin-model.md). A final exact per-channel rescale makes each channel's variance 1.
3. latents  `--scenes` random scenes are rendered and encoded once (posterior mean).
4. dit    the MM-DiT (SD3.5-Medium form: dual attention, QK-norm, 64-wide heads) with SD3's rectified-flow
          objective (Esser et al. 2024, §2 and §3.1): x_t = (1 - t)·x0 + t·ε, target v = ε - x0, t drawn
          logit-normal(0, 1); captions dropped to "" 10% of the time (for CFG); AdamW with warm-up and cosine
          decay; an exponential moving average of the weights is what gets shipped. `--bf16` runs its forward
          and backward under bfloat16 autocast; weights, optimiser state and the average stay float32. It is
          on by default only where the CPU has bfloat16 arithmetic (elsewhere autocast emulates it, many times
          slower than float32).
          `--train-text` (the default) trains the three text encoders with it, end to end, on the same loss
          (`TextTower` says why), for the first `--text-steps` steps; then they are frozen and every caption
          encoded once with them, which makes the remaining steps about 1.3x faster. They are exported in place of
          the random ones.

The result is written in the official Stability single-file layout (`loaders.builtin` documents it) into
`--dest` (default: the repository's built-in model folder). Progress goes to `<work>/train.log`.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from loaders import builtin
from loaders.text import EncoderFile, TextFiles, encode_prompts
from loaders.text_encoders import load_clip, load_t5
from loaders.tokenizers import ClipTokenizer, T5Tokenizer
from mmdit.clip import CLIPConfig, CLIPTextModel
from mmdit.conditioning import CLIP_TOKENS, assemble
from mmdit.model import MMDiT
from mmdit.t5 import T5Encoder
from mmdit.vae import VAE
from scripts.builtin import shapes
from scripts.builtin.tokenizers import write_builtin_tokenizers
from tests.random_weights import randomize_


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("out/train_builtin"), help="checkpoints, latents and the log")
    p.add_argument("--dest", type=Path, default=builtin.MODEL_DIR, help="where the finished model is written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-crop", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--scenes", type=int, default=16000, help="scenes encoded once for the MM-DiT")
    p.add_argument("--dit-steps", type=int, default=10000)
    p.add_argument("--dit-stop-at", type=int, default=None, metavar="STEP",
                   help="save the MM-DiT's checkpoint after this step and stop (resume with the same command "
                        "without it); the learning-rate schedule still spans --dit-steps")
    p.add_argument("--dit-batch", type=int, default=32)
    p.add_argument("--dit-lr", type=float, default=6e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clip-length", type=int, default=16,
                   help=f"CLIP tokens in the text sequence: the CLIP tokenizers' model_max_length and the CLIP "
                        f"encoders' positions (default 16, as shipped: the captions fit; released models use "
                        f"{CLIP_TOKENS})")
    p.add_argument("--train-text", action=argparse.BooleanOptionalAction, default=True,
                   help="train the three text encoders with the MM-DiT, end to end (default; --no-train-text keeps "
                        "them random and frozen, every caption encoded once)")
    p.add_argument("--text-steps", type=int, default=3000, metavar="STEP",
                   help="with --train-text: the text encoders train for the first STEP MM-DiT steps and are then "
                        "frozen, every caption encoded once with their weights at that step (a step without them "
                        "is about 1.3x faster; 0 or >= --dit-steps: they train to the end)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="MM-DiT forward and backward under bfloat16 autocast (weights, AdamW and EMA stay float32; "
                        "the shipped model was trained with it). Default: on where the CPU computes bfloat16 "
                        "natively (AVX512-BF16 or AMX), off elsewhere, where autocast emulates it about 15x slower")
    args = p.parse_args(argv)
    if args.bf16 is None:
        args.bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if args.text_steps < 0:
        p.error("--text-steps must be 0 or more")
    if args.clip_length < 2:
        p.error("--clip-length must leave room for CLIP's start and end tokens (at least 2)")
    return args


class Log:
    def __init__(self, path: Path):
        self.path, self.start = path, time.time()

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} +{(time.time() - self.start) / 60:6.1f} min  {message}"
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimise_(opt: torch.optim.Optimizer, model: nn.Module, loss: Tensor, lr: float) -> None:
    """One AdamW step on `loss` at learning rate `lr`, the gradient's norm clipped to 1."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def to_tensor(images: list[np.ndarray]) -> Tensor:
    """uint8 (H, W, 3) images -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------------
# Stage 1: text encoders and every caption's encoding


def frozen_random(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """The text encoders' weights: fan-in-scaled matrices, small biases, norm weights near 1."""
    return randomize_(module, generator, bias_std=0.02, norm_std=0.1)


def state(module: nn.Module, prefix: str = "", dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    return {prefix + k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}


def write_text_side(folder: Path, seed: int, clip_length: int = CLIP_TOKENS) -> None:
    """tokenizer/, tokenizer_2/, tokenizer_3/ and text_encoders/ as Stability ships them, the CLIPs (tokenizers
    and encoders) with `clip_length` positions.

    The CLIPs are drawn with 77 positions, as released (or more), and keep the first `clip_length`: every other
    weight, T5's too, is the same for every length, and as CLIP is causal a caption that fits gets the same
    features at its positions whatever the length; only the padding after it changes.
    """
    g = torch.Generator().manual_seed(seed)
    encoders = folder / "text_encoders"
    encoders.mkdir(parents=True, exist_ok=True)
    clip_l_config, clip_g_config = builtin.clip_configs(max(clip_length, CLIP_TOKENS))

    def clip_state(config: CLIPConfig) -> dict[str, Tensor]:
        weights = state(frozen_random(CLIPTextModel(config), g))
        key = "text_model.embeddings.position_embedding.weight"
        weights[key] = weights[key][:clip_length].contiguous()
        return weights

    clip_l = clip_state(clip_l_config)
    del clip_l["text_projection.weight"]  # as in Stability's clip_l.safetensors: SD3 uses CLIP-L unprojected
    save_file(clip_l, str(encoders / "clip_l.safetensors"))
    save_file(clip_state(clip_g_config), str(encoders / "clip_g.safetensors"))
    t5 = state(frozen_random(T5Encoder(builtin.T5), g), dtype=torch.float16)
    save_file(t5, str(encoders / "t5xxl_fp16.safetensors"))
    write_builtin_tokenizers(folder, clip_length)


def all_captions() -> list[str]:
    """Every caption of the world, in a fixed order: 1, 2 and 3 distinct objects in every order."""
    kinds = shapes.all_kinds()
    out = [[k] for k in kinds]
    out += [[a, b] for a in kinds for b in kinds if a != b]
    out += [[a, b, c] for a in kinds for b in kinds for c in kinds if len({a, b, c}) == 3]
    return [" and ".join(f"a {c} {s}" for c, s in objs) for objs in out]


def encode_captions(model_dir: Path, captions: list[str]) -> tuple[Tensor, Tensor]:
    """(N, L_clip + L_t5, context_dim) contexts and (N, pooled_dim) pooled vectors, as generation computes them
    (L_clip: the tokenizers' CLIP length). A caption that does not fit is an error: the model would learn a
    cut caption."""
    enc = model_dir / "text_encoders"
    files = TextFiles(EncoderFile(enc / "clip_l.safetensors"), EncoderFile(enc / "clip_g.safetensors"),
                      EncoderFile(enc / "t5xxl_fp16.safetensors"), *(model_dir / f"tokenizer{s}" for s in ("", "_2", "_3")))
    contexts, pooled = [], []
    for i in range(0, len(captions), 256):
        e = encode_prompts(files, captions[i : i + 256], None, max_sequence_length=builtin.PRESET.max_sequence_length,
                           context_dim=builtin.TRANSFORMER.context_dim)
        if e.truncated:
            raise SystemExit("text: captions do not fit the text sequence (cut by CLIP: raise --clip-length):\n"
                             + "\n".join(e.truncated))
        contexts.append(e.positive.context)
        pooled.append(e.positive.pooled)
    return torch.cat(contexts), torch.cat(pooled)


class TextTower(nn.Module):
    """CLIP-L, CLIP-G and T5 as one trainable module: caption indices -> SD3's (context, pooled), built by
    `mmdit.conditioning.assemble` exactly as generation builds it from the same encoders.

    Why train them: frozen random encoders give each word a fixed vector, but nothing ties a colour to the
    shape that follows it (T5 has no absolute positions; CLIP mixes the earlier words at random). The MM-DiT
    trained on them drew the named colours and the named shapes but bound them at random: with two objects
    of different shapes, a named colour's object had its own shape as often as the other object's (docs/builtin-model.md). Trained end to end, the encoders can put each colour into its shape's token.
    """

    def __init__(self, folder: Path, captions: list[str], clip_length: int, t5_length: int, context_dim: int):
        super().__init__()
        enc = folder / "text_encoders"
        self.clip_l = load_clip(enc / "clip_l.safetensors", activation="quick_gelu")
        self.clip_g = load_clip(enc / "clip_g.safetensors", activation="gelu")
        self.t5 = load_t5(enc / "t5xxl_fp16.safetensors")
        for p in self.parameters():
            p.requires_grad_(True)
        # Stability's clip_l file has no projection (the loader makes it the identity); it must stay one.
        self.clip_l.text_projection.weight.requires_grad_(False)
        # Every caption's token ids, once: (N, clip_length), (N, clip_length), (N, t5_length). Plain attributes,
        # not buffers, so they are neither averaged nor saved.
        self.ids = (ClipTokenizer.from_folder(folder / "tokenizer").encode(captions, clip_length).ids,
                    ClipTokenizer.from_folder(folder / "tokenizer_2").encode(captions, clip_length).ids,
                    T5Tokenizer.from_folder(folder / "tokenizer_3").encode(captions, t5_length).ids)
        self.t5_length, self.context_dim = t5_length, context_dim

    def forward(self, caption: Tensor) -> tuple[Tensor, Tensor]:
        ids_l, ids_g, ids_t5 = (ids[caption] for ids in self.ids)
        c = assemble(self.clip_l(ids_l), self.clip_g(ids_g), self.t5(ids_t5), t5_length=self.t5_length,
                     context_dim=self.context_dim)
        return c.context, c.pooled  # (B, L_clip + L_t5, context_dim), (B, pooled_dim)

    @torch.no_grad()
    def freeze(self, bf16: bool) -> tuple[Tensor, Tensor]:
        """Stop training: every caption's (context, pooled) with the weights as they are, computed under the same
        autocast as the training steps were, so the MM-DiT goes on seeing exactly the features it saw."""
        self.requires_grad_(False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return self(torch.arange(len(self.ids[0])))


# ----------------------------------------------------------------------------------------------------------
# Stage 2: the VAE


def latent_moments(vae: VAE, images: Tensor) -> tuple[Tensor, Tensor]:
    mean, logvar = vae.encoder(images).chunk(2, dim=1)
    return mean, logvar.clamp(-30, 20)


def normalised(vae: VAE, z: Tensor) -> Tensor:
    return (z - vae.config.shift_factor) * vae.config.scaling_factor  # what the MM-DiT sees


def train_vae(args: argparse.Namespace, log: Log) -> VAE:
    ckpt = args.work / "vae.pt"
    torch.manual_seed(args.seed)
    vae = VAE(builtin.VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    rng, g, step = random.Random(args.seed + 1), torch.Generator().manual_seed(args.seed + 2), 0
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        rng.setstate(saved["rng"])
        g.set_state(saved["g"])
        step = saved["step"]
        log(f"vae: resumed at step {step}")
    if step >= args.vae_steps:
        return vae
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, {args.vae_steps} steps of "
        f"{args.vae_batch} crops {args.vae_crop}px")
    last_save, c = time.time(), args.vae_crop
    # A small posterior noise, a tenth of each channel's spread, instead of a KL term: the decoder learns to
    # ignore small latent errors and the latents keep their precision.
    while step < args.vae_steps:
        crops = []
        for _ in range(args.vae_batch):
            image = shapes.render(shapes.random_scene(rng))
            x0, y0 = rng.randint(0, shapes.SIZE - c), rng.randint(0, shapes.SIZE - c)
            crops.append(image[y0 : y0 + c, x0 : x0 + c])
        x = to_tensor(crops)
        mean, logvar = latent_moments(vae, x)
        noise = 0.1 * mean.detach().std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-3)  # (1, C, 1, 1)
        z = mean + noise * torch.randn(mean.shape, generator=g)
        y = vae.decoder(z)
        recon = (y - x).abs().mean() + (y - x).pow(2).mean()
        m = normalised(vae, mean)
        moments = m.mean(dim=(0, 2, 3)).pow(2).mean()
        posterior = (logvar - 2 * noise.log()).pow(2).mean()  # the posterior says what noise was trained
        optimise_(opt, vae, recon + 0.1 * moments + 0.01 * posterior, cosine_lr(step, args.vae_steps, args.vae_lr))
        step += 1
        if step % 50 == 0 or step == args.vae_steps:
            log(f"vae step {step}/{args.vae_steps}  recon {recon.item():.4f}  moments {moments.item():.4f}  "
                f"posterior {posterior.item():.4f}")
        if time.time() - last_save > 120 or step == args.vae_steps:
            save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(),
                         "g": g.get_state(), "step": step}, ckpt)
            last_save = time.time()
    return vae


@torch.no_grad()
def unit_variance_(vae: VAE, seed: int, count: int = 512) -> tuple[Tensor, float]:
    """Rescale each latent channel so that its normalised variance on `count` scenes is exactly 1.

    z -> a·z per channel is exact on both sides: the encoder's mean channels (weight and bias of conv_out)
    are multiplied by a, its log-variance channels get + 2·log a, and the decoder's first convolution divides
    its input channels by a (zero padding stays zero). Returns the per-channel factors, and how much the latent
    of an empty scene varies over the image (its spread per channel, in units of the latents' spread), which
    should be small: the background is the same everywhere.
    """
    rng = random.Random(seed)
    images = to_tensor([shapes.render(shapes.random_scene(rng)) for _ in range(count)])
    mean = torch.cat([latent_moments(vae, images[i : i + 64])[0] for i in range(0, count, 64)])
    m = normalised(vae, mean)
    a = 1 / m.std(dim=(0, 2, 3))  # (C,) for the normalised latent; the shift is absorbed as below
    # normalised' = a·(z - shift)·scale  <=>  z' = a·z + (1 - a)·shift
    C = vae.config.latent_channels
    conv = vae.encoder.conv_out
    conv.weight[:C] *= a[:, None, None, None]
    conv.bias[:C] = a * conv.bias[:C] + (1 - a) * vae.config.shift_factor
    conv.bias[C:] += 2 * torch.log(a)
    # decoder input: z = (z' - (1 - a)·shift) / a; the constant part goes into the bias (exact away from the
    # border; the shift term is tiny, 0.06·(1 - a), and the penalty kept the mean there).
    dec = vae.decoder.conv_in
    offset = (1 - a) * vae.config.shift_factor / a  # (C,): z = z'/a - offset
    dec.bias -= (dec.weight * offset[None, :, None, None]).sum(dim=(1, 2, 3))
    dec.weight /= a[None, :, None, None]
    empty = normalised(vae, latent_moments(vae, to_tensor([shapes.render(shapes.Scene(()))]))[0])
    return a, float(empty.std(dim=(2, 3)).mean())


# ----------------------------------------------------------------------------------------------------------
# Stage 3: the dataset of latents


@torch.no_grad()
def encode_scenes(vae: VAE, count: int, seed: int, caption_index: dict[str, int]) -> tuple[Tensor, Tensor]:
    """(N, 16, 16, 16) normalised latents (posterior mean) and (N,) caption indices of `count` random scenes."""
    rng = random.Random(seed)
    latents, labels = [], []
    vae = vae.to(memory_format=torch.channels_last)  # ~1.4x faster convolutions on CPU for inference
    for start in range(0, count, 256):
        scenes = [shapes.random_scene(rng) for _ in range(min(256, count - start))]
        x = to_tensor([shapes.render(s) for s in scenes]).to(memory_format=torch.channels_last)
        latents.append(normalised(vae, latent_moments(vae, x)[0]))
        labels += [caption_index[s.caption] for s in scenes]
    return torch.cat(latents), torch.tensor(labels)


# ----------------------------------------------------------------------------------------------------------
# Stage 4: the MM-DiT


def dit_init_(model: MMDiT) -> MMDiT:
    """DiT's initialisation (Peebles & Xie 2023, §3.2 "adaLN-Zero"): Xavier linears, every block starts as
    the identity (modulation and final projection zero), timestep/pooled MLPs N(0, 0.02)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = model.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(model.x_embedder.proj.bias)
        for mlp in (model.t_embedder.mlp, model.y_embedder.mlp):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        zeroed = [stream.adaLN_modulation[1] for block in model.joint_blocks
                  for stream in (block.x_block, block.context_block)]
        for layer in [*zeroed, model.final_layer.adaLN_modulation[1], model.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        model.pos_embed.copy_(builtin.position_table(model.config.dim, model.config.pos_embed_max_size))
    return model


def train_dit(args: argparse.Namespace, log: Log, latents: Tensor, labels: Tensor, contexts: Tensor,
              pooled: Tensor, empty: int, text: TextTower | None = None) -> MMDiT | None:
    """The MM-DiT, and with `text` the text encoders with it (then `contexts` and `pooled`, the random encoders'
    features, are not used) for the first `--text-steps`; from then on the encoders are frozen and their
    features computed once. The exponential moving average is loaded into both at the end (the encoders' is
    their weights at the freeze). None when `--dit-stop-at` stopped it early (its checkpoint is saved)."""
    ckpt = args.work / "dit.pt"
    torch.manual_seed(args.seed + 3)
    model = dit_init_(MMDiT(builtin.TRANSFORMER))
    nets = nn.ModuleDict({"dit": model} if text is None else {"dit": model, "text": text})
    ema = {k: v.detach().clone() for k, v in nets.state_dict().items()}
    trained = [p for p in nets.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.dit_lr, betas=(0.9, 0.99), weight_decay=0.0)
    g, step = torch.Generator().manual_seed(args.seed + 4), 0
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        if set(saved["ema"]) != set(ema):  # a --work folder of a run with(out) --train-text
            raise SystemExit(f"{ckpt} is from a run {'with' if text is None else 'without'} --train-text; use a "
                             "fresh --work folder, or the same setting")
        nets.load_state_dict(saved["model"])
        ema = saved["ema"]
        opt.load_state_dict(saved["opt"])
        g.set_state(saved["g"])
        step = saved["step"]
        log(f"dit: resumed at step {step}")
    freeze_at = args.text_steps if text is not None and 0 < args.text_steps < args.dit_steps else None
    if step < args.dit_steps:
        def count(m: nn.Module) -> str:
            return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"

        with_text = "" if text is None else (f" (+ {count(text)} of text encoders, trained with it"
                                             + ("" if freeze_at is None else f" for the first {freeze_at} steps") + ")")
        log(f"dit: {count(model)} parameters{with_text}, {args.dit_steps} steps of {args.dit_batch}, "
            f"{len(latents)} scenes")
    last_save, running = time.time(), None
    params = dict(nets.named_parameters())
    stop = args.dit_steps if args.dit_stop_at is None else min(args.dit_steps, args.dit_stop_at)
    live = text  # the encoders while they train; None once frozen (or when they never train)

    def freeze() -> tuple[Tensor, Tensor]:
        features = text.freeze(args.bf16)
        for name, p in text.named_parameters(prefix="text"):
            ema[name] = p.detach().clone()  # what ships is what the MM-DiT trains on from here
            params.pop(name)
        log(f"dit: text encoders frozen from step {freeze_at} on, {len(features[0])} captions encoded once")
        return features

    while step < stop:
        if live is not None and freeze_at is not None and step >= freeze_at:  # here, or resumed after it
            (contexts, pooled), live = freeze(), None
        idx = torch.randint(len(latents), (args.dit_batch,), generator=g)
        x0 = latents[idx]
        caption = labels[idx].clone()
        caption[torch.rand(args.dit_batch, generator=g) < args.caption_dropout] = empty
        t = torch.sigmoid(torch.randn(args.dit_batch, generator=g))  # logit-normal(0, 1), SD3 paper §3.1
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        # Only the forward is under autocast (as PyTorch advises); the backward runs each op in the dtype its
        # forward used. Disabled (the default), the context changes nothing.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            context, vector = (contexts[caption], pooled[caption]) if live is None else live(caption)
            v = model(xt, t * 1000, context, vector)
            loss = F.mse_loss(v.float(), noise - x0)
        optimise_(opt, nets, loss, cosine_lr(step, args.dit_steps, args.dit_lr))
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in params.items():
                ema[k].mul_(decay).add_(p.detach(), alpha=1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == args.dit_steps:
            log(f"dit step {step}/{args.dit_steps}  loss {running:.4f}  lr {opt.param_groups[0]['lr']:.2e}")
        if time.time() - last_save > 120 or step in (stop, args.dit_steps):
            save_atomic({"model": nets.state_dict(), "ema": ema, "opt": opt.state_dict(), "g": g.get_state(),
                         "step": step}, ckpt)
            last_save = time.time()
    if step < args.dit_steps:  # stopped by --dit-stop-at: the checkpoint holds everything
        return None
    nets.load_state_dict(ema)
    return model


# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log = Log(args.work / "train.log")
    log(f"start: {vars(args)}")
    text_dir = args.work / "model"

    # 1. text side, and every caption encoded once
    captions = all_captions() + [""]
    text_file = args.work / "text.pt"
    if not text_file.exists():
        write_text_side(text_dir, args.seed, args.clip_length)
        contexts, pooled = encode_captions(text_dir, captions)
        save_atomic({"contexts": contexts, "pooled": pooled, "captions": captions}, text_file)
        log(f"text: {len(captions)} captions encoded, context {tuple(contexts.shape)}")
    saved = torch.load(text_file, weights_only=False)
    contexts, pooled = saved["contexts"], saved["pooled"]
    assert saved["captions"] == captions
    clip_part = contexts.shape[1] - builtin.PRESET.max_sequence_length
    if clip_part != args.clip_length:  # a --work folder from a run with another length: resuming would mix them
        raise SystemExit(f"{text_file} holds captions encoded with {clip_part} CLIP tokens, not --clip-length "
                         f"{args.clip_length}; use a fresh --work folder (or that length)")

    # 2. the VAE
    vae_file = args.work / "vae_final.pt"
    if not vae_file.exists():
        vae = train_vae(args, log)
        factors, pattern = unit_variance_(vae, args.seed + 5)
        log(f"vae: per-channel rescale factors {factors.min().item():.3f}..{factors.max().item():.3f}, "
            f"spread of an empty scene's latent {pattern:.3f}")
        save_atomic({"model": vae.state_dict()}, vae_file)
    vae = VAE(builtin.VAE_CONFIG)
    vae.load_state_dict(torch.load(vae_file, weights_only=False)["model"])
    vae.eval()

    # 3. latents, encoded once
    latent_file = args.work / "latents.pt"
    if not latent_file.exists():
        index = {c: i for i, c in enumerate(captions)}
        latents, labels = encode_scenes(vae, args.scenes, args.seed + 6, index)
        save_atomic({"latents": latents, "labels": labels}, latent_file)
        log(f"latents: {tuple(latents.shape)}, mean {latents.mean().item():.3f}, std {latents.std().item():.3f}")
    data = torch.load(latent_file, weights_only=False)

    # 4. the MM-DiT (and the text encoders)
    text = None
    if args.train_text:
        text = TextTower(text_dir, captions, args.clip_length, builtin.PRESET.max_sequence_length,
                         builtin.TRANSFORMER.context_dim)
    model = train_dit(args, log, data["latents"], data["labels"], contexts, pooled, empty=len(captions) - 1,
                      text=text)
    if model is None:
        log(f"dit: stopped at step {args.dit_stop_at} (--dit-stop-at); run again without it to go on")
        return 0

    # 5. the model files
    export(model, vae, text_dir, args.dest, text)
    log(f"done: wrote {args.dest}")
    return 0


def export(model: MMDiT, vae: VAE, text_dir: Path, dest: Path, text: TextTower | None = None) -> None:
    """The single file (MM-DiT and VAE), text encoders and tokenizers, as Stability ships them.

    Every weight is stored in float16, which keeps the whole model under the 25 MB the repository allows for
    it; training kept float32 weights. With `text`, its trained encoders replace the random ones, each file
    with exactly the keys the random one had (so CLIP-L stays without a projection).
    """
    trained = {} if text is None else {"clip_l": text.clip_l, "clip_g": text.clip_g, "t5xxl_fp16": text.t5}
    dest.mkdir(parents=True, exist_ok=True)
    tensors = {**state(model, "model.diffusion_model.", torch.float16), **state(vae, "first_stage_model.", torch.float16)}
    save_file(tensors, str(dest / builtin.FILE_NAME))
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if (dest / name).exists():
            shutil.rmtree(dest / name)
        shutil.copytree(text_dir / name, dest / name)
    (dest / "text_encoders").mkdir(exist_ok=True)
    for file in sorted((text_dir / "text_encoders").glob("*.safetensors")):
        weights = load_file(str(file))
        if file.stem in trained:
            new = trained[file.stem].state_dict()
            weights = {k: new[k] for k in weights}  # a KeyError here is a bug: the keys must match the file's
        save_file({k: v.to(torch.float16) for k, v in weights.items()}, str(dest / "text_encoders" / file.name))


if __name__ == "__main__":
    raise SystemExit(main())
