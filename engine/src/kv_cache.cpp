// kv_cache.cpp — block booking and release for one model's paged KV.
// Owner: engine core. Thread-safety: step thread only (see kv_cache.h).
#include "kv_cache.h"

#include <cassert>

namespace lmx {

KvCache::KvCache(Ledger& ledger, std::string owner, int n_layer, int kv_dim, int block_tokens, int elem_bytes)
    : ledger_(ledger), owner_(std::move(owner)), n_layer_(n_layer), kv_dim_(kv_dim), block_tokens_(block_tokens),
      elem_bytes_(elem_bytes) {
    if (block_tokens <= 0) throw InvalidArgument("kv_block_tokens: expected > 0, found " + std::to_string(block_tokens));
    assert(elem_bytes == 2 || elem_bytes == 4);
    block_bytes_ = static_cast<uint64_t>(n_layer) * 2 * static_cast<uint64_t>(block_tokens) *
                   static_cast<uint64_t>(kv_dim) * static_cast<uint64_t>(elem_bytes);
}

KvCache::~KvCache() {
    for (DeviceBuffer& b : blocks_) ledger_.free(b);
}

uint64_t KvCache::bytes_for(int64_t n_tokens) const {
    const int64_t n_blocks = (n_tokens + block_tokens_ - 1) / block_tokens_;
    return static_cast<uint64_t>(n_blocks) * align_up(block_bytes_, kAlign);
}

BookResult KvCache::reserve(std::vector<int32_t>& table, int64_t n_tokens) {
    const size_t need = static_cast<size_t>((n_tokens + block_tokens_ - 1) / block_tokens_);
    const size_t had = table.size();
    while (table.size() < need) {
        DeviceBuffer buf = ledger_.alloc(owner_, BookKind::Kv, block_bytes_);
        if (!buf) {  // undo this call's partial growth: all or nothing
            while (table.size() > had) {
                const int32_t id = table.back();
                table.pop_back();
                ledger_.free(blocks_[static_cast<size_t>(id)]);
                free_ids_.push_back(id);
                n_in_use_--;
            }
            return BookResult::NoSpace;
        }
        int32_t id;
        if (!free_ids_.empty()) {
            id = free_ids_.back();
            free_ids_.pop_back();
            blocks_[static_cast<size_t>(id)] = buf;
        } else {
            id = static_cast<int32_t>(blocks_.size());
            blocks_.push_back(buf);
        }
        table.push_back(id);
        n_in_use_++;
    }
    return BookResult::Ok;
}

void KvCache::release(std::vector<int32_t>& table) {
    for (int32_t id : table) {
        assert(blocks_[static_cast<size_t>(id)]);
        ledger_.free(blocks_[static_cast<size_t>(id)]);
        free_ids_.push_back(id);
        n_in_use_--;
    }
    table.clear();
}

}  // namespace lmx
