//! Training samples and batches: Karpathy JSON + image folder (every caption a sample) or webdataset
//! shards; RandomResizedCrop augmentation (spec §6.2); decoding on background threads with a bounded
//! queue. Everything random derives from (seed, epoch, sample index), so runs are reproducible and a
//! resumed run sees exactly the batches it would have seen.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread;

use pirclip_image::{
    center_crop, decode, normalize_into, resize_bicubic, resize_shortest_side, RgbImage,
};

#[derive(Debug, Clone)]
pub enum ImageSource {
    File(PathBuf),
    /// `len` bytes at `offset` of a webdataset tar: read when the sample is loaded.
    TarMember {
        path: Arc<PathBuf>,
        offset: u64,
        len: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub image: ImageSource,
    pub caption: String,
    /// Original image file name: the official class label is its prefix before the first `_`.
    pub name: String,
    /// Scene label from the JSON, when present (`--label-source json`).
    pub label: Option<String>,
}

/// Every caption of the chosen splits is a sample, in JSON order.
pub fn samples_from_karpathy(
    ds: &crate::karpathy::Dataset,
    splits: &[&str],
    images_dir: &Path,
) -> Vec<Sample> {
    let mut out = Vec::new();
    for e in ds
        .entries
        .iter()
        .filter(|e| splits.contains(&e.split.as_str()))
    {
        for c in &e.captions {
            out.push(Sample {
                image: ImageSource::File(images_dir.join(&e.filename)),
                caption: c.clone(),
                name: e.filename.clone(),
                label: e.label.clone(),
            });
        }
    }
    out
}

/// SplitMix64: small, fast, and its whole state is one integer.
#[derive(Debug, Clone)]
pub struct Rng(u64);

/// The independent random streams of a run (`Rng::keyed`'s `stream`). Augmentation takes one stream per
/// epoch, `AUGMENT + epoch`, so the fixed streams sit at the top of the range where no epoch reaches.
pub mod stream {
    pub const SAMPLE_SHUFFLE: u64 = 1;
    pub const AUGMENT: u64 = 2;
    pub const CAPTION_PICK: u64 = u64::MAX - 3;
    pub const SHARD_ORDER: u64 = u64::MAX;
    pub const SHUFFLE_BUFFER: u64 = u64::MAX - 1;
    pub const SHARD_WRITE: u64 = u64::MAX - 2;
}

impl Rng {
    /// A generator for one (seed, stream, index) triple.
    pub fn keyed(seed: u64, stream: u64, index: u64) -> Self {
        let mut r = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
        r.0 ^= r
            .next_u64()
            .wrapping_add(stream.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        r.0 ^= r
            .next_u64()
            .wrapping_add(index.wrapping_mul(0x94d0_49bb_1331_11eb));
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// torchvision `RandomResizedCrop(size, scale, ratio)` on a PIL image: sample a box (10 tries, then a
/// centre fallback), crop, bicubic resize to `size × size`.
pub fn random_resized_crop(
    img: &RgbImage,
    size: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut Rng,
) -> RgbImage {
    let (w_img, h_img) = (img.width as f64, img.height as f64);
    let area = w_img * h_img;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    let mut crop = None;
    for _ in 0..10 {
        let target = area * rng.range(scale.0, scale.1);
        let aspect = rng.range(lr0, lr1).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if w > 0 && w <= img.width && h > 0 && h <= img.height {
            let top = rng.below(img.height - h + 1);
            let left = rng.below(img.width - w + 1);
            crop = Some((top, left, h, w));
            break;
        }
    }
    let (top, left, h, w) = crop.unwrap_or_else(|| {
        let in_ratio = w_img / h_img;
        let (w, h) = if in_ratio < ratio.0 {
            (img.width, (w_img / ratio.0).round() as usize)
        } else if in_ratio > ratio.1 {
            ((h_img * ratio.1).round() as usize, img.height)
        } else {
            (img.width, img.height)
        };
        ((img.height - h) / 2, (img.width - w) / 2, h, w)
    });
    let mut px = Vec::with_capacity(w * h * 3);
    for y in top..top + h {
        px.extend_from_slice(
            &img.pixels[(y * img.width + left) * 3..(y * img.width + left + w) * 3],
        );
    }
    resize_bicubic(&RgbImage::new(w, h, px), size, size)
}

/// Train-time augmentation: torchvision's RandomResizedCrop, then optionally one of the eight symmetries
/// of the square.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augmentation {
    /// Crop area as a fraction of the image (open_clip `--aug-cfg scale=(lo,hi)`; PIR-CLIP's 0.9–1).
    pub scale: (f64, f64),
    /// Crop aspect ratio range (torchvision's 3/4–4/3).
    pub ratio: (f64, f64),
    /// After the crop, one of the 8 rotations by 90° and reflections, uniformly: an overhead image has no
    /// "up", so each of them is as likely a view of the scene as the original.
    pub rotate_flip: bool,
}

impl Default for Augmentation {
    fn default() -> Self {
        Augmentation {
            scale: (0.9, 1.0),
            ratio: (0.75, 4.0 / 3.0),
            rotate_flip: false,
        }
    }
}

/// Element `k` (0..8) of the symmetry group of the rectangle-as-grid: bit 2 transposes, then bit 0
/// mirrors left-right and bit 1 top-bottom. On a square image the eight results are the four 90°
/// rotations and their mirror images.
pub fn rotate_flip(img: &RgbImage, k: usize) -> RgbImage {
    let (transpose, mirror_x, mirror_y) = (k & 4 != 0, k & 1 != 0, k & 2 != 0);
    let (w, h) = if transpose {
        (img.height, img.width)
    } else {
        (img.width, img.height)
    };
    let mut px = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let y1 = if mirror_y { h - 1 - y } else { y };
        for x in 0..w {
            let x1 = if mirror_x { w - 1 - x } else { x };
            let (sx, sy) = if transpose { (y1, x1) } else { (x1, y1) };
            let at = (sy * img.width + sx) * 3;
            px.extend_from_slice(&img.pixels[at..at + 3]);
        }
    }
    RgbImage::new(w, h, px)
}

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub image_size: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Reshuffle every epoch (off: samples in order, for debugging).
    pub shuffle: bool,
    /// Train augmentation (none: the eval transform).
    pub augment: Option<Augmentation>,
    /// A pass over the data is one sample per image, its caption drawn anew each pass, instead of every
    /// caption once (the images of a caption-rich dataset are then seen equally often, and a batch never
    /// holds two captions of one image as each other's negatives).
    pub one_caption_per_image: bool,
    pub workers: usize,
    pub context_length: usize,
    /// Distributed training: this process's rank and the number of ranks. Every global batch of
    /// `batch_size × world` consecutive samples of the epoch order is shared out as torch's
    /// DistributedSampler does (rank r takes every world-th sample from the r-th), so W ranks see exactly
    /// the batches one process with W times the batch would, split across ranks as open_clip splits them.
    pub rank: usize,
    pub world: usize,
}

pub struct TrainBatch {
    pub epoch: usize,
    /// 0-based index of the batch within its epoch.
    pub index: usize,
    pub pixels: Vec<f32>,
    pub ids: Vec<i64>,
    pub names: Vec<String>,
    pub labels: Vec<Option<String>>,
    /// Each sample's position in the epoch's order (this rank's share: every world-th position).
    pub positions: Vec<usize>,
    /// Samples of this batch that could not be decoded and were replaced by the next ones.
    pub skipped: Vec<String>,
}

pub struct TrainLoader {
    samples: Arc<Vec<Sample>>,
    config: LoaderConfig,
    /// Set when the samples come from webdataset shards.
    shards: Option<ShardOrder>,
    /// Samples per epoch when it is not one pass over the data (`--train-num-samples`).
    epoch_samples: Option<usize>,
    /// With `one_caption_per_image`: the samples of each image, images in first-appearance order.
    images: Option<Arc<Vec<Vec<usize>>>>,
}

/// How the samples of webdataset shards are ordered into an epoch, as open_clip's webdataset pipeline does:
/// shards shuffled (or, with `--dataset-resampled`, drawn with replacement), read one after the other,
/// their samples passed through a shuffle buffer.
#[derive(Debug, Clone)]
pub struct ShardOrder {
    /// The shard of every sample; the samples of a shard are contiguous, in tar order.
    pub shard_of: Vec<usize>,
    /// `--dataset-resampled`: shards drawn with replacement until this many samples.
    pub resampled: Option<usize>,
    /// Sample shuffle buffer (webdataset `shuffle(n)`); 0 or 1 keeps the shards' sample order.
    pub buffer: usize,
}

/// Reads and decodes one sample's image (a file, or a member of a tar at its recorded offset).
pub fn load_image(s: &ImageSource) -> Result<RgbImage, String> {
    match s {
        ImageSource::File(p) => pirclip_image::decode_file(p).map_err(|e| e.to_string()),
        ImageSource::TarMember { path, offset, len } => {
            use std::io::{Read, Seek, SeekFrom};
            let mut bytes = vec![0u8; *len as usize];
            std::fs::File::open(path.as_path())
                .and_then(|mut f| {
                    f.seek(SeekFrom::Start(*offset))?;
                    f.read_exact(&mut bytes)
                })
                .map_err(|e| format!("{} at byte {offset}: {e}", path.display()))?;
            decode(&bytes, &path.display().to_string()).map_err(|e| e.to_string())
        }
    }
}

impl TrainLoader {
    pub fn new(samples: Vec<Sample>, config: LoaderConfig) -> Self {
        let images = config.one_caption_per_image.then(|| {
            let mut slot: std::collections::HashMap<String, usize> = Default::default();
            let mut groups: Vec<Vec<usize>> = Vec::new();
            for (i, s) in samples.iter().enumerate() {
                let key = match &s.image {
                    ImageSource::File(p) => p.display().to_string(),
                    ImageSource::TarMember { path, offset, .. } => {
                        format!("{}@{offset}", path.display())
                    }
                };
                let g = *slot.entry(key).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[g].push(i);
            }
            Arc::new(groups)
        });
        TrainLoader {
            samples: Arc::new(samples),
            config,
            shards: None,
            epoch_samples: None,
            images,
        }
    }

