"""PyTorch side of bench/train_step.sh for PIR: one full-size PIR-CLIP training step (forward, contrastive +
affiliation loss, backward, AdamW) built from the open_clip 2.24 modules the official PIR-CLIP code is built
from: open_clip's ViT-B-32 CLIP (image and text towers), a ModifiedResNet-50 instruction encoder with a
512-d attention-pool head, Linear(512, 768) instruction mapping, and the soft-belief VIR of
spec/pir-clip.md §3.5 between ln_pre and the transformer. Everything trains, BatchNorm in training mode,
AdamW with PIR's betas (0.9, 0.999), eps 1e-8, weight decay 0.2 except gains/biases, as the official run.
Images are real RSICD-AID150 training images, preprocessed once up front (decoding 16 small JPEGs costs
milliseconds against seconds of compute), captions are real captions through open_clip's tokenizer.

  pir_train_step.py JSON IMAGES_DIR BATCH STEPS THREADS [--profile OUT.json]

Prints one JSON line with the median step time of the steps after the first (which warms allocators).
With --profile, also writes a torch.profiler Chrome trace of the timed steps and prints the top ops."""
import json, os, sys, time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import open_clip
from open_clip.modified_resnet import ModifiedResNet
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
from ddp_train import encode_image  # noqa: E402

ds_json, images_dir, batch, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
profile = sys.argv[7] if len(sys.argv) > 7 and sys.argv[6] == "--profile" else None
torch.set_num_threads(threads)
torch.manual_seed(0)


class PirReference(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.clip = open_clip.create_model("ViT-B-32")
        self.res_visual = ModifiedResNet(layers=[3, 4, 6, 3], output_dim=512, heads=32, image_size=224, width=64)
        self.vision_proj_res = torch.nn.Linear(512, 768)

    def encode_image(self, x):
        # The PIR image tower of the DDP reference (tests/reference/ddp_train.py), on this model's parts.
        return encode_image(SimpleNamespace(visual=self.clip.visual, res_visual=self.res_visual,
                                            vision_proj_res=self.vision_proj_res), x)

    def forward(self, images, texts):
        return self.encode_image(images), self.clip.encode_text(texts), self.clip.logit_scale.exp()


def losses(img, txt, scale, classes):
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    t = torch.arange(len(img))
    con = (F.cross_entropy(scale * img @ txt.T, t) + F.cross_entropy(scale * txt @ img.T, t)) / 2
    m = (classes[:, None] == classes[None, :]).float()
    m = m / m.sum(1, keepdim=True)
    img_c, txt_c = m @ img, m @ txt
    aff = (F.cross_entropy(scale * img @ txt_c.T, t) + F.cross_entropy(scale * txt @ img_c.T, t)) / 2
    return con + aff


model = PirReference().train()
decay = [p for n, p in model.named_parameters() if not (p.ndim < 2 or any(k in n for k in ("bn", "ln", "bias", "logit_scale")))]
rest = [p for n, p in model.named_parameters() if p.ndim < 2 or any(k in n for k in ("bn", "ln", "bias", "logit_scale"))]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0.0}], lr=5e-4, betas=(0.9, 0.999), eps=1e-8)

d = json.load(open(ds_json))
pairs = [(im["filename"], s["raw"]) for im in d["images"] if im["split"] == "train" for s in im["sentences"]][:: 7][: batch * (steps + 1)]
_, preprocess_train, _ = open_clip.create_model_and_transforms("ViT-B-32")
tokenizer = open_clip.get_tokenizer("ViT-B-32")
batches = []
for b in range(steps + 1):
    chunk = pairs[b * batch:(b + 1) * batch]
    x = torch.stack([preprocess_train(Image.open(os.path.join(images_dir, f)).convert("RGB")) for f, _ in chunk])
    tok = tokenizer([c for _, c in chunk])
    names = [f.split("_")[0] for f, _ in chunk]
    classes = torch.tensor([sorted(set(names)).index(n) for n in names])
    batches.append((x, tok, classes))


def step(x, tok, classes):
    opt.zero_grad(set_to_none=True)
    img, txt, scale = model(x, tok)
    losses(img, txt, scale, classes).backward()
    opt.step()
    with torch.no_grad():
        model.clip.logit_scale.clamp_(0, 4.6052)


step(*batches[0])
times = []
prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) if profile else None
if prof:
    prof.__enter__()
for b in batches[1:]:
    t = time.time()
    step(*b)
    times.append(time.time() - t)
if prof:
    prof.__exit__(None, None, None)
    prof.export_chrome_trace(profile)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
print(json.dumps({"tool": "PyTorch PIR reference (open_clip 2.24 modules)", "batch": batch, "threads": threads,
                  "step_s": sorted(times)[len(times) // 2], "steps": steps}))
