//! c10d from Rust: two ranks (threads) over a TCPStore on loopback: all-reduce, all-gather, broadcast.

use pirclip_dist::{ProcessGroup, Rendezvous};
use tch::{Kind, Tensor};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn two_gloo_ranks_reduce_gather_and_broadcast() {
    let port = free_port();
    let ranks: Vec<_> = (0..2usize)
        .map(|rank| {
            std::thread::spawn(move || {
                let pg = match ProcessGroup::gloo(&Rendezvous {
                    host: "127.0.0.1",
                    port,
                    rank,
                    world_size: 2,
                    is_server: rank == 0,
                    timeout_s: 30,
                }) {
                    Ok(pg) => pg,
                    Err(e) => panic!("{e}"),
                };
                let t = Tensor::from_slice(&[1.0f32 + rank as f32, 10.0]).view([1, 2]);
                pg.all_reduce_sum(&t).unwrap();
                let gathered = pg
                    .all_gather(&Tensor::from_slice(&[rank as f32, rank as f32 * 2.0]).view([1, 2]))
                    .unwrap();
                let b = Tensor::full([3], rank as f64 + 5.0, (Kind::Float, tch::Device::Cpu));
                pg.broadcast(&b, 1).unwrap();
                pg.barrier().unwrap();
                (
                    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap(),
                    Vec::<f32>::try_from(gathered.flatten(0, -1)).unwrap(),
                    Vec::<f32>::try_from(b).unwrap(),
                )
            })
        })
        .collect();
    for h in ranks {
        let (sum, gathered, b) = h.join().unwrap();
        assert_eq!(sum, [3.0, 20.0]);
        assert_eq!(gathered, [0.0, 0.0, 1.0, 2.0]);
        assert_eq!(b, [6.0, 6.0, 6.0]);
    }
}

/// The NCCL backend (CUDA plugin): on a machine with a GPU, a one-rank group reduces, gathers and
/// broadcasts CUDA tensors; without one, joining fails at once with a message that says why (no
/// rendezvous is attempted, nothing hangs).
#[test]
fn nccl_group_works_on_a_gpu_and_says_why_not_elsewhere() {
    let port = free_port();
    let started = std::time::Instant::now();
    let joined = ProcessGroup::nccl(
        &Rendezvous {
            host: "127.0.0.1",
            port,
            rank: 0,
            world_size: 1,
            is_server: true,
            timeout_s: 30,
        },
        0,
    );
    if !pirclip_model::cuda::load() {
        let e = joined.err().expect("NCCL without a GPU must fail");
        // With the backend built, reaching the device check means the plugin opened and its entry
        // point resolved against libtorch_cuda.
        let why = if pirclip_dist::NCCL_BUILT {
            "needs a CUDA device"
        } else {
            "built without the NCCL backend"
        };
        assert!(e.contains(why), "{e}");
        assert!(
            started.elapsed().as_secs() < 10,
            "took {:?}",
            started.elapsed()
        );
        return;
    }
    let pg = joined.unwrap();
    let gpu = tch::Device::Cuda(0);
    let t = Tensor::from_slice(&[1.0f32, 10.0]).to_device(gpu);
    pg.all_reduce_sum(&t).unwrap();
    let gathered = pg
        .all_gather(&Tensor::from_slice(&[3.0f32]).to_device(gpu))
        .unwrap();
    let b = Tensor::full([2], 7.0, (Kind::Float, gpu));
    pg.broadcast(&b, 0).unwrap();
    pg.barrier().unwrap();
    assert_eq!(
        Vec::<f32>::try_from(t.to_device(tch::Device::Cpu)).unwrap(),
        [1.0, 10.0]
    );
    assert_eq!(
        Vec::<f32>::try_from(gathered.to_device(tch::Device::Cpu)).unwrap(),
        [3.0]
    );
    assert_eq!(
        Vec::<f32>::try_from(b.to_device(tch::Device::Cpu)).unwrap(),
        [7.0, 7.0]
    );
}
