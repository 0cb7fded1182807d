"""Development check (needs `scripts/setup.sh --dev`): TensorBoard reads pirclip's event files and the
webdataset package reads `pirclip shards` output.  Usage: dev/check_interop.py RUN_DIR SHARD_PATTERN"""
import glob, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
import webdataset as wds

run, shards = sys.argv[1], sys.argv[2]
ea = EventAccumulator(glob.glob(run + "/tensorboard/*")[0]); ea.Reload()
print("tensorboard scalar tags:", ea.Tags()["scalars"])
n = sum(1 for _ in wds.WebDataset(shards, shardshuffle=False))
print("webdataset samples:", n)
