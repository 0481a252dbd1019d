// The forward pass of a Qwen2-layout model over new tokens on the CPU, all layers in one call, writing
// their keys and values into the KV cache: `orchard_engine::forward_tokens`, for prefill and decode.
//
// The same computation as `TorchEngine._forward_torch`/`_decode_torch` (rollout/engines/torch_engine.py),
// float32 only. The weight matmuls go through ATen (`mm`, `addmm`: the BLAS calls the Python path makes);
// the work between them, which in Python costs several op calls per layer and step, is done here in
// loops over the tokens: RMSNorm, RoPE with the cache write, attention of each query head over its
// row's cache slots (left padding skipped rather than masked, so padding positions cost nothing), and
// SiLU(gate) * up. Built and loaded by rollout/engines/kernels.py.

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// `out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight`, rows of `width` floats.
void rms_norm(const float* x, const float* weight, float* out, int64_t rows, int64_t width, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * width;
    float squares = at::vec::map_reduce_all<float>(
        [](Vec v) { return v * v; }, [](Vec a, Vec b) { return a + b; }, row, width);
    float scale = 1.0f / std::sqrt(squares / static_cast<float>(width) + eps);
    float* dst = out + r * width;
    for (int64_t i = 0; i < width; ++i) dst[i] = weight[i] * (row[i] * scale);
  }
}

// `out[r, i] = silu(gate_up[r, i]) * gate_up[r, width + i]`, SiLU(x) = x / (1 + exp(-x)).
void silu_mul(const float* gate_up, float* out, int64_t rows, int64_t width) {
  const Vec one(1.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = gate_up + r * 2 * width;
    const float* up = gate + width;
    float* dst = out + r * width;
    int64_t i = 0;
    for (; i + Vec::size() <= width; i += Vec::size()) {
      Vec g = Vec::loadu(gate + i);
      // exp_u20 (ATen's inlined polynomial, within 20 ulp) rather than Sleef's exp: a third faster here,
      // and SiLU's result moves by under 3e-7 relative.
      (g / (one + g.neg().exp_u20()) * Vec::loadu(up + i)).store(dst + i);
    }
    for (; i < width; ++i) dst[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }
}

// RoPE of one head: `out = x * cos + swap_halves(x) * signed_sin`, `half` = head_dim / 2.
void rotate(const float* x, const float* cos, const float* signed_sin, float* out, int64_t half) {
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] + x[i + half] * signed_sin[i];
  for (int64_t i = half; i < 2 * half; ++i) out[i] = x[i] * cos[i] + x[i - half] * signed_sin[i];
}

// Attention of `group` rotated queries (`[group, head_dim]`, one kv head's query heads) over the cached
// keys and values of slots [first, last]; writes `[group, head_dim]` to `out` (stride `out_stride`).
// `Chunks` = head_dim / Vec::size(), known at compile time so the accumulators stay in registers.
template <int64_t Chunks>
void attend(const float* queries, int64_t group, const float* keys, const float* values, int64_t first,
            int64_t last, float scale, float* scores, float* out, int64_t out_stride) {
  constexpr int64_t head_dim = Chunks * Vec::size();
  for (int64_t h = 0; h < group; ++h) {
    Vec query[Chunks];
    for (int64_t c = 0; c < Chunks; ++c) query[c] = Vec::loadu(queries + h * head_dim + c * Vec::size());
    float highest = -INFINITY;
    for (int64_t j = first; j <= last; ++j) {
      const float* key = keys + j * head_dim;
      Vec sum = query[0] * Vec::loadu(key);
      for (int64_t c = 1; c < Chunks; ++c) sum = at::vec::fmadd(query[c], Vec::loadu(key + c * Vec::size()), sum);
      scores[j] = at::vec::vec_reduce_all<float>(std::plus<Vec>(), sum) * scale;
      highest = std::max(highest, scores[j]);
    }
    const int64_t count = last + 1 - first;
    float* weights = scores + first;
    at::vec::map([highest](Vec s) { return (s - Vec(highest)).exp(); }, weights, weights, count);
    const float total = at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, weights, count);
    // Two slots per iteration into two sets of accumulators: one chain of dependent FMAs would wait on
    // each one's latency.
    Vec even[Chunks], odd[Chunks];
    for (int64_t c = 0; c < Chunks; ++c) even[c] = odd[c] = Vec(0.0f);
    int64_t j = first;
    for (; j + 1 <= last; j += 2) {
      const Vec first_weight(scores[j]), second_weight(scores[j + 1]);
      const float* value = values + j * head_dim;
      for (int64_t c = 0; c < Chunks; ++c) {
        even[c] = at::vec::fmadd(first_weight, Vec::loadu(value + c * Vec::size()), even[c]);
        odd[c] = at::vec::fmadd(second_weight, Vec::loadu(value + head_dim + c * Vec::size()), odd[c]);
      }
    }
    if (j <= last) {
      const Vec weight(scores[j]);
      const float* value = values + j * head_dim;
      for (int64_t c = 0; c < Chunks; ++c) even[c] = at::vec::fmadd(weight, Vec::loadu(value + c * Vec::size()), even[c]);
    }
    const Vec inverse(1.0f / total);
    for (int64_t c = 0; c < Chunks; ++c) ((even[c] + odd[c]) * inverse).store(out + h * out_stride + c * Vec::size());
  }
}

