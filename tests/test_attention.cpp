// attn_front, flash_attention and paged_attention against the reference.
//
// Attention in f16 / bf16 is held to FlashAttention's own bound: its error
// against the double-precision reference may be at most about twice that of a
// plain low-precision implementation (scores, softmax and output each rounded
// to the dtype, as a framework would run it), emulated here on the host.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "ops.h"

namespace tk::test {
namespace {

Tol lse_tolerance() { return {1e-4, 1e-4, 5e-5}; }

// One query row of plain low-precision attention: q . k_j accumulated in f32
// and rounded, scaled and rounded, softmax in f32 with p rounded, p . v
// accumulated in f32 and rounded. key(j) / value(j) give the element offset of
// row j in kt / vt; q(c) the query's channel c.
template <class QFn, class KeyFn, class ValueFn>
void lowp_row(tk_dtype d, int64_t dh, int64_t n, double scale, QFn q, const Tensor& kt, KeyFn key,
              const Tensor& vt, ValueFn value, std::vector<double>& out) {
  out.assign(size_t(dh), 0.0);
  if (n == 0) return;
  std::vector<float> s(static_cast<size_t>(n));
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t kj = key(j);
    float dot = 0;
    for (int64_t c = 0; c < dh; ++c) dot += float(q(c)) * float(kt.get(kj + c));
    s[size_t(j)] = round_to(d, round_to(d, dot) * float(scale));
    m = std::max(m, s[size_t(j)]);
  }
  float sum = 0;
  for (float& v : s) sum += (v = std::exp(v - m));
  std::vector<float> acc(size_t(dh), 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    const float p = round_to(d, s[size_t(j)] / sum);
    const int64_t vj = value(j);
    for (int64_t c = 0; c < dh; ++c) acc[size_t(c)] += p * float(vt.get(vj + c));
  }
  for (int64_t c = 0; c < dh; ++c) out[size_t(c)] = round_to(d, acc[size_t(c)]);
}

// Checks out (and lse) of an attention op. visible(token) gives how many keys
// the query row at `token` (any head) sees; lowp(token, head, out) fills that
// row of the low-precision emulation.
template <class VisibleFn, class LowpFn>
void compare_attention(tk_dtype d, const Tensor* out_t, const Tensor* lse_t, const Result& got,
                       const Result& ref, VisibleFn visible, LowpFn lowp) {
  const Tensor& out = got.of(out_t);
  const Tensor& want = ref.of(out_t);
  const int64_t total = out_t->shape[0], heads = out_t->shape[1], dh = out_t->shape[2];
  // Rows that see no key: exactly 0 (and lse -inf below), never NaN.
  int64_t masked_bad = 0;
  for (int64_t t = 0; t < total; ++t) {
    if (visible(t) > 0) continue;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t c = 0; c < dh; ++c)
        if (out.at({t, h, c}) != 0.0) ++masked_bad;
  }
  EXPECT_EQ(masked_bad, 0) << "rows that see no key must be exactly 0";
  if (d == TK_F32) {
    EXPECT_TRUE(compare_close(out, want, tolerance(OpKind::Attention, d)));
  } else {
    Tensor emu = want;
    emu.name = out_t->name + " (low-precision emulation)";
    std::vector<double> row;
    for (int64_t t = 0; t < total; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        lowp(t, h, row);
        for (int64_t c = 0; c < dh; ++c) emu.put({t, h, c}, row[size_t(c)]);
      }
    EXPECT_TRUE(compare_within_lowp(out, want, emu, d));
  }
  if (lse_t) {
    EXPECT_TRUE(compare_close(got.of(lse_t), ref.of(lse_t), lse_tolerance()));
  }
}

// [T, H, Dh] token-major with padding, or head-major.
Tensor heads(const std::string& name, Elem e, Role role, int64_t T, int64_t H, int64_t Dh,
             int64_t pad, int64_t lead, bool head_major) {
  if (!head_major) return Tensor(name, e, role, {T, H, Dh}, padded_strides({T, H, Dh}, pad), lead);
  const int64_t token_stride = Dh + pad, head_stride = std::max<int64_t>(T, 1) * token_stride + pad;
  return Tensor(name, e, role, {T, H, Dh}, {token_stride, head_stride, 1}, lead);
}

