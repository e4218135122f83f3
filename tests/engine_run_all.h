// Shared by the engine tests on the CPU (tests/engine_test.cc) and the GPU
// (tests/gpu/engine_gpu_test.cc).
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "engine/engine.h"
#include "gtest/gtest.h"

namespace moa::testing {

// All requests submitted at once, then all awaited. The first request's first chunk holds the
// engine thread until all are submitted, so all of them are queued by the second step whatever
// the machine's load. Collector: Callback() gives the request's chunk callback, Wait() what the
// request produced once its last chunk arrived.
template <typename Collector>
auto RunAll(Engine& e, const std::vector<GenerationRequest>& reqs) {
  std::vector<std::unique_ptr<Collector>> cs;
  absl::Notification all_submitted;
  for (const GenerationRequest& r : reqs) {
    cs.push_back(std::make_unique<Collector>());
    Engine::ChunkCallback cb = cs.back()->Callback();
    if (cs.size() == 1) {
      cb = [cb, &all_submitted](const GenerationChunk& c) {
        all_submitted.WaitForNotification();
        cb(c);
      };
    }
    absl::StatusOr<int64_t> id = e.Submit(r, cb);
    EXPECT_TRUE(id.ok()) << id.status();
  }
  all_submitted.Notify();
  std::vector<decltype(cs.back()->Wait())> out;
  for (auto& c : cs) out.push_back(c->Wait());
  return out;
}

}  // namespace moa::testing
