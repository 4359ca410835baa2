// The counting passes of next-use's reuse-model fit (next_use.ReuseModel.fit), compiled: the
// adaptive default refits its learning candidate on the routing it serves, and numpy's passes
// over a history of 2048 tokens x 1664 experts took about half a second on the 2-core EPYC of
// BENCHMARKS.md, which allowed a refit only every thousand tokens or so. Every count here is an
// integer and every forecast the same fp32 value as numpy's (summed over the token's K experts
// in order, then divided), so the model fitted from them is the numpy fit's bit for bit (tested).
// Compiled into the candidates' extension (candidates.cpp includes this file).

#include <algorithm>
#include <cstdint>
#include <vector>

namespace reuse_fit {

// A routing history [T, L, K] of expert ids, read once per fit into ints, with a flag on each id that
// repeats an earlier one of its row (a token uses an expert once, as numpy's bool matrix has it).
struct Routing {
  int64_t tokens, layers, top_k, experts;
  std::vector<int64_t> ids;  // [T * L * K]
  std::vector<uint8_t> first;  // [T * L * K]: not a repeat within its row

  Routing(const torch::Tensor& expert_ids, int64_t num_experts)
      : tokens(expert_ids.size(0)), layers(expert_ids.size(1)), top_k(expert_ids.size(2)), experts(num_experts) {
    ids = copy_of<int64_t>(expert_ids.to(torch::kInt64));
    first.assign(ids.size(), 1);
    for (size_t row = 0; row < ids.size(); row += top_k)
      for (int64_t k = 1; k < top_k; ++k) first[row + k] = first_of_its_value(ids.data() + row, k);
  }

  int64_t keys() const { return layers * experts; }
  int64_t at(int64_t token, int64_t layer) const { return (token * layers + layer) * top_k; }

  // Calls visit(key) for each distinct key (layer * E + expert) token `token` used.
  template <typename Visit>
  void each_used(int64_t token, Visit visit) const {
    for (int64_t layer = 0; layer < layers; ++layer)
      for (int64_t index = at(token, layer), end = index + top_k; index < end; ++index)
        if (first[index]) visit(layer * experts + ids[index]);
  }

