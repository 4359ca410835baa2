// The adaptive default's candidates (LRU, LFU, next-use with the model it starts from, next-use
// refitted), each as a ranker of the real cache's residents and as a shadow cache replaying the
// sampled layers, in one native object: candidates.py is the reference, and this file makes
// exactly its decisions (tested: the same victim at every eviction, the same leader at every
// step). One layer step of the default cost 30-91 us in Python on the 2-core EPYC of
// BENCHMARKS.md, mostly small numpy calls and loops over a handful of keys.
//
// Numbers follow the Python's order of operations, so the expected next uses are the same
// doubles: due = step + L * wait (after a visit), chance + ((1 - q) * L) * wait (a forecast), a
// transition forecast summed row by row in fp32 and divided in fp32 (numpy's reduction over the
// first axis, and a float32 array divided by a Python int); the build has -ffp-contract=off.
// The extension also carries the counting passes of the learning candidate's refits
// (reuse_fit.cpp, included at the end).

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <vector>

namespace {

using Key = int64_t;
using Evictable = std::function<bool(Key)>;
constexpr Key NO_VICTIM = -1;
constexpr int64_t NOT_RESIDENT = -1;
constexpr Key STALE = -2;

template <typename T>
std::vector<T> copy_of(const torch::Tensor& tensor) {
  const torch::Tensor flat = tensor.contiguous().view(-1);
  return std::vector<T>(flat.data_ptr<T>(), flat.data_ptr<T>() + flat.numel());
}

// out[E] = the mean of rows `rows[i] - offset` (i < count) of a [E, E] fp32 table, in fp32, row
// by row (numpy's mean over the first axis of the rows taken: the same floats).
void mean_of_rows(const float* table, int64_t experts, const int64_t* rows, int64_t count, int64_t offset, float* out) {
  const float* row = table + (rows[0] - offset) * experts;
  std::copy(row, row + experts, out);
  for (int64_t i = 1; i < count; ++i) {
    row = table + (rows[i] - offset) * experts;
    for (int64_t e = 0; e < experts; ++e) out[e] += row[e];
  }
  const float divisor = static_cast<float>(count);
  for (int64_t e = 0; e < experts; ++e) out[e] /= divisor;
}

bool holds(const std::vector<Key>& keys, Key key) { return std::find(keys.begin(), keys.end(), key) != keys.end(); }

// Whether keys[i] is the first of its value among keys[0..i] (numpy's fancy-index increments
// count a key once, as its bool matrix of uses does).
bool first_of_its_value(const int64_t* keys, size_t i) { return std::find(keys, keys + i, keys[i]) == keys + i; }

class Candidate {
 public:
  virtual ~Candidate() = default;
  virtual bool tracks_accesses() const { return true; }
  virtual void layer_start(int64_t, const std::vector<Key>&) {}
  virtual void forecast(int64_t, const double*) {}
  virtual void prompt(int64_t, const std::vector<std::vector<Key>>&, const std::vector<int64_t>&, int64_t) {}
  virtual void insert(Key key) = 0;
  virtual void access(Key key) = 0;
  virtual void evict(Key key) = 0;
  virtual Key victim(const Evictable& evictable) = 0;
  virtual void set_dormant(bool) {}
};

// lru.py: a doubly linked list over the keys in the order of their stamps (token, layer step,
// use), oldest first; a prompt's keys are stamped at their last use in it and placed among the
// later-stamped from the newest end (a decode step's key goes last: no walk). lru.py stamps only
// the keys touched in a prompt's forward, every other key being older: the same order.
class Lru : public Candidate {
 public:
  Lru(int64_t keys, int64_t experts)
      : experts_(experts), before_(keys, NO_VICTIM), after_(keys, NO_VICTIM), listed_(keys, 0), stamp_(keys), prompt_token_(experts, NO_PROMPT) {}

