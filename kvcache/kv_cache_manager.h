// Paged KV blocks per (sequence, layer, KV head), sized by each head's elastic span.
//
// A block holds `block_size` consecutive positions of one (layer, KV head): keys and values,
// head_dim values each per position. The memory of all blocks is one pool owned by the backend
// (Backend::NewKvPool); this class does the bookkeeping: which physical block backs which
// logical block of which head of which sequence.
//
// Per head, after a step that leaves a sequence with n cached tokens, the head holds exactly the
// blocks that overlap what the NEXT query (at position n) can see: the sink [0, min(sink, n))
// and the window [window_begin(n), n] (kernels/attention_span.h), the slot of position n itself
// included when its block is already held (the next step writes there; a window of one token
// would otherwise free and re-take that block every step). Sink blocks stay pinned; a
// window block is freed as soon as the window has passed it and never comes back (the window's
// left edge never moves left, moa-method.md §1). A dense head is the case "window = everything".
// During a step a head may briefly hold more: the blocks its new tokens are written to.
//
// A step of the engine: Grow(seq, past + n_new) for every sequence of the batch, the forward pass
// (LlamaModel::Forward reads the tables), then Trim(seq). Not thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/attention_span.h"

namespace moa {

struct KvLayout {
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int32_t block_size = 16;  // positions per block
  SpanParams span;
  std::vector<std::vector<SpanRule>> rules;  // [layer][kv head]; empty = every head dense
};

// OK if the layout is usable: positive sizes, rules empty or [n_layers][n_kv_heads], span
// params valid (sink >= 0, block > 0), every beta in [0, 1] (so windows never move left).
absl::Status ValidateKvLayout(const KvLayout& layout);

// Blocks one head holds while a step writes positions [past, new_len) on top of a cache trimmed
// at `past`: the logical blocks below ceil(new_len / block_size) that overlap [0, min(sink, past))
// or [window_begin(past), new_len).
int64_t BlocksHeldDuringStep(const SpanRule& rule, const SpanParams& span, int32_t block_size,
                             int64_t past, int64_t new_len);
// Blocks one head holds between steps once n tokens are cached (the formula the tests check).
inline int64_t BlocksHeld(const SpanRule& rule, const SpanParams& span, int32_t block_size,
                          int64_t n) {
  return BlocksHeldDuringStep(rule, span, block_size, n, n);
}
// The most blocks (all heads together) one sequence ever holds when its first `prompt` tokens
// are prefilled in chunks of `chunk` and it then decodes one token per step up to `total`
// tokens. Sizes the pool of a single-sequence generation.
int64_t PeakBlocks(const KvLayout& layout, int64_t prompt, int64_t chunk, int64_t total);

using SeqId = int64_t;

// What the attention kernels need to find a head's keys and values: for logical block b
// (positions b*block_size ..), the physical block id, or -1 where the block was freed (or, below
// a sink, never needed). `id` is unique in the process (no two tables of any managers share
// one) and `version` changes whenever `blocks` does, so that a backend may keep a copy of the
// table and send only changes (TableVersion, kernels/backend.h).
struct HeadBlockTable {
  std::vector<int32_t> blocks;
  uint64_t id = 0;
  uint64_t version = 0;
};

class KvCacheManager {
 public:
  // Checks the layout (ValidateKvLayout) and num_blocks >= 0.
  static absl::StatusOr<std::unique_ptr<KvCacheManager>> Create(KvLayout layout,
                                                                int32_t num_blocks);
  // `layout` must pass ValidateKvLayout (Create checks it).
  KvCacheManager(KvLayout layout, int32_t num_blocks);

  const KvLayout& layout() const { return layout_; }
  int32_t total_blocks() const { return total_; }
  int32_t free_blocks() const { return static_cast<int32_t>(free_list_.size()); }
  int32_t used_blocks() const { return total_ - free_blocks(); }

  // A new, empty sequence.
  SeqId AddSequence();
  bool contains(SeqId seq) const { return seqs_.contains(seq); }
  // Blocks that Grow(seq, new_len) would allocate (0 if it fits in what is held; -1 for an
  // unknown sequence or new_len < length).
  int64_t BlocksToGrow(SeqId seq, int64_t new_len) const;
  // Blocks a fresh sequence needs to hold its first n tokens in one step.
  int64_t BlocksForNew(int64_t n) const;
  // Allocates, for every head, the blocks that positions [length, new_len) are written to, and
  // sets the length to new_len. RESOURCE_EXHAUSTED (and nothing allocated) if the pool has too
  // few free blocks; NOT_FOUND for an unknown sequence; INVALID_ARGUMENT if new_len < length.
  absl::Status Grow(SeqId seq, int64_t new_len);
  // Frees, for every head, the window blocks no later query can see (call after the step).
  // Unknown sequences are ignored.
  void Trim(SeqId seq);
  // Gives every block of the sequence back and forgets it (at any point, also mid-step).
  absl::Status Release(SeqId seq);

  // Tokens cached (the length after the last Grow); -1 for an unknown sequence.
  int64_t length(SeqId seq) const;
  // Blocks the sequence holds now, all heads together; 0 for an unknown sequence.
  int64_t blocks_held(SeqId seq) const;
  // Blocks the sequence would hold if every head were dense (for "memory saved" metrics).
  int64_t dense_blocks(SeqId seq) const;
  // The table of one head; an empty table for an unknown sequence or head.
  const HeadBlockTable& table(SeqId seq, int layer, int kv_head) const;
  // The tables of every KV head of one layer (out[h] = &table(seq, layer, h)) with one lookup of
  // the sequence, for the forward pass; false (out untouched) for an unknown sequence or layer,
  // or an `out` not of n_kv_heads entries.
  bool LayerTables(SeqId seq, int layer, absl::Span<const HeadBlockTable*> out) const;
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }

  // Bookkeeping audit: every block is either free or owned by exactly one (sequence, head), the
  // free count is consistent, each head of a trimmed sequence holds exactly the blocks the
  // formula says (and every head holds every block a query may still read). For tests and the
  // engine's idle check.
  absl::Status CheckInvariants() const;

 private:
  struct Head {
    HeadBlockTable table;
    int64_t held = 0;
    int64_t trimmed_upto = 0;  // logical blocks in [sink blocks, trimmed_upto) are freed
  };
  struct Sequence {
    int64_t length = 0;
    bool trimmed = true;      // no Grow since the last Trim
    std::vector<Head> heads;  // [layer * n_kv_heads + kv_head]
  };
  const SpanRule& rule(int layer, int kv_head) const;
  // Logical blocks [0, sink_blocks) and [window_first, ...) are kept at length n.
  void KeptRange(const SpanRule& r, int64_t n, int64_t* sink_blocks, int64_t* window_first) const;
  int64_t NewBlocks(const Sequence& s, int64_t new_len) const;
  void FreeBlock(int32_t id);

  KvLayout layout_;
  int32_t total_;
  std::vector<int32_t> free_list_;
  std::vector<uint8_t> in_use_;  // per physical block, for double-free detection
  absl::flat_hash_map<SeqId, Sequence> seqs_;
  SeqId next_id_ = 1;
  SpanRule dense_rule_;
};

}  // namespace moa
