//! torch.distributed for pirclip: the launcher's environment read as open_clip's `world_info_from_env`,
//! and a process group (TCPStore rendezvous + ProcessGroupGloo, or ProcessGroupNCCL from the CUDA plugin
//! `csrc/nccl.cpp`) from libtorch's c10d through `csrc/dist.cpp`. Without gloo's headers at build time
//! the group cannot be created and says why; everything single-process works as before.

use std::ffi::c_void;
#[cfg(all(pirclip_dist, pirclip_nccl))]
use std::ffi::CStr;
#[cfg(pirclip_dist)]
use std::ffi::{c_char, c_int, CString};

use pirclip_model::layers::RankSum;
use tch::Tensor;

#[cfg(pirclip_dist)]
use pirclip_model::native::take_message;

/// Where this process sits in a launch (`torchrun`, `srun`, `mpirun`), as open_clip reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorldInfo {
    pub local_rank: usize,
    pub rank: usize,
    pub world_size: usize,
}

fn first_env(keys: &[&str]) -> Option<usize> {
    keys.iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// open_clip's `world_info_from_env`: LOCAL_RANK / RANK / WORLD_SIZE with the MPI, Slurm and Open MPI
/// fallbacks, in its order; (0, 0, 1) when nothing is set.
pub fn world_info_from_env() -> WorldInfo {
    WorldInfo {
        local_rank: first_env(&[
            "LOCAL_RANK",
            "MPI_LOCALRANKID",
            "SLURM_LOCALID",
            "OMPI_COMM_WORLD_LOCAL_RANK",
        ])
        .unwrap_or(0),
        rank: first_env(&["RANK", "PMI_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"]).unwrap_or(0),
        world_size: first_env(&[
            "WORLD_SIZE",
            "PMI_SIZE",
            "SLURM_NTASKS",
            "OMPI_COMM_WORLD_SIZE",
        ])
        .unwrap_or(1),
    }
}

/// `env://` rendezvous: MASTER_ADDR and MASTER_PORT, and whether this process hosts the store (rank 0,
/// unless torchrun's agent already does: TORCHELASTIC_USE_AGENT_STORE=True).
pub fn rendezvous_from_env(rank: usize) -> Result<(String, u16, bool), String> {
    let addr = std::env::var("MASTER_ADDR").map_err(|_| {
        "distributed run without MASTER_ADDR: launch with torchrun or srun, or set MASTER_ADDR and MASTER_PORT".to_string()
    })?;
    let port = std::env::var("MASTER_PORT")
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .ok_or("distributed run without a valid MASTER_PORT")?;
    let agent = std::env::var("TORCHELASTIC_USE_AGENT_STORE").is_ok_and(|v| v == "True");
    Ok((addr, port, rank == 0 && !agent))
}

#[cfg(pirclip_dist)]
extern "C" {
    fn pirclip_dist_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        is_server: c_int,
        timeout_s: c_int,
        device: c_int,
        make_nccl: Option<MakeBackend>,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn pirclip_dist_free(group: *mut c_void);
    fn pirclip_dist_all_reduce_sum(
        group: *mut c_void,
        t: *const c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn pirclip_dist_all_gather(
        group: *mut c_void,
        input: *const c_void,
        output: *const c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn pirclip_dist_broadcast(
        group: *mut c_void,
        t: *const c_void,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn pirclip_dist_barrier(group: *mut c_void, err: *mut *mut c_char) -> c_int;
    fn pirclip_dist_reducer_new(
        group: *mut c_void,
        params: *const *const c_void,
        n: c_int,
        bucket_bytes: i64,
        bucket_bytes_first: i64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn pirclip_dist_reducer_prepare(reducer: *mut c_void, err: *mut *mut c_char) -> c_int;
    fn pirclip_dist_reducer_free(reducer: *mut c_void);
    fn pirclip_dist_sum_over_ranks(
        group: *mut c_void,
        input: *const c_void,
        err: *mut *mut c_char,
    ) -> *mut c_void;
}

/// Whether this build has the NCCL backend (its CUDA plugin was compiled).
pub const NCCL_BUILT: bool = cfg!(all(pirclip_dist, pirclip_nccl));

/// `pirclip_nccl_new_backend` of the CUDA plugin (csrc/nccl.cpp).
#[cfg(pirclip_dist)]
type MakeBackend = unsafe extern "C" fn(
    store: *mut c_void,
    rank: c_int,
    world: c_int,
    device: c_int,
    timeout_s: c_int,
    err: *mut *mut c_char,
) -> *mut c_void;

/// Opens the NCCL plugin (libpirclip_nccl.so) after libtorch_cuda: `PIRCLIP_NCCL_PLUGIN` if set, else
/// next to the executable, else where the build left it.
#[cfg(all(pirclip_dist, pirclip_nccl))]
fn nccl_plugin() -> Result<MakeBackend, String> {
    static PLUGIN: std::sync::OnceLock<Result<usize, String>> = std::sync::OnceLock::new();
    let f = PLUGIN.get_or_init(|| {
        // libtorch_cuda first (global symbols): the plugin's undefined symbols resolve against it.
        pirclip_model::cuda::load();
        let mut candidates: Vec<std::path::PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os("PIRCLIP_NCCL_PLUGIN") {
            candidates.push(p.into());
        }
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.to_path_buf()))
        {
            candidates.push(dir.join("libpirclip_nccl.so"));
        }
        candidates.push(env!("PIRCLIP_NCCL_PLUGIN").into());
        let mut tried = Vec::new();
        for path in candidates {
            let Ok(c) = CString::new(path.to_string_lossy().as_bytes()) else {
                continue;
            };
            // SAFETY: dlopen/dlsym with valid C strings; the handle is intentionally never closed.
            unsafe {
                let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
                if h.is_null() {
                    let why = CStr::from_ptr(libc::dlerror())
                        .to_string_lossy()
                        .to_string();
                    tried.push(format!("{}: {why}", path.display()));
                    continue;
                }
                let sym = libc::dlsym(h, c"pirclip_nccl_new_backend".as_ptr());
                if sym.is_null() {
                    tried.push(format!("{}: no pirclip_nccl_new_backend", path.display()));
                    continue;
                }
                return Ok(sym as usize);
            }
        }
        Err(format!(
            "the NCCL plugin could not be opened ({})",
            tried.join("; ")
        ))
    });
    // SAFETY: the address of `pirclip_nccl_new_backend`, whose C signature is `MakeBackend`.
    f.clone()
        .map(|addr| unsafe { std::mem::transmute::<usize, MakeBackend>(addr) })
}

/// A borrowed handle on a live process group: what SyncBatchNorm needs to sum its statistics over the
/// ranks, handed to the model as a [`RankSum`] (`rank_sum`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupRef {
    group: *mut c_void,
    pub rank: usize,
    pub world_size: usize,
}

// SAFETY: c10d process groups are thread-safe; a `GroupRef` is made by `ProcessGroup::handle` for one
// training step and never outlives the group it points to.
unsafe impl Send for GroupRef {}
unsafe impl Sync for GroupRef {}

impl GroupRef {
    /// This group as the model's SyncBatchNorm takes it (`BnMode::TrainSync`).
    pub fn rank_sum(self) -> RankSum {
        fn sum(r: &RankSum, t: &Tensor) -> Result<Tensor, String> {
            GroupRef {
                group: r.context(),
                rank: r.rank,
                world_size: r.world_size,
            }
            .sum_over_ranks(t)
        }
        // SAFETY: a GroupRef is made for one step and never outlives its group (see above); c10d groups
        // are thread-safe.
        unsafe { RankSum::new(self.group, self.rank, self.world_size, sum) }
    }

    /// The sum over ranks of `t`, differentiable: the gradient reaching `t` is the sum of every rank's
    /// gradient of the result (torch.distributed.nn's all_reduce).
    pub fn sum_over_ranks(&self, t: &Tensor) -> Result<Tensor, String> {
        #[cfg(pirclip_dist)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: the group is live (see the type's invariant); `t` is borrowed for the call.
            let out = unsafe {
                pirclip_dist_sum_over_ranks(self.group, t.as_ptr() as *const c_void, &mut err)
            };
            if out.is_null() {
                return Err(format!(
                    "all_reduce (rank {} of {}): {}",
                    self.rank,
                    self.world_size,
                    take_message(err)
                ));
            }
            // SAFETY: a tensor allocated by the shim for us to own.
            Ok(unsafe { Tensor::from_ptr(out as *mut _) })
        }
        #[cfg(not(pirclip_dist))]
        {
            let _ = t;
            unreachable!("no group exists without distributed support")
        }
    }
}

/// How a rank joins its group: the TCPStore at `host:port`, hosted by this process when `is_server`;
/// collectives (and the rendezvous itself) give up after `timeout_s`.
#[derive(Debug, Clone, Copy)]
pub struct Rendezvous<'a> {
    pub host: &'a str,
    pub port: u16,
    pub rank: usize,
    pub world_size: usize,
    pub is_server: bool,
    pub timeout_s: u64,
}

