"""Do the tiny models' full-cache images depict their captions / classes? (issue 17)

``python -m adapters.tiny.evaluate --out DIR`` generates, with the full cache, images for held-out
conditions (scenes of a stream the training never saw) and applies the checks of
``adapters.tiny.scenes``:

- text-to-image (``infinity-tiny``): for each caption "a <size> <colour> <kind> <relation> a ...",
  does the first shape's colour dominate the half of the image where the caption puts it, and the
  second shape's colour the other half? Chance is about 1/6 per shape (6 palette colours). And does
  the image show the background the caption names (chance 1/4)?
- class-conditional (``var-tiny``): does the class's colour dominate the image (chance 1/6), and does
  the dominant colour's mask read as the class's shape kind (chance ~1/3)?

The same checks run on the random presets (``*-tiny-random``, which should score at chance) and on
the rendered ground-truth scenes (the checks' own ceiling). Results: ``depiction.json``,
``depiction.md`` and a grid of samples per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from kvpolicy.attention_stats import ENTROPY, HISTORY_LOCALITY

from . import scenes

INFINITY_MODELS = ("infinity-tiny", "infinity-tiny-random")
VAR_MODELS = ("var-tiny", "var-tiny-random")


def held_out_pairs(count: int, seed: int = 0) -> list[scenes.Scene]:
    return [scenes.sample_scene(scenes.held_out_seed(seed), i, "pair") for i in range(count)]


def held_out_labels(count: int) -> list[int]:
    return [i % scenes.NUM_CLASSES for i in range(count)]


def _rate(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def evaluate_text_to_image(model, scene_list: Sequence[scenes.Scene], *, seed: int = 0, batch_size: int = 8,
                           images=None) -> dict:
    """Depiction rates of a text-to-image model (or of given ``images``) on ``scene_list``."""
    if images is None:
        images = model.generate([s.caption for s in scene_list], seed=seed, batch_size=batch_size,
                                progress=False).images.numpy()
    checks = np.array([scenes.check_pair(image, scene) for image, scene in zip(images, scene_list)])
    backgrounds = [scenes.check_background(image, scene) for image, scene in zip(images, scene_list)]
    return {"conditions": len(scene_list), "first_shape_colour": _rate(checks[:, 0]),
            "second_shape_colour": _rate(checks[:, 1]), "both": _rate(checks.all(axis=1)),
            "per_shape": _rate(checks.ravel()), "background": _rate(backgrounds)}, images


def evaluate_class_conditional(model, labels: Sequence[int], *, seed: int = 0, batch_size: int = 18,
                               images=None) -> dict:
    if images is None:
        images = model.generate(list(labels), seed=seed, batch_size=batch_size, progress=False).images.numpy()
    checks = np.array([scenes.check_single(image, label) for image, label in zip(images, labels)])
    return {"conditions": len(labels), "colour": _rate(checks[:, 0]), "kind": _rate(checks[:, 1]),
            "both": _rate(checks.all(axis=1))}, images


def ground_truth_pairs(scene_list):
    return np.stack([scenes.render(s, 32, i) for i, s in enumerate(scene_list)])


def ground_truth_singles(labels: Sequence[int], seed: int = 0):
    """A rendered scene of each class (the first held-out single scene of that class)."""
    stream, index, out = scenes.held_out_seed(seed), 0, []
    for label in labels:
        while True:
            scene = scenes.sample_scene(stream, index, "single")
            index += 1
            if scene.label == label:
                out.append(scenes.render(scene, 32, index))
                break
    return np.stack(out)


def save_grid(images, path: Path, columns: int = 8, side: int = 64) -> None:
    from PIL import Image

    tiles = [Image.fromarray(np.asarray(im)).resize((side, side), Image.NEAREST) for im in images]
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (columns * side, rows * side), (255, 255, 255))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * side, (i // columns) * side))
    grid.save(path)


def load_trained(name: str, weights_dir: Optional[Path] = None):
    """A trained tiny preset, from the package or from a ``kvpolicy train-tiny`` weights folder
    (``OUT/weights``, holding ``<preset>/`` subfolders)."""
    from adapters import load_model

    if weights_dir is None or name.endswith("-random"):
        return load_model(name)
    folder = Path(weights_dir) / name
    if name == "infinity-tiny":
        from adapters.infinity.config import TRAINED_TINY_CONFIG as c
        from adapters.infinity.text import trained_text_encoder

        text = trained_text_encoder(folder / "text_encoder.safetensors", c.text_channels, max_length=c.text_maxlen)
        return load_model(name, weights=str(folder / "transformer.safetensors"),
                          vae_weights=str(folder / "vae.safetensors"), text_encoder=text)
    return load_model(name, weights=str(folder / "var.safetensors"), vae_weights=str(folder / "vqvae.safetensors"))


def run(out: Path, *, pairs: int = 96, singles: int = 72, seed: int = 0, models: Optional[Sequence[str]] = None,
        threads: int = 1, random_conditions: int = 36, weights_dir: Optional[Path] = None) -> dict:
    import torch

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    models = list(INFINITY_MODELS + VAR_MODELS if models is None else models)
    scene_list, labels = held_out_pairs(pairs, seed), held_out_labels(singles)
    results: dict = {"seed": seed, "held_out_stream": scenes.held_out_seed(seed), "models": {}}
    gt_pairs, _ = evaluate_text_to_image(None, scene_list, images=ground_truth_pairs(scene_list))
    gt_singles, _ = evaluate_class_conditional(None, labels, images=ground_truth_singles(labels, seed))
    results["ground_truth"] = {"text_to_image": gt_pairs, "class_conditional": gt_singles}
    for name in models:
        started = time.perf_counter()
        model = load_trained(name, weights_dir)
        # the random presets decode 256x256 images (slow on a CPU) and only need to show chance level
        limit = random_conditions if name.endswith("-random") else None
        if name.startswith("infinity"):
            metrics, images = evaluate_text_to_image(model, scene_list[:limit], seed=seed)
        else:
            metrics, images = evaluate_class_conditional(model, labels[:limit], seed=seed)
        metrics["seconds"] = round(time.perf_counter() - started, 1)
        results["models"][name] = metrics
        save_grid(images[:32], out / f"samples_{name}.png")
        print(f"{name}: {metrics}", file=sys.stderr)
    (out / "depiction.json").write_text(json.dumps(results, indent=2))
    (out / "depiction.md").write_text(markdown(results, scene_list[:8]))
    return results


def markdown(results: dict, example_scenes=()) -> str:
    lines = [f"Held-out conditions (stream {results['held_out_stream']}), full cache, default sampling.", "",
             "| model | conditions | first shape's colour in its half | second shape's colour in its half | both "
             "| caption's background |",
             "|---|---|---|---|---|---|"]
    gt = results["ground_truth"]
    rows = [(name, m) for name, m in results["models"].items() if name.startswith("infinity")]
    for name, m in rows + [("rendered ground truth", gt["text_to_image"])]:
        background = f"{m['background']:.1%}" if "background" in m else "–"
        lines.append(f"| {name} | {m['conditions']} | {m['first_shape_colour']:.1%} | {m['second_shape_colour']:.1%} "
                     f"| {m['both']:.1%} | {background} |")
    lines += ["", "Chance: 1/6 = 16.7 % per shape (6 palette colours), 1/30 = 3.3 % for both, 1/4 = 25 % for the "
              "background (plain, striped, checkered, dotted).", "",
              "| model | conditions | class colour dominates | shape kind read off the mask | both |",
              "|---|---|---|---|---|"]
    rows = [(name, m) for name, m in results["models"].items() if name.startswith("var")]
    for name, m in rows + [("rendered ground truth", gt["class_conditional"])]:
        lines.append(f"| {name} | {m['conditions']} | {m['colour']:.1%} | {m['kind']:.1%} | {m['both']:.1%} |")
    lines += ["", "Chance: 1/6 = 16.7 % for the colour, about 1/3 for the kind.", ""]
    if example_scenes:
        lines += ["Example captions: " + "; ".join(f"\"{s.caption}\"" for s in example_scenes[:4]), ""]
    return "\n".join(lines)


def selectivity_markdown(calibrations: dict) -> str:
    """Per-layer, per-scale attention selectivity from ``kvpolicy calibrate`` files: for each model,
    the share of attention on the current map and the mass of the K' largest history probabilities
    (ScaleKV's two ingredients), their ASI, and across layers the spread of ASI per scale."""
    import types

    def load(path):  # the calibration JSON's tables, read directly (adapters do not import policies)
        data = json.loads(Path(path).read_text())
        data = data.get("calibration", data)
        if "current_ratio" not in data:  # the core's attention-statistics file (`kvpolicy calibrate` today)
            from kvpolicy.attention_stats import AttentionStatistics

            stats = AttentionStatistics.from_dict(data)
            structure = {name: stats.layer_means(name) for name in (ENTROPY, HISTORY_LOCALITY) if name in stats.names}
            return types.SimpleNamespace(num_layers=stats.num_layers, num_scales=stats.num_scales,
                                         current_ratio=stats.layer_means("current_ratio"),
                                         history_topk=stats.layer_means("history_topk"),
                                         top_k=data.get("top_k", "16 (calibrate's default)"), source=stats.source,
                                         structure=structure)
        return types.SimpleNamespace(**{k: data[k] for k in ("num_layers", "num_scales", "current_ratio",
                                                              "history_topk", "top_k", "source")}, structure={})

    lines = []
    for name, path in calibrations.items():
        result = load(path)
        scales = range(1, result.num_scales)  # scale 0 has no history
        lines += [f"**{name}** ({result.source}; top-K' {result.top_k}): current-map share / top-K' history "
                  "mass per layer (rows) and scale (columns)", "",
                  "| layer | " + " | ".join(f"scale {k}" for k in scales) + " |",
                  "|---|" + "---|" * len(scales)]
        for layer in range(result.num_layers):
            cells = []
            for k in scales:
                current, history = result.current_ratio[layer][k], result.history_topk[layer][k]
                cells.append("–" if current is None else f"{current:.2f} / {history:.2f}")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        spread = []
        for k in scales:
            values = [result.current_ratio[l][k] for l in range(result.num_layers)
                      if result.current_ratio[l][k] is not None]
            spread.append(f"{np.std(values):.3f}" if values else "–")
        lines += ["| std over layers (current share) | " + " | ".join(spread) + " |", ""]
        if len(result.structure) == 2:
            lines += _structure_table(name, result, scales)
    return "\n".join(lines)


def _structure_table(name: str, result, scales) -> list[str]:
    """The descriptive structure measures of a calibration (``kvpolicy.attention_stats``): normalised
    entropy of each query's attention over all keys, and the share of its history attention on
    history tokens within one cell of its position (with what attention spread evenly over the
    history would score)."""
    from kvpolicy.attention_stats import uniform_history_locality
    from kvpolicy.schedule import ScaleSchedule

    entropy, locality = result.structure[ENTROPY], result.structure[HISTORY_LOCALITY]

    def cell(table, layer, k):
        return "–" if table[layer][k] is None else f"{table[layer][k]:.2f}"

    def mean(table, k):
        values = [table[l][k] for l in range(result.num_layers) if table[l][k] is not None]
        return f"{np.mean(values):.2f}" if values else "–"

    lines = [f"**{name}**: attention entropy over all keys / log(keys) (1 = uniform) and the share of history "
             "attention within one cell of the query (radius 1, mapped onto each earlier map), per layer and scale", "",
             "| layer | " + " | ".join(f"scale {k}" for k in scales) + " |", "|---|" + "---|" * len(scales)]
    for layer in range(result.num_layers):
        lines.append(f"| {layer} | " + " | ".join(f"{cell(entropy, layer, k)} / {cell(locality, layer, k)}"
                                                  for k in scales) + " |")
    lines.append("| mean over layers | " + " | ".join(f"{mean(entropy, k)} / {mean(locality, k)}" for k in scales) + " |")
    shapes = _schedule_shapes(result.source)
    if shapes is not None and len(shapes) == result.num_scales:
        schedule = ScaleSchedule(shapes)
        lines.append("| uniform attention | " + " | ".join(f"1.00 / {uniform_history_locality(schedule, k):.2f}"
                                                            for k in scales) + " |")
    return lines + [""]


def _schedule_shapes(source: str):
    """The token-map shapes named in a calibration's source ("..., schedule 1x1 2x2 ... (N tokens)")."""
    import re

    found = re.search(r"schedule ((?:\d+x\d+ ?)+)", source)
    if not found:
        return None
    return [tuple(int(v) for v in item.split("x")) for item in found.group(1).split()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters.tiny.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/tiny-models")
    parser.add_argument("--pairs", type=int, default=96, help="held-out captions for the text-to-image models")
    parser.add_argument("--singles", type=int, default=72, help="held-out class labels (cycling over the 18 classes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=None, help="comma-separated; default the trained and random tiny presets")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--random-conditions", type=int, default=36,
                        help="conditions for the *-tiny-random presets (the first ones of the same lists)")
    parser.add_argument("--weights-dir", default=None, metavar="DIR",
                        help="read the trained presets from a `kvpolicy train-tiny` run (its OUT/weights folder) "
                             "instead of the package")
    parser.add_argument("--calibrations", default=None, metavar="NAME=PATH,...",
                        help="also write selectivity.md from these `kvpolicy calibrate` files")
    args = parser.parse_args(argv)
    for name in ("pairs", "singles", "threads", "random_conditions"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.calibrations:
        pairs = dict(item.split("=", 1) for item in args.calibrations.split(","))
        text = selectivity_markdown(pairs)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "selectivity.md").write_text(text)
        print(text)
        if args.models == "none":
            return 0
    models = args.models.split(",") if args.models else None
    if args.weights_dir is not None:
        wanted = [m for m in (models or INFINITY_MODELS + VAR_MODELS) if not m.endswith("-random")]
        missing = [m for m in wanted if not (Path(args.weights_dir) / m).is_dir()]
        if missing:
            parser.error(f"--weights-dir {args.weights_dir!r} has no {', '.join(missing)} folder (expected a "
                         "`kvpolicy train-tiny` OUT/weights folder); pick --models accordingly")
    results = run(Path(args.out), pairs=args.pairs, singles=args.singles, seed=args.seed, models=models,
                  threads=args.threads, random_conditions=args.random_conditions,
                  weights_dir=None if args.weights_dir is None else Path(args.weights_dir))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
