"""VAE latents: diffusers AutoencoderKL posterior mean and std, fp16 (8, h/8, w/8).

Storing the posterior (not one sample) lets training draw a fresh sample mean + std * eps per read,
as PixArt does. The scale factor is not applied here: it is recorded in index.json and applied by
the training loop. Also the decode + bucket + resize/crop step that feeds the encoder.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch

from _sigma.images import decode_image
from features.preprocess import preprocess, to_model_input
from _sigma.shards import npy_bytes
from _sigma.device import pick_device_dtype
from _sigma.models import load_vae

_CARRY_DROP = ("image", "targets")


def prepare_batch(batch: pa.Table) -> pa.Table:
    """Plain stage: decode each image once, then one output row per (key, target resolution).

    In: key, image (bytes), targets (json [[resolution, shard_id], ...]) + carried columns.
    Out: carried columns + _part (shard id), resolution, bucket, bucket_h, bucket_w, upscaled,
    pixels (uint8 (bucket_h, bucket_w, 3) raw bytes), prep_error.
    """
    carried = [c for c in batch.column_names if c not in _CARRY_DROP and c != "_part"]
    rows = batch.to_pylist()
    out: dict[str, list] = {c: [] for c in carried}
    extra: dict[str, list] = {k: [] for k in ("_part", "resolution", "bucket", "bucket_h", "bucket_w",
                                              "upscaled", "pixels", "prep_error")}
    for r in rows:
        img, info = decode_image(r["image"])
        for resolution, shard in json.loads(r["targets"]):
            rec = {"_part": shard, "resolution": resolution, "bucket": None, "bucket_h": None, "bucket_w": None,
                   "upscaled": None, "pixels": None, "prep_error": info.get("error")}
            if img is not None:
                try:
                    p = preprocess(img, resolution)
                    rec.update(bucket=p["bucket"], bucket_h=p["height"], bucket_w=p["width"],
                               upscaled=p["upscaled"], pixels=p["pixels"].tobytes())
                except Exception as e:  # reason recorded, the job goes on
                    rec["prep_error"] = f"preprocess failed: {e}"[:300]
            elif not rec["prep_error"]:
                rec["prep_error"] = "decode failed"
            for c in carried:
                out[c].append(r[c])
            for k, v in rec.items():
                extra[k].append(v)
    table = pa.table({c: pa.array(out[c], batch.schema.field(c).type) for c in carried})
    types = {"_part": pa.int64(), "resolution": pa.int32(), "bucket": pa.string(), "bucket_h": pa.int32(),
             "bucket_w": pa.int32(), "upscaled": pa.bool_(), "pixels": pa.binary(), "prep_error": pa.string()}
    for k, v in extra.items():
        table = table.append_column(k, pa.array(v, types[k]))
    return table


class VaeEncoder:
    """Model-backed stage: pixels -> latent (npy bytes of fp16 (8, h/8, w/8): mean then std)."""

    def __init__(self, vae: str, precision: str = "auto", num_gpus: float = 0.0):
        self.device, self.dtype = pick_device_dtype(precision, num_gpus)
        self.vae = load_vae(vae, self.device, self.dtype)
        self.latent_channels = int(self.vae.config.latent_channels)

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> fp16 (B, 2*C, H/8, W/8) = cat(posterior mean, posterior std)."""
        x = torch.from_numpy(np.stack([to_model_input(a) for a in images]))  # (B, 3, H, W) in [-1, 1]
        dist = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        moments = torch.cat([dist.mean, dist.std], dim=1).float()  # (B, 8, H/8, W/8)
        return moments.cpu().numpy().astype(np.float16)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        pixels = batch.column("pixels").to_pylist()
        hs, ws = batch.column("bucket_h").to_pylist(), batch.column("bucket_w").to_pylist()
        errors = batch.column("prep_error").to_pylist()
        latents: list = [None] * n
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(n):
            if pixels[i] is not None and errors[i] is None:
                groups.setdefault((hs[i], ws[i]), []).append(i)
        for (h, w), idx in groups.items():  # one forward per bucket shape
            try:
                arr = np.stack([np.frombuffer(pixels[i], np.uint8).reshape(h, w, 3) for i in idx])
                lat = self.encode(arr)
                for j, i in enumerate(idx):
                    latents[i] = npy_bytes(lat[j])
            except Exception as e:  # keep going: the rows carry the reason
                for i in idx:
                    errors[i] = f"vae failed: {e}"[:300]
        batch = batch.drop_columns(["pixels", "prep_error"])
        batch = batch.append_column("latent", pa.array(latents, pa.binary()))
        return batch.append_column("prep_error", pa.array(errors, pa.string()))
