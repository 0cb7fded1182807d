// The CUDA plugin of pirclip's torch.distributed shim: libtorch's ProcessGroupNCCL, built into its own
// shared library (libpirclip_nccl.so) that links libtorch_cuda. pirclip opens it only for
// `--dist-backend nccl`, after libtorch_cuda is loaded, so no other command pays CUDA's start-up. Built
// only where nccl.h and the CUDA headers are installed (build.rs; scripts/setup.sh installs them from the
// nvidia-* wheels matching torch's CUDA). Errors come back as a malloc'ed message, never as an exception.
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>
#include <cstring>

extern "C" {

// A ProcessGroupNCCL of `world` ranks over `store` (a c10d::Store* the caller keeps alive) with this
// process's GPU `device` made current, as open_clip's `torch.cuda.set_device(local_rank)`. Returns a
// c10d::Backend* that owns one reference, or null and *err. The caller has checked that a GPU is visible.
void *pirclip_nccl_new_backend(void *store, int rank, int world, int device, int timeout_s,
                               char **err) {
  try {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto s = c10::intrusive_ptr<c10d::Store>::reclaim_copy(static_cast<c10d::Store *>(store));
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::seconds(timeout_s);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(s, rank, world, options);
    // Binds the communicator to this rank's GPU, so that barrier() and the first collective do not
    // have to guess the device from the rank.
    pg->setBoundDeviceId(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
    return static_cast<c10d::Backend *>(pg.release());
  } catch (const std::exception &e) {
    *err = strdup(e.what());
    return nullptr;
  }
}

}  // extern "C"
