// A CPU decode step's decoder layer in one call: input norm -> q, k, v projections -> attend_step
// (q/k norms, rotation, KV append, attention) -> o_proj -> + residual -> post-attention norm ->
// router logits -> softmax top k (LayerFront::front), then, where the runtime computes them in
// place from RAM, the experts -> + residual (LayerFront::layer); the runtime's cache accounts
// for them after (moe_runtime/layer_front.py).
//
// Why: moe_runtime/decode_layer.py calls the same native ops one by one with Python between
// them: on the peer benchmark's small model (int4 throughout, 2-core EPYC of BENCHMARKS.md) the
// attention took about 130 us a layer outside its kernels, the router 78 and the layer's glue 64,
// where the arithmetic between the weight streams is a few microseconds, and the experts' call
// another 125 around it. Here the Python is one call, and the ops are the same functions on the
// same values in the same order (cpu_gemv.cpp's and cpu_decode_ops.cpp's), so
// the outputs are bit for bit decode_layer.py's path (tested per family and format).

// Compiled inside cpu_decode.cpp, after cpu_gemv.cpp (namespace gemv) and cpu_decode_ops.cpp
// (namespace ops).

namespace {

// Same-shaped projections computed in one kernel call, each with its bias (KernelLinear's ops:
// the product rounded to the rows' dtype, then the bias added). `weights` and `scales` are held
// here: `mats` points into them.
struct Projections {
  std::vector<torch::Tensor> weights, scales;
  std::vector<std::optional<torch::Tensor>> biases;
  gemv::Matrices mats;

  Projections(std::vector<torch::Tensor> weights_, std::vector<torch::Tensor> scales_, int64_t group, int64_t in_features,
              std::vector<std::optional<torch::Tensor>> biases_)
      : weights(std::move(weights_)), scales(std::move(scales_)), biases(std::move(biases_)) {
    TORCH_CHECK(!weights.empty() && biases.size() == weights.size(), "Projections: one bias (or None) per weight");
    mats = gemv::describe(weights, scales, in_features, group);
  }

  // rows [R, K] -> each projection's [R, N] in the rows' dtype.
  std::vector<torch::Tensor> operator()(const torch::Tensor& rows) const {
    const torch::Tensor y = gemv::products_fp32(gemv::float_rows(rows.unsqueeze(0)), mats).to(rows.scalar_type());
    std::vector<torch::Tensor> out;
    for (size_t m = 0; m < biases.size(); ++m) out.push_back(biases[m] ? y[m] + *biases[m] : y[m]);
    return out;
  }
};

// Every routed expert of a layer where it lies in RAM (the runtime's in-place experts), as the
// decode kernel reads them; a step's experts are picked by pointer.
struct Experts {
  std::vector<torch::Tensor> held;  // what the matrices point into
  gemv::Matrices gate_up, down;

  Experts(std::vector<torch::Tensor> gate_up_weights, std::vector<torch::Tensor> gate_up_scales, int64_t gate_up_group, int64_t hidden_size,
          std::vector<torch::Tensor> down_weights, std::vector<torch::Tensor> down_scales, int64_t down_group, int64_t intermediate_size) {
    TORCH_CHECK(!gate_up_weights.empty() && gate_up_weights.size() == down_weights.size(), "Experts: as many down as gate_up matrices");
    gate_up = gemv::describe(gate_up_weights, gate_up_scales, hidden_size, gate_up_group);
    down = gemv::describe(down_weights, down_scales, intermediate_size, down_group);
    for (auto* list : {&gate_up_weights, &gate_up_scales, &down_weights, &down_scales}) held.insert(held.end(), list->begin(), list->end());
  }

