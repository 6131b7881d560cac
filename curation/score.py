"""Score stage: CLIP image embeddings + the LAION improved aesthetic predictor (v2), and the
optional web-crawl filters: the LAION NSFW detector (curation/nsfw.py), the LAION watermark
detector (curation/watermark.py) and the CLIP image-text similarity of the alt text.

`Scorer` is a model-backed stage (loads once per Ray actor, runs per batch). It only adds
columns: width, height (after EXIF orientation), aspect_ratio (h/w), aesthetic (~1-10), the
embedding (kept for dedup and eval), a per-row decode error, and nsfw, watermark (probabilities
0..1), clip_similarity (cosine), text_truncated (the alt text had more than the CLIP context's
tokens) -- null where the filter is off. Every column comes from the one decoded image (and its
one CLIP image embedding). Thresholds live in select.
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
from _sigma.fetch import local_model
from _sigma.models import clip_input_dtype, load_clip
from curation import watermark as wm
from curation.nsfw import load_nsfw

MISSING = "image missing from the download tar"
# The filter columns (null where a filter is off, so a rerun with it off clears stale values).
# nsfw and watermark depend on the image only; clip_similarity and text_truncated also on the row's
# alt text: rows sharing an image (same sha256) may differ there, so reuse of one image's scores
# across rows must not copy those two (the text tower is cheap: recompute them per row).
FILTER_COLUMNS = {"nsfw": pa.float64(), "watermark": pa.float64(), "clip_similarity": pa.float64(),
                  "text_truncated": pa.bool_()}


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
    state = torch.load(local_model(path), map_location="cpu", weights_only=True)  # path | s3:// | gs://
    state = state.get("state_dict", state)
    mlp = AestheticMLP(dim)
    mlp.load_state_dict(state)
    return mlp.eval()


class Scorer:
    """Ray actor stage: batch {key, image(bytes)} -> adds width, height, aspect_ratio, aesthetic, embedding."""

    def __init__(self, clip_model: str, clip_pretrained: str, aesthetic_weights: str,
                 max_pixels: int, precision: str = "auto", num_gpus: float = 0.0, nsfw_weights: str | None = None,
                 watermark_weights: str | None = None, watermark_arch: str = "efficientnet_b3",
                 clip_similarity: bool = False):
        self.device, prec = pick_device_precision(precision, num_gpus)
        self.model, self.preprocess, self.tokenizer = load_clip(clip_model, clip_pretrained, self.device, prec)
        # The filters (each None when off). NSFW reads the L2-normalised image embedding (fp32);
        # the watermark CNN runs fp32 on its own 256x256 view of the same decoded image.
        self.nsfw = load_nsfw(local_model(nsfw_weights)).to(self.device) if nsfw_weights else None
        self.watermark = (wm.WatermarkScorer(local_model(watermark_weights), watermark_arch, self.device)
                          if watermark_weights else None)
        self.similarity = bool(clip_similarity)
        self.dtype = clip_input_dtype(prec)
        dim = self.model.visual.output_dim
        if self.nsfw is not None and self.nsfw.dim != dim:  # e.g. the ViT-L/14 head on another CLIP
            raise ValueError(f"score.nsfw_weights {nsfw_weights}: an NSFW head for {self.nsfw.dim}-d embeddings, "
                             f"but score.clip_model {clip_model} gives {dim}-d ones (the released head needs ViT-L-14)")
        self.mlp = load_aesthetic(aesthetic_weights, dim).to(self.device)
        self.max_pixels = max_pixels
        size = getattr(self.model.visual, "image_size", 224)
        side = size[0] if isinstance(size, (tuple, list)) else size
        side = max(side, wm.SIZE) if self.watermark else side  # JPEG draft: never below what a model reads
        self.draft = (side * 2, side * 2)

    @torch.inference_mode()  # Ray calls from another thread: grad mode must be set here
    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = batch.column("key").to_pylist()
        images = batch.column("image").to_pylist()
        n = len(keys)
        width, height, mode_in, rotated, error = [None] * n, [None] * n, [None] * n, [False] * n, [None] * n
        tensors, ok_idx, wm_in = [], [], []
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
                t = self.preprocess(img)
                if self.watermark is not None:
                    wm_in.append(wm.preprocess(img))  # (3, 256, 256): the same decoded image
                tensors.append(t)
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
            filt = self._filters(emb, ok_idx, batch, n, wm_in)
        else:
            filt = {name: [None] * n for name in FILTER_COLUMNS}
        aspect = [h / w if (h and w) else None for w, h in zip(width, height)]
        emb_arr = pa.array([None if e is None else e.tolist() for e in emb_rows], pa.list_(pa.float32(), dim))
        out = {
            "_part": batch.column("_part"), "key": batch.column("key"),
            "width": pa.array(width, pa.int64()), "height": pa.array(height, pa.int64()),
            "aspect_ratio": pa.array(aspect, pa.float64()), "aesthetic": pa.array(aesthetic, pa.float64()),
            "mode_in": pa.array(mode_in, pa.string()), "exif_transposed": pa.array(rotated, pa.bool_()),
            "score_error": pa.array(error, pa.string()), "embedding": emb_arr,
            **{name: pa.array(filt[name], tp) for name, tp in FILTER_COLUMNS.items()},
        }
        return pa.table(out)

    def _filters(self, emb: torch.Tensor, ok_idx: list[int], batch: pa.Table, n: int, wm_in: list) -> dict:
        """nsfw / watermark / clip_similarity / text_truncated per row (None where off or not computable).
        emb: (b, dim) L2-normalised fp32 embeddings of the rows ok_idx."""
        out = {name: [None] * n for name in FILTER_COLUMNS}
        if self.nsfw is not None:
            for i, p in zip(ok_idx, self.nsfw(emb).double().cpu().tolist()):
                out["nsfw"][i] = p
        if self.watermark is not None:
            for i, p in zip(ok_idx, self.watermark(wm_in).tolist()):
                out["watermark"][i] = p
        if self.similarity and "caption" in batch.column_names:
            caps = batch.column("caption").to_pylist()
            rows = [(j, i) for j, i in enumerate(ok_idx) if isinstance(caps[i], str)]
            if rows:
                cos, cut = self.text_similarity(emb[[j for j, _ in rows]], [caps[i] for _, i in rows])
                for (_, i), c, t in zip(rows, cos, cut):
                    out["clip_similarity"][i], out["text_truncated"][i] = c, t
        return out

    @torch.inference_mode()
    def text_similarity(self, emb, texts: list[str]) -> tuple[list[float], list[bool]]:
        """(cosine, truncated) of each text with its image embedding. emb: (r, dim) L2-normalised
        image embeddings (tensor or array). Also used for byte copies whose alt text differs
        (curation/score_once.py)."""
        emb = torch.as_tensor(emb, device=self.device, dtype=torch.float32)
        tokens, cut = clip_tokens(self.tokenizer, texts)
        tokens = tokens.to(self.device)
        txt = encode_text_trimmed(self.model, tokens).float()  # (r, dim)
        txt = txt / txt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = (emb * txt).sum(-1).double().cpu().tolist()  # emb is unit-norm
        return cos, [bool(t) for t in cut]


def clip_tokens(tokenizer, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
    """((r, ctx) tokens exactly as open_clip's tokenizer gives them, truncated flags).

    Truncated <=> start + the text's tokens + end do not fit the context: the tokenizer run with
    one more slot fills that slot. open_clip's SimpleTokenizer truncates by keeping the first ctx
    tokens and writing the end token into the last one, so its ctx-token output is that longer
    output cut the same way (one tokenisation, not two: ftfy + BPE dominate the text cost); any
    other tokenizer is simply called twice."""
    ctx = tokenizer.context_length
    longer = tokenizer(texts, context_length=ctx + 1)  # (r, ctx + 1)
    cut = longer[:, ctx] != 0
    if type(tokenizer).__name__ == "SimpleTokenizer" and getattr(tokenizer, "reduction_fn", None) is None:
        tokens = longer[:, :ctx].clone()
        tokens[cut, ctx - 1] = tokenizer.eot_token_id
    else:
        tokens = tokenizer(texts)
    return tokens, [bool(c) for c in cut.tolist()]


def encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip CLIP.encode_text on the tokens cut after the batch's longest caption.

    CLIP's text tower is causal (each position attends to itself and earlier ones) and pools one
    position at or before the end token, so the padding after the longest caption changes nothing
    but costs most of the work (alt texts fill ~10-20 of the 77 positions). Same layers in the same
    order, positional embedding and causal mask sliced to the kept length; any other text tower
    (custom text models, a mask that is not causal) goes through encode_text unchanged.
    tokens: (r, 77) int64 -> (r, dim)."""
    mask = getattr(model, "attn_mask", None)
    if not all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")) \
            or mask is None or not torch.equal(mask, torch.triu(torch.full_like(mask, float("-inf")), 1)):
        return model.encode_text(tokens)
    from open_clip.transformer import text_global_pool

    n = max(int((tokens != 0).sum(1).max()), 1)
    text = tokens[:, :n]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast) + model.positional_embedding[:n].to(cast)  # (r, n, width)
    x = model.ln_final(model.transformer(x, attn_mask=mask[:n, :n]))
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