  void layer_start(int64_t layer, const std::vector<Key>&) override {
    if (layer <= layer_) token_ = next_token_++;
    layer_ = layer;
    if (prompted_) {  // a prompt's, until the next layer step (as lru.py: nothing to clear at a decode step)
      std::fill(prompt_token_.begin(), prompt_token_.end(), NO_PROMPT);
      prompted_ = false;
    }
  }
  void prompt(int64_t layer, const std::vector<std::vector<Key>>&, const std::vector<int64_t>& idle, int64_t tokens) override {
    prompted_ = true;
    for (int64_t expert = 0; expert < experts_; ++expert) {
      prompt_token_[expert] = idle[expert] < tokens ? token_ + tokens - 1 - idle[expert] : NO_PROMPT;
    }
    next_token_ = std::max(next_token_, token_ + tokens);
    for (int64_t expert = 0; expert < experts_; ++expert) {
      const Key key = layer * experts_ + expert;
      if (prompt_token_[expert] != NO_PROMPT && listed_[key]) touch(key);
    }
  }
  void insert(Key key) override { touch(key); }
  void access(Key key) override {
    if (!listed_[key]) throw std::logic_error("lru: access to a key that is not resident");
    touch(key);
  }
  void evict(Key key) override {
    if (!listed_[key]) throw std::logic_error("lru: eviction of a key that is not resident");
    unlink(key);
  }
  Key victim(const Evictable& evictable) override {
    for (Key key = oldest_; key != NO_VICTIM; key = after_[key]) {
      if (evictable(key)) return key;
    }
    return NO_VICTIM;
  }

 private:
  static constexpr int64_t NO_PROMPT = -1;
  struct Stamp {  // lru.py's (token, layer step, use)
    int64_t token = 0, layer = 0, use = 0;
    bool operator<(const Stamp& other) const {
      return token != other.token ? token < other.token : layer != other.layer ? layer < other.layer : use < other.use;
    }
  };
  void touch(Key key) {
    const int64_t prompted = key / experts_ == layer_ ? prompt_token_[key % experts_] : NO_PROMPT;
    stamp_[key] = {prompted == NO_PROMPT ? token_ : prompted, layer_, ++uses_};
    if (listed_[key]) unlink(key);
    Key before = newest_;
    while (before != NO_VICTIM && stamp_[key] < stamp_[before]) before = before_[before];
    link_after(before, key);
  }
  void unlink(Key key) {
    (before_[key] == NO_VICTIM ? oldest_ : after_[before_[key]]) = after_[key];
    (after_[key] == NO_VICTIM ? newest_ : before_[after_[key]]) = before_[key];
    listed_[key] = 0;
  }
  void link_after(Key before, Key key) {  // before: NO_VICTIM puts `key` first
    const Key after = before == NO_VICTIM ? oldest_ : after_[before];
    before_[key] = before;
    after_[key] = after;
    (before == NO_VICTIM ? oldest_ : after_[before]) = key;
    (after == NO_VICTIM ? newest_ : before_[after]) = key;
    listed_[key] = 1;
  }
  int64_t experts_;
  std::vector<Key> before_, after_;
  std::vector<char> listed_;
  std::vector<Stamp> stamp_;
  std::vector<int64_t> prompt_token_;  // [expert] of the running layer step: the prompt token of its last use, NO_PROMPT
  Key oldest_ = NO_VICTIM, newest_ = NO_VICTIM;
  int64_t token_ = 0, layer_ = -1, uses_ = 0, next_token_ = 1;
  bool prompted_ = false;  // prompt_token_ holds a prompt's tokens
};

// lfu.py: counts halved every `age_every` accesses, a heap of (count, tick, key) with stale
// entries skipped; dormant, no heap.
class Lfu : public Candidate {
 public:
  Lfu(int64_t keys, int64_t age_every) : count_(keys, 0.0), stamp_(keys, 0), age_every_(age_every) {}

