"""Development aid (not a runtime dependency): writes the small checkpoint fixtures under
tests/fixtures/checkpoints with real PyTorch, so the Rust reader is tested against torch.save itself."""
import collections, io, os, pickle, sys, zipfile
import torch

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
g = torch.Generator().manual_seed(0)
base = torch.randn(4, 6, generator=g)
sd = collections.OrderedDict()
sd["f32"] = base.clone()
sd["f16"] = base.half()
sd["bf16"] = base.bfloat16()
sd["transposed"] = base.t()  # non-contiguous view: stride (1, 6)
sd["sliced"] = base[1:3, ::2]  # offset 6, stride (6, 2)
sd["scalar"] = torch.tensor(2.5)
sd["count"] = torch.tensor(7, dtype=torch.int64)
sd["shared_a"] = base[0]  # two views of one storage
sd["shared_b"] = base[3]
torch.save(sd, os.path.join(out, "dtypes_strides.pt"))
# Same values, contiguous, for the expected side.
torch.save({k: v.contiguous().float() for k, v in sd.items()}, os.path.join(out, "dtypes_strides_expected.pt"))
with open(os.path.join(out, "dtypes_strides_expected.bin"), "wb") as f:
    for k, v in sd.items():
        f.write(v.contiguous().float().numpy().tobytes())

# A training checkpoint wrapper under a DDP prefix, saved under an arbitrary stem.
torch.save({"epoch": 2, "name": "x", "state_dict": collections.OrderedDict(("module." + k, v) for k, v in list(sd.items())[:3])},
           os.path.join(out, "weird stem name.pt"))

# A malicious checkpoint: data.pkl calls os.system when unpickled by an unrestricted loader.
class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/pirclip_pwned",))
buf = io.BytesIO()
torch.save({"state_dict": {"w": torch.zeros(1)}}, buf)
zin = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
with zipfile.ZipFile(os.path.join(out, "malicious.pt"), "w", zipfile.ZIP_STORED) as zout:
    for item in zin.infolist():
        data = zin.read(item.filename)
        if item.filename.endswith("data.pkl"):
            data = pickle.dumps({"state_dict": Evil()}, protocol=2)
        zout.writestr(item, data)
# Legacy (pre-1.6) format.
torch.save({"w": torch.zeros(2)}, os.path.join(out, "legacy.pt"), _use_new_zipfile_serialization=False)
print("ok")
