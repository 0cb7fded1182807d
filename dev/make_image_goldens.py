"""Development aid: Pillow references for decode and for the eval Resize(224)+CenterCrop(224)
(torchvision semantics), for non-square and upscaled images."""
import sys, numpy as np
from PIL import Image
import torchvision.transforms as T
names = ["franz-kafka.jpg", "parity/images/airport_348.jpg", "parity/images/beach_388.jpg"]
tf = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
dec, res = [], []
for n in names:
    im = Image.open("tests/fixtures/" + n).convert("RGB")
    res.append(np.asarray(tf(im)))
np.save("tests/fixtures/pil_resized_224_u8.npy", np.stack(res))
np.save("tests/fixtures/pil_decoded_franz_kafka_u8.npy", np.asarray(Image.open("tests/fixtures/franz-kafka.jpg").convert("RGB")))
print("ok", np.stack(res).shape)
