"""Does layout control put each object where it was asked? Measured on the built-in model's shapes world.

    python -m scripts.bench.layout_bench [--cases 200] [--json docs/layout/bench.json] [--grid docs/layout/grid.png]
    python -m scripts.bench.layout_bench --quality [--cases 240]     # text-to-image alone: right objects, nothing else
    python -m scripts.bench.layout_bench --head-to-head [--methods ...]  # DenseDiffusion against Regional Prompting

Cases (seeded): 2-3 distinct objects, their caption in random order, and one region per object's phrase at a
random place (a box of 3x3 image tokens, 48x48 pixels, on the token grid; every fourth case gives discs as
masks instead), regions never touching. The model places objects uniformly at random on its own, so without
a layout an object lands in its region about as often as chance. Every method sees the same cases and seeds.

Metrics, from the exact detector of `scripts/builtin/shapes.py`, per method (--quality: every named object
present, images with an unnamed object, and the shares of named objects and of their colours found):
* in-box: the named object (right colour and shape) was found and its centroid lies inside its region;
* colour in-box: some object of the named colour (any shape) has its centroid inside the region: placement
  alone, apart from how well the model draws the shape (lenient where a colour is scattered: see unnamed);
* IoU: between the found object's mask and its region (0 when not found), DenseDiffusion's measure;
* present: the named object was found; all-present: every named object of the image was;
* unnamed: the share of images with an object that was not named;
* time: seconds per image, and relative to no layout (the methods run in turn on each case).
Methods: no layout; DenseDiffusion `faithful`, `linear` (faithful with λ decaying linearly, power 1 instead of
5), `joint`, `hard`; `faithful` at strengths 0, 0.5, 1, 2, 4; ablations of `faithful` (image->image only,
image->text only, schedule fraction 0.5, power 2); and a baseline that never touches the attention: for the
same first steps the positive velocity is blended per region from each phrase's own prediction (a latent-space
regional prompt). --head-to-head: no layout, DenseDiffusion's four presets and Regional Prompting
(docs/layout-control.md) at its upstream defaults and around them, background prompt "" (the figures also by
box and mask cases); --methods picks some of them, --box-cells changes the region size.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dense import PRESETS, DenseConfig, Layout, Region, RegionalConfig, region_masks
from dense.schedule import active_steps
from loaders.pipeline import Pipeline, decode_images, denoiser
from loaders.text import encode_prompts
from mmdit.conditioning import Conditioning
from samplers import ModelCall, initial_noise, sample, sigmas
from scripts.builtin import shapes

CELL = 16  # pixels per image token
BOX_CELLS = 3  # a region is 3x3 tokens


@dataclass(frozen=True)
class Case:
    caption: str
    kinds: tuple[tuple[str, str], ...]  # (colour, shape) per region, in region order
    layout: Layout
    seed: int

    @property
    def masks(self) -> bool:
        """The regions are disc masks (every fourth case), not boxes."""
        return self.layout.regions[0].mask is not None

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [r.box if r.box is not None else _mask_box(r.mask) for r in self.layout.regions]


def _mask_box(mask: torch.Tensor) -> tuple[float, float, float, float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    h, w = mask.shape
    return (xs.min().item() / w, ys.min().item() / h, (xs.max().item() + 1) / w, (ys.max().item() + 1) / h)


def disc_mask(box: tuple[float, float, float, float], size: int) -> torch.Tensor:
    """(size, size) bool: the disc inscribed in a box (fractions)."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    cx, cy, r = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2
    return (c[None, :] - cx) ** 2 + (c[:, None] - cy) ** 2 < r**2


