"""The command lines of `sigma-sample` and `sigma-convert`, kept free of torch so that `--help`,
`--version` and mistakes in the arguments answer at once, before the models load and before
anything is written. training.sample / training.convert parse with the same parsers."""
from __future__ import annotations

import sys

from _sigma.cli import make_parser, user_error

PRESET_NAMES = ("PixArt-XL/2", "PixArt-tiny")  # training.model.PRESETS (checked there once imported)


def sample_parser():
    ap = make_parser("sigma-sample", "Generate images with a PixArt-Sigma DiT (DPM-Solver++ or IDDPM, CFG).\n\n"
                     "  sigma-sample --checkpoint runs/demo/train/demo-512-kv --t5 models/tiny/t5 --vae models/tiny/vae \\\n"
                     "      --prompt 'a red circle' --height 512 --width 512 --out samples/\n\n"
                     "Model arguments are local paths, hub names or s3:// / gs:// URIs.")
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder / stage output / diffusers dir / .pth")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file, one prompt per line")
    src.add_argument("--prompt", help="a single prompt")
    ap.add_argument("--t5", required=True, help="T5 encoder folder (model + tokenizer) or hub name")
    ap.add_argument("--vae", required=True, help="AutoencoderKL folder or hub name")
    ap.add_argument("--out", required=True, help="output folder for PNGs")
    ap.add_argument("--preset", default="PixArt-XL/2", help=f"model preset for plain state-dict files ({', '.join(PRESET_NAMES)})")
    ap.add_argument("--image-size", type=int, default=None,
                    help="resolution an official .pth was trained at (its PE; required for files that do not record it)")
    ap.add_argument("--pe-version", dest="version", choices=["sigma", "alpha"], default="sigma",
                    help="PE table of --image-size")
    ap.add_argument("--trust-pickle", action="store_true", help="allow .pth files that need a full pickle load")
    ap.add_argument("--height", type=int, default=1024, help="image height in pixels (a multiple of 8)")
    ap.add_argument("--width", type=int, default=1024, help="image width in pixels (a multiple of 8)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20 for dpm, 100 for iddpm)")
    ap.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale")
    ap.add_argument("--seed", type=int, default=0, help="image i uses noise seed + i")
    ap.add_argument("--sampler", choices=["dpm", "iddpm"], default="dpm", help="DPM-Solver++ (2M) or IDDPM")
    ap.add_argument("--batch-size", type=int, default=4, help="prompts per forward")
    ap.add_argument("--max-length", type=int, default=300, help="T5 tokens per prompt")
    ap.add_argument("--negative-prompt", default=None, help="use T5(text) as the null caption")
    ap.add_argument("--scale-factor", type=float, default=None, help="VAE latent scale (default: the VAE config)")
    ap.add_argument("--device", default=None, help="cuda / mps / cpu (default: the best available)")
    return ap


def sample_problem(args) -> str | None:
    """The first error in sigma-sample's arguments, found without loading a model."""
    from _sigma import fs
    from _sigma.fetch import source_problem

    if args.preset not in PRESET_NAMES:
        return f"--preset {args.preset}: unknown; allowed: {', '.join(PRESET_NAMES)}"
    if args.height % 8 or args.width % 8 or args.height < 8 or args.width < 8:
        return f"--height {args.height} --width {args.width}: must be positive multiples of 8"
    if args.prompts is not None and not fs.exists(args.prompts):
        return f"--prompts {args.prompts}: no such file"
    if not fs.exists(args.checkpoint) and not (fs.is_remote(args.checkpoint) and fs.isdir(args.checkpoint)):
        return f"--checkpoint {args.checkpoint}: no such file or folder"
    if fs.local_path(args.out) and fs.exists(args.out) and not fs.isdir(args.out):
        return f"--out {args.out}: is a file, give a folder"
    return source_problem("--t5", args.t5) or source_problem("--vae", args.vae)


def convert_parser():
    ap = make_parser("sigma-convert", "Convert PixArt checkpoints (official .pth <-> diffusers).\n\n"
                     "  sigma-convert --to-diffusers PixArt-Sigma-XL-2-1024-MS.pth out/transformer --image-size 1024\n"
                     "  sigma-convert --from-diffusers pixart-sigma-pipeline/ out/model.pth")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--to-diffusers", nargs=2, metavar=("CKPT", "OUT_DIR"), help="official .pth -> diffusers folder")
    g.add_argument("--from-diffusers", nargs=2, metavar=("DIR", "OUT_PTH"), help="diffusers folder -> .pth")
    ap.add_argument("--image-size", type=int, default=None,
                    help="resolution an official .pth was trained at (required unless the file records it)")
    ap.add_argument("--pe-version", dest="version", choices=["sigma", "alpha"], default="sigma",
                    help="PE table of --image-size")
    ap.add_argument("--preset", default="PixArt-XL/2",
                    help=f"heads for a checkpoint without a saved model_config ({', '.join(PRESET_NAMES)})")
    ap.add_argument("--base-size", type=int, default=None, help="override PE base_size")
    ap.add_argument("--pe-interpolation", type=float, default=None, help="override PE interpolation")
    ap.add_argument("--null-caption", default=None,
                    help="T5 folder / diffusers pipeline folder / null file: the null caption T5(\"\")")
    ap.add_argument("--trust-pickle", action="store_true", help="allow .pth files that need a full pickle load")
    return ap


def convert_problem(args) -> str | None:
    from _sigma import fs
    from _sigma.fetch import source_problem

    if args.preset not in PRESET_NAMES:
        return f"--preset {args.preset}: unknown; allowed: {', '.join(PRESET_NAMES)}"
    src, flag = (args.to_diffusers[0], "--to-diffusers") if args.to_diffusers else (args.from_diffusers[0], "--from-diffusers")
    if not fs.exists(src) and not (fs.is_remote(src) and fs.isdir(src)):
        return f"{flag} {src}: no such file or folder"
    if args.null_caption and not fs.exists(args.null_caption):
        return source_problem("--null-caption", args.null_caption)
    return None


def sample(argv=None) -> int:
    """Console script `sigma-sample`."""
    args = sample_parser().parse_args(argv)
    problem = sample_problem(args)
    if problem:
        return user_error("sigma-sample", problem)
    from training import sample as mod

    mod.run(args)
    return 0


def convert(argv=None) -> int:
    """Console script `sigma-convert`."""
    args = convert_parser().parse_args(argv)
    problem = convert_problem(args)
    if problem:
        return user_error("sigma-convert", problem)
    from training import convert as mod

    return mod.run(args) or 0


if __name__ == "__main__":
    sys.exit(sample())
