// kv_cache.h — paged KV storage of one model: fixed-size blocks booked in the ledger.
// Owner: engine core; only the step thread (scheduler + forward) calls it.
// Thread-safety: NOT thread-safe; the ledger it books from is.
//
// A block holds block_tokens positions of every layer: [n_layer][2 (K,V)][block_tokens][kv_dim] elements,
// each elem_bytes wide: 4 (f32) or 2 (f16, EngineConfig.kv_dtype); KvGeometry counts in elements.
// A sequence owns a block table (block ids); position p is in table[p / block_tokens].
// Blocks are booked one at a time and released as soon as a sequence finishes or
// is preempted, so a paused sequence holds zero device bytes and an idle model's
// KV usage in the ledger is exactly zero.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backend.h"
#include "common.h"
#include "ledger.h"

namespace lmx {

class KvCache {
public:
    KvCache(Ledger& ledger, std::string owner, int n_layer, int kv_dim, int block_tokens, int elem_bytes = 4);
    ~KvCache();
    KvCache(const KvCache&) = delete;
    KvCache& operator=(const KvCache&) = delete;

    int block_tokens() const { return block_tokens_; }
    uint64_t block_bytes() const { return block_bytes_; }
    // Device bytes of KV for n_tokens positions (whole blocks).
    uint64_t bytes_for(int64_t n_tokens) const;

    // Grows table to cover n_tokens positions. NoSpace leaves table as it was.
    BookResult reserve(std::vector<int32_t>& table, int64_t n_tokens);
    void release(std::vector<int32_t>& table);  // frees every block; table emptied

    // Where a block's rows are, for the backend's KV ops (KvGeometry in backend.h):
    // block_start(b) + layer * layer_stride is layer's K, v_offset further its V.
    KvGeometry geometry() const {
        return KvGeometry{block_tokens_, kv_dim_, static_cast<int64_t>(2) * block_tokens_ * kv_dim_,
                          static_cast<int64_t>(block_tokens_) * kv_dim_, elem_bytes_ == 2, n_layer_};
    }
    // A block's device address (its rows are elem_bytes wide; typed float* as the backend's StepSeq is).
    float* block_start(int32_t block) { return reinterpret_cast<float*>(blocks_[static_cast<size_t>(block)].ptr); }
    int elem_bytes() const { return elem_bytes_; }
    int64_t n_blocks_in_use() const { return n_in_use_; }

private:
    Ledger& ledger_;
    std::string owner_;
    int n_layer_, kv_dim_, block_tokens_, elem_bytes_;
    uint64_t block_bytes_;
    std::vector<DeviceBuffer> blocks_;  // by block id; empty entries are free ids
    std::vector<int32_t> free_ids_;
    int64_t n_in_use_ = 0;
};

}  // namespace lmx
