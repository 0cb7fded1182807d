// torch.distributed from C++: a TCPStore rendezvous and a ProcessGroupGloo (CPU collectives) from the
// libtorch that pirclip links, exposed as a small C API. Compiled only when gloo's headers are present
// (build.rs): the wheel ships none, and Debian's libgloo-dev suffices because ProcessGroupGloo.hpp holds
// gloo types only behind pointers (their layout cannot disagree with torch's pinned gloo). Errors come
// back as a malloc'ed message, never as a C++ exception across the boundary.
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {
char *message(const std::exception &e) { return strdup(e.what()); }

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  // ProcessGroupGloo, or ProcessGroupNCCL from the CUDA plugin (csrc/nccl.cpp): every collective here is
  // a virtual of c10d::Backend.
  c10::intrusive_ptr<c10d::Backend> pg;
  bool nccl;
  // The backend behind a c10d::ProcessGroup, as torch.distributed builds it: the Reducer speaks to that
  // front end. Made on first use.
  c10::intrusive_ptr<c10d::ProcessGroup> front;
};

// The TCPStore rendezvous every backend starts from, with pirclip's keys under a prefix of their own
// (torchrun's agent may host the store and keep keys there too).
c10::intrusive_ptr<c10d::Store> rendezvous(const char *host, int port, int world, int is_server,
                                           int timeout_s) {
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<std::uint16_t>(port);
  opts.isServer = is_server != 0;
  opts.numWorkers = world;
  opts.waitWorkers = false;
  opts.timeout = std::chrono::seconds(timeout_s);
  auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
  return c10::make_intrusive<c10d::PrefixStore>("pirclip", store);
}

void all_reduce(Group *g, at::Tensor &t) {
  std::vector<at::Tensor> ts{t};
  g->pg->allreduce(ts)->wait();
}

// Sum over ranks that autograd sees through (torch.distributed.nn.functional.all_reduce): every rank's
// output is the sum of all inputs, so the gradient reaching each rank's input is the sum of every rank's
// output gradient. SyncBatchNorm's statistics need exactly this.
struct SumOverRanks : public torch::autograd::Function<SumOverRanks> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x,
                            int64_t group) {
    ctx->saved_data["group"] = group;
    at::Tensor out = x.contiguous().clone();
    all_reduce(reinterpret_cast<Group *>(group), out);
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    at::Tensor grad = grads[0].contiguous().clone();
    all_reduce(reinterpret_cast<Group *>(ctx->saved_data["group"].toInt()), grad);
    return {grad, at::Tensor()};
  }
};

bool is_loopback(const std::string &host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}
}  // namespace