    /// Samples in one pass over the data: every sample, or one per image.
    pub fn pass_len(&self) -> usize {
        self.images
            .as_ref()
            .map_or(self.samples.len(), |groups| groups.len())
    }

    /// open_clip's `--train-num-samples` without resampling: an epoch is `n` samples of an endless stream
    /// of passes over the data, each pass a new permutation (webdataset's `with_epoch`). Epochs shorter
    /// than a pass continue where the previous one stopped; longer ones run into the next pass. No sample
    /// leaves the pool.
    pub fn with_epoch_samples(mut self, n: usize) -> Self {
        self.epoch_samples = Some(n);
        self
    }

    /// Samples one epoch draws.
    pub fn samples_per_epoch(&self) -> usize {
        match (&self.shards, self.epoch_samples) {
            (
                Some(ShardOrder {
                    resampled: Some(n), ..
                }),
                _,
            ) => *n,
            (_, Some(n)) => n,
            _ => self.pass_len(),
        }
    }

    /// The order of the `pass`-th pass over all samples.
    fn pass_order(&self, pass: usize) -> Vec<usize> {
        if let Some(plan) = &self.shards {
            return shard_epoch_order(plan, self.config.shuffle, self.config.seed, pass);
        }
        if let Some(groups) = &self.images {
            let mut pick = Rng::keyed(self.config.seed, stream::CAPTION_PICK, pass as u64);
            let mut order: Vec<usize> = groups.iter().map(|g| g[pick.below(g.len())]).collect();
            if self.config.shuffle {
                Rng::keyed(self.config.seed, stream::SAMPLE_SHUFFLE, pass as u64)
                    .shuffle(&mut order);
            }
            return order;
        }
        let mut order: Vec<usize> = (0..self.samples.len()).collect();
        if self.config.shuffle {
            Rng::keyed(self.config.seed, stream::SAMPLE_SHUFFLE, pass as u64).shuffle(&mut order);
        }
        order
    }

