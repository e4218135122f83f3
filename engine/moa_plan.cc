#include "engine/moa_plan.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace moa {
namespace {

using Json = nlohmann::json;

constexpr int kPlanVersion = 1;
constexpr absl::string_view kPlanFormat = "moa-plan";
// Generous bounds that keep a hostile file from allocating without limit.
constexpr size_t kMaxLayers = 1024;
constexpr size_t kMaxHeads = 1024;

absl::Status PlanError(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("MoA plan: ", what));
}

absl::StatusOr<int64_t> GetInt(const Json& j, absl::string_view field, absl::string_view where) {
  if (!j.is_number()) {
    return PlanError(absl::StrCat(where, ": \"", field, "\" must be a number"));
  }
  const double d = j.get<double>();
  if (!std::isfinite(d) || d != std::floor(d) || std::abs(d) > 1e12) {
    return PlanError(absl::StrCat(where, ": \"", field, "\" must be an integer, got ", j.dump()));
  }
  return static_cast<int64_t>(d);
}

absl::StatusOr<SpanRule> MakeRule(const Json& alpha, const Json& beta, absl::string_view where) {
  SpanRule r;
  r.dense = false;
  if (!alpha.is_number() || !beta.is_number()) {
    return PlanError(absl::StrCat(where, ": alpha and beta must be numbers"));
  }
  const double a = alpha.get<double>();
  if (!std::isfinite(a) || std::abs(a) > 1e12) {
    return PlanError(absl::StrCat(where, ": alpha ", alpha.dump(), " is out of range"));
  }
  r.alpha = static_cast<int64_t>(std::llround(a));
  r.beta = beta.get<double>();
  // beta outside [0, 1] would move a head's window left as the sequence grows, so tokens would
  // re-enter the window after their KV blocks were freed (moa-method.md §1).
  if (!(r.beta >= 0.0 && r.beta <= 1.0)) {
    return PlanError(absl::StrCat(where, ": beta ", beta.dump(), " must lie in [0, 1]"));
  }
  return r;
}

// {"alphas": [[...] per head] per layer, "betas": ...} as written by the reference pipeline.
absl::StatusOr<std::vector<std::vector<SpanRule>>> ParseReference(const Json& j) {
  static const Json kNull;
  const Json& alphas = j.contains("alphas") ? j["alphas"] : kNull;
  const Json& betas = j.contains("betas") ? j["betas"] : kNull;
  if (!alphas.is_array() || !betas.is_array() || alphas.size() != betas.size()) {
    return PlanError("\"alphas\" and \"betas\" must be arrays with one entry per layer");
  }
  if (alphas.empty() || alphas.size() > kMaxLayers) {
    return PlanError(
        absl::StrCat("a plan needs 1 to ", kMaxLayers, " layers, got ", alphas.size()));
  }
  std::vector<std::vector<SpanRule>> rules(alphas.size());
  for (size_t l = 0; l < alphas.size(); ++l) {
    const Json& al = alphas[l];
    const Json& bl = betas[l];
    if (!al.is_array() || !bl.is_array() || al.size() != bl.size() || al.empty() ||
        al.size() > kMaxHeads) {
      return PlanError(absl::StrCat("layer ", l,
                                    ": alphas and betas must be non-empty arrays of "
                                    "equal length (one per head)"));
    }
    if (l > 0 && al.size() != rules[0].size()) {
      return PlanError(
          absl::StrCat("layer ", l, " has ", al.size(), " heads, layer 0 has ", rules[0].size()));
    }
    for (size_t h = 0; h < al.size(); ++h) {
      absl::StatusOr<SpanRule> r = MakeRule(al[h], bl[h], absl::StrCat("layer ", l, " head ", h));
      if (!r.ok()) return r.status();
      rules[l].push_back(*r);
    }
  }
  return rules;
}

}  // namespace

