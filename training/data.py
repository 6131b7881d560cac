"""Training batches from the feature shards (`<output>/shards/<res>/shard-*.tar` + index.json).

Design (why it is not a plain WebDataset pipeline):
- Bucket-pure batches: every batch holds one aspect bucket, so latents stack to (B, 4, h, w).
- Deterministic and resumable: the order of an epoch is a pure function of (seed, rank, epoch), and
  the position is (epoch, cursor = index of the next batch in that epoch's order). A checkpoint
  stores it and resume continues with exactly the next batch (the official loader restarts the
  epoch). All per-sample randomness (long/short caption, caption dropout, latent sampling noise) is
  also derived from the position, so a resumed run sees bit-identical batches.
- Random access through _sigma.shards (the only reader of the format): each rank lists the
  members of its shards once (`scan_members`: tar headers + json only) and a batch reads only its
  members (`read_member`). Shards are local or on an object store (_sigma.fs).
- Trust nothing: every shard's size and sample count must equal index.json; a shard that is
  missing, truncated (even at a member boundary, which a tar reader accepts silently) or holds an
  incomplete sample raises `ShardError` naming it, before any step is trained. Every member read
  is checked against the sha256 written with it (its PAX header) before it is decoded, so a
  flipped byte raises `ShardError` naming the shard and member instead of being trained on;
  shards written without member sums are checked whole against index.json's sha256 on the scan.
- Each rank reads disjoint shards (shards[rank::world_size]). With fewer shards than ranks it falls
  back to disjoint samples (every world_size-th sample), with a warning.
"""
from __future__ import annotations

import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from _sigma import fs
from _sigma import shards
from _sigma.shards import ShardError, decode_tokens, open_shard, read_index, read_member, repad

__all__ = ["ShardBatches", "Prefetch", "make_batches", "SampleRef", "ShardError", "scan_shard", "read_index"]


@dataclass(frozen=True)
class SampleRef:
    shard: str  # tar file name
    key: str
    bucket: str
    members: dict  # suffix ("latent.npy", "t5_long.npy", ...) -> (offset, size, sha256 or None)


def scan_shard(shards_dir: str, entry: dict) -> list[SampleRef]:
    """The samples of one shard of the index, checked against its entry (_sigma.shards.scan_shard)."""
    return [SampleRef(entry["name"], g["key"], str(g["meta"]["bucket"]), g["members"])
            for g in shards.scan_shard(shards_dir, entry)]


def _scan_all(shards_dir: str, entries: list[dict]) -> list[SampleRef]:
    """scan_shard over many shards, a few at a time (I/O bound on object stores), in order."""
    if len(entries) <= 1:
        return [r for e in entries for r in scan_shard(shards_dir, e)]
    with ThreadPoolExecutor(max_workers=min(8, len(entries))) as pool:
        return [r for refs in pool.map(lambda e: scan_shard(shards_dir, e), entries) for r in refs]


def _key_seed(key: str) -> int:
    return zlib.crc32(key.encode())