// `attend` for any head_dim, in scalar loops.
void attend_any(const float* queries, int64_t group, int64_t head_dim, const float* keys, const float* values,
                int64_t first, int64_t last, float scale, float* scores, float* out, int64_t out_stride) {
  for (int64_t h = 0; h < group; ++h) {
    const float* query = queries + h * head_dim;
    float highest = -INFINITY;
    for (int64_t j = first; j <= last; ++j) {
      float sum = 0.0f;
      for (int64_t i = 0; i < head_dim; ++i) sum += query[i] * keys[j * head_dim + i];
      scores[j] = sum * scale;
      highest = std::max(highest, scores[j]);
    }
    float total = 0.0f;
    for (int64_t j = first; j <= last; ++j) total += (scores[j] = std::exp(scores[j] - highest));
    float* dst = out + h * out_stride;
    std::fill(dst, dst + head_dim, 0.0f);
    for (int64_t j = first; j <= last; ++j) {
      for (int64_t i = 0; i < head_dim; ++i) dst[i] += scores[j] * values[j * head_dim + i];
    }
    for (int64_t i = 0; i < head_dim; ++i) dst[i] /= total;
  }
}

// The cache geometry and the new tokens: token `i` belongs to row `rows[i]` and goes into cache slot
// `slots[i]`; row `b` holds left padding in slots before `first_slot[b]`, so the token's position is
// `slots[i] - first_slot[rows[i]]` and it attends to slots [first_slot[b], slots[i]] of its row.
struct Tokens {
  const int64_t* rows;
  const int64_t* slots;
  const int64_t* first_slot;
  int64_t heads, kv_heads, head_dim, slots_per_row;
};

// Keys (rotated) and values of the new tokens, from their q/k/v projections `qkv` (`[tokens, (heads +
// 2 kv_heads) * head_dim]`), into this layer's `keys` and `values` (`[batch, kv_heads, slots, head_dim]`).
// `rope`: `[positions, 2, head_dim]`, cos and signed sin (-sin, sin) as in `TorchEngine._rope`.
void write_cache(const float* qkv, int64_t count, const Tokens& tokens, const float* rope, float* keys,
                 float* values) {
  const int64_t heads = tokens.heads, kv_heads = tokens.kv_heads, head_dim = tokens.head_dim;
  const int64_t width = (heads + 2 * kv_heads) * head_dim;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t b = tokens.rows[i], slot = tokens.slots[i];
    const float* cos = rope + (slot - tokens.first_slot[b]) * 2 * head_dim;
    for (int64_t g = 0; g < kv_heads; ++g) {
      const int64_t offset = ((b * kv_heads + g) * tokens.slots_per_row + slot) * head_dim;
      rotate(qkv + i * width + (heads + g) * head_dim, cos, cos + head_dim, keys + offset, head_dim / 2);
      const float* value = qkv + i * width + (heads + kv_heads + g) * head_dim;
      std::copy(value, value + head_dim, values + offset);
    }
  }
}