def make_cases(count: int, seed: int, size: int = shapes.SIZE, box_cells: int = BOX_CELLS) -> list[Case]:
    rng = random.Random(seed)
    grid, side = size // CELL, box_cells * CELL
    cases = []
    for i in range(count):
        n = 2 + i % 2  # 2 and 3 objects, alternating
        kinds = rng.sample(shapes.all_kinds(), n)
        while True:  # regions on the token grid, one token apart
            cells = [(rng.randrange(grid - box_cells + 1), rng.randrange(grid - box_cells + 1)) for _ in kinds]
            boxes = [(cx * CELL, cy * CELL, cx * CELL + side, cy * CELL + side) for cx, cy in cells]
            if all(not shapes._overlaps(a, b, CELL) for j, a in enumerate(boxes) for b in boxes[j + 1 :]):
                break
        regions = []
        for (colour, shape), b in zip(kinds, boxes):
            box = tuple(v / size for v in b)
            phrase = f"a {colour} {shape}"
            regions.append(Region(phrase, mask=disc_mask(box, size)) if i % 4 == 3 else Region(phrase, box=box))
        order = list(range(n))
        rng.shuffle(order)  # the caption names the objects in another order than the regions
        text = " and ".join(regions[j].phrase for j in order)
        cases.append(Case(text, tuple(kinds), Layout(text, tuple(regions)), seed=1000 + i))
    return cases


# ----------------------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class Method:
    name: str
    preset: str | DenseConfig | None = None  # None: no layout
    strength: float = 1.0
    blend: bool = False  # the baseline: per-region blending of phrase-only velocities
    regional: RegionalConfig | None = None  # Regional Prompting instead of DenseDiffusion (background prompt "")


# The preset docs/layout-benchmark.md recommends for this model, measured below (tests/test_builtin_model.py checks it).
BEST = Method("linear", "linear")


def methods(ablations: bool) -> list[Method]:
    f = PRESETS["faithful"]
    out = [Method("no layout"), Method("faithful", "faithful"), Method("linear", "linear"), Method("joint", "joint"),
           Method("hard", "hard"), *(Method(f"faithful s={s:g}", "faithful", s) for s in (0, 0.5, 2, 4)),
           Method("region blend (baseline)", blend=True)]
    if ablations:
        out += [Method("faithful, image->image only", replace(f, w_it=0.0)),
                Method("faithful, image->text only", replace(f, w_ii=0.0)),
                Method("faithful, fraction 0.5", replace(f, fraction=0.5)),
                Method("faithful, power 2", replace(f, power=2.0))]
    return out


def head_to_head() -> list[Method]:
    """DenseDiffusion's presets against Regional Prompting at the upstream examples' settings (β 0.3, 10 inject
    steps, every block) and around them."""
    regional = [Method("regional", regional=RegionalConfig()),
                *(Method(f"regional β={b:g}", regional=RegionalConfig(base_ratio=b)) for b in (0.1, 0.6)),
                *(Method(f"regional {k} steps", regional=RegionalConfig(inject_steps=k)) for k in (5, 20)),
                Method("regional interval 2", regional=RegionalConfig(inject_interval=2))]
    return [Method("no layout"), *(Method(p, p) for p in ("faithful", "linear", "joint", "hard")), *regional]


def blend_latents(pipe: Pipeline, case: Case, fraction: float = 0.3) -> torch.Tensor:
    """The baseline: for the first round(fraction·K) steps the positive velocity is Σ_n m_n·v(phrase n) +
    (1 − Σ_n m_n)·v(caption), each phrase predicted alone on the same latent; then plain sampling."""
    settings = pipe.settings(seed=case.seed)
    length = pipe.preset.max_sequence_length
    phrases = [r.phrase for r in case.layout.regions]
    e = encode_prompts(pipe.files, [case.caption], [""], max_sequence_length=length,
                       context_dim=pipe.config.context_dim)
    each = encode_prompts(pipe.files, phrases, None, max_sequence_length=length,
                          context_dim=pipe.config.context_dim).positive  # one row per phrase, encoded alone
    conds = [Conditioning(each.context[k : k + 1], each.pooled[k : k + 1]) for k in range(len(phrases))]
    masks = region_masks(case.layout, settings.height, settings.width).float()  # (R, H, W)
    m = torch.nn.functional.avg_pool2d(masks[:, None], 8)  # (R, 1, h, w) at the latent grid
    rest = (1 - m.sum(0)).clamp(min=0)
    model = pipe.transformer()
    plain = denoiser(model)
    n = active_steps(settings.steps, fraction)

    def denoise(x, t, cond: Conditioning, call: ModelCall):
        v = plain(x, t, cond, call)
        if call.step >= n:
            return v
        rows = call.positive
        b = rows.stop - rows.start
        mixed = v[rows] * rest
        for k, c in enumerate(conds):
            c = Conditioning(c.context.expand(b, -1, -1), c.pooled.expand(b, -1))
            mixed = mixed + m[k] * plain(x[rows], t[rows], c, ModelCall(call.step, slice(0, b), call.skip_layers))
        v = v.clone()
        v[rows] = mixed
        return v

    noise = initial_noise(1, settings.height, settings.width, settings.seed)
    return sample(denoise, noise, sigmas(settings.steps, settings.shift), e.positive, e.negative, settings.guidance)