absl::StatusOr<MoaPlan> MoaPlan::FromJson(absl::string_view json_text) {
  Json j = Json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return PlanError("not valid JSON");
  if (!j.is_object()) return PlanError("the top level must be a JSON object");
  MoaPlan plan;
  try {
    if (j.contains("alphas")) {
      absl::StatusOr<std::vector<std::vector<SpanRule>>> rules = ParseReference(j);
      if (!rules.ok()) return rules.status();
      plan.rules_ = *std::move(rules);
      plan.params_ = SpanParams{};  // the reference's sink 64, block 64
      return plan;
    }
    if (j.value("format", "") != kPlanFormat) {
      return PlanError(absl::StrCat("unknown plan format: expected \"format\": \"", kPlanFormat,
                                    "\" or a reference plan with \"alphas\" and \"betas\""));
    }
    absl::StatusOr<int64_t> version = GetInt(j["version"], "version", "plan");
    if (!version.ok()) return version.status();
    if (*version != kPlanVersion) {
      return PlanError(absl::StrCat("version ", *version, " is not supported (this build reads ",
                                    kPlanVersion, ")"));
    }
    absl::StatusOr<int64_t> sink = GetInt(j["sink"], "sink", "plan");
    if (!sink.ok()) return sink.status();
    absl::StatusOr<int64_t> block = GetInt(j["block_size"], "block_size", "plan");
    if (!block.ok()) return block.status();
    if (*sink < 0 || *sink > (1 << 20)) return PlanError("sink must be in [0, 2^20]");
    if (*block < 1 || *block > (1 << 20)) return PlanError("block_size must be in [1, 2^20]");
    plan.params_ = SpanParams{*sink, *block};
    if (const Json& m = j["model"]; m.is_object()) {
      plan.model_name_ = m.value("name", "");
      if (m.contains("n_heads")) {
        absl::StatusOr<int64_t> v = GetInt(m["n_heads"], "n_heads", "model");
        if (!v.ok()) return v.status();
        plan.n_heads_hint_ = static_cast<int>(*v);
      }
      if (m.contains("n_kv_heads")) {
        absl::StatusOr<int64_t> v = GetInt(m["n_kv_heads"], "n_kv_heads", "model");
        if (!v.ok()) return v.status();
        plan.n_kv_heads_hint_ = static_cast<int>(*v);
      }
    }
    const Json& layers = j["rules"];
    if (!layers.is_array() || layers.empty() || layers.size() > kMaxLayers) {
      return PlanError(absl::StrCat("\"rules\" must be an array of 1 to ", kMaxLayers,
                                    " layers, each an array of rules per KV head"));
    }
    for (size_t l = 0; l < layers.size(); ++l) {
      const Json& heads = layers[l];
      if (!heads.is_array() || heads.empty() || heads.size() > kMaxHeads) {
        return PlanError(absl::StrCat("rules[", l, "] must be a non-empty array"));
      }
      if (l > 0 && heads.size() != layers[0].size()) {
        return PlanError(absl::StrCat("layer ", l, " has ", heads.size(), " rules, layer 0 has ",
                                      layers[0].size()));
      }
      std::vector<SpanRule> row;
      for (size_t h = 0; h < heads.size(); ++h) {
        const Json& r = heads[h];
        const std::string where = absl::StrCat("layer ", l, " head ", h);
        if (!r.is_object()) return PlanError(absl::StrCat(where, ": a rule must be an object"));
        if (r.value("dense", false)) {
          row.push_back(SpanRule{});
          continue;
        }
        if (!r.contains("alpha") || !r.contains("beta")) {
          return PlanError(absl::StrCat(where,
                                        ": a rule needs \"alpha\" and \"beta\" or "
                                        "\"dense\": true"));
        }
        absl::StatusOr<SpanRule> rule = MakeRule(r["alpha"], r["beta"], where);
        if (!rule.ok()) return rule.status();
        row.push_back(*rule);
      }
      plan.rules_.push_back(std::move(row));
    }
  } catch (const Json::exception& e) {
    return PlanError(absl::StrCat("malformed plan: ", e.what()));
  }
  if (plan.n_kv_heads_hint_ != 0 &&
      plan.n_kv_heads_hint_ != static_cast<int>(plan.rules_[0].size())) {
    return PlanError(absl::StrCat("model.n_kv_heads is ", plan.n_kv_heads_hint_,
                                  " but each layer "
                                  "has ",
                                  plan.rules_[0].size(), " rules"));
  }
  return plan;
}