std::string seqs_tag(const char* what, const std::vector<std::pair<int64_t, int64_t>>& seqs) {
  std::string s = std::string("_") + what;
  for (size_t i = 0; i < seqs.size() && i < 4; ++i)
    s += (i ? "_" : "") + std::to_string(seqs[i].first) + "x" + std::to_string(seqs[i].second);
  if (seqs.size() > 4) s += "_etc" + std::to_string(seqs.size());
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------
// Paged KV cache
// ---------------------------------------------------------------------------
void PagedCache::build(OpTest& op, Rng& rng, Elem e, Role role, int64_t page_size,
                       int64_t num_kv_heads, int64_t head_dim, const std::vector<int64_t>& lengths,
                       int64_t extra_blocks, int64_t extra_table_entries, int64_t lead) {
  page = page_size;
  hkv = num_kv_heads;
  dh = head_dim;
  num_seqs = int64_t(lengths.size());
  int64_t needed = 0;
  max_blocks = 1;
  for (int64_t len : lengths) {
    needed += (len + page - 1) / page;
    max_blocks = std::max(max_blocks, (len + page - 1) / page);
  }
  max_blocks += extra_table_entries;
  num_blocks = needed + std::max<int64_t>(extra_blocks, needed == 0 ? 1 : 0);
  std::vector<int32_t> ids(static_cast<size_t>(num_blocks));
  std::iota(ids.begin(), ids.end(), 0);
  rng.shuffle(ids);  // pages in random order
  block_table = op.add(Tensor("block_table", Elem::I32, Role::In, {num_seqs, max_blocks}));
  size_t next = 0;
  for (int64_t s = 0; s < num_seqs; ++s)
    for (int64_t b = 0; b < max_blocks; ++b)
      block_table->i32()[s * max_blocks + b] =
          b < (lengths[size_t(s)] + page - 1) / page ? ids[next++] : -1;
  // Unused slots (past each context, and whole unused blocks) keep the NaN
  // poison: a kernel must mask them out, not multiply them by zero.
  k = op.add(Tensor("cache.k", e, role, {num_blocks, page, hkv, dh}, {}, lead));
  v = op.add(Tensor("cache.v", e, role, {num_blocks, page, hkv, dh}, {}, lead));
}

int64_t PagedCache::slot(int64_t s, int64_t pos, int64_t h) const {
  const int64_t block = block_table->i32()[s * max_blocks + pos / page];
  return k->lead + ((block * page + pos % page) * hkv + h) * dh;
}

tk_paged_kv_cache PagedCache::bind(const Bound& b, tk_dtype d) const {
  tk_paged_kv_cache c{};
  c.dtype = d;
  c.k = b(k);
  c.v = b(v);
  c.num_blocks = num_blocks;
  c.page_size = page;
  c.num_kv_heads = hkv;
  c.head_dim = dh;
  c.block_table = static_cast<const int32_t*>(b(block_table));
  c.num_seqs = num_seqs;
  c.max_blocks_per_seq = max_blocks;
  return c;
}

// ---------------------------------------------------------------------------
// attn_front
// ---------------------------------------------------------------------------
std::string AttnFrontShape::name() const {
  std::string n = tag(dtype) + tag("_D", D) + tag("_Hq", Hq) + tag("_Hkv", Hkv) + tag("_Dh", Dh) +
                  tag("_rot", rot) + tag("_page", page) + "_new";
  for (int64_t t : new_tokens) n += "_" + std::to_string(t);
  return n + (style == TK_ROPE_NEOX ? "_neox" : "_gptj") + layout_spec(layout).tag;
}

AttnFrontTest::AttnFrontTest(AttnFrontShape s) : s_(s) {
  for (int64_t t : s_.new_tokens) T += t;
}

double AttnFrontTest::cost() const {
  return double(T) * double(s_.Hq + 2 * s_.Hkv) * double(s_.Dh) * double(s_.D);
}

void AttnFrontTest::build(Rng& rng) {
  const LayoutSpec l = layout_spec(s_.layout);
  const Elem e = elem_of(s_.dtype);
  const int64_t n = int64_t(s_.new_tokens.size());
  // Each sequence already holds `before` tokens; this call appends new_tokens[s].
  std::vector<int64_t> before(static_cast<size_t>(n)), lengths(static_cast<size_t>(n));
  for (int64_t s = 0; s < n; ++s) {
    before[size_t(s)] = rng.range(0, 3 * s_.page + 5);
    lengths[size_t(s)] = before[size_t(s)] + s_.new_tokens[size_t(s)];
  }
  cache.build(*this, rng, e, Role::InOut, s_.page, s_.Hkv, s_.Dh, lengths, 2, 1, l.lead);
  for (int64_t s = 0; s < n; ++s)
    for (int64_t pos = 0; pos < before[size_t(s)]; ++pos)
      for (int64_t h = 0; h < s_.Hkv; ++h)
        for (int64_t c = 0; c < s_.Dh; ++c) {
          cache.k->set(cache.slot(s, pos, h) + c, rng.uniform(-1, 1));
          cache.v->set(cache.slot(s, pos, h) + c, rng.uniform(-1, 1));
        }
  // Tokens of different sequences interleaved, each at its sequence's next position.
  std::vector<std::pair<int32_t, int32_t>> tokens;
  for (int64_t s = 0; s < n; ++s)
    for (int64_t i = 0; i < s_.new_tokens[size_t(s)]; ++i)
      tokens.emplace_back(int32_t(s), int32_t(before[size_t(s)] + i));
  rng.shuffle(tokens);
  positions = add(Tensor("positions", Elem::I32, Role::In, {T}));
  seq_ids = add(Tensor("seq_ids", Elem::I32, Role::In, {T}));
  max_pos = 1;
  for (int64_t t = 0; t < T; ++t) {
    seq_ids->i32()[t] = tokens[size_t(t)].first;
    positions->i32()[t] = tokens[size_t(t)].second;
    max_pos = std::max<int64_t>(max_pos, tokens[size_t(t)].second + 1);
  }
  max_pos += rng.range(0, 3) + s_.extra_pos;
  x = add(Tensor("x", e, Role::In, {T, s_.D}, padded_strides({T, s_.D}, l.pad), l.lead));
  x->fill(rng, -2, 2);
  norm_weight = add(Tensor("norm_weight", e, Role::In, {s_.D}, {}, l.lead));
  norm_weight->fill(rng, 0.5, 1.5);
  const int64_t rows = (s_.Hq + 2 * s_.Hkv) * s_.Dh;
  w_qkv = add(Tensor("w_qkv", e, Role::In, {rows, s_.D}, padded_strides({rows, s_.D}, l.pad), l.lead));
  const double range = 2.0 / std::sqrt(double(s_.D));
  w_qkv->fill(rng, -range, range);
  cos_table = add(Tensor("cos_table", Elem::F32, Role::In, {max_pos, s_.rot / 2}));
  sin_table = add(Tensor("sin_table", Elem::F32, Role::In, {max_pos, s_.rot / 2}));
  EXPECT_EQ(tk_rope_table(reinterpret_cast<float*>(cos_table->bytes.data()),
                          reinterpret_cast<float*>(sin_table->bytes.data()), max_pos, s_.rot,
                          10000.0, nullptr),
            TK_OK);
  q_out = add(Tensor("q_out", e, Role::Out, {T, s_.Hq, s_.Dh}, {}, l.lead));
}

tk_attn_front_params AttnFrontTest::params(const Bound& b) const {
  tk_attn_front_params p{};
  p.dtype = s_.dtype;
  p.T = T;
  p.D = s_.D;
  p.x = b(x);
  p.x_stride = x->stride(0);
  p.norm_weight = b(norm_weight);
  p.eps = 1e-5f;
  p.w_qkv = b(w_qkv);
  p.w_qkv_stride = w_qkv->stride(0);
  p.num_q_heads = s_.Hq;
  p.rope_style = s_.style;
  p.rot_dim = s_.rot;
  p.cos_table = static_cast<const float*>(b(cos_table));
  p.sin_table = static_cast<const float*>(b(sin_table));
  p.max_pos = max_pos;
  p.positions = static_cast<const int32_t*>(b(positions));
  p.seq_ids = static_cast<const int32_t*>(b(seq_ids));
  p.cache = cache.bind(b, s_.dtype);
  p.q_out = b(q_out);
  return p;
}

tk_status AttnFrontTest::call(tk_context* ctx, const tk_attn_front_params& p) const {
  return tk_attn_front(ctx, &p);
}

void AttnFrontTest::compare(const Result& out, const Result& ref) const {
  const Tol tol = tolerance(OpKind::Matmul, s_.dtype);
  // Projections of about 1 (weights of 2/sqrt(D)).
  EXPECT_TRUE(compare_close(out.of(q_out), ref.of(q_out), tol, 0.1));
  // The cache: slots this call writes compare with the reference; every other
  // byte (older tokens, unused slots and blocks) must be exactly as before.
  const std::vector<char> was_nan_k = [&] {
    std::vector<char> m(size_t(cache.k->span()), 0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < s_.Hkv; ++h)
        for (int64_t c = 0; c < s_.Dh; ++c)
          m[size_t(cache.slot(seq_ids->i32()[t], positions->i32()[t], h) + c)] = 1;
    return m;
  }();
  for (const Tensor* t : {cache.k, cache.v}) {
    const Tensor& got = out.of(t);
    const Tensor& want = ref.of(t);
    Tensor got_new = got, want_new = want;  // written slots only, others zeroed
    int64_t stray = 0, first = -1;
    t->for_each([&](const std::vector<int64_t>&, int64_t e) {
      if (was_nan_k[size_t(e)]) return;
      if (std::memcmp(&got.bytes[e * elem_size(t->elem)], &t->bytes[e * elem_size(t->elem)],
                      elem_size(t->elem))) {
        if (first < 0) first = e;
        ++stray;
      }
      got_new.set(e, 0);
      want_new.set(e, 0);
    });
    EXPECT_EQ(stray, 0) << t->name << ": " << stray
                        << " elements outside the slots of this call's tokens changed, first at "
                        << (first >= 0 ? t->index_string(first) : "");
    EXPECT_TRUE(compare_close(got_new, want_new, tol, 0.1));
  }
}

std::vector<Case> attn_front_cases() {
  struct Cfg { int64_t D, Hq, Hkv, Dh, rot, page; std::vector<int64_t> tokens; };
  const Cfg cfgs[] = {
      {64, 1, 1, 64, 64, 16, {1}},            {113, 4, 1, 64, 32, 1, {3}},
      {128, 8, 2, 128, 128, 16, {1, 1, 1}},   {256, 4, 4, 128, 64, 256, {5, 2}},
      {96, 8, 1, 64, 64, 8, {2, 1, 3, 1}},    {4096, 4, 1, 128, 128, 16, {1}},
      {33, 2, 2, 256, 256, 32, {1, 4}}};
  std::vector<Case> cases;
  int i = 0;
  for (tk_dtype d : kDtypes)
    for (const Cfg& c : cfgs) {
      AttnFrontShape s{d, c.D, c.Hq, c.Hkv, c.Dh, c.rot, c.page, c.tokens,
                       i % 2 ? TK_ROPE_GPTJ : TK_ROPE_NEOX, kLayouts[i % 4]};
      ++i;
      cases.push_back(make_case<AttnFrontTest>(s));
    }
  return cases;
}
TK_OP_SUITE(AttnFront, attn_front_cases);

// ---------------------------------------------------------------------------
// flash_attention
// ---------------------------------------------------------------------------
std::string FlashShape::name() const {
  return tag(dtype) + tag("_Hq", Hq) + tag("_Hkv", Hkv) + tag("_Dh", Dh) + seqs_tag("seqs", seqs) +
         (causal ? "_causal" : "_full") + (lse ? "_lse" : "") + layout_spec(layout).tag +
         (head_major ? "_headmajor" : "") + (qk_range > 3 ? "_logits100" : "") +
         (pad_k ? tag("_padNaN", pad_k) : "");
}

FlashTest::FlashTest(FlashShape s) : s_(s) {
  for (const auto& [lq, lk] : s_.seqs) {
    total_q += lq;
    total_k += lk;
    max_q = std::max(max_q, lq);
    max_k = std::max(max_k, lk);
  }
  total_k += s_.pad_k;
}

double FlashTest::cost() const {
  double c = 0;
  for (const auto& [lq, lk] : s_.seqs) c += double(lq) * double(lk) * (s_.causal ? 0.5 : 1.0);
  return c * double(s_.Hq) * double(s_.Dh) * 4;  // q.k and p.v, reference and emulation
}

void FlashTest::build(Rng& rng) {
  const LayoutSpec l = layout_spec(s_.layout);
  const Elem e = elem_of(s_.dtype);
  q = add(heads("q", e, Role::In, total_q, s_.Hq, s_.Dh, l.pad, l.lead, s_.head_major));
  k = add(heads("k", e, Role::In, total_k, s_.Hkv, s_.Dh, 2 * l.pad, l.lead, false));
  v = add(heads("v", e, Role::In, total_k, s_.Hkv, s_.Dh, l.pad, l.lead, false));
  out = add(heads("out", e, Role::Out, total_q, s_.Hq, s_.Dh, l.pad ? l.pad + 1 : 0, l.lead,
                  s_.head_major));
  q->fill(rng, -s_.qk_range, s_.qk_range);
  k->fill(rng, -s_.qk_range, s_.qk_range);
  v->fill(rng, -1, 1);
  for (int64_t t = total_k - s_.pad_k; t < total_k; ++t)
    for (int64_t h = 0; h < s_.Hkv; ++h)
      for (int64_t d = 0; d < s_.Dh; ++d) {
        k->put({t, h, d}, std::nan(""));
        v->put({t, h, d}, std::nan(""));
      }
  const int64_t b = int64_t(s_.seqs.size());
  cu_q = add(Tensor("cu_seqlens_q", Elem::I32, Role::In, {b + 1}));
  cu_k = add(Tensor("cu_seqlens_k", Elem::I32, Role::In, {b + 1}));
  cu_q->i32()[0] = cu_k->i32()[0] = 0;
  for (int64_t i = 0; i < b; ++i) {
    cu_q->i32()[i + 1] = int32_t(cu_q->i32()[i] + s_.seqs[size_t(i)].first);
    cu_k->i32()[i + 1] = int32_t(cu_k->i32()[i] + s_.seqs[size_t(i)].second);
  }
  if (s_.lse) lse = add(Tensor("lse", Elem::F32, Role::Out, {s_.Hq, total_q}));
}

tk_flash_attention_params FlashTest::params(const Bound& b) const {
  tk_flash_attention_params p{};
  p.dtype = s_.dtype;
  p.batch = int64_t(s_.seqs.size());
  p.num_q_heads = s_.Hq;
  p.num_kv_heads = s_.Hkv;
  p.head_dim = s_.Dh;
  p.q = b(q);
  p.q_token_stride = q->stride(0);
  p.q_head_stride = q->stride(1);
  p.k = b(k);
  p.k_token_stride = k->stride(0);
  p.k_head_stride = k->stride(1);
  p.v = b(v);
  p.v_token_stride = v->stride(0);
  p.v_head_stride = v->stride(1);
  p.out = b(out);
  p.out_token_stride = out->stride(0);
  p.out_head_stride = out->stride(1);
  p.cu_seqlens_q = static_cast<const int32_t*>(b(cu_q));
  p.cu_seqlens_k = static_cast<const int32_t*>(b(cu_k));
  p.total_q = total_q;
  p.total_k = total_k;
  p.max_seqlen_q = max_q;
  p.max_seqlen_k = max_k;
  p.scale = float(1.0 / std::sqrt(double(s_.Dh)));
  p.causal = s_.causal;
  p.lse = static_cast<float*>(b(lse));
  return p;
}

tk_status FlashTest::call(tk_context* ctx, const tk_flash_attention_params& p) const {
  return tk_flash_attention(ctx, &p);
}

void FlashTest::compare(const Result& got, const Result& ref) const {
  // Sequence, row within it, and key range of each query token.
  std::vector<int64_t> seq_of(static_cast<size_t>(total_q)), row_of(static_cast<size_t>(total_q));
  for (size_t b = 0; b < s_.seqs.size(); ++b)
    for (int64_t i = 0; i < s_.seqs[b].first; ++i) {
      seq_of[size_t(cu_q->i32()[b] + i)] = int64_t(b);
      row_of[size_t(cu_q->i32()[b] + i)] = i;
    }
  auto visible = [&](int64_t t) -> int64_t {
    const auto [lq, lk] = s_.seqs[size_t(seq_of[size_t(t)])];
    return s_.causal ? std::clamp<int64_t>(row_of[size_t(t)] + lk - lq + 1, 0, lk) : lk;
  };
  const int64_t group = s_.Hq / s_.Hkv;
  const double scale = double(float(1.0 / std::sqrt(double(s_.Dh))));
  auto lowp = [&](int64_t t, int64_t h, std::vector<double>& row) {
    const int64_t k0 = cu_k->i32()[seq_of[size_t(t)]], kvh = h / group;
    lowp_row(
        s_.dtype, s_.Dh, visible(t), scale, [&](int64_t c) { return q->at({t, h, c}); }, *k,
        [&](int64_t j) { return k->offset({k0 + j, kvh, 0}); }, *v,
        [&](int64_t j) { return v->offset({k0 + j, kvh, 0}); }, row);
  };
  compare_attention(s_.dtype, out, lse, got, ref, visible, lowp);
}

std::vector<Case> flash_cases() {
  using Seqs = std::vector<std::pair<int64_t, int64_t>>;
  struct Heads { int64_t Hq, Hkv; };
  const Heads hs[] = {{1, 1}, {4, 1}, {8, 2}, {8, 1}, {16, 2}, {4, 4}, {2, 1}};
  const Seqs seqs[] = {
      {{1, 1}},
      {{3, 3}},
      {{113, 113}},
      {{17, 40}, {1, 1}, {0, 5}, {33, 33}},  // varlen, an empty query
      {{40, 17}},                            // Lq > Lk: causal rows that see no key
      {{3, 4097}},
      {{5, 0}, {7, 9}},                      // a sequence with no keys
      {{64, 64}, {65, 65}, {31, 130}},       // tile edges
      {{257, 257}},
  };
  const int64_t dhs[] = {64, 128, 256};
  std::vector<Case> cases;
  int i = 0;
  for (tk_dtype d : kDtypes)
    for (const Seqs& s : seqs) {
      const Heads h = hs[i % 7];
      FlashShape f{d, h.Hq, h.Hkv, dhs[i % 3], s};
      f.causal = i % 2 == 0 || s[0].first > s[0].second;
      f.lse = i % 3 != 1;
      f.layout = kLayouts[i % 4];
      f.head_major = i % 5 == 3;
      f.qk_range = i % 4 == 1 ? 10 : 1;
      ++i;
      cases.push_back(make_case<FlashTest>(f));
    }
  // Every GQA ratio at each head dim, logits of +-100, causal and not.
  for (tk_dtype d : {TK_F16, TK_BF16})
    for (int64_t dh : dhs)
      for (const Heads& h : {Heads{8, 8}, Heads{8, 2}, Heads{8, 1}, Heads{16, 2}}) {
        FlashShape f{d, h.Hq, h.Hkv, dh, {{9, 23}, {24, 24}}};
        f.causal = (dh + h.Hkv) % 2 == 0;
        f.lse = true;
        f.qk_range = 10;
        cases.push_back(make_case<FlashTest>(f));
      }
  // Head dims beyond the required 64 / 128 / 256 (a backend may report unsupported).
  for (int64_t dh : {32, 96})
    cases.push_back(make_case<FlashTest>(FlashShape{TK_BF16, 4, 2, dh, {{13, 29}}, true, true}));
  // Larger prefill (CUDA only: too slow for the host reference).
  for (tk_dtype d : {TK_F16, TK_BF16}) {
    cases.push_back(make_case<FlashTest>(FlashShape{d, 4, 2, 128, {{513, 513}}, true, true}));
    cases.push_back(make_case<FlashTest>(FlashShape{d, 2, 1, 64, {{1000, 1000}, {24, 1030}}, true, false}));
    cases.push_back(make_case<FlashTest>(FlashShape{d, 2, 2, 256, {{300, 700}}, false, true}));
  }
  return cases;
}
TK_OP_SUITE(FlashAttention, flash_cases);

// ---------------------------------------------------------------------------
// paged_attention
// ---------------------------------------------------------------------------
std::string PagedShape::name() const {
  return tag(dtype) + tag("_Hq", Hq) + tag("_Hkv", Hkv) + tag("_Dh", Dh) + tag("_page", page) +
         seqs_tag("q_ctx", seqs) + (cu_seqlens ? "_cu" : "") + (lse ? "_lse" : "") +
         (workspace ? "" : "_nows") + layout_spec(layout).tag + (qk_range > 3 ? "_logits100" : "");
}

PagedTest::PagedTest(PagedShape s) : s_(s) {
  for (const auto& [ql, len] : s_.seqs) {
    total_q += ql;
    max_q = std::max(max_q, ql);
    max_ctx = std::max(max_ctx, len);
  }
}

double PagedTest::cost() const {
  double c = 0;
  for (const auto& [ql, len] : s_.seqs) c += double(ql) * double(len);
  return c * double(s_.Hq) * double(s_.Dh) * 4;
}

void PagedTest::build(Rng& rng) {
  const LayoutSpec l = layout_spec(s_.layout);
  const Elem e = elem_of(s_.dtype);
  std::vector<int64_t> lengths;
  for (const auto& sq : s_.seqs) lengths.push_back(sq.second);
  cache.build(*this, rng, e, Role::In, s_.page, s_.Hkv, s_.Dh, lengths, 2, int64_t(rng.range(0, 1)),
              l.lead);
  for (int64_t s = 0; s < int64_t(lengths.size()); ++s)
    for (int64_t pos = 0; pos < lengths[size_t(s)]; ++pos)
      for (int64_t h = 0; h < s_.Hkv; ++h)
        for (int64_t c = 0; c < s_.Dh; ++c) {
          cache.k->set(cache.slot(s, pos, h) + c, rng.uniform(-s_.qk_range, s_.qk_range));
          cache.v->set(cache.slot(s, pos, h) + c, rng.uniform(-1, 1));
        }
  q = add(heads("q", e, Role::In, total_q, s_.Hq, s_.Dh, l.pad, l.lead, false));
  q->fill(rng, -s_.qk_range, s_.qk_range);
  out = add(heads("out", e, Role::Out, total_q, s_.Hq, s_.Dh, l.pad ? l.pad + 1 : 0, l.lead, false));
  const int64_t n = int64_t(s_.seqs.size());
  context_lens = add(Tensor("context_lens", Elem::I32, Role::In, {n}));
  for (int64_t s = 0; s < n; ++s) context_lens->i32()[s] = int32_t(lengths[size_t(s)]);
  if (s_.cu_seqlens) {
    cu_q = add(Tensor("cu_seqlens_q", Elem::I32, Role::In, {n + 1}));
    cu_q->i32()[0] = 0;
    for (int64_t s = 0; s < n; ++s)
      cu_q->i32()[s + 1] = int32_t(cu_q->i32()[s] + s_.seqs[size_t(s)].first);
  }
  if (s_.lse) lse = add(Tensor("lse", Elem::F32, Role::Out, {s_.Hq, total_q}));
  if (s_.workspace) {
    std::string why;
    const size_t bytes =
        tk_paged_attention_workspace_size(context(backend, &why), total_q, s_.Hq, s_.Dh, max_ctx);
    if (bytes) workspace = add(Tensor("workspace", Elem::U8, Role::Scratch, {int64_t(bytes)}));
  }
}

tk_paged_attention_params PagedTest::params(const Bound& b) const {
  tk_paged_attention_params p{};
  p.dtype = s_.dtype;
  p.num_q_heads = s_.Hq;
  p.q = b(q);
  p.q_token_stride = q->stride(0);
  p.q_head_stride = q->stride(1);
  p.out = b(out);
  p.out_token_stride = out->stride(0);
  p.out_head_stride = out->stride(1);
  p.cu_seqlens_q = static_cast<const int32_t*>(b(cu_q));
  p.total_q = total_q;
  p.max_q_len = max_q;
  p.cache = cache.bind(b, s_.dtype);
  p.context_lens = static_cast<const int32_t*>(b(context_lens));
  p.max_context_len = max_ctx;
  p.scale = float(1.0 / std::sqrt(double(s_.Dh)));
  p.lse = static_cast<float*>(b(lse));
  p.workspace = b(workspace);
  p.workspace_bytes = workspace ? size_t(workspace->numel()) : 0;
  return p;
}

tk_status PagedTest::call(tk_context* ctx, const tk_paged_attention_params& p) const {
  return tk_paged_attention(ctx, &p);
}

void PagedTest::compare(const Result& got, const Result& ref) const {
  std::vector<int64_t> seq_of(static_cast<size_t>(total_q)), row_of(static_cast<size_t>(total_q));
  int64_t t0 = 0;
  for (size_t s = 0; s < s_.seqs.size(); ++s)
    for (int64_t i = 0; i < s_.seqs[s].first; ++i, ++t0) {
      seq_of[size_t(t0)] = int64_t(s);
      row_of[size_t(t0)] = i;
    }
  auto visible = [&](int64_t t) -> int64_t {
    const auto [ql, len] = s_.seqs[size_t(seq_of[size_t(t)])];
    return len - ql + row_of[size_t(t)] + 1;
  };
  const int64_t group = s_.Hq / s_.Hkv;
  const double scale = double(float(1.0 / std::sqrt(double(s_.Dh))));
  auto lowp = [&](int64_t t, int64_t h, std::vector<double>& row) {
    const int64_t s = seq_of[size_t(t)], kvh = h / group;
    auto slot = [&](int64_t j) { return cache.slot(s, j, kvh); };
    lowp_row(s_.dtype, s_.Dh, visible(t), scale, [&](int64_t c) { return q->at({t, h, c}); },
             *cache.k, slot, *cache.v, slot, row);
  };
  compare_attention(s_.dtype, out, lse, got, ref, visible, lowp);
}

std::vector<Case> paged_cases() {
  using Seqs = std::vector<std::pair<int64_t, int64_t>>;
  struct Heads { int64_t Hq, Hkv; };
  const Heads hs[] = {{8, 2}, {1, 1}, {4, 1}, {8, 1}, {32, 8}, {4, 4}, {16, 2}};
  const Seqs decode[] = {
      {{1, 1}},
      {{1, 17}, {1, 33}, {1, 5}},            // contexts ending mid-page
      {{1, 4097}},                           // long: split into chunks
      {{1, 1000}, {1, 16}, {1, 256}, {1, 257}},
      {{1, 300}, {1, 2}},
  };
  const Seqs multi[] = {
      {{3, 40}, {1, 1}, {5, 5}, {2, 300}},  // chunked prefill, varlen
      {{8, 129}},                            // speculative tokens
      {{4, 4}, {16, 1100}},
  };
  const int64_t pages[] = {16, 1, 256, 8, 32, 64, 2};
  const int64_t dhs[] = {128, 64, 256};
  std::vector<Case> cases;
  int i = 0;
  auto push = [&](tk_dtype d, const Seqs& s, bool cu) {
    const Heads h = hs[i % 7];
    PagedShape p{d, h.Hq, h.Hkv, dhs[i % 3], pages[i % 7], s};
    p.cu_seqlens = cu;
    p.lse = i % 3 != 2;
    p.workspace = i % 4 != 3;
    p.layout = kLayouts[i % 4];
    p.qk_range = i % 5 == 1 ? 10 : 1;
    while (PagedTest(p).cost() > kHostCostLimit && p.Hq > p.Hkv) p.Hq /= 2;
    if (p.Hq % p.Hkv) p.Hq = p.Hkv;
    ++i;
    cases.push_back(make_case<PagedTest>(p));
  };
  for (tk_dtype d : kDtypes) {
    for (const Seqs& s : decode) push(d, s, i % 2 == 1);
    for (const Seqs& s : multi) push(d, s, true);
  }
  // Every page size and GQA ratio, with logits of +-100.
  for (tk_dtype d : {TK_F16, TK_BF16})
    for (int64_t page : {1, 16, 256})
      for (const Heads& h : {Heads{8, 8}, Heads{8, 2}, Heads{8, 1}, Heads{32, 4}}) {
        PagedShape p{d, h.Hq, h.Hkv, page == 16 ? 128 : 64, page, {{1, 77}, {2, 300}, {1, 1}}};
        p.cu_seqlens = true;
        p.lse = true;
        p.qk_range = 10;
        cases.push_back(make_case<PagedTest>(p));
      }
  // The decode shape of the issue, shortened (CUDA only).
  for (tk_dtype d : {TK_F16, TK_BF16})
    cases.push_back(make_case<PagedTest>(
        PagedShape{d, 32, 8, 128, 16, {{1, 4096}, {1, 3000}, {1, 17}}, false, true}));
  return cases;
}
TK_OP_SUITE(PagedAttention, paged_cases);

}  // namespace tk::test