extern "C" {

// A ProcessGroupNCCL is made by the CUDA plugin's `make_nccl` (libpirclip_nccl.so, which links
// libtorch_cuda; this library does not, so that CPU-only commands never load CUDA). The plugin returns a
// c10d::Backend* that owns one reference.
typedef void *(*MakeBackend)(void *store, int rank, int world, int device, int timeout_s,
                             char **err);

// Joins the group: gloo when `make_nccl` is null, else NCCL on CUDA device `device`. `is_server`: this
// process hosts the store (rank 0, unless a launcher's agent does). The gloo device binds to the
// loopback address for a single-machine rendezvous, and otherwise to the interface named by
// GLOO_SOCKET_IFNAME or the one the host name resolves to (as PyTorch's default).
void *pirclip_dist_new(const char *host, int port, int rank, int world, int is_server, int timeout_s,
                       int device, MakeBackend make_nccl, char **err) {
  try {
    auto store = rendezvous(host, port, world, is_server, timeout_s);
    if (make_nccl != nullptr) {
      void *backend = make_nccl(store.get(), rank, world, device, timeout_s, err);
      if (backend == nullptr) return nullptr;
      auto pg = c10::intrusive_ptr<c10d::Backend>::reclaim(static_cast<c10d::Backend *>(backend));
      return new Group{store, pg, true, {}};
    }
    auto options = c10d::ProcessGroupGloo::Options::create();
    options->timeout = std::chrono::seconds(timeout_s);
    const char *ifname = std::getenv("GLOO_SOCKET_IFNAME");
    if (ifname != nullptr && *ifname != '\0') {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } else if (is_loopback(host)) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    return new Group{store, pg, false, {}};
  } catch (const std::exception &e) {
    *err = message(e);
    return nullptr;
  }
}

void pirclip_dist_free(void *group) { delete static_cast<Group *>(group); }

// In-place sum over ranks.
int pirclip_dist_all_reduce_sum(void *group, at::Tensor *t, char **err) {
  try {
    std::vector<at::Tensor> ts{*t};
    static_cast<Group *>(group)->pg->allreduce(ts)->wait();
    return 0;
  } catch (const std::exception &e) {
    *err = message(e);
    return 1;
  }
}

// A new tensor: the sum over ranks of `input`, differentiable (SumOverRanks). A collective that fails in
// the backward pass surfaces there as an exception of libtorch's autograd engine.
at::Tensor *pirclip_dist_sum_over_ranks(void *group, at::Tensor *input, char **err) {
  try {
    return new at::Tensor(SumOverRanks::apply(*input, reinterpret_cast<int64_t>(group)));
  } catch (const std::exception &e) {
    *err = message(e);
    return nullptr;
  }
}

// `output` ([world * n, ...], contiguous) receives every rank's `input` ([n, ...]) in rank order.
int pirclip_dist_all_gather(void *group, at::Tensor *input, at::Tensor *output, char **err) {
  try {
    auto *g = static_cast<Group *>(group);
    std::vector<at::Tensor> parts = output->chunk(g->pg->getSize(), 0);
    std::vector<std::vector<at::Tensor>> outputs{parts};
    std::vector<at::Tensor> inputs{input->contiguous()};
    g->pg->allgather(outputs, inputs)->wait();
    return 0;
  } catch (const std::exception &e) {
    *err = message(e);
    return 1;
  }
}

int pirclip_dist_broadcast(void *group, at::Tensor *t, int root, char **err) {
  try {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    static_cast<Group *>(group)->pg->broadcast(ts, opts)->wait();
    return 0;
  } catch (const std::exception &e) {
    *err = message(e);
    return 1;
  }
}

int pirclip_dist_barrier(void *group, char **err) {
  try {
    static_cast<Group *>(group)->pg->barrier()->wait();
    return 0;
  } catch (const std::exception &e) {
    *err = message(e);
    return 1;
  }
}

// DDP's gradient reducer (c10d::Reducer, what torch.nn.parallel.DistributedDataParallel runs): autograd
// hooks on the n parameters' gradient accumulators copy each gradient into its bucket as soon as it is
// ready, and a full bucket's all-reduce starts while backward goes on; at the end of backward the engine
// waits for them and the gradients are the average over ranks. Buckets as DDP's: parameters in reverse
// order (roughly the order backward produces them), the first bucket_bytes_first, the rest
// bucket_bytes. Gradients are views into the buckets (DDP's gradient_as_bucket_view), so the buckets cost
// no memory beyond the gradients. Every parameter must get a gradient in every reduced backward (DDP
// without find_unused_parameters): the caller hooks only those its backward reaches.
void *pirclip_dist_reducer_new(void *group, at::Tensor *const *params, int n,
                               long long bucket_bytes, long long bucket_bytes_first, char **err) {
  try {
    auto *g = static_cast<Group *>(group);
    if (!g->front) {
      using Type = c10d::ProcessGroup::BackendType;
      auto front = c10::make_intrusive<c10d::ProcessGroup>(g->store, g->pg->getRank(),
                                                           g->pg->getSize());
      if (g->nccl) {
        front->setBackend(c10::DeviceType::CUDA, Type::NCCL, g->pg);
        front->setDefaultBackend(Type::NCCL);
      } else {
        // gloo reduces CUDA tensors too (through host copies), as torch.distributed's gloo backend.
        front->setBackend(c10::DeviceType::CPU, Type::GLOO, g->pg);
        front->setBackend(c10::DeviceType::CUDA, Type::GLOO, g->pg);
        front->setDefaultBackend(Type::GLOO);
      }
      g->front = front;
    }
    std::vector<at::Tensor> ps;
    for (int i = 0; i < n; i++) ps.push_back(*params[i]);
    auto [buckets, limits] = c10d::compute_bucket_assignment_by_size(
        ps, {static_cast<size_t>(bucket_bytes_first), static_cast<size_t>(bucket_bytes)});
    std::reverse(buckets.begin(), buckets.end());
    return new c10d::Reducer(ps, buckets, g->front, std::vector<bool>(n, false), bucket_bytes,
                             /*find_unused_parameters=*/false, /*gradient_as_bucket_view=*/true, {},
                             bucket_bytes_first, /*skip_all_reduce_unused_params=*/false,
                             /*use_python_reducer=*/false, {});
  } catch (const std::exception &e) {
    *err = message(e);
    return nullptr;
  }
}

// Arms the reducer for the next backward (DDP calls this after a forward whose gradients are to be
// synchronised). Every rank calls it at the same point of a step: the one-time bucket rebuild is a
// collective.
int pirclip_dist_reducer_prepare(void *reducer, char **err) {
  try {
    auto *r = static_cast<c10d::Reducer *>(reducer);
    // After the first reduced backward, the buckets are rebuilt once in the order gradients actually
    // arrived (rank 0's order, broadcast), as DDP does before its second forward: parameter order alone
    // does not tell which gradients backward produces first.
    r->rebuild_buckets();
    r->prepare_for_forward();
    r->prepare_for_backward({});
    return 0;
  } catch (const std::exception &e) {
    *err = message(e);
    return 1;
  }
}

void pirclip_dist_reducer_free(void *reducer) {
  try {
    delete static_cast<c10d::Reducer *>(reducer);
  } catch (...) {
    // The destructor may throw (noexcept(false)) when a backward was left unfinished; nothing to do.
  }
}

}  // extern "C"