def generate(pipe: Pipeline, case: Case, method: Method) -> np.ndarray:
    if method.blend:
        return decode_images(pipe.autoencoder(), blend_latents(pipe, case))[0].numpy()
    if method.regional is not None:
        result = pipe(case.caption, layout=case.layout, seed=case.seed, layout_method="regional",
                      regional=method.regional, background_prompt="")
        return np.asarray(result.images[0])
    layout = case.layout if method.preset is not None else None
    result = pipe(case.caption, layout=layout, seed=case.seed, dense_strength=method.strength,
                  dense_preset=method.preset or "faithful")
    return np.asarray(result.images[0])


# ----------------------------------------------------------------------------------------------------------
# Scoring


def score(image: np.ndarray, case: Case) -> dict:
    detections = shapes.detect(image)
    size = image.shape[0]
    masks = region_masks(case.layout, size, size).numpy()
    objects = []
    for (colour, shape), box, mask in zip(case.kinds, case.boxes, masks):
        d = shapes.find(detections, colour, shape)
        objects.append({"present": d is not None, "in_box": d is not None and shapes.centroid_in_box(d, box, size),
                        "iou": shapes.iou(d.mask, mask) if d is not None else 0.0,
                        "colour_in_box": any(e.colour == colour and shapes.centroid_in_box(e, box, size)
                                             for e in detections)})
    named = sum(o["present"] for o in objects)
    return {"objects": objects, "unnamed": len(detections) - named}


def summarise(scores: list[dict], seconds: list[float]) -> dict:
    objects = [o for s in scores for o in s["objects"]]
    return {
        **{key: float(np.mean([o[key] for o in objects])) for key in ("in_box", "colour_in_box", "iou", "present")},
        "all_present": float(np.mean([all(o["present"] for o in s["objects"]) for s in scores])),
        "unnamed": float(np.mean([s["unnamed"] > 0 for s in scores])),
        "seconds": float(np.mean(seconds)),
        "images": len(scores),
    }


def run_bench(pipe: Pipeline, cases: list[Case], chosen: list[Method], say=print, partial=None) -> dict:
    """Every method on every case, case by case: on each case the methods run in turn, so a slower or faster
    stretch of the run (another process, the clock) falls on every method alike and the time ratios compare
    like with like (method by method, a slow stretch once made the best preset look slower than no layout).
    `partial(results)`, if given, gets the figures of the cases done so far every 25 cases."""
    scores: dict[str, list[dict]] = {m.name: [] for m in chosen}
    seconds: dict[str, list[float]] = {m.name: [] for m in chosen}
    images: dict[str, list[np.ndarray]] = {m.name: [] for m in chosen}
    for i, case in enumerate(cases):
        for method in chosen:
            start = time.perf_counter()
            image = generate(pipe, case, method)
            seconds[method.name].append(time.perf_counter() - start)
            scores[method.name].append(score(image, case))
            images[method.name].append(image)
        if (i + 1) % 25 == 0 and i + 1 < len(cases):
            say(f"{i + 1}/{len(cases)} cases")
            if partial is not None:
                partial(_results(chosen, cases[: i + 1], scores, seconds, images, lambda *a: None))
    return _results(chosen, cases, scores, seconds, images, say)


