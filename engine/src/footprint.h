// footprint.h — what a model costs on a device, per residency choice, and the plan that
// places several models at once. Owner: engine core (residency policy changes only).
// Thread-safety: pure functions (model_footprint reads file headers through a mapping).
//
// A footprint is computed from the spec, the files' headers and the engine config, without
// loading: the same unit layout ModelWeights builds (every tensor aligned to kAlign, matrices
// in the model's matrix format, vectors f32), so it equals what load_model books — a test
// checks footprint == booked ledger bytes for resident and streamed models in every format.
//
// The plan (equal share). Loading one by one, an early model could take the room a later one
// needs just to load. Knowing every model up front, the plan gives each its head, its
// workspace and min(MIN_SLOTS, n_layer) layer slots, keeps kv_room bytes for KV, then deals
// the rest out one slot at a time to the model with the smallest share of its layers on
// device (ties: smaller layer, then name). A model that gets every layer is resident. Copies
// per round do not depend on who holds a slot (a slot of any model saves its own layer's
// bytes once per round), so the equal share costs nothing in bytes copied and starves no
// model's latency for another's.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common.h"
#include "model.h"

namespace lmx {

struct EngineConfig;

// Double buffering: one slot computes while the copy thread fills the other.
constexpr int kMinSlots = 2;

struct ModelFootprint {
    int n_layer = 0;
    DType weights = DType::F32;        // the weight format ("auto" resolved from the files)
    DType matrix_format = DType::F32;  // how units hold matrices (x16 under fast precision)
    uint64_t head_bytes = 0;           // final norm + lm_head: resident whenever the model is loaded
    uint64_t layer_bytes = 0;          // one layer unit = one slot
    uint64_t workspace_bytes = 0;      // activations of one step, booked at load
    uint64_t kv_bytes_per_token = 0;   // every layer's K and V of one position
    uint64_t kv_block_bytes = 0;       // one paged KV block as booked (kv_block_tokens positions)
    int kv_block_tokens = 0;

    uint64_t weight_bytes() const { return head_bytes + static_cast<uint64_t>(n_layer) * layer_bytes; }
    // Weights with n_slots layer slots (>= n_layer: resident), plus the workspace.
    uint64_t device_bytes(int n_slots) const;
};

// Reads the headers of spec.files; throws ModelFileError / UnsupportedError as loading would.
// n_lanes: the backend's scratch lanes (Backend::scratch_lanes; the workspace has one scratch per lane).
ModelFootprint model_footprint(const ModelSpec& spec, const EngineConfig& cfg, int n_lanes);
// Bytes of one K or V element in a KV page: 2 for kv_dtype "f16", else 4. The KV cache books
// blocks of exactly this size, so the footprint, the ledger and admission agree.
int kv_elem_bytes(const EngineConfig& cfg);

// Layer slots per model (n_layer = resident), in the order given; nullopt when the minimums
// plus kv_room_bytes do not fit cap_bytes.
std::optional<std::vector<int>> plan_slots(const std::vector<ModelFootprint>& models,
                                           const std::vector<std::string>& names, uint64_t cap_bytes,
                                           uint64_t kv_room_bytes, int min_slots = kMinSlots);

}  // namespace lmx
