//! Training checkpoints in open_clip's layout (spec §4.3), readable by PyTorch: `{"epoch", "name",
//! "state_dict", "optimizer"}` plus a `pirclip` entry (plain ints) that makes resuming exact: optimizer
//! step, epoch and batch position.

use std::path::Path;

use pirclip_checkpoint::pickle::Value;
use pirclip_checkpoint::pt_write::{self, PyValue};
use pirclip_checkpoint::TensorData;
use pirclip_model::params::{to_tch, TchSource};

use crate::Trainer;

/// Where a run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// Completed epochs (open_clip's `epoch` field).
    pub epoch: usize,
    /// Batches already done in the current (next) epoch.
    pub batch_in_epoch: usize,
    /// Optimizer steps done.
    pub step: i64,
}

pub fn save(
    path: &Path,
    trainer: &Trainer,
    name: &str,
    pos: Position,
    lr: f64,
) -> Result<(), pirclip_checkpoint::Error> {
    // Weights and moments are written straight from the tensors (no copy of 3× the model in memory).
    let lazy = |t: &tch::Tensor| PyValue::Lazy(std::rc::Rc::new(TchSource(t.shallow_clone())));
    let state_dict = trainer.model.registry().with_entries(|entries| {
        PyValue::OrderedDict(
            entries
                .iter()
                .map(|e| (e.name.clone(), lazy(&e.tensor)))
                .collect(),
        )
    });
    let c = trainer.optimizer.config;
    let mut state = Vec::new();
    let (mut g0, mut g1) = (Vec::new(), Vec::new());
    for (i, p) in trainer.optimizer.params.iter().enumerate() {
        state.push((
            PyValue::Int(i as i64),
            PyValue::Dict(vec![
                (
                    PyValue::str("step"),
                    PyValue::Tensor(TensorData::from_f32(
                        vec![],
                        &[trainer.optimizer.step as f32],
                    )),
                ),
                (PyValue::str("exp_avg"), lazy(&p.exp_avg)),
                (PyValue::str("exp_avg_sq"), lazy(&p.exp_avg_sq)),
            ]),
        ));
        if p.decay {
            g1.push(PyValue::Int(i as i64))
        } else {
            g0.push(PyValue::Int(i as i64))
        }
    }
    let group = |wd: f64, params: Vec<PyValue>| {
        PyValue::Dict(vec![
            (PyValue::str("lr"), PyValue::Float(lr)),
            (
                PyValue::str("betas"),
                PyValue::Tuple(vec![PyValue::Float(c.beta1), PyValue::Float(c.beta2)]),
            ),
            (PyValue::str("eps"), PyValue::Float(c.eps)),
            (PyValue::str("weight_decay"), PyValue::Float(wd)),
            (PyValue::str("amsgrad"), PyValue::Bool(false)),
            (PyValue::str("maximize"), PyValue::Bool(false)),
            (PyValue::str("foreach"), PyValue::None),
            (PyValue::str("capturable"), PyValue::Bool(false)),
            (PyValue::str("differentiable"), PyValue::Bool(false)),
            (PyValue::str("fused"), PyValue::None),
            (PyValue::str("decoupled_weight_decay"), PyValue::Bool(true)),
            (PyValue::str("params"), PyValue::List(params)),
        ])
    };
    let mut top = vec![
        (PyValue::str("epoch"), PyValue::Int(pos.epoch as i64)),
        (PyValue::str("name"), PyValue::str(name)),
        (PyValue::str("state_dict"), state_dict),
        (
            PyValue::str("optimizer"),
            PyValue::Dict(vec![
                (PyValue::str("state"), PyValue::Dict(state)),
                (
                    PyValue::str("param_groups"),
                    PyValue::List(vec![group(0.0, g0), group(c.weight_decay, g1)]),
                ),
            ]),
        ),
        (
            PyValue::str("pirclip"),
            PyValue::Dict(vec![
                (PyValue::str("step"), PyValue::Int(pos.step)),
                (
                    PyValue::str("batch_in_epoch"),
                    PyValue::Int(pos.batch_in_epoch as i64),
                ),
                (
                    PyValue::str("model"),
                    PyValue::str(trainer.model.config.name.clone()),
                ),
            ]),
        ),
    ];
    // timm's key for the weight average; the updates done ride along so the warm-up resumes exactly.
    if let Some(ema) = &trainer.ema {
        top.push((
            PyValue::str("state_dict_ema"),
            PyValue::OrderedDict(
                ema.tensors()
                    .iter()
                    .map(|(n, t)| (n.clone(), lazy(t)))
                    .collect(),
            ),
        ));
        top.push((PyValue::str("ema_updates"), PyValue::Int(ema.updates)));
    }
    // open_clip stores `scaler.state_dict()` under "scaler" for fp16 amp runs.
    if let Some(sc) = &trainer.scaler {
        top.push((
            PyValue::str("scaler"),
            PyValue::Dict(vec![
                (PyValue::str("scale"), PyValue::Float(sc.scale)),
                (
                    PyValue::str("growth_factor"),
                    PyValue::Float(sc.growth_factor),
                ),
                (
                    PyValue::str("backoff_factor"),
                    PyValue::Float(sc.backoff_factor),
                ),
                (
                    PyValue::str("growth_interval"),
                    PyValue::Int(sc.growth_interval as i64),
                ),
                (
                    PyValue::str("_growth_tracker"),
                    PyValue::Int(sc.growth_tracker as i64),
                ),
            ]),
        ));
    }
    let obj = PyValue::Dict(top);
    pt_write::write(path, &obj)
}

