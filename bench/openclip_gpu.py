"""PyTorch side of bench/gpu.sh: open_clip_torch on one CUDA device, on the same images, captions, batch
size and autocast precision as `pirclip bench`. Random weights (seed 0): speed does not depend on them.
Prints one JSON line per measurement:
  image  ViT-B-32 encode_image, and the PIR reference pair (ViT-B-32 + RN50 image towers, what PIR's
         image tower computes), per precision; batches are copied to the device inside the timed loop and
         synchronised per batch, as pirclip bench does; median of REPS passes after a warm-up pass
  text   ViT-B-32 encode_text on the test captions, tokenised inside the timed loop (as retrieval.py runs
         it) and pre-tokenised (model alone)
  train  ViT-B-32 training step (forward, CLIP loss, backward, AdamW) at batch TRAIN_B: fp32, and amp =
         fp16 autocast + GradScaler (open_clip --precision amp); median of STEPS after 2 warm-up steps
usage: openclip_gpu.py DATASET_JSON IMAGES_DIR N BATCH REPS PRECISIONS TRAIN_B STEPS [DEVICE]"""
import json, os, statistics, sys, time
from contextlib import nullcontext

import torch
import open_clip
from PIL import Image

ds_json, images_dir = sys.argv[1], sys.argv[2]
n, batch, reps = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
precisions = sys.argv[6].split(",")
train_b, steps = int(sys.argv[7]), int(sys.argv[8])
dev = torch.device(sys.argv[9] if len(sys.argv) > 9 else "cuda")
torch.manual_seed(0)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def autocast(p):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(p)
    return torch.autocast(dev.type, dtype=dtype) if dtype else nullcontext()


def emit(**kw):
    print(json.dumps({"tool": "open_clip", "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", **kw}), flush=True)


vit, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
rn50 = open_clip.create_model("RN50")
vit, rn50 = vit.to(dev).eval(), rn50.to(dev).eval()
tokenizer = open_clip.get_tokenizer("ViT-B-32")

d = json.load(open(ds_json))
test = sorted((im for im in d["images"] if im["split"] == "test"), key=lambda im: im["filename"])[:n]
x = torch.stack([preprocess(Image.open(os.path.join(images_dir, im["filename"]))) for im in test]) if test else torch.empty(0)
captions = [s["raw"].capitalize() for im in test for s in im["sentences"]]
batches = list(x.split(batch))


def time_passes(run_pass):
    run_pass()  # warm-up: every batch shape once (cuBLAS/cuDNN handles, allocator)
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run_pass()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


with torch.no_grad():
    for p in precisions if n > 0 else []:
        for name, towers in [("ViT-B-32", [vit.encode_image]), ("PIR reference: ViT-B-32 + RN50 image towers", [vit.encode_image, rn50.visual])]:
            def image_pass():
                with autocast(p):
                    for b in batches:
                        b = b.to(dev)
                        for f in towers:
                            f(b)[0, 0].item()  # one sync per batch, as pirclip bench
            s = time_passes(image_pass)
            emit(what="image", model=name, precision=p, images=len(test), batch=batch, images_per_s=len(test) / s)

        def text_pass(pretokenised=None):
            with autocast(p):
                for i in range(0, len(captions), 256):
                    ids = pretokenised[i // 256] if pretokenised is not None else tokenizer(captions[i:i + 256]).to(dev)
                    vit.encode_text(ids)[0, 0].item()
        s = time_passes(text_pass)
        ids = [tokenizer(captions[i:i + 256]).to(dev) for i in range(0, len(captions), 256)]
        s_model = time_passes(lambda: text_pass(ids))
        emit(what="text", model="ViT-B-32", precision=p, captions=len(captions), captions_per_s=len(captions) / s,
             captions_per_s_pretokenised=len(captions) / s_model)

if train_b > 0:
    for p in ["fp32", "amp"] if dev.type == "cuda" else ["fp32"]:  # GradScaler/fp16 amp is a CUDA recipe
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32").to(dev).train()
        loss_fn = open_clip.ClipLoss()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.2)
        scaler = torch.amp.GradScaler(dev.type) if p == "amp" else None
        images = torch.randn(train_b, 3, 224, 224, device=dev)
        texts = torch.randint(1, 49406, (train_b, 77), device=dev)
        texts[:, 0], texts[:, 20], texts[:, 21:] = 49406, 49407, 0  # realistic caption length: EOT at 20
        times = []
        for s in range(steps + 2):
            t = time.perf_counter()
            opt.zero_grad()
            with autocast("fp16" if p == "amp" else "fp32"):
                i, tx, scale = model(images, texts)
                loss = loss_fn(i, tx, scale)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            loss.item()
            if s >= 2:
                times.append(time.perf_counter() - t)
        emit(what="train", model="ViT-B-32", precision=p, batch=train_b, step_s=statistics.median(times), steps=steps)
        del model, opt
