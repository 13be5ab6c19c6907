"""Train record order: which stored records form the global batch of step k, in O(epoch)
time for any k (resume at step 10^6 costs what step 0 costs), and random-access reads.

Order (a pure function of (seed, global batch P*D*B, the stored train records)):
  * the usable train records (>= 1 non-crowd instance with a polygon), in index order
    (shard files sorted by name, records in file order), numbered 0..N-1;
  * epoch e is the permutation `numpy.random.default_rng([seed, e]).permutation(N)`
    (a fresh permutation every epoch, as detectron2's TrainingSampler);
  * aspect-ratio grouping as detectron2's AspectRatioGroupedDataset over the endless
    stream epoch 0, epoch 1, ...: each record goes to its group's bucket (0 = landscape,
    w > h; 1 = portrait); a bucket that reaches P*D*B records becomes the next global
    batch (records in stream order); leftovers carry over into the next epoch.
Group g holds N_g records per epoch, so after e whole epochs exactly
sum_g floor(e * N_g / PDB) batches were formed: the epoch of step k is found by bisection,
the batches inside it from that epoch's permutation alone (plus earlier ones when a batch
reaches back over an epoch boundary).

`RecordIndex` (train_index.npz beside the records, written by `prepare`; built and saved on
first use for a dataset prepared before it) holds each record's file, byte offset, length,
group, usability and stored (H0, W0), so the order and each batch's canvas need no record
read, and `read(i)` fetches one record's bytes directly.
"""
import logging
import os
import struct
import threading
import time
from typing import List, Sequence, Tuple

import numpy as np

INDEX_FILE = "train_index.npz"
_HEADER = 12  # TFRecord: uint64 length, uint32 masked crc of the length; data; uint32 crc


class RecordIndex:
  """Per-record arrays of one split's TFRecord files (index order: sorted files, file order).

  files [F] names; sizes [F] bytes; file [R] int32; offset [R] int64 (record header);
  length [R] int64 (data bytes); group [R] int8 (0 landscape, 1 portrait); usable [R] bool;
  h0, w0 [R] int32.
  """

  FIELDS = ("file", "offset", "length", "group", "usable", "h0", "w0")

  def __init__(self, directory: str, files: Sequence[str], sizes, **arrays):
    self.directory, self.files = directory, list(files)
    self.sizes = np.asarray(sizes, np.int64)
    for k in self.FIELDS:
      setattr(self, k, np.asarray(arrays[k]))
    self._fds, self._lock = {}, threading.Lock()

  def __len__(self):
    return len(self.offset)

  def save(self, path: str):
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    arrays = {k: getattr(self, k) for k in self.FIELDS}
    np.savez(tmp, files=np.asarray(self.files), sizes=self.sizes, arrays=np.asarray(list(arrays)),
             **{f"a_{k}": v for k, v in arrays.items()})
    os.replace(tmp, path)

  def read(self, i: int) -> bytes:
    """The serialized example of record i (one positioned read; the stored length checked)."""
    f, off, n = int(self.file[i]), int(self.offset[i]), int(self.length[i])
    path = os.path.join(self.directory, self.files[f])
    if os.path.exists(path):
      with self._lock:
        fd = self._fds.get(f)
        if fd is None:
          fd = self._fds[f] = os.open(path, os.O_RDONLY)
      buf = os.pread(fd, _HEADER + n, off)
    else:  # a remote filesystem (gs://, ...)
      import tensorflow as tf
      with tf.io.gfile.GFile(path, "rb") as fh:
        fh.seek(off)
        buf = fh.read(_HEADER + n)
    if len(buf) != _HEADER + n or struct.unpack("<Q", buf[:8])[0] != n:
      raise IOError(f"{path}: record {i} at byte {off} does not match {INDEX_FILE} (the "
                    "records changed after the index was written; delete the index)")
    return buf[_HEADER:]

  def __del__(self):
    for fd in getattr(self, "_fds", {}).values():
      try:
        os.close(fd)
      except OSError:
        pass