class ShardBatches:
    """Iterator of bucket-pure training batches for one rank, with a resumable position.

    A batch is a dict: x (B, 4, h, w) float32 scaled latents, y (B, L, D) float32 T5 tokens,
    mask (B, L) int64 (1 = valid token), drop (B,) bool (caption dropped -> use the null embedding),
    long (B,) bool, keys list[str], bucket str.
    """

    def __init__(self, shards_dir, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 long_ratio: float = 0.6, caption_dropout: float = 0.1, pad_tokens: str = "batch",
                 max_length: int = 300, verify: bool = True):
        self.dir = fs.normalize(shards_dir)
        self.verify = verify  # member sha256 checks (False only for the benchmark's baseline)
        self.index = read_index(self.dir)
        self.scale = float(self.index["vae"]["scale_factor"])
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.long_ratio, self.caption_dropout = long_ratio, caption_dropout
        self.pad_tokens, self.max_length = pad_tokens, max_length
        entries = sorted((e for e in self.index["shards"] if e.get("samples", 1) > 0), key=lambda e: e["name"])
        if not entries:
            raise ValueError(f"{self.dir}: the index lists no non-empty shard")
        if len(entries) >= world_size:
            mine = entries[rank::world_size]
            self.shard_names = [e["name"] for e in mine]
            self.samples = _scan_all(self.dir, mine)
        else:
            warnings.warn(f"{len(entries)} shard(s) for {world_size} ranks: splitting samples instead")
            self.shard_names = [e["name"] for e in entries]
            self.samples = _scan_all(self.dir, entries)[rank::world_size]
        if not self.samples:
            raise ValueError(f"rank {rank}: no samples in {self.shard_names}")
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, []
        self._files: dict[str, object] = {}

    # --- position ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "rank": self.rank,
                "world_size": self.world_size, "shards": list(self.shard_names)}

    def load_state_dict(self, st: dict) -> None:
        if st.get("shards") is not None and list(st["shards"]) != list(self.shard_names):
            warnings.warn("resuming with a different shard set: the data position is only approximate")
        self.epoch, self.cursor = int(st["epoch"]), int(st["cursor"])

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """Batches (lists of sample indices) of one epoch: shuffle within each bucket, cut into
        batches (the last one of a bucket may be smaller: nothing is dropped), shuffle batches."""
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, self.rank, epoch, 7])
            by_bucket: dict[str, list[int]] = {}
            for i, r in enumerate(self.samples):
                by_bucket.setdefault(r.bucket, []).append(i)
            batches = []
            for b in sorted(by_bucket):
                idx = np.array(by_bucket[b])[rng.permutation(len(by_bucket[b]))]
                batches += [idx[i:i + self.batch_size].tolist() for i in range(0, len(idx), self.batch_size)]
            self._order = [batches[i] for i in rng.permutation(len(batches))]
            self._order_epoch = epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        order = self.epoch_order(self.epoch)
        if self.cursor >= len(order):
            self.epoch, self.cursor = self.epoch + 1, 0
            order = self.epoch_order(self.epoch)
        batch = self.load_batch([self.samples[i] for i in order[self.cursor]], self.epoch, self.cursor)
        self.cursor += 1
        batch["position"] = (self.epoch, self.cursor)  # the position AFTER this batch
        return batch

    # --- reading -------------------------------------------------------------------------
    def _read(self, ref: SampleRef, suffix: str) -> np.ndarray:
        uri = fs.join(self.dir, ref.shard)  # names checked by read_index: inside self.dir
        fh = self._files.get(ref.shard)
        if fh is None:
            fh = self._files[ref.shard] = open_shard(uri)
        return read_member(fh, ref.members[suffix], f"{uri}: member {ref.key}.{suffix}", verify=self.verify)

    def load_batch(self, refs: list[SampleRef], epoch: int, cursor: int) -> dict:
        lat, toks, longs, drops = [], [], [], []
        for r in refs:
            u = np.random.default_rng([self.seed, epoch, _key_seed(r.key)]).random(2)
            use_long = bool(u[0] < self.long_ratio) and "t5_long.npy" in r.members
            if "t5_short.npy" not in r.members:
                use_long = True
            lat.append(self._read(r, "latent.npy"))  # (8, h, w) fp16: mean then std
            toks.append(decode_tokens(self._read(r, "t5_long.npy" if use_long else "t5_short.npy")))  # (n, D)
            longs.append(use_long)
            drops.append(bool(u[1] < self.caption_dropout))
        moments = torch.from_numpy(np.stack(lat)).float()  # (B, 8, h, w)
        mean, std = moments.chunk(2, dim=1)
        g = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, self.rank, epoch, cursor]).integers(2**62)))
        eps = torch.randn(mean.shape, generator=g)
        x = (mean + std * eps) * self.scale  # (B, 4, h, w): a posterior sample, scaled
        toks = [t[: self.max_length].astype(np.float32) for t in toks]  # (n_i, D) valid tokens
        y, mask = repad(toks, self.max_length if self.pad_tokens == "max" else None)
        y, mask = torch.from_numpy(y), torch.from_numpy(mask)  # (B, L, D) float32, (B, L) int64
        return {"x": x, "y": y, "mask": mask, "drop": torch.tensor(drops), "long": torch.tensor(longs),
                "keys": [r.key for r in refs], "bucket": refs[0].bucket}

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


class Prefetch:
    """Loads the next `depth` batches of a ShardBatches in a background thread (file reads and
    numpy decoding overlap the training step). The saved position is the one of the last batch
    CONSUMED, so checkpoints and resume are unaffected by how far the thread ran ahead."""

    def __init__(self, source: ShardBatches, depth: int = 2):
        import queue
        import threading

        self.source, self.depth = source, depth
        self.epoch, self.cursor = source.epoch, source.cursor
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                item = next(self.source)
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.2)
                        break
                    except Exception:  # queue.Full: re-check the stop flag
                        continue
        except BaseException as e:  # surfaced in the training loop, not lost in the thread
            self._q.put(e)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        self.epoch, self.cursor = item["position"]
        return item

    @property
    def shard_names(self):
        return self.source.shard_names

    @property
    def samples(self):
        return self.source.samples

    def state_dict(self) -> dict:
        return dict(self.source.state_dict(), epoch=self.epoch, cursor=self.cursor)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.source.close()


def make_batches(shards_dir, batch_size: int, rank: int, world_size: int, seed: int, long_ratio: float,
                 caption_dropout: float, pad_tokens: str, max_length: int, prefetch: int,
                 position: dict | None = None):
    """A ShardBatches positioned at `position` (from a checkpoint), wrapped in Prefetch if asked."""
    src = ShardBatches(shards_dir, batch_size, rank, world_size, seed, long_ratio, caption_dropout,
                       pad_tokens, max_length)
    if position is not None:
        src.load_state_dict(position)
    return Prefetch(src, prefetch) if prefetch > 0 else src