impl std::fmt::Display for Rendezvous<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} as rank {} of {}",
            self.host, self.port, self.rank, self.world_size
        )
    }
}

/// A c10d process group (gloo or NCCL). Collectives block until every rank took part, or fail after the
/// group's timeout (a rank that died never hangs the others forever).
pub struct ProcessGroup {
    #[cfg_attr(not(pirclip_dist), allow(dead_code))]
    group: *mut c_void,
    pub rank: usize,
    pub world_size: usize,
}

impl ProcessGroup {
    /// Joins a gloo group.
    #[cfg(pirclip_dist)]
    pub fn gloo(r: &Rendezvous) -> Result<Self, String> {
        Self::join(r, 0, None).map_err(|e| format!("joining the gloo process group at {r}: {e}"))
    }

    /// Joins an NCCL group with CUDA device `device` made current (the rank's local rank, as open_clip).
    #[cfg(all(pirclip_dist, pirclip_nccl))]
    pub fn nccl(r: &Rendezvous, device: usize) -> Result<Self, String> {
        let make = nccl_plugin()?;
        if !tch::Cuda::is_available() {
            return Err("the NCCL backend needs a CUDA device, and libtorch sees none (driver missing, no GPU, or a CPU-only torch); use --dist-backend gloo on CPU".into());
        }
        Self::join(r, device, Some(make))
            .map_err(|e| format!("joining the NCCL process group at {r} on cuda:{device}: {e}"))
    }

