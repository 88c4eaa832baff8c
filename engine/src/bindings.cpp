// bindings.cpp — the Python module engine._core: the engine's types, the Engine, and the exception tree.
// Owner: engine core. Every call that can take long (load_model, unload_model,
// plan_residency, footprint, shutdown) releases the GIL; the rest are short and lock-bounded.
//
// Every struct and enum that crosses is bound as a real type (engine/_core.pyi is generated
// from this module by pybind11-stubgen and checked by tests/test_engine_api.py). A config
// type's keyword defaults are read off a default-constructed C++ struct: each default is
// written once, in the header that declares the field. Enum values are lowercase in Python.
//
// Exception tree (C++ type -> Python class, all in engine._core, re-exported by engine.errors):
//   LayermuxError            lmx::Error
//   ├── ModelFileError       lmx::ModelFileError   corrupt / truncated / inconsistent model files
//   ├── UnsupportedModelError lmx::UnsupportedError valid files asking for what we do not implement
//   ├── InvalidRequestError  lmx::InvalidArgument  a caller's value out of range (also a ValueError)
//   └── CapacityError        lmx::NoSpaceError     a model's bytes cannot be booked (numbers in the message)
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/typing.h>

#include "engine.h"
#include "kernels/kernels.h"
#include "membw.h"
#include "threadpool.h"
#include "vulkan/vk_probe.h"

namespace py = pybind11;
using namespace lmx;

