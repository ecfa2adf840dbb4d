"""How much float8 weights change the MM-DiT's and T5's outputs: `python -m scripts.bench.fp8_error [--json FILE]`.

For each model (random tiny ones shaped like the test models, the trained built-in MM-DiT, and real-width
models with two blocks: SD3.5-Large's MM-DiT at width 2432, T5-XXL at width 4096), the same inputs go through
the float32 model and through copies whose linear layers are float8 e4m3fn (`quantize_linears` below), with
one scale per tensor (what `--weights fp8` stores) and one per output row, all computing in float32 so that only
the rounding of the weights differs. The bfloat16 model's error is printed beside them for scale.
Errors: max|Δ| / max|reference| ("of the output scale") and rms(Δ) / rms(reference); "weights" is the
rounding error of all linear weights together, ‖W − Ŵ‖ / ‖W‖. Random weights are Gaussian
(`tests/random_weights.py`), so they have none of the outlier rows trained weights can have; the built-in model
is the one trained model here.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from loaders import Pipeline
from mmdit.fp8 import FP8Linear, FP8Spec, quantize
from mmdit.model import MMDiT, MMDiTConfig
from mmdit.t5 import T5Config, T5Encoder
from tests.random_weights import randomize_

MMDIT_CASES = {
    "sd3-medium, tiny": MMDiTConfig(depth=2, num_heads=2, head_dim=16, pos_embed_max_size=16, context_dim=64,
                                    pooled_dim=48, qk_norm=False),
    "sd3.5-medium, tiny": MMDiTConfig(depth=3, num_heads=2, head_dim=16, pos_embed_max_size=16, context_dim=64,
                                      pooled_dim=48, dual_attention_layers=(0, 1)),
    "sd3.5-large, tiny": MMDiTConfig(depth=2, num_heads=4, head_dim=8, pos_embed_max_size=16, context_dim=64,
                                     pooled_dim=48),
    "sd3.5-large, width 2432, 2 blocks": MMDiTConfig(depth=2, num_heads=38, head_dim=64, pos_embed_max_size=24),
}
T5_CASES = {
    "tiny (width 256, 2 blocks)": T5Config(vocab_size=128, d_model=256, d_ff=128, num_layers=2, num_heads=4, d_kv=64,
                                           num_buckets=32),
    "T5-XXL width 4096, 2 blocks": T5Config(vocab_size=512, d_model=4096, d_ff=10240, num_layers=2, num_heads=64,
                                            d_kv=64, num_buckets=32),
}


@dataclass(frozen=True)
class Error:
    max_rel: float  # max|Δ| / max|reference|
    rms_rel: float  # rms(Δ) / rms(reference)

    @classmethod
    def of(cls, out: Tensor, ref: Tensor) -> Error:
        d = (out.float() - ref).abs()
        return cls((d.max() / ref.abs().max()).item(), (d.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item())


def quantize_linears(module: nn.Module, *, per_channel: bool = False) -> nn.Module:
    """Every `nn.Linear` of an already loaded `module` replaced, in place, by an `FP8Linear` holding its
    quantised weight (computing in the dtype the weight had). Returns `module`. Loading a file with
    `weights="fp8"` gives the same layers without ever holding the whole model in full precision."""
    for name, layer in [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]:
        q, scale = quantize(layer.weight.detach(), per_channel=per_channel)
        new = FP8Linear(layer.in_features, layer.out_features, layer.bias is not None,
                        spec=FP8Spec(layer.weight.dtype, per_channel=per_channel), device=q.device)
        new.weight.data, new.weight_scale.data = q, scale
        if layer.bias is not None:
            new.bias.data = layer.bias.detach()
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, new)
    return module


def weight_error(full: nn.Module, fp8: nn.Module) -> float:
    """‖W − Ŵ‖ / ‖W‖ over all linear weights of `full` and their float8 twins in `fp8`."""
    num = den = 0.0
    layers = dict(fp8.named_modules())
    for name, layer in full.named_modules():
        if isinstance(layer, nn.Linear):
            twin = layers[name]
            assert isinstance(twin, FP8Linear)
            w = layer.weight.float()
            num += (twin.dequantized().float() - w).pow(2).sum().item()
            den += w.pow(2).sum().item()
    return (num / den) ** 0.5


def mmdit_inputs(cfg: MMDiTConfig, g: torch.Generator) -> tuple[Tensor, ...]:
    x = torch.randn(2, cfg.in_channels, 16, 12, generator=g)
    t = torch.tensor([1000.0, 387.5])
    return x, t, torch.randn(2, 21, cfg.context_dim, generator=g), torch.randn(2, cfg.pooled_dim, generator=g)


def measure(model: nn.Module, inputs: tuple[Tensor, ...]) -> dict:
    """The errors of the bfloat16 model and of the two float8 copies against the float32 model."""
    with torch.inference_mode():
        ref = model(*inputs).float()
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        half = tuple(i.to(torch.bfloat16) if i.is_floating_point() and i.ndim > 1 else i for i in inputs)
        row = {"bfloat16": Error.of(bf16(*half), ref).__dict__}
        del bf16
        for name, per_channel in (("fp8 per tensor", False), ("fp8 per row", True)):
            fp8 = quantize_linears(copy.deepcopy(model), per_channel=per_channel)
            row[name] = Error.of(fp8(*inputs), ref).__dict__
            row[f"{name} weights"] = weight_error(model, fp8)
            del fp8
    return row


def random_model(cls: type[nn.Module], cfg, g: torch.Generator) -> nn.Module:
    """`cls(cfg)` built without memory, then given random weights (randomised norms and biases) on the CPU."""
    with torch.device("meta"):
        model = cls(cfg)
    return randomize_(model.to_empty(device="cpu"), g).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--tiny", action="store_true", help="only the tiny models (seconds)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    rows = []
    for name, cfg in MMDIT_CASES.items():
        if args.tiny and "tiny" not in name:
            continue
        g = torch.Generator().manual_seed(args.seed)
        model = random_model(MMDiT, cfg, g)
        model.pos_embed.normal_(generator=g)  # a buffer, which randomize_ leaves alone
        rows.append({"component": "MM-DiT", "model": name, **measure(model, mmdit_inputs(cfg, g))})
        del model
    trained = Pipeline.load(device="cpu").transformer()  # the built-in model's MM-DiT, in float32
    g = torch.Generator().manual_seed(args.seed)
    rows.append({"component": "MM-DiT", "model": "built-in (trained), width 128, 6 blocks",
                 **measure(trained, mmdit_inputs(trained.config, g))})
    for name, cfg in T5_CASES.items():
        if args.tiny and "tiny" not in name:
            continue
        g = torch.Generator().manual_seed(args.seed)
        model = random_model(T5Encoder, cfg, g)
        ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=g)
        rows.append({"component": "T5", "model": name, **measure(model, (ids,))})
        del model
    print("| component | model | bfloat16 max / rms | fp8 per tensor max / rms | fp8 per row max / rms | "
          "weights per tensor / per row |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r[k]['max_rel']:.2e} / {r[k]['rms_rel']:.2e}"
                 for k in ("bfloat16", "fp8 per tensor", "fp8 per row")]
        print(f"| {r['component']} | {r['model']} | " + " | ".join(cells)
              + f" | {r['fp8 per tensor weights']:.2e} / {r['fp8 per row weights']:.2e} |")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "seed": args.seed, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