  void insert(Key key) override { push(key); }
  void access(Key key) override {
    count_[key] += 1.0;
    push(key);
    if (++accesses_ % age_every_ == 0) {
      for (double& count : count_) count /= 2;
      if (!dormant_) rebuild();
    }
  }
  void evict(Key key) override {
    if (stamp_[key] == 0) throw std::logic_error("lfu: eviction of a key that is not resident");
    stamp_[key] = 0;
  }
  void set_dormant(bool dormant) override {
    dormant_ = dormant;
    if (dormant) {
      heap_.clear();
    } else {
      rebuild();
    }
  }
  Key victim(const Evictable& evictable) override {
    std::vector<Entry> skipped;
    Key found = NO_VICTIM;
    try {
      while (!heap_.empty()) {
        std::pop_heap(heap_.begin(), heap_.end(), std::greater<>());
        const Entry entry = heap_.back();
        heap_.pop_back();
        if (stamp_[entry.key] != entry.tick) continue;  // stale: re-pushed since, or evicted
        skipped.push_back(entry);
        if (evictable(entry.key)) {
          found = entry.key;
          break;
        }
      }
    } catch (...) {
      restore(skipped);
      throw;
    }
    restore(skipped);
    return found;
  }

 private:
  struct Entry {
    double count;
    int64_t tick;
    Key key;
    bool operator>(const Entry& other) const {
      return count != other.count ? count > other.count : tick != other.tick ? tick > other.tick : key > other.key;
    }
  };
  void push(Key key) {
    stamp_[key] = ++tick_;
    if (!dormant_) add({count_[key], tick_, key});
  }
  void add(const Entry& entry) {
    heap_.push_back(entry);
    std::push_heap(heap_.begin(), heap_.end(), std::greater<>());
  }
  void restore(const std::vector<Entry>& entries) {
    for (const Entry& entry : entries) add(entry);
  }
  void rebuild() {
    heap_.clear();
    for (Key key = 0; key < static_cast<Key>(stamp_.size()); ++key) {
      if (stamp_[key] != 0) heap_.push_back({count_[key], stamp_[key], key});
    }
    std::make_heap(heap_.begin(), heap_.end(), std::greater<>());
  }
  std::vector<double> count_;
  std::vector<int64_t> stamp_;  // the tick of a resident key's last push; 0: not resident
  std::vector<Entry> heap_;
  int64_t tick_ = 0, accesses_ = 0, age_every_;
  bool dormant_ = false;
};

// next_use.ReuseModel as the policy reads it: flat cells, as NextUsePolicy.use_model lays them out.
struct ReuseModel {
  std::vector<int64_t> row;  // [L*E] bucket * (AGE_CAP + 1) * age_stride
  std::vector<double> wait;  // [B * (AGE_CAP + 1) * (WINDOW + 1) * F]
  int64_t forecasts, age_stride;
  std::vector<float> transitions;  // [L, E, E], empty: none
  std::vector<double> edges;       // [F - 1]
};

// next_use.py's NextUsePolicy.
class NextUse : public Candidate {
 public:
  NextUse(int64_t layers, int64_t experts, ReuseModel model, int64_t age_cap, int64_t window, int64_t idle_per_wait)
      : layers_(layers), experts_(experts), age_cap_(age_cap), window_(window), idle_per_wait_(idle_per_wait), last_use_(layers * experts, -age_cap),
        recent_(layers * experts, 0), window_keys_(window, std::vector<std::vector<Key>>(layers)), layer_(layers),
        due_(layers * experts), residents_(layers), place_(layers * experts, NOT_RESIDENT), latest_(layers, STALE), visits_(layers) {
    use_model(std::move(model));
    for (Key key = 0; key < layers * experts; ++key) {
      const int64_t last_visit = key / experts - layers;  // layer l's first visit is step l
      due_[key] = static_cast<double>(last_visit) + static_cast<double>(layers) * lookup(key, age_cap);
    }
  }

  bool tracks_accesses() const override { return false; }

  void use_model(ReuseModel model) {
    if (static_cast<int64_t>(model.row.size()) != layers_ * experts_) throw std::invalid_argument("the reuse model describes another number of experts");
    model_ = std::move(model);
    forecast_.assign(layers_ * experts_, 0);
    mean_.assign(experts_, 0.0f);
  }

  void layer_start(int64_t layer, const std::vector<Key>& keys) override {
    if (layer <= layer_) ++token_;
    ++step_;
    layer_ = layer;
    record(layer, keys);
    if (dormant_) {
      visits_[layer] = {true, step_, token_, keys};
    } else {
      visit(layer, step_, token_, keys);
    }
  }