// Attention output `[count, heads * head_dim]` of the tokens `which[0..count)` (all tokens when null):
// each query head, rotated, over its row's cached slots up to the token's own.
void attention(const float* qkv, const int64_t* which, int64_t count, const Tokens& tokens, const float* rope,
               const float* keys, const float* values, float* out) {
  const int64_t heads = tokens.heads, kv_heads = tokens.kv_heads, head_dim = tokens.head_dim;
  const int64_t group = heads / kv_heads, width = (heads + 2 * kv_heads) * head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const int64_t chunks = head_dim % Vec::size() == 0 ? head_dim / Vec::size() : 0;
  std::vector<float> queries(group * head_dim), scores(tokens.slots_per_row);
  for (int64_t n = 0; n < count; ++n) {
    const int64_t i = which ? which[n] : n;
    const int64_t b = tokens.rows[i], slot = tokens.slots[i], first = tokens.first_slot[b];
    const float* cos = rope + (slot - first) * 2 * head_dim;
    for (int64_t g = 0; g < kv_heads; ++g) {
      for (int64_t h = 0; h < group; ++h) {
        rotate(qkv + i * width + (g * group + h) * head_dim, cos, cos + head_dim, queries.data() + h * head_dim,
               head_dim / 2);
      }
      const int64_t offset = (b * kv_heads + g) * tokens.slots_per_row * head_dim;
      const float *row_keys = keys + offset, *row_values = values + offset;
      float* dst = out + (n * heads + g * group) * head_dim;
      switch (chunks) {
#define ORCHARD_ATTEND(CHUNKS)                                                                                   \
  case CHUNKS:                                                                                                   \
    attend<CHUNKS>(queries.data(), group, row_keys, row_values, first, slot, scale, scores.data(), dst, head_dim); \
    break;
        ORCHARD_ATTEND(1)
        ORCHARD_ATTEND(2)
        ORCHARD_ATTEND(4)
        ORCHARD_ATTEND(8)
        ORCHARD_ATTEND(16)
#undef ORCHARD_ATTEND
        default:
          attend_any(queries.data(), group, head_dim, row_keys, row_values, first, slot, scale, scores.data(), dst,
                     head_dim);
      }
    }
  }
}

void check_float_contiguous(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == at::kFloat && tensor.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor, got ", tensor.scalar_type(), " ", tensor.sizes(), " strides ",
              tensor.strides());
}

}  // namespace

void check_index(const at::Tensor& tensor, int64_t size, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == at::kLong && tensor.is_contiguous() &&
                  tensor.dim() == 1 && tensor.size(0) == size,
              name, " must be a contiguous int64 CPU vector of ", size, " entries, got ", tensor.scalar_type(), " ",
              tensor.sizes());
}

