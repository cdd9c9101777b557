// The Hopper (sm_90a) flash_attention forward, used by flash_attention.cu
// whenever the device and the layout allow it.
#pragma once

#include "cuda/common.cuh"

namespace tk::cuda {

// Runs flash attention on the sm_90a kernel (wgmma, TMA, warp specialisation)
// and returns true with its launch status in *status, or returns false,
// launching nothing, when this call needs the portable kernel: not sm_90,
// TK_CUDA_PORTABLE, a head dim other than 64 / 128, a base or stride that TMA
// cannot take (16-byte alignment), or a build without sm_90a code.
bool flash_attention_sm90(const tk_flash_attention_params& p, const Launch& l, tk_status* status);

}  // namespace tk::cuda