  void set_dormant(bool dormant) override {
    dormant_ = dormant;
    if (dormant) return;
    for (int64_t layer = 0; layer < layers_; ++layer) {
      Visit& last = visits_[layer];
      if (last.pending) visit(layer, last.step, last.token, last.keys);
      last.pending = false;
    }
  }

  void forecast(int64_t layer, const double* probabilities) override {
    if (layer <= layer_ || dormant_) return;
    const int64_t chance = step_ + layer - layer_;
    for (int64_t expert = 0; expert < experts_; ++expert) {
      const Key key = layer * experts_ + expert;
      const double q = std::min(std::max(probabilities[expert], 0.0), 1.0);
      due_[key] = static_cast<double>(chance) + (1.0 - q) * static_cast<double>(layers_) * expected_wait(key, token_ - last_use_[key]);
    }
    latest_[layer] = STALE;
  }

  // next_use.py's learn_prompt: `recent` the experts of the prompt's last tokens (oldest first),
  // `idle` [E] the tokens since each one's last use in it (`tokens` if none).
  void prompt(int64_t layer, const std::vector<std::vector<Key>>& recent, const std::vector<int64_t>& idle, int64_t tokens) override {
    const Key first = layer * experts_;
    const int64_t count = static_cast<int64_t>(recent.size());
    for (int64_t back = 0; back < count; ++back) {
      std::vector<Key>& uses = window_keys_[((token_ - back) % window_ + window_) % window_][layer];
      for (size_t i = 0; i < uses.size(); ++i) recent_[uses[i]] -= first_of_its_value(uses.data(), i);
      uses = keys_of(first, recent[count - 1 - back]);
      for (size_t i = 0; i < uses.size(); ++i) recent_[uses[i]] += first_of_its_value(uses.data(), i);
    }
    for (int64_t expert = 0; expert < experts_; ++expert) {
      int64_t& last = last_use_[first + expert];
      last = idle[expert] >= tokens ? std::min(last, token_ - tokens) : token_ - idle[expert];
    }
    const std::vector<Key> last_keys = keys_of(first, recent.back());
    if (dormant_) {
      visits_[layer] = {true, step_, token_, last_keys};
    } else {
      visit(layer, step_, token_, last_keys);
    }
  }

  void insert(Key key) override {
    if (place_[key] != NOT_RESIDENT) return;
    std::vector<Key>& residents = residents_[key / experts_];
    place_[key] = static_cast<int64_t>(residents.size());
    residents.push_back(key);
    Key& latest = latest_[key / experts_];
    if (latest != STALE && (latest == NO_VICTIM || due_later(key, latest))) latest = key;
  }
  void access(Key) override {}
  void evict(Key key) override {
    if (place_[key] == NOT_RESIDENT) return;
    std::vector<Key>& residents = residents_[key / experts_];
    const Key last = residents.back();
    residents[place_[key]] = last;
    place_[last] = place_[key];
    residents.pop_back();
    place_[key] = NOT_RESIDENT;
    if (latest_[key / experts_] == key) latest_[key / experts_] = STALE;
  }

  // The resident key due last (the smallest such key, as numpy's argmax over the scores of
  // every key names the first), skipping those `evictable` refuses: the latest of each layer's
  // latest resident, which a layer keeps until its dues or its latest change (a scan of every
  // resident per eviction took about 6 us per layer step at E = 128, K = 8: BENCHMARKS.md).
  Key victim(const Evictable& evictable) override {
    for (int64_t layer = 0; layer < layers_; ++layer) {
      if (latest_[layer] == STALE) latest_[layer] = latest_of(layer, {});
    }
    std::vector<Key>& candidates = candidates_;
    candidates = latest_;
    std::vector<Key> refused;
    while (true) {
      Key found = NO_VICTIM;
      for (const Key key : candidates) {
        if (key != NO_VICTIM && (found == NO_VICTIM || due_later(key, found))) found = key;
      }
      if (found == NO_VICTIM || evictable(found)) return found;
      refused.push_back(found);
      candidates[found / experts_] = latest_of(found / experts_, refused);
    }
  }

 private:
  struct Visit {
    bool pending = false;
    int64_t step = 0, token = 0;
    std::vector<Key> keys;
  };

