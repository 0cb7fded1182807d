#!/usr/bin/env bash
# pirclip on a CUDA GPU in one prepared run: correctness against CPU references, then speed next to
# PyTorch/open_clip on the same card. Built for a lent GPU machine with no Rust and no network: carry a
# pirclip binary built against the same torch as that machine's python3 (torch/lib on LD_LIBRARY_PATH),
# with target/release/libpirclip_nccl.so beside it (scripts/setup.sh puts it there) for the NCCL check.
#
#   bench/gpu.sh refs   on the CPU machine: writes $REF (bundled model's eval, fp32, in both BatchNorm modes,
#                       with embeddings; the first training steps of a small model)
#   bench/gpu.sh        on the GPU machine:
#     1. bundled model `eval` on the test split: fp32 in both BN modes and with --exact-fp32 (mR and every
#        embedding against $REF), fp16 and bf16 autocast (mR)
#     2. the same 4 training steps as $REF (fp32: losses against the CPU's), and with --precision amp
#     3. `pirclip bench` ViT-B-32 and PIR at fp32/fp16/bf16 next to bench/openclip_gpu.py on the same images
#     4. training s/step: pirclip PIR and ViT-B-32, fp32 and amp, next to open_clip ViT-B-32 (and PIR amp
#        with the per-tensor optimizer)
#     5. distributed (section `dist`): the 4 training steps with the instruction encoder locked (BatchNorm
#        in eval mode) as one process, as one NCCL rank under torchrun, and as two gloo ranks sharing the
#        GPU with half the batch each: the three loss sequences must agree
#   Environment (defaults): PIRCLIP (target/release/pirclip), PY (.venv/bin/python, else python3),
#   JSON + IMAGES (RSICD-AID150 in ../shared), REF (bench/gpu-ref), W (a new temporary folder),
#   N=1027 images, B=256 per batch, REPS=5, TRAIN_B=128, STEPS=10, PRECISIONS (inference: fp32 fp16 bf16),
#   TRAIN_RUNS (model:precision:foreach, default below), SECTIONS (default: correctness dist encode train).
set -uo pipefail
cd "$(dirname "$0")/.."
P=${PIRCLIP:-target/release/pirclip}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
A=../shared/data/rsicd-aid150
JSON=${JSON:-$A/dataset_rsicd_aid150.json}; IMAGES=${IMAGES:-$A/images}
REF=${REF:-bench/gpu-ref}; W=${W:-$(mktemp -d)}
N=${N:-1027}; B=${B:-256}; REPS=${REPS:-5}; TRAIN_B=${TRAIN_B:-128}; STEPS=${STEPS:-10}
PRECISIONS=${PRECISIONS:-fp32 fp16 bf16}
SECTIONS=${SECTIONS:-correctness dist encode train}
TRAIN_RUNS=${TRAIN_RUNS:-PIR:fp32:auto PIR:amp:auto ViT-B-32:fp32:auto ViT-B-32:amp:auto PIR:amp:off}
BUNDLED="--model models/pir-small-aid150.json --checkpoint models/pir-small-aid150.safetensors"
mkdir -p "$W"
FAILED=()
step() { # step NAME CMD...: runs CMD with its output in $W/NAME.log; a failure is recorded, not fatal
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$W/$name.log" 2>&1; then echo "ok   $name ($((SECONDS - t0)) s)"
  else echo "FAIL $name ($((SECONDS - t0)) s): $(tail -n 3 "$W/$name.log" | tr '\n' ' ')"; FAILED+=("$name"); fi
}
# The first steps of a small PIR model from the bundled weights; augmentation is seeded per sample on the
# CPU, so CPU and GPU see the same pixels and the losses are comparable.
train_small() { # DEVICE PRECISION NAME [MORE TRAIN FLAGS]
  local device=$1 precision=$2 name=$3; shift 3
  $P train --model models/pir-small-aid150.json --pretrained models/pir-small-aid150.safetensors \
    --train-data "$JSON" --train-split test --images-dir "$IMAGES" --batch-size 32 --max-steps 4 --warmup 1 \
    --lr 1e-5 --aff-loss --recipe official --log-every-n-steps 1 --workers 4 --device "$device" --precision "$precision" \
    --logs "$W/logs" --name "$name" "$@"
}
# The same under torchrun: NPROC ranks, the global batch of 32 split between them.
train_small_ranks() { # NPROC DEVICE BACKEND NAME
  local n=$1 device=$2 backend=$3 name=$4
  $PY -m torch.distributed.run --nproc_per_node "$n" --no-python -- $P train --model models/pir-small-aid150.json \
    --pretrained models/pir-small-aid150.safetensors --train-data "$JSON" --train-split test --images-dir "$IMAGES" \
    --batch-size $((32 / n)) --max-steps 4 --warmup 1 --lr 1e-5 --aff-loss --recipe official --log-every-n-steps 1 --workers 4 \
    --device "$device" --dist-backend "$backend" --lock-instruction --logs "$W/logs" --name "$name"
}

