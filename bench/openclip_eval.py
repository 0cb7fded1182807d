"""open_clip side of bench/compare.sh: the official retrieval.py procedure (sorted test images, batches of
64 images with all their captions, encode_image/encode_text in fp32, cosine, recall) with open_clip_torch,
same torch and thread count as pirclip. Prints one JSON line with timings."""
import json, os, sys, time

t_start = time.time()
import numpy as np
import torch
import open_clip
from PIL import Image

model_name, weights, ds_json, images_dir, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
from safetensors.torch import load_file

model, _, preprocess = open_clip.create_model_and_transforms(model_name)
model.load_state_dict(load_file(weights))
model.eval()
tokenizer = open_clip.get_tokenizer(model_name)
t_loaded = time.time()

d = json.load(open(ds_json))
pairs = [(im["filename"], s["raw"].capitalize()) for im in d["images"] if im["split"] == "test" for s in im["sentences"]]
names = sorted(set(f for f, _ in pairs))
caps = {n: [c for f, c in pairs if f == n] for n in names}


class DS(torch.utils.data.Dataset):
    def __len__(self):
        return len(names)

    def __getitem__(self, i):
        return preprocess(Image.open(os.path.join(images_dir, names[i]))), caps[names[i]]


loader = torch.utils.data.DataLoader(DS(), batch_size=64, num_workers=threads, collate_fn=lambda b: (torch.stack([x[0] for x in b]), [x[1] for x in b]))
img_embs, txt_embs, t2i = [], [], []
t_img = t_txt = 0.0
n_txt = 0
with torch.no_grad():
    for bi, (imgs, texts) in enumerate(loader):
        t0 = time.time()
        img_embs.append(torch.nn.functional.normalize(model.encode_image(imgs), dim=-1))
        t1 = time.time()
        flat = [t for ts in texts for t in ts]
        for j, ts in enumerate(texts):
            t2i += [bi * 64 + j] * len(ts)
        txt_embs.append(torch.nn.functional.normalize(model.encode_text(tokenizer(flat)), dim=-1))
        t2 = time.time()
        t_img += t1 - t0
        t_txt += t2 - t1
        n_txt += len(flat)
I, T = torch.cat(img_embs), torch.cat(txt_embs)
scores = T @ I.T
t2i = torch.tensor(t2i)
t2i_r1 = (scores.argmax(1) == t2i).float().mean().item() * 100
t_end = time.time()
print(json.dumps({"tool": "open_clip", "images": len(names), "texts": n_txt, "load_s": t_loaded - t_start, "image_encode_s": t_img, "text_encode_s": t_txt,
                  "images_per_s": len(names) / t_img, "captions_per_s": n_txt / t_txt, "eval_wall_s": t_end - t_start, "t2i_R@1": t2i_r1}))
