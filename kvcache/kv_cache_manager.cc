#include "kvcache/kv_cache_manager.h"

#include <algorithm>
#include <atomic>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"

namespace moa {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The logical blocks a head keeps once n tokens are cached: [0, *sink_blocks) and
// [*window_first, ceil(n / block)). The next query (position n) sees keys [0, min(sink, n)) and
// [window_begin, n]; every later query sees a subset of these and later positions, as
// window_begin never decreases.
void Kept(const SpanRule& r, const SpanParams& span, int32_t block_size, int64_t n,
          int64_t* sink_blocks, int64_t* window_first) {
  const VisibleKeys v = VisibleKeysAt(r, span, n);
  if (v.window_begin == 0) {  // everything is visible
    *sink_blocks = 0;
    *window_first = 0;
    return;
  }
  *sink_blocks = CeilDiv(std::min(span.sink, n), block_size);
  *window_first = v.window_begin / block_size;
}

}  // namespace

absl::Status ValidateKvLayout(const KvLayout& l) {
  if (l.n_layers <= 0 || l.n_kv_heads <= 0 || l.head_dim <= 0 || l.block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("KV layout: ", l.n_layers, " layers, ",
                                                   l.n_kv_heads, " KV heads, head_dim ", l.head_dim,
                                                   ", block size ", l.block_size));
  }
  if (l.span.sink < 0 || l.span.block <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV layout: span sink ", l.span.sink, ", block ", l.span.block));
  }
  if (l.rules.empty()) return absl::OkStatus();
  if (static_cast<int>(l.rules.size()) != l.n_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV layout: rules for ", l.rules.size(), " layers, expected ", l.n_layers));
  }
  for (int layer = 0; layer < l.n_layers; ++layer) {
    if (static_cast<int>(l.rules[layer].size()) != l.n_kv_heads) {
      return absl::InvalidArgumentError(absl::StrCat("KV layout: layer ", layer, " has ",
                                                     l.rules[layer].size(), " rules for ",
                                                     l.n_kv_heads, " KV heads"));
    }
    for (const SpanRule& r : l.rules[layer]) {
      // A beta outside [0, 1] would move a window's left edge back onto freed blocks.
      if (!r.dense && !(r.beta >= 0.0 && r.beta <= 1.0)) {
        return absl::InvalidArgumentError(
            absl::StrCat("KV layout: layer ", layer, ": beta ", r.beta, " outside [0, 1]"));
      }
    }
  }
  return absl::OkStatus();
}

int64_t BlocksHeldDuringStep(const SpanRule& rule, const SpanParams& span, int32_t block_size,
                             int64_t past, int64_t new_len) {
  if (new_len <= 0) return 0;
  int64_t sink_blocks = 0, window_first = 0;
  Kept(rule, span, block_size, past, &sink_blocks, &window_first);
  const int64_t end = CeilDiv(new_len, block_size);
  return sink_blocks + std::max<int64_t>(0, end - std::max(window_first, sink_blocks));
}

int64_t PeakBlocks(const KvLayout& layout, int64_t prompt, int64_t chunk, int64_t total) {
  chunk = std::max<int64_t>(chunk, 1);
  const SpanRule dense;
  auto step = [&](int64_t past, int64_t new_len) {
    int64_t sum = 0;
    for (int l = 0; l < layout.n_layers; ++l) {
      for (int h = 0; h < layout.n_kv_heads; ++h) {
        const SpanRule& r = layout.rules.empty() ? dense : layout.rules[l][h];
        sum += BlocksHeldDuringStep(r, layout.span, layout.block_size, past, new_len);
      }
    }
    return sum;
  };
  int64_t peak = 0;
  int64_t past = 0;
  while (past < prompt) {
    const int64_t next = std::min(prompt, past + chunk);
    peak = std::max(peak, step(past, next));
    past = next;
  }
  for (; past < total; ++past) peak = std::max(peak, step(past, past + 1));
  return peak;
}

absl::StatusOr<std::unique_ptr<KvCacheManager>> KvCacheManager::Create(KvLayout layout,
                                                                       int32_t num_blocks) {
  if (absl::Status s = ValidateKvLayout(layout); !s.ok()) return s;
  if (num_blocks < 0) {
    return absl::InvalidArgumentError(absl::StrCat("KV cache: ", num_blocks, " blocks"));
  }
  return std::make_unique<KvCacheManager>(std::move(layout), num_blocks);
}

KvCacheManager::KvCacheManager(KvLayout layout, int32_t num_blocks)
    : layout_(std::move(layout)), total_(std::max(num_blocks, 0)) {
  // Popped from the back: block 0 is handed out first.
  free_list_.resize(total_);
  std::iota(free_list_.rbegin(), free_list_.rend(), 0);
  in_use_.assign(total_, 0);
}