def _scan_offsets(path: str) -> Tuple[List[int], List[int]]:
  """(header offsets, data lengths) of every record in one TFRecord file (headers only)."""
  import tensorflow as tf
  offsets, lengths = [], []
  with tf.io.gfile.GFile(path, "rb") as f:
    size = f.size()
    pos = 0
    while pos < size:
      f.seek(pos)
      head = f.read(8)
      if len(head) != 8:
        raise IOError(f"{path}: truncated record header at byte {pos}")
      n = struct.unpack("<Q", head)[0]
      offsets.append(pos)
      lengths.append(n)
      pos += _HEADER + n + 4
    if pos != size:
      raise IOError(f"{path}: truncated record at byte {offsets[-1]}")
  return offsets, lengths


def group_and_usable(features):
  """serialized -> (serialized, group (0 landscape w > h, as detectron2; 1 portrait),
  usable for training (>= 1 non-crowd instance with a polygon), H0, W0)."""
  import tensorflow as tf

  def fn(serialized):
    ex = features.deserialize_example(serialized)
    group = tf.where(ex["width"] > ex["height"], 0, 1)
    obj = ex["objects"]
    usable = tf.reduce_any(tf.logical_and(tf.logical_not(obj["is_crowd"]), obj["num_parts"] > 0))
    return serialized, tf.cast(group, tf.int64), usable, ex["height"], ex["width"]
  return fn


def build_index(directory: str, files: Sequence[str], features) -> RecordIndex:
  """Reads every record once: offsets from the headers, (group, usable, H0, W0) parsed."""
  import tensorflow as tf
  file_ids, offsets, lengths, sizes = [], [], [], []
  for j, name in enumerate(files):
    path = os.path.join(directory, name)
    o, n = _scan_offsets(path)
    file_ids += [j] * len(o)
    offsets += o
    lengths += n
    sizes.append(tf.io.gfile.stat(path).length)

  small = group_and_usable(features)
  ds = tf.data.TFRecordDataset([os.path.join(directory, f) for f in files])
  ds = ds.map(lambda s: small(s)[1:], num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  parsed = [np.asarray(c) for c in zip(*ds.as_numpy_iterator())] or [np.zeros(0)] * 4
  if len(parsed[0]) != len(offsets):
    raise IOError(f"{directory}: {len(offsets)} record headers but {len(parsed[0])} records")
  return RecordIndex(directory, files, sizes, file=np.asarray(file_ids, np.int32),
                     offset=np.asarray(offsets, np.int64), length=np.asarray(lengths, np.int64),
                     group=parsed[0].astype(np.int8), usable=parsed[1].astype(bool),
                     h0=parsed[2].astype(np.int32), w0=parsed[3].astype(np.int32))


def load_index(directory: str, files: Sequence[str]):
  """The saved index of `files` if it matches them (names and sizes), else None."""
  import tensorflow as tf
  path = os.path.join(directory, INDEX_FILE)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path, "rb") as f:
    z = dict(np.load(f, allow_pickle=False))
  sizes = [tf.io.gfile.stat(os.path.join(directory, n)).length for n in files]
  if list(z["files"]) != list(files) or list(z["sizes"]) != sizes:
    return None
  if any(f"a_{k}" not in z for k in RecordIndex.FIELDS):
    return None
  return RecordIndex(directory, files, sizes, **{k: z[f"a_{k}"] for k in RecordIndex.FIELDS})


def train_index(directory: str, files: Sequence[str], features,
                quiet: bool = False) -> RecordIndex:
  """The index of the train records: loaded, or built (one read of the split) and saved
  (`prepare` writes it; a dataset prepared before it gets it on first use)."""
  index = load_index(directory, files)
  if index is not None:
    return index
  t = time.perf_counter()
  index = build_index(directory, files, features)
  try:
    index.save(os.path.join(directory, INDEX_FILE))
    if not quiet:
      logging.warning("built %s for %s (%d records, %.1f s; once per dataset)", INDEX_FILE,
                      directory, len(index), time.perf_counter() - t)
  except OSError as e:
    logging.warning("built the train record index (%d records, %.1f s) but could not save "
                    "it in %s (%s): it is rebuilt at every start", len(index),
                    time.perf_counter() - t, directory, e)
  return index


