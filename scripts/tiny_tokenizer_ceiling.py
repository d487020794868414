"""How much of the text-to-image depiction check the trained tiny BSQ tokenizer itself allows (issue 17).

Renders the held-out caption scenes that ``python -m adapters.tiny.evaluate`` uses, encodes them with
the shipped ``infinity-tiny`` tokenizer (the training encoder saved under ``encoder.*`` in
``vae.safetensors``), quantises them with the multi-scale BSQ of the training code, decodes them with
the shipped decoder and applies the same check (each shape's colour dominates the half its caption puts
it in). Also for codes summed over the first k scales only: what a transformer that got only the
coarse scales right would show. If these are high while the generated images score at chance, the
tokenizer is not what limits infinity-tiny; its coarse-scale predictions are.

    python scripts/tiny_tokenizer_ceiling.py --pairs 64
"""

from __future__ import annotations

import argparse
from importlib import resources

import numpy as np
import torch
from safetensors.torch import load_file

from adapters.infinity.config import trained_tiny_vae
from adapters.tiny import evaluate, scenes, train


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return images.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="held-out caption scenes (as evaluate --pairs)")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs must be at least 1, got {args.pairs}")
    torch.set_num_threads(1)
    config = trained_tiny_vae()
    weights = resources.files("adapters.tiny_weights") / "infinity-tiny" / "vae.safetensors"
    state = load_file(str(weights))
    encoder, decoder = train.Encoder(config.codebook_dim), train.BSQVAEDecoder(config)
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
    decoder.load_state_dict({k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")})
    pairs = evaluate.held_out_pairs(args.pairs)
    rendered = evaluate.ground_truth_pairs(pairs)
    images = torch.from_numpy(rendered).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    shapes = train.infinity_shapes()
    with torch.no_grad():
        summed, bits, _ = train.bsq_quantize(encoder(images), shapes)
        rows = [("rendered scenes", rendered), ("BSQ reconstruction, all scales", to_uint8(decoder(summed)))]
        for k in range(1, len(shapes)):
            coarse = sum(train.resize_codes(train.bits_to_codes(b, config.codebook_dim), tuple(summed.shape[-2:]))
                         for b in bits[:k])
            side = "x".join(map(str, shapes[k - 1]))
            rows.append((f"first {k} scales only (up to {side})", to_uint8(decoder(coarse))))
    print(f"| images ({args.pairs} held-out captions) | first shape's colour in its half | second | both |")
    print("|---|---|---|---|")
    for name, imgs in rows:
        checks = np.array([scenes.check_pair(image, scene) for image, scene in zip(imgs, pairs)])
        print(f"| {name} | {100 * checks[:, 0].mean():.1f} % | {100 * checks[:, 1].mean():.1f} % | "
              f"{100 * checks.all(axis=1).mean():.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
