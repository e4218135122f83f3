// libFuzzer target: MoA plan files (own format and the reference's alphas/betas JSON).
#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/moa_plan.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<moa::MoaPlan> plan = moa::MoaPlan::FromJson(text);
  if (!plan.ok()) return 0;
  moa::ModelConfig c;
  c.n_layers = plan->n_layers();
  c.n_heads = 4;
  c.n_kv_heads = 2;
  absl::StatusOr<moa::MoaPlan> fitted = plan->ForModel(c);
  if (fitted.ok()) {
    for (int l = 0; l < fitted->n_layers(); ++l) {
      for (const moa::SpanRule& r : fitted->layer_rules(l)) {
        moa::VisibleKeysAt(r, fitted->params(), 12345);
      }
    }
  }
  (void)plan->Density(4096);
  absl::StatusOr<moa::MoaPlan> again = moa::MoaPlan::FromJson(plan->ToJson());
  if (!again.ok()) __builtin_trap();  // what we write we must read back
  return 0;
}