const SpanRule& KvCacheManager::rule(int layer, int kv_head) const {
  return layout_.rules.empty() ? dense_rule_ : layout_.rules[layer][kv_head];
}

void KvCacheManager::KeptRange(const SpanRule& r, int64_t n, int64_t* sink_blocks,
                               int64_t* window_first) const {
  Kept(r, layout_.span, layout_.block_size, n, sink_blocks, window_first);
}

SeqId KvCacheManager::AddSequence() {
  const SeqId id = next_id_++;
  Sequence& s = seqs_[id];
  s.heads.resize(static_cast<size_t>(layout_.n_layers) * layout_.n_kv_heads);
  // Process-wide, so that a backend serving several managers never mixes up their tables.
  static std::atomic<uint64_t> next_table_id{1};
  const uint64_t first = next_table_id.fetch_add(s.heads.size());
  for (size_t i = 0; i < s.heads.size(); ++i) s.heads[i].table.id = first + i;
  return id;
}

int64_t KvCacheManager::NewBlocks(const Sequence& s, int64_t new_len) const {
  const int64_t first = s.length / layout_.block_size;
  const int64_t end = CeilDiv(new_len, layout_.block_size);
  int64_t n = 0;
  for (const Head& h : s.heads) {
    const int64_t size = static_cast<int64_t>(h.table.blocks.size());
    for (int64_t b = first; b < end; ++b) n += b >= size || h.table.blocks[b] < 0;
  }
  return n;
}

int64_t KvCacheManager::BlocksToGrow(SeqId seq, int64_t new_len) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end() || new_len < it->second.length) return -1;
  return NewBlocks(it->second, new_len);
}

int64_t KvCacheManager::BlocksForNew(int64_t n) const {
  return int64_t{layout_.n_layers} * layout_.n_kv_heads *
         CeilDiv(std::max<int64_t>(n, 0), layout_.block_size);
}

absl::Status KvCacheManager::Grow(SeqId seq, int64_t new_len) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("KV cache: no sequence ", seq));
  Sequence& s = it->second;
  if (new_len < s.length) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache: sequence ", seq, " cannot shrink from ", s.length, " to ", new_len, " tokens"));
  }
  if (new_len == s.length) return absl::OkStatus();
  const int64_t need = NewBlocks(s, new_len);
  if (need > static_cast<int64_t>(free_list_.size())) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache: sequence ", seq, " needs ", need,
                                                     " blocks to reach ", new_len, " tokens, ",
                                                     free_list_.size(), " are free"));
  }
  const int64_t first = s.length / layout_.block_size;
  const int64_t end = CeilDiv(new_len, layout_.block_size);
  for (Head& h : s.heads) {
    std::vector<int32_t>& t = h.table.blocks;
    bool changed = false;
    if (static_cast<int64_t>(t.size()) < end) {
      t.resize(end, -1);
      changed = true;
    }
    for (int64_t b = first; b < end; ++b) {
      if (t[b] >= 0) continue;
      const int32_t id = free_list_.back();
      free_list_.pop_back();
      in_use_[id] = 1;
      t[b] = id;
      ++h.held;
      changed = true;
    }
    h.table.version += changed;
  }
  s.length = new_len;
  s.trimmed = false;
  return absl::OkStatus();
}

void KvCacheManager::FreeBlock(int32_t id) {
  in_use_[id] = 0;
  free_list_.push_back(id);
}

void KvCacheManager::Trim(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  Sequence& s = it->second;
  for (int l = 0; l < layout_.n_layers; ++l) {
    for (int kh = 0; kh < layout_.n_kv_heads; ++kh) {
      Head& h = s.heads[static_cast<size_t>(l) * layout_.n_kv_heads + kh];
      int64_t sink_blocks = 0, window_first = 0;
      KeptRange(rule(l, kh), s.length, &sink_blocks, &window_first);
      std::vector<int32_t>& t = h.table.blocks;
      const int64_t stop = std::min<int64_t>(window_first, static_cast<int64_t>(t.size()));
      for (int64_t b = std::max(h.trimmed_upto, sink_blocks); b < stop; ++b) {
        if (t[b] < 0) continue;
        FreeBlock(t[b]);
        t[b] = -1;
        --h.held;
        ++h.table.version;
      }
      h.trimmed_upto = std::max(h.trimmed_upto, window_first);
    }
  }
  s.trimmed = true;
}

absl::Status KvCacheManager::Release(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("KV cache: no sequence ", seq));
  for (Head& h : it->second.heads) {
    for (int32_t id : h.table.blocks) {
      if (id >= 0) FreeBlock(id);
    }
  }
  seqs_.erase(it);
  return absl::OkStatus();
}

int64_t KvCacheManager::length(SeqId seq) const {
  auto it = seqs_.find(seq);
  return it == seqs_.end() ? -1 : it->second.length;
}