  static std::vector<Key> keys_of(Key first, const std::vector<Key>& experts) {
    std::vector<Key> keys;
    for (const Key expert : experts) keys.push_back(first + expert);
    return keys;
  }

  bool due_later(Key key, Key than) const { return due_[key] > due_[than] || (due_[key] == due_[than] && key < than); }

  // The resident key of `layer` due last, but for `refused` ones (NO_VICTIM: none).
  Key latest_of(int64_t layer, const std::vector<Key>& refused) const {
    Key found = NO_VICTIM;
    for (const Key key : residents_[layer]) {
      if ((found == NO_VICTIM || due_later(key, found)) && !holds(refused, key)) found = key;
    }
    return found;
  }
  double lookup(Key key, int64_t age) const {
    return model_.wait[model_.row[key] + age * model_.age_stride + recent_[key] * model_.forecasts + forecast_[key]];
  }
  // next_use.py's _expected_wait: the capped age's cell, plus a token per idle_per_wait tokens idle beyond it.
  double expected_wait(Key key, int64_t idle) const {
    return lookup(key, std::min(idle, age_cap_)) + static_cast<double>(std::max<int64_t>(idle - age_cap_, 0)) / static_cast<double>(idle_per_wait_);
  }

  void record(int64_t layer, const std::vector<Key>& keys) {
    std::vector<Key>& uses = window_keys_[token_ % window_][layer];
    for (size_t i = 0; i < uses.size(); ++i) recent_[uses[i]] -= first_of_its_value(uses.data(), i);
    for (size_t i = 0; i < keys.size(); ++i) recent_[keys[i]] += first_of_its_value(keys.data(), i);
    uses = keys;
    for (const Key key : keys) last_use_[key] = token_;
  }

  void visit(int64_t layer, int64_t step, int64_t token, const std::vector<Key>& keys) {
    const Key first = layer * experts_;
    if (!model_.transitions.empty()) transition_buckets(layer, keys);
    for (Key key = first; key < first + experts_; ++key) {
      due_[key] = static_cast<double>(step) + static_cast<double>(layers_) * expected_wait(key, token - last_use_[key]);
    }
    latest_[layer] = STALE;
  }

  // Each expert's bucket of P(it is used next | this token's experts), averaged over them.
  void transition_buckets(int64_t layer, const std::vector<Key>& keys) {
    const Key first = layer * experts_;
    if (keys.empty()) {  // numpy's mean of nothing is NaN, which sorts past every edge
      std::fill(forecast_.begin() + first, forecast_.begin() + first + experts_, static_cast<int64_t>(model_.edges.size()));
      return;
    }
    mean_of_rows(model_.transitions.data() + layer * experts_ * experts_, experts_, keys.data(), static_cast<int64_t>(keys.size()), first, mean_.data());
    for (int64_t expert = 0; expert < experts_; ++expert) {
      const double mean = mean_[expert];
      int64_t bucket = 0;  // how many edges lie below (numpy's searchsorted, as the edges are sorted)
      for (const double edge : model_.edges) bucket += edge < mean;
      forecast_[first + expert] = bucket;
    }
  }

  int64_t layers_, experts_, age_cap_, window_, idle_per_wait_;
  ReuseModel model_;
  std::vector<int64_t> last_use_, recent_, forecast_;
  std::vector<float> mean_;  // [E] transition_buckets' scratch
  std::vector<std::vector<std::vector<Key>>> window_keys_;  // [token % WINDOW][layer]: the keys it used
  int64_t layer_, token_ = -1, step_ = -1;
  std::vector<double> due_;
  std::vector<std::vector<Key>> residents_;  // [layer]: its resident keys, in no order
  std::vector<int64_t> place_;                 // each key's index in its layer's residents_, NOT_RESIDENT
  std::vector<Key> latest_;                    // [layer]: its resident due last, NO_VICTIM (none) or STALE (to find)
  std::vector<Key> candidates_;                // victim's scratch
  bool dormant_ = false;
  std::vector<Visit> visits_;  // while dormant: each layer's last visit
};

// shadow_cache.py: residency and one candidate's bookkeeping.
class Shadow {
 public:
  Shadow(std::unique_ptr<Candidate> policy, int64_t keys, int64_t experts, int64_t capacity)
      : policy(std::move(policy)), experts_(experts), capacity_(capacity), resident_(keys, 0) {}

