//! Training samples and batches: Karpathy JSON + image folder (every caption a sample), CSV or
//! webdataset shards (`sources`); RandomResizedCrop augmentation (`augment`, spec §6.2); the epoch's
//! batches decoded on background threads with a bounded queue (`loader`). Everything random derives
//! from (seed, epoch, sample index), so runs are reproducible and a resumed run sees exactly the batches
//! it would have seen.

mod augment;
mod loader;
mod sources;

pub use augment::{random_resized_crop, rotate_flip, stream, Augmentation, Rng};
pub use loader::{shard_epoch_order, LoaderConfig, ShardOrder, TrainBatch, TrainLoader};
pub use sources::{load_image, samples_from_csv, samples_from_karpathy, ImageSource, Sample};
