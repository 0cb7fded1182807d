"""open_clip side of bench/train_step.sh: seconds per training step (forward, CLIP loss, backward, AdamW)
of open_clip's ViT-B-32 at batch B on CPU, fp32, same torch and thread count. Prints one JSON line."""
import json, sys, time
import torch, open_clip

model_name, batch, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = open_clip.create_model(model_name)
model.train()
loss_fn = open_clip.ClipLoss()
opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.2)
images = torch.randn(batch, 3, 224, 224)
texts = torch.randint(1, 49406, (batch, 77))
texts[:, 0] = 49406
texts[:, 20] = 49407  # realistic caption length: EOT at 20
texts[:, 21:] = 0
times = []
for s in range(steps + 1):
    t = time.time()
    opt.zero_grad()
    i, tx, scale = model(images, texts)
    loss = loss_fn(i, tx, scale)
    loss.backward()
    opt.step()
    if s > 0:  # the first step warms up allocators
        times.append(time.time() - t)
print(json.dumps({"tool": "open_clip", "model": model_name, "batch": batch, "step_s": sorted(times)[len(times) // 2], "steps": steps}))