  int64_t step(int64_t layer, const std::vector<Key>& experts) {
    std::vector<Key> keys;
    for (const Key expert : experts) keys.push_back(layer * experts_ + expert);
    policy->layer_start(layer, keys);
    int64_t misses = 0;
    for (size_t begin = 0; begin < keys.size(); begin += capacity_) {
      const std::vector<Key> wave(keys.begin() + begin, keys.begin() + std::min(keys.size(), begin + capacity_));
      misses += run(wave);
    }
    return misses;
  }

  std::unique_ptr<Candidate> policy;

 private:
  int64_t run(const std::vector<Key>& wave) {
    int64_t misses = 0;
    const Evictable outside_wave = [&wave](Key key) { return !holds(wave, key); };
    for (const Key key : wave) {
      if (!resident_[key]) {
        ++misses;
        if (count_ >= capacity_) {
          const Key victim = policy->victim(outside_wave);
          if (victim == NO_VICTIM) throw std::logic_error("shadow cache: every resident expert is in the wave");
          resident_[victim] = 0;
          --count_;
          policy->evict(victim);
        }
        resident_[key] = 1;
        ++count_;
        policy->insert(key);
      }
      if (policy->tracks_accesses()) policy->access(key);
    }
    return misses;
  }

  int64_t experts_, capacity_, count_ = 0;
  std::vector<char> resident_;
};

ReuseModel reuse_model(const torch::Tensor& row, const torch::Tensor& wait, int64_t forecasts, int64_t age_stride,
                       const torch::Tensor& transitions, const torch::Tensor& edges) {
  return {copy_of<int64_t>(row), copy_of<double>(wait), forecasts, age_stride, copy_of<float>(transitions), copy_of<double>(edges)};
}

constexpr int LRU = 0, NEXT_USE = 2, LEARNER = 3;  // candidates.py's order: lru, lfu, next-use, next-use refitted
constexpr int KIND[4] = {0, 1, 2, 2};   // candidates.py's KIND: the calibration each candidate shares
constexpr size_t CANDIDATES = std::size(KIND), KINDS = KIND[LEARNER] + 1;  // the learner's kind is the last

class Candidates {
 public:
  // `model` / `sampled_model`: (row, wait, forecasts, age_stride, transitions, edges) of the
  // reuse model for all layers / the sampled ones (NextUsePolicy's layout).
  Candidates(int64_t layers, int64_t experts, std::vector<int64_t> sampled, int64_t shadow_slots, double decay, double keep, double prior,
             int64_t settle, double forget, int64_t lfu_age_every, int64_t age_cap, int64_t window, int64_t idle_per_wait, const py::tuple& model,
             const py::tuple& sampled_model)
      : layers_(layers), experts_(experts), shadow_of_(layers, -1), misses_(CANDIDATES, 0.0), live_(KINDS, 0.0), shadowed_(KINDS, 0.0), decay_(decay), keep_(keep),
        prior_(prior), forget_(forget), settle_(settle) {
    for (size_t index = 0; index < sampled.size(); ++index) shadow_of_[sampled[index]] = static_cast<int64_t>(index);
    const int64_t shadow_layers = static_cast<int64_t>(sampled.size());
    rankers_ = made(layers, experts, lfu_age_every, unpack(model), age_cap, window, idle_per_wait);
    for (auto& policy : made(shadow_layers, experts, lfu_age_every, unpack(sampled_model), age_cap, window, idle_per_wait)) {
      shadows_.emplace_back(std::move(policy), shadow_layers * experts, experts, shadow_slots);
    }
    for (size_t i = 1; i < rankers_.size(); ++i) rankers_[i]->set_dormant(true);  // only the leader names victims
  }