  // P(expert next | the token's experts) at `layer`: the mean over its K experts of their rows
  // of `transitions` [L, E, E], in fp32 (numpy's mean over the K axis of a float32 array).
  void forecast(const float* transitions, int64_t token, int64_t layer, float* out) const {
    mean_of_rows(transitions + layer * experts * experts, experts, ids.data() + at(token, layer), top_k, 0, out);
  }
};

// [L * E] tokens that used each key.
torch::Tensor use_counts(const Routing& routing) {
  torch::Tensor counts = torch::zeros({routing.keys()}, torch::kInt64);
  int64_t* out = counts.data_ptr<int64_t>();
  for (int64_t token = 0; token < routing.tokens; ++token) routing.each_used(token, [out](int64_t key) { ++out[key]; });
  return counts;
}

// ([L, E, E] tokens using e at a layer whose next token (same sequence) uses e' there,
//  [L, E] tokens using e at a layer that have a next token), as doubles.
std::tuple<torch::Tensor, torch::Tensor> transition_counts(const Routing& routing, const torch::Tensor& seq_offsets) {
  const int64_t experts = routing.experts, top_k = routing.top_k;
  torch::Tensor counts = torch::zeros({routing.layers, experts, experts}, torch::kFloat64);
  torch::Tensor seen = torch::zeros({routing.layers, experts}, torch::kFloat64);
  double* pairs = counts.data_ptr<double>();
  double* from = seen.data_ptr<double>();
  const std::vector<int64_t> bounds = copy_of<int64_t>(seq_offsets.to(torch::kInt64));
  for (size_t s = 0; s + 1 < bounds.size(); ++s) {
    for (int64_t token = bounds[s]; token + 1 < bounds[s + 1]; ++token) {
      for (int64_t layer = 0; layer < routing.layers; ++layer) {
        const int64_t now = routing.at(token, layer), next = routing.at(token + 1, layer);
        for (int64_t i = now; i < now + top_k; ++i) {
          if (!routing.first[i]) continue;
          const int64_t key = layer * experts + routing.ids[i];
          from[key] += 1.0;
          for (int64_t j = next; j < next + top_k; ++j)
            if (routing.first[j]) pairs[key * experts + routing.ids[j]] += 1.0;
        }
      }
    }
  }
  return {counts, seen};
}

// [T, L * E] the transition forecast of every (token, key): P(the key's expert at the next
// token | the experts the token used at its layer), as next_use.transition_forecast gives it.
torch::Tensor transition_forecasts(const Routing& routing, const torch::Tensor& transitions) {
  const torch::Tensor table = transitions.to(torch::kFloat32).contiguous();
  torch::Tensor forecasts = torch::empty({routing.tokens, routing.keys()}, torch::kFloat32);
  float* out = forecasts.data_ptr<float>();
  for (int64_t token = 0; token < routing.tokens; ++token)
    for (int64_t layer = 0; layer < routing.layers; ++layer)
      routing.forecast(table.data_ptr<float>(), token, layer, out + (token * routing.layers + layer) * routing.experts);
  return forecasts;
}

// What the fit averages: for each cell (popularity bucket, age, recent uses, transition
// bucket), the sum of the weighted waits over the (token, key) pairs that fall in it, and their
// count ([cells] doubles each): a next use D tokens away weighs wait_values[min(D, H) - 1], H
// the table's length (next_use.WAIT_VALUES). `forecasts` [T, L * E] is cut into transition
// buckets by `edges` (empty: one bucket). Ages, recent uses and next uses restart with each
// sequence; a key never used again weighs wait_values[H - 1].
std::tuple<torch::Tensor, torch::Tensor> cell_sums(
    const Routing& routing, const torch::Tensor& seq_offsets, const torch::Tensor& bucket, const torch::Tensor& forecasts, const torch::Tensor& edges,
    int64_t popularity_buckets, int64_t forecast_buckets, int64_t age_cap, int64_t window, const torch::Tensor& wait_values) {
  const int64_t keys = routing.keys();
  const std::vector<double> weight_of_wait = copy_of<double>(wait_values.to(torch::kFloat64));
  const int64_t horizon = static_cast<int64_t>(weight_of_wait.size());
  TORCH_CHECK(horizon >= 1 && horizon <= 255, "cell_sums: 1 to 255 wait values, not ", horizon);
  const std::vector<int64_t> bucket_of = copy_of<int64_t>(bucket.to(torch::kInt64));
  const std::vector<double> cuts = copy_of<double>(edges.to(torch::kFloat64));
  TORCH_CHECK(bucket.numel() == keys, "cell_sums: ", bucket.numel(), " popularity buckets for ", keys, " experts");
  TORCH_CHECK(forecasts.numel() == 0 || (forecasts.numel() == routing.tokens * keys && forecasts.scalar_type() == torch::kFloat32 && forecasts.is_contiguous()),
              "cell_sums: the forecasts must be [T, L * E] fp32, contiguous");
  const float* forecast = forecasts.numel() ? forecasts.data_ptr<float>() : nullptr;
  const int64_t cells = popularity_buckets * (age_cap + 1) * (window + 1) * forecast_buckets;
  std::vector<uint32_t> seen(cells * horizon, 0);  // [cell][wait - 1]: one integer increment per (t, key)
  std::vector<double> value(keys);
  std::vector<int64_t> transition_bucket(keys, 0), next_use(keys), last_use(keys), recent(keys);
  const std::vector<int64_t> bounds = copy_of<int64_t>(seq_offsets.to(torch::kInt64));
  for (size_t s = 0; s + 1 < bounds.size(); ++s) {
    const int64_t begin = bounds[s], length = bounds[s + 1] - begin;
    // Backward: each (t, key)'s tokens until the key's next use after t, at most H.
    std::vector<uint8_t> wait(length * keys);
    std::fill(next_use.begin(), next_use.end(), INT64_MAX);
    for (int64_t t = length - 1; t >= 0; --t) {
      uint8_t* waits = wait.data() + t * keys;
      for (int64_t key = 0; key < keys; ++key) waits[key] = static_cast<uint8_t>(std::min(next_use[key] - t, horizon));
      routing.each_used(begin + t, [&](int64_t key) { next_use[key] = t; });
    }
    // Forward: ages and recent uses after each token, and the cell each (t, key) falls in.
    std::fill(last_use.begin(), last_use.end(), -age_cap);
    std::fill(recent.begin(), recent.end(), 0);
    for (int64_t t = 0; t < length; ++t) {
      routing.each_used(begin + t, [&](int64_t key) { last_use[key] = t, ++recent[key]; });
      if (t >= window) routing.each_used(begin + t - window, [&](int64_t key) { --recent[key]; });
      if (forecast != nullptr) {
        const float* row = forecast + (begin + t) * keys;
        for (int64_t key = 0; key < keys; ++key) value[key] = static_cast<double>(row[key]), transition_bucket[key] = 0;
        for (double cut : cuts)  // numpy's searchsorted: how many edges lie below the value
          for (int64_t key = 0; key < keys; ++key) transition_bucket[key] += cut < value[key];
      }
      const uint8_t* waits = wait.data() + t * keys;
      for (int64_t key = 0; key < keys; ++key) {
        const int64_t age = std::min(t - last_use[key], age_cap);
        const int64_t cell = ((bucket_of[key] * (age_cap + 1) + age) * (window + 1) + recent[key]) * forecast_buckets + transition_bucket[key];
        ++seen[cell * horizon + waits[key] - 1];
      }
    }
  }
  torch::Tensor total = torch::zeros({cells}, torch::kFloat64), count = torch::zeros({cells}, torch::kFloat64);
  double* total_of = total.data_ptr<double>();
  double* count_of = count.data_ptr<double>();
  for (int64_t cell = 0; cell < cells; ++cell)
    for (int64_t wait = 1; wait <= horizon; ++wait) {
      total_of[cell] += weight_of_wait[wait - 1] * seen[cell * horizon + wait - 1];
      count_of[cell] += seen[cell * horizon + wait - 1];
    }
  return {total, count};
}

void bind_reuse_fit(py::module_& m) {
  py::class_<Routing>(m, "Routing").def(py::init<const torch::Tensor&, int64_t>());
  m.def("use_counts", &use_counts);
  m.def("transition_counts", &transition_counts);
  m.def("transition_forecasts", &transition_forecasts);
  m.def("cell_sums", &cell_sums);
}

}  // namespace reuse_fit
