"""PyTorch DistributedDataParallel reference for pirclip's data-parallel training (issue #25).

Trains the tiny parity PIR model (tests/fixtures/parity) for a few steps on W CPU ranks (gloo), as
open_clip's `training.main` does with the official PIR-CLIP losses (spec/pir-clip.md §5.2-5.4, §6.7):
- the model is built from the open_clip 2.24 modules the official code is made of (as
  bench/pir_train_step.py), and checked first against the official code's goldens;
- it is wrapped in DDP with the defaults open_clip uses (`broadcast_buffers=True`,
  `find_unused_parameters=False`), after `SyncBatchNorm` conversion with `--use-bn-sync`;
- losses: features all-gathered with the rank's own slice put back (open_clip's `gather_features`),
  class centres per rank from the local batch, gathered the same way (the official `get_aff_logits`);
- AdamW over open_clip's two parameter groups, PIR's betas (0.9, 0.999) and eps 1e-8, the learning rate
  of each step as pirclip used it, and logit_scale clamped to [0, ln 100] after each step.

The inputs are the samples pirclip itself trained on (PIRCLIP_DUMP_BATCHES: rank{r}-step{k}.safetensors),
so that data loading and augmentation are out of the comparison; each global batch is dealt out to the
ranks by torch's DistributedSampler, from the samples' positions in the epoch's order. Rank 0 writes the
final state dict.

  ddp_train.py --batches DIR --steps N --init INIT.safetensors --config CONFIG.json --out OUT.safetensors
               [--world 2] [--aff-loss] [--lock-instruction] [--use-bn-sync] [--wd 0.2]

CPU SyncBatchNorm: torch's `SyncBatchNorm` refuses CPU tensors (its statistics kernels are CUDA-only), so
`--use-bn-sync` uses `CpuSyncBatchNorm` below: the same statistics (the global batch's mean and biased
variance for normalising, unbiased for the running variance), computed stably in two sums over the ranks,
with the gradient carried by autograd through `torch.distributed.nn.all_reduce`.
"""
import argparse
import json
import math
import os
import socket
import struct
import sys
import warnings

warnings.filterwarnings("ignore")
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
PARITY = os.path.join(HERE, "..", "fixtures", "parity")

DTYPES = {"F32": (np.float32, torch.float32), "F64": (np.float64, torch.float64), "I64": (np.int64, torch.int64)}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    out = {}
    for k, v in header.items():
        a, b = v["data_offsets"]
        npt, _ = DTYPES[v["dtype"]]
        out[k] = torch.from_numpy(np.frombuffer(data[a:b], dtype=npt).copy().reshape(v["shape"]))
    return out, meta


def write_safetensors(path, tensors):
    header, blobs, at = {}, [], 0
    for k, t in tensors.items():
        t = t.detach().contiguous()
        name = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}[t.dtype]
        b = t.numpy().tobytes()
        header[k] = {"dtype": name, "shape": list(t.shape), "data_offsets": [at, at + len(b)]}
        blobs.append(b)
        at += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def build(cfg):
    import open_clip
    from open_clip.modified_resnet import ModifiedResNet

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    vision = {k: v[k] for k in ("image_size", "layers", "width", "patch_size", "head_width") if k in v}
    model = open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=vision, text_cfg=dict(t))
    heads = v["res_width"] * 32 // v.get("head_width", 64)
    model.res_visual = ModifiedResNet(layers=v["res_layers"], output_dim=cfg["embed_dim"], heads=heads,
                                      image_size=v["image_size"], width=v["res_width"])
    model.vision_proj_res = nn.Linear(cfg["embed_dim"], v["width"])
    return model


def encode_image(model, x):
    """PIR's image tower (spec §3.5, the current code: x·b + x·w): the instruction token from the ResNet
    leads the ViT's tokens, re-weighted by belief and positional rank weight; the embedding is token 0."""
    v = model.visual
    y = model.vision_proj_res(model.res_visual(x)).unsqueeze(1)
    t = v.conv1(x).flatten(2).permute(0, 2, 1)
    cls = v.class_embedding.to(t.dtype) + torch.zeros(t.shape[0], 1, t.shape[-1], dtype=t.dtype)
    t = v.ln_pre(torch.cat([cls, t], dim=1) + v.positional_embedding)
    belief = torch.softmax((t * y).sum(-1), dim=-1)
    order = belief.argsort(dim=-1, descending=True)
    weight = 1.0 / torch.sqrt(order.float() + 1.0)
    z = F.normalize(t * (belief + weight).unsqueeze(-1), dim=1)
    s = torch.cat([y, z], dim=1).permute(1, 0, 2)
    s = v.transformer(s).permute(1, 0, 2)
    return v.ln_post(s)[:, 0] @ v.proj