def _results(chosen: list[Method], cases: list[Case], scores: dict, seconds: dict, images: dict, say) -> dict:
    results = {}
    for method in chosen:
        s, t = scores[method.name], seconds[method.name]
        by_count = {n: summarise([x for x, c in zip(s, cases) if len(c.kinds) == n],
                                 [y for y, c in zip(t, cases) if len(c.kinds) == n]) for n in (2, 3)}
        by_region = {kind: summarise([x for x, c in zip(s, cases) if c.masks == (kind == "mask")],
                                     [y for y, c in zip(t, cases) if c.masks == (kind == "mask")])
                     for kind in ("box", "mask")}
        results[method.name] = r = {**summarise(s, t), "by_objects": by_count, "by_region": by_region,
                                    "images_": images[method.name]}
        say(f"{method.name:32s} in-box {r['in_box']:.3f}  colour in-box {r['colour_in_box']:.3f}  IoU {r['iou']:.3f}  present {r['present']:.3f}  "
            f"unnamed {r['unnamed']:.3f}  {r['seconds']:.2f} s/image")
    base = results[chosen[0].name]["seconds"]
    for r in results.values():
        r["time_ratio"] = r["seconds"] / base
    return results


def binding(detections: list[shapes.Detection], text: str) -> list[str]:
    """For a caption of two objects of different shapes: per named object, the shape of the largest object of its
    colour — "own", "other" (the other named object's shape: colour and shape bound wrongly), "third" (the shape
    nobody named) or "missing" (no object of that colour). A model that draws the named shapes but binds them
    at random gives as many "other" as "own". Empty for any other caption. `detections`: `shapes.detect`'s."""
    kinds = shapes.named_kinds(text)
    if len(kinds) != 2 or kinds[0][1] == kinds[1][1]:
        return []
    out = []
    for (colour, shape), (_, other) in zip(kinds, kinds[::-1]):
        found = next((d for d in detections if d.colour == colour), None)
        out.append("missing" if found is None else "own" if found.shape == shape else
                   "other" if found.shape == other else "third")
    return out


def run_quality(pipe: Pipeline, count: int, seed: int, say=print) -> dict:
    """Captions of random scenes (1-3 objects), generated from the caption alone, one seed each."""
    rng = random.Random(seed)
    rows, images = [], []
    for i in range(count):
        text = shapes.random_scene(rng).caption
        image = np.asarray(pipe(text, seed=10_000 + i).images[0])
        detections = shapes.detect(image)
        j, found = shapes.judge(image, text), {d.colour for d in detections}
        rows.append({"caption": text, "all_present": j.all_present, "unnamed": j.unnamed, "present": j.present,
                     "colour_present": [c in found for c, _ in shapes.named_kinds(text)],
                     "binding": binding(detections, text)})
        images.append(image)
    share = lambda key: float(np.mean([x for r in rows for x in r[key]]))  # noqa: E731
    out = {"images": count, "all_present": float(np.mean([r["all_present"] for r in rows])),
           "unnamed": float(np.mean([r["unnamed"] > 0 for r in rows])),
           "objects_present": share("present"), "colours_present": share("colour_present"),
           "by_objects": {n: float(np.mean([r["all_present"] for r in rows if len(shapes.named_kinds(r["caption"])) == n]))
                          for n in (1, 2, 3)},
           "binding": {k: sum(b == k for r in rows for b in r["binding"]) for k in ("own", "other", "third", "missing")},
           "rows": rows, "images_": images}
    say(f"quality on {count} captions: every named object present {out['all_present']:.3f}, "
        f"images with an unnamed object {out['unnamed']:.3f}, by object count {out['by_objects']}; "
        f"named objects present {out['objects_present']:.3f}, their colours present {out['colours_present']:.3f}; "
        f"two objects of different shapes, the shape drawn in each named colour: {out['binding']}")
    return out


