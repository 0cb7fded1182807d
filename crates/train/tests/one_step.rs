//! Fixture A one-step golden (tests/fixtures/parity/README.md §6.2): one official training step from
//! train_checkpoint.pt on the fixture batch.

use std::path::PathBuf;

use pirclip_checkpoint::npy;
use pirclip_model::clip::{ids_tensor, images_tensor};
use pirclip_model::{ClipModel, ModelConfig};
use pirclip_train::{
    labels_from_names, optim::Foreach, AdamWConfig, GradScaler, TrainOptions, TrainPrecision,
    Trainer,
};
use tch::{Device, Tensor};

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(p)
}

fn key_bias_range(name: &str, len: usize) -> Option<std::ops::Range<usize>> {
    if name.ends_with("attn.in_proj_bias") {
        let d = len / 3;
        Some(d..2 * d)
    } else if name == "res_visual.attnpool.k_proj.bias" {
        Some(0..len)
    } else {
        None
    }
}

/// Fixture A's model before the step, and its batch of 4 (names airport, bareland, airport, beach).
struct Fixture {
    config: ModelConfig,
    before: pirclip_checkpoint::StateDict,
    pixels: Vec<f32>,
    tokens: Vec<i64>,
}

const NAMES: [&str; 4] = [
    "airport_348.jpg",
    "bareland_43.jpg",
    "airport_349.jpg",
    "beach_388.jpg",
];

impl Fixture {
    fn load() -> Self {
        Fixture {
            config: ModelConfig::from_name_or_path(fx("config.json").to_str().unwrap()).unwrap(),
            before: pirclip_checkpoint::load(fx("train_checkpoint.pt"))
                .unwrap()
                .state_dict,
            pixels: npy::read(fx("pixels_eval.npy")).unwrap().to_f32_vec(),
            tokens: npy::read(fx("tokens.npy")).unwrap().to_i64_vec(),
        }
    }

    /// A trainer from `train_checkpoint.pt` with the official AdamW settings (β 0.9/0.999, eps 1e-8, wd 0.2).
    fn trainer(&self, options: TrainOptions) -> Trainer {
        let model = ClipModel::new(&self.config, Device::Cpu);
        model.load(&self.before, "train_checkpoint.pt").unwrap();
        Trainer::new(model, AdamWConfig::default(), options)
    }

    /// Samples `from..from + n` of the batch as (images, token ids).
    fn batch(&self, from: usize, n: usize) -> (Tensor, Tensor) {
        let per_image = 3 * 64 * 64;
        (
            images_tensor(
                &self.pixels[from * per_image..(from + n) * per_image],
                n,
                64,
                Device::Cpu,
            ),
            ids_tensor(&self.tokens[from * 77..(from + n) * 77], n, Device::Cpu),
        )
    }
}

