#include "kernels/block_table_cache.h"

#include <algorithm>
#include <limits>

namespace moa {

int64_t BlockTableCache::Allocate(int64_t n) {
  if (n > capacity_ - used_) {
    shortfall_ = n;
    return -1;
  }
  const int64_t at = used_;
  used_ += n;
  return at;
}

void BlockTableCache::SendAll(Entry& e, absl::Span<const int32_t> table) {
  e.shadow.assign(table.begin(), table.begin() + e.placed.len);
  for (int32_t i = 0; i < e.placed.len; ++i) {
    if (table[i] >= 0) {
      updates_.push_back({static_cast<uint32_t>(e.placed.begin + i), table[i]});
    }
  }
}

BlockTableCache::Placed* BlockTableCache::Place(absl::Span<const int32_t> table, TableVersion v) {
  const int32_t len = static_cast<int32_t>(
      std::min<int64_t>(static_cast<int64_t>(table.size()), std::numeric_limits<int32_t>::max()));
  if (v.id == 0) {
    const int64_t at = Allocate(len);
    if (at < 0) return nullptr;
    transient_room_ += len;
    Entry& e = transient_.emplace_back();
    e.placed = Placed{at, len};
    SendAll(e, table);
    return &e.placed;
  }
  auto [entry, found] = Find(v.id);
  if (!found) {
    // Room to grow: a decode step adds a block now and then, a prefill chunk several.
    const int64_t room = std::max<int64_t>(16, 2 * int64_t{len});
    const int64_t at = Allocate(room);
    if (at < 0) return nullptr;
    last_chunk_->present |= 1u << (v.id & ((1u << kChunkBits) - 1));
    ++tables_;
    Entry& e = *entry;
    e = Entry{};
    e.version = v.version;
    e.room = room;
    live_ += room;
    e.placed = Placed{at, len};
    SendAll(e, table);
    return &e.placed;
  }
  Entry& e = *entry;
  if (e.version == v.version && e.placed.len == len) return &e.placed;
  if (len > e.room) {
    const int64_t room = 2 * int64_t{len};
    const int64_t at = Allocate(room);
    if (at < 0) return nullptr;
    live_ += room - e.room;
    e.room = room;
    e.placed = Placed{at, len};
    SendAll(e, table);
  } else {
    e.placed.len = len;
    e.shadow.resize(len, -1);
    for (int32_t i = 0; i < len; ++i) {
      // A freed entry (-1) is not sent: no kernel reads it (see Place in the header).
      if (table[i] != e.shadow[i] && table[i] >= 0) {
        updates_.push_back({static_cast<uint32_t>(e.placed.begin + i), table[i]});
        e.shadow[i] = table[i];
      }
    }
  }
  e.version = v.version;
  e.placed.checked_blocks = -1;
  return &e.placed;
}

std::pair<BlockTableCache::Entry*, bool> BlockTableCache::Find(uint64_t id) {
  const uint64_t key = id >> kChunkBits;
  if (last_chunk_ == nullptr || key != last_key_) {
    last_chunk_ = &chunks_[key];
    last_key_ = key;
  }
  const uint32_t slot = id & ((1u << kChunkBits) - 1);
  return {&last_chunk_->entries[slot], (last_chunk_->present >> slot & 1u) != 0};
}

void BlockTableCache::Clear() {
  chunks_.clear();
  last_chunk_ = nullptr;
  tables_ = 0;
  ClearUpdates();
  used_ = live_ = 0;
}

void BlockTableCache::Resize(int64_t capacity) {
  Clear();
  capacity_ = capacity;
}

bool CheckedKeys(const BlockTableCache::Placed& placed, int32_t num_blocks, int64_t sink_end,
                 int64_t win_begin, int64_t end) {
  if (placed.checked_blocks != num_blocks) return false;
  if (sink_end > placed.checked_sink) return false;
  return win_begin >= end || (win_begin >= placed.checked_from && end <= placed.checked_to);
}

void MarkChecked(BlockTableCache::Placed& placed, int32_t num_blocks, int64_t block_size,
                 int64_t sink_end, int64_t win_begin, int64_t end) {
  placed.checked_blocks = num_blocks;
  placed.checked_sink = sink_end > 0 ? (sink_end + block_size - 1) / block_size * block_size : 0;
  if (win_begin < end) {
    placed.checked_from = win_begin / block_size * block_size;
    placed.checked_to = ((end - 1) / block_size + 1) * block_size;
  } else {
    placed.checked_from = placed.checked_to = 0;
  }
}

}  // namespace moa
