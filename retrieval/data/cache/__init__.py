"""Decoded-image cache: each split decoded once and stored as raw uint8.

Why: decoding JPEGs with Pillow is what limits a GPU training step; reading already-decoded bytes
from a memory-mapped file costs a memcpy. `retrieval prepare` writes the cache (`writer`);
`reader.CachedSplit` maps it and checks that it belongs to the dataset; `loader.CacheTrainLoader`
turns it into training batches, cropped, flipped and normalised on the device
(retrieval.data.gpu_augment). `layout` is what writer and reader agree on.

Sizes: evaluation splits are stored at the test transform's short side (Resize(256) before the
centre crop), so the cache holds exactly the pixels the file pipeline evaluates.  The training
split is stored at its ORIGINAL resolution, downscaled only where its short side exceeds a cap (512
by default): RandomResizedCrop then samples the same boxes (as fractions of the image) from the
same pixels as the file pipeline, so small crops are as sharp as crops of the files.  A training
cache written at a fixed short side (the old layout) is still read, but its small crops are
blurrier; the trainer says so.

Layout of `<cache_dir>/<split>/` (published by one directory rename, so a reader sees all or nothing):
    images.u8   every kept image as (3, h, w) uint8 (CHW), back to back, no padding (variable size:
                padding every image to the largest would waste space on odd aspect ratios)
    index.npy   (N, 5) int64 rows: byte offset, h, w, label, index of the image in the source split
    meta.json   format version, dataset, split, short side, counts, source paths (relative to the
                dataset root) with sizes and mtimes, and every skipped image with its reason
Images are decoded with retrieval.images.open_image and resized with Pillow bilinear so the short
side is `short_side` (torchvision's Resize on PIL images does exactly this), so the cache holds the
pixels the file pipeline would see after its resize.
"""