#[test]
fn one_training_step_matches_the_official_step() {
    let f = Fixture::load();
    let adamw = AdamWConfig::default();
    assert_eq!(
        (adamw.beta1, adamw.beta2, adamw.eps, adamw.weight_decay),
        (0.9, 0.999, 1e-8, 0.2)
    );
    let mut trainer = f.trainer(TrainOptions::default());
    let before = &f.before;
    let (images, ids) = f.batch(0, 4);
    let labels = labels_from_names(&NAMES);
    assert_eq!(labels, vec![0, 1, 0, 2]);
    let stats = trainer.step(&images, &ids, &labels, 1e-3);

    let step: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx("step.json")).unwrap()).unwrap();
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    let lb = &step["loss_before_step"];
    println!("losses {stats:?}");
    assert!(rel(stats.contrastive, lb["contrastive_loss"].as_f64().unwrap()) <= 1e-5);
    assert!(
        rel(
            stats.affiliation.unwrap(),
            lb["affiliation_loss"].as_f64().unwrap()
        ) <= 1e-5
    );
    assert!(rel(stats.total, lb["total"].as_f64().unwrap()) <= 1e-5);
    assert!(
        rel(
            stats.grad_norm,
            step["grad_global_l2_norm"].as_f64().unwrap()
        ) <= 1e-4,
        "grad norm {}",
        stats.grad_norm
    );
    // Per-parameter gradient norms (the backward-pass diagnostic), skipping pure-noise key biases.
    let per = step["grad_l2_norm_per_parameter"].as_object().unwrap();
    let mut worst = 0f64;
    for p in &trainer.optimizer.params {
        let want = per[&p.name].as_f64().unwrap();
        if p.name == "res_visual.attnpool.k_proj.bias" {
            continue;
        }
        let got = p
            .param
            .grad()
            .square()
            .sum(tch::Kind::Double)
            .double_value(&[])
            .sqrt();
        // in_proj_bias norms include the noise-only key part, which is tiny next to q and v.
        worst = worst.max(rel(got, want));
    }
    println!("worst per-parameter gradient-norm relative error {worst:.2e}");
    assert!(worst <= 1e-4, "{worst}");

    // Group order and membership as PyTorch's optimizer indices.
    let group0: Vec<&str> = step["optimizer"]["group0_no_weight_decay"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let group1: Vec<&str> = step["optimizer"]["group1_weight_decay"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let ours: Vec<&str> = trainer
        .optimizer
        .params
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(
        ours,
        group0.iter().chain(&group1).copied().collect::<Vec<_>>()
    );

    let after_want = pirclip_checkpoint::load(fx("after_one_step.safetensors"))
        .unwrap()
        .state_dict;
    let after = trainer.model.state_dict();
    let (mut total, mut within, mut worst_el) = (0usize, 0usize, 0f32);
    for (name, want) in &after_want.entries {
        let got = after.get(name).unwrap();
        if name.ends_with("num_batches_tracked") {
            assert_eq!(got.to_i64_vec(), vec![8], "{name}");
            continue;
        }
        let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
        let b = before.get(name).unwrap().to_f32_vec();
        let skip = key_bias_range(name, g.len());
        for i in 0..g.len() {
            if skip.as_ref().map(|r| r.contains(&i)).unwrap_or(false) {
                assert!(
                    (g[i] - b[i]).abs() <= 1e-3 + 1e-7,
                    "{name}[{i}] moved {}",
                    g[i] - b[i]
                );
                continue;
            }
            let d = (g[i] - w[i]).abs();
            if name.contains("running_") || name == "logit_scale" {
                assert!(d <= 1e-6, "{name}[{i}]: {d}");
            }
            total += 1;
            within += (d <= 1e-5) as usize;
            worst_el = worst_el.max(d);
        }
    }
    let frac = within as f64 / total as f64;
    println!(
        "after one step: {within}/{total} elements within 1e-5 ({:.5}%), worst {worst_el:.2e}",
        100.0 * frac
    );
    assert!(frac >= 0.9999, "{frac}");
    assert!(worst_el <= 2e-3, "{worst_el}");
}

/// `--accum-freq 2` over two micro-batches of 2 gives the gradient of one batch of 4 (the instruction
/// ResNet locked so BatchNorm does not depend on the batch split), and the same losses.
#[test]
fn accumulated_micro_batches_give_the_full_batch_gradient() {
    let f = Fixture::load();
    let labels = labels_from_names(&NAMES);
    let locked = TrainOptions {
        lock_instruction: true,
        ..TrainOptions::default()
    };
    let (trainer, batch) = (|| f.trainer(locked), |from, n| f.batch(from, n));
    let mut full = trainer();
    let whole = batch(0, 4);
    let a = full.step(&whole.0, &whole.1, &labels, 1e-3);
    let mut accum = trainer();
    let b = accum.step_accumulated(&[batch(0, 2), batch(2, 2)], &labels, 1e-3);
    println!("full {a:?}\naccumulated {b:?}");
    for (x, y) in [
        (a.contrastive, b.contrastive),
        (a.affiliation.unwrap(), b.affiliation.unwrap()),
    ] {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{x} vs {y}");
    }
    let mut worst = 0f64;
    for (p, q) in full.optimizer.params.iter().zip(&accum.optimizer.params) {
        assert_eq!(p.name, q.name);
        let (g, h) = (p.param.grad(), q.param.grad());
        if p.name == "logit_scale" {
            // open_clip back-propagates the whole accumulated loss once per micro-batch and
            // logit_scale is not cached, so its gradient is summed accum_freq times: kept as is.
            let (x, y) = (g.double_value(&[]), h.double_value(&[]));
            assert!(
                (2.0 * x - y).abs() <= 1e-5 * x.abs(),
                "logit_scale grad {x} vs {y}"
            );
            continue;
        }
        let norm = g.norm().double_value(&[]);
        if norm < 1e-6 {
            continue;
        }
        worst = worst.max((g - h).norm().double_value(&[]) / norm);
    }
    println!("worst per-parameter relative gradient difference {worst:.2e}");
    assert!(worst <= 1e-4, "{worst}");
    // A different split really changes something when BatchNorm is in train mode: the test can fail.
    let mut bn_train = f.trainer(TrainOptions::default());
    let c = bn_train.step_accumulated(&[batch(0, 2), batch(2, 2)], &labels, 1e-3);
    assert!((c.contrastive - a.contrastive).abs() > 1e-6);
}

/// `--precision amp_bf16` (and `amp`, which is bf16 on CPU): the forward runs in bf16, so the losses are
/// within bf16 error of fp32, parameters and optimizer state stay fp32, and the step is taken.
#[test]
fn bf16_autocast_step_is_close_to_fp32_and_keeps_fp32_weights() {
    let f = Fixture::load();
    let (images, ids) = f.batch(0, 4);
    let labels = labels_from_names(&NAMES);
    let run = |precision| {
        let mut t = f.trainer(TrainOptions {
            precision,
            ..TrainOptions::default()
        });
        let s = t.step(&images, &ids, &labels, 1e-3);
        (t, s)
    };
    let (_, fp32) = run(TrainPrecision::Fp32);
    for p in [TrainPrecision::AmpBf16, TrainPrecision::Amp] {
        let (t, s) = run(p);
        assert_eq!(t.autocast_kind(), Some(tch::Kind::BFloat16));
        assert!(t.scaler.is_none(), "no gradient scaler for bf16");
        println!("{p:?}: {s:?}\nfp32: {fp32:?}");
        let rel = (s.contrastive - fp32.contrastive).abs() / fp32.contrastive;
        assert!(
            rel < 2e-2,
            "contrastive {} vs {}",
            s.contrastive,
            fp32.contrastive
        );
        assert!(rel > 0.0, "really ran in bf16");
        assert!((s.grad_norm - fp32.grad_norm).abs() / fp32.grad_norm < 0.1);
        for p in &t.optimizer.params {
            assert_eq!(p.param.kind(), tch::Kind::Float, "{}", p.name);
            assert_eq!(p.exp_avg.kind(), tch::Kind::Float);
        }
        let sd = t.model.state_dict();
        let moved = sd.get("visual.conv1.weight").unwrap().to_f32_vec();
        let before = f.before.get("visual.conv1.weight").unwrap().to_f32_vec();
        assert_ne!(moved, before, "step taken");
    }
}

#[test]
fn grad_scaler_skips_overflowing_steps_and_grows_after_good_ones() {
    use pirclip_train::optim::ParamState;
    let p = tch::Tensor::ones([3], (tch::Kind::Float, Device::Cpu)).set_requires_grad(true);
    (&p * 4.0).sum(tch::Kind::Float).backward();
    let params = vec![ParamState {
        name: "w".into(),
        param: p.shallow_clone(),
        exp_avg: p.zeros_like(),
        exp_avg_sq: p.zeros_like(),
        decay: true,
    }];
    let mut s = GradScaler {
        growth_interval: 2,
        ..GradScaler::default()
    };
    // Gradients are divided by the scale.
    assert!(s.unscale(&params));
    assert_eq!(
        p.grad().to_kind(tch::Kind::Double).double_value(&[0]),
        4.0 / 65536.0
    );
    s.update(true);
    assert_eq!(s.scale, 65536.0);
    s.update(true);
    assert_eq!(s.scale, 131072.0, "grows after growth_interval good steps");
    let _ = p.grad().shallow_clone().fill_(f64::INFINITY);
    assert!(!s.unscale(&params), "overflow detected");
    s.update(false);
    assert_eq!((s.scale, s.growth_tracker), (65536.0, 0), "backs off");
}

/// The multi-tensor AdamW (PyTorch's default on CUDA) gives the per-tensor update (its default on the
/// CPU, checked against the official step above): weights and both moments, over two steps so that the
/// bias corrections and the weight-decay groups all take part.
#[test]
fn foreach_adamw_step_equals_the_per_tensor_step() {
    let f = Fixture::load();
    let (images, ids) = f.batch(0, 4);
    let labels = labels_from_names(&NAMES);
    let run = |foreach: Foreach| {
        let mut t = f.trainer(TrainOptions::default());
        t.optimizer.foreach = foreach;
        for _ in 0..2 {
            t.step(&images, &ids, &labels, 1e-3);
        }
        t
    };
    let (single, multi) = (run(Foreach::Off), run(Foreach::On));
    assert!(!single.optimizer.uses_foreach() && multi.optimizer.uses_foreach());
    let mut worst = 0f64;
    for (a, b) in single.optimizer.params.iter().zip(&multi.optimizer.params) {
        assert_eq!(a.name, b.name);
        for (x, y) in [
            (&a.param, &b.param),
            (&a.exp_avg, &b.exp_avg),
            (&a.exp_avg_sq, &b.exp_avg_sq),
        ] {
            let scale = x.abs().max().double_value(&[]).max(1e-12);
            let d = (x - y).abs().max().double_value(&[]) / scale;
            worst = worst.max(d);
        }
    }
    println!("foreach vs per-tensor AdamW, 2 steps: worst relative difference {worst:.2e}");
    assert!(worst <= 1e-6, "{worst}");
}

/// Gradients of every trainable parameter after a step (the optimizer leaves them in place).
fn grads(t: &Trainer) -> Vec<(String, Tensor)> {
    t.optimizer
        .params
        .iter()
        .map(|p| (p.name.clone(), p.param.grad().copy()))
        .collect()
}

/// Two ranks (threads over gloo on loopback) × 2 samples with the affiliation loss: each rank's class
/// centres come from its own batch (the official `get_aff_logits` under world size 2), so the gradients
/// must equal a single-process computation of the loss with those per-rank centres: exactly with
/// --gather-with-grad; without it (open_clip's default) each rank back-propagates its own rows' share,
/// so the towers get half the gradient and the logit scale all of it.
#[test]
fn two_ranks_with_the_affiliation_loss_use_per_rank_class_centres() {
    use pirclip_dist::{ProcessGroup, Rendezvous};
    use pirclip_model::{l2_normalize, BnMode, EncodeOptions};
    use pirclip_train::distributed::Distributed;
    use pirclip_train::loss::{class_centres, gathered_losses, Gathered};

    let fixture = Fixture::load();
    let options = TrainOptions {
        affiliation_loss: true,
        lock_instruction: true,
        ..Default::default()
    };
    let reference = fixture.trainer(options);
    let (images, ids) = fixture.batch(0, 4);
    let opts = EncodeOptions {
        bn_mode: BnMode::Running,
        belief_mode: options.belief_mode,
        dropout: false,
    };
    let image = l2_normalize(&reference.model.encode_image(&images, opts));
    let text = l2_normalize(&reference.model.encode_text(&ids));
    let centres: Vec<(Tensor, Tensor)> = (0..2)
        .map(|r| {
            let labels = Tensor::from_slice(&labels_from_names(&NAMES[2 * r..2 * r + 2]));
            class_centres(
                &image.narrow(0, 2 * r as i64, 2),
                &text.narrow(0, 2 * r as i64, 2),
                &labels,
            )
        })
        .collect();
    let ci = Tensor::cat(&[&centres[0].0, &centres[1].0], 0);
    let ct = Tensor::cat(&[&centres[0].1, &centres[1].1], 0);
    let g = Gathered {
        image: &image,
        text: &text,
        centres: Some((&ci, &ct)),
        rank: 0,
        local_batch: 4,
    };
    gathered_losses(&g, &reference.model.logit_scale, false, 0.0)
        .total()
        .backward();
    let want = grads(&reference);

    for gather_with_grad in [true, false] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ranks: Vec<_> = (0..2usize)
            .map(|rank| {
                std::thread::spawn(move || {
                    let fixture = Fixture::load();
                    let mut t = fixture.trainer(options);
                    let group = ProcessGroup::gloo(&Rendezvous {
                        host: "127.0.0.1",
                        port,
                        rank,
                        world_size: 2,
                        is_server: rank == 0,
                        timeout_s: 60,
                    })
                    .unwrap();
                    t.join(Distributed {
                        group,
                        local_loss: false,
                        gather_with_grad,
                        reducer: None,
                    })
                    .unwrap();
                    let (images, ids) = fixture.batch(2 * rank, 2);
                    let labels = labels_from_names(&NAMES[2 * rank..2 * rank + 2]);
                    t.try_step_distributed(&[(images, ids)], &labels, 0.0)
                        .unwrap();
                    grads(&t)
                })
            })
            .collect();
        for (rank, h) in ranks.into_iter().enumerate() {
            let got = h.join().unwrap();
            let mut worst = 0f64;
            for ((name, w), (_, g)) in want.iter().zip(&got) {
                let factor = if gather_with_grad || name == "logit_scale" {
                    1.0
                } else {
                    2.0
                };
                let diff = (w - g * factor).norm().double_value(&[]);
                let rel = diff / w.norm().double_value(&[]).max(1e-12);
                worst = worst.max(rel);
            }
            println!("gather_with_grad {gather_with_grad}, rank {rank}: worst relative gradient difference {worst:.2e}");
            assert!(
                worst < 1e-4,
                "gather_with_grad {gather_with_grad}, rank {rank}: {worst}"
            );
        }
    }
}