def outline(image: np.ndarray, case: Case) -> np.ndarray:
    """The image with each region's box drawn in white (a thin frame), for the picture grid."""
    out = image.copy()
    size = image.shape[0]
    for box in case.boxes:
        x0, y0, x1, y1 = (int(round(v * size)) for v in box)
        x1, y1 = min(x1, size) - 1, min(y1, size) - 1
        out[y0, x0 : x1 + 1] = out[y1, x0 : x1 + 1] = 255
        out[y0 : y1 + 1, x0] = out[y0 : y1 + 1, x1] = 255
    return out


def save_grid(path: Path, results: dict, cases: list[Case], names: dict[str, str], rows: int = 8) -> None:
    """Cases down, methods across (`names`: method -> column title), each region's box outlined in white."""
    from PIL import Image

    from scripts.dense_demo import grid

    cases = cases[:rows]
    tiles = [[Image.fromarray(outline(results[n]["images_"][i], c)) for n in names] for i, c in enumerate(cases)]
    labels = [f"case {i}" for i in range(len(cases))]
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(tiles, labels, list(names.values()), label_width=50).save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="as generate.py --model (default: the built-in model)")
    p.add_argument("--cases", type=int, default=200, help="cases (or captions with --quality)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", action="store_true", help="measure text-to-image alone instead of layouts")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--head-to-head", action="store_true",
                   help="DenseDiffusion's presets against Regional Prompting (docs/layout-control.md) instead")
    p.add_argument("--box-cells", type=int, default=BOX_CELLS, help="region side in image tokens (default 3)")
    p.add_argument("--methods", help="only these methods (comma-separated names, as the table prints them)")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--grid", type=Path, help="write a picture grid (cases x methods) here")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.cases < 1:
        p.error("--cases must be at least 1")
    for path in (args.json, args.grid):
        if path is not None and path.exists() and not args.overwrite:
            p.error(f"{path} exists; pass --overwrite to replace it")
    torch.manual_seed(0)
    pipe = Pipeline.load(args.model, keep_loaded=True)
    if args.quality:
        out = run_quality(pipe, args.cases, args.seed)
        if args.grid:
            from PIL import Image

            tiles = out["images_"][:48]
            rows = [np.concatenate(tiles[i : i + 8], axis=1) for i in range(0, len(tiles) - 7, 8)]
            args.grid.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate(rows, axis=0)).save(args.grid)
    else:
        cases = make_cases(args.cases, args.seed, box_cells=args.box_cells)
        chosen = head_to_head() if args.head_to_head else methods(not args.no_ablations)
        if args.methods:
            names = args.methods.split(",")
            unknown = [n for n in names if n not in {m.name for m in chosen}]
            if unknown:
                p.error(f"unknown methods {unknown}; choose from {[m.name for m in chosen]}")
            chosen = [m for m in chosen if m.name in names]
        out = run_bench(pipe, cases, chosen, partial=(lambda r: write_json(args.json, pipe, r)) if args.json else None)
        if args.grid:
            columns = ({"no layout": "no layout", "faithful": "faithful", "linear": "linear", "hard": "hard",
                        "regional": "regional", "regional β=0.1": "regional b=0.1", "regional 5 steps": "regional 5 st."}
                       if args.head_to_head else
                       {"no layout": "no layout", "faithful": "faithful", "linear": "linear", "joint": "joint",
                        "hard": "hard", "region blend (baseline)": "region blend"})
            save_grid(args.grid, out, cases, {k: v for k, v in columns.items() if k in out})
    if args.json:
        write_json(args.json, pipe, out)
    return 0


def write_json(path: Path, pipe: Pipeline, results: dict) -> None:
    strip = lambda d: {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k != "images_"}  # noqa: E731
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": pipe.preset.__dict__, "results": strip(results)}, indent=2, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