  // x [1, R, H], index [k] int64, combine [k] -> [1, R, H] in x's dtype: silu_experts' ops for
  // the experts `index` in that order.
  torch::Tensor operator()(const torch::Tensor& x, const torch::Tensor& index, const torch::Tensor& combine) const {
    const torch::Tensor rows = gemv::float_rows(x);
    const torch::Tensor gated = gemv::silu_gate(gemv::products_fp32(rows, picked(gate_up, index)));
    return gemv::combined(gemv::products_fp32(gated, picked(down, index)), combine).to(x.scalar_type());
  }

  static gemv::Matrices picked(const gemv::Matrices& all, const torch::Tensor& index) {
    gemv::Matrices some = all;
    some.weights.clear();
    some.scales.clear();
    const int64_t* experts = index.data_ptr<int64_t>();
    for (int64_t j = 0; j < index.numel(); ++j) {
      const int64_t e = experts[j];
      TORCH_CHECK(e >= 0 && e < static_cast<int64_t>(all.weights.size()), "Experts: expert ", e, " of ", all.weights.size());
      some.weights.push_back(all.weights[e]);
      if (!all.scales.empty()) some.scales.push_back(all.scales[e]);
    }
    return some;
  }
};

struct Norm {
  torch::Tensor weight;
  double eps;
  bool exact;
};

// One llama-form decoder layer's front half (see the top of the file), its parts as
// decode_layer.py's DecodeLayer finds them; `step` is one token of one sequence.
class LayerFront {
 public:
  LayerFront(Norm input_norm, std::vector<Projections> qkv, int64_t qk_norms, std::optional<torch::Tensor> q_weight,
             std::optional<torch::Tensor> k_weight, double q_eps, double k_eps, bool qk_exact, double clip, double scale, Projections o_proj,
             Norm post_norm, Projections router, int64_t top_k, bool renormalise, bool cast)
      : input_norm_(std::move(input_norm)), qkv_(std::move(qkv)), qk_norms_(qk_norms), q_weight_(std::move(q_weight)), k_weight_(std::move(k_weight)),
        q_eps_(q_eps), k_eps_(k_eps), qk_exact_(qk_exact), clip_(clip), scale_(scale), o_proj_(std::move(o_proj)), post_norm_(std::move(post_norm)),
        router_(std::move(router)), top_k_(top_k), renormalise_(renormalise), cast_(cast) {
    size_t count = 0;
    for (const auto& group : qkv_) count += group.weights.size();
    TORCH_CHECK(count == 3, "LayerFront: the projection groups must give q, k and v");
  }

  // hidden [1, 1, H]; cos, sin [1, 1, D]; keys, values [1, Hk, capacity, D or Dv]: the KV cache's
  // buffers, its first `length` positions the context (kv_append.Room). Returns (hidden after
  // the attention's residual [1, 1, H], the post-attention norm's rows [1, H], the router's
  // top-k weights [1, k] and experts [1, k] int64); the new key and value are written at `length`.
  std::vector<torch::Tensor> front(const torch::Tensor& hidden, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& keys,
                                  const torch::Tensor& values, int64_t length) const {
    TORCH_CHECK(hidden.dim() == 3 && hidden.size(0) == 1 && hidden.size(1) == 1, "LayerFront: one token of one sequence, [1, 1, H]");
    const int64_t H = hidden.size(2);
    const torch::Tensor rows = ops::rms_norm(hidden, input_norm_.weight, input_norm_.eps, input_norm_.exact).reshape({-1, H});
    std::vector<torch::Tensor> qkv;
    for (const auto& group : qkv_)
      for (auto& projected : group(rows)) qkv.push_back(projected.contiguous());
    const torch::Tensor attended = ops::attend_step(qkv[0], qkv[1], qkv[2], qk_norms_, q_weight_, k_weight_, q_eps_, k_eps_, qk_exact_, clip_,
                                                    cos.contiguous(), sin.contiguous(), keys, values, length, scale_);
    const torch::Tensor mid = hidden + o_proj_(attended)[0].reshape({1, 1, -1});
    const torch::Tensor post = ops::rms_norm(mid, post_norm_.weight, post_norm_.eps, post_norm_.exact).reshape({-1, H});
    const std::vector<torch::Tensor> chosen = ops::top_k_softmax(router_(post)[0], top_k_, renormalise_, cast_);
    return {mid, post, chosen[0], chosen[1]};
  }

