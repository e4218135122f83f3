#include "kernels/cuda/step_graph.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/status_macros.h"

namespace moa::cuda {
namespace {

constexpr int64_t kAlign = 256;
int64_t RoundUp(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

absl::Status Check(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("CUDA graph: ", what, ": ", cudaGetErrorName(e), " (",
                                          cudaGetErrorString(e), ")"));
}

}  // namespace

StepGraphs::~StepGraphs() {
  Cancel();
  DropAll();
  if (stage_host_ != nullptr) cudaFreeHost(stage_host_);
  if (stage_dev_ != nullptr) cudaFree(stage_dev_);
  if (scratch_dev_ != nullptr) cudaFree(scratch_dev_);
  if (launch_start_ != nullptr) cudaEventDestroy(launch_start_);
  if (launch_end_ != nullptr) cudaEventDestroy(launch_end_);
}

void StepGraphs::DropAll() {
  for (auto& [key, g] : graphs_) cudaGraphExecDestroy(g.exec);
  graphs_.clear();
}

void StepGraphs::DropKey() {
  if (auto it = graphs_.find(key_); it != graphs_.end()) {
    cudaGraphExecDestroy(it->second.exec);
    graphs_.erase(it);
  }
}

absl::Status StepGraphs::Grow(int64_t stage_bytes, int64_t scratch_bytes) {
  // Every graph points into the arenas: moving them retires all graphs.
  DropAll();
  if (stage_bytes > stage_cap_) {
    if (stage_host_ != nullptr) cudaFreeHost(stage_host_);
    if (stage_dev_ != nullptr) cudaFree(stage_dev_);
    stage_host_ = stage_dev_ = nullptr;
    stage_cap_ = 0;
    RETURN_IF_ERROR(Check(cudaMallocHost(&stage_host_, stage_bytes), "staging memory"));
    RETURN_IF_ERROR(Check(cudaMalloc(&stage_dev_, stage_bytes), "staging memory"));
    stage_cap_ = stage_bytes;
  }
  if (scratch_bytes > scratch_cap_) {
    if (scratch_dev_ != nullptr) cudaFree(scratch_dev_);
    scratch_dev_ = nullptr;
    scratch_cap_ = 0;
    RETURN_IF_ERROR(Check(cudaMalloc(&scratch_dev_, scratch_bytes), "scratch memory"));
    scratch_cap_ = scratch_bytes;
  }
  return absl::OkStatus();
}

absl::Status StepGraphs::Begin(int64_t key, cudaStream_t stream) {
  if (mode_ != Mode::kOff) return absl::FailedPreconditionError("CUDA graph: step already begun");
  // The previous step's graph may still be reading the staging memory about to be overwritten.
  if (stream_ != nullptr) RETURN_IF_ERROR(Check(cudaStreamSynchronize(stream_), "previous step"));
  if (timing_pending_) {
    float ms = 0;
    if (cudaEventElapsedTime(&ms, launch_start_, launch_end_) == cudaSuccess) {
      replay_device_s_ += ms * 1e-3;
      ++device_timed_;
    }
    timing_pending_ = false;
  }
  // The step begun last ended where this one begins: count it for its way, then choose this one's.
  const auto now = std::chrono::steady_clock::now();
  if (last_way_ != Timed::kNone) {
    Judge& j = judges_[last_key_];
    const double s = std::chrono::duration<double>(now - last_begin_).count();
    if (j.until_next == 0) {
      // The fastest of each way's steps: a pause of the caller between two steps (an idle
      // server) must not count against either.
      double& best = last_way_ == Timed::kGraph ? j.graph_s : j.direct_s;
      best = std::min(best, s);
      ++(last_way_ == Timed::kGraph ? j.graph_steps : j.direct_steps);
    }
  }
  Judge& j = judges_[key];
  bool graph = j.use_graph;
  if (j.until_next > 0) {
    --j.until_next;
  } else if (j.graph_steps < kStepsToJudge) {
    graph = true;
  } else if (j.direct_steps < kStepsToJudge) {
    graph = false;
  } else {
    j.use_graph = j.graph_s <= j.direct_s;
    graph = j.use_graph;
    j = Judge{.use_graph = j.use_graph, .until_next = kStepsBetweenJudging};
  }
  last_key_ = key;
  last_begin_ = now;
  last_way_ = Timed::kDirect;
  if (!graph) return absl::OkStatus();
  last_way_ = Timed::kNone;  // a capture, unless a graph of the key exists after the growth below
  begin_time_ = now;
  if (overflow_ || stage_cap_ == 0) {
    RETURN_IF_ERROR(
        Grow(std::max<int64_t>(want_stage_, 8 << 20), std::max<int64_t>(want_scratch_, 64 << 20)));
    overflow_ = false;
  }
  stream_ = stream;
  key_ = key;
  stage_calls_ = scratch_calls_ = record_calls_ = 0;
  stage_used_ = scratch_used_ = 0;
  if (auto it = graphs_.find(key); it != graphs_.end()) {
    current_ = it->second;
    mode_ = Mode::kReplay;
    last_way_ = Timed::kGraph;
    return absl::OkStatus();
  }
  current_ = Graph{};
  // Thread-local: allocations elsewhere in the process do not break this capture.
  RETURN_IF_ERROR(
      Check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture"));
  mode_ = Mode::kCapture;
  return absl::OkStatus();
}

absl::StatusOr<void*> StepGraphs::Stage(const void* data, int64_t bytes) {
  ASSIGN_OR_RETURN(auto room, Reserve(bytes));
  if (bytes > 0) std::copy_n(static_cast<const char*>(data), bytes, static_cast<char*>(room.first));
  return room.second;
}

absl::StatusOr<std::pair<void*, void*>> StepGraphs::Reserve(int64_t bytes) {
  if (mode_ == Mode::kOff) {
    return absl::FailedPreconditionError("CUDA graph: staging outside a step");
  }
  int64_t room;
  if (mode_ == Mode::kCapture) {
    // Room to grow: block tables get longer as sequences do.
    room = RoundUp(std::max<int64_t>(2 * bytes, kAlign));
    if (stage_used_ + room > stage_cap_) {
      overflow_ = true;
      want_stage_ = std::max(want_stage_, 4 * (stage_used_ + room));
      return absl::AbortedError("CUDA graph: staging memory outgrown; run the step again");
    }
    current_.stage_room.push_back(room);
  } else {
    if (stage_calls_ >= current_.stage_room.size() || bytes > current_.stage_room[stage_calls_]) {
      DropKey();  // recaptured with more room when the step runs again
      return absl::AbortedError("CUDA graph: step inputs outgrew the recorded room; run again");
    }
    room = current_.stage_room[stage_calls_];
  }
  ++stage_calls_;
  void* host = static_cast<char*>(stage_host_) + stage_used_;
  void* dev = static_cast<char*>(stage_dev_) + stage_used_;
  stage_used_ += room;
  return std::pair{host, dev};
}

absl::StatusOr<void*> StepGraphs::Scratch(int64_t bytes) {
  if (mode_ == Mode::kOff) {
    return absl::FailedPreconditionError("CUDA graph: Scratch outside a step");
  }
  const int64_t size = RoundUp(std::max<int64_t>(bytes, 1));
  if (mode_ == Mode::kCapture) {
    if (scratch_used_ + size > scratch_cap_) {
      overflow_ = true;
      want_scratch_ = std::max(want_scratch_, 4 * (scratch_used_ + size));
      return absl::AbortedError("CUDA graph: scratch memory outgrown; run the step again");
    }
    current_.scratch_size.push_back(size);
  } else if (scratch_calls_ >= current_.scratch_size.size() ||
             size != current_.scratch_size[scratch_calls_]) {
    DropKey();
    return absl::AbortedError("CUDA graph: the step's shape changed; run it again");
  }
  ++scratch_calls_;
  void* p = static_cast<char*>(scratch_dev_) + scratch_used_;
  scratch_used_ += size;
  return p;
}

absl::Status StepGraphs::Record(std::initializer_list<uint64_t> args) {
  if (mode_ == Mode::kOff) return absl::OkStatus();
  uint64_t h = 0x9e3779b97f4a7c15ull;  // splitmix-style mixing of every argument
  for (uint64_t a : args) {
    h ^= a + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    h = (h ^ (h >> 31)) * 0xbf58476d1ce4e5b9ull;
  }
  if (mode_ == Mode::kCapture) {
    current_.signatures.push_back(h);
  } else if (record_calls_ >= current_.signatures.size() ||
             current_.signatures[record_calls_] != h) {
    DropKey();
    return absl::AbortedError("CUDA graph: the step's operations changed; run it again");
  }
  ++record_calls_;
  return absl::OkStatus();
}

absl::Status StepGraphs::End(absl::FunctionRef<absl::Status()> before_launch) {
  if (mode_ == Mode::kOff) return absl::FailedPreconditionError("CUDA graph: End outside a step");
  if (mode_ == Mode::kReplay) {
    mode_ = Mode::kOff;
    if (stage_calls_ != current_.stage_room.size() ||
        scratch_calls_ != current_.scratch_size.size() ||
        record_calls_ != current_.signatures.size()) {
      DropKey();
      return absl::AbortedError("CUDA graph: the step's operations changed; run it again");
    }
    RETURN_IF_ERROR(before_launch());
    ++replays_;
    const double host_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - begin_time_).count();
    replay_host_s_ += host_s;
    if (launch_start_ == nullptr) {
      RETURN_IF_ERROR(Check(cudaEventCreate(&launch_start_), "timing event"));
      RETURN_IF_ERROR(Check(cudaEventCreate(&launch_end_), "timing event"));
    }
    RETURN_IF_ERROR(Check(cudaEventRecord(launch_start_, stream_), "timing event"));
    RETURN_IF_ERROR(Check(cudaGraphLaunch(current_.exec, stream_), "launch"));
    RETURN_IF_ERROR(Check(cudaEventRecord(launch_end_, stream_), "timing event"));
    timing_pending_ = true;
    return absl::OkStatus();
  }
  mode_ = Mode::kOff;
  cudaGraph_t kernels = nullptr;
  RETURN_IF_ERROR(Check(cudaStreamEndCapture(stream_, &kernels), "end capture"));
  // The step = copy the staged inputs up, then the captured kernels.
  cudaGraph_t step = nullptr;
  absl::Status s = Check(cudaGraphCreate(&step, 0), "create");
  cudaGraphNode_t copy = nullptr, body = nullptr;
  if (s.ok() && stage_used_ > 0) {
    s = Check(cudaGraphAddMemcpyNode1D(&copy, step, nullptr, 0, stage_dev_, stage_host_,
                                       stage_used_, cudaMemcpyHostToDevice),
              "staging copy");
  }
  if (s.ok()) {
    s = Check(cudaGraphAddChildGraphNode(&body, step, copy != nullptr ? &copy : nullptr,
                                         copy != nullptr ? 1 : 0, kernels),
              "add kernels");
  }
  if (s.ok()) s = Check(cudaGraphInstantiate(&current_.exec, step, 0), "instantiate");
  if (step != nullptr) cudaGraphDestroy(step);
  cudaGraphDestroy(kernels);
  RETURN_IF_ERROR(s);
  graphs_[key_] = current_;
  ++captures_;
  RETURN_IF_ERROR(before_launch());
  return Check(cudaGraphLaunch(current_.exec, stream_), "launch");
}

void StepGraphs::Cancel() {
  last_way_ = Timed::kNone;  // a step that did not run is no measure
  if (mode_ == Mode::kCapture) {
    cudaGraph_t g = nullptr;
    cudaStreamEndCapture(stream_, &g);
    if (g != nullptr) cudaGraphDestroy(g);
    cudaGetLastError();  // a failed capture leaves a sticky-free error behind: clear it
  }
  mode_ = Mode::kOff;
}

}  // namespace moa::cuda