/// Restores weights, optimizer moments and the position from a training checkpoint (ours or open_clip's;
/// a bare state dict restores weights only and starts at step 0).
pub fn resume(path: &Path, trainer: &mut Trainer) -> Result<Position, String> {
    let ck = pirclip_checkpoint::load(path).map_err(|e| e.to_string())?;
    trainer
        .model
        .load(&ck.state_dict, &path.display().to_string())
        .map_err(|e| e.to_string())?;
    drop(ck);
    let mut archive =
        pirclip_checkpoint::pt::PtArchive::open_file(path).map_err(|e| e.to_string())?;
    let obj = std::mem::replace(&mut archive.object, Value::None);
    let epoch = obj.dict_get("epoch").and_then(Value::as_int).unwrap_or(0) as usize;
    let mut pos = Position {
        epoch,
        batch_in_epoch: 0,
        step: 0,
    };
    if let Some(extra) = obj.dict_get("pirclip") {
        pos.step = extra.dict_get("step").and_then(Value::as_int).unwrap_or(0);
        pos.batch_in_epoch = extra
            .dict_get("batch_in_epoch")
            .and_then(Value::as_int)
            .unwrap_or(0) as usize;
    }
    if let Some(ema) = &mut trainer.ema {
        match obj.dict_get("state_dict_ema") {
            Some(Value::Dict(entries)) => {
                let mut saved = Vec::with_capacity(entries.len());
                for (k, v) in entries {
                    let (Some(name), Value::Tensor(t)) = (k.as_str(), v) else {
                        return Err(format!(
                            "{}: state_dict_ema holds a non-tensor entry",
                            path.display()
                        ));
                    };
                    saved.push((
                        name.to_string(),
                        archive.tensor(t).map_err(|e| e.to_string())?,
                    ));
                }
                ema.load(&saved, &path.display().to_string())?;
                ema.updates = obj
                    .dict_get("ema_updates")
                    .and_then(Value::as_int)
                    .unwrap_or(pos.step);
            }
            // A checkpoint without an average (a run that had none): it starts from the loaded weights.
            _ => *ema = crate::ema::Ema::new(&trainer.model, ema.decay),
        }
    }
    if let (Some(sc), Some(saved)) = (&mut trainer.scaler, obj.dict_get("scaler")) {
        if let Some(Value::Float(x)) = saved.dict_get("scale") {
            sc.scale = *x;
        }
        if let Some(t) = saved.dict_get("_growth_tracker").and_then(Value::as_int) {
            sc.growth_tracker = t as u32;
        }
    }
    let Some(Value::Dict(state)) = obj.dict_get("optimizer").and_then(|o| o.dict_get("state"))
    else {
        return Ok(pos);
    };
    let _guard = tch::no_grad_guard();
    let n = trainer.optimizer.params.len();
    for (k, v) in state {
        let i = k.as_int().ok_or("optimizer state key is not an int")? as usize;
        if i >= n {
            return Err(format!("optimizer state has index {i} but the model trains {n} tensors (different freeze switches?)"));
        }
        if let Some(Value::Tensor(t)) = v.dict_get("step") {
            let s = *archive
                .tensor(t)
                .map_err(|e| e.to_string())?
                .to_f32_vec()
                .first()
                .ok_or_else(|| {
                    format!(
                        "{}: optimizer state {i} has an empty `step` tensor",
                        path.display()
                    )
                })? as i64;
            trainer.optimizer.step = s;
            if pos.step == 0 {
                pos.step = s;
            }
        }
        let p = &mut trainer.optimizer.params[i];
        for (field, dst) in [
            ("exp_avg", &mut p.exp_avg),
            ("exp_avg_sq", &mut p.exp_avg_sq),
        ] {
            let Some(Value::Tensor(t)) = v.dict_get(field) else {
                return Err(format!("optimizer state {i} lacks {field}"));
            };
            // Checked on the description, before anything of that size is read or handed to libtorch.
            let want: Vec<usize> = dst.size().iter().map(|&d| d as usize).collect();
            if t.shape != want {
                return Err(format!(
                    "{}: optimizer state {i} ({}) {field} has shape {:?}, the parameter has {want:?}",
                    path.display(),
                    p.name,
                    t.shape
                ));
            }
            let data = archive.tensor(t).map_err(|e| e.to_string())?;
            let src = to_tch(&data);
            dst.copy_(&src.to_device(dst.device()));
        }
    }
    Ok(pos)
}