    #[cfg(pirclip_dist)]
    fn join(r: &Rendezvous, device: usize, make_nccl: Option<MakeBackend>) -> Result<Self, String> {
        let host_c =
            CString::new(r.host).map_err(|_| "MASTER_ADDR holds a NUL byte".to_string())?;
        let mut err = std::ptr::null_mut();
        // SAFETY: plain values, a NUL-terminated string borrowed for the call, and (for NCCL) the
        // plugin's entry point.
        let group = unsafe {
            pirclip_dist_new(
                host_c.as_ptr(),
                r.port as c_int,
                r.rank as c_int,
                r.world_size as c_int,
                r.is_server as c_int,
                r.timeout_s.min(i32::MAX as u64) as c_int,
                device as c_int,
                make_nccl,
                &mut err,
            )
        };
        if group.is_null() {
            return Err(take_message(err));
        }
        Ok(ProcessGroup {
            group,
            rank: r.rank,
            world_size: r.world_size,
        })
    }

    #[cfg(not(all(pirclip_dist, pirclip_nccl)))]
    pub fn nccl(_: &Rendezvous, _: usize) -> Result<Self, String> {
        Err("this pirclip was built without the NCCL backend (nccl.h or the CUDA headers were missing at \
             build time: scripts/setup.sh installs them from the nvidia-* wheels of a CUDA torch); use \
             --dist-backend gloo"
            .into())
    }

    #[cfg(not(pirclip_dist))]
    pub fn gloo(_: &Rendezvous) -> Result<Self, String> {
        Err("this pirclip was built without distributed training (gloo's headers were missing): install \
             libgloo-dev (scripts/setup.sh does) and rebuild"
            .into())
    }

    #[cfg(pirclip_dist)]
    fn check(&self, what: &str, rc: c_int, err: *mut c_char) -> Result<(), String> {
        if rc != 0 {
            return Err(format!(
                "{what} (rank {} of {}): {}",
                self.rank,
                self.world_size,
                take_message(err)
            ));
        }
        Ok(())
    }

    /// A handle for one step's forward and backward passes (SyncBatchNorm).
    pub fn handle(&self) -> GroupRef {
        GroupRef {
            group: self.group,
            rank: self.rank,
            world_size: self.world_size,
        }
    }

