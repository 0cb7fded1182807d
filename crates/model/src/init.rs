//! Random initialisation with the distributions of the official constructors (spec §3.10). PyTorch's RNG
//! stream cannot be reproduced, so only the distributions match; a seed makes it deterministic.

use crate::params::{Init, Registry};

pub fn initialize(reg: &Registry, seed: i64) {
    tch::manual_seed(seed);
    let _guard = tch::no_grad_guard();
    reg.with_entries(|entries| {
        for e in entries {
            let mut t = e.tensor.shallow_clone();
            match e.init {
                Init::Zeros => {
                    let _ = t.zero_();
                }
                Init::Ones => {
                    let _ = t.fill_(1.0);
                }
                Init::Const(v) => {
                    let _ = t.fill_(v);
                }
                Init::Normal(std) => {
                    let _ = t.normal_(0.0, std);
                }
                Init::Uniform(bound) => {
                    let _ = t.uniform_(-bound, bound);
                }
            }
        }
    });
}