int64_t KvCacheManager::blocks_held(SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return 0;
  int64_t n = 0;
  for (const Head& h : it->second.heads) n += h.held;
  return n;
}

int64_t KvCacheManager::dense_blocks(SeqId seq) const {
  auto it = seqs_.find(seq);
  return it == seqs_.end() ? 0 : BlocksForNew(it->second.length);
}

const HeadBlockTable& KvCacheManager::table(SeqId seq, int layer, int kv_head) const {
  static const HeadBlockTable kEmpty;
  auto it = seqs_.find(seq);
  if (it == seqs_.end() || layer < 0 || layer >= layout_.n_layers || kv_head < 0 ||
      kv_head >= layout_.n_kv_heads) {
    return kEmpty;
  }
  return it->second.heads[static_cast<size_t>(layer) * layout_.n_kv_heads + kv_head].table;
}

bool KvCacheManager::LayerTables(SeqId seq, int layer,
                                 absl::Span<const HeadBlockTable*> out) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end() || layer < 0 || layer >= layout_.n_layers ||
      static_cast<int>(out.size()) != layout_.n_kv_heads) {
    return false;
  }
  const Head* heads = it->second.heads.data() + static_cast<size_t>(layer) * layout_.n_kv_heads;
  for (int h = 0; h < layout_.n_kv_heads; ++h) out[h] = &heads[h].table;
  return true;
}

absl::Status KvCacheManager::CheckInvariants() const {
  std::vector<int32_t> owners(total_, 0);
  int64_t held_total = 0;
  for (const auto& [id, s] : seqs_) {
    const int64_t size = CeilDiv(s.length, layout_.block_size);
    for (int l = 0; l < layout_.n_layers; ++l) {
      for (int kh = 0; kh < layout_.n_kv_heads; ++kh) {
        const Head& h = s.heads[static_cast<size_t>(l) * layout_.n_kv_heads + kh];
        const std::vector<int32_t>& t = h.table.blocks;
        const std::string where =
            absl::StrCat("KV cache: sequence ", id, " layer ", l, " head ", kh, ": ");
        if (static_cast<int64_t>(t.size()) != size) {
          return absl::InternalError(
              absl::StrCat(where, t.size(), " table entries for ", s.length, " tokens"));
        }
        int64_t sink_blocks = 0, window_first = 0;
        KeptRange(rule(l, kh), s.length, &sink_blocks, &window_first);
        int64_t held = 0;
        for (int64_t b = 0; b < size; ++b) {
          const int32_t p = t[b];
          const bool kept = b < sink_blocks || b >= window_first;
          if (p < 0) {
            if (kept) return absl::InternalError(absl::StrCat(where, "block ", b, " is needed"));
            continue;
          }
          if (p >= total_) {
            return absl::InternalError(absl::StrCat(where, "physical block ", p, " out of range"));
          }
          if (!kept && s.trimmed) {
            return absl::InternalError(absl::StrCat(where, "block ", b, " left the window"));
          }
          ++owners[p];
          ++held;
        }
        if (held != h.held) {
          return absl::InternalError(
              absl::StrCat(where, "holds ", held, " blocks, counted ", h.held));
        }
        if (s.trimmed) {
          const int64_t formula =
              BlocksHeld(rule(l, kh), layout_.span, layout_.block_size, s.length);
          if (held != formula) {
            return absl::InternalError(
                absl::StrCat(where, "holds ", held, " blocks, the formula says ", formula));
          }
        }
        held_total += held;
      }
    }
  }
  for (int32_t id : free_list_) {
    if (id < 0 || id >= total_) {
      return absl::InternalError(absl::StrCat("KV cache: free block ", id, " out of range"));
    }
    if (in_use_[id] != 0) {
      return absl::InternalError(absl::StrCat("KV cache: block ", id, " free and in use"));
    }
    if (++owners[id] > 1) {
      return absl::InternalError(absl::StrCat("KV cache: block ", id, " owned or freed twice"));
    }
  }
  for (int32_t id = 0; id < total_; ++id) {
    if (owners[id] != 1) {
      return absl::InternalError(absl::StrCat("KV cache: block ", id, " has ", owners[id],
                                              " owners (sequences and free list together)"));
    }
  }
  for (const auto& [id, s] : seqs_) {
    for (const Head& h : s.heads) {
      for (int32_t p : h.table.blocks) {
        if (p >= 0 && in_use_[p] != 1) {
          return absl::InternalError(absl::StrCat("KV cache: block ", p, " held but not in use"));
        }
      }
    }
  }
  if (held_total + static_cast<int64_t>(free_list_.size()) != total_) {
    return absl::InternalError(
        absl::StrCat("KV cache: ", held_total, " held + ", free_list_.size(), " free != ", total_));
  }
  return absl::OkStatus();
}

}  // namespace moa