  void layer_start(int64_t layer, const std::vector<Key>& keys) {
    if (layer < 0 || layer >= layers_) throw std::out_of_range("the cache policy was built for fewer MoE layers");
    for (const Key key : keys) check(key);
    for (auto& ranker : rankers_) ranker->layer_start(layer, keys);
    const int64_t sampled = shadow_of_[layer];
    if (step_layer_ >= 0) calibrate();
    if (sampled < 0) return;
    std::vector<Key> experts;
    for (const Key key : keys) experts.push_back(key % experts_);
    std::vector<int64_t> step_misses(shadows_.size());
    for (size_t i = 0; i < shadows_.size(); ++i) {
      step_misses[i] = shadows_[i].step(sampled, experts);
      misses_[i] *= decay_;
      misses_[i] += static_cast<double>(step_misses[i]);
    }
    const std::vector<double> score = scores();
    const int best = static_cast<int>(std::min_element(score.begin(), score.end()) - score.begin());
    if (best != leader_ && score[best] < keep_ * score[leader_]) {
      rankers_[best]->set_dormant(false);
      rankers_[leader_]->set_dormant(true);
      leader_ = best;
      ++switches_;
      unsettled_ = settle_;
    }
    step_layer_ = layer;
    step_leader_ = leader_;
    step_shadow_misses_ = step_misses[leader_];
    step_loads_ = 0;
  }

  // candidates.py's scores(): shadow misses times the live-to-shadow ratio measured while leading, at least 1.
  std::vector<double> scores() const {
    std::vector<double> out(misses_.size());
    for (size_t i = 0; i < out.size(); ++i) out[i] = misses_[i] * std::max(1.0, (live_[KIND[i]] + prior_) / (shadowed_[KIND[i]] + prior_));
    return out;
  }

  // candidates.py's prompt, from next_use.py's PromptSummary (recent, idle, tokens).
  void prompt(int64_t layer, const std::vector<std::vector<Key>>& recent, const std::vector<int64_t>& idle, int64_t tokens) {
    if (layer < 0 || layer >= layers_) throw std::out_of_range("a prompt for a MoE layer the cache policy was not built for");
    if (recent.empty() || static_cast<int64_t>(idle.size()) != experts_) throw std::invalid_argument("a prompt's summary names its last tokens and each expert's idle tokens");
    for (const auto& experts : recent) {
      for (const Key expert : experts) {
        if (expert < 0 || expert >= experts_) throw std::out_of_range("a prompt's expert outside the experts the cache policy was built for");
      }
    }
    const int64_t sampled = shadow_of_[layer];
    for (const int candidate : {LRU, NEXT_USE, LEARNER}) {
      rankers_[candidate]->prompt(layer, recent, idle, tokens);
      if (sampled >= 0) shadows_[candidate].policy->prompt(sampled, recent, idle, tokens);
    }
  }

  void forecast(int64_t layer, const torch::Tensor& probabilities) {
    if (layer < 0 || layer >= layers_) throw std::out_of_range("a forecast for a MoE layer the cache policy was not built for");
    const torch::Tensor q = probabilities.to(torch::kFloat64).contiguous();
    if (q.numel() != experts_) throw std::invalid_argument("a forecast gives one probability per expert");
    for (auto& ranker : rankers_) ranker->forecast(layer, q.data_ptr<double>());
    if (shadow_of_[layer] >= 0) {
      for (auto& shadow : shadows_) shadow.policy->forecast(shadow_of_[layer], q.data_ptr<double>());
    }
  }

  void insert(Key key) {
    check(key);
    if (key / experts_ == step_layer_) ++step_loads_;
    if (unsettled_ > 0) --unsettled_;
    for (auto& ranker : rankers_) ranker->insert(key);
  }
  void access(Key key) {
    check(key);
    for (auto& ranker : rankers_) {
      if (ranker->tracks_accesses()) ranker->access(key);
    }
  }
  void evict(Key key) {
    check(key);
    for (auto& ranker : rankers_) ranker->evict(key);
  }
  Key victim(const py::object& is_evictable) {
    return rankers_[leader_]->victim([&is_evictable](Key key) { return is_evictable(key).cast<bool>(); });
  }

  void use_model(int64_t candidate, const py::tuple& model, const py::tuple& sampled_model) {
    if (candidate < 0 || candidate >= static_cast<int64_t>(CANDIDATES) || KIND[candidate] != KIND[LEARNER]) {
      throw std::invalid_argument("only the next-use candidates take a reuse model");
    }
    static_cast<NextUse&>(*rankers_[candidate]).use_model(unpack(model));
    static_cast<NextUse&>(*shadows_[candidate].policy).use_model(unpack(sampled_model));
  }

