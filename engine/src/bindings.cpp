// bindings.cpp — the Python module engine._core: the Engine, its events and the exception tree.
// Owner: engine core. Every call that can take long (load_model, unload_model,
// shutdown) releases the GIL; the rest are short and lock-bounded.
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

#include "engine.h"
#include "kernels/kernels.h"
#include "membw.h"
#include "threadpool.h"

namespace py = pybind11;
using namespace lmx;

namespace {

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

py::dict info_to_dict(const ModelInfo& i) {
    py::dict d;
    d["name"] = i.name;
    d["n_layer"] = i.n_layer;
    d["n_vocab"] = i.n_vocab;
    d["n_ctx"] = i.n_ctx;
    d["weights"] = i.weights;
    d["matrix_format"] = i.matrix_format;
    d["resident"] = i.resident;
    d["n_slots"] = i.n_slots;
    d["n_units_loaded"] = i.n_units_loaded;
    d["weight_bytes"] = i.weight_bytes;
    d["device_weight_bytes"] = i.device_weight_bytes;
    d["workspace_bytes"] = i.workspace_bytes;
    d["kv_bytes_per_token"] = i.kv_bytes_per_token;
    d["kv_block_bytes"] = i.kv_block_bytes;
    d["sched_weight"] = i.sched_weight;
    d["max_running"] = i.max_running;
    d["n_requests"] = i.n_requests;
    d["eos_token_ids"] = i.eos_ids;
    return d;
}

SamplingParams params_from(float temperature, int top_k, float top_p, float min_p, float repetition_penalty,
                           float presence_penalty, float frequency_penalty, uint64_t seed, int max_tokens,
                           std::vector<int32_t> stop_token_ids) {
    SamplingParams p;
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    p.repetition_penalty = repetition_penalty;
    p.presence_penalty = presence_penalty;
    p.frequency_penalty = frequency_penalty;
    p.seed = seed;
    p.max_tokens = max_tokens;
    p.stop_token_ids = std::move(stop_token_ids);
    return p;
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

    m.def("kernels_isa", &kernels_isa, "SIMD path chosen for this CPU");
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
        .def(py::init([](uint64_t budget_bytes, double cap_fraction, int n_threads, int prefetch_depth,
                         const std::string& eviction, int kv_block_tokens, int max_batch_tokens, int max_seqs_per_step,
                         double kv_reserve_fraction, const std::string& matmul_precision) {
                 EngineConfig c;
                 c.budget_bytes = budget_bytes;
                 c.cap_fraction = cap_fraction;
                 c.n_threads = n_threads;
                 c.prefetch_depth = prefetch_depth;
                 c.eviction = eviction;
                 c.kv_block_tokens = kv_block_tokens;
                 c.max_batch_tokens = max_batch_tokens;
                 c.max_seqs_per_step = max_seqs_per_step;
                 c.kv_reserve_fraction = kv_reserve_fraction;
                 c.matmul_precision = matmul_precision;
                 return std::make_unique<Engine>(c);
             }),
             py::arg("budget_bytes"), py::arg("cap_fraction") = 0.9, py::arg("n_threads") = 0,
             py::arg("prefetch_depth") = 2, py::arg("eviction") = "belady", py::arg("kv_block_tokens") = 16,
             py::arg("max_batch_tokens") = 512, py::arg("max_seqs_per_step") = 64, py::arg("kv_reserve_fraction") = 0.25,
             py::arg("matmul_precision") = "exact")
        .def(
            "load_model",
            [](Engine& e, const py::dict& spec, const std::string& residency, double sched_weight, int max_running,
               int stream_slots, std::function<void(int, int)> progress) {
                ModelSpec s = spec_from_dict(spec);
                ModelLoadOptions o;
                o.residency = residency;
                o.sched_weight = sched_weight;
                o.max_running = max_running;
                o.stream_slots = stream_slots;
                ModelInfo info;
                {
                    py::gil_scoped_release nogil;
                    info = e.load_model(s, o, progress);
                }
                return info_to_dict(info);
            },
            py::arg("spec"), py::arg("residency") = "auto", py::arg("sched_weight") = 1.0, py::arg("max_running") = 64,
            py::arg("stream_slots") = 0, py::arg("progress") = nullptr)
        .def("unload_model", &Engine::unload_model, py::call_guard<py::gil_scoped_release>())
        .def(
            "submit",
            [](Engine& e, int64_t req_id, const std::string& model, std::vector<int32_t> prompt, float temperature,
               int top_k, float top_p, float min_p, float repetition_penalty, float presence_penalty,
               float frequency_penalty, uint64_t seed, int max_tokens, std::vector<int32_t> stop_token_ids,
               bool capture_logits, bool ignore_eos) {
                e.submit(req_id, model, std::move(prompt),
                         params_from(temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                                     frequency_penalty, seed, max_tokens, std::move(stop_token_ids)),
                         capture_logits, ignore_eos);
            },
            py::arg("req_id"), py::arg("model"), py::arg("prompt"), py::arg("temperature") = 1.0f, py::arg("top_k") = 0,
            py::arg("top_p") = 1.0f, py::arg("min_p") = 0.0f, py::arg("repetition_penalty") = 1.0f,
            py::arg("presence_penalty") = 0.0f, py::arg("frequency_penalty") = 0.0f, py::arg("seed") = 0,
            py::arg("max_tokens") = 16, py::arg("stop_token_ids") = std::vector<int32_t>{},
            py::arg("capture_logits") = false, py::arg("ignore_eos") = false)
        .def("cancel", &Engine::cancel)
        .def("event_fd", &Engine::event_fd)
        .def("drain_events",
             [](Engine& e) {
                 std::vector<EngineEvent> evs = e.drain_events();
                 py::list out;
                 for (const EngineEvent& ev : evs)
                     out.append(py::make_tuple(ev.req_id, static_cast<int>(ev.kind), ev.token, ev.index, ev.detail,
                                               ev.prompt_tokens, ev.prefill_ms, ev.decode_ms, ev.n_preempted));
                 return out;
             })
        .def("take_logits",
             [](Engine& e, int64_t req_id) {
                 std::vector<float> v = e.take_logits(req_id);
                 return py::array_t<float>(static_cast<py::ssize_t>(v.size()), v.data());
             })
        .def("ledger",
             [](const Engine& e) {
                 LedgerSnapshot s = e.ledger();
                 py::dict d, owners;
                 d["budget_bytes"] = s.budget_bytes;
                 d["cap_bytes"] = s.cap_bytes;
                 d["used_bytes"] = s.used_bytes;
                 d["headroom_bytes"] = s.headroom_bytes();
                 d["peak_bytes"] = s.peak_bytes;
                 d["n_denied"] = s.n_denied;
                 for (const auto& kv : s.owners) {
                     py::dict o;
                     o["weights_bytes"] = kv.second.weights_bytes;
                     o["kv_bytes"] = kv.second.kv_bytes;
                     o["workspace_bytes"] = kv.second.workspace_bytes;
                     owners[py::str(kv.first)] = o;
                 }
                 d["models"] = owners;
                 return d;
             })
        .def("models",
             [](const Engine& e) {
                 py::list out;
                 for (const ModelInfo& i : e.models()) out.append(info_to_dict(i));
                 return out;
             })
        .def("kv_bytes_for", &Engine::kv_bytes_for)
        .def("stats",
             [](const Engine& e) {
                 EngineStats s = e.stats();
                 py::dict d;
                 d["n_steps"] = s.n_steps;
                 d["n_tokens_computed"] = s.n_tokens_computed;
                 d["n_tokens_generated"] = s.n_tokens_generated;
                 d["n_preemptions"] = s.n_preemptions;
                 d["step_ms_total"] = s.step_ms_total;
                 d["bytes_copied"] = s.residency.bytes_copied;
                 d["n_loads"] = s.residency.n_loads;
                 d["n_hits"] = s.residency.n_hits;
                 d["n_misses"] = s.residency.n_misses;
                 d["copy_wait_ms"] = static_cast<double>(s.residency.wait_ns) / 1e6;
                 return d;
             })
        .def("config",
             [](const Engine& e) {
                 const EngineConfig& c = e.config();
                 py::dict d;
                 d["budget_bytes"] = c.budget_bytes;
                 d["cap_fraction"] = c.cap_fraction;
                 d["n_threads"] = e.n_threads();
                 d["prefetch_depth"] = c.prefetch_depth;
                 d["eviction"] = c.eviction;
                 d["kv_block_tokens"] = c.kv_block_tokens;
                 d["max_batch_tokens"] = c.max_batch_tokens;
                 d["max_seqs_per_step"] = c.max_seqs_per_step;
                 d["kv_reserve_fraction"] = c.kv_reserve_fraction;
                 d["matmul_precision"] = c.matmul_precision;
                 d["isa"] = kernels_isa();
                 return d;
             })
        .def("shutdown", &Engine::shutdown, py::call_guard<py::gil_scoped_release>());
}
