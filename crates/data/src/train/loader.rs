//! Batches of an epoch: the epoch's order (reshuffled passes, or shards through a shuffle buffer), dealt
//! to the ranks as torch's DistributedSampler deals it, decoded and augmented on background threads
//! behind a bounded queue.

use std::sync::{mpsc, Arc};
use std::thread;

use pirclip_image::{center_crop, normalize_into, resize_shortest_side, RgbImage};

use super::augment::{random_resized_crop, rotate_flip, stream, Augmentation, Rng};
use super::sources::{load_image, ImageSource, Sample};

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
    /// The text tower's tokenizer (CLIP's BPE, or a Hugging Face tower's own).
    pub tokenizer: pirclip_text::TextTokenizer,
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

impl TrainLoader {
    /// The run's seed (the data order and augmentation draw from it).
    pub fn seed(&self) -> u64 {
        self.config.seed
    }

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
            let tok = cfg.tokenizer.clone();
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

#[cfg(test)]
mod tests {
    use super::*;

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
            tokenizer: pirclip_text::TextTokenizer::Clip,
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
            tokenizer: pirclip_text::TextTokenizer::Clip,
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

    /// Ranks share each global batch as torch's DistributedSampler deals an epoch: rank r takes every
    /// world-th position from the r-th, so global batch k (positions k·b·w..) is the same set a single
    /// process with batch b·w would take.
    #[test]
    fn ranks_are_dealt_every_world_th_sample() {
        let image = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/airport_224.jpg");
        let samples: Vec<Sample> = (0..12)
            .map(|i| Sample {
                image: ImageSource::File(image.clone()),
                caption: format!("caption {i}"),
                name: format!("c{i}_{i}.jpg"),
                label: None,
            })
            .collect();
        let positions = |rank: usize, world: usize| -> Vec<Vec<usize>> {
            let config = LoaderConfig {
                image_size: 8,
                batch_size: 2,
                seed: 3,
                shuffle: false,
                augment: None,
                one_caption_per_image: false,
                workers: 1,
                context_length: 77,
                tokenizer: pirclip_text::TextTokenizer::Clip,
                rank,
                world,
            };
            let loader = TrainLoader::new(samples.clone(), config);
            loader
                .stream(0, 0)
                .into_iter()
                .map(|b| b.unwrap().positions)
                .collect()
        };
        assert_eq!(positions(0, 2), [[0, 2], [4, 6], [8, 10]]);
        assert_eq!(positions(1, 2), [[1, 3], [5, 7], [9, 11]]);
        assert_eq!(positions(2, 3), [[2, 5], [8, 11]]);
        let single = positions(0, 1);
        for (k, batch) in single.chunks(2).enumerate().take(3) {
            let mut two_ranks: Vec<usize> =
                [positions(0, 2)[k].clone(), positions(1, 2)[k].clone()].concat();
            two_ranks.sort();
            assert_eq!(two_ranks, batch.concat(), "global batch {k}");
        }
    }
}
