"""Train the default QC head shipped in ``src/napari_cellmae/qc/heads/default.npz``.

Reproducible (fixed seeds): every training image is used once as it is ("ok") and once per
artefact recipe of ``napari_cellmae.qc.artefacts`` at a random severity 2–5, then a head is fitted
on the frozen encoder's per-channel embeddings plus the classic metrics. Training images:

- real fields from ``../shared/data/real/`` (used in place, never copied):
  the transfluor plate (BBBC016, GFP) wells O01–O12 (36 fields) and the speckles field (Hoechst
  and γH2AX, 1000×1200, cut into four 500×600 tiles per channel). HELD OUT for
  ``benchmarks/eval_qc.py``: transfluor wells O13–O24 and the ExampleHuman field;
- synthetic Cell-Painting fields: 4 fields × 5 stains, 512×512, 12-bit
  (``napari_cellmae.synthetic.make_field``, seeds 100–103);
- and the top-left and bottom-right 256×256 crops of all of the above (fields come in many sizes).

The plate-relative features of each image are taken against the clean images of its group
(:func:`plate_group`: the transfluor plate, each speckles stain, each synthetic stain; crops
separately).

Run from the project root with the encoder the head is for (a model folder, bundled name or HF id):

    python scripts/train_qc_head.py --model cellmae-tiny
    python scripts/train_qc_head.py --model /path/to/OpenPhenom --out my_openphenom_head.npz

The head records the encoder's name and checksum; the plugin uses it only with that encoder.
The head shipped now (before the bundled model is trained) was made on the bundled architecture
with random weights, reproducibly:

    python -c "import torch; from napari_cellmae.hub import save_model; \
      from napari_cellmae.model import create_model; torch.manual_seed(0); \
      save_model(create_model('cellmae_vit_tiny_patch16_256'), '/tmp/random-tiny')"
    python scripts/train_qc_head.py --model /tmp/random-tiny --threads 1   # checksum 9c9bad3592eb…
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
DEFAULT_OUT = ROOT / "src" / "napari_cellmae" / "qc" / "heads" / "default.npz"
TRAIN_WELLS = range(1, 13)  # transfluor O01–O12; O13–O24 are held out for eval_qc
EVAL_WELLS = range(13, 25)
SYNTHETIC_SEEDS = (100, 101, 102, 103)


def _read(path: Path) -> np.ndarray:
    from napari_cellmae.plates import read_image

    return read_image(path)[0]


def transfluor(wells: range, real: Path = REAL) -> list[tuple[str, np.ndarray]]:
    """(name, image) of the transfluor plate fields in ``wells`` (O01 = 1)."""
    folder = real / "transfluor-plate"
    out = []
    for path in sorted(folder.glob("*.TIF")):
        well = int(path.name.split("_O")[1][:2])
        if well in wells:
            out.append((f"transfluor/{path.name}", _read(path)))
    return out


def training_images(real: Path = REAL) -> list[tuple[str, np.ndarray]]:
    """The default head's training images, in a fixed order."""
    from napari_cellmae.synthetic import STAINS, make_field

    if not real.is_dir():
        raise SystemExit(f"real images not found at {real}: run from the project checkout")
    images = transfluor(TRAIN_WELLS, real)
    for path in sorted((real / "speckles").glob("*.tif")):
        image = _read(path)
        h, w = image.shape
        for y in (0, h // 2):
            for x in (0, w // 2):
                images.append(
                    (f"speckles/{path.name}[{y}:,{x}:]", image[y : y + h // 2, x : x + w // 2])
                )
    for seed in SYNTHETIC_SEEDS:
        field = make_field(5, (512, 512), seed=seed)
        images += [(f"synthetic/seed{seed}/{STAINS[c]}", field[c]) for c in range(len(field))]
    # 256×256 corners of every image too: fields come in many sizes and the metrics' ranges
    # (PowerLogLogSlope rings, tiles) depend on the size
    crops = []
    for name, image in images:
        h, w = image.shape
        crops.append((f"{name}[crop256:0,0]", image[:256, :256]))
        crops.append((f"{name}[crop256:{h - 256},{w - 256}]", image[h - 256 :, w - 256 :]))
    return images + crops


def plate_group(name: str) -> str:
    """The plate/channel an image belongs to (its plate-relative features use that group);
    256×256 crops form groups of their own."""
    size = "/crop256" if "[crop256:" in name else ""
    if name.startswith("transfluor/"):
        return "transfluor" + size
    if name.startswith("speckles/"):
        return name.split("[")[0] + size  # one group per stain
    return "synthetic/" + name.split("[")[0].rsplit("/", 1)[-1] + size  # one group per stain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="encoder source (default: bundled)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="head file (.npz)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--block",
        type=int,
        default=None,
        help="encoder block of the embedding features (default: the model's default block); "
        "the shipped head uses 4",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy CPU)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from napari_cellmae import load_model
    from napari_cellmae.progress import run
    from napari_cellmae.qc.training import train_head_from_images

    model = load_model(args.model, device=args.device, encoder_only=True)
    named = training_images()
    print(f"encoder {model.name} ({model.checksum[:12]}), {len(named)} training images")
    sources = sorted({n.split("/")[0] for n, _ in named})
    t0 = time.monotonic()

    def show(event):
        if event.total and (event.done % 90 == 0 or event.done == event.total):
            print(f"  {event.done}/{event.total} {event.message}", flush=True)

    head, x, labels = run(
        train_head_from_images(
            [im for _, im in named],
            model,
            groups=[plate_group(n) for n, _ in named],
            seed=args.seed,
            block=args.block,
            batch_size=args.batch_size,
            training={
                "sources": sources,
                "images": [n for n, _ in named],
                "held_out": "transfluor O13-O24 and ExampleHuman (benchmarks/eval_qc.py)",
                "script": "scripts/train_qc_head.py",
                "model_source": str(args.model or "bundled default"),
            },
        ),
        progress=show,
    )
    from napari_cellmae.qc.head import CLASSES

    predicted = np.asarray(CLASSES)[head.predict_proba(x).argmax(axis=1)]
    print(
        f"training accuracy {np.mean(predicted == np.asarray(labels)):.3f} on {len(labels)} images"
    )
    head.save(args.out)
    size_kib = args.out.stat().st_size / 1024
    print(f"wrote {args.out} ({size_kib:.0f} KiB) in {time.monotonic() - t0:.0f} s")
    print(head.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
