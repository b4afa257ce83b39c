"""`baton ground RUN IMAGE "prompt" [--out PICTURE]`: a GLIP run finds each phrase of the prompt in an image.

The prompt's phrases are its pieces between "." and "," ("red apple. cat face"); each gets its
top-1 box (the box predicted where the phrase's mean token probability is highest, as grounding
R@1 scores it), printed in the image's own pixels with that score, and drawn on a copy of the
image written to --out. RUN is a pretrain run directory, its checkpoints/ or a step directory;
the model is rebuilt from the config stored in the checkpoint. Boxes are clipped to the image, as
GLIP's post-processing clips them. A phrase that lies past `glip.max_tokens` tokens of the prompt
(none of its tokens reach the model) is refused, naming it: the model never saw it, so any box
printed for it would be meaningless. An unreadable image and an --out Pillow cannot write (no such
folder, an extension of no format it saves) are refused before the model is loaded.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from baton.errors import BatonError
from baton.images import rgb_on_white

COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def phrases_of(prompt: str) -> list[tuple[str, list[int]]]:
    """(phrase, [start, end]) for each non-empty piece of the prompt between '.' and ',' (spaces trimmed)."""
    out = []
    for m in re.finditer(r"[^.,]+", prompt):
        text = m.group(0)
        if text.strip():
            start = m.start() + len(text) - len(text.lstrip())
            out.append((text.strip(), [start, start + len(text.strip())]))
    return out


def load_run(run: str | Path):
    """(GlipMethod, GlipModel in eval mode) of a pretrain checkpoint whose method is glip."""
    from baton.checkpoint import load_checkpoint
    from baton.config import from_yaml
    from baton.distributed import DistInfo
    from pretrain.config import PretrainConfig
    from pretrain.method import build_method
    from pretrain.strategies import full_model_state

    state, meta = load_checkpoint(run)
    cfg = from_yaml(PretrainConfig, state["config"])
    if cfg.method != "glip":
        raise BatonError(f"{meta['path']} is a method={cfg.method} run; `baton ground` needs a glip one")
    method = build_method(cfg, DistInfo())
    method.from_checkpoint = True   # the checkpoint holds every weight: glip.init_from / glip.pretrained need not exist
    model = method.build_model()
    model.load_state_dict(full_model_state(meta["path"], state))
    return method, model.eval()


@torch.no_grad()
def ground(method, model, image: Image.Image, prompt: str) -> list[dict]:
    """[{"phrase", "score", "box" [x0, y0, x1, y1] in the image's pixels}] for each phrase of `prompt`."""
    from pretrain.glip.data import GroundingSample, positive_map_of
    from pretrain.glip.evaluation import top1_boxes

    phrases = phrases_of(prompt)
    if not phrases:
        raise BatonError(f"the prompt {prompt!r} names no phrase")
    cfg, tok = method.glip, method.tokenizer()
    samples = GroundingSample(cfg, tok)
    pixels = samples.batch_normalize(samples.resize(rgb_on_white(image))[None])
    enc = tok(prompt, padding="max_length", truncation=True, max_length=cfg.max_tokens, return_offsets_mapping=True)
    pmap = positive_map_of(enc["offset_mapping"], [[span] for _, span in phrases], cfg.max_tokens)[None]
    cut = [p for i, (p, _) in enumerate(phrases) if not pmap[0, i].any()]
    if cut:
        raise BatonError(f"the prompt is longer than the run's glip.max_tokens={cfg.max_tokens} tokens: "
                         f"{', '.join(repr(c) for c in cut)} would not reach the model; shorten the prompt "
                         f"or ground those phrases in another call")
    out = model(pixels, torch.tensor([enc["input_ids"]]), torch.tensor([enc["attention_mask"]]))
    boxes = top1_boxes(out, pmap)[0]
    probs = out["logits"][0].sigmoid()
    scores = (probs @ (pmap[0] / pmap[0].sum(-1, keepdim=True).clamp(min=1)).T).max(0).values
    sx, sy = image.width / cfg.image_size, image.height / cfg.image_size
    w, h = float(image.width), float(image.height)
    return [{"phrase": p, "score": float(s),
             "box": [min(max(float(b[0]) * sx, 0.0), w), min(max(float(b[1]) * sy, 0.0), h),
                     min(max(float(b[2]) * sx, 0.0), w), min(max(float(b[3]) * sy, 0.0), h)]}
            for (p, _), s, b in zip(phrases, scores, boxes)]


def draw(image: Image.Image, found: list[dict]) -> Image.Image:
    picture = rgb_on_white(image)   # a new image: the caller's is not drawn on
    pen = ImageDraw.Draw(picture)
    for i, f in enumerate(found):
        colour = COLOURS[i % len(COLOURS)]
        pen.rectangle(f["box"], outline=colour, width=2)
        pen.text((f["box"][0] + 2, f["box"][1] + 1), f"{f['phrase']} {f['score']:.2f}", fill=colour)
    return picture


def read_image(path: str) -> Image.Image:
    """The image file, fully decoded; BatonError naming it (Pillow raises many types: OSError,
    DecompressionBombError, SyntaxError, ValueError)."""
    try:
        image = Image.open(path)
        image.load()
    except Exception as e:   # noqa: BLE001 - every failure of a user's file is the same error
        raise BatonError(f"cannot read image {path}: {e}") from None
    return image


def checked_out(out: Path) -> Path:
    """--out when Pillow can write it: its folder exists and its extension names a format it saves."""
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise BatonError(f"--out {out}: {out.suffix or 'no extension'} is no image format Pillow writes; "
                         f"name a .png or .jpg file")
    if not out.parent.is_dir():
        raise BatonError(f"--out {out}: no folder {out.parent}")
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="baton ground", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a glip pretrain run directory (or its checkpoints/ or a step directory)")
    p.add_argument("image", help="an image file")
    p.add_argument("prompt", help='phrases separated by "." or ",": "red apple. cat face"')
    p.add_argument("--out", default=None, help="write the image with the boxes drawn here (default IMAGE.ground.png)")
    args = p.parse_args(argv)
    image = read_image(args.image)
    out = checked_out(Path(args.out) if args.out else Path(args.image).with_suffix(".ground.png"))
    method, model = load_run(args.run)
    found = ground(method, model, image, args.prompt)
    for f in found:
        x0, y0, x1, y1 = f["box"]
        print(f"{f['phrase']}: {f['score']:.3f} [{x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}]")
    try:
        draw(image, found).save(out)
    except OSError as e:
        raise BatonError(f"cannot write --out {out}: {e}") from None
    print(f"wrote {out}")
    return 0
