"""Where does infinity-tiny lose its captions' shape colours? Teacher-forced diagnosis (issue 17).

On the held-out caption scenes of ``python -m adapters.tiny.evaluate`` (rendered, encoded with the
model's own BSQ tokenizer: the true bits of every scale), run the transformer teacher-forced (each
scale reads the TRUE coarser scales, as in training) and report per scale:

- bit accuracy of the argmax prediction with the true captions, with the captions shuffled among the
  scenes, and with the unconditional rows (how much the text decides each scale);
- at the 2x2 scale, how much the predicted bit probabilities differ between the four positions
  (0 = the model predicts the same token everywhere: it cannot tell left from right);
- the colour check (``scenes.check_pair``) on images decoded from the argmax bits of the first k
  scales, each predicted from the true prefix: a model that learned the coarse scales passes it about
  as often as the tokenizer's own first-k-scale reconstructions (``tiny_tokenizer_ceiling.py``).
  High here but at chance in generation = a sampling problem; at chance here = a training problem.

    python scripts/tiny_infinity_diagnose.py --pairs 64 [--weights-dir runs/x/weights/infinity-tiny]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from adapters.infinity.bsq_vae import bits_to_codes, resize_codes
from adapters.tiny import evaluate, scenes, train


def load(weights_dir):
    """(InfinityModel, BSQ training encoder) from a weights folder (default: the shipped preset)."""
    from safetensors.torch import load_file

    from adapters import load_model
    from adapters.infinity.config import TRAINED_TINY_CONFIG, trained_tiny_vae
    from adapters.infinity.text import trained_text_encoder
    from adapters.tiny_weights import ROOT

    folder = Path(weights_dir) if weights_dir else ROOT / "infinity-tiny"
    kwargs = {}
    if weights_dir:
        c = TRAINED_TINY_CONFIG
        kwargs = dict(weights=str(folder / "transformer.safetensors"), vae_weights=str(folder / "vae.safetensors"),
                      text_encoder=trained_text_encoder(folder / "text_encoder.safetensors", c.text_channels,
                                                        max_length=c.text_maxlen))
    model = load_model("infinity-tiny", **kwargs)
    state = load_file(str(folder / "vae.safetensors"))
    encoder = train.Encoder(trained_tiny_vae().codebook_dim)
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
    return model, encoder.eval()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return images.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def diagnose(model, encoder, pairs, scales: int = 5) -> dict:
    rendered = evaluate.ground_truth_pairs(pairs)
    images = torch.from_numpy(rendered).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    shapes = train.infinity_shapes()[:scales]
    d = model.config.token_bits
    _, bits, _ = train.bsq_quantize(encoder(images), train.infinity_shapes())
    bits = bits[:scales]
    captions = [s.caption for s in pairs]
    shuffled = captions[1:] + captions[:1]
    features = model.encode(captions)
    uncond = [model.transformer.cfg_uncond[: f.shape[0]].float() for f in features]
    out = {"scales": [f"{h}x{w}" for h, w in shapes]}
    predicted = {}
    for name, prompts in (("true", features), ("shuffled", model.encode(shuffled)), ("unconditional", uncond)):
        logits = model.teacher_forced_logits(prompts, bits, cfg=1.0, aspect_ratio=1.0)
        pred = [l.argmax(-1).view(b.shape).to(torch.uint8) for l, b in zip(logits, bits)]
        out[f"bit_accuracy_{name}"] = [float((p == b).float().mean()) for p, b in zip(pred, bits)]
        predicted[name] = (pred, logits)
    pred, logits = predicted["true"]
    p1 = logits[1].softmax(-1)[..., 1].view(len(pairs), 4, d)
    out["scale1_position_spread"] = float(p1.std(dim=1).mean())
    t1 = bits[1].view(len(pairs), 4, d).float()
    out["scale1_target_position_spread"] = float(t1.std(dim=1).mean())
    full = tuple(train.infinity_shapes()[-1])
    checks = {}
    for k in range(2, scales + 1):
        for name, source in (("predicted", pred), ("tokenizer", bits)):
            summed = sum(resize_codes(bits_to_codes(b, d), full) for b in source[:k])
            decoded = to_uint8(model.vae.decode(summed))
            result = np.array([scenes.check_pair(im, s) for im, s in zip(decoded, pairs)])
            checks[f"first {k} scales, {name}"] = float(result.mean())
    out["colour_check_per_shape"] = checks
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--scales", type=int, default=5, help="coarse scales to diagnose (2..7)")
    parser.add_argument("--weights-dir", default=None, help="an infinity-tiny weights folder (train-tiny's "
                        "OUT/weights/infinity-tiny); default the shipped preset")
    args = parser.parse_args(argv)
    if args.pairs < 2:
        parser.error(f"--pairs must be at least 2 (captions are shuffled among them), got {args.pairs}")
    if not 2 <= args.scales <= len(train.infinity_shapes()):
        parser.error(f"--scales must be in 2..{len(train.infinity_shapes())}, got {args.scales}")
    torch.set_num_threads(1)
    model, encoder = load(args.weights_dir)
    result = diagnose(model, encoder, evaluate.held_out_pairs(args.pairs), args.scales)
    print("| scale | " + " | ".join(result["scales"]) + " |")
    print("|---|" + "---|" * len(result["scales"]))
    for name in ("true", "shuffled", "unconditional"):
        values = result[f"bit_accuracy_{name}"]
        print(f"| bit accuracy, {name} captions | " + " | ".join(f"{100 * v:.1f} %" for v in values) + " |")
    print(f"\n2x2 scale: predicted P(bit=1) std over the 4 positions {result['scale1_position_spread']:.3f} "
          f"(true bits' std over positions {result['scale1_target_position_spread']:.3f})\n")
    print("| coarse images | colour check per shape |\n|---|---|")
    for name, value in result["colour_check_per_shape"].items():
        print(f"| {name} | {100 * value:.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
