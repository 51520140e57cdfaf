// Upsample by 2 (trilinear, align_corners=False), add, and concatenate, in one pass over the output:
//   out[:, :C]  = base + upsample2(coarse)   over the grid of `skip` (base and the upsampled field cropped to it)
//   out[:, C:]  = skip
// the join of a U-Net decoder level in inference (networks/unet.py). The unfused form writes the upsampled
// field, adds it into `base` and copies both into the concatenation: three passes over full-size tensors.
//
// Compiled on first use by monai_gradicon/maps/native.py (torch.utils.cpp_extension); bound in native.cpp.
// Per axis of input size n, output index o: s = max(0, (o + 0.5) / 2 - 0.5), i0 = floor(s), l1 = s - i0, l0 = 1 - l1,
// i1 = i0 + (i0 < n - 1) (PyTorch's upsample_trilinear3d indices and weights for scale_factor=2; exact in binary:
// 1 and 0 at o = 0, else 0.25 / 0.75). The value is base + sum of the 8 corner products w_dhw * v_dhw, w = l_d l_h l_w,
// added in corner order. All tensors channels-last (N, D, H, W, C in memory), so the channel loop is contiguous.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

template <typename T>
struct Tap {
  int64_t i0, i1;
  T l0, l1;
};

template <typename T>
Tap<T> tap(int64_t o, int64_t n) {
  T s = std::max(T(0), T(0.5) * (static_cast<T>(o) + T(0.5)) - T(0.5));
  const int64_t i0 = static_cast<int64_t>(s);
  const T l1 = std::min(std::max(s - static_cast<T>(i0), T(0)), T(1));
  return {i0, i0 + (i0 < n - 1 ? 1 : 0), T(1) - l1, l1};
}

template <typename T>
void upsample_add_concat_kernel(const T* base, const T* coarse, const T* skip, T* out, int64_t batch, int64_t channels,
                                int64_t skip_channels, const int64_t* sb, const int64_t* sc, const int64_t* ss) {
  const int64_t oc = channels + skip_channels;
  std::vector<Tap<T>> w_taps(ss[2]);
  for (int64_t w = 0; w < ss[2]; ++w) w_taps[w] = tap<T>(w, sc[2]);
  at::parallel_for(0, batch * ss[0] * ss[1], 1, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t b = row / (ss[0] * ss[1]), d = (row / ss[1]) % ss[0], h = row % ss[1];
      const Tap<T> td = tap<T>(d, sc[0]), th = tap<T>(h, sc[1]);
      const T* base_row = base + ((b * sb[0] + d) * sb[1] + h) * sb[2] * channels;
      const T* skip_row = skip + ((b * ss[0] + d) * ss[1] + h) * ss[2] * skip_channels;
      T* out_row = out + ((b * ss[0] + d) * ss[1] + h) * ss[2] * oc;
      const T* plane = coarse + b * sc[0] * sc[1] * sc[2] * channels;
      const T* r00 = plane + (td.i0 * sc[1] + th.i0) * sc[2] * channels;  // (d, h) corners of the coarse rows
      const T* r01 = plane + (td.i0 * sc[1] + th.i1) * sc[2] * channels;
      const T* r10 = plane + (td.i1 * sc[1] + th.i0) * sc[2] * channels;
      const T* r11 = plane + (td.i1 * sc[1] + th.i1) * sc[2] * channels;
      for (int64_t w = 0; w < ss[2]; ++w) {
        const Tap<T>& tw = w_taps[w];
        const T w000 = td.l0 * th.l0 * tw.l0, w001 = td.l0 * th.l0 * tw.l1, w010 = td.l0 * th.l1 * tw.l0,
                w011 = td.l0 * th.l1 * tw.l1, w100 = td.l1 * th.l0 * tw.l0, w101 = td.l1 * th.l0 * tw.l1,
                w110 = td.l1 * th.l1 * tw.l0, w111 = td.l1 * th.l1 * tw.l1;
        const T* __restrict__ v000 = r00 + tw.i0 * channels;
        const T* __restrict__ v001 = r00 + tw.i1 * channels;
        const T* __restrict__ v010 = r01 + tw.i0 * channels;
        const T* __restrict__ v011 = r01 + tw.i1 * channels;
        const T* __restrict__ v100 = r10 + tw.i0 * channels;
        const T* __restrict__ v101 = r10 + tw.i1 * channels;
        const T* __restrict__ v110 = r11 + tw.i0 * channels;
        const T* __restrict__ v111 = r11 + tw.i1 * channels;
        const T* __restrict__ y = base_row + w * channels;
        T* __restrict__ o = out_row + w * oc;
        for (int64_t c = 0; c < channels; ++c) {
          const T up = w000 * v000[c] + w001 * v001[c] + w010 * v010[c] + w011 * v011[c] + w100 * v100[c] +
                       w101 * v101[c] + w110 * v110[c] + w111 * v111[c];
          o[c] = y[c] + up;
        }
        const T* __restrict__ s = skip_row + w * skip_channels;
        for (int64_t c = 0; c < skip_channels; ++c) o[channels + c] = s[c];
      }
    }
  });
}

}  // namespace

torch::Tensor upsample_add_concat(const torch::Tensor& base, const torch::Tensor& coarse, const torch::Tensor& skip) {
  const auto cl = at::MemoryFormat::ChannelsLast3d;
  TORCH_CHECK(base.dim() == 5 && coarse.dim() == 5 && skip.dim() == 5, "upsample_add_concat: 5D tensors expected");
  TORCH_CHECK(base.device().is_cpu() && coarse.device().is_cpu() && skip.device().is_cpu(), "upsample_add_concat: CPU tensors expected");
  TORCH_CHECK(base.scalar_type() == coarse.scalar_type() && base.scalar_type() == skip.scalar_type(),
              "upsample_add_concat: one dtype expected");
  TORCH_CHECK(base.is_contiguous(cl) && coarse.is_contiguous(cl) && skip.is_contiguous(cl),
              "upsample_add_concat: channels-last 3D tensors expected");
  TORCH_CHECK(base.size(0) == coarse.size(0) && base.size(0) == skip.size(0) && base.size(1) == coarse.size(1),
              "upsample_add_concat: base and coarse must share batch and channels, skip the batch");
  int64_t sb[3], sc[3], ss[3];
  for (int k = 0; k < 3; ++k) {
    sb[k] = base.size(k + 2), sc[k] = coarse.size(k + 2), ss[k] = skip.size(k + 2);
    TORCH_CHECK(ss[k] <= sb[k] && ss[k] <= 2 * sc[k], "upsample_add_concat: skip larger than base or the upsampled coarse field");
  }
  const int64_t channels = base.size(1), skip_channels = skip.size(1);
  torch::Tensor out = torch::empty({base.size(0), channels + skip_channels, ss[0], ss[1], ss[2]}, base.options().memory_format(cl));
  AT_DISPATCH_FLOATING_TYPES(base.scalar_type(), "upsample_add_concat", [&] {
    upsample_add_concat_kernel<scalar_t>(base.data_ptr<scalar_t>(), coarse.data_ptr<scalar_t>(), skip.data_ptr<scalar_t>(),
                                         out.data_ptr<scalar_t>(), base.size(0), channels, skip_channels, sb, sc, ss);
  });
  return out;
}