class Towers(nn.Module):
    """What DDP wraps: normalised image and text features and the logit scale, as open_clip's CLIP
    returns them."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, tokens):
        img = F.normalize(encode_image(self.model, images), dim=-1)
        txt = F.normalize(self.model.encode_text(tokens), dim=-1)
        return img, txt, self.model.logit_scale.exp()


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """SyncBatchNorm's statistics on CPU: the global batch's mean, then its biased variance as the mean
    squared deviation from it (two sums over the ranks; numerically what torch's Welford combination of
    per-rank statistics computes, without its CUDA-only kernels); the unbiased variance for the running
    statistics; gradients through a differentiable all_reduce."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        c = x.shape[1]
        shape = (1, c, 1, 1)
        n = torch.tensor([x.numel() / c], dtype=x.dtype)
        sums = dist_nn.all_reduce(torch.cat([x.sum((0, 2, 3)), n]))
        count = sums[c:]
        mean = sums[:c] / count
        centred = x - mean.view(shape)
        var = dist_nn.all_reduce((centred * centred).sum((0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * count / (count - 1))
        scale = torch.rsqrt(var + self.eps) * self.weight
        return centred * scale.view(shape) + self.bias.view(shape)


def to_cpu_sync_bn(module):
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            s = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum)
            s.load_state_dict(child.state_dict())
            setattr(module, name, s)
        else:
            to_cpu_sync_bn(child)


def gather(x, rank, world):
    """open_clip's gather_features without --gather-with-grad: a plain all_gather, own slice put back."""
    parts = [torch.zeros_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach())
    parts[rank] = x
    return torch.cat(parts)


def loss(img, txt, scale, labels, aff, rank, world):
    I, T = gather(img, rank, world), gather(txt, rank, world)
    target = torch.arange(I.shape[0])
    logits = scale * I @ T.T
    total = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    if aff:
        m = (labels[:, None] == labels[None, :]).to(img.dtype)
        m = m / m.sum(1, keepdim=True)
        IC, TC = gather(m @ img, rank, world), gather(m @ txt, rank, world)
        total = total + (F.cross_entropy(scale * I @ TC.T, target) + F.cross_entropy(scale * T @ IC.T, target)) / 2
    return total


def check_against_goldens(model):
    """The reference model must be the official one: its features on the parity inputs (eval mode)."""
    model.eval()
    with torch.no_grad():
        px = torch.from_numpy(np.load(os.path.join(PARITY, "pixels_eval.npy")))
        tok = torch.from_numpy(np.load(os.path.join(PARITY, "tokens.npy"))).long()
        di = (encode_image(model, px) - torch.from_numpy(np.load(os.path.join(PARITY, "image_features_eval.npy")))).abs().max()
        dt = (model.encode_text(tok) - torch.from_numpy(np.load(os.path.join(PARITY, "text_features.npy")))).abs().max()
    assert di < 1e-4 and dt < 1e-4, f"reference model differs from the official goldens: image {di}, text {dt}"
    return float(di), float(dt)


def rank_batch(folder, step, rank, world):
    """This rank's share of global batch `step`, as torch's DistributedSampler deals it out: the global
    batch is every rank's dumped samples, ordered by their position in the epoch's order; the split
    across ranks is the sampler's own, not pirclip's."""
    dumps = [read_safetensors(os.path.join(folder, f"rank{r}-step{step}.safetensors"))[0] for r in range(world)]
    keys = ("images", "tokens", "labels", "positions")
    joined = {k: torch.cat([d[k] for d in dumps]) for k in keys}
    order = joined["positions"].argsort()
    sampler = torch.utils.data.DistributedSampler(range(len(order)), num_replicas=world, rank=rank, shuffle=False)
    take = order[list(sampler)]
    out = {k: joined[k][take] for k in keys}
    out["lr"] = dumps[rank]["lr"]
    return out


def worker(rank, a, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=a.world)
    cfg = json.load(open(a.config))
    model = build(cfg)
    state, _ = read_safetensors(a.init)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "attn_mask" or k.endswith("attn_mask") for k in missing), (missing, unexpected)
    if rank == 0 and os.path.abspath(a.init) == os.path.abspath(os.path.join(PARITY, "model.safetensors")):
        di, dt = check_against_goldens(model)
        print(f"reference model against the official goldens: image {di:.2e}, text {dt:.2e}", file=sys.stderr)
    instruction = [model.res_visual, model.vision_proj_res]
    if a.lock_instruction:
        for m in instruction:
            for p in m.parameters():
                p.requires_grad = False
    if a.use_bn_sync:
        to_cpu_sync_bn(model)
    towers = Towers(model)
    ddp = nn.parallel.DistributedDataParallel(towers)  # open_clip's defaults on CPU
    named = [(n, p) for n, p in ddp.named_parameters() if p.requires_grad]
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    opt = torch.optim.AdamW([
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": a.wd},
    ], lr=0.0, betas=(0.9, 0.999), eps=1e-8)
    for k in range(1, a.steps + 1):
        batch = rank_batch(a.batches, k, rank, a.world)
        for g in opt.param_groups:
            g["lr"] = float(batch["lr"][0])
        ddp.train()
        if a.lock_instruction:
            model.res_visual.eval()  # open_clip's lock freezes BatchNorm (FrozenBatchNorm2d)
        opt.zero_grad()
        img, txt, scale = ddp(batch["images"].float(), batch["tokens"].long())
        total = loss(img, txt, scale, batch["labels"], a.aff_loss, rank, a.world)
        total.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if rank == 0:
            print(f"step {k}: total loss {total.item():.6f}", file=sys.stderr)
    if rank == 0:
        write_safetensors(a.out, {k: v for k, v in model.state_dict().items() if not k.endswith("attn_mask")})
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--init", default=os.path.join(PARITY, "model.safetensors"))
    p.add_argument("--config", default=os.path.join(PARITY, "config.json"))
    p.add_argument("--out", required=True)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--wd", type=float, default=0.2)
    p.add_argument("--aff-loss", action="store_true")
    p.add_argument("--lock-instruction", action="store_true")
    p.add_argument("--use-bn-sync", action="store_true")
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(a, port), nprocs=a.world, join=True)


if __name__ == "__main__":
    main()
