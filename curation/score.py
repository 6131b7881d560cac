"""Score stage: CLIP image embeddings + the LAION improved aesthetic predictor (v2).

`Scorer` is a model-backed stage (loads once per Ray actor, runs per batch). It only adds
columns: width, height (after EXIF orientation), aspect_ratio (h/w), aesthetic (~1-10), the
embedding (kept for dedup and eval), and a per-row decode error. Thresholds live in select.
"""
from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from _sigma.config import fingerprint
from _sigma.device import pick_device_precision
from _sigma.images import decode_image
from _sigma.models import clip_input_dtype, load_clip

MISSING = "image missing from the download tar"


class AestheticMLP(nn.Module):
    """LAION improved aesthetic predictor layout: state keys layers.{0,2,4,6,7}.{weight,bias}.

    Input: L2-normalised CLIP image embedding (B, dim) fp32 -> (B, 1) score. No activations
    between the linears (that is the published model), dropouts are inactive at eval.
    """

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)


def load_aesthetic(path: str, dim: int) -> AestheticMLP:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    mlp = AestheticMLP(dim)
    mlp.load_state_dict(state)
    return mlp.eval()


class Scorer:
    """Ray actor stage: batch {key, image(bytes)} -> adds width, height, aspect_ratio, aesthetic, embedding."""

    def __init__(self, clip_model: str, clip_pretrained: str, aesthetic_weights: str,
                 max_pixels: int, precision: str = "auto", num_gpus: float = 0.0):
        self.device, prec = pick_device_precision(precision, num_gpus)
        self.model, self.preprocess, _ = load_clip(clip_model, clip_pretrained, self.device, prec)
        self.dtype = clip_input_dtype(prec)
        dim = self.model.visual.output_dim
        self.mlp = load_aesthetic(aesthetic_weights, dim).to(self.device)
        self.max_pixels = max_pixels
        size = getattr(self.model.visual, "image_size", 224)
        side = size[0] if isinstance(size, (tuple, list)) else size
        self.draft = (side * 2, side * 2)

    @torch.inference_mode()  # Ray calls from another thread: grad mode must be set here
    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = batch.column("key").to_pylist()
        images = batch.column("image").to_pylist()
        n = len(keys)
        width, height, mode_in, rotated, error = [None] * n, [None] * n, [None] * n, [False] * n, [None] * n
        tensors, ok_idx = [], []
        for i, data in enumerate(images):
            if data is None:  # the manifest says downloaded, the tar does not have it
                error[i] = MISSING
                continue
            img, info = decode_image(data, self.max_pixels, draft=self.draft)
            width[i], height[i], mode_in[i] = info["width"], info["height"], info["mode_in"]
            rotated[i], error[i] = info["exif_transposed"], info["error"]
            if img is None:
                continue
            try:
                tensors.append(self.preprocess(img))
                ok_idx.append(i)
            except Exception as e:  # a transform failure must not cost the batch
                error[i] = f"preprocess failed: {e}"[:200]
        aesthetic = [None] * n
        dim = self.model.visual.output_dim
        emb_rows: list = [None] * n
        if tensors:
            x = torch.stack(tensors).to(self.device, self.dtype)  # (b, 3, S, S)
            emb = self.model.encode_image(x).float()  # (b, dim)
            emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            scores = self.mlp(emb).squeeze(-1).cpu().numpy()  # (b,)
            emb_np = emb.cpu().numpy().astype(np.float32)
            for j, i in enumerate(ok_idx):
                aesthetic[i] = float(scores[j])
                emb_rows[i] = emb_np[j]
        aspect = [h / w if (h and w) else None for w, h in zip(width, height)]
        emb_arr = pa.array([None if e is None else e.tolist() for e in emb_rows], pa.list_(pa.float32(), dim))
        out = {
            "_part": batch.column("_part"), "key": batch.column("key"),
            "width": pa.array(width, pa.int64()), "height": pa.array(height, pa.int64()),
            "aspect_ratio": pa.array(aspect, pa.float64()), "aesthetic": pa.array(aesthetic, pa.float64()),
            "mode_in": pa.array(mode_in, pa.string()), "exif_transposed": pa.array(rotated, pa.bool_()),
            "score_error": pa.array(error, pa.string()), "embedding": emb_arr,
        }
        return pa.table(out)