absl::StatusOr<MoaPlan> MoaPlan::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open plan file ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  absl::StatusOr<MoaPlan> plan = FromJson(ss.str());
  if (!plan.ok()) {
    return absl::Status(plan.status().code(), absl::StrCat(path, ": ", plan.status().message()));
  }
  return plan;
}

MoaPlan MoaPlan::Dense(const ModelConfig& c, SpanParams params) {
  MoaPlan plan;
  plan.params_ = params;
  plan.model_name_ = c.name;
  plan.n_heads_hint_ = c.n_heads;
  plan.n_kv_heads_hint_ = c.n_kv_heads;
  plan.rules_.assign(c.n_layers, std::vector<SpanRule>(c.n_kv_heads));
  return plan;
}

std::string MoaPlan::ToJson() const {
  Json rules = Json::array();
  for (const auto& layer : rules_) {
    Json row = Json::array();
    for (const SpanRule& r : layer) {
      if (r.dense) {
        row.push_back({{"dense", true}});
      } else {
        row.push_back({{"alpha", r.alpha}, {"beta", r.beta}});
      }
    }
    rules.push_back(std::move(row));
  }
  Json model = {{"name", model_name_}, {"n_layers", rules_.size()}};
  if (n_heads_hint_ > 0) model["n_heads"] = n_heads_hint_;
  model["n_kv_heads"] = rules_.empty() ? 0 : rules_[0].size();
  Json j = {{"format", kPlanFormat}, {"version", kPlanVersion},     {"model", model},
            {"sink", params_.sink},  {"block_size", params_.block}, {"rules", rules}};
  // A model name from a model file may hold invalid UTF-8: replace it rather than throw.
  return j.dump(1, ' ', false, Json::error_handler_t::replace);
}

absl::Status MoaPlan::CheckFits(const ModelConfig& c) const {
  if (n_layers() != c.n_layers) {
    return PlanError(
        absl::StrCat("the plan has ", n_layers(), " layers, the model has ", c.n_layers));
  }
  const int heads = static_cast<int>(rules_[0].size());
  if (heads != c.n_kv_heads) {
    return PlanError(absl::StrCat("the plan has ", heads, " rules per layer, the model has ",
                                  c.n_kv_heads, " KV heads"));
  }
  if (n_heads_hint_ != 0 && n_heads_hint_ != c.n_heads) {
    return PlanError(absl::StrCat("the plan was made for a model with ", n_heads_hint_,
                                  " query heads, this one has ", c.n_heads));
  }
  return absl::OkStatus();
}

absl::StatusOr<MoaPlan> MoaPlan::ForModel(const ModelConfig& c) const {
  const int heads = rules_.empty() ? 0 : static_cast<int>(rules_[0].size());
  if (heads == c.n_heads && c.n_heads != c.n_kv_heads && n_layers() == c.n_layers) {
    const int group = c.n_heads / c.n_kv_heads;
    MoaPlan out = *this;
    out.n_heads_hint_ = c.n_heads;
    out.n_kv_heads_hint_ = c.n_kv_heads;
    for (int l = 0; l < n_layers(); ++l) {
      std::vector<SpanRule> kv_rules;
      for (int g = 0; g < c.n_kv_heads; ++g) {
        const SpanRule& first = rules_[l][g * group];
        for (int h = g * group + 1; h < (g + 1) * group; ++h) {
          const SpanRule& r = rules_[l][h];
          if (r.dense != first.dense || r.alpha != first.alpha || r.beta != first.beta) {
            return PlanError(
                absl::StrCat("layer ", l, ": query heads ", g * group, "..", (g + 1) * group - 1,
                             " share KV head ", g,
                             " but have different rules; a GQA model needs one rule per "
                             "KV head"));
          }
        }
        kv_rules.push_back(first);
      }
      out.rules_[l] = std::move(kv_rules);
    }
    return out;
  }
  if (absl::Status s = CheckFits(c); !s.ok()) return s;
  return *this;
}

double MoaPlan::Density(int64_t n) const {
  if (n <= 0 || rules_.empty()) return 1.0;
  double kept = 0;
  int64_t heads = 0;
  for (const auto& layer : rules_) {
    for (const SpanRule& r : layer) {
      kept += static_cast<double>(std::min(n, SpanTokens(r, params_, n))) / n;
      ++heads;
    }
  }
  return kept / heads;
}

}  // namespace moa