namespace {

// A model spec as engine/hf_config.py builds it (model.h's ModelSpec fields by name).
using SpecDict = py::typing::Dict<py::str, py::object>;

ModelSpec spec_from_dict(const py::dict& d) {
    ModelSpec s;
    s.name = d["name"].cast<std::string>();
    s.arch = d["arch"].cast<std::string>();
    s.n_layer = d["n_layer"].cast<int>();
    s.dim = d["dim"].cast<int>();
    s.n_heads = d["n_heads"].cast<int>();
    s.n_kv_heads = d["n_kv_heads"].cast<int>();
    s.head_dim = d["head_dim"].cast<int>();
    s.ffn_dim = d["ffn_dim"].cast<int>();
    s.n_vocab = d["n_vocab"].cast<int>();
    s.n_ctx = d["n_ctx"].cast<int>();
    s.rms_eps = d["rms_eps"].cast<float>();
    s.tied = d["tied"].cast<bool>();
    s.qkv_bias = d["qkv_bias"].cast<bool>();
    s.rope_inv_freq = d["rope_inv_freq"].cast<std::vector<float>>();
    s.eos_ids = d["eos_ids"].cast<std::vector<int32_t>>();
    s.files = d["files"].cast<std::vector<std::string>>();
    s.weights = d["weights"].cast<std::string>();
    // Gemma 3 / Qwen 3 fields (model.h); optional, absent = Llama behaviour.
    auto opt = [&](const char* key, auto& field) {
        if (d.contains(key)) field = d[key].cast<std::remove_reference_t<decltype(field)>>();
    };
    opt("qk_norm", s.qk_norm);
    opt("post_norms", s.post_norms);
    opt("ffn_act", s.ffn_act);
    opt("norm_weight_offset", s.norm_weight_offset);
    opt("embed_scale", s.embed_scale);
    opt("attn_scale", s.attn_scale);
    opt("final_logit_softcap", s.final_logit_softcap);
    opt("layer_window", s.layer_window);
    opt("rope_inv_freq_local", s.rope_inv_freq_local);
    return s;
}

std::string repr_fields(const char* type, const py::object& self, std::initializer_list<const char*> fields) {
    std::string out = std::string(type) + "(";
    bool first = true;
    for (const char* f : fields) {
        out += (first ? "" : ", ") + std::string(f) + "=" + py::repr(self.attr(f)).cast<std::string>();
        first = false;
    }
    return out + ")";
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "layermux C++ engine (see engine/__init__.py for the Python facade)";

    // Exception classes live as long as the interpreter: created once, never freed.
    auto make = [&](const char* name, PyObject* bases) {
        PyObject* cls = PyErr_NewException((std::string("engine._core.") + name).c_str(), bases, nullptr);
        if (cls == nullptr) throw py::error_already_set();
        m.add_object(name, py::handle(cls));
        return cls;
    };
    static PyObject* base = make("LayermuxError", PyExc_Exception);
    static PyObject* file_err = make("ModelFileError", base);
    static PyObject* unsup = make("UnsupportedModelError", base);
    static PyObject* invalid = make("InvalidRequestError", py::make_tuple(py::handle(base), py::handle(PyExc_ValueError)).release().ptr());
    static PyObject* nospace = make("CapacityError", base);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const NoSpaceError& e) {
            PyErr_SetString(nospace, e.what());
        } catch (const InvalidArgument& e) {
            PyErr_SetString(invalid, e.what());
        } catch (const UnsupportedError& e) {
            PyErr_SetString(unsup, e.what());
        } catch (const ModelFileError& e) {
            PyErr_SetString(file_err, e.what());
        } catch (const Error& e) {
            PyErr_SetString(base, e.what());
        }
    });

    // ---- enums ----
    py::enum_<Eviction>(m, "Eviction", "Which streamed layer a slot gives up: next use farthest (belady) or least recent (lru)")
        .value("belady", Eviction::Belady)
        .value("lru", Eviction::Lru);
    py::enum_<MatmulPrecision>(m, "MatmulPrecision",
                               "exact: bitwise the same tokens on every CPU; fast: bf16 / int8 dot products where the "
                               "CPU has them (not bitwise)")
        .value("exact", MatmulPrecision::Exact)
        .value("fast", MatmulPrecision::Fast);
    py::enum_<ResidencyMode>(m, "ResidencyMode",
                             "auto: resident when it fits next to the KV reserve, else streamed; swap: whole-model "
                             "swapping (the benchmark baseline)")
        .value("auto", ResidencyMode::Auto)
        .value("resident", ResidencyMode::Resident)
        .value("streamed", ResidencyMode::Streamed)
        .value("swap", ResidencyMode::Swap);
    py::enum_<EventKind>(m, "EventKind").value("token", EventKind::Token).value("done", EventKind::Done).value("error", EventKind::Error);
    py::enum_<FinishReason>(m, "FinishReason", "Why a request ended (done events); none on the others")
        .value("none", FinishReason::None)
        .value("stop", FinishReason::Stop)
        .value("length", FinishReason::Length)
        .value("cancelled", FinishReason::Cancelled);
    py::enum_<ErrorCode>(m, "ErrorCode", "Why a request failed (error events); none on the others")
        .value("none", ErrorCode::None)
        .value("kv_exceeds_budget", ErrorCode::KvExceedsBudget)
        .value("model_unloaded", ErrorCode::ModelUnloaded)
        .value("engine_failure", ErrorCode::EngineFailure)
        .value("shutdown", ErrorCode::Shutdown);

    // ---- configuration (read-write, keyword constructors with the C++ defaults) ----
    const EngineConfig dc;
    m.def("vulkan_validation_messages", &vulkan_validation_messages,
          "Vulkan validation-layer messages seen by this process (LMX_VK_VALIDATION=1); tests fail on any");
    py::class_<EngineConfig>(m, "EngineConfig", "Device budget and engine knobs (engine.h)")
        .def(py::init([](uint64_t budget_bytes, double cap_fraction, int n_threads, int prefetch_depth, Eviction eviction,
                         int kv_block_tokens, int max_batch_tokens, int max_seqs_per_step, double kv_reserve_fraction,
                         MatmulPrecision matmul_precision, std::string device_kind, int device_index, double link_gbps,
                         std::string kv_dtype, int max_turn_steps, double max_wait_ms, double first_token_ms) {
                 return EngineConfig{budget_bytes,    cap_fraction,      n_threads,           prefetch_depth, eviction,
                                     kv_block_tokens, max_batch_tokens, max_seqs_per_step, kv_reserve_fraction,
                                     matmul_precision, std::move(device_kind), device_index, link_gbps,
                                     std::move(kv_dtype), max_turn_steps, max_wait_ms, first_token_ms};
             }),
             py::kw_only(), py::arg("budget_bytes") = dc.budget_bytes, py::arg("cap_fraction") = dc.cap_fraction,
             py::arg("n_threads") = dc.n_threads, py::arg("prefetch_depth") = dc.prefetch_depth,
             py::arg("eviction") = dc.eviction, py::arg("kv_block_tokens") = dc.kv_block_tokens,
             py::arg("max_batch_tokens") = dc.max_batch_tokens, py::arg("max_seqs_per_step") = dc.max_seqs_per_step,
             py::arg("kv_reserve_fraction") = dc.kv_reserve_fraction, py::arg("matmul_precision") = dc.matmul_precision,
             py::arg("device_kind") = dc.device_kind, py::arg("device_index") = dc.device_index,
             py::arg("link_gbps") = dc.link_gbps, py::arg("kv_dtype") = dc.kv_dtype,
             py::arg("max_turn_steps") = dc.max_turn_steps, py::arg("max_wait_ms") = dc.max_wait_ms,
             py::arg("first_token_ms") = dc.first_token_ms)
        .def_readwrite("budget_bytes", &EngineConfig::budget_bytes)
        .def_readwrite("cap_fraction", &EngineConfig::cap_fraction)
        .def_readwrite("n_threads", &EngineConfig::n_threads)
        .def_readwrite("prefetch_depth", &EngineConfig::prefetch_depth)
        .def_readwrite("eviction", &EngineConfig::eviction)
        .def_readwrite("kv_block_tokens", &EngineConfig::kv_block_tokens)
        .def_readwrite("max_batch_tokens", &EngineConfig::max_batch_tokens)
        .def_readwrite("max_seqs_per_step", &EngineConfig::max_seqs_per_step)
        .def_readwrite("kv_reserve_fraction", &EngineConfig::kv_reserve_fraction)
        .def_readwrite("matmul_precision", &EngineConfig::matmul_precision)
        .def_readwrite("device_kind", &EngineConfig::device_kind)
        .def_readwrite("device_index", &EngineConfig::device_index)
        .def_readwrite("link_gbps", &EngineConfig::link_gbps)
        .def_readwrite("kv_dtype", &EngineConfig::kv_dtype)
        .def_readwrite("max_turn_steps", &EngineConfig::max_turn_steps)
        .def_readwrite("max_wait_ms", &EngineConfig::max_wait_ms)
        .def_readwrite("first_token_ms", &EngineConfig::first_token_ms)
        .def("__repr__", [](const py::object& self) {
            return repr_fields("EngineConfig", self,
                               {"budget_bytes", "cap_fraction", "n_threads", "prefetch_depth", "eviction", "kv_block_tokens",
                                "max_batch_tokens", "max_seqs_per_step", "kv_reserve_fraction", "matmul_precision",
                                "device_kind", "device_index", "link_gbps", "kv_dtype", "max_turn_steps",
                                "max_wait_ms", "first_token_ms"});
        });

    const SamplingParams dp;
    py::class_<SamplingParams>(m, "SamplingParams", "One request's sampling (sampler.h); temperature 0 = greedy")
        .def(py::init([](float temperature, int32_t top_k, float top_p, float min_p, float repetition_penalty,
                         float presence_penalty, float frequency_penalty, uint64_t seed, int32_t max_tokens,
                         std::vector<int32_t> stop_token_ids, bool ignore_eos) {
                 return SamplingParams{temperature,       top_k, top_p,      min_p,
                                       repetition_penalty, presence_penalty, frequency_penalty,
                                       seed,              max_tokens, std::move(stop_token_ids), ignore_eos};
             }),
             py::kw_only(), py::arg("temperature") = dp.temperature, py::arg("top_k") = dp.top_k,
             py::arg("top_p") = dp.top_p, py::arg("min_p") = dp.min_p,
             py::arg("repetition_penalty") = dp.repetition_penalty, py::arg("presence_penalty") = dp.presence_penalty,
             py::arg("frequency_penalty") = dp.frequency_penalty, py::arg("seed") = dp.seed,
             py::arg("max_tokens") = dp.max_tokens, py::arg("stop_token_ids") = dp.stop_token_ids,
             py::arg("ignore_eos") = dp.ignore_eos)
        .def_readwrite("temperature", &SamplingParams::temperature)
        .def_readwrite("top_k", &SamplingParams::top_k)
        .def_readwrite("top_p", &SamplingParams::top_p)
        .def_readwrite("min_p", &SamplingParams::min_p)
        .def_readwrite("repetition_penalty", &SamplingParams::repetition_penalty)
        .def_readwrite("presence_penalty", &SamplingParams::presence_penalty)
        .def_readwrite("frequency_penalty", &SamplingParams::frequency_penalty)
        .def_readwrite("seed", &SamplingParams::seed)
        .def_readwrite("max_tokens", &SamplingParams::max_tokens)
        .def_readwrite("stop_token_ids", &SamplingParams::stop_token_ids)
        .def_readwrite("ignore_eos", &SamplingParams::ignore_eos)
        .def("__repr__", [](const py::object& self) {
            return repr_fields("SamplingParams", self,
                               {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                "frequency_penalty", "seed", "max_tokens", "stop_token_ids", "ignore_eos"});
        });

    const ModelLoadOptions dl;
    py::class_<ModelLoadOptions>(m, "ModelLoadOptions", "How one model is loaded (engine.h)")
        .def(py::init([](ResidencyMode residency, double sched_weight, int max_running, int stream_slots) {
                 return ModelLoadOptions{residency, sched_weight, max_running, stream_slots};
             }),
             py::kw_only(), py::arg("residency") = dl.residency, py::arg("sched_weight") = dl.sched_weight,
             py::arg("max_running") = dl.max_running, py::arg("stream_slots") = dl.stream_slots)
        .def_readwrite("residency", &ModelLoadOptions::residency)
        .def_readwrite("sched_weight", &ModelLoadOptions::sched_weight)
        .def_readwrite("max_running", &ModelLoadOptions::max_running)
        .def_readwrite("stream_slots", &ModelLoadOptions::stream_slots)
        .def("__repr__", [](const py::object& self) {
            return repr_fields("ModelLoadOptions", self, {"residency", "sched_weight", "max_running", "stream_slots"});
        });

    // ---- results (read-only) ----
    const ModelFootprint df;
    py::class_<ModelFootprint>(m, "ModelFootprint", "A model's device bytes per residency choice (footprint.h)")
        .def(py::init([](int n_layer, uint64_t head_bytes, uint64_t layer_bytes, uint64_t workspace_bytes,
                         uint64_t kv_bytes_per_token, uint64_t kv_block_bytes, int kv_block_tokens) {
                 ModelFootprint f;
                 f.n_layer = n_layer;
                 f.head_bytes = head_bytes;
                 f.layer_bytes = layer_bytes;
                 f.workspace_bytes = workspace_bytes;
                 f.kv_bytes_per_token = kv_bytes_per_token;
                 f.kv_block_bytes = kv_block_bytes;
                 f.kv_block_tokens = kv_block_tokens;
                 return f;
             }),
             "A footprint given by its numbers (what-if planning, tests); engines compute real ones",
             py::kw_only(), py::arg("n_layer"), py::arg("head_bytes"), py::arg("layer_bytes"),
             py::arg("workspace_bytes") = df.workspace_bytes, py::arg("kv_bytes_per_token") = df.kv_bytes_per_token,
             py::arg("kv_block_bytes") = df.kv_block_bytes, py::arg("kv_block_tokens") = df.kv_block_tokens)
        .def_readonly("n_layer", &ModelFootprint::n_layer)
        .def_property_readonly("weights", [](const ModelFootprint& f) { return std::string(dtype_name(f.weights)); })
        .def_property_readonly("matrix_format", [](const ModelFootprint& f) { return std::string(dtype_name(f.matrix_format)); })
        .def_readonly("head_bytes", &ModelFootprint::head_bytes)
        .def_readonly("layer_bytes", &ModelFootprint::layer_bytes)
        .def_readonly("workspace_bytes", &ModelFootprint::workspace_bytes)
        .def_readonly("kv_bytes_per_token", &ModelFootprint::kv_bytes_per_token)
        .def_readonly("kv_block_bytes", &ModelFootprint::kv_block_bytes)
        .def_readonly("kv_block_tokens", &ModelFootprint::kv_block_tokens)
        .def_property_readonly("weight_bytes", &ModelFootprint::weight_bytes)
        .def("device_bytes", &ModelFootprint::device_bytes, py::arg("n_slots"),
             "Weights with n_slots layer slots (>= n_layer: resident), plus the workspace")
        .def("__repr__", [](const py::object& self) {
            return repr_fields("ModelFootprint", self,
                               {"n_layer", "weights", "matrix_format", "head_bytes", "layer_bytes", "workspace_bytes",
                                "kv_bytes_per_token", "kv_block_bytes", "kv_block_tokens"});
        });

    py::class_<ModelPlacement>(m, "ModelPlacement", "One model's place in a residency plan")
        .def_readonly("name", &ModelPlacement::name)
        .def_readonly("residency", &ModelPlacement::residency)
        .def_readonly("n_slots", &ModelPlacement::n_slots)
        .def_readonly("device_bytes", &ModelPlacement::device_bytes)
        .def("__repr__", [](const py::object& self) {
            return repr_fields("ModelPlacement", self, {"name", "residency", "n_slots", "device_bytes"});
        });

    py::class_<ModelInfo>(m, "ModelInfo", "A loaded model (engine.h)")
        .def_readonly("name", &ModelInfo::name)
        .def_readonly("id", &ModelInfo::id, "the engine's number for the model (the step trace names models by it)")
        .def_readonly("n_layer", &ModelInfo::n_layer)
        .def_readonly("n_vocab", &ModelInfo::n_vocab)
        .def_readonly("n_ctx", &ModelInfo::n_ctx)
        .def_property_readonly("weights", [](const ModelInfo& i) { return std::string(dtype_name(i.weights)); })
        .def_property_readonly("matrix_format", [](const ModelInfo& i) { return std::string(dtype_name(i.matrix_format)); })
        .def_readonly("resident", &ModelInfo::resident)
        .def_readonly("n_slots", &ModelInfo::n_slots)
        .def_readonly("n_units_loaded", &ModelInfo::n_units_loaded)
        .def_readonly("weight_bytes", &ModelInfo::weight_bytes)
        .def_readonly("device_weight_bytes", &ModelInfo::device_weight_bytes)
        .def_readonly("workspace_bytes", &ModelInfo::workspace_bytes)
        .def_readonly("footprint", &ModelInfo::footprint)
        .def_readonly("sched_weight", &ModelInfo::sched_weight)
        .def_readonly("max_running", &ModelInfo::max_running)
        .def_readonly("n_requests", &ModelInfo::n_requests)
        .def_readonly("eos_token_ids", &ModelInfo::eos_ids)
        .def("__repr__", [](const py::object& self) {
            return repr_fields("ModelInfo", self,
                               {"name", "n_layer", "n_vocab", "n_ctx", "weights", "matrix_format", "resident", "n_slots",
                                "weight_bytes", "device_weight_bytes", "workspace_bytes"});
        });

    py::class_<EngineEvent>(m, "EngineEvent", "One token, or the one terminal event (done / error) of a request")
        .def_readonly("req_id", &EngineEvent::req_id)
        .def_readonly("kind", &EngineEvent::kind)
        .def_readonly("token_id", &EngineEvent::token)
        .def_readonly("index", &EngineEvent::index, "generation index of token_id")
        .def_readonly("finish_reason", &EngineEvent::finish_reason)
        .def_readonly("error_code", &EngineEvent::error_code)
        .def_readonly("message", &EngineEvent::message)
        .def_readonly("prompt_tokens", &EngineEvent::prompt_tokens)
        .def_readonly("prefill_ms", &EngineEvent::prefill_ms)
        .def_readonly("decode_ms", &EngineEvent::decode_ms)
        .def_readonly("n_preempted", &EngineEvent::n_preempted)
        .def("__repr__", [](const py::object& self) {
            return repr_fields("EngineEvent", self,
                               {"req_id", "kind", "token_id", "index", "finish_reason", "error_code", "message"});
        });

    py::class_<OwnerUsage>(m, "OwnerUsage", "One model's bookings, and the KV it could ever hold")
        .def_readonly("weights_bytes", &OwnerUsage::weights_bytes)
        .def_readonly("kv_bytes", &OwnerUsage::kv_bytes)
        .def_readonly("workspace_bytes", &OwnerUsage::workspace_bytes)
        .def_readonly("kv_capacity_blocks", &OwnerUsage::kv_capacity_blocks)
        .def_readonly("kv_capacity_tokens", &OwnerUsage::kv_capacity_tokens)
        .def_property_readonly("total_bytes", &OwnerUsage::total);
    py::class_<LedgerSnapshot>(m, "LedgerSnapshot", "The ledger's figures at one moment (ledger.h)")
        .def_readonly("budget_bytes", &LedgerSnapshot::budget_bytes)
        .def_readonly("cap_bytes", &LedgerSnapshot::cap_bytes)
        .def_readonly("used_bytes", &LedgerSnapshot::used_bytes)
        .def_readonly("peak_bytes", &LedgerSnapshot::peak_bytes)
        .def_readonly("n_denied", &LedgerSnapshot::n_denied)
        .def_readonly("kv_capacity_bytes", &LedgerSnapshot::kv_capacity_bytes)
        .def_property_readonly("headroom_bytes", &LedgerSnapshot::headroom_bytes)
        .def_readonly("models", &LedgerSnapshot::owners);

    py::class_<ResidencyStats>(m, "ResidencyStats")
        .def_readonly("bytes_copied", &ResidencyStats::bytes_copied)
        .def_readonly("n_loads", &ResidencyStats::n_loads)
        .def_readonly("n_hits", &ResidencyStats::n_hits)
        .def_readonly("n_misses", &ResidencyStats::n_misses)
        .def_property_readonly("copy_wait_ms", [](const ResidencyStats& r) { return static_cast<double>(r.wait_ns) / 1e6; })
        .def_property_readonly("copy_ms", [](const ResidencyStats& r) { return static_cast<double>(r.copy_ns) / 1e6; });
    py::class_<EngineStats>(m, "EngineStats")
        .def_readonly("n_steps", &EngineStats::n_steps)
        .def_readonly("n_tokens_computed", &EngineStats::n_tokens_computed)
        .def_readonly("n_tokens_generated", &EngineStats::n_tokens_generated)
        .def_readonly("n_preemptions", &EngineStats::n_preemptions)
        .def_readonly("n_turns", &EngineStats::n_turns)
        .def_readonly("n_borrow_turns", &EngineStats::n_borrow_turns)
        .def_readonly("step_ms_total", &EngineStats::step_ms_total)
        .def_readonly("residency", &EngineStats::residency);
    py::class_<StepTrace>(m, "StepTrace", "One engine step, as the trace recorded it (trace.h); times in steady-clock us")
        .def_readonly("index", &StepTrace::index, "steps the engine ran before this one")
        .def_readonly("model", &StepTrace::model, "the model's id (ModelInfo.id)")
        .def_readonly("start_us", &StepTrace::start_us)
        .def_readonly("end_us", &StepTrace::end_us)
        .def_readonly("n_seqs", &StepTrace::n_seqs)
        .def_readonly("n_tokens", &StepTrace::n_tokens, "tokens computed: prefill chunks and decode tokens")
        .def_readonly("n_generated", &StepTrace::n_generated, "tokens sampled")
        .def_readonly("n_units_copied", &StepTrace::n_units_copied,
                      "units whose copy landed since the previous step ended, any model's")
        .def_readonly("bytes_copied", &StepTrace::bytes_copied)
        .def_readonly("copy_wait_us", &StepTrace::copy_wait_us,
                      "time this step blocked on copies (a GPU: as the device measured it)")
        .def_readonly("new_turn", &StepTrace::new_turn, "the first step of a scheduler turn")
        .def_readonly("borrowed", &StepTrace::borrowed, "adaptive turns: it ran on slots borrowed from other models");
    py::class_<CopyTrace>(m, "CopyTrace", "One copy into device memory: a layer, or a whole-model swap-in (unit -1)")
        .def_readonly("model", &CopyTrace::model)
        .def_readonly("unit", &CopyTrace::unit)
        .def_readonly("n_units", &CopyTrace::n_units)
        .def_readonly("n_bytes", &CopyTrace::n_bytes)
        .def_readonly("start_us", &CopyTrace::start_us)
        .def_readonly("end_us", &CopyTrace::end_us);
    py::class_<WaitTrace>(m, "WaitTrace", "One time compute blocked on a copy (unit -1: a whole-model swap)")
        .def_readonly("model", &WaitTrace::model)
        .def_readonly("unit", &WaitTrace::unit)
        .def_readonly("start_us", &WaitTrace::start_us)
        .def_readonly("end_us", &WaitTrace::end_us);
    py::class_<Trace>(m, "Trace", "What the step trace recorded since it was enabled or last taken")
        .def_readonly("steps", &Trace::steps)
        .def_readonly("copies", &Trace::copies)
        .def_readonly("waits", &Trace::waits)
        .def_readonly("n_dropped", &Trace::n_dropped, "records dropped because a ring was full");
    py::class_<EngineHealth>(m, "EngineHealth", "Liveness of the step thread (engine.h)")
        .def_readonly("n_loops", &EngineHealth::n_loops)
        .def_readonly("busy", &EngineHealth::busy)
        .def_readonly("since_loop_s", &EngineHealth::since_loop_s)
        .def_readonly("device_fault", &EngineHealth::device_fault);

    m.attr("MIN_SLOTS") = kMinSlots;
    m.def(
        "plan_slots",
        [](const std::map<std::string, ModelFootprint>& models, uint64_t cap_bytes, uint64_t kv_room_bytes,
           int min_slots) -> std::optional<std::map<std::string, int>> {
            if (min_slots < 1) throw InvalidArgument("min_slots: expected >= 1, found " + std::to_string(min_slots));
            std::vector<ModelFootprint> fps;
            std::vector<std::string> names;
            for (const auto& kv : models) {
                names.push_back(kv.first);
                fps.push_back(kv.second);
            }
            const auto slots = plan_slots(fps, names, cap_bytes, kv_room_bytes, min_slots);
            if (!slots) return std::nullopt;
            std::map<std::string, int> out;
            for (size_t i = 0; i < names.size(); i++) out[names[i]] = (*slots)[i];
            return out;
        },
        py::arg("models"), py::arg("cap_bytes"), py::arg("kv_room_bytes"), py::arg("min_slots") = kMinSlots,
        "The equal-share plan (footprint.h): layer slots per model (n_layer = resident), or None when the "
        "minimums plus kv_room_bytes do not fit cap_bytes");
    m.def("kernels_isa", &kernels_isa, "SIMD path chosen for this CPU");
    m.def("trace_now_us", &trace_now_us, "The step trace's clock now: steady-clock microseconds (Engine.trace_take)");
    m.def(
        "dequantize",
        [](const std::string& format, py::bytes data, int64_t n) {
            // One row of n values stored in `format` (dtype_name spelling: "q4_1", "q6_k", ...)
            // as the engine reads it: the tests compare it with the gguf package's dequantize.
            DType t = DType::F32;
            bool found = false;
            for (int i = 0; i <= static_cast<int>(DType::Q6_K); ++i)
                if (format == dtype_name(static_cast<DType>(i))) t = static_cast<DType>(i), found = true;
            const std::string buf = data;
            if (!found || dtype_is_x16(t) || n <= 0 || n % dtype_block_elems(t) != 0 ||
                static_cast<int64_t>(buf.size()) != row_bytes(t, n))
                throw InvalidArgument("dequantize: expected a row format name and n values in whole blocks of its "
                                      "bytes, found '" + format + "', n=" + std::to_string(n) + ", " +
                                      std::to_string(buf.size()) + " bytes");
            py::array_t<float> out(static_cast<py::ssize_t>(n));
            dequantize_row(WeightView{buf.data(), t, 1, n}, 0, out.mutable_data());
            return out;
        },
        py::arg("format"), py::arg("data"), py::arg("n"), "One row of a weight format dequantised to float32");
    m.def(
        "read_bandwidth_gbs",
        [](size_t n_bytes, int n_threads, int repeats) {
            py::gil_scoped_release nogil;
            ThreadPool pool(n_threads);
            return read_bandwidth_gbs(pool, n_bytes, repeats);
        },
        py::arg("n_bytes") = size_t{1} << 30, py::arg("n_threads") = 0, py::arg("repeats") = 5,
        "Best streaming-read GB/s over n_threads (0 = one per core), laid out as the device arena is");

    py::class_<Engine>(m, "Engine")
        .def(py::init<const EngineConfig&>(), py::arg("config"))
        .def(
            "load_model",
            [](Engine& e, const SpecDict& spec, const ModelLoadOptions& opt,
               const std::optional<std::function<void(int, int)>>& progress) {
                ModelSpec s = spec_from_dict(spec);
                py::gil_scoped_release nogil;
                return e.load_model(s, opt, progress ? *progress : LoadProgress{});
            },
            py::arg("spec"), py::arg("options"), py::arg("progress") = py::none())
        .def("unload_model", &Engine::unload_model, py::arg("name"), py::call_guard<py::gil_scoped_release>())
        .def(
            "footprint",
            [](const Engine& e, const SpecDict& spec) {
                ModelSpec s = spec_from_dict(spec);
                py::gil_scoped_release nogil;
                return e.footprint(s);
            },
            py::arg("spec"), "What the model would cost here, from its file headers alone (nothing is loaded)")
        .def(
            "plan_residency",
            [](const Engine& e, const std::vector<SpecDict>& specs) {
                std::vector<ModelSpec> ss;
                for (const SpecDict& d : specs) ss.push_back(spec_from_dict(d));
                py::gil_scoped_release nogil;
                return e.plan_residency(ss);
            },
            py::arg("specs"), "One equal-share plan for the models, against the headroom now; None when their minimums do not fit")
        .def("submit", &Engine::submit, py::arg("req_id"), py::arg("model"), py::arg("prompt"), py::arg("params"),
             py::arg("capture_logits") = false)
        .def("cancel", &Engine::cancel, py::arg("req_id"))
        .def("event_fd", &Engine::event_fd)
        .def("drain_events", &Engine::drain_events)
        .def("take_logits",
             [](Engine& e, int64_t req_id) {
                 std::vector<float> v = e.take_logits(req_id);
                 return py::array_t<float>(static_cast<py::ssize_t>(v.size()), v.data());
             }, py::arg("req_id"))
        .def("ledger", &Engine::ledger)
        .def("device_summary", &Engine::device_summary, "the device's kind; for a GPU its name, driver, heap")
        .def("models", &Engine::models)
        .def("kv_bytes_for", &Engine::kv_bytes_for, py::arg("model"), py::arg("n_tokens"))
        .def("stats", &Engine::stats)
        .def("health", &Engine::health)
        .def("trace_enable", &Engine::trace_enable, py::arg("capacity"),
             "Record the step trace, keeping at most capacity steps, copies and waits each (0: stop); "
             "discards what was recorded")
        .def("trace_take", &Engine::trace_take, "What the trace recorded since enabled or last taken; empties it")
        .def("debug_stall", &Engine::debug_stall, py::arg("on"), "Test hook: block (True) or release the step thread")
        .def("config", &Engine::config, py::return_value_policy::copy)
        .def("n_threads", &Engine::n_threads)
        .def("shutdown", &Engine::shutdown, py::call_guard<py::gil_scoped_release>());
}