def score_fingerprint(cfg) -> str:
    s = cfg.score
    return fingerprint({"clip": s.clip_model, "pretrained": s.clip_pretrained, "aes": s.aesthetic_weights,
                        "max_pixels": s.max_pixels, "precision": s.precision})


def downloaded_rows(out: str, part: int) -> list[dict]:
    """The rows score reads: every key of the part whose download succeeded."""
    from _sigma import manifest

    t = manifest.read_part(out, part, ["key", "download_status"])
    return [{"key": k} for k, s in zip(t.column("key").to_pylist(), t.column("download_status").to_pylist())
            if s == "success"]


def _plan(part: int, out: str) -> dict:
    return {"part": part, "n": len(downloaded_rows(out, part))}


def finish_part(part: int, scored: pa.Table | None, out: str, fp: str) -> dict:
    """Commit one part (on a worker): embeddings file first, then the manifest columns (the
    'done' marker). A downloaded row whose bytes are not in the tar or do not decode becomes
    failed_decode with the reason."""
    from _sigma import manifest

    scored = _empty_scored() if scored is None else scored
    has_emb = pc.is_valid(scored.column("embedding"))
    with_emb = scored.filter(has_emb)
    emb = np.asarray(with_emb.column("embedding").to_pylist(), dtype=np.float32)
    manifest.write_embeddings(out, part, with_emb.column("key").to_pylist(), emb)
    base = manifest.read_part(out, part)
    merged = manifest.merge_columns(base, scored.drop_columns(["embedding"]))
    status, error = merged.column("status").to_pylist(), merged.column("error").to_pylist()
    dstat, serr = merged.column("download_status").to_pylist(), merged.column("score_error").to_pylist()
    if MISSING in serr:  # say why: a truncated or corrupt tar (named), found only on this rare path
        from curation.integrity import tar_problem

        why = tar_problem(out, part)
        if why:
            serr = [f"{MISSING}: {why}; rerun the download stage to fetch the part again" if se == MISSING else se
                    for se in serr]
            merged = merged.set_column(merged.column_names.index("score_error"), "score_error",
                                       pa.array(serr, pa.string()))
    for i, (ds, se) in enumerate(zip(dstat, serr)):
        if ds == "success" and status[i] in ("ok", "failed_decode"):
            status[i], error[i] = ("failed_decode", se) if se else ("ok", None)
    merged = merged.set_column(merged.column_names.index("status"), "status", pa.array(status, pa.string()))
    merged = merged.set_column(merged.column_names.index("error"), "error", pa.array(error, pa.string()))
    return manifest.write_part(out, part, merged, "score", fp)


def run_score(cfg, out: str, progress: bool = True) -> dict:
    import functools

    import ray

    from _sigma import fs
    from _sigma.partstage import commit_groups, nodes_of, pending_parts, read_images, run_tasks
    from _sigma.raystage import map_stage

    out, fp = fs.normalize(out), score_fingerprint(cfg)
    todo = pending_parts(out, "score", fp)
    plans = run_tasks(_plan, todo, kwargs={"out": out}, desc="score plan", progress=progress)
    expected = {p["part"]: p["n"] for p in plans}
    busy = [p for p in todo if expected[p]]
    ds = None
    if busy:
        s = cfg.score
        ds = ray.data.from_items([{"out": out, "part": p} for p in busy], override_num_blocks=len(busy))
        ds = ds.flat_map(functools.partial(read_images, rows_fn=downloaded_rows))
        ds = map_stage(ds, Scorer, s.resources, constructor_kwargs=dict(
            clip_model=s.clip_model, clip_pretrained=s.clip_pretrained, aesthetic_weights=s.aesthetic_weights,
            max_pixels=s.max_pixels, precision=s.precision, num_gpus=s.resources.num_gpus))
    done = commit_groups(ds, expected, finish_part, out=out, stage="score", kwargs={"out": out, "fp": fp},
                         progress=progress)
    return {"parts_scored": len(done), "images_scored": sum(expected.values()), "nodes": nodes_of(done.values())}
def _empty_scored() -> pa.Table:
    return pa.table({
        "key": pa.array([], pa.string()), "width": pa.array([], pa.int64()), "height": pa.array([], pa.int64()),
        "aspect_ratio": pa.array([], pa.float64()), "aesthetic": pa.array([], pa.float64()),
        "mode_in": pa.array([], pa.string()), "exif_transposed": pa.array([], pa.bool_()),
        "score_error": pa.array([], pa.string()), "embedding": pa.array([], pa.list_(pa.float32(), 1)),
    })