#[test]
fn weight_average_follows_the_warmed_up_recursion_and_swaps_back() {
    let f = Fixture::load();
    let (images, ids) = f.batch(0, 4);
    let labels = labels_from_names(&NAMES);
    let mut t = f.trainer(TrainOptions::default());
    t.ema = Some(pirclip_train::ema::Ema::new(&t.model, 0.99));
    let weights = |t: &Trainer| -> Vec<Tensor> {
        t.model.registry().with_entries(|e| {
            e.iter()
                .map(|e| e.tensor.detach().to_kind(tch::Kind::Double))
                .collect()
        })
    };
    // The recursion by hand, in double precision: d_n = min(0.99, (1+n)/(10+n)) at update n = 1, 2, 3.
    let floating: Vec<bool> = t
        .model
        .registry()
        .with_entries(|e| e.iter().map(|e| e.tensor.is_floating_point()).collect());
    let mut expected = weights(&t);
    for n in 1..=3 {
        t.step(&images, &ids, &labels, 1e-3);
        let d = 0.99f64.min((1.0 + n as f64) / (10.0 + n as f64));
        let now = weights(&t);
        for ((e, w), &float) in expected.iter_mut().zip(&now).zip(&floating) {
            // Integer buffers (BatchNorm's step counts) are copied, not averaged.
            *e = if float {
                &*e * d + w * (1.0 - d)
            } else {
                w.shallow_clone()
            };
        }
    }
    let ema = t.ema.as_mut().unwrap();
    assert_eq!(ema.updates, 3);
    let mut worst = 0f64;
    for ((name, s), e) in ema.tensors().iter().zip(&expected) {
        let diff = (s.to_kind(tch::Kind::Double) - e)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff <= 1e-6, "{name}: {diff}");
        worst = worst.max(diff);
    }
    println!("weight average after 3 steps: worst |Δ| {worst:.2e} against the recursion");
    // Swapping shows the average through the model, and swapping again restores the trained weights.
    let trained = weights(&t);
    let ema = t.ema.as_mut().unwrap();
    ema.swap(&t.model);
    for ((name, s), w) in ema.tensors().iter().zip(&trained) {
        assert!(
            s.to_kind(tch::Kind::Double).equal(w),
            "{name}: the shadow now holds the trained weights"
        );
    }
    let averaged = weights(&t);
    for (a, e) in averaged.iter().zip(&expected) {
        assert!((a - e).abs().max().double_value(&[]) <= 1e-6);
    }
    t.ema.as_mut().unwrap().swap(&t.model);
    for (a, b) in weights(&t).iter().zip(&trained) {
        assert!(a.equal(b));
    }
}
