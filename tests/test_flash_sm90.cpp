// flash_attention cases aimed at the Hopper kernel (src/cuda/flash_attention_sm90.cu):
// 128 x 128 tiles, a ring of K/V stages, key tiles visited last-to-first, a
// persistent grid. The shared harness's FlashAttention suite covers the small
// shapes; these add many tiles (ring wrap-around, stage reuse), partial last
// tiles, key/query lengths that differ, variable-length batches whose tiles
// straddle sequences, enough query tiles for the persistent grid, and layouts
// TMA cannot take (they must still be right through the portable kernel). The
// cases are costly for the host backends' reference run, so most run on CUDA
// only (cases_for drops them elsewhere).
#include "ops.h"

namespace tk::test {
namespace {

std::vector<Case> flash_sm90_cases() {
  std::vector<Case> cases;
  auto add = [&](FlashShape f) { cases.push_back(make_case<FlashTest>(f)); };
  // Many tiles, partial ones: 9 key tiles through a 2- (D 128) or 3-stage (D 64) ring, the
  // last partial; query tiles are aligned to the sequence's end, so the first is partial
  // and its TMA box starts before row 0.
  add(FlashShape{TK_BF16, 4, 1, 128, {{1030, 1030}}, true, true});
  add(FlashShape{TK_F16, 4, 1, 64, {{1030, 1030}}, true, true});
  // Keys outnumber queries (bottom-right causal diagonal), and the reverse.
  add(FlashShape{TK_F16, 2, 2, 128, {{300, 1100}}, true, true});
  add(FlashShape{TK_BF16, 2, 1, 64, {{700, 1500}}, false, true});
  add(FlashShape{TK_BF16, 2, 2, 128, {{640, 200}}, true, true});
  // Variable length: tiles that run past a sequence's end into the next one,
  // an empty query, an empty key range.
  add(FlashShape{TK_BF16, 4, 2, 128, {{129, 129}, {1, 300}, {600, 450}, {0, 7}, {255, 256}, {5, 0}},
                 true, true});
  add(FlashShape{TK_F16, 8, 2, 64, {{257, 513}, {128, 128}, {383, 129}}, false, false});
  // Large logits (+-100): the running max moves across tiles.
  {
    FlashShape f{TK_BF16, 2, 1, 128, {{513, 900}}, true, true};
    f.qk_range = 10;
    add(f);
  }
  // Padded strides (16-byte aligned: TMA) and head-major q / out.
  {
    FlashShape f{TK_F16, 4, 2, 128, {{384, 384}}, true, true, Layout::Strided};
    f.head_major = true;
    add(f);
  }
  // NaN in the rows of k and v past the last sequence (padding nobody owns):
  // the last key tile of the last sequence reaches into them, and none of it
  // may reach the output (P = 0 times NaN is NaN).
  for (int64_t dh : {64, 128}) {
    FlashShape f{TK_BF16, 4, 2, dh, {{70, 200}, {100, 130}}, true, true};
    f.pad_k = 200;
    add(f);
    FlashShape g{TK_F16, 2, 1, dh, {{1, 1}, {33, 5}}, false, false};
    g.pad_k = 150;
    add(g);
  }
  // Many query tiles (over 8 per SM of an H100: the persistent grid, each CTA
  // walking several tiles, its K/V ring and Q buffer phases running on across
  // them): one long sequence sets the tiles per head, the short ones leave
  // most of them without rows; empty key ranges (rows that see no key) and
  // keys that end mid-tile in between.
  for (int64_t dh : {64, 128}) {
    std::vector<std::pair<int64_t, int64_t>> seqs;
    for (int64_t i = 0; i < 40; ++i)
      seqs.push_back(i == 1 ? std::pair<int64_t, int64_t>{1200, 1300}
                            : std::pair<int64_t, int64_t>{(i * 37) % 150 + (i % 9 != 0),
                                                            i % 11 == 5 ? 0 : (i * 53) % 170});
    add(FlashShape{dh == 64 ? TK_F16 : TK_BF16, 4, 2, dh, seqs, true, true});
  }
  // Layouts TMA cannot take: an odd row pad and a base one element off. The
  // portable kernel serves them on Hopper too.
  add(FlashShape{TK_BF16, 4, 2, 128, {{300, 300}}, true, true, Layout::Odd});
  add(FlashShape{TK_F16, 2, 1, 64, {{300, 333}}, false, true, Layout::Offset});
  return cases;
}
TK_OP_SUITE(FlashAttentionSm90, flash_sm90_cases);

}  // namespace
}  // namespace tk::test