class TrainOrder:
  """Global batch of step k -> (record numbers [PDB] into the index, group); see the module
  docstring for the order. groups: [N] group (0/1) of each usable record."""

  def __init__(self, groups: np.ndarray, seed: int, batch: int, cache_epochs: int = 4):
    self.groups = np.asarray(groups, np.int64)
    self.n = len(self.groups)
    if self.n == 0:
      raise ValueError("no usable train image (every image has no non-crowd instance with "
                       "a polygon)")
    self.seed, self.batch = int(seed), int(batch)
    self.n_group = np.asarray([(self.groups == g).sum() for g in (0, 1)], np.int64)
    self._perm, self._epochs, self._keep = {}, {}, cache_epochs
    self._lock = threading.Lock()

  def batches_before_epoch(self, e: int) -> int:
    """Global batches formed in epochs 0..e-1."""
    return int(sum((e * n) // self.batch for n in self.n_group))

  def epoch_of_step(self, step: int) -> int:
    lo, hi = 0, 1
    while self.batches_before_epoch(hi) <= step:
      lo, hi = hi, hi * 2
    while hi - lo > 1:  # batches_before_epoch(lo) <= step < batches_before_epoch(hi)
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if self.batches_before_epoch(mid) <= step else (lo, mid)
    return lo

  def permutation(self, e: int) -> np.ndarray:
    p = self._perm.get(e)
    if p is None:
      p = np.random.default_rng([self.seed, e]).permutation(self.n)
      self._cache(self._perm, e, p)
    return p

  def _group_records(self, e: int, g: int) -> np.ndarray:
    """Usable record numbers of group g in epoch e's stream order."""
    p = self.permutation(e)
    return p[self.groups[p] == g]

  def _cache(self, d, key, value):
    d[key] = value
    while len(d) > self._keep:
      d.pop(min(d))

  def _epoch_batches(self, e: int):
    """(group [n_e], last group-stream item [n_e]) of the batches formed during epoch e."""
    hit = self._epochs.get(e)
    if hit is not None:
      return hit
    seq = self.groups[self.permutation(e)]
    emit_group, emit_last, emit_pos = [], [], []
    for g in (0, 1):
      count = e * self.n_group[g] + np.cumsum(seq == g)  # group-g items so far, incl. t
      pos = np.nonzero((seq == g) & (count % self.batch == 0))[0]
      emit_pos.append(pos)
      emit_group.append(np.full(len(pos), g))
      emit_last.append(count[pos] - 1)
    order = np.argsort(np.concatenate(emit_pos), kind="stable")
    out = (np.concatenate(emit_group)[order], np.concatenate(emit_last)[order])
    self._cache(self._epochs, e, out)
    return out

  def batch_records(self, step: int) -> Tuple[np.ndarray, int]:
    """(usable record numbers [PDB] in bucket order, group) of global batch `step`."""
    with self._lock:
      e = self.epoch_of_step(step)
      groups, last = self._epoch_batches(e)
      j = step - self.batches_before_epoch(e)
      g, m = int(groups[j]), int(last[j])
      items = np.arange(m - self.batch + 1, m + 1)  # positions in group g's endless stream
      ng = int(self.n_group[g])
      out = np.empty(self.batch, np.int64)
      for ep in np.unique(items // ng):
        sel = items // ng == ep
        out[sel] = self._group_records(int(ep), g)[items[sel] % ng]
      return out, g


def record_files(directory: str, split: str) -> List[str]:
  """Sorted names of a split's TFRecord shard files in a prepared dataset directory."""
  import tensorflow as tf
  from centermask_jax.data import coco_builder
  pattern = os.path.join(directory, f"{coco_builder.BUILDER_NAME}-{split}.tfrecord-*")
  files = sorted(os.path.basename(f) for f in tf.io.gfile.glob(pattern))
  if not files:
    raise FileNotFoundError(f"no {split} records in {directory}")
  return files