  // `front`, then `experts` where they lie: (the layer's output [1, 1, H], the top-k weights
  // and experts [1, k]), as decode_layer.py computes it with the runtime's in-place experts.
  std::vector<torch::Tensor> layer(const torch::Tensor& hidden, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& keys,
                                   const torch::Tensor& values, int64_t length, const Experts& experts) const {
    const std::vector<torch::Tensor> parts = front(hidden, cos, sin, keys, values, length);
    const torch::Tensor& post = parts[1];
    const torch::Tensor out = experts(post.unsqueeze(0), parts[3].reshape({-1}), parts[2].reshape({-1}))[0];
    return {parts[0] + out.to(hidden.scalar_type()).view(parts[0].sizes()), parts[2], parts[3]};
  }

 private:
  Norm input_norm_;
  std::vector<Projections> qkv_;
  int64_t qk_norms_;
  std::optional<torch::Tensor> q_weight_, k_weight_;
  double q_eps_, k_eps_;
  bool qk_exact_;
  double clip_, scale_;
  Projections o_proj_;
  Norm post_norm_;
  Projections router_;
  int64_t top_k_;
  bool renormalise_, cast_;
};

}  // namespace

// Its classes in the extension's module.
void bind_decode_layer(pybind11::module_& m) {
  py::class_<Projections>(m, "Projections")
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, int64_t, int64_t, std::vector<std::optional<torch::Tensor>>>(),
           py::arg("weights"), py::arg("scales"), py::arg("group"), py::arg("in_features"), py::arg("biases"))
      .def("__call__", &Projections::operator(), py::arg("rows"), py::call_guard<py::gil_scoped_release>());
  py::class_<Norm>(m, "Norm").def(py::init<torch::Tensor, double, bool>(), py::arg("weight"), py::arg("eps"), py::arg("exact"));
  py::class_<LayerFront>(m, "LayerFront")
      .def(py::init<Norm, std::vector<Projections>, int64_t, std::optional<torch::Tensor>, std::optional<torch::Tensor>, double, double, bool, double,
                    double, Projections, Norm, Projections, int64_t, bool, bool>(),
           py::arg("input_norm"), py::arg("qkv"), py::arg("qk_norms"), py::arg("q_weight"), py::arg("k_weight"), py::arg("q_eps"), py::arg("k_eps"),
           py::arg("qk_exact"), py::arg("clip"), py::arg("scale"), py::arg("o_proj"), py::arg("post_norm"), py::arg("router"), py::arg("top_k"),
           py::arg("renormalise"), py::arg("cast"))
      .def("front", &LayerFront::front, py::arg("hidden"), py::arg("cos"), py::arg("sin"), py::arg("keys"), py::arg("values"), py::arg("length"),
           py::call_guard<py::gil_scoped_release>())
      .def("layer", &LayerFront::layer, py::arg("hidden"), py::arg("cos"), py::arg("sin"), py::arg("keys"), py::arg("values"), py::arg("length"),
           py::arg("experts"), py::call_guard<py::gil_scoped_release>());
  py::class_<Experts>(m, "Experts")
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, int64_t, int64_t, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    int64_t, int64_t>(),
           py::arg("gate_up"), py::arg("gate_up_scales"), py::arg("gate_up_group"), py::arg("hidden_size"), py::arg("down"), py::arg("down_scales"),
           py::arg("down_group"), py::arg("intermediate_size"))
      .def("__call__", &Experts::operator(), py::arg("x"), py::arg("index"), py::arg("combine"), py::call_guard<py::gil_scoped_release>());
}
