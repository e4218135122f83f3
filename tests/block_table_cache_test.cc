// The host side of the device block-table cache (kernels/block_table_cache.h): a simulated
// arena that applies the queued updates must always hold, at every placed table's entries, what
// the kernels may read (every entry that is not -1), while only changed entries are sent.
#include "kernels/block_table_cache.h"

#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace moa {
namespace {

// The arena as the device holds it: updates applied in queue order.
struct Arena {
  std::vector<int32_t> data;
  explicit Arena(int64_t n) : data(n, -7) {}
  void Apply(BlockTableCache& c) {
    for (const BlockTableCache::Update& u : c.updates()) {
      ASSERT_LT(u.index, data.size());
      data[u.index] = u.value;
    }
    c.ClearUpdates();
  }
  // Every entry a kernel may read (>= 0) is in the arena at the placed position.
  void ExpectHolds(const BlockTableCache::Placed& p, const std::vector<int32_t>& table) {
    ASSERT_EQ(p.len, static_cast<int32_t>(table.size()));
    for (size_t i = 0; i < table.size(); ++i) {
      if (table[i] >= 0) {
        EXPECT_EQ(data[p.begin + i], table[i]) << "entry " << i;
      }
    }
  }
};

TEST(BlockTableCache, SendsOnlyWhatChanged) {
  BlockTableCache cache(1000);
  Arena arena(1000);
  std::vector<int32_t> t = {5, 6, 7};
  BlockTableCache::Placed* p = cache.Place(t, {42, 1});
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(cache.updates().size(), 3u);
  arena.Apply(cache);
  arena.ExpectHolds(*p, t);

  // Same version: nothing sent, same place.
  const int64_t begin = p->begin;
  p = cache.Place(t, {42, 1});
  EXPECT_EQ(p->begin, begin);
  EXPECT_TRUE(cache.updates().empty());

  // A block appended and one freed: only the new one travels.
  t = {-1, 6, 7, 8};
  p = cache.Place(t, {42, 2});
  EXPECT_EQ(p->begin, begin);
  ASSERT_EQ(cache.updates().size(), 1u);
  EXPECT_EQ(cache.updates()[0].value, 8);
  arena.Apply(cache);
  arena.ExpectHolds(*p, t);

  // Another table of its own.
  std::vector<int32_t> u = {1, 2};
  BlockTableCache::Placed* q = cache.Place(u, {43, 1});
  ASSERT_NE(q, nullptr);
  EXPECT_NE(q->begin, begin);
  arena.Apply(cache);
  arena.ExpectHolds(*q, u);
  arena.ExpectHolds(*cache.Place(t, {42, 2}), t);
}

TEST(BlockTableCache, MovesATableThatOutgrowsItsRoom) {
  BlockTableCache cache(10000);
  Arena arena(10000);
  std::vector<int32_t> t(3);
  for (int i = 0; i < 3; ++i) t[i] = i;
  BlockTableCache::Placed* p = cache.Place(t, {1, 1});
  const int64_t first = p->begin;
  arena.Apply(cache);
  // Room was 16: the 17th entry moves the table, and all of it is sent again.
  for (int i = 3; i < 17; ++i) t.push_back(i);
  p = cache.Place(t, {1, 2});
  ASSERT_NE(p, nullptr);
  EXPECT_NE(p->begin, first);
  EXPECT_EQ(cache.updates().size(), 17u);
  arena.Apply(cache);
  arena.ExpectHolds(*p, t);
  EXPECT_EQ(cache.in_use(), 34);  // 2 x 17 entries of room
  EXPECT_EQ(cache.used(), 16 + 34);
}

TEST(BlockTableCache, TablesWithoutIdentityAreSentInFull) {
  BlockTableCache cache(100);
  Arena arena(100);
  const std::vector<int32_t> t = {3, -1, 4};
  BlockTableCache::Placed* a = cache.Place(t, {});
  BlockTableCache::Placed* b = cache.Place(t, {});
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_NE(a->begin, b->begin);
  EXPECT_EQ(cache.updates().size(), 4u);  // -1 is never sent
  EXPECT_EQ(cache.in_use(), 6);
  arena.Apply(cache);
  EXPECT_EQ(cache.in_use(), 0);  // their call is over
}

TEST(BlockTableCache, FullArenaRefusesUntilCleared) {
  BlockTableCache cache(40);
  const std::vector<int32_t> t(10, 1);
  ASSERT_NE(cache.Place(t, {1, 1}), nullptr);  // room 20
  ASSERT_NE(cache.Place(t, {2, 1}), nullptr);  // room 20: full
  EXPECT_EQ(cache.Place(t, {3, 1}), nullptr);
  EXPECT_EQ(cache.shortfall(), 20);
  EXPECT_EQ(cache.tables(), 2);
  cache.Clear();
  EXPECT_EQ(cache.tables(), 0);
  EXPECT_EQ(cache.used(), 0);
  EXPECT_TRUE(cache.updates().empty());
  ASSERT_NE(cache.Place(t, {3, 1}), nullptr);
  EXPECT_EQ(cache.updates().size(), 10u);
  cache.Resize(5);
  EXPECT_EQ(cache.capacity(), 5);
  EXPECT_EQ(cache.Place(t, {3, 1}), nullptr);
}

TEST(BlockTableCache, CheckedKeysLastUntilTheVersionChanges) {
  BlockTableCache cache(100);
  const std::vector<int32_t> t = {0, 1, 2, 3};
  BlockTableCache::Placed* p = cache.Place(t, {9, 1});
  EXPECT_FALSE(CheckedKeys(*p, 50, 4, 10, 30));
  // Sink [0, 3) and window [10, 30) of blocks of 8: blocks 0 and 1..3 were checked, so keys
  // [0, 8) and [8, 32) are known backed.
  MarkChecked(*p, 50, 8, 3, 10, 30);
  EXPECT_TRUE(CheckedKeys(*p, 50, 3, 10, 30));
  EXPECT_TRUE(CheckedKeys(*p, 50, 8, 12, 32));   // the next positions of the same blocks
  EXPECT_FALSE(CheckedKeys(*p, 50, 9, 12, 32));  // a sink past the checked block
  EXPECT_FALSE(CheckedKeys(*p, 50, 3, 12, 33));  // a key in a block not checked
  EXPECT_FALSE(CheckedKeys(*p, 40, 3, 10, 30));  // another pool size
  EXPECT_TRUE(CheckedKeys(*p, 50, 0, 20, 20));   // nothing to see
  p = cache.Place(t, {9, 2});
  EXPECT_FALSE(CheckedKeys(*p, 50, 3, 10, 30));  // a new version is checked again
}

// Random growth, frees and moves of many tables, with the arena checked after every round.
TEST(BlockTableCache, RandomHistoryKeepsTheArenaRight) {
  std::mt19937 rng(7);
  BlockTableCache cache(1 << 14);
  Arena arena(1 << 14);
  std::vector<std::vector<int32_t>> tables(40);
  std::vector<uint64_t> version(40, 0);
  for (int round = 0; round < 300; ++round) {
    for (size_t i = 0; i < tables.size(); ++i) {
      std::vector<int32_t>& t = tables[i];
      switch (rng() % 4) {
        case 0:
          t.push_back(static_cast<int32_t>(rng() % 1000));
          ++version[i];
          break;
        case 1:
          if (!t.empty()) {
            t[rng() % t.size()] = -1;
            ++version[i];
          }
          break;
        default:
          break;
      }
      BlockTableCache::Placed* p = cache.Place(t, {100 + i, version[i]});
      if (p == nullptr) {
        cache.Clear();
        p = cache.Place(t, {100 + i, version[i]});
      }
      ASSERT_NE(p, nullptr);
      arena.Apply(cache);
      arena.ExpectHolds(*p, t);
    }
  }
}

}  // namespace
}  // namespace moa