    /// Sums `t` over the ranks, in place (`t` contiguous).
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<(), String> {
        #[cfg(pirclip_dist)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: a live tensor borrowed for the call.
            let rc = unsafe {
                pirclip_dist_all_reduce_sum(self.group, t.as_ptr() as *const c_void, &mut err)
            };
            self.check("all_reduce", rc, err)
        }
        #[cfg(not(pirclip_dist))]
        {
            let _ = t;
            unreachable!("no group exists without distributed support")
        }
    }

    /// Every rank's `t` (`[n, ...]`, same shape on all ranks) stacked in rank order: `[world·n, ...]`.
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor, String> {
        let t = t.contiguous();
        let mut size = t.size();
        size[0] *= self.world_size as i64;
        let out = Tensor::empty(&size, (t.kind(), t.device()));
        #[cfg(pirclip_dist)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: two live tensors borrowed for the call; `out` is contiguous.
            let rc = unsafe {
                pirclip_dist_all_gather(
                    self.group,
                    t.as_ptr() as *const c_void,
                    out.as_ptr() as *const c_void,
                    &mut err,
                )
            };
            self.check("all_gather", rc, err)?;
        }
        Ok(out)
    }

    /// Overwrites `t` on every rank with rank `root`'s values.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<(), String> {
        #[cfg(pirclip_dist)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: a live tensor borrowed for the call.
            let rc = unsafe {
                pirclip_dist_broadcast(
                    self.group,
                    t.as_ptr() as *const c_void,
                    root as c_int,
                    &mut err,
                )
            };
            self.check("broadcast", rc, err)
        }
        #[cfg(not(pirclip_dist))]
        {
            let _ = (t, root);
            unreachable!("no group exists without distributed support")
        }
    }

    pub fn barrier(&self) -> Result<(), String> {
        #[cfg(pirclip_dist)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: the group is live.
            let rc = unsafe { pirclip_dist_barrier(self.group, &mut err) };
            self.check("barrier", rc, err)
        }
        #[cfg(not(pirclip_dist))]
        unreachable!("no group exists without distributed support")
    }
}

/// DDP's gradient averaging overlapped with backward: c10d's own `Reducer` (what
/// `DistributedDataParallel` runs) with hooks on the parameters' gradient accumulators. After
/// [`GradientReducer::prepare`], the next backward all-reduces each bucket of gradients as soon as all of
/// its gradients exist, while the rest of backward runs, and leaves the average over ranks in `.grad`
/// when it returns. A backward not prepared for (the first micro-batches of an accumulated step) only
/// accumulates locally, like DDP's `no_sync`.
pub struct GradientReducer {
    #[cfg_attr(not(pirclip_dist), allow(dead_code))]
    reducer: *mut c_void,
}

impl GradientReducer {
    /// DDP's default bucket size (`bucket_cap_mb` 25) and its small first bucket (1 MiB).
    pub const BUCKET_BYTES: i64 = 25 << 20;
    pub const FIRST_BUCKET_BYTES: i64 = 1 << 20;

    /// Hooks `params` (trainable leaves, in registration order). Every one of them must get a gradient
    /// in every backward the reducer is prepared for.
    pub fn new(group: &ProcessGroup, params: &[&Tensor]) -> Result<Self, String> {
        #[cfg(pirclip_dist)]
        {
            let ptrs = pirclip_model::native::ptrs(params);
            let mut err = std::ptr::null_mut();
            // SAFETY: live tensors borrowed for the call (the reducer keeps its own references).
            let reducer = unsafe {
                pirclip_dist_reducer_new(
                    group.group,
                    ptrs.as_ptr(),
                    ptrs.len() as c_int,
                    Self::BUCKET_BYTES,
                    Self::FIRST_BUCKET_BYTES,
                    &mut err,
                )
            };
            if reducer.is_null() {
                return Err(format!("gradient reducer: {}", take_message(err)));
            }
            Ok(GradientReducer { reducer })
        }
        #[cfg(not(pirclip_dist))]
        {
            let _ = (group, params);
            unreachable!("no group exists without distributed support")
        }
    }

    /// Arms the reducer for the next backward.
    pub fn prepare(&self) -> Result<(), String> {
        #[cfg(pirclip_dist)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: the reducer is live.
            if unsafe { pirclip_dist_reducer_prepare(self.reducer, &mut err) } != 0 {
                return Err(format!("gradient reducer: {}", take_message(err)));
            }
            Ok(())
        }
        #[cfg(not(pirclip_dist))]
        unreachable!("no group exists without distributed support")
    }
}

impl Drop for GradientReducer {
    fn drop(&mut self) {
        #[cfg(pirclip_dist)]
        // SAFETY: created by pirclip_dist_reducer_new, freed once.
        unsafe {
            pirclip_dist_reducer_free(self.reducer)
        };
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        #[cfg(pirclip_dist)]
        // SAFETY: created by pirclip_dist_new, freed once.
        unsafe {
            pirclip_dist_free(self.group)
        };
    }
}