// The model's forward pass over new tokens, with their keys and values written into the cache; returns
// the hidden states after the final norm, `[tokens, hidden]`, or of the `outputs` tokens only.
//   token_ids, rows, slots: [tokens] int64, see `Tokens`; a row's tokens in increasing slots
//   first_slot: [batch] int64;  embed: [vocab, hidden]
//   weights:    7 per layer, as `TorchEngine`'s `_Layer` (input_norm, qkv_weight, qkv_bias or an empty
//               tensor, output_weight_t, post_norm, gate_up_weight, down_weight_t), then the final norm
//   rope:       [positions, 2, head_dim];  cache: [layers, 2, batch, kv_heads, slots, head_dim]
//   outputs:    empty (every token), or the tokens whose hidden states are wanted: the last layer then
//               computes attention and MLP for those alone (every token's keys and values are cached)
at::Tensor forward_tokens(const at::Tensor& token_ids, const at::Tensor& rows, const at::Tensor& slots,
                          const at::Tensor& first_slot, const at::Tensor& outputs, const at::Tensor& embed,
                          at::TensorList weights, const at::Tensor& rope, const at::Tensor& cache, int64_t heads,
                          int64_t kv_heads, double eps) {
  constexpr int64_t per_layer = 7;
  TORCH_CHECK(weights.size() % per_layer == 1, "weights must hold 7 tensors per layer and the final norm");
  const int64_t layers = static_cast<int64_t>(weights.size() / per_layer);
  check_float_contiguous(embed, "embed");
  check_float_contiguous(rope, "rope");
  check_float_contiguous(cache, "cache");
  TORCH_CHECK(cache.dim() == 6 && cache.size(0) == layers && cache.size(1) == 2 && cache.size(3) == kv_heads,
              "cache has shape ", cache.sizes(), ", expected [", layers, ", 2, batch, ", kv_heads, ", slots, head_dim]");
  const int64_t count = token_ids.size(0), batch = cache.size(2), slots_per_row = cache.size(4);
  const int64_t hidden = embed.size(1), head_dim = cache.size(5);
  TORCH_CHECK(heads % kv_heads == 0 && head_dim % 2 == 0, "heads must be a multiple of kv_heads, head_dim even");
  check_index(rows, count, "rows");
  check_index(slots, count, "slots");
  check_index(first_slot, batch, "first_slot");
  const Tokens tokens{rows.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), first_slot.data_ptr<int64_t>(),
                      heads, kv_heads, head_dim, slots_per_row};
  for (int64_t i = 0; i < count; ++i) {
    const int64_t b = tokens.rows[i], slot = tokens.slots[i];
    TORCH_CHECK(b >= 0 && b < batch && slot >= 0 && slot < slots_per_row, "token ", i, " has row ", b, " slot ",
                slot, ", outside the cache's ", batch, " rows of ", slots_per_row, " slots");
    const int64_t first = tokens.first_slot[b];
    TORCH_CHECK(first >= 0 && first <= slot && slot - first < rope.size(0), "token ", i, " at slot ", slot,
                " of a row whose padding ends at ", first, ": no position in the rope table");
  }
  const bool some = outputs.numel() > 0;
  if (some) {
    check_index(outputs, outputs.numel(), "outputs");
    const int64_t* which = outputs.data_ptr<int64_t>();
    for (int64_t n = 0; n < outputs.numel(); ++n) {
      TORCH_CHECK(which[n] >= 0 && which[n] < count, "outputs holds ", which[n], ", not one of ", count, " tokens");
    }
  }
  const float epsilon = static_cast<float>(eps);
  const int64_t layer_stride = 2 * batch * kv_heads * slots_per_row * head_dim;

  at::Tensor x = at::index_select(embed, 0, token_ids);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = weights.data() + l * per_layer;
    check_float_contiguous(w[0], "input_norm");
    check_float_contiguous(w[4], "post_norm");
    at::Tensor normed = at::empty_like(x);
    rms_norm(x.data_ptr<float>(), w[0].data_ptr<float>(), normed.data_ptr<float>(), x.size(0), hidden, epsilon);
    at::Tensor qkv = w[2].numel() ? at::addmm(w[2], normed, w[1].t()) : at::mm(normed, w[1].t());
    TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * head_dim, "qkv_weight has ", qkv.size(1),
                " rows, expected (heads + 2 kv_heads) * head_dim");
    float* keys = cache.data_ptr<float>() + l * layer_stride;
    float* values = keys + layer_stride / 2;
    write_cache(qkv.data_ptr<float>(), count, tokens, rope.data_ptr<float>(), keys, values);
    const bool narrow = some && l == layers - 1;
    if (narrow) x = at::index_select(x, 0, outputs);
    at::Tensor attn = at::empty({x.size(0), heads * head_dim}, x.options());
    attention(qkv.data_ptr<float>(), narrow ? outputs.data_ptr<int64_t>() : nullptr, x.size(0), tokens,
              rope.data_ptr<float>(), keys, values, attn.data_ptr<float>());
    x.addmm_(attn, w[3]);
    normed = at::empty_like(x);
    rms_norm(x.data_ptr<float>(), w[4].data_ptr<float>(), normed.data_ptr<float>(), x.size(0), hidden, epsilon);
    at::Tensor gate_up = at::mm(normed, w[5].t());
    const int64_t intermediate = gate_up.size(1) / 2;
    at::Tensor activation = at::empty({x.size(0), intermediate}, x.options());
    silu_mul(gate_up.data_ptr<float>(), activation.data_ptr<float>(), x.size(0), intermediate);
    x.addmm_(activation, w[6]);
  }
  const at::Tensor& final_norm = weights[layers * per_layer];
  check_float_contiguous(final_norm, "final_norm");
  at::Tensor out = at::empty_like(x);
  rms_norm(x.data_ptr<float>(), final_norm.data_ptr<float>(), out.data_ptr<float>(), x.size(0), hidden, epsilon);
  return out;
}

TORCH_LIBRARY(orchard_engine, m) {
  m.def("forward_tokens(Tensor token_ids, Tensor rows, Tensor slots, Tensor first_slot, Tensor outputs, "
        "Tensor embed, Tensor[] weights, Tensor rope, Tensor(a!) cache, int heads, int kv_heads, float eps) -> Tensor",
        &forward_tokens);
}
