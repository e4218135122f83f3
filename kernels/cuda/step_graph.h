// Replayable steps for the CUDA backend: a decode step of a given batch size is the same sequence
// of kernels every time, only its small host inputs change (tokens, positions, block tables). The
// first step of a key is captured into a CUDA graph; later steps of that key only stage their
// host inputs and replay the graph, which saves the launch gaps of a few hundred small kernels.
//
// What makes a replay valid: every kernel argument is the same as at capture. So in a step
// (between Begin and End) every per-step device buffer comes from two bump arenas that are the
// same for all keys and never move while any graph exists: `Stage` for host inputs (pinned host
// memory copied to the device by the graph's first node) and `Scratch` for activations and
// workspaces. A key's calls must ask for the same scratch sizes in the same order; staged inputs
// may shrink or grow up to the room reserved at capture (twice their size then). When a replay
// would not fit, the call says ABORTED before anything ran, the graph is dropped, and the caller
// runs the step again (it is then captured anew).
//
// A replay cannot start before the host has staged the whole step, while kernels launched one at
// a time run on the device as the host prepares the next ones; but launching costs the host more
// than staging. Which is faster depends on the batch, the model and the host, so it is measured:
// for each key, kStepsToJudge steps run from the graph, then as many without it, each timed from
// its Begin to the next Begin (all the caller does in a step); the faster way is kept for the
// next kStepsBetweenJudging steps of the key, then measured again.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <map>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moa::cuda {

class StepGraphs {
 public:
  StepGraphs() = default;
  StepGraphs(const StepGraphs&) = delete;
  StepGraphs& operator=(const StepGraphs&) = delete;
  ~StepGraphs();

  // Starts a step of `key` on `stream`: a replay if a graph of this key exists, else a capture;
  // nothing (in_step() stays false: operations run directly) for a key that runs without one.
  absl::Status Begin(int64_t key, cudaStream_t stream);
  // Launches the step's graph (capturing it first if needed) and leaves the step. `before_launch`
  // runs right before the launch, outside any capture: work it enqueues on the stream runs before
  // the graph, every step (the backend's block-table updates).
  absl::Status End(absl::FunctionRef<absl::Status()> before_launch);
  // Leaves a step after an error: nothing of it runs.
  void Cancel();

  bool in_step() const { return mode_ != Mode::kOff; }
  // Whether operations enqueue work (outside steps and while capturing) or only stage their inputs.
  bool launching() const { return mode_ != Mode::kReplay; }

  // Copies `bytes` of host data into the step's staging room and returns where the kernels find
  // them on the device when the step runs.
  absl::StatusOr<void*> Stage(const void* data, int64_t bytes);
  // The same without the copy: room for `bytes` that the caller fills at .first (host) before
  // End; the kernels find it at .second (device).
  absl::StatusOr<std::pair<void*, void*>> Reserve(int64_t bytes);
  // Device memory for the rest of the step, 256-byte aligned.
  absl::StatusOr<void*> Scratch(int64_t bytes);
  // Every operation of a step states what its kernels are given (device pointers, sizes,
  // scalars): a replay whose operations differ in any of them from the capture (another model or
  // KV pool behind the same key, say) is refused with ABORTED and captured again.
  absl::Status Record(std::initializer_list<uint64_t> args);

  // Forgets every graph (memory they point to is about to move). Outside steps only.
  void Reset() { DropAll(); }

  int64_t captures() const { return captures_; }
  int64_t replays() const { return replays_; }
  // Of the replayed steps: host time from Begin to the launch (the operations staging their
  // inputs) and device time of the graphs, measured with events (up to the last finished step).
  double replay_host_seconds() const { return replay_host_s_; }
  double replay_device_seconds() const { return replay_device_s_; }
  // Replays whose device time is in replay_device_seconds (the last one's is known at the next
  // Begin).
  int64_t device_timed_replays() const { return device_timed_; }

 private:
  enum class Mode { kOff, kCapture, kReplay };
  struct Graph {
    cudaGraphExec_t exec = nullptr;
    std::vector<int64_t> stage_room;  // bytes reserved for each Stage call, in call order
    std::vector<int64_t> scratch_size;
    std::vector<uint64_t> signatures;  // one per operation (Record)
  };
  void DropAll();
  void DropKey();  // the graph of the current key
  absl::Status Grow(int64_t stage_bytes, int64_t scratch_bytes);

  Mode mode_ = Mode::kOff;
  cudaStream_t stream_ = nullptr;
  int64_t key_ = 0;
  Graph current_;  // the graph being captured, or a copy of the one replayed
  size_t stage_calls_ = 0, scratch_calls_ = 0, record_calls_ = 0;
  int64_t stage_used_ = 0, scratch_used_ = 0;
  std::map<int64_t, Graph> graphs_;
  static constexpr int kStepsToJudge = 4;
  static constexpr int kStepsBetweenJudging = 512;
  // Per key: the steps timed each way so far in this measurement, and the verdict.
  struct Judge {
    int graph_steps = 0, direct_steps = 0;
    double graph_s = std::numeric_limits<double>::infinity();  // the fastest step each way
    double direct_s = std::numeric_limits<double>::infinity();
    bool use_graph = true;
    int64_t until_next = 0;  // steps left before measuring again; 0 while measuring
  };
  std::map<int64_t, Judge> judges_;
  enum class Timed { kNone, kGraph, kDirect };
  // The step begun last: its key, when, and which way it ran (kNone: a capture, not timed).
  int64_t last_key_ = 0;
  Timed last_way_ = Timed::kNone;
  std::chrono::steady_clock::time_point last_begin_;
  int64_t captures_ = 0;
  int64_t replays_ = 0;
  int64_t device_timed_ = 0;
  double replay_host_s_ = 0, replay_device_s_ = 0;
  std::chrono::steady_clock::time_point begin_time_;
  cudaEvent_t launch_start_ = nullptr, launch_end_ = nullptr;
  bool timing_pending_ = false;  // the events bracket a replay not yet counted

  void* stage_host_ = nullptr;  // pinned
  void* stage_dev_ = nullptr;
  int64_t stage_cap_ = 0;
  void* scratch_dev_ = nullptr;
  int64_t scratch_cap_ = 0;
  bool overflow_ = false;  // a capture outgrew the arenas: grow them and capture again
  int64_t want_stage_ = 0, want_scratch_ = 0;
};

}  // namespace moa::cuda