if [ "${1:-}" = refs ]; then
  mkdir -p "$REF"
  for bn in running batch; do
    step "ref-eval-$bn" $P eval $BUNDLED --bn-mode $bn --batch-size 64 --json "$JSON" --images-dir "$IMAGES" \
      --out "$REF/eval-$bn.json" --embeddings-out "$REF/emb-$bn"
  done
  rm -f "$REF/emb-batch/text_emb.npy" # the text tower has no BatchNorm: running mode's copy covers it
  step ref-train train_small cpu fp32 cpu-fp32 && cp "$W/logs/cpu-fp32/out.log" "$REF/train-cpu-fp32.log"
  du -sh "$REF"; exit ${#FAILED[@]}
fi

DEV=${DEVICE:-cuda}
echo "== $(nvidia-smi -L 2>/dev/null | head -n 1) | $($P --version) | torch $($PY -c 'import torch; print(torch.__version__)')"
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
# 1. correctness
if has correctness; then
for bn in running batch; do
  step "eval-$bn" $P eval $BUNDLED --device $DEV --bn-mode $bn --batch-size 64 --json "$JSON" --images-dir "$IMAGES" \
    --out "$W/eval-$bn.json" --embeddings-out "$W/emb-$bn"
done
step eval-exact $P eval $BUNDLED --device $DEV --exact-fp32 --batch-size 64 --json "$JSON" --images-dir "$IMAGES" \
  --out "$W/eval-exact.json" --embeddings-out "$W/emb-exact"
for p in $PRECISIONS; do
  [ "$p" = fp32 ] && continue
  step "eval-$p" $P eval $BUNDLED --device $DEV --precision $p --batch-size 64 --json "$JSON" --images-dir "$IMAGES" --out "$W/eval-$p.json"
done
step train-fp32 train_small $DEV fp32 gpu-fp32
step train-amp train_small $DEV amp gpu-amp
fi
# 5. distributed (run here, before the long speed sections)
if has dist; then
step dist-one-process train_small $DEV fp32 dist-one --lock-instruction
step dist-nccl-1 train_small_ranks 1 cuda nccl dist-nccl-1
step dist-gloo-2 train_small_ranks 2 cuda:0 gloo dist-gloo-2
fi
# 2. encode speed, pirclip then open_clip
if has encode; then
for m in ViT-B-32 PIR; do
  for p in $PRECISIONS; do
    step "bench-$m-$p" sh -c "$P bench --model $m --device $DEV --precision $p --json '$JSON' --images-dir '$IMAGES' \
      --images $N --batch-size $B --reps $REPS > '$W/bench-$m-$p.json'"
  done
done
fi
has train || TRAIN_B=0 TRAIN_RUNS=
if has encode || has train; then
  step openclip sh -c "$PY bench/openclip_gpu.py '$JSON' '$IMAGES' $(has encode && echo $N || echo 0) $B $REPS ${PRECISIONS// /,} $TRAIN_B $STEPS $DEV > '$W/openclip.jsonl'"
fi
# 3. training speed (steps after the first two, real images, 12 decoding threads); the last run repeats
#    PIR amp with the per-tensor optimizer (--foreach off) to show what the multi-tensor kernels save
for run in $TRAIN_RUNS; do
  IFS=: read -r m p fe <<<"$run"
  step "trainspeed-$m-$p-$fe" $P train --model $m --train-data "$JSON" --train-split test --images-dir "$IMAGES" \
    --batch-size $TRAIN_B --max-steps $((STEPS + 2)) --warmup 10 --aff-loss --log-every-n-steps 1 --workers 12 \
    --device $DEV --precision $p --foreach $fe --recipe official --logs "$W/logs" --name "speed-$m-$p-$fe"
done

PRECISIONS=$PRECISIONS TRAIN_RUNS=$TRAIN_RUNS $PY - "$W" "$REF" <<'PY'
import glob, json, os, re, statistics, sys
import numpy as np
w, ref = sys.argv[1], sys.argv[2]
def js(f):
    try: return json.load(open(f))
    except Exception: return None
def mr(j): return (j or {}).get("raw", {}).get("retrieval-mean-recall")
print("\n== 1. correctness (bundled model, RSICD-AID150 test split)")
for bn, label in [("running", "fp32 BN running"), ("batch", "fp32 BN batch"), ("exact", "--exact-fp32 (running)")]:
    rbn = "running" if bn == "exact" else bn
    g, c = js(f"{w}/eval-{bn}.json"), js(f"{ref}/eval-{rbn}.json")
    if g is None: continue
    line = f"{label:24} mR gpu {mr(g)} cpu {mr(c)}"
    for e in ["img_emb", "text_emb"]:
        if not os.path.exists(f"{ref}/emb-{rbn}/{e}.npy"): continue
        try:
            a, b = np.load(f"{w}/emb-{bn}/{e}.npy"), np.load(f"{ref}/emb-{rbn}/{e}.npy")
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            line += f" | {e} {a.shape} max|d| {np.abs(a - b).max():.2e} min cos {cos.min():.6f}"
        except Exception as ex: line += f" | {e}: {ex}"
    print(line)
for p in [p for p in os.environ["PRECISIONS"].split() if p != "fp32"]:
    print(f"{p} autocast     mR gpu {mr(js(f'{w}/eval-{p}.json'))}")
def losses(f):
    try: return [float(x) for x in re.findall(r" Loss: ([0-9.]+)", open(f).read())]
    except Exception: return []
cpu, gpu, amp = losses(f"{ref}/train-cpu-fp32.log"), losses(f"{w}/logs/gpu-fp32/out.log"), losses(f"{w}/logs/gpu-amp/out.log")
print(f"train 4 steps, loss per step: cpu fp32 {cpu}\n                              gpu fp32 {gpu}\n                              gpu amp  {amp}")
if cpu and gpu: print(f"  worst |gpu fp32 - cpu| {max(abs(a - b) for a, b in zip(cpu, gpu)):.2e}")
one = losses(f"{w}/logs/dist-one/out.log")
if one:
    print(f"\n== 5. distributed, 4 steps, instruction encoder locked: one process {one}")
    for name, label in [("dist-nccl-1", "1 NCCL rank"), ("dist-gloo-2", "2 gloo ranks on one GPU")]:
        got = losses(f"{w}/logs/{name}/out.log")
        worst = max((abs(a - b) for a, b in zip(one, got)), default=float("nan")) if len(got) == len(one) else float("nan")
        print(f"  {label:24} {got}  worst |d| {worst:.2e}")
print("\n== 2. encode speed, pirclip bench vs open_clip on the same GPU (medians)")
oc = [json.loads(l) for l in open(f"{w}/openclip.jsonl")] if os.path.exists(f"{w}/openclip.jsonl") else []
def ocv(what, model, p, k):
    for o in oc:
        if o["what"] == what and o["model"].startswith(model) and o["precision"] == p: return o[k]
if oc: print(f"device: {oc[0]['device']}")
print(f"{'':30}{'pirclip':>10}{'open_clip':>11}{'ratio':>7}")
precisions = os.environ["PRECISIONS"].split()
for m, ref_name in [("ViT-B-32", "ViT-B-32"), ("PIR", "PIR reference")]:
    for p in precisions:
        j = js(f"{w}/bench-{m}-{p}.json") or {}
        o = ocv("image", ref_name, p, "images_per_s")
        pi = j.get("images_per_s")
        print(f"{m + ' image ' + p + ' (img/s)':30}{pi or float('nan'):10.1f}{o or float('nan'):11.1f}{(pi / o) if pi and o else float('nan'):7.2f}")
    for p in precisions:
        j = js(f"{w}/bench-{m}-{p}.json") or {}
        pc = j.get("captions_per_s")
        o = ocv("text", "ViT-B-32", p, "captions_per_s") if m == "ViT-B-32" else None
        o2 = ocv("text", "ViT-B-32", p, "captions_per_s_pretokenised") if m == "ViT-B-32" else None
        extra = f"  (open_clip model alone, pre-tokenised: {o2:.1f})" if o2 else ""
        print(f"{m + ' text ' + p + ' (cap/s)':30}{pc or float('nan'):10.1f}{o or float('nan'):11.1f}{(pc / o) if pc and o else float('nan'):7.2f}{extra}")
    for p in precisions:
        j = js(f"{w}/bench-{m}-{p}.json") or {}
        print(f"{m + ' eval wall ' + p + ' (s)':30}{j.get('eval_wall_s', float('nan')):10.2f}   mR {j.get('mean_recall')}  (random init)")
print("\n== 3. training s/step (median of the steps after the first two)")
for m, p, fe in (r.split(":") for r in os.environ["TRAIN_RUNS"].split()):
        try:
            log = open(f"{w}/logs/speed-{m}-{p}-{fe}/out.log").read()
            t = [float(x) for x in re.findall(r"Batch \(t\): ([0-9.]+)", log)][2:]
            d = [float(x) for x in re.findall(r"Data \(t\): ([0-9.]+)", log)][2:]
            s = f"{statistics.median(t):.4f} (data wait {statistics.median(d):.4f})"
        except Exception as ex: s = f"n/a ({ex})"
        o = ocv("train", m, p, "step_s") if m == "ViT-B-32" else None
        print(f"pirclip {m:9} {p:5} foreach {fe:4} {s}" + (f"   open_clip {o:.4f}  ratio {o / statistics.median(t):.2f}x" if o and "n/a" not in s else ""))
PY
echo "failed steps: ${FAILED[*]:-none}"