  int leader() const { return leader_; }
  int64_t switches() const { return switches_; }
  std::vector<double> misses() const { return misses_; }

 private:
  static std::vector<std::unique_ptr<Candidate>> made(int64_t layers, int64_t experts, int64_t lfu_age_every, const ReuseModel& model,
                                                       int64_t age_cap, int64_t window, int64_t idle_per_wait) {
    std::vector<std::unique_ptr<Candidate>> out;
    out.push_back(std::make_unique<Lru>(layers * experts, experts));
    out.push_back(std::make_unique<Lfu>(layers * experts, lfu_age_every));
    for (int copy = 0; copy < 2; ++copy) out.push_back(std::make_unique<NextUse>(layers, experts, model, age_cap, window, idle_per_wait));
    return out;
  }

  // A key out of range would write outside the candidates' arrays: refused (IndexError in Python).
  void check(Key key) const {
    if (key < 0 || key >= layers_ * experts_) throw std::out_of_range("expert key outside the layers x experts the cache policy was built for");
  }

  // The sampled step just ended, added to its leader's live loads and shadow misses; the other
  // kinds' evidence fades (candidates.py's _calibrate).
  void calibrate() {
    step_layer_ = -1;
    const int kind = KIND[step_leader_];
    for (size_t other = 0; other < live_.size(); ++other) {
      if (static_cast<int>(other) == kind) continue;
      live_[other] *= forget_;
      shadowed_[other] *= forget_;
    }
    if (step_leader_ == LRU || unsettled_ > 0) return;  // faithful to the whole cache: never calibrated; or settling
    live_[kind] = live_[kind] * decay_ + static_cast<double>(step_loads_);
    shadowed_[kind] = shadowed_[kind] * decay_ + static_cast<double>(step_shadow_misses_);
  }

  static ReuseModel unpack(const py::tuple& model) {
    return reuse_model(model[0].cast<torch::Tensor>(), model[1].cast<torch::Tensor>(), model[2].cast<int64_t>(), model[3].cast<int64_t>(),
                       model[4].cast<torch::Tensor>(), model[5].cast<torch::Tensor>());
  }

  int64_t layers_, experts_;
  std::vector<int64_t> shadow_of_;  // layer -> its shadow layer, -1 where not sampled
  std::vector<std::unique_ptr<Candidate>> rankers_;
  std::vector<Shadow> shadows_;
  std::vector<double> misses_;   // decayed shadow misses
  std::vector<double> live_;     // [kind] decayed live loads at the sampled steps a candidate of that KIND led
  std::vector<double> shadowed_;  // ... and the leader's own shadow's misses at those steps
  double decay_, keep_, prior_, forget_;
  int64_t step_layer_ = -1;  // the running sampled step's layer, -1 if none
  int step_leader_ = 0;
  int64_t step_shadow_misses_ = 0, step_loads_ = 0;
  int64_t settle_, unsettled_ = 0;  // loads after a switch before the live cache is the new leader's; still owed
  int leader_ = 0;
  int64_t switches_ = 0;
};

}  // namespace

#include "reuse_fit.cpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Candidates>(m, "Candidates")
      .def(py::init<int64_t, int64_t, std::vector<int64_t>, int64_t, double, double, double, int64_t, double, int64_t, int64_t, int64_t, int64_t, py::tuple, py::tuple>())
      .def("layer_start", &Candidates::layer_start)
      .def("forecast", &Candidates::forecast)
      .def("prompt", &Candidates::prompt)
      .def("insert", &Candidates::insert)
      .def("access", &Candidates::access)
      .def("evict", &Candidates::evict)
      .def("victim", &Candidates::victim)
      .def("use_model", &Candidates::use_model)
      .def_property_readonly("leader", &Candidates::leader)
      .def_property_readonly("switches", &Candidates::switches)
      .def_property_readonly("misses", &Candidates::misses)
      .def_property_readonly("scores", &Candidates::scores);
  reuse_fit::bind_reuse_fit(m);
}
