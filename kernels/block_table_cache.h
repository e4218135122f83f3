// Host bookkeeping for a device backend's own copy of the KV block tables.
//
// Why: a decode step reads the block table of every (layer, sequence, KV head), but between two
// steps almost none of them changes (a head gains a block every block_size tokens and drops one
// as its window passes it). Packing, checking and uploading every table every step cost the host
// more time than the step's kernels at large batches. With this cache the device keeps the
// tables in one arena; per call the host only looks each table up by its TableVersion
// (kernels/backend.h) and queues the entries that changed, as (arena index, value) updates the
// backend applies on the device before the kernels that read them.
//
// The cache also remembers which keys of a table were found backed by blocks of the pool, so that
// an unchanged table is not scanned again (CheckedKeys).
//
// Tables without identity (id 0) are copied in full into fresh room on every Place. Room is
// never reused while the cache lives: when the arena is full, the caller empties the cache
// (Clear, or Resize for a larger arena) and places again. Pure host code: the CUDA backend owns
// the arena and applies the updates; the tests run this on the CPU.
#pragma once

#include <cstdint>
#include <deque>
#include <utility>
#include <vector>

#include "absl/container/node_hash_map.h"
#include "absl/types/span.h"
#include "kernels/backend.h"

namespace moa {

class BlockTableCache {
 public:
  // One entry of the arena to set: arena[index] = value.
  struct Update {
    uint32_t index;
    int32_t value;
  };
  // Where a table lives in the arena, and what is known about it.
  struct Placed {
    int64_t begin = 0;  // arena index of entry 0
    int32_t len = 0;    // entries (the table's size, clamped to int32)
    // Keys found backed by blocks of a pool of `checked_blocks` blocks, in the table's current
    // version: [0, checked_sink) and [checked_from, checked_to). Reset when the version changes.
    int32_t checked_blocks = -1;
    int64_t checked_sink = 0, checked_from = 0, checked_to = 0;
  };

  // `capacity`: entries of the arena, at most 2^32.
  explicit BlockTableCache(int64_t capacity) : capacity_(capacity) {}

  // Makes the arena copy of `table` current (queuing the entries that differ from what the arena
  // holds) and returns it, valid until the next Clear or ClearUpdates; nullptr if the arena has no
  // room left (nothing is queued then for this table). Entries that became -1 are not sent: the
  // arena keeps the old block id there, which no kernel reads, as the caller checks every key it
  // lets kernels read against `table` itself.
  Placed* Place(absl::Span<const int32_t> table, TableVersion v);

  // Forgets every table; the arena's content is then undefined until tables are placed again.
  void Clear();
  // Clear, with a new capacity.
  void Resize(int64_t capacity);
  int64_t capacity() const { return capacity_; }
  int64_t used() const { return used_; }
  // Arena entries that tables still need: those placed with an identity since the last Clear,
  // and those without one since the last ClearUpdates (the rest of `used` was left behind by
  // tables that moved to more room, or whose call is over).
  int64_t in_use() const { return live_ + transient_room_; }
  // The room the last Place that returned nullptr asked for.
  int64_t shortfall() const { return shortfall_; }
  int64_t tables() const { return tables_; }

  // Updates queued since the last ClearUpdates: one per arena entry as long as each table is
  // placed once in between (a step places each (layer, sequence, head) table once).
  const std::vector<Update>& updates() const { return updates_; }
  void ClearUpdates() {
    updates_.clear();
    transient_.clear();
    transient_room_ = 0;
  }

 private:
  struct Entry {
    Placed placed;
    uint64_t version = 0;
    int64_t room = 0;
    std::vector<int32_t> shadow;  // what the arena holds, entry by entry (-1: nothing sent)
  };
  // Tables are looked up in chunks of consecutive ids (a sequence's heads have consecutive ids,
  // KvCacheManager), and the last chunk is remembered: most lookups of a call cost no hashing.
  static constexpr int kChunkBits = 5;
  struct Chunk {
    Entry entries[1 << kChunkBits];
    uint32_t present = 0;  // bit i: entries[i] holds a table
  };
  // The entry of `id`, and whether it was there already.
  std::pair<Entry*, bool> Find(uint64_t id);
  // Room for `n` entries at the end of the arena, or -1.
  int64_t Allocate(int64_t n);
  void SendAll(Entry& e, absl::Span<const int32_t> table);

  int64_t capacity_;
  int64_t used_ = 0;
  int64_t live_ = 0;
  int64_t transient_room_ = 0;
  int64_t shortfall_ = 0;
  // Node map: Place's pointers survive later inserts.
  absl::node_hash_map<uint64_t, Chunk> chunks_;
  uint64_t last_key_ = 0;
  Chunk* last_chunk_ = nullptr;
  int64_t tables_ = 0;
  std::deque<Entry> transient_;  // tables without identity
  std::vector<Update> updates_;
};

// Whether keys [0, sink_end) and [win_begin, end) of `placed` were found backed by blocks of a
// pool of `num_blocks` blocks (BlockTableCache::Placed), and the record of a successful check.
bool CheckedKeys(const BlockTableCache::Placed& placed, int32_t num_blocks, int64_t sink_end,
                 int64_t win_begin, int64_t end);
// Records that [0, sink_end) and [win_begin, end) are backed, widened to the blocks checked.
void MarkChecked(BlockTableCache::Placed& placed, int32_t num_blocks, int64_t block_size,
                 int64_t sink_end, int64_t win_begin, int64_t end);

}  // namespace moa