    /// The samples come from webdataset shards: order them the webdataset way.
    pub fn with_shards(mut self, order: ShardOrder) -> Self {
        self.shards = Some(order);
        // A shard stream is ordered by its shards and buffer; callers refuse one caption per image there.
        self.images = None;
        self
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Samples per batch of this rank.
    pub fn batch_size(&self) -> usize {
        self.config.batch_size
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Full batches per epoch (the last partial batch is dropped, as in training).
    /// Batches of this rank per epoch (global batches: every rank has the same count).
    pub fn batches_per_epoch(&self) -> usize {
        self.samples_per_epoch() / (self.config.batch_size * self.config.world.max(1))
    }

    /// The sample order of `epoch`: with the default epoch (one pass) the `epoch`-th pass; with
    /// `with_epoch_samples(n)` stream positions `epoch·n .. (epoch+1)·n` of the passes laid end to end;
    /// with resampled shards the epoch's own draw. Computed from indices alone, so resume is exact.
    pub fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let resampled = matches!(
            &self.shards,
            Some(ShardOrder {
                resampled: Some(_),
                ..
            })
        );
        let pass_len = self.pass_len();
        let n = match self.epoch_samples {
            Some(n) if !resampled && pass_len > 0 => n,
            _ => return self.pass_order(epoch),
        };
        let mut out = Vec::with_capacity(n);
        let mut at = epoch.saturating_mul(n);
        let end = at.saturating_add(n);
        while at < end {
            let (pass, from) = (at / pass_len, at % pass_len);
            let take = (pass_len - from).min(end - at);
            out.extend_from_slice(&self.pass_order(pass)[from..from + take]);
            at += take;
        }
        out
    }

    /// Streams the batches of `epoch` starting at batch `start`, prefetching two batches ahead.
    /// An error item ends the stream when a batch cannot be filled because every sample left to try
    /// failed to load (it says how many and why): a run over unreadable data must fail, not save an
    /// untrained model.
    pub fn stream(&self, epoch: usize, start: usize) -> mpsc::Receiver<Result<TrainBatch, String>> {
        let (tx, rx) = mpsc::sync_channel(2);
        let samples = self.samples.clone();
        let cfg = self.config.clone();
        let order = self.epoch_order(epoch);
        let nb = self.batches_per_epoch();
        thread::spawn(move || {
            let tok = pirclip_text::Tokenizer::new();
            let b = cfg.batch_size;
            let per = 3 * cfg.image_size * cfg.image_size;
            let (rank, world) = (cfg.rank, cfg.world.max(1));
            // This rank's positions of the epoch order: every world-th from its rank, as torch's
            // DistributedSampler hands them out (open_clip's sampler for these datasets). Global batch
            // `index` is positions index·b·world.. of the order whichever way it is split, but which
            // samples share a rank decides what the per-rank class centres and BatchNorm statistics see.
            let mine: Vec<usize> = (rank..order.len()).step_by(world).collect();
            for index in start..nb {
                // Replacements for undecodable samples come from this rank's next positions, in order,
                // wrapping around: deterministic whatever the thread timing.
                let first = index * b;
                let mut candidates = mine[first..]
                    .iter()
                    .chain(&mine[..first])
                    .map(|&p| (p, order[p]));
                let mut chosen: Vec<(usize, usize, RgbImage)> = Vec::with_capacity(b);
                let mut skipped = Vec::new();
                while chosen.len() < b {
                    let want = b - chosen.len();
                    let group: Vec<(usize, usize)> = candidates.by_ref().take(want).collect();
                    if group.is_empty() {
                        let examples: Vec<&str> =
                            skipped.iter().take(3).map(String::as_str).collect();
                        let _ = tx.send(Err(format!(
                            "epoch {epoch}, batch {index}: only {} of the {} samples could be loaded, fewer \
                             than a batch of {b} ({} failed here; first: {})",
                            chosen.len(),
                            order.len(),
                            skipped.len(),
                            examples.join("; ")
                        )));
                        return;
                    }
                    let imgs = crate::parallel_map(
                        &group,
                        cfg.workers,
                        |&(_, i)| -> Result<RgbImage, String> {
                            let img = load_image(&samples[i].image)?;
                            Ok(match cfg.augment {
                                Some(aug) => {
                                    let mut rng = Rng::keyed(
                                        cfg.seed,
                                        stream::AUGMENT + epoch as u64,
                                        i as u64,
                                    );
                                    let crop = random_resized_crop(
                                        &img,
                                        cfg.image_size,
                                        aug.scale,
                                        aug.ratio,
                                        &mut rng,
                                    );
                                    // Drawn after the crop: runs without it crop exactly as before.
                                    if aug.rotate_flip {
                                        rotate_flip(&crop, rng.below(8))
                                    } else {
                                        crop
                                    }
                                }
                                None => center_crop(
                                    &resize_shortest_side(&img, cfg.image_size),
                                    cfg.image_size,
                                ),
                            })
                        },
                    );
                    for ((p, i), r) in group.into_iter().zip(imgs) {
                        match r {
                            Ok(img) => chosen.push((p, i, img)),
                            Err(e) => skipped.push(format!("{}: {e}", samples[i].name)),
                        }
                    }
                }
                let mut pixels = Vec::with_capacity(b * per);
                let mut ids = Vec::with_capacity(b * cfg.context_length);
                let mut names = Vec::with_capacity(b);
                let mut labels = Vec::with_capacity(b);
                let positions = chosen.iter().map(|c| c.0).collect();
                for (_, i, img) in &chosen {
                    normalize_into(img, &mut pixels);
                    ids.extend(tok.tokenize(&samples[*i].caption, cfg.context_length));
                    names.push(samples[*i].name.clone());
                    labels.push(samples[*i].label.clone());
                }
                if tx
                    .send(Ok(TrainBatch {
                        epoch,
                        index,
                        pixels,
                        ids,
                        names,
                        labels,
                        positions,
                        skipped,
                    }))
                    .is_err()
                {
                    return;
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_stays_in_bounds_and_scale() {
        let img = RgbImage::new(
            150,
            150,
            (0..150 * 150 * 3).map(|i| (i % 251) as u8).collect(),
        );
        for i in 0..50 {
            let mut rng = Rng::keyed(7, 0, i);
            let out = random_resized_crop(&img, 64, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
            assert_eq!((out.width, out.height), (64, 64));
        }
        // Deterministic per key.
        let crop = |key| {
            random_resized_crop(
                &img,
                32,
                (0.9, 1.0),
                (0.75, 4.0 / 3.0),
                &mut Rng::keyed(1, 2, key),
            )
        };
        let (a, b) = (crop(3), crop(3));
        assert_ne!(a, crop(4));
        assert_eq!(a, b);
    }

    fn plan(shard_of: Vec<usize>, resampled: Option<usize>, buffer: usize) -> ShardOrder {
        ShardOrder {
            shard_of,
            resampled,
            buffer,
        }
    }

    #[test]
    fn resampling_draws_whole_shards_with_replacement() {
        let p = plan(vec![0, 0, 0, 1, 1, 1, 2, 2, 2], Some(12), 0);
        let a = shard_epoch_order(&p, true, 5, 0);
        assert_eq!(a.len(), 12);
        assert_eq!(a, shard_epoch_order(&p, true, 5, 0));
        assert_ne!(a, shard_epoch_order(&p, true, 5, 1));
        // Without a buffer, each consecutive run of 3 is one whole shard, in tar order.
        for c in a.chunks(3) {
            assert!(
                c.iter().all(|&i| p.shard_of[i] == p.shard_of[c[0]]),
                "{a:?}"
            );
            assert_eq!(c[1], c[0] + 1);
        }
    }

    #[test]
    fn shard_order_streams_through_a_bounded_shuffle_buffer() {
        // 20 shards of 50 samples, buffer 16.
        let shard_of: Vec<usize> = (0..1000).map(|i| i / 50).collect();
        let p = plan(shard_of.clone(), None, 16);
        let a = shard_epoch_order(&p, true, 9, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>(), "every sample once");
        assert_ne!(a, shard_epoch_order(&p, true, 9, 1), "reshuffled per epoch");
        assert_eq!(a, shard_epoch_order(&p, true, 9, 0), "seeded");
        // Reconstruct the stream that fed the buffer (whole shards in the order they first appear, each
        // in tar order). Before the final drain, the k-th sample out must have entered the buffer at
        // stream position k + 15 or earlier: nothing leaves a 16-sample buffer before it entered.
        let mut shards: Vec<usize> = Vec::new();
        for &i in &a {
            if !shards.contains(&shard_of[i]) {
                shards.push(shard_of[i]);
            }
        }
        let stream: Vec<usize> = shards.iter().flat_map(|&s| s * 50..s * 50 + 50).collect();
        for (k, &i) in a.iter().enumerate().take(1000 - 16) {
            let p_in = stream.iter().position(|&x| x == i).unwrap();
            assert!(p_in <= k + 15, "sample {i} out at {k}, entered at {p_in}");
        }
        // Shuffling really mixes: not the stream order.
        assert_ne!(a, stream);
        // --no-shuffle: shards and samples in order.
        assert_eq!(
            shard_epoch_order(&p, false, 9, 0),
            (0..1000).collect::<Vec<_>>()
        );
    }

    #[test]
    fn csv_samples() {
        let dir = std::env::temp_dir().join(format!("pirclip-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("train.csv");
        std::fs::write(
            &f,
            "filepath\ttitle\nimgs/airport_1.jpg\ta caption\n/abs/beach_2.jpg\tanother one\n",
        )
        .unwrap();
        // An absolute name needs the explicit opt-in.
        let err = samples_from_csv(&f, "filepath", "title", '\t', &dir, false).unwrap_err();
        assert!(
            err.contains("line 3") && err.contains("/abs/beach_2.jpg") && err.contains("absolute"),
            "{err}"
        );
        let s = samples_from_csv(&f, "filepath", "title", '\t', &dir, true).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "airport_1.jpg");
        assert_eq!(s[1].caption, "another one");
        assert!(
            matches!(&s[1].image, ImageSource::File(p) if p == std::path::Path::new("/abs/beach_2.jpg"))
        );
        assert!(samples_from_csv(&f, "image", "title", '\t', &dir, true)
            .unwrap_err()
            .contains("no column \"image\""));
    }

    #[test]
    fn train_num_samples_sets_the_epoch_length_and_keeps_every_sample_in_the_pool() {
        let samples: Vec<Sample> = (0..10)
            .map(|i| Sample {
                image: ImageSource::File(format!("{i}.jpg").into()),
                caption: String::new(),
                name: format!("c{i}_{i}.jpg"),
                label: None,
            })
            .collect();
        let config = LoaderConfig {
            image_size: 8,
            batch_size: 2,
            seed: 3,
            shuffle: true,
            augment: None,
            one_caption_per_image: false,
            workers: 1,
            context_length: 77,
            rank: 0,
            world: 1,
        };
        let full = TrainLoader::new(samples.clone(), config.clone());
        // Epochs of 4 from a pool of 10: five epochs are two whole passes, each a permutation.
        let short = TrainLoader::new(samples.clone(), config.clone()).with_epoch_samples(4);
        assert_eq!(
            (short.samples_per_epoch(), short.batches_per_epoch()),
            (4, 2)
        );
        let stream: Vec<usize> = (0..5).flat_map(|e| short.epoch_order(e)).collect();
        for pass in stream.chunks(10) {
            let mut p = pass.to_vec();
            p.sort();
            assert_eq!(
                p,
                (0..10).collect::<Vec<_>>(),
                "each pass holds every sample once"
            );
        }
        assert_eq!(
            &stream[..10],
            &full.epoch_order(0)[..],
            "the passes are the default epochs' orders"
        );
        assert_eq!(&stream[10..], &full.epoch_order(1)[..]);
        // An epoch longer than the pool runs into the next pass.
        let long = TrainLoader::new(samples.clone(), config.clone()).with_epoch_samples(25);
        let e0 = long.epoch_order(0);
        assert_eq!(e0.len(), 25);
        assert_eq!(&e0[..10], &full.epoch_order(0)[..]);
        assert_eq!(&e0[20..], &full.epoch_order(2)[..5]);
        assert_eq!(&long.epoch_order(1)[..5], &full.epoch_order(2)[5..]);
        // Without the setting, an epoch is one pass.
        assert_eq!(full.samples_per_epoch(), 10);
    }

    #[test]
    fn rotate_flip_gives_the_eight_symmetries_of_the_square() {
        let n = 5;
        let img = RgbImage::new(n, n, (0..n * n * 3).map(|v| (v * 7 % 251) as u8).collect());
        let at = |im: &RgbImage, x: usize, y: usize| im.pixels[(y * im.width + x) * 3];
        // Rotation by 90° clockwise: out(x, y) = in(y, n-1-x).
        let rot = |im: &RgbImage| {
            let mut px = Vec::new();
            for y in 0..n {
                for x in 0..n {
                    let a = (((n - 1 - x) * n) + y) * 3;
                    px.extend_from_slice(&im.pixels[a..a + 3]);
                }
            }
            RgbImage::new(n, n, px)
        };
        let mirror = |im: &RgbImage| rotate_flip(im, 1);
        assert_eq!(rotate_flip(&img, 0).pixels, img.pixels);
        assert_eq!(at(&mirror(&img), 0, 2), at(&img, n - 1, 2));
        let mut expected = Vec::new();
        let mut r = img.clone();
        for _ in 0..4 {
            expected.push(r.pixels.clone());
            expected.push(mirror(&r).pixels);
            r = rot(&r);
        }
        let mut got: Vec<Vec<u8>> = (0..8).map(|k| rotate_flip(&img, k).pixels).collect();
        got.sort();
        expected.sort();
        assert_eq!(
            got, expected,
            "k = 0..8 are the 4 rotations and their mirror images"
        );
        got.dedup();
        assert_eq!(got.len(), 8);
        // Not square: the transposing half swaps the sides.
        let wide = RgbImage::new(3, 2, (0..18).collect());
        let t = rotate_flip(&wide, 4);
        assert_eq!((t.width, t.height), (2, 3));
        assert_eq!(at(&t, 1, 2), at(&wide, 2, 1));
    }

    #[test]
    fn one_caption_per_image_passes_hold_every_image_once() {
        // 4 images with 3, 1, 5 and 2 captions, interleaved as a caption list may be.
        let per_image = [3usize, 1, 5, 2];
        let mut samples = Vec::new();
        for round in 0..5 {
            for (img, &k) in per_image.iter().enumerate() {
                if round < k {
                    samples.push(Sample {
                        image: ImageSource::File(format!("{img}.jpg").into()),
                        caption: format!("image {img} caption {round}"),
                        name: format!("c_{img}.jpg"),
                        label: None,
                    });
                }
            }
        }
        let config = LoaderConfig {
            image_size: 8,
            batch_size: 2,
            seed: 1,
            shuffle: true,
            augment: None,
            one_caption_per_image: true,
            workers: 1,
            context_length: 77,
            rank: 0,
            world: 1,
        };
        let loader = TrainLoader::new(samples.clone(), config.clone());
        assert_eq!(
            loader.samples_per_epoch(),
            4,
            "a pass is one sample per image"
        );
        let mut captions_seen = std::collections::HashSet::new();
        for epoch in 0..40 {
            let order = loader.epoch_order(epoch);
            let mut imgs: Vec<String> = order.iter().map(|&i| samples[i].name.clone()).collect();
            imgs.sort();
            assert_eq!(imgs, ["c_0.jpg", "c_1.jpg", "c_2.jpg", "c_3.jpg"]);
            captions_seen.extend(order);
        }
        assert_eq!(
            captions_seen.len(),
            samples.len(),
            "every caption gets drawn"
        );
        // Epochs of 6 run through passes of 4.
        let long = TrainLoader::new(samples, config).with_epoch_samples(6);
        let stream: Vec<usize> = (0..2).flat_map(|e| long.epoch_order(e)).collect();
        assert_eq!(&stream[..4], &loader.epoch_order(0)[..]);
        assert_eq!(&stream[4..8], &loader.epoch_order(1)[..]);
    }

    #[test]
    fn shuffle_is_a_permutation_and_seeded() {
        let mut a: Vec<usize> = (0..100).collect();
        Rng::keyed(3, 1, 0).shuffle(&mut a);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        let mut b: Vec<usize> = (0..100).collect();
        Rng::keyed(3, 1, 0).shuffle(&mut b);
        assert_eq!(a, b);
        assert_ne!(a, (0..100).collect::<Vec<_>>());
    }
}

/// open_clip's CSV dataset: one row per sample; image paths are relative to `base` (absolute ones only
/// with `allow_absolute`; `..` never: see `check_dataset_name`). The label file name is the image's base name.
pub fn samples_from_csv(
    path: &Path,
    img_key: &str,
    caption_key: &str,
    separator: char,
    base: &Path,
    allow_absolute: bool,
) -> Result<Vec<Sample>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| format!("{}: empty CSV", path.display()))?
        .split(separator)
        .collect();
    let col = |k: &str| {
        header.iter().position(|h| h.trim() == k).ok_or_else(|| {
            format!(
                "{}: no column {k:?} (columns: {})",
                path.display(),
                header.join(", ")
            )
        })
    };
    let (ic, cc) = (col(img_key)?, col(caption_key)?);
    let mut out = Vec::new();
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(separator).collect();
        let (Some(img), Some(cap)) = (f.get(ic), f.get(cc)) else {
            return Err(format!(
                "{}: line {} has {} fields",
                path.display(),
                n + 2,
                f.len()
            ));
        };
        crate::check_dataset_name(img.trim(), allow_absolute)
            .map_err(|m| format!("{}: line {}: {m}", path.display(), n + 2))?;
        let p = base.join(img.trim());
        let name = p
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        out.push(Sample {
            image: ImageSource::File(p),
            caption: cap.to_string(),
            name,
            label: None,
        });
    }
    Ok(out)
}

/// The sample order of one epoch over webdataset shards (see `ShardOrder`). Computed from indices alone, so
/// a resumed run can skip to its position without reading the samples before it.
pub fn shard_epoch_order(plan: &ShardOrder, shuffle: bool, seed: u64, epoch: usize) -> Vec<usize> {
    let n_shards = plan.shard_of.iter().max().map(|m| m + 1).unwrap_or(0);
    let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); n_shards];
    for (i, &s) in plan.shard_of.iter().enumerate() {
        by_shard[s].push(i);
    }
    let mut rng = Rng::keyed(seed, stream::SHARD_ORDER, epoch as u64);
    let shards: Vec<usize> = match plan.resampled {
        Some(count) => {
            let mut drawn = Vec::new();
            let mut n = 0;
            while n < count && !plan.shard_of.is_empty() {
                let s = rng.below(n_shards);
                n += by_shard[s].len();
                drawn.push(s);
            }
            drawn
        }
        None => {
            let mut all: Vec<usize> = (0..n_shards).collect();
            if shuffle {
                rng.shuffle(&mut all);
            }
            all
        }
    };
    let stream = shards.iter().flat_map(|&s| by_shard[s].iter().copied());
    let mut out = Vec::with_capacity(plan.resampled.unwrap_or(plan.shard_of.len()));
    if (shuffle || plan.resampled.is_some()) && plan.buffer > 1 {
        let mut rng = Rng::keyed(seed, stream::SHUFFLE_BUFFER, epoch as u64);
        let mut buffer = Vec::with_capacity(plan.buffer);
        for i in stream {
            buffer.push(i);
            if buffer.len() == plan.buffer {
                let k = rng.below(buffer.len());
                out.push(buffer.swap_remove(k));
            }
        }
        rng.shuffle(&mut buffer);
        out.extend(buffer);
    } else {
        out.extend(stream);
    }
    if let Some(count) = plan.resampled {
        out.truncate(count);
    }
    out
}
