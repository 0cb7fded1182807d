"""Python-side reference for PIR's image tower in bench/compare.sh. The official PIR-CLIP image encoder
runs an open_clip ViT-B/32 and a ModifiedResNet-50 (its instruction encoder) on every image, plus a VIR
re-weighting that costs next to nothing; open_clip has no PIR model, so this times open_clip's ViT-B-32
and RN50 image towers on the same preprocessed batches and reports the pair's images/s (random weights:
speed does not depend on them). Prints one JSON line."""
import json, os, sys, time

import torch
import open_clip
from PIL import Image

ds_json, images_dir, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
vit, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
rn50, _, _ = open_clip.create_model_and_transforms("RN50")
vit.eval(), rn50.eval()
d = json.load(open(ds_json))
names = sorted({im["filename"] for im in d["images"] if im["split"] == "test"})[:n]
x = torch.stack([preprocess(Image.open(os.path.join(images_dir, f))) for f in names])
with torch.no_grad():
    vit.encode_image(x[:2]), rn50.visual(x[:2])  # warm-up
    t = time.time()
    for b in x.split(64):
        vit.encode_image(b)
        rn50.visual(b)
    s = time.time() - t
print(json.dumps({"tool": "open_clip ViT-B-32 + RN50 image towers", "images": len(names), "images_per_s": len(names) / s}))
