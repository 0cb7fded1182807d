"""Development aid: goldens from open_clip_torch 2.24.0 itself for tiny random CLIP models with a ViT
(QuickGELU) and a ModifiedResNet image tower: weights (safetensors, state-dict order), configs, and
unnormalised image/text features of the parity images (pixels_eval) and captions (tokens)."""
import json, sys
import numpy as np, torch, open_clip
from open_clip.factory import _MODEL_CONFIGS
from safetensors.torch import save_file

out = sys.argv[1]
cfgs = {
    "tiny-vit-quickgelu": {"embed_dim": 32, "quick_gelu": True,
                           "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
                           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 2}},
    "tiny-rn": {"embed_dim": 32,
                "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32, "patch_size": None},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 1}},
}
pixels = torch.from_numpy(np.load("tests/fixtures/parity/pixels_eval.npy"))
tokens = torch.from_numpy(np.load("tests/fixtures/parity/tokens.npy"))
for name, cfg in cfgs.items():
    _MODEL_CONFIGS[name] = cfg
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # make every term observable: non-trivial norms, biases and BN statistics
        for n, p in model.named_parameters():
            if n.endswith("bias") or "ln" in n or "bn" in n:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
        for n, b in model.named_buffers():
            if n.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif n.endswith("running_var"):
                b.copy_(torch.exp(0.2 * torch.randn(b.shape, generator=g)))
    model.eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, f"{out}/{name}.safetensors")
    json.dump(cfg, open(f"{out}/{name}.json", "w"), indent=1)
    with torch.no_grad():
        np.save(f"{out}/{name}_image_features.npy", model.encode_image(pixels).numpy())
        np.save(f"{out}/{name}_text_features.npy", model.encode_text(tokens).numpy())
    json.dump(list(sd.keys()), open(f"{out}/{name}_keys.json", "w"))
    print(name, sum(p.numel() for p in model.parameters()), len(sd))