def score_fingerprint(cfg) -> str:
    s = cfg.score
    fp = {"clip": s.clip_model, "pretrained": s.clip_pretrained, "aes": s.aesthetic_weights,
          "max_pixels": s.max_pixels, "precision": s.precision}
    # The filters join the fingerprint only when on: outputs scored before they existed stay done.
    if s.nsfw_weights:
        fp["nsfw"] = s.nsfw_weights
    if s.watermark_weights:
        fp["watermark"] = [s.watermark_weights, s.watermark_arch]
    if s.clip_similarity:
        fp["clip_similarity"] = True
    return fingerprint(fp)


def downloaded_rows(out: str, part: int, captions: bool = False) -> list[dict]:
    """The rows score reads: every key of the part whose download succeeded (with its raw alt text
    when `captions`: the image-text similarity reads it)."""
    from _sigma import manifest

    t = manifest.read_part(out, part, ["key", "download_status"] + (["caption"] if captions else []))
    keys, stat = t.column("key").to_pylist(), t.column("download_status").to_pylist()
    caps = t.column("caption").to_pylist() if captions else [None] * len(keys)
    return [{"key": k, "caption": c} if captions else {"key": k} for k, s, c in zip(keys, stat, caps)
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
    from _sigma import fs
    from _sigma.partstage import commit_groups, nodes_of, pending_parts, run_tasks
    from _sigma.raystage import map_stage
    from curation import score_once

    out, fp = fs.normalize(out), score_fingerprint(cfg)
    todo = pending_parts(out, "score", fp)
    plans = run_tasks(_plan, todo, kwargs={"out": out}, desc="score plan", progress=progress)
    expected = {p["part"]: p["n"] for p in plans}
    busy = [p for p in todo if expected[p]]
    ds, distinct = None, 0
    if busy:
        s = cfg.score
        # each distinct sha256 is scored once, its copies get its values (curation/score_once.py)
        owners = score_once.map_owners(out, {p: expected[p] for p in busy}, captions=s.clip_similarity)
        distinct = owners["distinct"]
        ds = score_once.owner_images(out, owners)
        ds = map_stage(ds, score_once.ScoreOnce, s.resources, constructor_kwargs=dict(
            clip_model=s.clip_model, clip_pretrained=s.clip_pretrained, aesthetic_weights=s.aesthetic_weights,
            max_pixels=s.max_pixels, precision=s.precision, num_gpus=s.resources.num_gpus,
            nsfw_weights=s.nsfw_weights, watermark_weights=s.watermark_weights, watermark_arch=s.watermark_arch,
            clip_similarity=s.clip_similarity))
    done = commit_groups(ds, expected, finish_part, out=out, stage="score", kwargs={"out": out, "fp": fp},
                         progress=progress)
    score_once.cleanup(out)
    return {"parts_scored": len(done), "images_scored": sum(expected.values()), "distinct_images_scored": distinct,
            "nodes": nodes_of(done.values())}
def _empty_scored() -> pa.Table:
    return pa.table({
        "key": pa.array([], pa.string()), "width": pa.array([], pa.int64()), "height": pa.array([], pa.int64()),
        "aspect_ratio": pa.array([], pa.float64()), "aesthetic": pa.array([], pa.float64()),
        "mode_in": pa.array([], pa.string()), "exif_transposed": pa.array([], pa.bool_()),
        "score_error": pa.array([], pa.string()), "embedding": pa.array([], pa.list_(pa.float32(), 1)),
        **{name: pa.array([], tp) for name, tp in FILTER_COLUMNS.items()},
    })
